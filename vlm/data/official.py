"""The benchmarks' official annotation files, parsed once: the converters (training shards, `vlm.data.convert`) and
the evaluation readers (questions to score, `vlm.eval.tasks`) both read them here.

Each `<benchmark>(...)` function reads the files, checks their top-level shape (a wrong file is a `ValueError` naming
it) and returns an `OfficialFile`: the raw entries in file order and `parse(entry, index) -> Entry`, which raises
`BadEntry` (a reason code and a detail) for an entry it cannot use. Converters skip and count such entries; the
evaluation readers stop at them, since a benchmark's score must cover all of its questions.

    benchmark   official files (images)
    vqa         questions JSON (+ annotations JSON; none for test / test-dev) (COCO_{subtype}_{image_id:012d}.jpg)
                VQAv2, OK-VQA, and the synthetic corpus with image_name="{image_id:012d}.jpg"
    textvqa     TextVQA_0.5.1_{split}.json: data[] {question_id, question, image_id, answers} ({image_id}.jpg)
    vizwiz      {split}.json: [{image, question, answers: [{answer, answer_confidence}], answer_type}]
    docvqa      {split}_v1.0.json: data[] {questionId, question, image, answers, question_types} (image paths relative
                to the JSON's folder)
    chartqa     {root}/{split}/{split}_{human,augmented}.json: [{imgname, query, label}] ({root}/{split}/png/)
    easy_vqa    {root}/{split}/questions.json: [[question, answer, image_id]] ({root}/{split}/images/{image_id}.png);
                root: the installed `easy_vqa` package's data folder unless given
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

COCO_IMAGE_NAME = "COCO_{subtype}_{image_id:012d}.jpg"
CHARTQA_SOURCES = ("human", "augmented")
EASY_VQA_INSTALL = "pip install --no-deps easy-vqa==1.0"
EASY_VQA_SPLITS = ("train", "test")
# easy-VQA has no question types; its 13 answers (data/answers.txt) are shapes, colours or yes / no, and the type is
# the answer's group.
EASY_VQA_TYPES = {
    "shape": ("circle", "rectangle", "triangle"),
    "colour": ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow"),
    "yes/no": ("yes", "no"),
}
EASY_VQA_TYPE_OF = {answer: qtype for qtype, answers in EASY_VQA_TYPES.items() for answer in answers}


class BadEntry(Exception):
    """An entry that cannot be used, with a reason code (e.g. "missing_field", "missing_annotation")."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Entry:
    """One question of an official file, as the file says it.

    image: the image's path relative to the benchmark's image folder. answers: every reference answer as the file
    gives it (None: the split has none). target: the answer the benchmark's convention trains on (VQAv2's
    multiple_choice_answer, TextVQA's most common answer, DocVQA's first, ChartQA's label), not yet checked.
    fields: the file's other fields worth keeping, under its own names."""

    question_id: Any
    question: Any
    image: str
    answers: list | None = None
    target: Any = None
    question_type: str | list[str] | None = None
    answer_type: str | None = None
    fields: dict = field(default_factory=dict)


@dataclass
class OfficialFile:
    """items: the raw entries in file order; parse(item, index) -> Entry or BadEntry; item_id names an item in
    reports; files: what was read (path, size), for converters' fingerprints; info: what the files say of all their
    entries (VQA: the subtype)."""

    items: Sequence[Any]
    parse: Callable[[Any, int], Entry]
    item_id: Callable[[Any, int], str]
    files: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def entries(self) -> list[Entry]:
        """Every entry parsed, stopping at the first bad one (the evaluation readers' way)."""
        out = []
        for i, item in enumerate(self.items):
            try:
                out.append(self.parse(item, i))
            except BadEntry as e:
                raise ValueError(f"{self.item_id(item, i)}: {e}") from None
        return out


# ---------------------------------------------------------------------------------------------------- helpers
def load_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_list(path: str | Path, what: str, key: str | None = None, data: Any = None) -> list:
    """The list a benchmark file holds: at `key` of its top-level object, or the file itself (key None); a ValueError
    naming the file and the benchmark otherwise. `data`: the file's content, when already read."""
    data = load_json(path) if data is None else data
    if key is None:
        if not isinstance(data, list):
            raise ValueError(f"{path}: not a {what} file (expected a list)")
        return data
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ValueError(f"{path}: not a {what} file (no '{key}' list)")
    return data[key]


def file_info(path: str | Path | None) -> dict | None:
    if path is None:
        return None
    p = Path(path).resolve()
    return {"path": str(p), "size": p.stat().st_size if p.is_file() else None}


def get_field(item: Any, name: str) -> Any:
    """item[name], or BadEntry: "malformed_item" (not an object) / "missing_field" (absent or null)."""
    if not isinstance(item, dict):
        raise BadEntry("malformed_item", f"expected an object, got {type(item).__name__}")
    if item.get(name) is None:
        raise BadEntry("missing_field", f"no {name!r}")
    return item[name]


