"""Streaming training data: WebDataset tar shards -> decoded, tiled, tokenised samples -> batches.

Read path, all inside DataLoader workers (never in the model):
    shards --(shuffled per epoch, split by node and worker)--> raw samples (bytes)
           --(deterministic shuffle buffer)--> skip what a restored position already consumed
           --(decode + tile + tokenise; bad samples skipped and counted)--> samples --> collate

Differences from `webdataset.WebDataset`, and why: we use webdataset's tar iterators for reading but do the
splitting, shuffling and resampling ourselves, so that the stream is a pure function of (seed, split,
position): the position of every worker can be saved and restored exactly (the state of webdataset's
shuffle/resample stages cannot be), and a skipped sample is counted by reason instead of being dropped by a
handler.

Exact resume: every sample carries (virtual worker, index in that worker's stream). `StreamPosition`, updated
from consumed batches in the main process, records how many samples each virtual worker delivered and how many
batches were consumed; a restored dataset skips those raw samples (without decoding them) and rotates the
worker roles so that the DataLoader's round-robin continues with the right worker.

Two ways to split the data between ranks and workers (`split`):
- "shard" (default, for real training): each rank and worker reads its own shards, so every shard is read once.
  The batches then depend on the number of ranks and workers (and a corpus with fewer shards than
  ranks x workers leaves some of them without data).
- "sample": every rank and worker reads the same single stream and decodes only its own samples. The stream is
  cut into global batches of world_size x batch_size samples, dealt to the workers in turn (in the DataLoader's
  round-robin order); rank r takes samples r, r + world_size, ... of each. So global batch k (the union of the
  ranks' k-th batches) is samples [k G, (k+1) G) of the one-process stream, G = world_size x batch_size, whatever
  the number of ranks: DDP reproduces a one-process run with the same global batch (exactly while no sample is
  skipped as bad). The cost: every worker of every rank reads every shard (I/O x ranks x workers).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import itertools
import json
import logging
import random
import tarfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlm.data.format import VideoFile, image_refs, members
from vlm.images import UNSUPPORTED, ImageError, Video, load_image, load_video
from vlm.parallel import rank_world
from vlm.processor import Processor, collate
from vlm.prompts import chat_pieces, document_pieces
from vlm.tiling import draft_size, plan_tiles

log = logging.getLogger(__name__)


def is_url(source: str) -> bool:
    """A shard that webdataset's `gopen` opens by scheme (pipe:, http(s)://, file://, ...), not a local path."""
    return source.startswith("pipe:") or "://" in source


def list_shards(source: str | Path | list) -> list[str]:
    """A directory (all *.tar inside), a glob, a brace pattern ("a-{000..009}.tar") -> sorted paths; a URL
    (`pipe:cmd`, http(s)://...: opened by webdataset's gopen) -> itself, brace-expanded; a list of those -> each
    expanded, in the list's order."""
    if isinstance(source, Sequence) and not isinstance(source, str):  # a list, tuple or Hydra's ListConfig
        return [shard for s in source for shard in list_shards(s)]
    source = str(source)
    path = Path(source)
    if "{" in source:
        import braceexpand

        shards = list(braceexpand.braceexpand(source))
    elif is_url(source):
        shards = [source]
    elif path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
    else:
        shards = sorted(glob.glob(source)) if any(c in source for c in "*?[") else [source]  # absolute ones too
    if not shards:
        raise FileNotFoundError(f"no shards found at {source}")
    return shards


