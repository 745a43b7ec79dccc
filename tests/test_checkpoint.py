"""Weights I/O (vlm/checkpoint.py): checkpoints written before the `visual.` / `fusion.` names (format 1) still load,
as plain checkpoints, Lightning training checkpoints and stage-0 caches."""

from __future__ import annotations

import pytest
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


def test_init_from_loads_an_earlier_stage_and_refuses_another_model(tmp_path):
    """init_from (train.py `init_from=`): a stage-1 checkpoint's trained weights into a stage-2 model of the same
    encoder and LLM, whatever else the stage changes (here prefix -> xattn fusion: the resamplers and view
    embeddings carry over, the fusion starts fresh and the projector goes unused); another model is refused."""
    from vlm.checkpoint import init_from

    stage1, _ = build("model/fusion=prefix", seed=1)
    path = save_checkpoint(tmp_path / "stage1.pt", stage1)
    stage2, _ = build(seed=2)
    report = init_from(stage2, path)
    own = stage2.state_dict()
    for name, weight in stage1.checkpoint_state_dict().items():
        if name.startswith("visual."):
            assert torch.equal(own[name], weight), name
    assert report["loaded"] > 0 and report["unused"] and all(k.startswith("fusion.proj") for k in report["unused"])
    assert report["fresh"] and all(k.startswith(("fusion.", "learned_tokens.")) for k in report["fresh"])  # xattn's
    # a whole-model Lightning checkpoint reads the same
    lightning = {"pytorch-lightning_version": "2", "model_config": stage1.cfg.to_dict(),
                 "state_dict": {f"model.{k}": v for k, v in stage1.checkpoint_state_dict().items()}}
    torch.save(lightning, tmp_path / "last.ckpt")
    assert init_from(build(seed=3)[0], tmp_path / "last.ckpt")["loaded"] == report["loaded"]

    wider, _ = build("model.global_resampler.dim_head=16", seed=1)  # other attention widths
    torch.save({"model_config": stage1.cfg.to_dict(), "state_dict": wider.checkpoint_state_dict()},
               tmp_path / "wider.pt")
    with pytest.raises(ValueError, match="tensors differ in shape"):
        init_from(build(seed=2)[0], tmp_path / "wider.pt")
    other_lm = stage1.cfg.to_dict()
    other_lm["lm"]["hf_config"] = {**other_lm["lm"]["hf_config"], "num_hidden_layers": 3}
    torch.save({"model_config": other_lm, "state_dict": stage1.checkpoint_state_dict()}, tmp_path / "other_lm.pt")
    with pytest.raises(ValueError, match="trained on another lm"):
        init_from(build(seed=2)[0], tmp_path / "other_lm.pt")
