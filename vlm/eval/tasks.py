"""Evaluation tasks: readers for the benchmarks' official files, and the `Task` a `configs/eval/<task>.yaml` describes.

Every reader returns a list of `Question`s in file order, with the image as a path (nothing is decoded here) and
every reference answer as a string. The files are parsed by `vlm.data.official` (the converters read them there
too); a malformed entry stops the reader, naming it. Readers check that the images exist up front, so a wrong folder
fails before a model is loaded, naming the first missing files.

    reader           images
    read_vqav2       COCO_{subtype}_{image_id:012d}.jpg (VQAv2, OK-VQA, and the synthetic corpus with
                     image_name="{image_id:012d}.jpg")
    read_textvqa     {image_id}.jpg
    read_vizwiz      {image}
    read_docvqa      the "image" paths, relative to the JSON's folder
    read_chartqa     {root}/{split}/png/{imgname}
    read_easy_vqa    {root}/{split}/images/{image_id}.png (root: the installed easy_vqa package's data folder)
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm.data import official
from vlm.eval.metrics import METRICS
from vlm.tiling import DETAILS

DEFAULT_PROMPT = "{question}\nAnswer the question using a single word or phrase."
TASK_DIR = Path(__file__).resolve().parents[2] / "configs" / "eval"
SUBMISSIONS = ("vqa",)


@dataclass
class Question:
    """One evaluation question.

    image: a path (or the encoded bytes) of the image; a list of them: a video's frames, in order. answers: every
    reference answer ([] when the split has none,
    e.g. VQAv2 test-dev: the question is predicted but not scored). question_type: a string, or a list when a
    question has several (DocVQA's question_types; it then counts under each). extra: whatever else the file says
    (image_id, ...), copied into predictions.jsonl."""

    question_id: Any
    question: str
    image: str | Path | bytes | list
    answers: list[str] = field(default_factory=list)
    question_type: str | list[str] | None = None
    answer_type: str | None = None
    extra: dict = field(default_factory=dict)


def _check_images(questions: list[Question], source: str | Path) -> list[Question]:
    missing = sorted({str(f) for q in questions for f in (q.image if isinstance(q.image, list) else [q.image])
                      if not isinstance(f, bytes) and not Path(f).is_file()})
    if missing:
        raise FileNotFoundError(f"{source}: {len(missing)} image(s) missing, e.g. {missing[:3]}")
    return questions


def _answers(entry: official.Entry) -> list[str]:
    return [str(a) for a in entry.answers or []]


def _questions(entries: list[official.Entry], image_dir: Path, extra: Callable[[official.Entry], dict]
               ) -> list[Question]:
    out = [Question(e.question_id, e.question, image_dir / e.image, _answers(e), e.question_type, e.answer_type,
                    extra(e)) for e in entries]
    return _check_images(out, image_dir)


# ------------------------------------------------------------------------------------------------------ readers


def read_vqav2(questions_json: str | Path, annotations_json: str | Path | None, image_dir: str | Path,
               subtype: str | None = None, *, image_name: str = official.COCO_IMAGE_NAME) -> list[Question]:
    """VQAv2 / OK-VQA (the same schema). subtype: the questions file's "data_subtype" unless given ("test-dev2015"
    reads test2015 images). image_name: a format string over {subtype, image_id}; the synthetic corpus uses
    "{image_id:012d}.jpg". Without annotations the questions have no answers (test / test-dev)."""
    entries = official.vqa(questions_json, annotations_json, subtype, image_name=image_name).entries()
    return _questions(entries, Path(image_dir), lambda e: {"image_id": e.fields["image_id"]})


def read_okvqa(questions_json: str | Path, annotations_json: str | Path | None, image_dir: str | Path,
               subtype: str | None = None) -> list[Question]:
    """OK-VQA: the VQAv2 schema and COCO images (`OpenEnded_mscoco_val2014_questions.json`,
    `mscoco_val2014_annotations.json`, `val2014/`)."""
    return read_vqav2(questions_json, annotations_json, image_dir, subtype)


def read_textvqa(annotations_json: str | Path, image_dir: str | Path) -> list[Question]:
    """TextVQA `TextVQA_0.5.1_{split}.json` (no answers in the test split)."""
    entries = official.textvqa(annotations_json).entries()
    return _questions(entries, Path(image_dir), lambda e: {"image_id": e.fields["image_id"]})


def read_vizwiz(annotations_json: str | Path, image_dir: str | Path) -> list[Question]:
    """VizWiz-VQA `{split}.json` (no answers in test). question_id: the image name without its extension."""
    return _questions(official.vizwiz(annotations_json).entries(), Path(image_dir), lambda e: e.fields)


def read_docvqa(annotations_json: str | Path, image_dir: str | Path | None = None) -> list[Question]:
    """DocVQA `{split}_v1.0.json` (no answers in test). The "image" paths ("documents/x.png") are relative to
    image_dir, by default the JSON file's folder; a question with several question_types counts under each."""
    image_dir = Path(annotations_json).parent if image_dir is None else Path(image_dir)
    extra = lambda e: {k: v for k, v in (("docId", e.fields.get("docId")), ("image", e.image)) if v is not None}
    return _questions(official.docvqa(annotations_json).entries(), image_dir, extra)


