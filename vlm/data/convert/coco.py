"""COCO captions (`captions_{split}.json` + the image folder): one sample per image, its caption the answer to a
fixed prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm.data.convert.driver import Sample, Skip, Source, run_conversion
from vlm.data.convert.images import ImageReader
from vlm.data.convert.records import CAPTION_PROMPT, dir_info, make_key, qa_sample
from vlm.data.official import file_info, get_field, load_json


def coco_captions_source(captions: str | Path, images: str | Path | None, *, prompt: str = CAPTION_PROMPT,
                         dataset: str = "coco_captions", detail: str = "auto") -> Source:
    """COCO `captions_{split}.json`: one sample per image (in the file's "images" order). The assistant turn is the
    image's caption with the lowest annotation id; meta["answers"] holds all its captions in annotation-id order."""
    cdata = load_json(captions)
    if not isinstance(cdata, dict) or not isinstance(cdata.get("images"), list):
        raise ValueError(f"{captions}: not a COCO captions file (no 'images' list)")
    by_image: dict[Any, list[tuple[Any, str]]] = {}
    for ann in cdata.get("annotations", []):
        if isinstance(ann, dict) and isinstance(ann.get("caption"), str) and ann["caption"].strip():
            by_image.setdefault(ann.get("image_id"), []).append((ann.get("id"), ann["caption"].strip()))
    for caps in by_image.values():
        caps.sort(key=lambda c: (not isinstance(c[0], int), c[0] if isinstance(c[0], int) else 0))
    reader = ImageReader(images)

    def convert(img: dict, index: int) -> Sample:
        image_id, file_name = get_field(img, "id"), get_field(img, "file_name")
        caps = by_image.get(image_id)
        if not caps:
            raise Skip("no_captions", f"image_id {image_id}")
        meta = {"dataset": dataset, "image_id": image_id, "file_name": file_name,
                "answers": [c for _, c in caps], "caption_ids": [i for i, _ in caps]}
        return qa_sample(make_key(dataset, image_id), reader, file_name, prompt, caps[0][1], detail, meta)

    return Source(dataset, cdata["images"], convert,
                  {"captions": file_info(captions), "images": dir_info(images), "prompt": prompt,
                   "detail": detail},
                  item_id=lambda img, i: f"image_id {img.get('id') if isinstance(img, dict) else None}")


def convert_coco_captions(captions: str | Path, images: str | Path | None, out: str | Path, *,
                          prompt: str = CAPTION_PROMPT, dataset: str = "coco_captions", detail: str = "auto",
                          **options: Any) -> dict:
    """COCO captions, one sample per image (see `coco_captions_source`)."""
    source = coco_captions_source(captions, images, prompt=prompt, dataset=dataset, detail=detail)
    return run_conversion(source, out, **options)
