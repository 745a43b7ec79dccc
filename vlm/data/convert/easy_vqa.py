"""easy-VQA (the `easy-vqa` package, github.com/vzhou842/easy-VQA): `{root}/{split}/questions.json` + the
`{root}/{split}/images/{image_id}.png` images (64x64); root: the installed package's data folder unless given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm.data import official
from vlm.data.convert.driver import Sample, Source, run_conversion
from vlm.data.convert.images import ImageReader
from vlm.data.convert.records import checked_text, make_key, qa_sample

EASY_VQA_INSTALL = official.EASY_VQA_INSTALL
EASY_VQA_SPLITS = official.EASY_VQA_SPLITS


def easy_vqa_source(root: str | Path | None = None, split: str = "train", *, dataset: str = "easy_vqa",
                    detail: str = "low") -> Source:
    """Target: the one answer. Keys: `easy_vqa_<split>-<index in file>`. detail "low" by default: the images are
    64x64, one global view holds all of them."""
    off = official.easy_vqa(root, split)
    reader = ImageReader(off.info["image_dir"])

    def convert(item: list, index: int) -> Sample:
        e = off.parse(item, index)
        question = checked_text(e.question, "question", "empty_question")
        answer = checked_text(e.target, "answer", "empty_answer")
        meta = {"dataset": dataset, "question_id": e.question_id, **e.fields, "answers": [answer],
                "question_type": e.question_type}
        return qa_sample(make_key(dataset, e.question_id), reader, e.image, question, answer, detail, meta)

    return Source(dataset, off.items, convert,
                  {"root": off.info["root"], "split": split, "files": off.files, "detail": detail},
                  item_id=off.item_id)


def convert_easy_vqa(out: str | Path, *, root: str | Path | None = None, split: str = "train",
                     dataset: str = "easy_vqa", detail: str = "low", **options: Any) -> dict:
    """easy-VQA (see `easy_vqa_source`); meta["question_type"]: shape / colour / yes/no, from the answer."""
    return run_conversion(easy_vqa_source(root, split, dataset=dataset, detail=detail), out, **options)