def answer_list(value: Any) -> list | None:
    """An entry's `answers`: None when absent, else the list (BadEntry "malformed_item" when it is not one)."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise BadEntry("malformed_item", "'answers' is not a list")
    return value


def most_common_answer(answers: Sequence[str]) -> str | None:
    """The most frequent non-empty answer (stripped); ties go to the one that appears first."""
    counts = Counter(a.strip() for a in answers if isinstance(a, str) and a.strip())
    return counts.most_common(1)[0][0] if counts else None


def _qid(name: str) -> Callable[[Any, int], str]:
    return lambda item, index: f"{name} {item.get(name) if isinstance(item, dict) else None}"


# ------------------------------------------------------------------------------------------------- benchmarks
def vqa(questions_json: str | Path, annotations_json: str | Path | None = None, subtype: str | None = None, *,
        image_name: str = COCO_IMAGE_NAME) -> OfficialFile:
    """VQAv2 / OK-VQA (the same schema). subtype: the questions file's "data_subtype" unless given ("test-dev2015"
    reads test2015 images). image_name: a format string over {subtype, image_id}. Without annotations the entries
    have no answers (test / test-dev). fields: image_id, split (the subtype)."""
    qdata = load_json(questions_json)
    questions = load_list(questions_json, "VQA questions", "questions", qdata)
    subtype = subtype or qdata.get("data_subtype") or ""
    if not subtype and "{subtype" in image_name:
        raise ValueError(f"{questions_json} has no 'data_subtype': give the image subtype (e.g. val2014)")
    image_subtype = re.sub(r"^test-dev", "test", subtype)  # test-dev2015's questions are about test2015 images
    by_qid = None
    if annotations_json is not None:
        annotations = load_list(annotations_json, "VQA annotations", "annotations")
        by_qid = {a.get("question_id"): a for a in annotations if isinstance(a, dict)}

    def parse(q: Any, index: int) -> Entry:
        qid, image_id = get_field(q, "question_id"), get_field(q, "image_id")
        question = get_field(q, "question")
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise BadEntry("malformed_item", f"image_id {image_id!r} is not an integer")
        entry = Entry(qid, question, image_name.format(subtype=image_subtype, image_id=image_id),
                      fields={"image_id": image_id, "split": subtype})
        if by_qid is not None:
            ann = by_qid.get(qid)
            if ann is None:
                raise BadEntry("missing_annotation", f"question_id {qid}")
            entry.target = ann.get("multiple_choice_answer")
            entry.answers = [a["answer"] if isinstance(a, dict) else a for a in get_field(ann, "answers")]
            entry.question_type, entry.answer_type = ann.get("question_type"), ann.get("answer_type")
        return entry

    return OfficialFile(questions, parse, _qid("question_id"),
                        {"questions": file_info(questions_json), "annotations": file_info(annotations_json)},
                        {"subtype": subtype})


def textvqa(annotations_json: str | Path) -> OfficialFile:
    """TextVQA `TextVQA_0.5.1_{split}.json` (data[] of question_id, question, image_id, answers; no answers in the
    test split), images `{image_id}.jpg`. target: the most common of the 10 answers. fields: image_id, split
    (set_name)."""
    items = load_list(annotations_json, "TextVQA", "data")

    def parse(item: Any, index: int) -> Entry:
        qid, image_id = get_field(item, "question_id"), get_field(item, "image_id")
        answers = answer_list(item.get("answers"))
        fields = {"image_id": image_id} | ({"split": item["set_name"]} if item.get("set_name") is not None else {})
        return Entry(qid, get_field(item, "question"), f"{image_id}.jpg", answers,
                     most_common_answer(answers) if answers is not None else None, fields=fields)

    return OfficialFile(items, parse, _qid("question_id"), {"annotations": file_info(annotations_json)})


def vizwiz(annotations_json: str | Path) -> OfficialFile:
    """VizWiz-VQA `{split}.json`: a list of {image, question, answers: [{answer, answer_confidence}], answer_type,
    answerable} (no answers in test). question_id: the image name without its extension."""
    items = load_list(annotations_json, "VizWiz")

    def parse(item: Any, index: int) -> Entry:
        image = get_field(item, "image")
        answers = answer_list(item.get("answers"))
        fields = {"image": image} | ({"answerable": item["answerable"]} if item.get("answerable") is not None else {})
        return Entry(Path(image).stem, get_field(item, "question"), image,
                     None if answers is None else [a["answer"] if isinstance(a, dict) else a for a in answers],
                     answer_type=item.get("answer_type"), fields=fields)

    return OfficialFile(items, parse, lambda item, i: f"image {item.get('image') if isinstance(item, dict) else None}",
                        {"annotations": file_info(annotations_json)})


DOCVQA_FIELDS = ("docId", "ucsf_document_id", "ucsf_document_page_no", "data_split")


def docvqa(annotations_json: str | Path) -> OfficialFile:
    """DocVQA `{split}_v1.0.json` (data[] of questionId, question, image, answers, question_types; no answers in
    test). image: a path relative to the split folder ("documents/x.png"). target: answers[0]. fields: the
    document's ids and split, under DocVQA's names."""
    items = load_list(annotations_json, "DocVQA", "data")

    def parse(item: Any, index: int) -> Entry:
        qid, image = get_field(item, "questionId"), get_field(item, "image")
        answers = answer_list(item.get("answers"))
        return Entry(qid, get_field(item, "question"), image, answers, answers[0] if answers else None,
                     question_type=item.get("question_types"),
                     fields={k: item[k] for k in DOCVQA_FIELDS if item.get(k) is not None})

    return OfficialFile(items, parse, _qid("questionId"), {"annotations": file_info(annotations_json)})


def chartqa(root: str | Path, split: str = "test", sources: Sequence[str] = CHARTQA_SOURCES) -> OfficialFile:
    """ChartQA `{root}/{split}/{split}_{human,augmented}.json` (lists of {imgname, query, label}), images in
    `{root}/{split}/png/`: every entry of the human file, then of the augmented file. question_id:
    "{source}_{index in file}"; question_type: the source, the two halves ChartQA reports; target: the label."""
    split_dir = Path(root) / split
    items, files = [], {}
    for src in sources:
        if src not in CHARTQA_SOURCES:
            raise ValueError(f"ChartQA source {src!r} is not one of {CHARTQA_SOURCES}")
        path = split_dir / f"{split}_{src}.json"
        items += [(src, j, entry) for j, entry in enumerate(load_list(path, "ChartQA"))]
        files[src] = file_info(path)

    def parse(item: tuple, index: int) -> Entry:
        src, j, entry = item
        imgname = get_field(entry, "imgname")
        label = entry.get("label") if isinstance(entry, dict) else None
        return Entry(f"{src}_{j}", get_field(entry, "query"), imgname, None if label is None else [label], label,
                     question_type=src, fields={"source": src, "index": j, "imgname": imgname, "split": split})

    return OfficialFile(items, parse, lambda item, i: f"{item[0]} #{item[1]}", files)


def easy_vqa_root(root: str | Path | None = None) -> Path:
    """easy-VQA's data folder (holding train/, test/, answers.txt): `root`, or the installed `easy_vqa` package's
    own (found without importing it); a FileNotFoundError with the install command when it is not installed."""
    if root is not None:
        return Path(root)
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"easy-VQA: the package easy_vqa is not installed; install it with "
                                f"`{EASY_VQA_INSTALL}` (or give the path to a copy of its data folder)")
    return Path(spec.origin).parent / "data"


def easy_vqa(root: str | Path | None = None, split: str = "test") -> OfficialFile:
    """easy-VQA (github.com/vzhou842/easy-VQA, the `easy-vqa` package): `{root}/{split}/questions.json`, a list of
    [question, answer, image_id], images `{root}/{split}/images/{image_id}.png` (64x64). root: the installed
    package's data folder unless given (`easy_vqa_root`). question_id: "{split}-{index in file}"; answers: the one
    answer; question_type: the answer's group in `EASY_VQA_TYPES` (shape / colour / yes/no; another answer is
    BadEntry "unknown_answer"). fields: image_id, split. info: root, the image folder."""
    if split not in EASY_VQA_SPLITS:
        raise ValueError(f"easy-VQA split {split!r} is not one of {EASY_VQA_SPLITS}")
    root = easy_vqa_root(root)
    path = root / split / "questions.json"
    items = load_list(path, "easy-VQA questions")

    def parse(item: Any, index: int) -> Entry:
        if not isinstance(item, list) or len(item) != 3:
            raise BadEntry("malformed_item", "expected [question, answer, image_id]")
        question, answer, image_id = item
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise BadEntry("malformed_item", f"image_id {image_id!r} is not an integer")
        qtype = EASY_VQA_TYPE_OF.get(answer.strip()) if isinstance(answer, str) else None
        if qtype is None:
            raise BadEntry("unknown_answer", f"answer {answer!r} is none of {sorted(EASY_VQA_TYPE_OF)}")
        return Entry(f"{split}-{index}", question, f"{image_id}.png", [answer], answer, question_type=qtype,
                     fields={"image_id": image_id, "split": split})

    return OfficialFile(items, parse, lambda item, i: f"{split}-{i}", {"questions": file_info(path)},
                        {"root": str(root.resolve()), "image_dir": str((root / split / "images").resolve())})
