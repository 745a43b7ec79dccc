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
from vlm.tiling import token_budget

RATES = ("samples", "tiles", "visual_tokens", "text_tokens")  # logged as <name>_per_s


def batch_counts(batch: dict, model: VLM) -> Counter:
    """What one micro-batch holds: samples, views (global views + tiles), tiles, visual tokens, text tokens
    (real and padded: the LM runs on the padded ones)."""
    positions = batch.get("view_positions")
    is_tile = positions.is_tile.bool() if positions is not None else torch.zeros(0, dtype=torch.bool)  # (V,)
    visual = int(token_budget(model.cfg).views(positions).sum()) if positions is not None else 0
    return Counter(samples=len(batch["input_ids"]), views=len(is_tile), tiles=int(is_tile.sum()),
                   visual_tokens=visual,
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
    """Analytic FLOPs of one training step, part by part in data-flow order: per token and matmul weight, 2 forward,
    2 more for the input gradient where backward passes through the part (a trained part lies upstream of it), 2 more
    for the weight gradient where the part is trained (the usual 6N per token). The vision tower's forward is counted
    once per view by torch's FLOP counter (`VisionEncoder.flops_per_view`), times 3 when it trains. Attention's
    quadratic terms and the resamplers' keys/values over the patches are left out; recomputation under gradient
    checkpointing does not count (MFU)."""
    budget, visual = token_budget(model.cfg), model.visual
    globals_, tiles = counts["views"] - counts["tiles"], counts["tiles"]
    shared = visual.tile_resampler is None  # one resampler body for both budgets
    trained = lambda part: any(p.requires_grad for p in part.parameters())
    vision_trained = trained(model.vision)
    flops = model.vision.flops_per_view() * counts["views"] * (3 if vision_trained else 1)
    stages = [  # the parts of one stage and the tokens each runs on, in data-flow order
        [(visual.global_resampler, counts["visual_tokens"] if shared else globals_ * budget.global_view),
         (visual.tile_resampler, tiles * budget.tile), (visual.view_embedding, 0)],
        [(model.fusion, model.fusion.matmul_tokens(counts)), (model.learned_tokens, 0)],
        [(model.lm, counts["padded_text_tokens"])],
    ]
    upstream = vision_trained  # whether backward has to pass through the next stage
    for stage in stages:
        parts = [(part, tokens) for part, tokens in stage if part is not None]
        for part, tokens in parts:
            flops += (6 if trained(part) else 4 if upstream else 2) * matmul_params(part) * tokens
        upstream = upstream or any(trained(part) for part, _ in parts)
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
