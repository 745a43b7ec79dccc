"""Every Hydra config composes, and everything that can be built on this machine is instantiated (loggers write
into a temporary run folder, wandb offline; the SLURM launcher is built but submits nothing)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from vlm.config import VLMConfig
from vlm.data.synthetic import CorpusParams
from vlm.eval.metrics import METRICS
from vlm.eval.tasks import Task

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
options = lambda group: sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))
# Config groups whose every option a test below composes and instantiates ("." = train.yaml and eval.yaml).
TESTED_GROUPS = {".", "model", "model/vision", "model/lm", "model/resampler", "model/fusion", "model/tiling", "optim",
                 "schedule",
                 "experiment", "data", "trainer", "logger", "eval", "hydra/launcher"}


def test_every_config_group_is_tested():
    groups = {p.parent.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml")}
    assert groups <= TESTED_GROUPS, f"untested config groups: {sorted(groups - TESTED_GROUPS)}"


def _train(*overrides: str):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("override", [f"model={o}" for o in options("model")]
                         + [f"model/tiling={o}" for o in options("model/tiling")]
                         + [f"model/vision={o}" for o in options("model/vision")]
                         + [f"model/lm={o}" for o in options("model/lm")]
                         + [f"model/resampler={o}" for o in options("model/resampler")]
                         + [f"model/fusion={o}" for o in options("model/fusion")]
                         + [f"experiment={o}" for o in options("experiment")])
def test_model_configs_instantiate(override):
    cfg = _train(override)
    model_cfg = instantiate(cfg.model)
    assert isinstance(model_cfg, VLMConfig)
    assert VLMConfig.from_dict(model_cfg.to_dict()) == model_cfg  # what checkpoints store round-trips


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainer_configs(trainer, tmp_path):
    cfg = _train(f"trainer={trainer}", "logger=none")
    if cfg.trainer.accelerator == "cpu":
        t = instantiate(cfg.trainer, logger=False, default_root_dir=str(tmp_path))
        assert t.max_steps == cfg.trainer.max_steps
    else:  # GPU configs: composed and their strategy built here; the Trainer is built where a GPU exists
        strategy = cfg.trainer.get("strategy")
        if isinstance(strategy, str):
            assert strategy in StrategyRegistry
        elif strategy is not None:  # e.g. FSDPStrategy(sharding_strategy=..., use_orig_params=...)
            assert isinstance(instantiate(strategy), get_class(strategy._target_))


def test_training_switches_compose(tmp_path):
    """bf16 mixed precision, gradient checkpointing of the LLM and the (trained) vision tower, gradient accumulation
    and the checkpoint / logging settings in one command land in the model config and the Trainer (a fit with them
    together: tests/test_lit.py)."""
    cfg = _train("logger=none", "trainer.precision=bf16-mixed", "trainer.accumulate_grad_batches=4",
                 "model.lm.gradient_checkpointing=true", "model.vision.gradient_checkpointing=true",
                 "model.freeze.vision=false", "checkpoint.every_n_steps=50", "log_samples=true", "mfu_peak_tflops=989")
    model_cfg = instantiate(cfg.model)
    assert model_cfg.lm.gradient_checkpointing and model_cfg.vision.gradient_checkpointing
    assert not model_cfg.freeze.vision and VLMConfig.from_dict(model_cfg.to_dict()) == model_cfg
    trainer = instantiate(cfg.trainer, logger=False, default_root_dir=str(tmp_path))
    assert trainer.accumulate_grad_batches == 4 and trainer.precision == "bf16-mixed"
    assert (cfg.checkpoint.every_n_steps, cfg.log_samples, cfg.mfu_peak_tflops) == (50, True, 989)


@pytest.mark.parametrize("optim", options("optim"))
def test_optim_configs(optim):
    """An optimizer config is a partial over the parameter groups, as VLMLitModule calls it."""
    cfg = _train(f"optim={optim}")
    weight = torch.nn.Parameter(torch.zeros(2, 2))
    opt = instantiate(cfg.optim)([{"params": [weight]}, {"params": [], "weight_decay": 0.0}])
    assert isinstance(opt, torch.optim.Optimizer) and opt.defaults["lr"] == cfg.optim.lr
    assert opt.param_groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize("schedule", options("schedule"))
def test_schedule_configs(schedule):
    """A schedule config is a partial from (optimizer step, total) to the LR factor."""
    factor = instantiate(_train(f"schedule={schedule}").schedule)
    values = [factor(step, total=100) for step in range(100)]
    assert all(0 < v <= 1 for v in values) and max(values) == 1


@pytest.mark.parametrize("data", options("data"))
def test_data_configs(data):
    cfg = _train(f"data={data}")
    assert CorpusParams(**cfg.data.corpus).n_train > 0 and cfg.data.batch_size > 0


@pytest.mark.parametrize("logger", options("logger"))
def test_logger_configs(logger, tmp_path, monkeypatch):
    """Each logger as train.py builds it, inside a Hydra job whose run folder is tmp_path/run, writes a metric there
    (wandb offline; its own settings and caches under tmp_path/home)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "home"))
    cfg = _train(f"logger={logger}")
    if not cfg.get("logger"):  # logger=none
        return
    run_dir = tmp_path / "run"
    cfg.hydra.runtime.output_dir = str(run_dir)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # restored after the test
    HydraConfig.instance().set_config(cfg)  # what ${hydra:runtime.output_dir} reads
    logger = instantiate(cfg.logger)
    logger.log_metrics({"loss": 1.0}, step=0)
    logger.finalize("success")
    if hasattr(logger.experiment, "finish"):  # wandb: the run has a process of its own
        logger.experiment.finish()
    written = [f for f in run_dir.rglob("*") if f.is_file() and f.stat().st_size > 0]
    assert Path(logger.save_dir) == run_dir and written


