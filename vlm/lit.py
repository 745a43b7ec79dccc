"""Thin Lightning glue around the plain `VLM` module: optimizer groups, schedule, per-step metrics, and what a
training checkpoint holds for an exact resume (the data stream position, the configs)."""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator

import lightning as L
import torch

from vlm.checkpoint import stream_position
from vlm.config import VLMConfig
from vlm.data.pipeline import StreamPosition
from vlm.model import VLM
from vlm.throughput import RATES, StepMeter, batch_counts, measure_peak_flops, precision_dtype, step_flops

log = logging.getLogger(__name__)

NO_DECAY = ("bias", "norm", "gate", "embedding", "queries", "latents", "media_marker")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters, with no weight decay on biases, norms, gates, embeddings and learned queries."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or any(k in name.lower() for k in NO_DECAY) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class StepTokens:
    """Batches plus `step_tokens`: the supervised tokens of the `accumulate` micro-batches of their optimizer step
    on this rank, counted ahead (the step's batches are held in memory) for `VLMLitModule.loss_normaliser`.
    Lightning steps after every `accumulate` batches of an epoch; a shorter last group counts its own tokens."""

    def __init__(self, batches: Iterable[dict], accumulate: int, count: Callable[[dict], torch.Tensor]):
        self.batches, self.accumulate, self.count = batches, accumulate, count

    def __iter__(self) -> Iterator[dict]:
        it = iter(self.batches)
        while group := list(itertools.islice(it, self.accumulate)):
            tokens = sum(self.count(b) for b in group)  # 0-dim
            yield from ({**b, "step_tokens": tokens} for b in group)


class VLMLitModule(L.LightningModule):
    """mfu_peak_tflops: per-device peak for the MFU metric (None: measured at the start of training);
    run_config: the run's resolved config, stored in training checkpoints."""

    def __init__(self, cfg: VLMConfig, *, lr: float = 1e-3, weight_decay: float = 0.05, warmup_steps: int = 20,
                 max_steps: int = 1000, mfu_peak_tflops: float | None = None, run_config: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.model = VLM(cfg)
        self.lr, self.weight_decay, self.warmup_steps, self.max_steps = lr, weight_decay, warmup_steps, max_steps
        self.mfu_peak_tflops, self.run_config = mfu_peak_tflops, run_config
        self.stream_position = StreamPosition()  # what the training steps consumed (not what workers prefetched)
        self.meter = StepMeter()
        self.peak_flops = None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.stream_position.update(batch)
        self.meter.add(batch_counts(batch, self.model))
        loss = self.model(batch, num_tokens=self.loss_normaliser(batch)).loss
        self.log("loss", loss, prog_bar=True, sync_dist=True)  # the mean over ranks: the step's token mean
        return loss

    def on_train_start(self) -> None:
        if self.mfu_peak_tflops is not None:
            self.peak_flops = self.mfu_peak_tflops * 1e12
            return
        dtype = precision_dtype(self.trainer.precision)
        self.peak_flops = measure_peak_flops(self.device, dtype)
        if self.trainer.is_global_zero:
            log.info("MFU peak: %.3g TFLOP/s, measured (%s matmul on %s); set mfu_peak_tflops to use the datasheet "
                     "number", self.peak_flops / 1e12, dtype, self.device)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Once per optimizer step, after all its accumulated micro-batches: learning rate, tanh gates, and the
        throughput and MFU of the step (from the wall time since the previous one; none for the first)."""
        counts, dt = self.meter.step()
        metrics = {"lr": optimizer.param_groups[0]["lr"]}
        if self.model.xattn is not None:
            metrics |= self.model.xattn.gates()
        if dt is not None:
            metrics |= {f"{k}_per_s": counts[k] / dt for k in RATES}
            metrics |= {"step_time_s": dt, "mfu": step_flops(self.model, counts) / dt / self.peak_flops}
            self.log("samples_per_s", metrics.pop("samples_per_s"), prog_bar=True)
        self.log_dict(metrics)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Lightning stores the trained weights (`state_dict`), optimizer, LR scheduler and loop state; added here:
        the data stream position of every rank, the model config and the run's resolved config."""
        checkpoint["state_dict"] = self.checkpoint_weights(checkpoint["state_dict"])
        checkpoint["stream_position"] = _all_ranks(self.stream_position.state_dict())
        checkpoint["model_config"] = self.cfg.to_dict()
        checkpoint["config"] = self.run_config

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.stream_position = stream_position(checkpoint, self.global_rank, self.trainer.world_size)

    def loss_normaliser(self, batch: dict) -> torch.Tensor | None:
        """What this micro-batch's summed token losses are divided by, so that the optimizer step's gradient is
        that of sum(token losses) / (supervised tokens of the step), counted over every rank and every accumulated
        micro-batch: DDP then averages gradients over ranks and Lightning divides each micro-batch's loss by the
        accumulation, hence the factor world x accumulate. A per-rank mean would weigh a token of a rank with few
        label tokens more. None in one process without accumulation: the plain token mean."""
        world, accumulate = self.trainer.world_size, self.trainer.accumulate_grad_batches
        if world == accumulate == 1:
            return None
        if accumulate > 1 and "step_tokens" not in batch:
            raise ValueError("accumulate_grad_batches > 1 needs the step's token count: wrap the loader in StepTokens")
        tokens = batch["step_tokens"] if accumulate > 1 else self.model.num_label_tokens(batch)
        tokens = self.trainer.strategy.reduce(tokens.detach().clone(), reduce_op="sum")  # in place: a copy
        return tokens / (world * accumulate)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(param_groups(self.model, self.weight_decay), lr=self.lr, betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, warmup=self.warmup_steps, total=self.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """FSDP clips by its own global norm over the shards (Lightning's generic norm clipping refuses FSDP)."""
        model = self.trainer.strategy.model
        if gradient_clip_val and hasattr(model, "clip_grad_norm_") and gradient_clip_algorithm in (None, "norm"):
            model.clip_grad_norm_(gradient_clip_val)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def checkpoint_weights(self, state_dict: dict) -> dict:
        """What checkpoints keep of a full state dict ("model.<name>" keys): `VLM.checkpoint_state_dict`'s weights
        (trained ones, plus parts built without weights). Filtered here rather than in `state_dict`, which FSDP's
        hooks need whole."""
        keep = {f"model.{n}" for n in self.model.checkpoint_state_dict()}
        return {k: v for k, v in state_dict.items() if k in keep}

    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
        inner = {k.removeprefix("model."): v for k, v in state_dict.items()}
        return self.model.load_trainable_state_dict(inner, strict=strict)


def _all_ranks(obj) -> list:
    """`obj` from every rank, in rank order ([obj] in one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


class SampleLog(L.Callback):
    """Appends what each training step consumed (batch number, sample keys, stream indices) to a JSON-lines file:
    which data a step saw, and the check that a resumed run neither skips nor repeats a sample."""

    def __init__(self, path):
        self.path = path

    def on_train_batch_end(self, trainer, module: VLMLitModule, outputs, batch: dict, batch_idx: int) -> None:
        line = {"rank": trainer.global_rank, "batch": module.stream_position.batches - 1, "step": trainer.global_step,
                "keys": batch["keys"], "stream_index": batch["stream_index"].tolist()}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
