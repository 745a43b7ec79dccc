"""Weights I/O, without Lightning and without the data pipeline: the plain `checkpoint.pt` a finished run writes (the
model config, the trained weights and the run's resolved config) and the weights inside the training checkpoints
(`checkpoints/last.ckpt`) Lightning writes during a run. What else a training checkpoint holds for a resume (the
optimizer, the data stream position) is read by `vlm.training`.

Format versions: 2 (today) names the parts as `VLM` does (`visual.*`, `fusion.*`, `learned_tokens.*`). Checkpoints
written before (no `format_version`) named them `global_resampler.*`, `tile_resampler.*`, `tile_queries`,
`view_embedding.*`, `xattn.blocks.*`, `media_marker` and `projector.proj.*`; `upgrade_state_dict` renames those keys
on load.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlm.config import VLMConfig
from vlm.model import VLM

FORMAT_VERSION = 2
LAST = Path("checkpoints") / "last.ckpt"  # the training checkpoint a run folder is resumed from
_RENAMED = (  # format 1 -> 2: (old prefix, new prefix)
    ("global_resampler.", "visual.global_resampler."), ("tile_resampler.", "visual.tile_resampler."),
    ("tile_queries", "visual.tile_queries"), ("view_embedding.", "visual.view_embedding."),
    ("xattn.blocks.", "fusion.blocks."), ("media_marker", "learned_tokens.image"), ("projector.", "fusion."),
)


def upgrade_state_dict(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Keys of a format-1 state dict (after `prefix`, e.g. Lightning's "model.") renamed to today's; today's keys
    pass unchanged."""
    def rename(key: str) -> str:
        inner = key.removeprefix(prefix)
        for old, new in _RENAMED:
            if inner.startswith(old) and not inner.startswith(new):
                return prefix + new + inner[len(old):]
        return key

    return {rename(k): v for k, v in state.items()}


def save_checkpoint(path: str | Path, model: VLM, state_dict: dict | None = None, **extra) -> Path:
    """`extra` (the resolved run config, the step, ...) is stored beside the weights. `state_dict`: the trained
    weights when `model` does not hold them whole (FSDP shards: gathered by the caller); default: the model's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = model.checkpoint_state_dict() if state_dict is None else state_dict
    blob = {"format_version": FORMAT_VERSION, "model_config": model.cfg.to_dict(), "state_dict": weights, **extra}
    torch.save(blob, path)
    return path


def read_checkpoint(path: str | Path, map_location: str = "cpu") -> dict:
    return torch.load(Path(path), map_location=map_location, weights_only=False)


def trained_weights(blob: dict) -> dict[str, torch.Tensor]:
    """The trained weights of either format, keyed as in `VLM` (Lightning prefixes them with the module's
    attribute name, `model.`), format-1 keys renamed."""
    if "pytorch-lightning_version" in blob:
        return upgrade_state_dict({k.removeprefix("model."): v for k, v in blob["state_dict"].items()})
    return upgrade_state_dict(blob["state_dict"])


def load_checkpoint(path: str | Path, map_location: str = "cpu", *, inference: bool = False) -> VLM:
    """Rebuild the model from the stored config (frozen parts from their source) and load the trained weights.
    `inference` (eval.py, the server): LoRA adapters are merged into the LLM where its config says so
    (`lm.lora.merge_for_inference`)."""
    blob = read_checkpoint(path, map_location)
    model = VLM(VLMConfig.from_dict(blob["model_config"]))
    try:
        model.load_trainable_state_dict(trained_weights(blob))
    except KeyError as e:
        raise KeyError(f"{path}: {e.args[0]}") from e
    lora = model.cfg.lm.lora
    if inference and lora is not None and lora.merge_for_inference:
        model.lm.merge_adapters()
    return model


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


def init_from(model: VLM, path: str | Path) -> dict:
    """Start a run from an earlier run's trained weights (a recipe's stage 2 from its stage 1): every tensor of the
    checkpoint (`checkpoint.pt` or a training `last.ckpt`) that this model has is loaded; only weights are read, so
    the optimizer, schedule and data position start fresh. Returns what was loaded, what the checkpoint held that
    this model lacks (`unused`) and which of this model's trained weights start from their init (`fresh`).
    Refused before any step when the checkpoint is of another model: another encoder or LLM, a tensor of another
    shape, or none of this model's weights."""
    blob = read_checkpoint(path)
    weights = trained_weights(blob)
    theirs = blob.get("model_config") or {}
    for part in ("vision", "lm"):  # the frozen parts its trained weights were fitted to
        old, new = theirs.get(part, {}), model.cfg.to_dict()[part]
        keys = ("name", "hf_config") if part == "lm" else ("name", "feature_layer", "hf_config")
        if old and any(old.get(k) != new.get(k) for k in keys):
            raise ValueError(f"init_from={path}: trained on another {part} "
                             f"({ {k: old.get(k) for k in keys} } != { {k: new.get(k) for k in keys} })")
    own = model.state_dict()
    differ = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in weights.items()
              if k in own and own[k].shape != v.shape]
    if differ:
        raise ValueError(f"init_from={path}: a checkpoint of another model, {len(differ)} tensors differ in shape "
                         f"(checkpoint vs this model): {'; '.join(differ[:3])}")
    loaded = {k: v for k, v in weights.items() if k in own}
    if not loaded:
        raise ValueError(f"init_from={path}: none of its {len(weights)} tensors is a weight of this model")
    model.load_state_dict(loaded, strict=False)
    return {"checkpoint": str(path), "loaded": len(loaded), "unused": sorted(set(weights) - set(own)),
            "fresh": sorted(set(model.checkpoint_state_dict()) - set(loaded))}