@pytest.mark.parametrize("launcher", options("hydra/launcher"))
def test_launcher_configs_instantiate(launcher):
    cfg = _train(f"hydra/launcher={launcher}", "trainer=multinode")
    assert isinstance(instantiate(cfg.hydra.launcher), get_class(cfg.hydra.launcher._target_))  # submits nothing


def test_slurm_launcher_matches_lightnings_slurm_environment(monkeypatch):
    """The SLURM shape comes from the trainer config, and Lightning, in the last process srun starts for it, finds
    the world that config asks for (trainer.num_nodes x trainer.devices) and accepts the allocation."""
    cfg = _train("hydra/launcher=slurm", "trainer=multinode", "trainer.num_nodes=3", "trainer.devices=4")
    params = instantiate(cfg.hydra.launcher).params
    nodes, tasks = params["nodes"], params["tasks_per_node"]
    assert (nodes, tasks, params["gpus_per_node"]) == (3, 4, 4)
    srun = {"SLURM_JOB_NAME": params["name"], "SLURM_JOB_ID": "1", "SLURM_NODELIST": f"node[1-{nodes}]",
            "SLURM_NNODES": nodes, "SLURM_NTASKS_PER_NODE": tasks, "SLURM_NTASKS": nodes * tasks,
            "SLURM_PROCID": nodes * tasks - 1, "SLURM_NODEID": nodes - 1, "SLURM_LOCALID": tasks - 1}
    for var, value in srun.items():
        monkeypatch.setenv(var, str(value))
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)  # the trainer sets it to 11: restored after
    trainer = instantiate(cfg.trainer, accelerator="cpu", logger=False)  # the GPU config, on this machine's CPU
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert (trainer.world_size, trainer.global_rank, trainer.node_rank, trainer.local_rank) == (12, 11, 2, 3)
    trainer.strategy.cluster_environment.validate_settings(trainer.num_devices, trainer.num_nodes)
    with pytest.raises(ValueError, match="devices=2"):  # what a trainer that does not match gets
        trainer.strategy.cluster_environment.validate_settings(2, trainer.num_nodes)


@pytest.mark.parametrize("task", options("eval"))
def test_eval_configs(task):
    """Each task, as eval.py's `task=` and as train.py's eval_after task (`eval@evaluate.task=`)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_entry", CONFIGS.parent / "eval.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # registers configs/eval/*.yaml as `task`
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("eval", overrides=[f"task={task}"], return_hydra_config=True)
    train_cfg = _train(f"eval@evaluate.task={task}")
    assert Task.from_config(cfg.task) == Task.from_config(train_cfg.evaluate.task)
    assert Task.from_config(cfg.task).metric in METRICS
    eval_keys = {"task", "data_root", "limit", "batch_size", "num_workers", "max_new_tokens"}
    assert eval_keys <= set(cfg) and eval_keys <= set(train_cfg.evaluate)  # what evaluate_config reads


def test_no_tiles_forces_the_global_view_everywhere():
    from PIL import Image

    from vlm.processor import Processor
    from vlm.tokenizer import build_tokenizer

    model_cfg = instantiate(_train("experiment=no_tiles").model)
    proc = Processor(model_cfg, build_tokenizer(model_cfg.lm))
    sample = proc.encode("<image> hi", [Image.new("RGB", (2048, 1024))], ["high"])
    assert [p.detail for p in sample["plans"]] == ["low"] and sample["pixel_values"].shape[0] == 1
