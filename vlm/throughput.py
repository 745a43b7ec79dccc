"""Training throughput and model FLOPs utilisation (MFU): what one optimizer step processed, how long it took,
and an analytic estimate of the FLOPs it needed.

Rates are taken per optimizer step (the wall time from one optimizer step to the next, over all its accumulated
micro-batches), so they stay right under gradient accumulation. They are per device.
"""

from __future__ import annotations

import time
from collections import Counter

import torch
from torch import nn

from vlm.model import VLM

RATES = ("samples", "tiles", "visual_tokens", "text_tokens")  # logged as <name>_per_s


def batch_counts(batch: dict, model: VLM) -> Counter:
    """What one micro-batch holds: samples, views (global views + tiles), tiles, visual tokens, text tokens
    (real and padded: the LM runs on the padded ones)."""
    is_tile = batch.get("view_positions", torch.zeros(0, 3, dtype=torch.long))[:, 0]  # (V,)
    views, tiles = len(is_tile), int(is_tile.sum())
    lg, lt = model.cfg.global_resampler.num_tokens, model.cfg.tile_resampler.num_tokens
    return Counter(samples=len(batch["input_ids"]), views=views, tiles=tiles,
                   visual_tokens=(views - tiles) * lg + tiles * lt,
                   text_tokens=int(batch["attention_mask"].sum()), padded_text_tokens=batch["input_ids"].numel())


def matmul_params(module: nn.Module | None) -> int:
    """Weights that multiply every token (linear and convolution weights, an LM head tied to the embeddings);
    not embedding lookups, biases or norms."""
    if module is None:
        return 0
    lookups = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    lookups -= {id(m.weight) for m in module.modules() if isinstance(m, nn.Linear)}  # tied LM head: a matmul
    return sum(p.numel() for p in module.parameters() if p.ndim >= 2 and id(p) not in lookups)


def step_flops(model: VLM, counts: Counter) -> float:
    """Analytic FLOPs of one training step, part by part: per token and matmul weight, 2 forward, 2 more for the
    input gradient where backward passes through (everything after the vision tower), 2 more for the weight
    gradient where the part is trained (the usual 6N per token). Attention's quadratic terms and the resamplers'
    keys/values over the patches are left out; recomputation under gradient checkpointing does not count (MFU)."""
    lg, lt = model.cfg.global_resampler.num_tokens, model.cfg.tile_resampler.num_tokens
    globals_, tiles = counts["views"] - counts["tiles"], counts["tiles"]
    text = counts["padded_text_tokens"]
    shared = model.tile_resampler is None  # one resampler body for both budgets
    parts = [  # (module, tokens it runs on)
        (model.vision, counts["views"] * model.vision.tokens_per_view),
        (model.global_resampler, counts["visual_tokens"] if shared else globals_ * lg),
        (model.tile_resampler, tiles * lt),
        (model.projector, counts["visual_tokens"]),
        (model.xattn, text),
        (model.lm, text),
    ]
    flops = 0.0
    for part, tokens in parts:
        if part is None:
            continue
        trained = any(p.requires_grad for p in part.parameters())
        per_weight = 6 if trained else 2 if part is model.vision else 4
        flops += per_weight * matmul_params(part) * tokens
    return flops


def precision_dtype(precision: str) -> torch.dtype:
    """The matmul dtype of a Lightning precision setting ("bf16-mixed", "16-mixed", "32-true", ...)."""
    precision = str(precision)
    return torch.bfloat16 if "bf16" in precision else torch.float16 if precision.startswith("16") else torch.float32


def measure_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The best FLOP/s of a few square matmuls on `device` in `dtype`: the MFU denominator when no datasheet number
    is configured (a lower bound of the true peak; well below it on busy machines)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    best = float("inf")
    for i in range(6):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        if i:  # the first one warms up
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


class StepMeter:
    """Counts over the micro-batches of one optimizer step, and the wall time since the previous step."""

    def __init__(self):
        self.counts, self.last = Counter(), None

    def add(self, counts: Counter) -> None:
        self.counts.update(counts)

    def step(self) -> tuple[Counter, float | None]:
        """This step's counts and its duration (None for the first step: nothing to measure from)."""
        now = time.perf_counter()
        counts, dt = self.counts, None if self.last is None else now - self.last
        self.counts, self.last = Counter(), now
        return counts, dt
