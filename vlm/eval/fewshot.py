"""Few-shot in-context evaluation, as Flamingo is evaluated: k demonstrations (image, question, answer) from the task's
training split, interleaved as earlier chat turns before the query, drawn at random or by RICES.

    python eval.py task=easy_vqa shots=[0,4,8] demos=rices trials=3 limit=200

- The pool: the task's `demos` split (`Task.read_demos`), `demo_pool` questions of it drawn once with `seed` (all of
  it when smaller).
- `random`: each query gets k pool questions drawn without replacement, from a generator seeded by (seed, trial,
  query), so a trial is reproducible and trials differ.
- `rices` (Retrieval-based In-Context Example Selection, Yang et al. 2022, as Flamingo uses it): the k pool questions
  whose images are nearest the query image by cosine similarity of the frozen encoder's features of the image's
  global view (detail low), averaged over its real patches. Features are computed once per distinct image (pool
  questions sharing an image share its row) and cached on disk with the pool's identity
  (`Rices.load_or_build`). The most similar demonstration comes last, next to the query (as open_flamingo orders
  them). RICES does not depend on the trial (decoding is greedy), so it runs once, as k = 0 does.
- Per (k, demos, trial) the answers and metrics are `vlm.eval.runner.evaluate`'s, in a subfolder; `fewshot.json` and
  the printed table hold the metric per k, mean and std over trials (population std, as open_flamingo's np.std).

Images: each distinct demonstration image is decoded once per DataLoader worker (`DemoImages`); with the model's
feature cache on, its views are encoded once per run.

Shapes: Q pool questions, U distinct pool images, N query images, Dv encoder width.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from vlm.eval.tasks import Question
from vlm.images import load_image, load_media
from vlm.tiling import tile_image

DEMO_MODES = ("random", "rices")


def image_key(q: Question) -> str:
    """Which image (or video) a question shows: its path, or for encoded bytes a hash of them."""
    if isinstance(q.image, list):
        return "video:" + "|".join(image_key(Question(q.question_id, q.question, f)) for f in q.image)
    if isinstance(q.image, bytes):
        return "sha1:" + hashlib.sha1(q.image).hexdigest()
    return str(q.image)


def draw_pool(questions: list[Question], size: int | None, seed: int) -> list[Question]:
    """`size` questions of the training split drawn once with `seed` (in file order), or all of them."""
    if size is None or size >= len(questions):
        return list(questions)
    keep = sorted(random.Random(seed).sample(range(len(questions)), size))
    return [questions[i] for i in keep]


def random_demos(pool: Sequence[Question], k: int, *, seed: int, trial: int, query: int) -> list[Question]:
    """k pool questions for query `query` of trial `trial`, without replacement."""
    if k > len(pool):
        raise ValueError(f"{k} shots from a pool of {len(pool)} questions")
    rng = random.Random(f"{seed}/{trial}/{query}")
    return [pool[i] for i in rng.sample(range(len(pool)), k)]


@torch.no_grad()
def pooled_features(model, images: Sequence, batch_size: int = 32) -> torch.Tensor:
    """Images (PIL, or what `load_image` takes: decoded a batch at a time, so a pool of 2,000 high-resolution images
    never sits decoded in memory at once) -> the frozen encoder's features of each global view (detail low), averaged
    over the real patches and L2-normalised: (N, Dv) float32. Through `model.encode_views`: the feature cache serves
    hits."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        batch = [img if isinstance(img, Image.Image) else load_image(img) for img in images[i:i + batch_size]]
        tiled = [tile_image(img, "low", model.cfg.tiling) for img in batch]
        pixels = torch.stack([t.pixels[0] for t in tiled]).to(device)  # (n, 3, S, S) uint8
        mask = torch.stack([t.mask[0] for t in tiled]).to(device)  # (n, S, S)
        feats, pmask = model.encode_views(pixels, mask)  # (n, P, Dv), (n, P)
        w = pmask.to(feats.dtype).unsqueeze(-1)  # (n, P, 1)
        mean = (feats * w).sum(1) / w.sum(1).clamp_min(1)  # (n, Dv)
        out.append(F.normalize(mean.float(), dim=-1).cpu())
    return torch.cat(out)  # (N, Dv)


