"""Train a VLM. `python train.py` builds the synthetic corpus if missing where the data config (`data.build_corpus`) or
stage 0 reads it, converts the packaged datasets the data config mixes in (`data.convert`), trains the
embedded default (the real frozen pair: configs/model/pair.yaml) on CPU and saves `checkpoint.pt` in the run folder.

Thin Hydra entry point: compose the config, instantiate what it names (model config, optimizer and schedule
partials, trainer, logger, data stream), fit, save. A run folder that holds `checkpoints/last.ckpt` is resumed
exactly where that checkpoint stopped: `python train.py <the run's overrides> hydra.run.dir=<run folder>`.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate, to_absolute_path
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from vlm.checkpoint import init_from, save_checkpoint
from vlm.cli import ensure_converted, ensure_task_data
from vlm.data.synthetic import ensure_corpus
from vlm.eval.runner import evaluate_config
from vlm.lit import VLMLitModule, quiet_lightning
from vlm.training import (
    resume_checkpoint,
    resume_position,
    run_callbacks,
    run_loader,
    run_val_loader,
    write_run_summary,
)
from vlm.vision_pretrain import VisionPretrainConfig, ensure_pretrained_vision


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    start = time.perf_counter()
    quiet_lightning()
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.get("stage1") is not None:  # BLIP-2 stage 1: the Q-Former alone, no LLM (vlm/blip2_stage1.py)
        return run_blip2_stage1(cfg, run_dir)
    callbacks = run_callbacks(cfg, run_dir)  # first: a checkpoint.best the run cannot log fails here
    root = Path(to_absolute_path(cfg.data.root))
    if cfg.data.get("build_corpus") or cfg.get("vision_pretrain") is not None:  # entry points build the corpus
        ensure_corpus(root, **OmegaConf.to_container(cfg.data.corpus, resolve=True))  # (stage 0 reads it too)
    ensure_converted(cfg.data)  # and the packaged datasets it mixes in (data.convert)
    if cfg.eval_after or cfg.get("eval_every"):  # and what the evaluations read
        ensure_task_data(cfg.evaluate)
    resume = resume_checkpoint(run_dir)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks,
                          enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks))
    module = VLMLitModule(instantiate(cfg.model), optimizer=instantiate(cfg.optim), schedule=instantiate(cfg.schedule),
                          max_steps=trainer.max_steps, mfu_peak_tflops=cfg.mfu_peak_tflops, run_config=run_config,
                          gate_lr_scale=cfg.get("gate_lr_scale", 1.0))
    loaded = None
    if cfg.get("init_from") and not resume:  # a later stage of a recipe: the trained weights of an earlier run
        loaded = init_from(module.model, to_absolute_path(cfg.init_from))
        print(f"init_from {loaded['checkpoint']}: loaded {loaded['loaded']} tensors; not in this model: "
              f"{len(loaded['unused'])} {loaded['unused'][:5]}; starting from their init: {len(loaded['fresh'])} "
              f"{loaded['fresh'][:5]}")
    stage0 = None
    if cfg.get("vision_pretrain") is not None and not resume:  # a resumed run's checkpoint holds the pretrained weights
        stage0 = ensure_pretrained_vision(module.model, root, VisionPretrainConfig(**cfg.vision_pretrain), cfg.seed)
    position = resume_position(resume, run_config, trainer) if resume else None  # Lightning restores the rest
    loader = run_loader(cfg.data, module, trainer, seed=cfg.seed, position=position)
    fit_start = time.perf_counter()
    trainer.fit(module, loader, run_val_loader(cfg.data, module), ckpt_path=resume)
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
    if trainer.is_global_zero:
        write_run_summary(run_dir, steps=trainer.global_step, train_seconds=train_seconds, vision_pretrain=stage0,
                          init_from=loaded,
                          total_seconds=time.perf_counter() - start, eval_after=cfg.eval_after,
                          overrides=list(HydraConfig.get().overrides.task))


def run_blip2_stage1(cfg: DictConfig, run_dir: Path) -> None:
    from vlm.blip2 import Stage1Config
    from vlm.blip2_stage1 import Stage1RunConfig, train_stage1

    if cfg.data.get("build_corpus"):
        ensure_corpus(Path(to_absolute_path(cfg.data.root)), **OmegaConf.to_container(cfg.data.corpus, resolve=True))
    ensure_converted(cfg.data)
    ensure_converted(cfg.stage1)  # the held-out pairs' own conversion, if any (stage1.convert)
    options = OmegaConf.to_container(cfg.stage1, resolve=True)
    options.pop("convert", None)
    heads = Stage1Config(**options.pop("heads", {}))
    train_stage1(instantiate(cfg.model), Stage1RunConfig(**options, heads=heads), cfg.data.train, run_dir,
                 run_config=OmegaConf.to_container(cfg, resolve=True))


if __name__ == "__main__":
    main()