def read_chartqa(root: str | Path, split: str = "test", sources: Sequence[str] = official.CHARTQA_SOURCES
                 ) -> list[Question]:
    """ChartQA test / val: question_id "{source}_{index in file}", question_type the source (human / augmented),
    the two halves ChartQA reports."""
    entries = official.chartqa(root, split, sources).entries()
    return _questions(entries, Path(root) / split / "png", lambda e: {"imgname": e.image})


def read_easy_vqa(root: str | Path | None = None, split: str = "test") -> list[Question]:
    """easy-VQA test (9,673 questions) or train: root is a copy of the `easy_vqa` package's data folder, by
    default the installed package's own. question_id "{split}-{index in file}", answers the one answer,
    question_type shape / colour / yes/no (the answer's group)."""
    off = official.easy_vqa(root, split)
    return _questions(off.entries(), Path(off.info["image_dir"]), lambda e: {"image_id": e.fields["image_id"]})


def read_chat_shards(shards: str | Path | Sequence, limit: int | None = None) -> list[Question]:
    """Chats in our shard format (`vlm.data.format`) -> one Question per sample with one image or video: its first
    user question and the assistant's answer to it (the image as encoded bytes, a video as its frames' bytes). A
    demonstration pool for tasks whose training split exists only as shards (the synthetic corpus), or a test split
    (the synthetic video task): `meta`'s question_id, answers and question_type are used where the record has them.
    question_id otherwise "<shard key>"; samples that are not one image and a first answered question are skipped.
    `limit`: stop after that many."""
    from collections import Counter

    from vlm.data.format import image_refs
    from vlm.data.pipeline import check_shards, list_shards, read_tar
    from vlm.prompts import content_text

    paths = list_shards(str(shards) if isinstance(shards, Path) else shards)
    check_shards(paths)
    out, stats = [], Counter()
    for path in paths:
        for sample in read_tar(path, stats):
            if limit is not None and len(out) >= limit:
                return out
            record = json.loads(sample["json"])
            refs, messages = image_refs(record), record.get("messages", [])
            if len(refs) != 1 or len(messages) < 2 or messages[0].get("role") != "user" or \
                    messages[1].get("role") != "assistant":
                continue
            question = content_text(messages[0]["content"], image_token="").strip()
            answer = content_text(messages[1]["content"], image_token="").strip()
            if question and answer:
                ref, meta = refs[0][0], record.get("meta", {})
                media = [sample[m] for m in ref] if isinstance(ref, tuple) else sample[ref]
                out.append(Question(meta.get("question_id", sample["__key__"]), question, media,
                                    list(meta.get("answers") or [answer]), meta.get("question_type")))
    return out


READERS: dict[str, Callable[..., list[Question]]] = {
    "vqav2": read_vqav2, "okvqa": read_okvqa, "textvqa": read_textvqa, "vizwiz": read_vizwiz,
    "docvqa": read_docvqa, "chartqa": read_chartqa, "easy_vqa": read_easy_vqa, "chat_shards": read_chat_shards,
}


