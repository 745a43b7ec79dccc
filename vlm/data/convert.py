"""Converters from standard datasets (VQAv2 / OK-VQA, TextVQA, DocVQA, ChartQA, COCO captions, LLaVA-Instruct)
into our WebDataset shards (the chat records of `vlm/data/format.py`, written by its `ShardSink`).

Each `convert_<dataset>` reads the dataset's official files, builds a `Source` (the raw items in file order and a
per-item conversion) and hands it to `run_conversion`, the shared driver:

* one sample per item: a user turn [image_url "0.<ext>", text question], the target answer as the assistant turn
  (none when the split has no answers, e.g. VQAv2 test-dev) and `meta` with the ids, every reference answer and
  the question / answer types the dataset has, under the dataset's own field names. Keys are `<dataset>_<id>`
  (ChartQA, which has no ids: `chartqa_<split>_<human|augmented>_<index in file>`; LLaVA, whose ids may repeat:
  `<dataset>_<item index>_<id>`), anything but [A-Za-z0-9_-] replaced by '-'.
* images: the file's own bytes are stored unchanged when they are JPEG / PNG / WEBP (extension from the file name
  when it agrees with the content, else from the content); GIF / BMP / TIFF are re-encoded to PNG (after
  `load_image`: RGB, alpha over white). Every image is validated with `vlm.images.load_image` first.
* a bad item (missing / undecodable image, missing field, empty question or answer, ...) is skipped and counted
  by reason; it never stops the conversion. The counts (and the first few offending item ids per reason) are
  printed at the end and written to `<out>/summary.json`.
* resumable: items are processed in file order and shards hold exactly `shard_size` samples (the last one
  fewer). When a shard is closed, `<out>/progress.json` records it with its item range [first_item, end_item)
  and the skip counts so far. A rerun with the same arguments deletes any shard beyond the last recorded one
  and restarts from that shard's end_item, so the final shards and summary hold the same samples and bytes as
  an uninterrupted run (up to the tar headers' mtime, which webdataset's writer sets to the wall clock).
  A rerun with different arguments is refused (pass `overwrite=True` / `--overwrite` to start over).
* `limit`: convert only the first `limit` items.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from vlm.data.format import ShardSink, encode_image
from vlm.images import DEFAULT_MAX_PIXELS, ImageError, load_image, to_rgb

PROGRESS_FILE = "progress.json"
SUMMARY_FILE = "summary.json"
PROGRESS_VERSION = 1
DEFAULT_SHARD_SIZE = 1000
CAPTION_PROMPT = "Describe the image briefly."
IMAGE_MARKER = "<image>"
MAX_SKIP_EXAMPLES = 5

# Formats whose bytes are kept as they are (first extension = the default one), and formats re-encoded to PNG.
_KEEP = {"JPEG": ("jpg", "jpeg"), "MPO": ("jpg", "jpeg"), "PNG": ("png",), "WEBP": ("webp",)}
_REENCODE = ("GIF", "BMP", "TIFF")
_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class Skip(Exception):
    """Raised by an item conversion: the item is left out and counted under `reason`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class InjectedFailure(RuntimeError):
    """Raised by `run_conversion(fail_after=N)`: a simulated interruption, for testing resumability."""


@dataclass
class Sample:
    key: str
    record: dict
    images: dict[str, bytes]


@dataclass
class Source:
    """What `run_conversion` needs from a dataset.

    name: dataset name (meta["dataset"], default shard prefix). items: the raw items, in a fixed order.
    convert(item, index) -> Sample, or raises Skip. item_id(item, index) names an item in skip reports.
    config: JSON-able description of the inputs and options; a resumed run must have the same one."""

    name: str
    items: Sequence[Any]
    convert: Callable[[Any, int], Sample]
    config: dict
    item_id: Callable[[Any, int], str] = field(default=lambda item, index: f"item {index}")


# --------------------------------------------------------------------------------------------------- helpers


def _load_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _file_info(path: str | Path | None) -> dict | None:
    if path is None:
        return None
    p = Path(path).resolve()
    return {"path": str(p), "size": p.stat().st_size if p.is_file() else None}


