"""TextVQA `TextVQA_0.5.1_{split}.json` + its image folder (`{image_id}.jpg`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm.data import official
from vlm.data.convert.driver import Sample, Skip, Source, run_conversion
from vlm.data.convert.images import ImageReader
from vlm.data.convert.records import checked_text, dir_info, make_key, qa_sample


def textvqa_source(annotations: str | Path, images: str | Path | None, *, dataset: str = "textvqa",
                   detail: str = "auto") -> Source:
    """Target: the most common of the 10 answers (none in the test split)."""
    off = official.textvqa(annotations)
    reader = ImageReader(images)

    def convert(item: dict, index: int) -> Sample:
        e = off.parse(item, index)
        question = checked_text(e.question, "question", "empty_question")
        meta = {"dataset": dataset, "question_id": e.question_id, **e.fields}
        if e.answers is not None:
            if e.target is None:
                raise Skip("empty_answer", "no non-empty answer")
            meta["answers"] = e.answers
        return qa_sample(make_key(dataset, e.question_id), reader, e.image, question, e.target, detail, meta)

    return Source(dataset, off.items, convert,
                  {"annotations": off.files["annotations"], "images": dir_info(images), "detail": detail},
                  item_id=off.item_id)


def convert_textvqa(annotations: str | Path, images: str | Path | None, out: str | Path, *,
                    dataset: str = "textvqa", detail: str = "auto", **options: Any) -> dict:
    """TextVQA; target: the most common of the 10 answers (none in the test split)."""
    return run_conversion(textvqa_source(annotations, images, dataset=dataset, detail=detail), out, **options)
