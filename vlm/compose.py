"""Compose typed configs from the Hydra tree in `configs/` without a Hydra app (tests, notebooks, serve)."""

from __future__ import annotations

from pathlib import Path

from vlm.config import VLMConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def model_config(*overrides: str, model: str = "tiny") -> VLMConfig:
    """Hydra overrides in, typed config out: `model_config("model/llm=tiny_gpt2", "model.fusion.heads=4")`."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    if not CONFIG_DIR.is_dir():
        raise FileNotFoundError(f"config tree not found at {CONFIG_DIR}; run from a checkout of the repository")
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(overrides=[f"+model={model}", *overrides])
    return instantiate(cfg.model)
