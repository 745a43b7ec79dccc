"""ChartQA: `{root}/{split}/{split}_{human,augmented}.json` (lists of {imgname, query, label}), images in
`{root}/{split}/png/`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlm.data import official
from vlm.data.convert.driver import Sample, Source, run_conversion
from vlm.data.convert.images import ImageReader
from vlm.data.convert.records import checked_text, dir_info, make_key, qa_sample

CHARTQA_SOURCES = official.CHARTQA_SOURCES


def chartqa_source(root: str | Path, split: str, *, sources: Sequence[str] = CHARTQA_SOURCES,
                   dataset: str = "chartqa", detail: str = "auto") -> Source:
    """Items: every entry of the human file, then of the augmented file. Keys: `chartqa_<split>_<source>_<index>`
    (ChartQA has no ids)."""
    off = official.chartqa(root, split, sources)
    reader = ImageReader(Path(root) / split / "png")

    def convert(item: tuple, index: int) -> Sample:
        e = off.parse(item, index)
        question = checked_text(e.question, "query", "empty_question")
        answer = checked_text(e.target, "label", "empty_answer")
        src, j = e.fields["source"], e.fields["index"]
        meta = {"dataset": dataset, "split": split, "source": src, "imgname": e.image, "answers": [answer]}
        return qa_sample(make_key(dataset, split, src, f"{j:06d}"), reader, e.image, question, answer, detail, meta)

    return Source(dataset, off.items, convert,
                  {"root": dir_info(root), "split": split, "files": off.files, "detail": detail},
                  item_id=off.item_id)


def convert_chartqa(root: str | Path, split: str, out: str | Path, *, sources: Sequence[str] = CHARTQA_SOURCES,
                    dataset: str = "chartqa", detail: str = "auto", **options: Any) -> dict:
    """ChartQA; target: label; meta["source"] says which file ("human" / "augmented")."""
    source = chartqa_source(root, split, sources=sources, dataset=dataset, detail=detail)
    return run_conversion(source, out, **options)
