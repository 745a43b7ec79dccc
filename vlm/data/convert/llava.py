"""LLaVA-Instruct style conversations (a JSON list of {id, image, conversations}) + their images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm.data.convert.driver import Sample, Skip, Source, run_conversion
from vlm.data.convert.images import ImageReader
from vlm.data.convert.records import IMAGE_MARKER, dir_info, image_part, make_key
from vlm.data.official import file_info, get_field, load_json

_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _llava_user_content(value: str, suffixes: list[str], next_image: int, detail: str) -> tuple[list[dict], int]:
    """Split a human turn on `<image>`: text before / between / after becomes text parts (stripped, empty ones
    dropped), each marker the next image's image_url part."""
    pieces = value.split(IMAGE_MARKER)
    content: list[dict] = []
    for k, piece in enumerate(pieces):
        if k > 0:
            if next_image >= len(suffixes):
                raise Skip("image_marker_mismatch", f"more {IMAGE_MARKER} markers than images ({len(suffixes)})")
            content.append(image_part(suffixes[next_image], detail))
            next_image += 1
        if piece.strip():
            content.append({"type": "text", "text": piece.strip()})
    return content, next_image


def llava_source(annotations: str | Path, images: str | Path | None = None, *, dataset: str = "llava",
                 detail: str = "auto") -> Source:
    """LLaVA-Instruct style JSON list of {"id", "image" (optional; a path, or a list of paths), "conversations":
    [{"from": human|gpt|system, "value"}]}; image paths are relative to `images` (default: the JSON's folder).

    `<image>` markers in human turns become image_url parts at their position, in order; an image no marker
    refers to (LLaVA's own data omits it sometimes) goes first in the first user turn. Samples without "image"
    are text-only conversations."""
    items = load_json(annotations)
    if not isinstance(items, list):
        raise ValueError(f"{annotations}: not a LLaVA-style file (expected a list)")
    images = Path(annotations).parent if images is None else images
    reader = ImageReader(images)

    def convert(item: dict, index: int) -> Sample:
        turns = get_field(item, "conversations")
        if not isinstance(turns, list) or not turns:
            raise Skip("empty_conversation", "no turns")
        image = item.get("image")
        paths = [] if image is None else image if isinstance(image, list) else [image]
        files: dict[str, bytes] = {}
        suffixes = []
        for k, rel in enumerate(paths):
            ext, data = reader.read(rel)
            suffixes.append(f"{k}.{ext}")
            files[suffixes[-1]] = data
        messages, next_image = [], 0
        for turn in turns:
            role = _LLAVA_ROLES.get(get_field(turn, "from"))
            if role is None:
                raise Skip("unknown_role", f"'from': {turn['from']!r}")
            value = get_field(turn, "value")
            if not isinstance(value, str):
                raise Skip("malformed_item", f"turn value is {type(value).__name__}")
            if role == "user":
                content, next_image = _llava_user_content(value, suffixes, next_image, detail)
                if not content:
                    raise Skip("empty_turn", "empty user turn")
            else:
                if IMAGE_MARKER in value:
                    raise Skip("image_marker_mismatch", f"{IMAGE_MARKER} in a {role} turn")
                if not value.strip():
                    raise Skip("empty_turn", f"empty {role} turn")
                content = value
            messages.append({"role": role, "content": content})
        if not any(m["role"] == "assistant" for m in messages):
            raise Skip("no_assistant_turn")
        if next_image == 0 and suffixes:
            first_user = next((m for m in messages if m["role"] == "user"), None)
            if first_user is None:
                raise Skip("image_marker_mismatch", "an image but no user turn")
            first_user["content"][:0] = [image_part(s, detail) for s in suffixes]
        elif next_image != len(suffixes):
            raise Skip("image_marker_mismatch", f"{next_image} {IMAGE_MARKER} markers for {len(suffixes)} images")
        meta = {"dataset": dataset, "id": item.get("id")}
        if image is not None:
            meta["image"] = image
        return Sample(make_key(dataset, f"{index:08d}", item.get("id", "")), {"messages": messages, "meta": meta},
                      files)

    return Source(dataset, items, convert,
                  {"annotations": file_info(annotations), "images": dir_info(images), "detail": detail},
                  item_id=lambda item, i: f"#{i} id {item.get('id') if isinstance(item, dict) else None}")


def convert_llava(annotations: str | Path, out: str | Path, *, images: str | Path | None = None,
                  dataset: str = "llava", detail: str = "auto", **options: Any) -> dict:
    """LLaVA-Instruct style conversations (see `llava_source`); roles human->user, gpt->assistant."""
    return run_conversion(llava_source(annotations, images, dataset=dataset, detail=detail), out, **options)
