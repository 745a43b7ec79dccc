"""Weights I/O (vlm/checkpoint.py): checkpoints written before the `visual.` / `fusion.` names (format 1) still load,
as plain checkpoints, Lightning training checkpoints and stage-0 caches."""

from __future__ import annotations

import torch
from _tiny import build, mixed_batch

from vlm.checkpoint import FORMAT_VERSION, load_checkpoint, read_checkpoint, save_checkpoint, upgrade_state_dict

OLD_NAMES = {"visual.global_resampler.": "global_resampler.", "visual.tile_resampler.": "tile_resampler.",
             "visual.tile_queries": "tile_queries", "visual.view_embedding.": "view_embedding.",
             "fusion.blocks.": "xattn.blocks.", "learned_tokens.image": "media_marker",
             "fusion.proj.": "projector.proj."}


def _as_format_1(state: dict) -> dict:
    def old(key):
        for new, before in OLD_NAMES.items():
            if key.startswith(new):
                return before + key[len(new):]
        return key

    return {old(k): v for k, v in state.items()}


def test_format_1_checkpoints_load(tmp_path):
    for fusion in ("tiny_xattn", "prefix"):
        model, proc = build(f"model/fusion={fusion}")
        state = model.checkpoint_state_dict()
        old = _as_format_1(state)
        assert any(k.startswith(("xattn.", "projector.")) for k in old)
        assert not any(k.startswith(("visual.", "fusion.")) for k in old)
        assert upgrade_state_dict(old) == state
        assert upgrade_state_dict({f"model.{k}": v for k, v in old.items()}, "model.") == {
            f"model.{k}": v for k, v in state.items()}
        path = tmp_path / f"{fusion}.pt"
        torch.save({"model_config": model.cfg.to_dict(), "state_dict": old}, path)  # no format_version: 1
        batch = mixed_batch(proc, labels=False)
        with torch.no_grad():
            assert torch.equal(load_checkpoint(path).eval()(batch).logits, model.eval()(batch).logits)


def test_checkpoints_say_their_format(tmp_path):
    model, _ = build()
    blob = read_checkpoint(save_checkpoint(tmp_path / "c.pt", model, steps=3))
    assert blob["format_version"] == FORMAT_VERSION and blob["steps"] == 3
    assert blob["model_config"] == model.cfg.to_dict() and blob["state_dict"].keys() == model.checkpoint_state_dict(
        ).keys()
