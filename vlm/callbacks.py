"""Lightning callbacks of a training run."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from hydra.utils import to_absolute_path

from vlm.eval.runner import evaluate
from vlm.eval.tasks import Task
from vlm.processor import Processor


class SampleLog(L.Callback):
    """Appends what each training step consumed (batch number, sample keys, stream indices, a mixture's source names)
    to a JSON-lines file: which data a step saw, and the check that a resumed run neither skips nor repeats a sample."""

    def __init__(self, path):
        self.path = path

    def on_train_batch_end(self, trainer, module, outputs, batch: dict, batch_idx: int) -> None:
        line = {"rank": trainer.global_rank, "batch": module.stream_position.batches - 1, "step": trainer.global_step,
                "keys": batch["keys"], "stream_index": batch["stream_index"].tolist()}
        if "sources" in batch:  # a mixture: each sample's source
            line["sources"] = batch["sources"]
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")


class PeriodicEval(L.Callback):
    """Every `every` optimizer steps: greedy answers to the first `limit` questions of an eval task (`python eval.py`'s
    task config node, `evaluate` in train.yaml) on the model in training, each run's files under
    `<out_dir>/step-<n>/` and its scores logged as `eval/overall`, `eval/<question or answer type>/<type>` at that
    step (so `checkpoint.best.monitor` may keep the best checkpoint by one of them)."""

    # vs logging through LightningModule.log alone: Lightning sends step metrics to the loggers only every
    # trainer.log_every_n_steps steps, which would drop an evaluation that falls between; they go to the loggers here.

    def __init__(self, eval_cfg, *, every: int, limit: int | None, out_dir):
        self.cfg, self.every, self.limit, self.out_dir = eval_cfg, every, limit, Path(out_dir)
        self.task = self.questions = None
        self.last_step = 0

    def on_fit_start(self, trainer, module) -> None:
        self.task = Task.from_config(self.cfg.task)
        root = None if self.cfg.data_root is None else to_absolute_path(self.cfg.data_root)
        self.questions = self.task.read(root)[: self.limit]

    def on_train_batch_end(self, trainer, module, outputs, batch: dict, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self.last_step or step % self.every:  # once per optimizer step (not per accumulated batch)
            return
        self.last_step = step
        model = module.model
        metrics = evaluate(model, Processor(model.cfg, model.tokenizer), self.questions, task=self.task,
                           batch_size=self.cfg.batch_size, out_dir=self.out_dir / f"step-{step:06d}",
                           max_new_tokens=self.cfg.max_new_tokens, progress=False, verbose=False)
        scores = eval_scores(metrics)
        for logger in trainer.loggers:
            logger.log_metrics(scores, step=step)
        for name, value in scores.items():  # for ModelCheckpoint(monitor=...) and the progress bar; not re-logged
            module.log(name, torch.tensor(value), on_step=True, on_epoch=False, logger=False)
        if trainer.is_global_zero:
            print(f"step {step}: eval {self.task.name} on {metrics['n']} questions, overall {metrics['overall']}")


def eval_scores(metrics: dict) -> dict[str, float]:
    """An evaluation's metrics (`vlm.eval.runner.summarise`) as flat scalars: eval/overall, eval/<key>/<type>."""
    scores = {"eval/overall": metrics["overall"]} if metrics["overall"] is not None else {}
    for key in ("question_type", "answer_type"):
        scores |= {f"eval/{key}/{t}": m["score"] for t, m in metrics.get(key, {}).items()}
    return scores
