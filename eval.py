"""Evaluate a trained VLM on a benchmark in its official format.

    python eval.py                                   # the newest run under outputs/ on the synthetic test split
    python eval.py task=docvqa checkpoint=outputs/<run>/checkpoint.pt data_root=/data/docvqa limit=500

Thin Hydra entry point: `task` picks `configs/eval/<task>.yaml` (reader, paths relative to data_root, prompt,
metric), `vlm.eval.runner.evaluate_config` does the rest (batched greedy generation with left padding, official
metric, a table per question type, `metrics.json` + `predictions.jsonl` (+ `submission.json`) in the eval run's
folder).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from vlm.checkpoint import load_checkpoint
from vlm.cli import ensure_task_data
from vlm.eval.runner import evaluate_config
from vlm.eval.tasks import TASK_DIR


def register_tasks() -> None:
    """Every configs/eval/<name>.yaml becomes option <name> of the config group `task`."""
    for path in sorted(TASK_DIR.glob("*.yaml")):
        ConfigStore.instance().store(group="task", name=path.stem, node=OmegaConf.load(path))


def latest_checkpoint(run_root: str) -> Path:
    runs = sorted(Path(to_absolute_path(run_root)).glob("*/checkpoint.pt"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise FileNotFoundError(f"no checkpoint.pt under {run_root}/*/: run `python train.py` first")
    return runs[-1]


register_tasks()


@hydra.main(config_path="configs", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    path = Path(to_absolute_path(cfg.checkpoint)) if cfg.checkpoint else latest_checkpoint(cfg.run_root)
    print(f"checkpoint: {path}")
    out_dir = Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    ensure_task_data(cfg)  # the synthetic task's corpus, built if missing
    evaluate_config(cfg, lambda: load_checkpoint(path, inference=True).eval(), out_dir, info={"checkpoint": str(path)})


if __name__ == "__main__":
    main()
