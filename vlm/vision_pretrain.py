"""Stage 0 of the tiny default: pretrain the random tiny vision tower and both resamplers on the synthetic corpus'
own training answers; the VLM stage then freezes them, as it would a pretrained encoder.

Offline there is no pretrained encoder to freeze (DESIGN.md, "The embedded default"), and a random one cannot read:
trained only through the LLM's answer loss, the tiny ResNet never learned the corner words within the CPU budget
(README, "The tiny default"). So, before the VLM stage:

    each corner tile of an image's detail="high" grid -> the word its chat says is written in that corner
    the image's global view                          -> the colour and the shape of its large shape

with linear heads on the MEAN of each resampler's output tokens (so the tokens of a word's tile all carry the word:
the LLM then finds it by the tile's position alone), plus one on the tile's class token (a single query finds the
word fast, which is what teaches the encoder to read).
BLIP-2 warm-starts its Q-Former the same way (its stage 1, image-text losses, before the LLM is attached); we use the
corpus' answers as labels because they are the only text there is, and we freeze the resamplers afterwards (trained
on by the LM's loss at the tiny default's learning rate, they lost the words: README). Labels come from the training
chats only (never val/test), and need a corpus built with `clear_text_tiles` (each corner word alone in its tile).

Shapes: E examples (corner tiles or images), S view side, A answer classes, D resampler width.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from functools import partial
from multiprocessing.pool import ThreadPool
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlm.checkpoint import upgrade_state_dict
from vlm.config import TilingConfig, cache_fields
from vlm.data.format import image_refs
from vlm.data.pipeline import read_tar
from vlm.data.synthetic import COLOURS, POSITIONS, QUESTIONS, SHAPES, read_manifest
from vlm.images import load_image
from vlm.tiling import tile_image

log = logging.getLogger(__name__)

VERSION = 3  # of the stage-0 recipe: part of the cache key, bump it when the objective or preprocessing changes
# (3: results written on a machine that converted the packaged weights in the same run had another init, 2026-12-03)
PREFIXES = ("vision.", "visual.global_resampler.", "visual.tile_resampler.", "visual.tile_queries")  # what it trains


@dataclass
class VisionPretrainConfig:
    images: int = 2000  # training images read (4 corner tiles + 1 global view each); the first `held_out` are held out
    held_out: int = 60
    steps: int = 800  # the words are read from ~500 on (held-out 28.7 % at 400, 88.7 % at 600, 100 % at 800)
    tiles_per_step: int = 32  # corner tiles per step; plus half as many global views, in the same encoder call
    lr: float = 2e-3
    workers: int = 2  # threads decoding and tiling the images
    # False: the encoder is pretrained and stays frozen (the real pair): its features are computed once (through the
    # model's feature cache when it has one) and only the resamplers train on them.
    train_encoder: bool = True


def corner_views(grid: tuple[int, int]) -> dict[str, int]:
    """Index (0 = global view, tiles row-major from 1) of each corner's tile in a (cols, rows) grid."""
    cols, rows = grid
    rc = {"top left": (0, 0), "top right": (0, cols - 1), "bottom left": (rows - 1, 0),
          "bottom right": (rows - 1, cols - 1)}
    return {pos: 1 + r * cols + c for pos, (r, c) in rc.items()}


def _read_shard(path: str, limit: int, vocab: tuple[str, ...], tiling: TilingConfig, shrink=None) -> list[tuple]:
    """Up to `limit` images of one training shard -> (corner tiles (4, 3, S, S), their masks (4, S, S), word labels
    (4,), global view (3, S, S), its mask (S, S), colour label, shape label). `shrink`: views and masks -> the same at
    the encoder's size (`VisionEncoder.resize_views`, which the encoder then skips: the same pixels, 1/4 the memory
    for a 256 px encoder)."""
    out = []
    for sample in read_tar(path, Counter()):  # webdataset's tar iterators, as the training pipeline reads shards
        if len(out) >= limit:
            break
        key = sample["__key__"]
        record = json.loads(sample["json"])
        answers = {t["question"]: t["answer"] for t in record["meta"].get("turns", [record["meta"]])}
        asked = {pos: answers.get(QUESTIONS["text"].format(position=pos)) for pos in POSITIONS}
        colour, shape = answers.get(QUESTIONS["colour"]), answers.get(QUESTIONS["shape"])
        if None in asked.values() or colour is None or shape is None:
            raise ValueError(f"{path}:{key}: stage 0 needs every corner, colour and shape question in the chat "
                             f"(a corpus with train_questions=7)")
        ((ref, _),) = image_refs(record)  # the corpus' one image per chat, named as the pipeline names it
        tiled = tile_image(load_image(sample[ref]), "high", tiling)
        views = corner_views(tiled.plan.grid)
        idx = torch.tensor([0] + [views[pos] for pos in POSITIONS])  # (5,) the global view, then the corners
        pixels, mask = tiled.pixels[idx], tiled.mask[idx]  # (5, 3, S, S), (5, S, S)
        if shrink is not None:
            pixels, mask = shrink(pixels, mask)  # (5, 3, S', S'), (5, S', S')
        words = torch.tensor([vocab.index(asked[pos]) for pos in POSITIONS])  # (4,)
        out.append((pixels[1:].clone(), mask[1:].clone(), words, pixels[0].clone(), mask[0].clone(),
                    list(COLOURS).index(colour), SHAPES.index(shape)))
    return out