class Rices:
    """Nearest pool questions by image similarity. `features` (U, Dv) normalised, one row per distinct pool image;
    `image_of` (Q,): the row of each pool question's image."""

    def __init__(self, pool: Sequence[Question], features: torch.Tensor, image_of: torch.Tensor):
        self.pool, self.features, self.image_of = list(pool), features, image_of

    @classmethod
    def build(cls, model, pool: Sequence[Question], batch_size: int = 32) -> Rices:
        keys = list(dict.fromkeys(image_key(q) for q in pool))  # distinct images, first-seen order
        row = {k: i for i, k in enumerate(keys)}
        first = {}
        for q in pool:
            first.setdefault(image_key(q), q)
        if any(isinstance(q.image, list) for q in pool):
            raise ValueError("demos=rices ranks pool images by the encoder's pooled features; this pool holds videos "
                             "(use demos=random)")
        images = [first[k].image for k in keys]  # decoded a batch at a time by pooled_features
        return cls(pool, pooled_features(model, images, batch_size),
                   torch.tensor([row[image_key(q)] for q in pool]))

    @classmethod
    def load_or_build(cls, model, pool: Sequence[Question], cache_dir: str | Path | None, encoder_key: str,
                      batch_size: int = 32) -> Rices:
        """`build`, its features kept in `cache_dir/rices-<key>.pt`, the key naming the encoder and the pool's
        images; a file that does not load or does not fit is rebuilt."""
        if cache_dir is None:
            return cls.build(model, pool, batch_size)
        ident = hashlib.sha1(encoder_key.encode())
        for q in pool:
            ident.update(image_key(q).encode() + b"\0")
        path = Path(cache_dir) / f"rices-{ident.hexdigest()[:16]}.pt"
        if path.is_file():
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                if saved["image_of"].shape == (len(pool),) and int(saved["image_of"].max()) < len(saved["features"]):
                    return cls(pool, saved["features"], saved["image_of"])
            except Exception:  # a torn or foreign file: rebuild it
                pass
        rices = cls.build(model, pool, batch_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"features": rices.features, "image_of": rices.image_of}, tmp)
        tmp.replace(path)
        return rices

    def find(self, query_features: torch.Tensor, k: int) -> list[list[Question]]:
        """(N, Dv) normalised query features -> for each query its k nearest pool questions, most similar last.
        Ties (questions on one image) keep pool order."""
        if k > len(self.pool):
            raise ValueError(f"{k} shots from a pool of {len(self.pool)} questions")
        if k == 0:
            return [[] for _ in range(len(query_features))]
        sim = query_features @ self.features.t()  # (N, U)
        per_question = sim[:, self.image_of]  # (N, Q)
        order = torch.sort(per_question, dim=1, descending=True, stable=True).indices[:, :k]  # (N, k)
        return [[self.pool[i] for i in reversed(row)] for row in order.tolist()]


class RandomDemos:
    """demos_of for demos=random: query index -> `random_demos` (a class, so DataLoader workers can pickle it)."""

    def __init__(self, pool: Sequence[Question], k: int, seed: int, trial: int):
        self.pool, self.k, self.seed, self.trial = pool, k, seed, trial

    def __call__(self, query: int) -> list[Question]:
        return random_demos(self.pool, self.k, seed=self.seed, trial=self.trial, query=query)


class RankedDemos:
    """demos_of for demos=rices: query index -> its k nearest of `ranked` (each query's list, most similar last)."""

    def __init__(self, ranked: list[list[Question]], k: int):
        self.ranked, self.k = ranked, k

    def __call__(self, query: int) -> list[Question]:
        return self.ranked[query][len(self.ranked[query]) - self.k:]


class DemoImages:
    """Decoded demonstration images, one decode per distinct image (an LRU of `size` images)."""

    def __init__(self, size: int = 256):
        self.size, self.images = size, OrderedDict()

    def __call__(self, q: Question):
        key = image_key(q)
        if key in self.images:
            self.images.move_to_end(key)
            return self.images[key]
        image = load_media(q.image)
        self.images[key] = image
        if len(self.images) > self.size:
            self.images.popitem(last=False)
        return image


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population std (np.std's default, as open_flamingo reports)."""
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def run_fewshot(evaluate_one: Callable[[int, str, int, Callable[[int], list[Question]] | None], dict],
                questions: list[Question], pool: list[Question], *, shots: Sequence[int], demos: str, trials: int,
                seed: int, nearest: Callable[[int], list[list[Question]]] | None = None) -> dict:
    """Every (k, trial): `evaluate_one(k, demos, trial, demos_of)` with `demos_of(query index) -> k Questions`
    (None for k = 0). k = 0 and RICES run once: neither depends on the trial. `nearest(k)`: for demos=rices, each
    query's k nearest pool questions, most similar last (called once, with the largest k). Returns {"shots": {k:
    {"mean", "std", "trials": [overall per trial], "per_type": {type: mean}}}, ...}."""
    if demos not in DEMO_MODES:
        raise ValueError(f"demos must be one of {DEMO_MODES}, got {demos!r}")
    if trials < 1:
        raise ValueError("trials must be >= 1")
    ks = sorted(set(int(k) for k in shots))
    if any(k < 0 for k in ks):
        raise ValueError(f"shots must be >= 0, got {ks}")
    if max(ks) > len(pool):
        raise ValueError(f"{max(ks)} shots from a pool of {len(pool)} questions: lower shots, or raise "
                         f"demo_pool if the demos split holds more")
    ranked = None
    if demos == "rices" and max(ks) > 0:
        if nearest is None:
            raise ValueError("demos=rices needs the nearest pool questions (`nearest`)")
        ranked = nearest(max(ks))
        if len(ranked) != len(questions):
            raise ValueError(f"nearest gave demonstrations for {len(ranked)} of {len(questions)} queries")
    result = {"demos": demos, "trials": trials, "seed": seed, "pool": len(pool), "shots": {}}
    for k in ks:
        scores, per_type = [], {}
        for trial in range(1 if k == 0 or demos == "rices" else trials):
            if k == 0:
                demos_of = None
            elif demos == "random":
                demos_of = RandomDemos(pool, k, seed, trial)
            else:
                demos_of = RankedDemos(ranked, k)
            metrics = evaluate_one(k, demos, trial, demos_of)
            scores.append(metrics["overall"])
            for t, m in metrics.get("question_type", {}).items():
                per_type.setdefault(t, []).append(m["score"])
        mean, std = mean_std(scores)
        result["shots"][k] = {"mean": mean, "std": std, "trials": scores,
                              "per_type": {t: mean_std(v)[0] for t, v in sorted(per_type.items())}}
    return result
