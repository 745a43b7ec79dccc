"""Fusion (vlm/fusion.py): gated cross-attention at closed gates is the frozen LLM, media masking, the placeholder
checks, the media K/V cache, and nothing kept in a module between LM calls."""

from __future__ import annotations

import pytest
import torch
from _tiny import CLOSED_GATES, LMS, build, mixed_batch, open_gates, photo

from vlm.fusion import (
    KEY_GLOBAL,
    KEY_TILE,
    KEY_TILE_CLASS,
    CrossAttentionFusion,
    PrefixFusion,
    fusion_class,
    token_kinds,
)
from vlm.processor import collate
from vlm.tiling import plan_tiles


@pytest.mark.parametrize("lm", LMS)
def test_zero_gates_equal_frozen_llm(lm):
    model, proc = build(CLOSED_GATES, f"model/lm={lm}")
    model.eval()
    batch = mixed_batch(proc, labels=False)
    with torch.no_grad():
        ours = model(batch).logits  # (B, T, W), media flowing through every cross-attention block
        embeds, media = model.prepare_inputs(batch)
        assert media is not None and media.media.abs().sum() > 0
        ref = model.lm.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                             position_ids=(batch["attention_mask"].cumsum(1) - 1).clamp(min=0)).logits
        assert torch.equal(ours, ref)
        # text only: the VLM is exactly the HF model on the same token ids
        text = collate([proc.encode("plain text, no images")], pad_token_id=proc.tokenizer.pad_token_id)
        assert torch.equal(model(text).logits, model.lm.model(input_ids=text["input_ids"]).logits)


def test_nonzero_gates_change_logits():
    model, proc = build(CLOSED_GATES)
    model.eval()
    batch = mixed_batch(proc, labels=False)
    with torch.no_grad():
        before = model(batch).logits
        open_gates(model, 1.0)
        after = model(batch).logits
    assert not torch.equal(before[0], after[0])  # sample 0 has an image
    assert torch.equal(before[2], after[2])  # sample 2 has none: the FFW gate is still 0


IDEFICS_BLOCK = ("++model.fusion.block=idefics", "++model.fusion.qk_norm=true", "++model.fusion.gate_shape=vector",
                 "++model.fusion.ff_activation=silu", "++model.fusion.ff_hidden=40", "++model.fusion.norm_eps=1e-6")


@pytest.mark.parametrize("passthrough", [True, False])
def test_idefics_block_layout(passthrough):
    """The IDEFICS layout (`fusion.block=idefics`, what `from_hf` builds for IdeficsForVisionText2Text; parity in
    tests/test_hf_import.py) from a config: its parts, the frozen LLM at closed gates, and the two ways text before any
    image is treated: IDEFICS's (attention zeroed, the gated MLP runs: passthrough false) or left untouched."""
    model, proc = build(CLOSED_GATES, *IDEFICS_BLOCK, f"++model.fusion.text_only_passthrough={passthrough}")
    block = model.fusion.blocks[0]
    assert isinstance(block.norm, torch.nn.RMSNorm) and block.q_norm is not None
    assert block.ff.gate_proj.out_features == 40
    assert block.attn_gate.shape == (model.lm.hidden_size,)  # one gate per channel
    model.eval()
    batch = mixed_batch(proc, labels=False)
    with torch.no_grad():
        closed = model(batch).logits  # (B, T, W)
        text = collate([proc.encode("plain text, no images")], pad_token_id=proc.tokenizer.pad_token_id)
        assert torch.equal(model(text).logits, model.lm.model(input_ids=text["input_ids"]).logits)
        for b in model.fusion.blocks:
            b.attn_gate.data.normal_()
            b.ff_gate.data.normal_()
        opened = model(batch).logits  # (B, T, W)
    assert not torch.equal(closed[0], opened[0])  # sample 0 has an image
    assert torch.equal(closed[2], opened[2]) == passthrough  # sample 2 has none: only the MLP can reach it
    model.train()
    model(mixed_batch(proc)).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())