def check_shards(shards: list[str]) -> None:
    """Fail before training on sources that cannot be read: every local shard must exist, and the first URL of the
    list must open (through gopen, as the workers will open it) onto a tar stream. Only the first: checking every
    remote shard would cost a request each; a later one that fails is counted as `bad_shard` while training."""
    missing = [s for s in shards if not is_url(s) and not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(shards)} training shards do not exist: "
                                f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    url = next((s for s in shards if is_url(s)), None)
    if url is None:
        return
    from webdataset.gopen import gopen

    try:
        stream = gopen(url, "rb")
        try:
            head = stream.read(512)
        finally:
            with contextlib.suppress(Exception):  # a pipe cut after its first block may exit with SIGPIPE
                stream.close()
    except Exception as e:  # noqa: BLE001 - whatever the scheme's opener raises, said with the URL
        raise FileNotFoundError(f"cannot read the training shard {url}: {e}") from e
    if not head:  # a failed command or request, if its exit status was not seen yet
        raise FileNotFoundError(f"cannot read the training shard {url}: it gave no bytes")
    if not (head[257:262] == b"ustar" or head[:2] == b"\x1f\x8b"):  # a tar header, or gzip around one
        raise ValueError(f"the training shard {url} is not a tar file ({len(head)} bytes read: {head[:40]!r})")


def read_tar(path: str, stats: Counter) -> Iterator[dict]:
    """One shard's samples, grouped by key with webdataset's own tar iterators: {"__key__", suffix: bytes}. `path`: a
    local file or any URL webdataset's gopen opens (pipe:, http(s)://). A truncated or unreadable shard is counted
    and ends that shard, never the run."""
    from webdataset.gopen import gopen
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    try:
        stream = gopen(path, "rb")
        try:
            members = ({**m, "__url__": path} for m in tar_file_iterator(stream))
            for sample in group_by_keys(members):
                sample["__key__"] = sample["__key__"].rsplit("/", 1)[-1]
                yield sample
        finally:
            stream.close()  # a pipe's close waits for its command and raises on a failed exit status
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        stats["bad_shard"] += 1
        log.warning("shard %s is truncated or unreadable (%s); continuing with the next shard", path, e)


@dataclass
class StreamPosition:
    """Where a training stream stands: samples delivered per virtual worker and batches consumed."""

    consumed: dict[int, int] = field(default_factory=dict)
    batches: int = 0
    sources: dict[str, int] = field(default_factory=dict)  # a mixture's samples consumed per source (logged)

    def update(self, batch: dict) -> None:
        for worker, index in batch["stream_index"].tolist():
            self.consumed[worker] = max(self.consumed.get(worker, 0), index + 1)
        for name in batch.get("sources", ()):
            self.sources[name] = self.sources.get(name, 0) + 1
        self.batches += 1

    def state_dict(self) -> dict:
        return {"consumed": {str(k): v for k, v in self.consumed.items()}, "batches": self.batches,
                "sources": dict(self.sources)}

    @classmethod
    def from_state(cls, state: dict | None) -> StreamPosition:
        if not state:
            return cls()
        return cls({int(k): v for k, v in state["consumed"].items()}, state["batches"], dict(state.get("sources", {})))


@dataclass(frozen=True)
class Source:
    """One source of a weighted mixture (`data.sources`): its shards (any spelling list_shards takes) and its
    share of the samples."""

    name: str
    shards: tuple[str, ...]
    weight: float = 1.0

    @classmethod
    def from_config(cls, entry: Mapping) -> Source:
        unknown = set(entry) - {"name", "train", "weight"}
        if unknown or "name" not in entry or "train" not in entry:
            raise ValueError(f"a mixture source needs name, train (and weight); got keys {sorted(entry)}")
        weight = float(entry.get("weight", 1.0))
        if not weight > 0:
            raise ValueError(f"mixture source {entry['name']!r}: weight must be > 0, got {weight}")
        return cls(str(entry["name"]), tuple(list_shards(entry["train"])), weight)


def mixture(entries: Sequence[Mapping]) -> list[Source]:
    """`data.sources` -> Sources, checked: at least one, unique names, weights > 0, every source's shards found."""
    sources = [Source.from_config(e) for e in entries]
    names = [s.name for s in sources]
    if not sources or len(set(names)) != len(names):
        raise ValueError(f"data.sources needs one or more sources with distinct names, got {names}")
    return sources