def _dir_info(path: str | Path | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def make_key(*parts: Any, max_part: int = 64) -> str:
    """Sample key from parts joined by '_': anything but [A-Za-z0-9_-] becomes '-' (no '.', which WebDataset
    splits members on), each part at most `max_part` characters (tar member names stay short)."""
    return "_".join(re.sub(r"[^A-Za-z0-9_-]+", "-", str(p))[:max_part] for p in parts)


def _field(item: Any, name: str) -> Any:
    if not isinstance(item, dict):
        raise Skip("malformed_item", f"expected an object, got {type(item).__name__}")
    if item.get(name) is None:
        raise Skip("missing_field", f"no {name!r}")
    return item[name]


def _text(item: dict, name: str, empty_reason: str) -> str:
    value = _field(item, name)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise Skip("malformed_item", f"{name!r} is {type(value).__name__}, not a string")
    value = value.strip()
    if not value:
        raise Skip(empty_reason, f"empty {name!r}")
    return value


def _image_part(suffix: str, detail: str) -> dict:
    return {"type": "image_url", "image_url": {"url": suffix, "detail": detail}}


def _qa_sample(key: str, reader, image_name: str, question: str, answer: str | None, detail: str, meta: dict) -> Sample:
    """One image + one question/answer turn: the record every VQA-style converter writes."""
    ext, data = reader.read(image_name)
    suffix = f"0.{ext}"
    return Sample(key, {"messages": _qa_messages(suffix, question, answer, detail), "meta": meta}, {suffix: data})


def _qa_messages(suffix: str, question: str, answer: str | None, detail: str) -> list[dict]:
    messages = [{"role": "user", "content": [_image_part(suffix, detail), {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def _decode_other(data: bytes) -> Image.Image:
    """BMP / TIFF (formats `load_image` does not take) -> RGB, with the same pixel limit."""
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > DEFAULT_MAX_PIXELS:
            raise ImageError(f"image too large: {w}x{h} = {w * h} pixels, limit {DEFAULT_MAX_PIXELS}")
        if getattr(img, "n_frames", 1) > 1:
            raise ImageError(f"unsupported image: multi-frame {img.format}")
        img.load()
        rgb = np.array(to_rgb(img), dtype=np.uint8)
    except ImageError:
        raise
    except MemoryError:
        raise
    except Exception as e:
        raise ImageError(f"could not decode image: {type(e).__name__}: {e}") from e
    return load_image(Image.fromarray(rgb))


def prepare_image(data: bytes, name: str = "") -> tuple[str, bytes]:
    """Validate image file bytes with `load_image`; return (extension, bytes to store).

    JPEG / PNG / WEBP keep their bytes (extension from `name` when it matches the content, else the content's);
    GIF / BMP / TIFF are re-encoded to PNG. Raises ImageError for anything else or anything undecodable."""
    try:
        with Image.open(io.BytesIO(data)) as probe:  # header only
            fmt = probe.format
    except Exception:
        fmt = None
    if fmt in _KEEP:
        load_image(data)
        ext = Path(name).suffix.lower().lstrip(".")
        return (ext if ext in _KEEP[fmt] else _KEEP[fmt][0]), data
    if fmt in _REENCODE:
        img = load_image(data) if fmt == "GIF" else _decode_other(data)
        return "png", encode_image(img, "PNG")
    load_image(data)  # raises ImageError naming the problem
    raise ImageError(f"unsupported image format {fmt!r}")  # pragma: no cover (load_image refuses first)


def _image_reason(e: ImageError) -> str:
    msg = str(e)
    if msg.startswith("image too large"):
        return "image_too_large"
    if msg.startswith("unsupported"):
        return "unsupported_image"
    return "undecodable_image"


class ImageReader:
    """Reads and validates images under `root` (paths relative to it), caching the last few results: VQA-style
    datasets ask several questions about the same image in a row."""

    def __init__(self, root: str | Path | None, cache_size: int = 16):
        self.root = None if root is None else Path(root)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[str, bytes] | Skip] = OrderedDict()

    def read(self, rel: str) -> tuple[str, bytes]:
        """(extension, bytes) of image `rel`, or raises Skip (missing_image, undecodable_image, ...)."""
        if rel in self._cache:
            self._cache.move_to_end(rel)
            result = self._cache[rel]
        else:
            try:
                result = self._read(rel)
            except Skip as s:
                result = s
            self._cache[rel] = result
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        if isinstance(result, Skip):
            raise Skip(result.reason, result.detail)  # a fresh exception: re-raising one grows its traceback
        return result

    def _read(self, rel: str) -> tuple[str, bytes]:
        if not isinstance(rel, str) or not rel:
            raise Skip("malformed_item", f"image path {rel!r}")
        if self.root is None:
            raise Skip("missing_image", f"{rel}: no image folder given")
        p = Path(rel)
        if p.is_absolute() or ".." in p.parts:
            raise Skip("bad_image_path", f"{rel}: must be relative to the image folder, without '..'")
        path = self.root / p
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise Skip("missing_image", str(path)) from None
        except OSError as e:
            raise Skip("unreadable_image", f"{path}: {e}") from None
        try:
            return prepare_image(data, path.name)
        except ImageError as e:
            raise Skip(_image_reason(e), f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------------- driver


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _shard_files(out: Path, prefix: str) -> dict[int, Path]:
    files = {}
    for p in out.glob(f"{prefix}-*.tar"):
        m = re.fullmatch(re.escape(prefix) + r"-(\d+)\.tar", p.name)
        if m:
            files[int(m.group(1))] = p
    return files


def _summary(state: dict, source: Source, n_items: int) -> dict:
    skipped = dict(sorted(state["skipped"].items()))
    return {
        "dataset": source.name,
        "items": n_items,
        "source_items": len(source.items),
        "written": state["written"],
        "skipped_total": sum(skipped.values()),
        "skipped": skipped,
        "skip_examples": dict(sorted(state["skip_examples"].items())),
        "shards": [s["file"] for s in state["shards"]],
    }


def _print_summary(summary: dict, out: Path) -> None:
    print(f"{summary['dataset']}: wrote {summary['written']} samples in {len(summary['shards'])} shards to "
          f"{out} ({summary['items']} items, {summary['skipped_total']} skipped)")
    for reason, n in summary["skipped"].items():
        example = summary["skip_examples"].get(reason, [""])[0]
        print(f"  skipped {n:>8}  {reason:<20} e.g. {example}")


def run_conversion(source: Source, out: str | Path, *, shard_size: int = DEFAULT_SHARD_SIZE,
                   limit: int | None = None, prefix: str | None = None, overwrite: bool = False,
                   progress: bool = True, fail_after: int | None = None) -> dict:
    """Convert `source` into `<out>/<prefix>-NNNNNN.tar` shards of `shard_size` samples; returns the summary
    (also written to `<out>/summary.json`). Resumes an interrupted run with the same arguments (see module doc).

    limit: only the first `limit` items. prefix: shard name prefix (default: the dataset name). overwrite: delete
    this output's earlier shards / progress and start over. progress: show a tqdm bar. fail_after: test hook,
    raise InjectedFailure after that many items of this call (simulates an interruption)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prefix = prefix or source.name
    if "/" in prefix or "%" in prefix:
        raise ValueError(f"shard prefix {prefix!r} must not contain '/' or '%'")
    n_items = len(source.items) if limit is None else min(limit, len(source.items))
    fingerprint = json.loads(json.dumps({
        "version": PROGRESS_VERSION, "dataset": source.name, "config": source.config,
        "shard_size": shard_size, "limit": limit, "prefix": prefix}))
    progress_path, summary_path = out / PROGRESS_FILE, out / SUMMARY_FILE

    state = _load_json(progress_path) if progress_path.exists() else None
    if overwrite:
        old_prefixes = {prefix} | ({state["fingerprint"]["prefix"]} if state else set())
        for old in old_prefixes:
            for p in _shard_files(out, old).values():
                p.unlink()
        for p in (progress_path, summary_path):
            p.unlink(missing_ok=True)
        state = None
    elif state is not None and state.get("fingerprint") != fingerprint:
        raise ValueError(f"{out} holds a conversion with other arguments ({progress_path}); "
                         f"use another output folder or overwrite=True (--overwrite)")
    elif state is None and _shard_files(out, prefix):
        raise ValueError(f"{out} already has {prefix}-*.tar shards but no {PROGRESS_FILE}; "
                         f"use another output folder or overwrite=True (--overwrite)")
    if state is None:
        state = {"fingerprint": fingerprint, "shards": [], "next_item": 0, "written": 0, "skipped": {},
                 "skip_examples": {}, "done": False}
        _write_json(progress_path, state)

    # Anything beyond the last completed shard is from an interrupted run: drop it and redo its items.
    for index, p in _shard_files(out, prefix).items():
        if index >= len(state["shards"]):
            p.unlink()

    if not state["done"]:
        _convert_items(source, out, state, progress_path, prefix, shard_size, n_items, progress, fail_after)

    summary = _summary(state, source, n_items)
    _write_json(summary_path, summary)
    _print_summary(summary, out)
    return summary


def _convert_items(source: Source, out: Path, state: dict, progress_path: Path, prefix: str, shard_size: int,
                   n_items: int, progress: bool, fail_after: int | None) -> None:
    start = state["next_item"]
    skipped = Counter(state["skipped"])
    examples = {k: list(v) for k, v in state["skip_examples"].items()}
    written = state["written"]
    sink, count, first_item = None, 0, start

    def close_shard(end_item: int) -> None:
        nonlocal sink, count, first_item
        sink.close()
        index = len(state["shards"])
        state["shards"].append({"file": f"{prefix}-{index:06d}.tar", "first_item": first_item,
                                "end_item": end_item, "count": count})
        state.update(next_item=end_item, written=written, skipped=dict(skipped), skip_examples=examples)
        _write_json(progress_path, state)
        sink, count, first_item = None, 0, end_item

    bar = tqdm(total=n_items, initial=start, desc=source.name, unit="item", disable=not progress,
               dynamic_ncols=True, mininterval=0.5)
    try:
        for i in range(start, n_items):
            if fail_after is not None and i - start >= fail_after:
                raise InjectedFailure(f"injected failure after {fail_after} items (at item {i})")
            item = source.items[i]
            try:
                sample = source.convert(item, i)
            except Skip as s:
                sample = None
                reason, detail = s.reason, s.detail
            except Exception as e:  # a malformed item must not stop the conversion
                sample = None
                reason, detail = "malformed_item", f"{type(e).__name__}: {e}"
            if sample is None:
                skipped[reason] += 1
                ex = examples.setdefault(reason, [])
                if len(ex) < MAX_SKIP_EXAMPLES:
                    ex.append(f"{source.item_id(item, i)}: {detail}" if detail else source.item_id(item, i))
            else:
                if sink is None:
                    sink = ShardSink(out, prefix=prefix, max_count=shard_size, start_shard=len(state["shards"]))
                sink.write(sample.key, sample.record, sample.images)
                count += 1
                written += 1
                if count == shard_size:
                    close_shard(i + 1)
            bar.update(1)
            if (i + 1) % 1000 == 0:
                bar.set_postfix(written=written, skipped=sum(skipped.values()), refresh=False)
        if sink is not None:
            close_shard(n_items)
        state.update(next_item=n_items, written=written, skipped=dict(skipped), skip_examples=examples, done=True)
        _write_json(progress_path, state)
    finally:
        if sink is not None:  # interrupted: the open shard is not recorded and is deleted on the next run
            sink.close()
        bar.close()


# ------------------------------------------------------------------------------------------------- datasets


def _vqa_image_subtype(subtype: str) -> str:
    # VQAv2's test-dev questions ("data_subtype": "test-dev2015") are about test2015 images.
    return re.sub(r"^test-dev", "test", subtype)


def vqa_source(questions: str | Path, images: str | Path | None, *, annotations: str | Path | None = None,
               subtype: str | None = None, dataset: str = "vqav2", detail: str = "auto") -> Source:
    """VQAv2 / OK-VQA: questions JSON (+ annotations JSON, optional for test splits) + a COCO image folder
    holding `COCO_{subtype}_{image_id:012d}.jpg`. subtype: the questions file's "data_subtype" unless given."""
    qdata = _load_json(questions)
    if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
        raise ValueError(f"{questions}: not a VQA questions file (no 'questions' list)")
    subtype = subtype or qdata.get("data_subtype")
    if not subtype:
        raise ValueError(f"{questions} has no 'data_subtype': give the image subtype (e.g. val2014)")
    image_subtype = _vqa_image_subtype(subtype)
    by_qid = None
    if annotations is not None:
        adata = _load_json(annotations)
        if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
            raise ValueError(f"{annotations}: not a VQA annotations file (no 'annotations' list)")
        by_qid = {a.get("question_id"): a for a in adata["annotations"] if isinstance(a, dict)}
    reader = ImageReader(images)

    def convert(q: dict, index: int) -> Sample:
        qid, image_id = _field(q, "question_id"), _field(q, "image_id")
        question = _text(q, "question", "empty_question")
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise Skip("malformed_item", f"image_id {image_id!r} is not an integer")
        meta = {"dataset": dataset, "question_id": qid, "image_id": image_id, "split": subtype}
        answer = None
        if by_qid is not None:
            ann = by_qid.get(qid)
            if ann is None:
                raise Skip("missing_annotation", f"question_id {qid}")
            answer = _text(ann, "multiple_choice_answer", "empty_answer")
            answers = _field(ann, "answers")
            meta["answers"] = [a["answer"] if isinstance(a, dict) else a for a in answers]
            for name in ("question_type", "answer_type"):
                if ann.get(name) is not None:
                    meta[name] = ann[name]
        image_name = f"COCO_{image_subtype}_{image_id:012d}.jpg"
        return _qa_sample(make_key(dataset, qid), reader, image_name, question, answer, detail, meta)

    return Source(dataset, qdata["questions"], convert,
                  {"questions": _file_info(questions), "annotations": _file_info(annotations),
                   "images": _dir_info(images), "subtype": subtype, "detail": detail},
                  item_id=lambda q, i: f"question_id {q.get('question_id') if isinstance(q, dict) else None}")


def convert_vqa(questions: str | Path, images: str | Path | None, out: str | Path, *,
                annotations: str | Path | None = None, subtype: str | None = None, dataset: str = "vqav2",
                detail: str = "auto", **options: Any) -> dict:
    """VQAv2 (dataset="vqav2") or OK-VQA (dataset="okvqa"); target: multiple_choice_answer. Without annotations
    (test / test-dev) the samples have no assistant turn. options: see `run_conversion`. Returns the summary."""
    source = vqa_source(questions, images, annotations=annotations, subtype=subtype, dataset=dataset, detail=detail)
    return run_conversion(source, out, **options)


def most_common_answer(answers: Sequence[str]) -> str | None:
    """The most frequent non-empty answer (stripped); ties go to the one that appears first."""
    counts = Counter(a.strip() for a in answers if isinstance(a, str) and a.strip())
    return counts.most_common(1)[0][0] if counts else None


def textvqa_source(annotations: str | Path, images: str | Path | None, *, dataset: str = "textvqa",
                   detail: str = "auto") -> Source:
    """TextVQA `TextVQA_0.5.1_{split}.json` + its image folder (`{image_id}.jpg`)."""
    tdata = _load_json(annotations)
    if not isinstance(tdata, dict) or not isinstance(tdata.get("data"), list):
        raise ValueError(f"{annotations}: not a TextVQA file (no 'data' list)")
    reader = ImageReader(images)

    def convert(item: dict, index: int) -> Sample:
        qid, image_id = _field(item, "question_id"), _field(item, "image_id")
        question = _text(item, "question", "empty_question")
        meta = {"dataset": dataset, "question_id": qid, "image_id": image_id}
        if item.get("set_name") is not None:
            meta["split"] = item["set_name"]
        answer = None
        if item.get("answers") is not None:
            answers = item["answers"]
            if not isinstance(answers, list):
                raise Skip("malformed_item", "'answers' is not a list")
            answer = most_common_answer(answers)
            if answer is None:
                raise Skip("empty_answer", "no non-empty answer")
            meta["answers"] = answers
        return _qa_sample(make_key(dataset, qid), reader, f"{image_id}.jpg", question, answer, detail, meta)

    return Source(dataset, tdata["data"], convert,
                  {"annotations": _file_info(annotations), "images": _dir_info(images), "detail": detail},
                  item_id=lambda q, i: f"question_id {q.get('question_id') if isinstance(q, dict) else None}")


def convert_textvqa(annotations: str | Path, images: str | Path | None, out: str | Path, *,
                    dataset: str = "textvqa", detail: str = "auto", **options: Any) -> dict:
    """TextVQA; target: the most common of the 10 answers (none in the test split)."""
    return run_conversion(textvqa_source(annotations, images, dataset=dataset, detail=detail), out, **options)


def docvqa_source(annotations: str | Path, images: str | Path | None = None, *, dataset: str = "docvqa",
                  detail: str = "auto") -> Source:
    """DocVQA `{train,val,test}_v1.0.json`; its "image" paths ("documents/x.png") are relative to `images`,
    by default the folder holding the JSON file (the split folder)."""
    ddata = _load_json(annotations)
    if not isinstance(ddata, dict) or not isinstance(ddata.get("data"), list):
        raise ValueError(f"{annotations}: not a DocVQA file (no 'data' list)")
    images = Path(annotations).parent if images is None else images
    reader = ImageReader(images)

    def convert(item: dict, index: int) -> Sample:
        qid, image = _field(item, "questionId"), _field(item, "image")
        question = _text(item, "question", "empty_question")
        meta = {"dataset": dataset, "questionId": qid, "image": image}
        for name in ("docId", "ucsf_document_id", "ucsf_document_page_no", "question_types", "data_split"):
            if item.get(name) is not None:
                meta[name] = item[name]
        answer = None
        if item.get("answers") is not None:
            answers = item["answers"]
            if not isinstance(answers, list):
                raise Skip("malformed_item", "'answers' is not a list")
            if not answers or not isinstance(answers[0], str) or not answers[0].strip():
                raise Skip("empty_answer", "answers[0] is empty")
            answer = answers[0].strip()
            meta["answers"] = answers
        return _qa_sample(make_key(dataset, qid), reader, image, question, answer, detail, meta)

    return Source(dataset, ddata["data"], convert,
                  {"annotations": _file_info(annotations), "images": _dir_info(images), "detail": detail},
                  item_id=lambda q, i: f"questionId {q.get('questionId') if isinstance(q, dict) else None}")


def convert_docvqa(annotations: str | Path, out: str | Path, *, images: str | Path | None = None,
                   dataset: str = "docvqa", detail: str = "auto", **options: Any) -> dict:
    """DocVQA; target: answers[0] (none in the test split)."""
    return run_conversion(docvqa_source(annotations, images, dataset=dataset, detail=detail), out, **options)


CHARTQA_SOURCES = ("human", "augmented")


def chartqa_source(root: str | Path, split: str, *, sources: Sequence[str] = CHARTQA_SOURCES,
                   dataset: str = "chartqa", detail: str = "auto") -> Source:
    """ChartQA: `{root}/{split}/{split}_{human,augmented}.json` (lists of {imgname, query, label}), images in
    `{root}/{split}/png/`. Items: every entry of the human file, then of the augmented file."""
    split_dir = Path(root) / split
    items, files = [], {}
    for src in sources:
        if src not in CHARTQA_SOURCES:
            raise ValueError(f"ChartQA source {src!r} is not one of {CHARTQA_SOURCES}")
        path = split_dir / f"{split}_{src}.json"
        entries = _load_json(path)
        if not isinstance(entries, list):
            raise ValueError(f"{path}: not a ChartQA file (expected a list)")
        items += [(src, j, entry) for j, entry in enumerate(entries)]
        files[src] = _file_info(path)
    reader = ImageReader(split_dir / "png")

    def convert(item: tuple, index: int) -> Sample:
        src, j, entry = item
        imgname = _field(entry, "imgname")
        question = _text(entry, "query", "empty_question")
        answer = _text(entry, "label", "empty_answer")
        meta = {"dataset": dataset, "split": split, "source": src, "imgname": imgname, "answers": [answer]}
        return _qa_sample(make_key(dataset, split, src, f"{j:06d}"), reader, imgname, question, answer, detail, meta)

    return Source(dataset, items, convert,
                  {"root": _dir_info(root), "split": split, "files": files, "detail": detail},
                  item_id=lambda item, i: f"{item[0]} #{item[1]}")


def convert_chartqa(root: str | Path, split: str, out: str | Path, *, sources: Sequence[str] = CHARTQA_SOURCES,
                    dataset: str = "chartqa", detail: str = "auto", **options: Any) -> dict:
    """ChartQA; target: label; meta["source"] says which file ("human" / "augmented")."""
    source = chartqa_source(root, split, sources=sources, dataset=dataset, detail=detail)
    return run_conversion(source, out, **options)


def coco_captions_source(captions: str | Path, images: str | Path | None, *, prompt: str = CAPTION_PROMPT,
                         dataset: str = "coco_captions", detail: str = "auto") -> Source:
    """COCO `captions_{split}.json`: one sample per image (in the file's "images" order). The assistant turn is the
    image's caption with the lowest annotation id; meta["answers"] holds all its captions in annotation-id order."""
    cdata = _load_json(captions)
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
        image_id, file_name = _field(img, "id"), _field(img, "file_name")
        caps = by_image.get(image_id)
        if not caps:
            raise Skip("no_captions", f"image_id {image_id}")
        meta = {"dataset": dataset, "image_id": image_id, "file_name": file_name,
                "answers": [c for _, c in caps], "caption_ids": [i for i, _ in caps]}
        return _qa_sample(make_key(dataset, image_id), reader, file_name, prompt, caps[0][1], detail, meta)

    return Source(dataset, cdata["images"], convert,
                  {"captions": _file_info(captions), "images": _dir_info(images), "prompt": prompt,
                   "detail": detail},
                  item_id=lambda img, i: f"image_id {img.get('id') if isinstance(img, dict) else None}")


def convert_coco_captions(captions: str | Path, images: str | Path | None, out: str | Path, *,
                          prompt: str = CAPTION_PROMPT, dataset: str = "coco_captions", detail: str = "auto",
                          **options: Any) -> dict:
    """COCO captions, one sample per image (see `coco_captions_source`)."""
    source = coco_captions_source(captions, images, prompt=prompt, dataset=dataset, detail=detail)
    return run_conversion(source, out, **options)


def _llava_user_content(value: str, suffixes: list[str], next_image: int, detail: str) -> tuple[list[dict], int]:
    """Split a human turn on `<image>`: text before / between / after becomes text parts (stripped, empty ones
    dropped), each marker the next image's image_url part."""
    pieces = value.split(IMAGE_MARKER)
    content: list[dict] = []
    for k, piece in enumerate(pieces):
        if k > 0:
            if next_image >= len(suffixes):
                raise Skip("image_marker_mismatch", f"more {IMAGE_MARKER} markers than images ({len(suffixes)})")
            content.append(_image_part(suffixes[next_image], detail))
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
    items = _load_json(annotations)
    if not isinstance(items, list):
        raise ValueError(f"{annotations}: not a LLaVA-style file (expected a list)")
    images = Path(annotations).parent if images is None else images
    reader = ImageReader(images)

    def convert(item: dict, index: int) -> Sample:
        turns = _field(item, "conversations")
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
            role = _LLAVA_ROLES.get(_field(turn, "from"))
            if role is None:
                raise Skip("unknown_role", f"'from': {turn['from']!r}")
            value = _field(turn, "value")
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
            first_user["content"][:0] = [_image_part(s, detail) for s in suffixes]
        elif next_image != len(suffixes):
            raise Skip("image_marker_mismatch", f"{next_image} {IMAGE_MARKER} markers for {len(suffixes)} images")
        meta = {"dataset": dataset, "id": item.get("id")}
        if image is not None:
            meta["image"] = image
        return Sample(make_key(dataset, f"{index:08d}", item.get("id", "")), {"messages": messages, "meta": meta},
                      files)

    return Source(dataset, items, convert,
                  {"annotations": _file_info(annotations), "images": _dir_info(images), "detail": detail},
                  item_id=lambda item, i: f"#{i} id {item.get('id') if isinstance(item, dict) else None}")


def convert_llava(annotations: str | Path, out: str | Path, *, images: str | Path | None = None,
                  dataset: str = "llava", detail: str = "auto", **options: Any) -> dict:
    """LLaVA-Instruct style conversations (see `llava_source`); roles human->user, gpt->assistant."""
    return run_conversion(llava_source(annotations, images, dataset=dataset, detail=detail), out, **options)
