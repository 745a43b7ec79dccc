"""DocVQA `{train,val,test}_v1.0.json`; its "image" paths ("documents/x.png") are relative to the split folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm.data import official
from vlm.data.convert.driver import Sample, Skip, Source, run_conversion
from vlm.data.convert.images import ImageReader
from vlm.data.convert.records import checked_text, dir_info, make_key, qa_sample

META_FIELDS = ("docId", "ucsf_document_id", "ucsf_document_page_no", "question_types", "data_split")


def docvqa_source(annotations: str | Path, images: str | Path | None = None, *, dataset: str = "docvqa",
                  detail: str = "auto") -> Source:
    """Image paths relative to `images`, by default the folder holding the JSON file. Target: answers[0]."""
    off = official.docvqa(annotations)
    images = Path(annotations).parent if images is None else images
    reader = ImageReader(images)

    def convert(item: dict, index: int) -> Sample:
        e = off.parse(item, index)
        question = checked_text(e.question, "question", "empty_question")
        meta = {"dataset": dataset, "questionId": e.question_id, "image": e.image}
        extra = {**e.fields, "question_types": e.question_type}
        meta |= {k: extra[k] for k in META_FIELDS if extra.get(k) is not None}
        answer = None
        if e.answers is not None:
            if not isinstance(e.target, str) or not e.target.strip():
                raise Skip("empty_answer", "answers[0] is empty")
            answer = e.target.strip()
            meta["answers"] = e.answers
        return qa_sample(make_key(dataset, e.question_id), reader, e.image, question, answer, detail, meta)

    return Source(dataset, off.items, convert,
                  {"annotations": off.files["annotations"], "images": dir_info(images), "detail": detail},
                  item_id=off.item_id)


def convert_docvqa(annotations: str | Path, out: str | Path, *, images: str | Path | None = None,
                   dataset: str = "docvqa", detail: str = "auto", **options: Any) -> dict:
    """DocVQA; target: answers[0] (none in the test split)."""
    return run_conversion(docvqa_source(annotations, images, dataset=dataset, detail=detail), out, **options)
