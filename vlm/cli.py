"""What the entry points (train.py, eval.py) share: the data a task needs, built before it is read (entry points build
the synthetic corpus and convert packaged datasets; the library never does it on its own)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def ensure_task_data(eval_cfg) -> None:
    """Build the synthetic corpus an eval task reads (`task.build_corpus`), under the eval config's data_root, from
    `data.corpus`, and convert what it names under `convert`; a no-op for every other task or when up to date."""
    ensure_converted(eval_cfg.task)
    if not eval_cfg.task.get("build_corpus"):
        return
    from hydra.utils import to_absolute_path

    from vlm.data.synthetic import ensure_corpus

    ensure_corpus(Path(to_absolute_path(eval_cfg.data_root)), **OmegaConf.to_container(eval_cfg.data.corpus,
                                                                                         resolve=True))


def ensure_converted(data_cfg) -> None:
    """Convert the datasets a data config names under `convert` ({dataset: {out, ...options}}) into shards, as
    `python data/convert.py <dataset> --out <out>` does: once (a finished conversion is a no-op, an interrupted one
    resumes). Only datasets whose files come with an installed package (easy_vqa) need no other argument."""
    from hydra.utils import to_absolute_path

    from vlm.data import convert

    for dataset, options in (data_cfg.get("convert") or {}).items():
        options = OmegaConf.to_container(options, resolve=True)
        out = Path(to_absolute_path(options.pop("out")))
        getattr(convert, f"convert_{dataset}")(out, progress=False, **options)
