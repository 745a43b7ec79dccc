"""What every converter writes: sample keys, the user turn's image part, one-image question/answer records, and the
checks a text field must pass to be trained on."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vlm.data.convert.driver import Sample, Skip
from vlm.data.convert.images import ImageReader

CAPTION_PROMPT = "Describe the image briefly."
IMAGE_MARKER = "<image>"


def make_key(*parts: Any, max_part: int = 64) -> str:
    """Sample key from parts joined by '_': anything but [A-Za-z0-9_-] becomes '-' (no '.', which WebDataset
    splits members on), each part at most `max_part` characters (tar member names stay short)."""
    return "_".join(re.sub(r"[^A-Za-z0-9_-]+", "-", str(p))[:max_part] for p in parts)


def dir_info(path: str | Path | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def checked_text(value: Any, name: str, empty_reason: str) -> str:
    """A text field to train on: numbers become strings; Skip when it is absent ("missing_field"), not text
    ("malformed_item") or empty once stripped (`empty_reason`)."""
    if value is None:
        raise Skip("missing_field", f"no {name!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise Skip("malformed_item", f"{name!r} is {type(value).__name__}, not a string")
    value = value.strip()
    if not value:
        raise Skip(empty_reason, f"empty {name!r}")
    return value


def image_part(suffix: str, detail: str) -> dict:
    return {"type": "image_url", "image_url": {"url": suffix, "detail": detail}}


def qa_sample(key: str, reader: ImageReader, image_name: str, question: str, answer: str | None, detail: str,
              meta: dict) -> Sample:
    """One image + one question/answer turn: the record every VQA-style converter writes (no assistant turn when the
    split has no answers)."""
    ext, data = reader.read(image_name)
    suffix = f"0.{ext}"
    messages = [{"role": "user", "content": [image_part(suffix, detail), {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return Sample(key, {"messages": messages, "meta": meta}, {suffix: data})