def read_examples(root: str | Path, images: int, tiling: TilingConfig, workers: int = 2, shrink=None
                  ) -> dict[str, torch.Tensor]:
    """The first images of the training shards as stage-0 examples (stacked tensors; see `_read_shard`)."""
    manifest = read_manifest(root)
    params = manifest["params"]
    if not params.get("clear_text_tiles"):
        raise ValueError(f"vision pretraining needs a corpus built with clear_text_tiles=true (each corner word alone "
                         f"in its corner tile); {root} was not")
    shards = sorted(str(p) for p in (Path(root) / "train").glob("*.tar"))
    per_shard = -(-images // len(shards))
    read = partial(_read_shard, limit=per_shard, vocab=tuple(params["vocab"]), tiling=tiling, shrink=shrink)
    with ThreadPool(workers) as pool:  # threads: decoding and resizing release the GIL, and nothing is pickled
        parts = pool.map(read, shards, chunksize=1)
    rows = [r for part in parts for r in part][:images]
    names = ("tiles", "tile_masks", "words", "globals", "global_masks", "colours", "shapes")
    cat = lambda i: torch.cat([r[i] for r in rows]) if i < 3 else torch.stack([torch.as_tensor(r[i]) for r in rows])
    return {name: cat(i) for i, name in enumerate(names)}  # tiles (4E, 3, S, S), globals (E, 3, S, S), ...


class Heads(nn.Module):
    def __init__(self, dim: int, words: int):
        super().__init__()
        self.word, self.word_cls = nn.Linear(dim, words), nn.Linear(dim, words)
        self.colour, self.shape = nn.Linear(dim, len(COLOURS)), nn.Linear(dim, len(SHAPES))


def _logits(model, heads: Heads, tiles, tile_masks, globals_, global_masks, features=None):
    """One encoder call over tiles + global views (the VLM's BatchNorm statistics see both, as in training), or
    `features`: their (feats (V, P, Dv), patch mask (V, P)) computed before (a frozen encoder).
    Word logits from the mean of a tile's tokens and from its class token alone (one query: it finds the word fast,
    which is what trains the encoder to read); colour and shape from the mean of the global view's tokens."""
    n = len(tiles)
    if features is None:
        features = model.vision(torch.cat([tiles, globals_]), torch.cat([tile_masks, global_masks]))
    feats, pmask = features  # (V, P, Dv), (V, P)
    t = model.visual.resample(feats[:n], pmask[:n], tiles=True)  # (n, 129, D)
    z = model.visual.resample(feats[n:], pmask[n:], tiles=False).mean(1)  # (m, 65, D) -> (m, D)
    return heads.word(t.mean(1)), heads.word_cls(t[:, 0]), heads.colour(z), heads.shape(z)  # (n, A) x 2, (m, 5), (m, 3)


def frozen_features(model, pixels: torch.Tensor, masks: torch.Tensor, chunk: int = 32
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, 3, S, S) views -> the frozen encoder's (feats (V, P, Dv), patch mask (V, P)), `chunk` views a call,
    as the VLM encodes them (`VLM.encode_views`: through its feature cache when it has one)."""
    with torch.no_grad():
        out = [model.encode_views(pixels[i:i + chunk], masks[i:i + chunk]) for i in range(0, len(pixels), chunk)]
    return torch.cat([f for f, _ in out]), torch.cat([m for _, m in out])  # (V, P, Dv), (V, P)


def pretrain_vision(model, examples: dict[str, torch.Tensor], cfg: VisionPretrainConfig, seed: int = 0) -> dict:
    """Train `model.vision` (unless `cfg.train_encoder` is false) and its resamplers in place on `examples`; returns
    held-out accuracies."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    n_img = len(examples["globals"])
    if n_img < 2:
        raise ValueError(f"stage 0 needs at least 2 images, got {n_img}")
    h = min(cfg.held_out, n_img // 4) or 1  # a small corpus keeps 3/4 of its images for training
    visual = model.visual
    heads = Heads(visual.out_dim, int(examples["words"].max()) + 1)
    shared = visual.tile_resampler is None  # one body: the tile budget's own queries train with it
    parts = ([model.vision] if cfg.train_encoder else []) + [visual.global_resampler, heads] + (
        [] if shared else [visual.tile_resampler])
    if not cfg.train_encoder:  # every view once: the steps then run the resamplers alone
        model.vision.eval()
        tile_f, tile_m = frozen_features(model, examples["tiles"], examples["tile_masks"])  # (4E, P, Dv), (4E, P)
        glob_f, glob_m = frozen_features(model, examples["globals"], examples["global_masks"])  # (E, P, Dv), (E, P)
        features = lambda ti, gi: (torch.cat([tile_f[ti], glob_f[gi]]), torch.cat([tile_m[ti], glob_m[gi]]))
    else:
        features = lambda ti, gi: None
    params = [p for m in parts for p in m.parameters()] + ([visual.tile_queries] if shared else [])
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    train_tiles, train_images = list(range(4 * h, 4 * n_img)), list(range(h, n_img))
    for m in parts:
        m.train()
    for step in range(cfg.steps):
        ti = torch.tensor(rng.sample(train_tiles, min(cfg.tiles_per_step, len(train_tiles))))  # (n,)
        gi = torch.tensor(rng.sample(train_images, min(cfg.tiles_per_step // 2, len(train_images))))  # (m,)
        w, wc, c, s = _logits(model, heads, examples["tiles"][ti], examples["tile_masks"][ti], examples["globals"][gi],
                              examples["global_masks"][gi], features(ti, gi))
        words = examples["words"][ti]
        loss = (F.cross_entropy(w, words) + F.cross_entropy(wc, words) + F.cross_entropy(c, examples["colours"][gi])
                + F.cross_entropy(s, examples["shapes"][gi]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            log.info("vision pretraining step %d/%d: loss %.3f", step + 1, cfg.steps, loss.item())
    for m in parts:
        m.eval()
    with torch.no_grad():
        w, wc, c, s = _logits(model, heads, examples["tiles"][:4 * h], examples["tile_masks"][:4 * h],
                              examples["globals"][:h], examples["global_masks"][:h],
                              features(torch.arange(4 * h), torch.arange(h)))
    acc = lambda logits, y: round(100 * (logits.argmax(-1) == y).float().mean().item(), 1)
    model.train()
    model.apply_freeze()  # stage 1 decides what stays trainable
    return {"held_out_word_acc": acc(w, examples["words"][:4 * h]),
            "held_out_word_acc_class_token": acc(wc, examples["words"][:4 * h]),
            "held_out_colour_acc": acc(c, examples["colours"][:h]),
            "held_out_shape_acc": acc(s, examples["shapes"][:h]), "final_loss": round(loss.item(), 4)}


def stage_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith(PREFIXES)}


def cache_key(model, root: str | Path, cfg: VisionPretrainConfig, seed: int) -> str:
    """Everything stage 0's result is a function of: the recipe version, the corpus, the encoder / resampler / tiling
    config, stage 0's own settings, the seed."""
    mc = model.cfg.to_dict()
    mc["vision"] = {k: v for k, v in cache_fields(model.cfg.vision).items()
                    if not k.startswith("feature_cache")}  # where, not what
    blob = {"version": VERSION, "corpus": read_manifest(root)["params"], "stage0": asdict(cfg), "seed": seed,
            "model": {k: mc[k] for k in ("vision", "global_resampler", "tile_resampler", "share_resamplers")},
            "tiling": {k: v for k, v in mc["tiling"].items() if k != "force_detail"}}  # stage 0 always tiles "high"
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def ensure_pretrained_vision(model, root: str | Path, cfg: VisionPretrainConfig, seed: int = 0) -> dict:
    """Load stage 0's weights into `model` from `<root>/vision_pretrain/<key>.pt`, training them first if absent
    (a sweep's runs with the same encoder and resamplers share one stage 0)."""
    path = Path(root) / "vision_pretrain" / f"{cache_key(model, root, cfg, seed)}.pt"
    if path.exists():
        blob = torch.load(path, map_location="cpu")
        log.info("vision pretraining: reusing %s", path)
    else:
        start = time.perf_counter()
        examples = read_examples(root, cfg.images, model.cfg.tiling, cfg.workers, model.vision.resize_views)
        read_s = time.perf_counter() - start
        metrics = pretrain_vision(model, examples, cfg, seed)
        metrics |= {"read_seconds": round(read_s, 1), "seconds": round(time.perf_counter() - start, 1)}
        blob = {"state": stage_state(model), "metrics": metrics}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(blob, tmp)
        tmp.replace(path)
        log.info("vision pretraining: %s -> %s", metrics, path)
    state = upgrade_state_dict(blob["state"])  # caches written before the `visual.` names
    missing = set(stage_state(model)) - set(state)
    if missing:
        raise KeyError(f"{path} lacks {sorted(missing)[:4]}")
    model.load_state_dict(state, strict=False)
    return blob["metrics"]