@pytest.mark.parametrize("only_immediate", [True, False])
def test_media_masking(only_immediate):
    """Cross-attention sees only the latest preceding image (or all preceding ones); text before any image
    sees none. Checked on the first block's output: later layers mix images in through self-attention."""
    model, proc = build(CLOSED_GATES, f"model.fusion.only_immediate={only_immediate}")
    model.eval()
    open_gates(model, 1.0)
    seen = []
    model.fusion.blocks[0].register_forward_hook(lambda mod, args, out: seen.append(out[0]))
    text = "before <image> middle text <image> after"
    ids_a = proc.encode(text, [photo(300, 300), photo(400, 300, 1)], details=["low", "low"])
    ids_b = proc.encode(text, [photo(300, 300, 2), photo(400, 300, 1)], details=["low", "low"])  # image 1 differs
    pad = proc.tokenizer.pad_token_id
    with torch.no_grad():
        logits = model(collate([ids_a], pad_token_id=pad)).logits
        model(collate([ids_b], pad_token_id=pad))
    la, lb = seen  # (T, Dl) each: hidden states right after the first cross-attention block
    first, second = (ids_a["input_ids"] == proc.image_token_id).nonzero()[:, 0].tolist()
    assert torch.isfinite(logits).all()
    assert torch.equal(la[:first], lb[:first])  # before any image: untouched
    assert not torch.allclose(la[first:second], lb[first:second])  # sees image 1
    after_same = torch.equal(la[second:], lb[second:])
    assert after_same == only_immediate  # after image 2, image 1 is visible only with only_immediate=False


@pytest.mark.parametrize("fusion", ["tiny_xattn", "prefix"])
def test_placeholder_mismatch_names_both_counts(fusion):
    model, proc = build(f"model/fusion={fusion}")
    batch = mixed_batch(proc, labels=False)
    batch["input_ids"] = batch["input_ids"].clone()
    first = (batch["input_ids"][0] == proc.image_token_id).nonzero()[0, 0]
    batch["input_ids"][0, first] = proc.tokenizer.pad_token_id  # one placeholder too few in sample 0
    with pytest.raises(ValueError, match="disagree") as err:
        model(batch)
    msg = str(err.value)
    want = 65 + 129 * plan_tiles(1024, 700).num_tiles if fusion == "prefix" else 1
    assert f"[{want - 1}]" in msg and f"[{want}]" in msg, msg
    assert all(name in msg for name in fusion_class(model.cfg.fusion.kind).count_names)


def test_placeholders_per_kind():
    assert CrossAttentionFusion.placeholders(581) == 1 and PrefixFusion.placeholders(581) == 581
    tokens = torch.tensor([65, 581])
    assert CrossAttentionFusion.placeholders(tokens).tolist() == [1, 1]
    assert PrefixFusion.placeholders(tokens).tolist() == [65, 581]
    with pytest.raises(ValueError, match="fusion.kind"):
        fusion_class("late")


def test_generation_reuses_media_kv():
    """The media keys/values are projected once per request (prefill) and reused at every decode step."""
    model, proc = build()
    model.eval()
    calls = []
    for block in model.fusion.blocks:
        block.to_kv.register_forward_hook(lambda *a: calls.append(1))
    batch = mixed_batch(proc, padding_side="left", labels=False)
    model.generate(batch, max_new_tokens=6, eos_token_id=-1)
    assert len(calls) == len(model.fusion.blocks)  # once per block, not once per step
    calls.clear()
    model.generate(batch, max_new_tokens=6, eos_token_id=-1, use_cache=False)
    assert len(calls) == 6 * len(model.fusion.blocks)


def _held(module: torch.nn.Module) -> list[str]:
    """What a module tree holds beyond its weights: tensor attributes (outside parameters and buffers), call wrappers
    (an instance `forward`) and hooks, by the submodule's name."""
    found = []
    for name, m in module.named_modules():
        for attr, value in vars(m).items():
            if torch.is_tensor(value) and not isinstance(value, torch.nn.Parameter):
                found.append(f"{name}.{attr}")
        if "forward" in vars(m):
            found.append(f"{name}.forward")
        if m._forward_pre_hooks or m._forward_hooks:
            found.append(f"{name}.hooks")
    return found