def get_reader(reader: str | dict | Callable) -> Callable[..., list[Question]]:
    """A reader name (`READERS`), a dotted path ("pkg.module.fn") or {"_target_": dotted path}."""
    if callable(reader):
        return reader
    if isinstance(reader, dict) or hasattr(reader, "keys"):
        reader = reader["_target_"]
    if reader in READERS:
        return READERS[reader]
    module, _, name = str(reader).rpartition(".")
    if not module:
        raise ValueError(f"unknown reader {reader!r}; choose from {sorted(READERS)} or give a dotted path")
    return getattr(importlib.import_module(module), name)


# --------------------------------------------------------------------------------------------------------- tasks


@dataclass
class Task:
    """One benchmark, as `configs/eval/<name>.yaml` describes it.

    reader: see `get_reader`. paths: the reader's path arguments, relative to data_root (absolute paths are kept;
    null stays None, e.g. no annotations for test-dev); data_root null: every path is None, the reader finds its
    files itself (easy-VQA: the installed package's). args: its other arguments. prompt: a format string over
    {question}. metric: a `vlm.eval.metrics.METRICS` name. submission: "vqa" writes the official VQA results file
    `[{"question_id", "answer"}]`. build_corpus: data_root is the synthetic corpus, built first if missing.
    demos: the training split few-shot demonstrations come from (`vlm.eval.fewshot`), {reader, paths, args} as the
    task's own fields, paths under the same data_root; None: the task has no few-shot pool. convert: datasets the
    entry points convert into shards before reading ({dataset: {out, ...}}, as a data config's `convert`; the
    synthetic video task renders its test split so)."""

    name: str
    reader: str | dict
    paths: dict[str, str | None] = field(default_factory=dict)
    data_root: str | None = "."
    args: dict = field(default_factory=dict)
    prompt: str = DEFAULT_PROMPT
    system: str | None = None
    metric: str = "vqa_accuracy"
    max_new_tokens: int = 10
    detail: str = "auto"
    submission: str | None = None
    build_corpus: bool = False
    demos: dict | None = None
    convert: dict | None = None

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"task {self.name}: unknown metric {self.metric!r}; choose from {sorted(METRICS)}")
        if self.detail not in DETAILS:
            raise ValueError(f"task {self.name}: detail must be one of {DETAILS}, got {self.detail!r}")
        if self.submission is not None and self.submission not in SUBMISSIONS:
            raise ValueError(f"task {self.name}: submission must be one of {SUBMISSIONS} or null")
        if "{question}" not in self.prompt:
            raise ValueError(f"task {self.name}: the prompt has no {{question}} field")

    @classmethod
    def from_config(cls, cfg) -> Task:
        """From a (resolved) mapping: a yaml's contents, a DictConfig or a dict."""
        if not isinstance(cfg, dict):
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(cfg, resolve=True)
        return cls(**cfg)

    def read(self, data_root: str | Path | None = None) -> list[Question]:
        """The questions, paths under `data_root` (default: the task's own; None: the reader's default files)."""
        root = self.data_root if data_root is None else data_root
        paths = {k: None if v is None or root is None else Path(root) / v for k, v in self.paths.items()}
        return get_reader(self.reader)(**paths, **self.args)

    def read_demos(self, data_root: str | Path | None = None) -> list[Question]:
        """The demonstration split's questions (`demos`), paths under `data_root` as `read`."""
        if not self.demos:
            raise ValueError(f"task {self.name} has no demonstration split for few-shot evaluation: add `demos: "
                             f"{{reader, paths, args}}` (its training split) to configs/eval/{self.name}.yaml")
        spec = dict(self.demos)
        demo_task = Task(name=f"{self.name} demos", reader=spec.get("reader", self.reader),
                         paths=spec.get("paths", {}), args=spec.get("args", {}), data_root=self.data_root)
        return demo_task.read(data_root)


def load_task(name_or_path: str | Path, **overrides) -> Task:
    """A task from `configs/eval/<name>.yaml` (or a yaml path), with field overrides. Interpolations such as the
    synthetic task's `${data.root}` need the full eval config: give `data_root=` here instead."""
    from omegaconf import OmegaConf

    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = TASK_DIR / f"{name_or_path}.yaml"
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    cfg.update(overrides)
    return Task(**cfg)