class ShardStream(torch.utils.data.IterableDataset):
    """Decoded training samples from WebDataset shards; see the module docstring.

    shards: any spelling list_shards takes, or a list of `Source`s: a weighted mixture. Each source is its own stream
    (its own shard order, shuffle buffer and split between readers); every sample of the mixed stream is drawn from
    source i with probability weight_i / sum(weights) by a seeded RNG, so the mixed stream is as much a pure function
    of (seed, split) as one source's, and exact resume works unchanged (the index counts mixed samples). A finite
    source that runs out leaves the others to go on.
    epochs: number of passes (None = endless, the usual choice with `max_steps`); resampled: draw shards with
    replacement instead of shuffled passes; strict: raise on the first bad sample instead of skipping it.
    split: "shard" or "sample" (module docstring); batch_size: the per-rank batch, which "sample" needs with
    several workers. rank / world_size default to torch.distributed's (or the RANK / WORLD_SIZE environment
    variables), read when iterating: DDP starts after the loader is built."""

    def __init__(self, shards, processor: Processor, *, seed: int = 0, epochs: int | None = None,
                 shuffle_shards: bool = True, shuffle_buffer: int = 256, resampled: bool = False,
                 max_length: int | None = None, strict: bool = False, rank: int | None = None,
                 world_size: int | None = None, position: StreamPosition | None = None, split: str = "shard",
                 batch_size: int = 1):
        super().__init__()
        if isinstance(shards, Sequence) and shards and all(isinstance(x, Source) for x in shards):
            self.sources: list[Source] | None = list(shards)
            self.shards = [shard for src in self.sources for shard in src.shards]
        else:
            self.sources, self.shards = None, list_shards(shards)
        self.processor = processor
        self.seed, self.epochs, self.resampled = seed, epochs, resampled
        self.shuffle_shards, self.shuffle_buffer = shuffle_shards, shuffle_buffer
        self.max_length, self.strict = max_length, strict
        if split not in ("shard", "sample"):
            raise ValueError(f"split must be 'shard' or 'sample', got {split!r}")
        self.rank, self.world_size, self.split, self.batch_size = rank, world_size, split, batch_size
        self.position = position or StreamPosition()

    # --------------------------------------------------------------------------------------------- splitting
    def _worker(self) -> tuple[int, int]:
        """(virtual worker id, workers per rank). Roles rotate by the batches already consumed on resume."""
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        return (w + self.position.batches) % n, n

    def raw(self, split: int, splits: int) -> Iterator[dict]:
        """This split's raw samples, in their deterministic order (shuffled shards + shuffle buffer; a mixture: each
        source's own such stream, drawn from by weight)."""
        if self.sources is None:
            yield from self._source_raw(self.shards, "", split, splits)
            return
        if self.split == "shard" and not self.resampled:
            short = [f"{s.name} ({len(s.shards)})" for s in self.sources if len(s.shards) < splits]
            if short:  # a reader without shards of a source would silently never draw from it
                raise ValueError(f"mixture sources with fewer shards than the {splits} readers (ranks x workers): "
                                 f"{', '.join(short)}; give them more shards or set data.split=sample")
        streams = [self._source_raw(list(s.shards), f"-{s.name}", split, splits) for s in self.sources]
        names, weights = [s.name for s in self.sources], [s.weight for s in self.sources]
        rng, live = random.Random(f"{self.seed}-mix-{split}"), list(range(len(streams)))
        while live:
            i = rng.choices(live, [weights[j] for j in live])[0]
            sample = next(streams[i], None)
            if sample is None:  # a finite source ran out
                live.remove(i)
                continue
            sample["__source__"] = names[i]
            yield sample

    def _source_raw(self, shards: list[str], tag: str, split: int, splits: int) -> Iterator[dict]:
        """One source's raw samples for this split; `tag` keeps a mixture's sources on their own seeds (one source:
        no tag, the seeds of the single-source stream)."""
        stats = self._stats
        if self.resampled:
            rng = random.Random(f"{self.seed}{tag}-resample-{split}")
            shards = (rng.choice(shards) for _ in itertools.count())
            yield from self._buffered(itertools.chain.from_iterable(read_tar(s, stats) for s in shards),
                                      random.Random(f"{self.seed}{tag}-buffer-{split}"))
            return
        for epoch in itertools.count() if self.epochs is None else range(self.epochs):
            order = list(shards)
            if self.shuffle_shards:
                random.Random(f"{self.seed}{tag}-shards-{epoch}").shuffle(order)
            mine = order[split::splits]  # shard-level split: every sample of an epoch goes to exactly one split
            if not mine:  # fewer shards than splits: this split has none (endless would spin forever)
                return
            stream = itertools.chain.from_iterable(read_tar(s, stats) for s in mine)
            yield from self._buffered(stream, random.Random(f"{self.seed}{tag}-buffer-{split}-{epoch}"))

    def _buffered(self, stream: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        if self.shuffle_buffer <= 1:
            yield from stream
            return
        buf: list[dict] = []
        for item in stream:
            if len(buf) < self.shuffle_buffer:
                buf.append(item)
                continue
            i = rng.randrange(len(buf))
            buf[i], item = item, buf[i]
            yield item
        rng.shuffle(buf)
        yield from buf

    def _mine(self, worker: int, per_rank: int) -> Iterator[tuple[int, dict]]:
        """(index in the stream it was drawn from, raw sample) for this rank's `worker` (module docstring)."""
        rank, world = rank_world(self.rank, self.world_size)
        if self.split == "shard":
            return enumerate(self.raw(rank * per_rank + worker, world * per_rank))
        batch = world * self.batch_size  # one global batch
        return ((i, raw) for i, raw in enumerate(self.raw(0, 1))
                if i % world == rank and i // batch % per_rank == worker)

    def __iter__(self) -> Iterator[dict]:
        worker, per_rank = self._worker()
        self._stats = Counter()
        start = self.position.consumed.get(worker, 0)
        for index, raw in self._mine(worker, per_rank):
            if index < start:  # already consumed before the restore: skipped without decoding
                continue
            sample = self.decode(raw)
            if sample is None:
                continue
            sample["stream_index"] = (worker, index)
            sample["stream_stats"] = dict(self._stats)
            yield sample

    # -------------------------------------------------------------------------------------------- decoding
    def decode(self, raw: dict) -> dict | None:
        """Raw members -> processed sample, or None (counted in stats) for a bad one."""
        try:
            return self._decode(raw)
        except SampleError as e:
            self._stats[e.reason] += 1
            if self.strict:
                raise
            log.warning("skipped %s (%s); skipped so far in this worker: %s", e, e.reason, dict(self._stats))
            return None

    @staticmethod
    def _video(raw: dict, key: str, ref: tuple[str, ...] | VideoFile) -> Video:
        missing = [m for m in members(ref) if m not in raw]
        if missing:
            raise SampleError("missing_key", f"sample {key} refers to missing video members {missing}")
        try:
            if isinstance(ref, VideoFile):
                return load_video(raw[ref.member], frames=ref.frames, fps=ref.fps)
            return Video([load_image(raw[f]) for f in ref])
        except ImageError as e:
            reason = "unsupported_format" if e.reason == UNSUPPORTED else "bad_image"
            raise SampleError(reason, f"sample {key} video {list(members(ref))}: {e}") from e

    def _decode(self, raw: dict) -> dict:
        key = raw.get("__key__", "?")
        if "json" not in raw:
            raise SampleError("missing_key", f"sample {key} has no .json record")
        try:
            record = json.loads(raw["json"])
            refs = image_refs(record)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SampleError("bad_record", f"sample {key}: {e}") from e
        images, details, plans = [], [], []
        tiling = self.processor.cfg.tiling
        for ref, detail in refs:
            if isinstance(ref, (tuple, VideoFile)):  # a video: its frames, or its file sampled
                images.append(self._video(raw, key, ref))
                plans.append(None)
                details.append(detail)
                continue
            if ref not in raw:
                raise SampleError("missing_key", f"sample {key} refers to missing image {ref!r}")
            try:
                def draft(w, h, detail=detail):  # decode JPEGs no larger than the views need
                    plans.append(plan_tiles(w, h, self.processor.detail_for(detail), tiling))
                    return draft_size(plans[-1], tiling)

                images.append(load_image(raw[ref], draft=draft))
                if len(plans) < len(images):  # not a JPEG: decoded in full, planned from its own size
                    plans.append(None)
            except ImageError as e:
                reason = "unsupported_format" if e.reason == UNSUPPORTED else "bad_image"
                raise SampleError(reason, f"sample {key} image {ref}: {e}") from e
            details.append(detail)
        tok, marker = self.processor.tokenizer, self.processor.image_token
        try:
            pieces, add_bos = (chat_pieces(record["messages"], tok, marker) if "messages" in record
                               else document_pieces(record, tok))
            sample = self.processor.encode_pieces(pieces, images, details, add_bos=add_bos, plans=plans)
        except (ValueError, KeyError, TypeError) as e:
            raise SampleError("bad_record", f"sample {key}: {e}") from e
        if self.max_length is not None and len(sample["input_ids"]) > self.max_length:
            raise SampleError("too_long", f"sample {key}: {len(sample['input_ids'])} tokens > {self.max_length}")
        sample["key"] = key
        sample["meta"] = record.get("meta", {})
        if "__source__" in raw:
            sample["source"] = raw["__source__"]
        return sample


class SampleError(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def collate_stream(samples: list[dict], *, pad_token_id: int, padding_side: str = "right") -> dict:
    """`collate` plus where the samples came from (for StreamPosition) and the worker's skip counts."""
    batch = collate(samples, pad_token_id=pad_token_id, padding_side=padding_side)
    batch["stream_index"] = torch.tensor([s["stream_index"] for s in samples])  # (B, 2)
    batch["stream_stats"] = {s["stream_index"][0]: s["stream_stats"] for s in samples}
    batch["keys"] = [s["key"] for s in samples]
    batch["meta"] = [s["meta"] for s in samples]
    if "source" in samples[0]:  # a mixture: which source each sample came from
        batch["sources"] = [s["source"] for s in samples]
    return batch


def train_loader(data: Mapping, processor: Processor, *, seed: int, position: StreamPosition | None = None
                 ) -> torch.utils.data.DataLoader:
    """The endless training stream a data config describes (`configs/data/*.yaml`): `train` (shards: a folder, glob,
    brace pattern, URL or list) or `sources` (a weighted mixture [{name, train, weight}], `mixture`), `batch_size`,
    `num_workers`, `shuffle_buffer`, `max_length`, `split`; batched in the DataLoader's workers. `position`:
    continue at the exact next sample of a resumed run."""
    sources = mixture(data["sources"]) if data.get("sources") else None
    stream = ShardStream(sources or data["train"], processor, seed=seed, epochs=None,
                         shuffle_buffer=data["shuffle_buffer"], max_length=data["max_length"], split=data["split"],
                         batch_size=data["batch_size"], position=position)
    return _batched(stream, data, persistent=True)


def val_loader(data: Mapping, processor: Processor) -> torch.utils.data.DataLoader:
    """One unshuffled pass over `data.val` (any spelling of `train`), for the validation loss; split between ranks
    and workers as `data.split` says."""
    stream = ShardStream(data["val"], processor, epochs=1, shuffle_shards=False, shuffle_buffer=0,
                         max_length=data["max_length"], split=data["split"], batch_size=data["batch_size"])
    return _batched(stream, data, persistent=False)


def _batched(stream: ShardStream, data: Mapping, *, persistent: bool) -> torch.utils.data.DataLoader:
    """A checked stream (a missing or unreadable source fails here, before any step), batched in its workers."""
    check_shards(stream.shards)
    return torch.utils.data.DataLoader(
        stream, batch_size=data["batch_size"], num_workers=data["num_workers"],
        collate_fn=functools.partial(collate_stream, pad_token_id=stream.processor.tokenizer.pad_token_id),
        persistent_workers=persistent and data["num_workers"] > 0)


class SkipCounter:
    """Main-process view of the bad samples skipped, summed over workers (each reports cumulative counts)."""

    def __init__(self):
        self.per_worker: dict[int, dict[str, int]] = {}

    def update(self, batch: dict) -> None:
        self.per_worker.update(batch.get("stream_stats", {}))

    @property
    def total(self) -> dict[str, int]:
        out = Counter()
        for counts in self.per_worker.values():
            out.update(counts)
        return dict(out)