@pytest.mark.parametrize("fusion", ["tiny_xattn", "prefix"])
def test_nothing_is_kept_between_calls(fusion):
    """Media reach the decoder layers through functions bound to one LM call: after a forward, a generation, and a
    call that fails inside the LM, the model holds exactly what it held before (open_flamingo keeps the vision
    features in its layers between calls); our own modules hold no tensor outside their weights at all."""
    model, proc = build(f"model/fusion={fusion}")
    before = _held(model)
    assert not [h for h in before if h.startswith(("fusion", "visual", "lm.layers"))], before
    batch = mixed_batch(proc, padding_side="left", labels=False)
    during = []
    hook = model.lm.layers[0].mlp.register_forward_pre_hook(lambda m, a: during.append(_held(model.lm.layers[1])))
    model(batch)
    model.generate(batch, max_new_tokens=3)
    hook.remove()
    # during the call, the next layer runs its bound cross-attention first (prefix: nothing to bind)
    assert during and all(d == ([".forward"] if fusion == "tiny_xattn" else []) for d in during), during
    assert _held(model) == before

    def fail(module, args):
        raise RuntimeError("boom")

    hook = model.lm.layers[1].mlp.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        model(batch)
    hook.remove()
    assert _held(model) == before


def test_routed_heads_split_the_views():
    """fusion.global_heads / tile_class_heads: the first heads attend only to the global view's tokens, the next only
    to the tiles' class tokens, the rest to every tile token; an image without tiles shows its global view to every
    head. Checked on the token kinds, the mask and one block's output."""
    assert token_kinds(torch.tensor([False, True, True]), torch.tensor([3, 2, 2])).tolist() == [
        KEY_GLOBAL] * 3 + [KEY_TILE_CLASS, KEY_TILE] * 2
    # tiny_xattn has 2 heads: head 0 global, head 1 tiles; then 4 heads: global, tile class, 2 x all tile tokens
    model, proc = build("++model.fusion.global_heads=1")
    model.eval()
    batch = mixed_batch(proc, labels=False)
    with torch.no_grad():
        embeds, media = model.prepare_inputs(batch)
    mask, has_media = media.attention_mask(media.text_time)  # (B, H, T, K), (B, T, 1)
    assert mask.shape[1] == 2
    tile, real = media.key_kind != KEY_GLOBAL, media.key_image > 0  # (B, K)
    after = has_media[0, :, 0]  # sample 0: one high-detail image with tiles
    assert torch.equal(mask[0, 0, after], (~tile[0] & real[0]).expand(int(after.sum()), -1))
    assert torch.equal(mask[0, 1, after], (tile[0] & real[0]).expand(int(after.sum()), -1))
    # sample 1: a low-detail image, then a high one (only_immediate): after the first, both heads see its 65 tokens
    first = (media.text_time[1] == 1) & has_media[1, :, 0]
    assert torch.equal(mask[1, 0, first], mask[1, 1, first])
    assert int(mask[1, 0, first][0].sum()) == 65
    # head 1 silenced at the output: the block no longer depends on any tile token
    block = model.fusion.blocks[0]
    d = model.cfg.fusion.dim_head
    with torch.no_grad():
        block.to_out.weight[:, d:] = 0
        block.attn_gate.fill_(1.0)
        noisy = media.media.clone()
        noisy[tile] = torch.randn_like(noisy[tile])
        x = torch.randn(*batch["input_ids"].shape, model.lm.hidden_size)
        outs = [block(x, block.media_kv(m), mask, has_media) for m in (media.media, noisy)]
    assert torch.equal(outs[0], outs[1])

    model, proc = build("++model.fusion.heads=4", "++model.fusion.global_heads=1", "++model.fusion.tile_class_heads=1")
    with torch.no_grad():
        _, media = model.prepare_inputs(mixed_batch(proc, labels=False))
    mask, has_media = media.attention_mask(media.text_time)
    rows = mask[0][:, has_media[0, :, 0]][:, 0]  # (H, K) what each head sees from sample 0's last tokens
    kinds = media.key_kind[0][rows.any(0)]
    assert set(kinds[rows[0][rows.any(0)]].tolist()) == {KEY_GLOBAL}
    assert set(kinds[rows[1][rows.any(0)]].tolist()) == {KEY_TILE_CLASS}
    assert int(rows[1].sum()) == plan_tiles(1024, 700).num_tiles  # one class token per tile
    assert set(kinds[rows[2][rows.any(0)]].tolist()) == set(kinds[rows[3][rows.any(0)]].tolist()) == {
        KEY_TILE_CLASS, KEY_TILE}
    with pytest.raises(ValueError, match="global_heads"):
        build("++model.fusion.global_heads=1", "++model.fusion.tile_class_heads=1")  # 2 heads: none left for tiles
