"""A disk cache of frozen vision-encoder features: one file per view, read instead of running the encoder again.

A frozen encoder's features of a view are a function of the view's pixels and pixel mask, the encoder (its config
and weights), its feature stage and how it runs (dtype, autocast, device type, torch version). Each view is keyed by
a blake2b hash of its pixel and mask bytes (shape and dtype included), under a folder per encoder keyed by a hash of
everything else (`encoder_key`), so another encoder, feature layer, checkpoint or precision never reads them:

    root/<encoder key>/<first 2 hex of the view key>/<view key>.feat

A file: a 32-byte header (magic, version, stored and returned dtype, memory layout, P, Dv, crc32), then the features
(P, Dv) and the patch mask (P,) as uint8. Hits come back in the memory layout the encoder gave (a timm NCHW map
flattened is patch-fastest): the resamplers' kernels follow strides, so only then are their outputs the same bits.

Writes go to a temporary file renamed over the entry (`os.replace`, atomic on POSIX and Windows), so DataLoader
workers and DDP ranks can share a root: a reader sees a whole entry or none. A truncated, corrupt or unreadable
entry is recomputed, counted (`CacheStats.corrupt`) and overwritten. The total size of the root (all encoders) is
kept under `max_bytes`: after each write batch the least recently used entries go first (a hit refreshes its mtime),
down to `LOW_WATER` of the bound. Other processes' writes are seen at the next rescan (at most `rescan_s` apart; 0:
a scan per write batch, a strict bound), so with several writers the bound can be passed by what they wrote since.

Stored dtype (`dtype`): None (the default) keeps the features' own dtype (the encoder's, or autocast's), so a hit
is bit-identical to encoding the view again (in any batch where the encoder's kernels are batch-invariant: the CPU
ones of the tiny ResNet and ViT are, tested; GPU kernels can change last bits with the batch size, uncached too).
"float16" / "bfloat16" halve a float32 encoder's files at a rounding of the features: at most 2^-11 / 2^-8 relative
per value; measured on a synthetic-corpus image, efficientnet_lite0 (stride 16, random init, |x| <= 37) and the tiny
ResNet: 1.8e-4 / 1.4e-3 mean relative error, 4.9e-4 / 3.9e-3 at most. The features of a miss are rounded the same
way, so an entry gives the same values whether it hit or missed. float16 overflows past 65504 (some ViTs have
outlier features near that): such a write raises; use bfloat16 or None there.

Shapes: V views, C channels, S view side, P patches per view, Dv vision width.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
import uuid
import weakref
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlm.config import VisionConfig, cache_fields

log = logging.getLogger(__name__)

# a root folder overrides VisionConfig.feature_cache; "", "0", "off", "none", "null": no cache. Not VLM_CACHE (the
# packaged weights' root, vlm/pretrained.py): this root is size-bounded and would evict whatever else it holds
ENV = "VLM_FEATURE_CACHE"
OFF = {"", "0", "off", "none", "null", "false"}
FORMAT = 1
MAGIC = b"VLMFEAT\0"
HEADER = struct.Struct("<8sBBBBIIIQ")  # magic, version, stored dtype, returned dtype, layout, P, Dv, crc32, 0
SUFFIX = ".feat"
LOW_WATER = 0.9  # eviction goes down to this fraction of max_bytes, so a scan is not needed at every write
STALE_TMP_S = 3600.0  # a temporary file this old belongs to a writer that died: removed by the scan
DTYPES = {1: torch.float32, 2: torch.float16, 3: torch.bfloat16, 4: torch.float64}
CODES = {v: k for k, v in DTYPES.items()}
SAMPLE = 4096  # elements of each weight tensor the encoder fingerprint reads (evenly spaced; all of smaller ones)
UNKEYED = ("gradient_checkpointing", "feature_cache", "feature_cache_max_gb", "feature_cache_dtype")  # no effect


@dataclass(frozen=True)
class FeatureCacheConfig:
    """Where a model's frozen features are cached: the only thing a model holds of its cache (paths, no tensors)."""

    root: str
    max_bytes: int = 20 * 2**30
    dtype: str | None = None  # None: the features' own dtype (bit-identical hits); "float16" / "bfloat16"

    def __post_init__(self):
        if self.dtype is not None and self.dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"feature cache dtype must be null, float16, bfloat16 or float32, got {self.dtype!r}")
        if self.max_bytes < 0:
            raise ValueError(f"feature cache max_bytes must be >= 0, got {self.max_bytes}")

    @classmethod
    def from_vision(cls, cfg: VisionConfig, environ: Mapping[str, str] = os.environ) -> FeatureCacheConfig | None:
        """`VisionConfig.feature_cache` (+ `_max_gb`, `_dtype`), the env `VLM_FEATURE_CACHE` overriding the root;
        None: off."""
        root = environ.get(ENV, cfg.feature_cache)
        if root is None or str(root).strip().lower() in OFF:
            return None
        return cls(str(root), int(cfg.feature_cache_max_gb * 2**30), cfg.feature_cache_dtype)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0  # views encoded (corrupt entries included)
    corrupt: int = 0  # entries that could not be read back: recomputed and overwritten
    evicted: int = 0
    bytes: int = 0  # size of the root as last known (a scan plus this process' writes since)
    written: int = 0  # bytes this process wrote
    errors: int = 0  # failed writes (disk full, permissions): the features are returned all the same


