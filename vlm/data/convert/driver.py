"""Converters from standard datasets (VQAv2 / OK-VQA, TextVQA, DocVQA, ChartQA, easy-VQA, COCO captions,
LLaVA-Instruct) into our WebDataset shards (the chat records of `vlm/data/format.py`, written by its `ShardSink`).

Each `convert_<dataset>` (one module per dataset in this package) reads the dataset's official files (the benchmarks
through `vlm.data.official`, which the evaluation readers share), builds a `Source` (the raw items in file order and
a per-item conversion) and hands it to `run_conversion`, the shared driver (this module):

* one sample per item: a user turn [image_url "0.<ext>", text question], the target answer as the assistant turn
  (none when the split has no answers, e.g. VQAv2 test-dev) and `meta` with the ids, every reference answer and
  the question / answer types the dataset has, under the dataset's own field names. Keys are `<dataset>_<id>`
  (ChartQA, which has no ids: `chartqa_<split>_<human|augmented>_<index in file>`; easy-VQA:
  `easy_vqa_<split>-<index in file>`; LLaVA, whose ids may repeat: `<dataset>_<item index>_<id>`), anything but
  [A-Za-z0-9_-] replaced by '-'.
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

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vlm.data.format import ShardSink
from vlm.data.official import BadEntry, load_json

PROGRESS_FILE = "progress.json"
SUMMARY_FILE = "summary.json"
PROGRESS_VERSION = 1
DEFAULT_SHARD_SIZE = 1000
MAX_SKIP_EXAMPLES = 5

Skip = BadEntry  # raised by an item conversion: the item is left out and counted under its `reason`


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

    state = load_json(progress_path) if progress_path.exists() else None
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
