"""Captions of the synthetic corpus (`vlm.data.synthetic.caption`): one image + "Describe the image briefly." -> its
sentence, the same images as the corpus's split (re-rendered from the manifest's parameters: bit-identical JPEGs), for
the alignment stages of the LLaVA / MiniGPT-4 recipes. root: a corpus folder (its manifest.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm.data.convert.driver import Sample, Source, run_conversion
from vlm.data.convert.records import CAPTION_PROMPT, dir_info, image_part, make_key
from vlm.data.format import encode_image
from vlm.data.synthetic import CorpusParams, caption, read_manifest, render_sample, sample_ids


def synthetic_captions_source(root: str | Path, split: str = "train", *, detail: str | None = None) -> Source:
    """Keys: `synthetic_captions_<split>-<index>`; detail: the corpus's own unless given."""
    manifest = read_manifest(root)
    if manifest is None:
        raise FileNotFoundError(f"{root}: no synthetic corpus there (no manifest.json); build it first "
                                f"(python data/make_synthetic.py --out {root})")
    params = CorpusParams(**manifest["params"])
    detail = detail or params.detail

    def convert(index: int, _: int) -> Sample:
        image, scene, _rng = render_sample(params, split, index)
        text = caption(scene)
        image_id, _qid = sample_ids(split, index)
        record = {"messages": [
            {"role": "user", "content": [image_part("0.jpg", detail), {"type": "text", "text": CAPTION_PROMPT}]},
            {"role": "assistant", "content": text}],
            "meta": {"dataset": "synthetic_captions", "image_id": image_id, "caption": text}}
        jpeg = encode_image(image, "JPEG", quality=params.jpeg_quality)
        return Sample(make_key("synthetic_captions", f"{split}-{index:07d}"), record, {"0.jpg": jpeg})

    return Source("synthetic_captions", range(params.count(split)), convert,
                  {"root": dir_info(root), "split": split, "params": manifest["params"], "detail": detail},
                  item_id=lambda index, _: f"{split} sample {index}")


def convert_synthetic_captions(out: str | Path, *, root: str | Path, split: str = "train", detail: str | None = None,
                               **options: Any) -> dict:
    return run_conversion(synthetic_captions_source(root, split, detail=detail), out, **options)