@dataclass
class _Entry:
    path: Path
    size: int
    mtime: float


class FeatureCache:
    """One encoder's entries under `root/key/`; `encode` runs an encoder on the views it does not have."""

    def __init__(self, root: str | os.PathLike, key: str, max_bytes: int, dtype: str | None = None,
                 rescan_s: float = 60.0):
        self.root, self.key, self.max_bytes, self.rescan_s = Path(root), key, int(max_bytes), rescan_s
        self.dir = self.root / key
        self.dtype = getattr(torch, dtype) if dtype is not None else None
        self.stats = CacheStats()
        self._scanned = float("-inf")  # time.monotonic() of the last scan
        self._warned = False

    # -------------------------------------------------------------------------------------------------- keys
    @staticmethod
    def view_keys(pixels: torch.Tensor, pixel_mask: torch.Tensor) -> list[str]:
        """pixels (V, C, S, S), pixel_mask (V, S, S) -> one hex key per view, of their bytes, shapes and dtypes."""
        pixels, pixel_mask = pixels.detach().cpu().contiguous(), pixel_mask.detach().cpu().contiguous()
        keys = []
        for px, m in zip(pixels, pixel_mask):
            h = hashlib.blake2b(digest_size=16)
            h.update(f"{tuple(px.shape)}{px.dtype}{tuple(m.shape)}{m.dtype}".encode())
            h.update(_bytes(px))
            h.update(_bytes(m))
            keys.append(h.hexdigest())
        return keys

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / (key + SUFFIX)

    # --------------------------------------------------------------------------------------------- read / write
    def read(self, key: str) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """The entry's features (P, Dv) in the dtype the encoder gave, patch mask (P,) and layout (`_layout`), or
        None (absent, or corrupt: counted)."""
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                data = bytearray(f.read())
        except FileNotFoundError:
            return None
        except OSError:
            self.stats.corrupt += 1
            return None
        try:
            entry = _decode(data)
        except ValueError:
            self.stats.corrupt += 1
            return None
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:
            pass
        return entry

    def write(self, entries: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """key -> (features (P, Dv), patch mask (P,)) on disk, each atomically; then the size bound is enforced."""
        for key, (feats, mask) in entries.items():
            path = self.path(key)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                blob = _encode(feats, mask, self.dtype)
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(tmp, "wb") as f:
                    f.write(blob)
                os.replace(tmp, path)
            except OSError as e:
                self.stats.errors += 1
                if not self._warned:
                    log.warning("feature cache: cannot write %s (%s); features are computed as without a cache",
                                path, e)
                    self._warned = True
                tmp.unlink(missing_ok=True)
                continue
            self.stats.written += len(blob)
            self.stats.bytes += len(blob)
        self.enforce_bound()

    # ------------------------------------------------------------------------------------------------- encode
    def encode(self, encoder: Callable, pixels: torch.Tensor, pixel_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """What `encoder(pixels, pixel_mask)` returns, features (V, P, Dv) and patch mask (V, P), with the views
        this cache holds read from disk and the others encoded in one call and written."""
        if pixel_mask is None:
            pixel_mask = torch.ones(pixels.shape[0], *pixels.shape[-2:], dtype=torch.bool, device=pixels.device)
        keys = self.view_keys(pixels, pixel_mask)
        if not keys:
            return encoder(pixels, pixel_mask)
        found = {key: entry for key in dict.fromkeys(keys) if (entry := self.read(key)) is not None}  # each once
        hit = [i for i, key in enumerate(keys) if key in found]
        miss = [i for i, key in enumerate(keys) if key not in found]
        self.stats.hits += len(hit)
        self.stats.misses += len(miss)
        if not miss:
            entry = found[keys[0]]
            out = _empty((len(keys), *entry[0].shape), entry[0].dtype, pixels.device, entry[2])  # (V, P, Dv)
            out.copy_(torch.stack([found[key][0] for key in keys]))
            return out, torch.stack([found[key][1] for key in keys]).to(pixels.device)
        miss_index = torch.tensor(miss, device=pixels.device)
        feats, pmask = encoder(pixels, pixel_mask) if not hit else encoder(pixels[miss_index], pixel_mask[miss_index])
        if self.dtype is not None and self.dtype != feats.dtype:  # a miss gives what its hit will give
            feats = _round_trip(feats, self.dtype)
        cpu_feats, cpu_mask = feats.detach().cpu(), pmask.cpu()  # (Vm, P, Dv), (Vm, P)
        self.write({keys[i]: (cpu_feats[j], cpu_mask[j]) for j, i in enumerate(miss)})
        if not hit:
            return feats, pmask
        cached = torch.stack([found[keys[i]][0] for i in hit])  # (Vh, P, Dv)
        if cached.shape[1:] != feats.shape[1:] or cached.dtype != feats.dtype:
            raise RuntimeError(f"feature cache {self.dir}: entries of {tuple(cached.shape[1:])} {cached.dtype} "
                               f"beside encoded features of {tuple(feats.shape[1:])} {feats.dtype}")
        hit_index = torch.tensor(hit, device=pixels.device)
        # in the encoder's memory layout: what reads the features next gives the same bits (kernels follow strides)
        out = _empty((len(keys), *feats.shape[1:]), feats.dtype, feats.device, _layout(feats[0]))  # (V, P, Dv)
        out.index_copy_(0, miss_index, feats).index_copy_(0, hit_index, cached.to(out.device))
        out_mask = pmask.new_empty((len(keys), *pmask.shape[1:])).index_copy_(0, miss_index, pmask)  # (V, P)
        out_mask.index_copy_(0, hit_index, torch.stack([found[keys[i]][1] for i in hit]).to(out.device))
        return out, out_mask

    # ------------------------------------------------------------------------------------------------ the bound
    def scan(self) -> list[_Entry]:
        """Every entry of the root (all encoders), oldest first; removes temporary files of dead writers."""
        entries, now = [], time.time()
        for path in _walk(self.root):
            try:
                st = path.stat()
            except OSError:  # removed by another process meanwhile
                continue
            if path.name.endswith(".tmp"):
                if now - st.st_mtime > STALE_TMP_S:
                    path.unlink(missing_ok=True)
                continue
            entries.append(_Entry(path, st.st_size, st.st_mtime))
        entries.sort(key=lambda e: e.mtime)
        self.stats.bytes = sum(e.size for e in entries)
        self._scanned = time.monotonic()
        return entries

    def enforce_bound(self) -> None:
        """Evict the least recently used entries while the root is over `max_bytes` (checked by a scan when this
        process' count says so, or `rescan_s` after the last one)."""
        if self.stats.bytes <= self.max_bytes and time.monotonic() - self._scanned < self.rescan_s:
            return
        entries = self.scan()
        if self.stats.bytes <= self.max_bytes:
            return
        target = self.max_bytes * LOW_WATER
        for e in entries:
            if self.stats.bytes <= target:
                break
            try:
                e.path.unlink()
                self.stats.evicted += 1
            except FileNotFoundError:  # another process evicted it first
                pass
            except OSError:
                continue
            self.stats.bytes -= e.size


# ---------------------------------------------------------------------------------------------- encoder key
_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # encoder -> (state token, fingerprint)
_CACHES: dict[tuple, FeatureCache] = {}  # (config, encoder key) -> the open cache (its stats live there)


def weights_fingerprint(module: nn.Module) -> str:
    """A hash of the module's weights and buffers: names, shapes, dtypes and SAMPLE evenly spaced values of each."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        t = t.detach().reshape(-1)
        h.update(f"{name}{tuple(t.shape)}{t.dtype};".encode())
        if t.numel() > SAMPLE:
            t = t[torch.linspace(0, t.numel() - 1, SAMPLE, device=t.device).long()]
        h.update(_bytes(t.cpu().contiguous()))
    return h.hexdigest()


def _state_token(module: nn.Module) -> tuple:
    """Changes when a weight is replaced or changed in place (load_state_dict, an optimizer step, .to(device))."""
    return tuple((t.data_ptr(), _version(t)) for t in (*module.parameters(), *module.buffers()))


def _version(t: torch.Tensor) -> int:
    try:
        return t._version  # bumped by every in-place change
    except RuntimeError:  # an inference tensor has no version counter (and is not changed outside inference mode)
        return -1


def encoder_key(cfg: VisionConfig, encoder: nn.Module, device_type: str, dtype: str | None = None) -> str:
    """A hash of everything an encoder's features depend on besides the view: the config fields that shape them, a
    fingerprint of the weights (computed once per weight state), the weights' dtype, autocast, the device type, the
    torch version and the stored dtype."""
    token = _state_token(encoder)
    memo = _KEYS.get(encoder)
    if memo is None or memo[0] != token:
        memo = (token, weights_fingerprint(encoder))
        _KEYS[encoder] = memo
    fields_ = {k: v for k, v in cache_fields(cfg).items() if k not in UNKEYED}
    param = next(encoder.parameters())
    autocast = str(torch.get_autocast_dtype(device_type)) if torch.is_autocast_enabled(device_type) else None
    if cfg.autocast is not None:  # the encoder's own autocast decides (a keyed field): a bf16-mixed run and an fp32
        autocast = None           # eval compute the same features and share entries
    run = dict(weights=memo[1], param_dtype=str(param.dtype), autocast=autocast, device=device_type,
               torch=torch.__version__, stored=dtype, format=FORMAT)
    blob = json.dumps([fields_, run], sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=12).hexdigest()


def open_cache(spec: FeatureCacheConfig, encoder: nn.Module, device: torch.device | str) -> FeatureCache:
    """The cache of `encoder` (a `VisionEncoder`: `.cfg` is its VisionConfig) as it runs now on `device`; one
    `FeatureCache` per (spec, encoder key) in this process, so its stats add up across calls."""
    key = encoder_key(encoder.cfg, encoder, torch.device(device).type, spec.dtype)
    cache = _CACHES.get((spec, key))
    if cache is None:
        cache = _CACHES[(spec, key)] = FeatureCache(spec.root, key, spec.max_bytes, spec.dtype)
    return cache


# ------------------------------------------------------------------------------------------------- file format
def _bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _round_trip(feats: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    stored = feats.to(dtype)
    if dtype == torch.float16 and bool(torch.isinf(stored).any()) and not bool(torch.isinf(feats).any()):
        raise ValueError("features exceed float16's range (65504): set feature_cache_dtype to bfloat16 or null")
    return stored.to(feats.dtype)


def _layout(feats: torch.Tensor) -> int:
    """Memory order of one view's features (P, Dv): 0 row-major, 1 patches fastest (a timm NCHW map flattened)."""
    return int(feats.shape[0] > 1 and feats.shape[1] > 1 and feats.stride(0) == 1)


def _empty(shape: tuple[int, int, int], dtype: torch.dtype, device, layout: int) -> torch.Tensor:
    """An uninitialised (V, P, Dv) tensor whose views have `layout`."""
    v, p, dv = shape
    return torch.empty(v, dv, p, dtype=dtype, device=device).transpose(1, 2) if layout else \
        torch.empty(v, p, dv, dtype=dtype, device=device)


def _encode(feats: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype | None) -> bytes:
    """features (P, Dv), patch mask (P,) -> the file's bytes (the crc covers the header too)."""
    stored = feats.to(dtype if dtype is not None else feats.dtype).contiguous()  # (P, Dv)
    if stored.dtype not in CODES or feats.dtype not in CODES:
        raise ValueError(f"feature cache: unsupported dtype {feats.dtype}")
    payload = bytes(_bytes(stored)) + bytes(_bytes(mask.to(torch.uint8).contiguous()))
    fields_ = (MAGIC, FORMAT, CODES[stored.dtype], CODES[feats.dtype], _layout(feats), *stored.shape)
    crc = zlib.crc32(payload, zlib.crc32(HEADER.pack(*fields_, 0, 0)))
    return HEADER.pack(*fields_, crc, 0) + payload


def _decode(data: bytearray) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The file's bytes -> features (P, Dv) in the dtype the encoder gave, patch mask (P,) bool, layout; ValueError
    if they are not a whole, intact entry."""
    if len(data) < HEADER.size:
        raise ValueError("truncated header")
    magic, version, stored, returned, layout, p, dv, crc, _ = HEADER.unpack_from(data)
    if magic != MAGIC or version != FORMAT or stored not in DTYPES or returned not in DTYPES:
        raise ValueError("not a feature cache entry of this format")
    nbytes = p * dv * DTYPES[stored].itemsize
    if len(data) != HEADER.size + nbytes + p:
        raise ValueError("truncated or padded entry")
    head = HEADER.pack(magic, version, stored, returned, layout, p, dv, 0, 0)
    if zlib.crc32(memoryview(data)[HEADER.size:], zlib.crc32(head)) != crc:
        raise ValueError("checksum mismatch")
    raw = torch.frombuffer(data, dtype=torch.uint8)
    feats = raw[HEADER.size:HEADER.size + nbytes].view(DTYPES[stored]).reshape(p, dv).to(DTYPES[returned])
    mask = raw[HEADER.size + nbytes:].bool()  # (P,)
    return feats, mask, layout


def _walk(root: Path):
    """Files two folders below each encoder folder of `root`."""
    try:
        encoders = list(os.scandir(root))
    except OSError:
        return
    for enc in encoders:
        if not enc.is_dir(follow_symlinks=False):
            continue
        try:
            shards = list(os.scandir(enc.path))
        except OSError:
            continue
        for shard in shards:
            if not shard.is_dir(follow_symlinks=False):
                continue
            try:
                yield from (Path(f.path) for f in os.scandir(shard.path) if f.is_file(follow_symlinks=False))
            except OSError:
                continue


