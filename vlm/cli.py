"""What the entry points (train.py, eval.py) share: the data a task needs, built before it is read (entry points build
the synthetic corpus; the library never does it on its own)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def ensure_task_data(eval_cfg) -> None:
    """Build the synthetic corpus an eval task reads (`task.build_corpus`), under the eval config's data_root, from
    `data.corpus`; a no-op for every other task or when it is up to date."""
    if not eval_cfg.task.get("build_corpus"):
        return
    from hydra.utils import to_absolute_path

    from vlm.data.synthetic import ensure_corpus

    ensure_corpus(Path(to_absolute_path(eval_cfg.data_root)), **OmegaConf.to_container(eval_cfg.data.corpus,
                                                                                         resolve=True))
