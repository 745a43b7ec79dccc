"""What `train.py` does besides composing and fitting: the loader of a run (counting each optimizer step's label tokens
ahead under gradient accumulation), resuming a run folder exactly where its training checkpoint stopped, the
callbacks a run's config asks for, and `run.json`. Lightning-level glue; the model knows nothing of it."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from vlm.callbacks import PeriodicEval, SampleLog
from vlm.checkpoint import LAST, config_changes, read_checkpoint
from vlm.data.pipeline import StreamPosition, train_loader, val_loader
from vlm.processor import Processor

log = logging.getLogger(__name__)


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


def run_loader(data, module, trainer, *, seed: int, position: StreamPosition | None = None) -> Iterable[dict]:
    """The training batches of a run: the data config's stream, tokenised for `module`'s model, wrapped in
    `StepTokens` when the trainer accumulates (the loss is normalised by the label tokens of the whole step)."""
    loader = train_loader(data, Processor(module.cfg, module.model.tokenizer), seed=seed, position=position)
    if trainer.accumulate_grad_batches > 1:
        return StepTokens(loader, trainer.accumulate_grad_batches, module.model.num_label_tokens)
    return loader


def run_val_loader(data, module):
    """`data.val`'s batches for the validation loss (every `trainer.val_check_interval` training batches), or None."""
    if not data.get("val"):
        return None
    return val_loader(data, Processor(module.cfg, module.model.tokenizer))


# ----------------------------------------------------------------------------------------------------- resume
def stream_position(blob: dict, rank: int = 0, world_size: int = 1) -> StreamPosition:
    """Where the data stream of `rank` stood when the training checkpoint `blob` was written."""
    states = blob["stream_position"]  # one per rank
    if len(states) != world_size:
        raise ValueError(f"the checkpoint holds the data positions of {len(states)} rank(s) but this run has "
                         f"{world_size}: resume with as many processes as the run had")
    return StreamPosition.from_state(states[rank])


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The training checkpoint a run folder is resumed from, if it holds one."""
    return run_dir / LAST if (run_dir / LAST).exists() else None


def resume_position(path: Path, run_config: dict, trainer) -> StreamPosition:
    """This rank's data stream position in the training checkpoint `path`; says what is resumed, and warns when the
    run's config differs from the checkpoint's (an exact resume needs the same overrides)."""
    blob = read_checkpoint(path)
    changed = config_changes(blob["config"], run_config)
    if trainer.is_global_zero:
        log.info("resuming %s at step %d", path, blob["global_step"])
        if changed:
            log.warning("resuming with a config that differs from the checkpoint's in %s", changed)
    return stream_position(blob, trainer.global_rank, trainer.world_size)


# ------------------------------------------------------------------------------------------ callbacks, run.json
def best_checkpoint(cfg, run_dir: Path) -> ModelCheckpoint | None:
    """`<run_dir>/checkpoints/best.ckpt`, the checkpoint with the best `checkpoint.best.monitor` (mode min / max):
    `val_loss` (after each validation; none without `data.val`) or a periodic evaluation's `eval/...` score (after
    each evaluation). Refused before training when the metric is one the run never logs."""
    best = cfg.checkpoint.get("best") or {}
    monitor, mode = best.get("monitor"), best.get("mode", "min")
    if not monitor:
        return None
    if mode not in ("min", "max"):
        raise ValueError(f"checkpoint.best.mode={mode!r}: min or max")
    common = dict(dirpath=run_dir / LAST.parent, filename="best", monitor=monitor, mode=mode, save_top_k=1,
                  enable_version_counter=False)
    if monitor == "val_loss":
        return ModelCheckpoint(**common) if cfg.data.get("val") else None
    if monitor.startswith("eval/"):
        if not cfg.get("eval_every"):
            raise ValueError(f"checkpoint.best.monitor={monitor}: set eval_every (the periodic evaluation logs it)")
        return ModelCheckpoint(**common, every_n_train_steps=cfg.eval_every)
    raise ValueError(f"checkpoint.best.monitor={monitor!r}: val_loss (with data.val) or a periodic evaluation's "
                     f"score, eval/overall or eval/<question_type|answer_type>/<type> (with eval_every)")


def run_callbacks(cfg, run_dir: Path) -> list:
    """`<run_dir>/checkpoints/last.ckpt` every `checkpoint.every_n_steps` optimizer steps (0: none), the periodic
    evaluation (`eval_every`, `eval_limit`), `best.ckpt` (`best_checkpoint`), and the per-batch sample log with
    `log_samples`."""
    every = cfg.checkpoint.every_n_steps
    callbacks = [ModelCheckpoint(run_dir / LAST.parent, every_n_train_steps=every, save_top_k=0, save_last=True,
                                 enable_version_counter=False)] if every else []
    if cfg.get("eval_every"):
        callbacks.append(PeriodicEval(cfg.evaluate, every=cfg.eval_every, limit=cfg.get("eval_limit"),
                                      out_dir=run_dir / "eval_steps"))
    best = best_checkpoint(cfg, run_dir)
    if best is not None:
        callbacks.append(best)
    if cfg.log_samples:
        callbacks.append(SampleLog(run_dir / "samples.jsonl"))
    return callbacks


def write_run_summary(run_dir: Path, **summary) -> None:
    """`run.json`, read by `python -m vlm.report`: steps, wall times, stage 0's metrics, the overrides."""
    (run_dir / "run.json").write_text(json.dumps(summary, indent=2))
