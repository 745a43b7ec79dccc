"""Checkpoints, read without Lightning: the plain `checkpoint.pt` a finished run writes (the resolved config plus
the trained weights), and the training checkpoints (`checkpoints/last.ckpt`) Lightning writes during a run, which
also hold the optimizer, LR scheduler and loop state and the data stream position of every rank."""

from __future__ import annotations

from pathlib import Path

import torch

from vlm.config import VLMConfig
from vlm.data.pipeline import StreamPosition
from vlm.model import VLM

LAST = Path("checkpoints") / "last.ckpt"  # the training checkpoint a run folder is resumed from


def save_checkpoint(path: str | Path, model: VLM, state_dict: dict | None = None, **extra) -> Path:
    """`extra` (the resolved run config, the step, ...) is stored beside the weights. `state_dict`: the trained
    weights when `model` does not hold them whole (FSDP shards: gathered by the caller); default: the model's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = model.checkpoint_state_dict() if state_dict is None else state_dict
    blob = {"model_config": model.cfg.to_dict(), "state_dict": weights, **extra}
    torch.save(blob, path)
    return path


def read_checkpoint(path: str | Path, map_location: str = "cpu") -> dict:
    return torch.load(Path(path), map_location=map_location, weights_only=False)


def trained_weights(blob: dict) -> dict[str, torch.Tensor]:
    """The trained weights of either format, keyed as in `VLM` (Lightning prefixes them with the module's
    attribute name, `model.`)."""
    if "pytorch-lightning_version" in blob:
        return {k.removeprefix("model."): v for k, v in blob["state_dict"].items()}
    return blob["state_dict"]


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> VLM:
    """Rebuild the model from the stored config (frozen parts from their source) and load the trained weights."""
    blob = read_checkpoint(path, map_location)
    model = VLM(VLMConfig.from_dict(blob["model_config"]))
    try:
        model.load_trainable_state_dict(trained_weights(blob))
    except KeyError as e:
        raise KeyError(f"{path}: {e.args[0]}") from e
    return model


def stream_position(blob: dict, rank: int = 0, world_size: int = 1) -> StreamPosition:
    """Where the data stream of `rank` stood when the training checkpoint was written."""
    states = blob["stream_position"]  # one per rank
    if len(states) != world_size:
        raise ValueError(f"the checkpoint holds the data positions of {len(states)} rank(s) but this run has "
                         f"{world_size}: resume with as many processes as the run had")
    return StreamPosition.from_state(states[rank])


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs."""
    changed = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed
