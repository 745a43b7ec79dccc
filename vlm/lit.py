"""Thin Lightning glue around the plain `VLM` module: the optimizer (a partial from `configs/optim/`) over parameter
groups, the LR schedule (`configs/schedule/`), per-step metrics, and what a training checkpoint holds for an exact
resume (the data stream position, the configs)."""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable

import lightning as L
import torch

from vlm.checkpoint import upgrade_state_dict
from vlm.config import VLMConfig
from vlm.data.pipeline import StreamPosition
from vlm.model import VLM
from vlm.parallel import all_gather_objects, clip_grad_norm
from vlm.throughput import RATES, StepMeter, batch_counts, measure_peak_flops, precision_dtype, step_flops
from vlm.training import stream_position

log = logging.getLogger(__name__)

# Silenced on purpose, each for its reason; everything else Lightning and torch say is kept.
_WARNINGS = (
    # our frozen parts (vision tower, LLM, stage-0 resamplers) stay in eval mode while the rest trains (VLM.train)
    (r"Found \d+ module\(s\) in eval mode at the start of training", Warning),
    # Lightning 2.6's own call into torch.utils._pytree, deprecated by torch 2.14: nothing the project calls
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)


class _NoAdverts(logging.Filter):
    """Lightning's "💡 Tip: ... try installing [litlogger] / [litmodels]" lines advertise its cloud services, not this
    run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


_NO_ADVERTS = _NoAdverts()  # one instance: adding it again (every module built) is a no-op


def quiet_lightning() -> None:
    """The filters above; safe to call any number of times (neither filter list grows)."""
    for message, category in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_NO_ADVERTS)


NO_DECAY = ("bias", "norm", "embedding", "queries", "latents", "learned_tokens")
GATES = ("attn_gate", "ff_gate")  # the fusion's tanh gates (vlm/fusion.py); not an LLM's MLP gate_proj


def param_groups(model: torch.nn.Module) -> list[dict]:
    """Trainable parameters in three groups: with the optimizer's weight decay; without it (biases, norms,
    embeddings, learned queries and the image marker); the fusion gates (no decay, their own LR scale:
    `VLMLitModule(gate_lr_scale=...)`). A group may be empty."""
    decay, no_decay, gates = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lower = name.lower()
        if name.endswith(GATES):
            gates.append(p)
        else:
            (no_decay if p.ndim < 2 or any(k in lower for k in NO_DECAY) else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0},
            {"params": gates, "weight_decay": 0.0, "name": "gates"}]


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """The LR factor at optimizer step `step`: linear warmup over `warmup` steps, then cosine down to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


DEFAULT_OPTIMIZER = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
DEFAULT_SCHEDULE = functools.partial(warmup_cosine, warmup=20)


class VLMLitModule(L.LightningModule):
    """optimizer: a partial taking the parameter groups (`configs/optim/*.yaml`); schedule: a partial taking the
    optimizer step and `total` (the run's max_steps) to the LR factor (`configs/schedule/*.yaml`);
    mfu_peak_tflops: per-device peak for the MFU metric (None: measured at the start of training);
    run_config: the run's resolved config, stored in training checkpoints; gate_lr_scale: the fusion gates' LR over
    the optimizer's (Flamingo opens its tanh gates from 0 over a long run; a short run opens them faster)."""

    def __init__(self, cfg: VLMConfig, *, optimizer: Callable = DEFAULT_OPTIMIZER,
                 schedule: Callable[..., float] = DEFAULT_SCHEDULE, max_steps: int = 1000,
                 mfu_peak_tflops: float | None = None, run_config: dict | None = None, gate_lr_scale: float = 1.0):
        super().__init__()
        quiet_lightning()
        self.cfg = cfg
        self.model = VLM(cfg)
        self.make_optimizer, self.lr_schedule, self.max_steps = optimizer, schedule, max_steps
        self.mfu_peak_tflops, self.run_config = mfu_peak_tflops, run_config
        self.gate_lr_scale = gate_lr_scale
        self.stream_position = StreamPosition()  # what the training steps consumed (not what workers prefetched)
        self.meter = StepMeter()
        self.peak_flops = None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.stream_position.update(batch)
        self.meter.add(batch_counts(batch, self.model))
        loss = self.model(batch, num_tokens=self.loss_normaliser(batch), logits=False).loss
        self.log("loss", loss, prog_bar=True, sync_dist=True)  # the mean over ranks: the step's token mean
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """`data.val`'s loss (the token mean of each batch, averaged over the batches), logged as `val_loss`; the
        training stream position is untouched (validation batches are not training data)."""
        loss = self.model(batch, logits=False).loss
        self.log("val_loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(batch["keys"]))

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
        metrics = {"lr": optimizer.param_groups[0]["lr"]} | self.model.fusion.metrics()
        # a mixture: the samples this rank consumed from each source so far (restored with the stream on resume)
        metrics |= {f"samples/{name}": float(n) for name, n in sorted(self.stream_position.sources.items())}
        if dt is not None:
            metrics |= {f"{k}_per_s": counts[k] / dt for k in RATES}
            metrics |= {"step_time_s": dt, "mfu": step_flops(self.model, counts) / dt / self.peak_flops}
            self.log("samples_per_s", metrics.pop("samples_per_s"), prog_bar=True)
        self.log_dict(metrics)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Lightning stores the trained weights (`state_dict`), optimizer, LR scheduler and loop state; added here:
        the data stream position of every rank, the model config and the run's resolved config."""
        checkpoint["state_dict"] = self.checkpoint_weights(checkpoint["state_dict"])
        checkpoint["stream_position"] = all_gather_objects(self.stream_position.state_dict())
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
        opt = self.make_optimizer(param_groups(self.model))
        for group in opt.param_groups:  # before the scheduler records each group's initial LR
            if group.get("name") == "gates":
                group["lr"] *= self.gate_lr_scale
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: self.lr_schedule(step, total=self.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """FSDP clips by its own global norm over the shards (`vlm.parallel.clip_grad_norm`)."""
        by_norm = gradient_clip_val and gradient_clip_algorithm in (None, "norm")
        if not (by_norm and clip_grad_norm(self.trainer.strategy.model, gradient_clip_val)):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def checkpoint_weights(self, state_dict: dict) -> dict:
        """What checkpoints keep of a full state dict ("model.<name>" keys): `VLM.checkpoint_state_dict`'s weights
        (trained ones, plus parts built without weights). Filtered here rather than in `state_dict`, which FSDP's
        hooks need whole."""
        keep = {f"model.{n}" for n in self.model.checkpoint_state_dict()}
        return {k: v for k, v in state_dict.items() if k in keep}

    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
        inner = upgrade_state_dict({k.removeprefix("model."): v for k, v in state_dict.items()})
        return self.model.load_trainable_state_dict(inner, strict=strict)
