"""Train a VLM. `python train.py` builds the synthetic corpus if missing, trains the tiny default on CPU and
saves `checkpoint.pt` in the run folder.

Thin Hydra entry point: compose the config, build the data stream and the LightningModule, fit, save.
A run folder that holds `checkpoints/last.ckpt` is resumed exactly where that checkpoint stopped:
`python train.py <the run's overrides> hydra.run.dir=<run folder>`.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate, to_absolute_path
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from vlm.checkpoint import LAST, config_changes, read_checkpoint, save_checkpoint, stream_position
from vlm.data.pipeline import ShardStream, StreamPosition, collate_stream
from vlm.data.synthetic import ensure_corpus
from vlm.eval.runner import evaluate_config
from vlm.lit import SampleLog, StepTokens, VLMLitModule
from vlm.processor import Processor
from vlm.vision_pretrain import VisionPretrainConfig, ensure_pretrained_vision

log = logging.getLogger(__name__)


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    start = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True)
    root = Path(to_absolute_path(cfg.data.root))
    ensure_corpus(root, **OmegaConf.to_container(cfg.data.corpus, resolve=True))
    model_cfg = instantiate(cfg.model)
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    run_dir = Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    resume = run_dir / LAST if (run_dir / LAST).exists() else None
    run_config = OmegaConf.to_container(cfg, resolve=True)
    every = cfg.checkpoint.every_n_steps  # optimizer steps
    callbacks = [ModelCheckpoint(run_dir / LAST.parent, every_n_train_steps=every, save_top_k=0, save_last=True,
                                 enable_version_counter=False)] if every else []
    if cfg.log_samples:
        callbacks.append(SampleLog(run_dir / "samples.jsonl"))
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks, enable_checkpointing=bool(every))
    module = VLMLitModule(model_cfg, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                          warmup_steps=cfg.optim.warmup_steps, max_steps=trainer.max_steps,
                          mfu_peak_tflops=cfg.mfu_peak_tflops, run_config=run_config)
    stage0 = None
    if cfg.get("vision_pretrain") is not None and not resume:  # a resumed run's checkpoint holds the pretrained weights
        stage0 = ensure_pretrained_vision(module.model, root, VisionPretrainConfig(**cfg.vision_pretrain), cfg.seed)
    proc = Processor(model_cfg, module.model.tokenizer)
    stream = ShardStream(root / "train", proc, seed=cfg.seed, epochs=None, shuffle_buffer=cfg.data.shuffle_buffer,
                         max_length=cfg.data.max_length, split=cfg.data.split, batch_size=cfg.data.batch_size)
    if resume:  # the stream continues at the exact next sample; Lightning restores the rest in fit
        stream.position = resume_position(resume, run_config, trainer)
    loader = torch.utils.data.DataLoader(
        stream, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
        collate_fn=functools.partial(collate_stream, pad_token_id=proc.tokenizer.pad_token_id),
        persistent_workers=cfg.data.num_workers > 0)
    if trainer.accumulate_grad_batches > 1:  # the loss is normalised by the label tokens of the whole step
        loader = StepTokens(loader, trainer.accumulate_grad_batches, module.model.num_label_tokens)
    fit_start = time.perf_counter()
    trainer.fit(module, loader, ckpt_path=resume)
    train_seconds = time.perf_counter() - fit_start
    path = run_dir / "checkpoint.pt"
    state = trainer.strategy.lightning_module_state_dict()  # every rank takes part: FSDP gathers to rank 0 here
    if trainer.is_global_zero:  # DDP ranks hold the same weights and share the run folder: one writes
        trained = {k.removeprefix("model."): v for k, v in module.checkpoint_weights(state).items()}
        save_checkpoint(path, module.model, state_dict=trained, steps=trainer.global_step, config=run_config)
        print(f"saved {path} after {trainer.global_step} steps")
    if cfg.eval_after:  # as `python eval.py checkpoint=<path>`, on the model in memory, into <run_dir>/eval/
        evaluate_config(cfg.evaluate, lambda: module.model.to(trainer.strategy.root_device), run_dir / "eval",
                        info={"checkpoint": str(path)})
    if trainer.is_global_zero:  # read by `python -m vlm.report`
        run = {"steps": trainer.global_step, "train_seconds": train_seconds, "vision_pretrain": stage0,
               "total_seconds": time.perf_counter() - start, "eval_after": cfg.eval_after,
               "overrides": list(hydra.core.hydra_config.HydraConfig.get().overrides.task)}
        (run_dir / "run.json").write_text(json.dumps(run, indent=2))


def resume_position(path: Path, run_config: dict, trainer: L.Trainer) -> StreamPosition:
    """This rank's data stream position in the training checkpoint `path`; says what is resumed, and warns when the
    run's config differs from the checkpoint's (an exact resume needs the same overrides)."""
    blob = read_checkpoint(path)
    changed = config_changes(blob["config"], run_config)
    if trainer.is_global_zero:
        log.info("resuming %s at step %d", path, blob["global_step"])
        if changed:
            log.warning("resuming with a config that differs from the checkpoint's in %s", changed)
    return stream_position(blob, trainer.global_rank, trainer.world_size)


if __name__ == "__main__":
    main()
