"""VQAv2 / OK-VQA: questions JSON (+ annotations JSON, optional for test splits) + a COCO image folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm.data import official
from vlm.data.convert.driver import Sample, Source, run_conversion
from vlm.data.convert.images import ImageReader
from vlm.data.convert.records import checked_text, dir_info, make_key, qa_sample


def vqa_source(questions: str | Path, images: str | Path | None, *, annotations: str | Path | None = None,
               subtype: str | None = None, dataset: str = "vqav2", detail: str = "auto") -> Source:
    """VQAv2 / OK-VQA: the image folder holds `COCO_{subtype}_{image_id:012d}.jpg`; subtype: the questions file's
    "data_subtype" unless given. Target: multiple_choice_answer."""
    off = official.vqa(questions, annotations, subtype)
    reader = ImageReader(images)

    def convert(q: dict, index: int) -> Sample:
        e = off.parse(q, index)
        question = checked_text(e.question, "question", "empty_question")
        meta = {"dataset": dataset, "question_id": e.question_id, **e.fields}
        answer = None
        if e.answers is not None:
            answer = checked_text(e.target, "multiple_choice_answer", "empty_answer")
            meta["answers"] = e.answers
            for name in ("question_type", "answer_type"):
                if getattr(e, name) is not None:
                    meta[name] = getattr(e, name)
        return qa_sample(make_key(dataset, e.question_id), reader, e.image, question, answer, detail, meta)

    return Source(dataset, off.items, convert,
                  {"questions": off.files["questions"], "annotations": off.files["annotations"],
                   "images": dir_info(images), "subtype": off.info["subtype"], "detail": detail},
                  item_id=off.item_id)


def convert_vqa(questions: str | Path, images: str | Path | None, out: str | Path, *,
                annotations: str | Path | None = None, subtype: str | None = None, dataset: str = "vqav2",
                detail: str = "auto", **options: Any) -> dict:
    """VQAv2 (dataset="vqav2") or OK-VQA (dataset="okvqa"); target: multiple_choice_answer. Without annotations
    (test / test-dev) the samples have no assistant turn. options: see `run_conversion`. Returns the summary."""
    source = vqa_source(questions, images, annotations=annotations, subtype=subtype, dataset=dataset, detail=detail)
    return run_conversion(source, out, **options)
