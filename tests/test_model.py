"""The composed VLM: frozen-LLM equivalence at zero gates, freezing, media masking, padding, generation."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.compose import model_config
from vlm.model import VLM
from vlm.processor import Processor, collate
from vlm.tiling import plan_tiles, visual_tokens

LMS = ["tiny_llama", "tiny_qwen2", "tiny_opt", "tiny_gpt2"]


@functools.cache
def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    from skimage import data

    base = [data.astronaut(), data.coffee(), data.chelsea()][seed % 3]
    return Image.fromarray(base).resize((w, h), Image.BICUBIC)


def build(*overrides: str) -> tuple[VLM, Processor]:
    """A tiny VLM with Flamingo's closed gates (the tiny training default opens them: configs/model/fusion)."""
    torch.manual_seed(0)
    cfg = model_config("++model.fusion.gate_init=0.0", *overrides)
    model = VLM(cfg)
    return model, Processor(cfg, model.tokenizer)


def mixed_batch(proc: Processor, padding_side: str = "right", labels: bool = True) -> dict:
    """Several images per sample, different tile counts and details in one batch, and a text-only sample."""
    samples = [
        proc.encode("<image>What is written in the corner? A cat.", [_photo(1024, 700)]),
        proc.encode("First <image> then <image> compare them.", [_photo(300, 200, 1), _photo(800, 1200, 2)],
                    details=["low", "high"]),
        proc.encode("no image here at all"),
    ]
    if labels:
        for s in samples:
            s["labels"] = s["input_ids"].clone()
    return collate(samples, pad_token_id=proc.tokenizer.pad_token_id, padding_side=padding_side)


@pytest.mark.parametrize("lm", LMS)
def test_zero_gates_equal_frozen_llm(lm):
    model, proc = build(f"model/llm={lm}")
    model.eval()
    batch = mixed_batch(proc, labels=False)
    with torch.no_grad():
        ours = model(batch).logits  # (B, T, W), media flowing through every cross-attention block
        embeds, state = model.prepare_inputs(batch)
        assert state is not None and state.media.abs().sum() > 0
        ref = model.lm.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                             position_ids=(batch["attention_mask"].cumsum(1) - 1).clamp(min=0)).logits
        assert torch.equal(ours, ref)
        # text only: the VLM is exactly the HF model on the same token ids
        text = collate([proc.encode("plain text, no images")], pad_token_id=proc.tokenizer.pad_token_id)
        assert torch.equal(model(text).logits, model.lm.model(input_ids=text["input_ids"]).logits)


def test_nonzero_gates_change_logits():
    model, proc = build()
    model.eval()
    batch = mixed_batch(proc, labels=False)
    with torch.no_grad():
        before = model(batch).logits
        for block in model.xattn.blocks:
            block.attn_gate.data.fill_(1.0)
        after = model(batch).logits
    assert not torch.equal(before[0], after[0])  # sample 0 has an image
    assert torch.equal(before[2], after[2])  # sample 2 has none: the FFW gate is still 0


@pytest.mark.parametrize("overrides", [[], ["model/fusion=prefix_tiny", "model/resampler=qformer_tiny"],
                                       ["model.share_resamplers=true"]])
def test_optimizer_step_moves_only_trainable(overrides):
    model, proc = build(*overrides)
    model.train()
    assert not model.vision.training and not model.lm.training  # frozen parts stay in eval mode
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and frozen
    assert all(n.startswith(("vision.", "lm.")) for n in frozen)
    assert not any(n.startswith(("vision.", "lm.")) for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    batch = mixed_batch(proc)
    # Two steps: with tanh gates at 0 the first step can move only the gates (Flamingo's init), the second
    # moves the cross-attention projections too.
    for _ in range(2):
        opt.zero_grad()
        model(batch).loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
        opt.step()
    params = dict(model.named_parameters())
    for n, before in frozen.items():
        assert torch.equal(params[n], before), f"frozen {n} changed"
    unchanged = [n for n, before in trainable.items() if torch.equal(params[n], before)]
    assert not unchanged, f"trainable parameters did not change: {unchanged}"
    # checkpoints hold the trained weights and the frozen parts built without weights (here: all of them)
    assert model.unsourced_parts() == ("vision.", "lm.")
    assert set(model.checkpoint_state_dict()) == set(trainable) | set(frozen)


@pytest.mark.parametrize("overrides", [(), ("model/vision=tiny_resnet", "model.freeze.vision=false")],
                         ids=["frozen_vit", "trained_resnet"])
def test_checkpoint_round_trip_rebuilds_the_same_model(tmp_path, overrides):
    """save_checkpoint -> load_checkpoint in a differently seeded process state gives the same logits: frozen parts
    built without weights (the tiny ViT and LLM) travel in the checkpoint, since no source can rebuild them, and so
    do the buffers of trained modules (a trained ResNet's BatchNorm running statistics)."""
    from vlm.checkpoint import load_checkpoint, save_checkpoint

    model, proc = build(*overrides)
    with torch.no_grad():
        for p in model.xattn.parameters():  # open the gates so the image path shows in the logits
            p.add_(0.5)
    batch = mixed_batch(proc, labels=False)
    with torch.no_grad():
        model.train()(batch)  # moves BatchNorm running statistics away from their init
    if overrides:
        assert any(k.endswith("running_mean") for k in model.checkpoint_state_dict())
    path = save_checkpoint(tmp_path / "c.pt", model.eval())
    torch.manual_seed(1234)  # a different random init for everything the checkpoint would not hold
    loaded = load_checkpoint(path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, model(batch).logits)


def test_freezing_is_configurable():
    model, _ = build("model.freeze.llm=false")
    assert all(p.requires_grad for p in model.lm.parameters())
    assert not any(p.requires_grad for p in model.vision.parameters())
    model.train()
    assert model.lm.training and not model.vision.training


@pytest.mark.parametrize("only_immediate", [True, False])
def test_media_masking(only_immediate):
    """Cross-attention sees only the latest preceding image (or all preceding ones); text before any image
    sees none. Checked on the first block's output: later layers mix images in through self-attention."""
    model, proc = build(f"model.fusion.only_immediate={only_immediate}")
    model.eval()
    for block in model.xattn.blocks:
        block.attn_gate.data.fill_(1.0)
    seen = []
    model.xattn.blocks[0].register_forward_hook(lambda mod, args, out: seen.append(out[0]))
    text = "before <image> middle text <image> after"
    ids_a = proc.encode(text, [_photo(300, 300), _photo(400, 300, 1)], details=["low", "low"])
    ids_b = proc.encode(text, [_photo(300, 300, 2), _photo(400, 300, 1)], details=["low", "low"])  # image 1 differs
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


@pytest.mark.parametrize("vision", ["tiny_vit", "tiny_resnet"])
def test_padded_pixels_are_never_seen(vision):
    """Changing the padding of partial tiles (outside the masks) leaves the output unchanged, also for a convnet
    that encodes the views resized (tiny_resnet: 512 px views at 256 px)."""
    model, proc = build(f"model/vision={vision}")
    model.eval()
    for block in model.xattn.blocks:
        block.attn_gate.data.fill_(1.0)
    sample = proc.encode("<image> describe", [_photo(1920, 1080)])  # 1365x768: partial right and bottom tiles
    batch = collate([sample], pad_token_id=proc.tokenizer.pad_token_id)
    assert not batch["pixel_mask"].all()
    noisy = dict(batch)
    noise = torch.randint(0, 256, batch["pixel_values"].shape, dtype=torch.uint8)
    noisy["pixel_values"] = torch.where(batch["pixel_mask"][:, None], batch["pixel_values"], noise)
    with torch.no_grad():
        assert torch.allclose(model(batch).logits, model(noisy).logits, atol=1e-5, rtol=0)


def test_uint8_views_resize_like_float_ones():
    """The encoder's CPU fast path (resize the uint8 views, then normalise) agrees with normalising and masking
    first (the path float views take) to within rounding (torch's fixed-point uint8 kernel: at most 1.5 levels, 0.3 on
    average), with the same masks and the padding exactly 0."""
    model, proc = build("model/vision=tiny_resnet")  # encodes the 512 px views at 256 px
    sample = proc.encode("<image> describe", [_photo(1920, 1080)])  # partial right and bottom tiles
    batch = collate([sample], pad_token_id=proc.tokenizer.pad_token_id)
    pixels, mask = batch["pixel_values"], batch["pixel_mask"]
    assert pixels.dtype == torch.uint8 and not mask.all() and mask.flatten(1).all(1).any()
    small = lambda p: model.vision.resize_views(p, mask)  # (V, 3, 256, 256), (V, 256, 256)
    (fast, fast_mask), (slow, slow_mask) = small(pixels), small(pixels.float() / 255)
    assert fast.dtype == torch.uint8
    fast, slow = (model.vision.normalize(x).masked_fill(~fast_mask[:, None], 0) for x in (fast, slow))  # as forward
    assert fast.shape == slow.shape == (len(pixels), 3, 256, 256)
    assert torch.equal(fast_mask, slow_mask) and not fast_mask.all()
    assert (fast.masked_select(~fast_mask[:, None]) == 0).all()
    level = 1 / (255 * model.vision.std)  # (1, 3, 1, 1): one uint8 step, normalised
    assert ((fast - slow).abs() <= level * 1.5).all()
    assert (fast - slow).abs().mean() < 0.4 * level.mean()  # rounding, not a shifted or misaligned image


def test_prefix_placeholders_follow_the_token_count():
    model, proc = build("model/fusion=prefix_tiny")
    sample = proc.encode("<image> hi", [_photo(1024, 1024)])
    n_placeholders = int((sample["input_ids"] == proc.image_token_id).sum())
    assert n_placeholders == visual_tokens(plan_tiles(1024, 1024), model.cfg) == 65 + 4 * 129
    batch = collate([sample], pad_token_id=proc.tokenizer.pad_token_id)
    tokens, per_image = model.encode_images(batch["pixel_values"], batch["pixel_mask"], batch["view_positions"],
                                            batch["views_per_image"])
    assert tokens.shape == (581, model.global_resampler.out_dim) and per_image.tolist() == [581]


@pytest.mark.parametrize("fusion", ["xattn_tiny", "prefix_tiny"])
def test_placeholder_mismatch_names_both_counts(fusion):
    model, proc = build(f"model/fusion={fusion}")
    batch = mixed_batch(proc, labels=False)
    batch["input_ids"] = batch["input_ids"].clone()
    first = (batch["input_ids"][0] == proc.image_token_id).nonzero()[0, 0]
    batch["input_ids"][0, first] = proc.tokenizer.pad_token_id  # one placeholder too few in sample 0
    expected = "65 + 129 * 4" if fusion == "prefix_tiny" else "1"
    with pytest.raises(ValueError, match="disagree") as err:
        model(batch)
    msg = str(err.value)
    want = 65 + 129 * plan_tiles(1024, 700).num_tiles if fusion == "prefix_tiny" else 1
    assert f"[{want - 1}]" in msg and f"[{want}]" in msg, (expected, msg)
    with pytest.raises(ValueError, match="1 <image> marker"):
        proc.encode("<image> only one marker", [_photo(10, 10), _photo(10, 10)])


@pytest.mark.parametrize("overrides", [[], ["model/fusion=prefix_tiny"], ["model/llm=tiny_gpt2"],
                                       ["model/llm=tiny_opt", "model/resampler=qformer_tiny"],
                                       ["model/llm=tiny_qwen2", "model.fusion.only_immediate=false"]])
def test_generation_with_cache_equals_without(overrides):
    model, proc = build(*overrides)
    model.eval()
    if model.xattn is not None:  # make the images matter
        for block in model.xattn.blocks:
            block.attn_gate.data.fill_(0.5)
            block.ff_gate.data.fill_(0.5)
    batch = mixed_batch(proc, padding_side="left", labels=False)
    cached = model.generate(batch, max_new_tokens=12, use_cache=True)
    uncached = model.generate(batch, max_new_tokens=12, use_cache=False)
    assert cached.shape == (3, 12)
    assert torch.equal(cached, uncached)


def test_generation_reuses_media_kv():
    """The media keys/values are projected once per request (prefill) and reused at every decode step."""
    model, proc = build()
    model.eval()
    calls = []
    for block in model.xattn.blocks:
        block.to_kv.register_forward_hook(lambda *a: calls.append(1))
    batch = mixed_batch(proc, padding_side="left", labels=False)
    model.generate(batch, max_new_tokens=6, eos_token_id=-1)
    assert len(calls) == len(model.xattn.blocks)  # once per block, not once per step
    calls.clear()
    model.generate(batch, max_new_tokens=6, eos_token_id=-1, use_cache=False)
    assert len(calls) == 6 * len(model.xattn.blocks)


def test_batched_left_padded_generation_equals_one_by_one():
    model, proc = build()
    model.eval()
    for block in model.xattn.blocks:
        block.attn_gate.data.fill_(0.5)
    batch = mixed_batch(proc, padding_side="left", labels=False)
    together = model.generate(batch, max_new_tokens=8, eos_token_id=-1)
    samples = [proc.encode("<image>What is written in the corner? A cat.", [_photo(1024, 700)])]
    alone = model.generate(collate(samples, pad_token_id=proc.tokenizer.pad_token_id), max_new_tokens=8,
                           eos_token_id=-1)
    assert torch.equal(together[0], alone[0])


def test_sampling_is_seeded():
    model, proc = build()
    model.eval()
    batch = mixed_batch(proc, padding_side="left", labels=False)
    a = model.generate(batch, 6, do_sample=True, temperature=1.0, top_p=0.9,
                       generator=torch.Generator().manual_seed(1))
    b = model.generate(batch, 6, do_sample=True, temperature=1.0, top_p=0.9,
                       generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_gradient_checkpointing_matches():
    """LLM activation checkpointing (hooks run outside the checkpointed forward) gives the same gradients."""
    grads = []
    for gc in (False, True):
        model, proc = build(f"model.lm.gradient_checkpointing={gc}")
        model.train()
        for block in model.xattn.blocks:
            block.attn_gate.data.fill_(0.5)
        model(mixed_batch(proc)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


TINY_CLIP = ["model.vision.backend=hf", "model.vision.name=tiny-clip", "+model.vision.hf_config={model_type: "
             "clip_vision_model, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 3, num_attention_heads: 2, "
             "image_size: 224, patch_size: 32}"]


@pytest.mark.parametrize("backend", ["timm", "hf"])
def test_vision_gradient_checkpointing_matches(backend):
    """A trained vision tower with activation checkpointing: the same gradients as without, and its blocks really
    are recomputed in backward (masked partial tiles included). A frozen tower with the switch on is unaffected."""
    hf = TINY_CLIP if backend == "hf" else []
    blocks = ("Block", "CLIPEncoderLayer")  # timm ViT / transformers CLIP
    grads, calls = [], []
    for frozen, gc in ((False, False), (False, True), (True, True)):
        model, proc = build(f"model.freeze.vision={frozen}", f"model.vision.gradient_checkpointing={gc}", *hf)
        model.train()
        for block in model.xattn.blocks:
            block.attn_gate.data.fill_(0.5)  # at 0 no gradient would reach the vision tower
        first = next(b for b in model.vision.backbone.modules() if type(b).__name__ in blocks)
        calls.append(0)
        first.mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(-1, calls[-1] + 1))  # recompute may stop early
        model(mixed_batch(proc)).loss.backward()
        grads.append({k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    assert calls == [1, 2, 1]  # recomputed once in backward; never when frozen (no grad)
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("vision.") for k in grads[0])
    assert all(grads[0][k].abs().sum() > 0 for k in grads[0] if k.startswith("vision."))
    for k in grads[0]:
        assert torch.equal(grads[0][k], grads[1][k]), k
    assert not any(k.startswith("vision.") for k in grads[2])

def test_view_position_embeddings_switch():
    model, _ = build("model.tile_position_embeddings=false")
    assert model.view_embedding.grid is None and model.view_embedding.view_type is not None
    model, _ = build()
    z = torch.zeros(4, 5, model.global_resampler.out_dim)
    # (is_tile, row, col, rows, cols): the global view, two tiles of a 2x2 grid, the last column of a 2x3 grid
    pos = torch.tensor([[0, 0, 0, 1, 1], [1, 0, 1, 2, 2], [1, 1, 0, 2, 2], [1, 0, 2, 2, 3]])
    out = model.view_embedding(z, pos)
    assert not torch.equal(out[1], out[2])  # two tiles at different places differ
    assert torch.equal(out[0], model.view_embedding.view_type.weight[0].expand(5, -1))  # global: type only
    grid = model.view_embedding.grid
    # the rightmost tile of either grid shares the "distance to the last column" embedding (0), not the column
    torch.testing.assert_close(out[1] - out[3], (grid[1].weight[1] - grid[1].weight[2]).expand(5, -1))


def test_tiles_per_image_batch_is_flat():
    """Different tile counts per image in one batch: views are concatenated, never padded to the largest."""
    _, proc = build()
    batch = mixed_batch(proc)
    plans = [plan_tiles(1024, 700), plan_tiles(300, 200, "low"), plan_tiles(800, 1200)]
    assert batch["views_per_image"].tolist() == [p.num_views for p in plans]
    assert batch["pixel_values"].shape[0] == sum(p.num_views for p in plans)
    assert batch["images_per_sample"].tolist() == [1, 2, 0]


def test_vision_feature_layer_and_hf_backend():
    from vlm.config import VisionConfig
    from vlm.vision import VisionEncoder

    x = torch.randint(0, 256, (2, 3, 512, 512), dtype=torch.uint8)
    enc = VisionEncoder(VisionConfig(hf_config=dict(model_type="clip_vision_model", hidden_size=32,
                                                    intermediate_size=64, num_hidden_layers=3,
                                                    num_attention_heads=2, image_size=224, patch_size=32),
                                     backend="hf"))
    feats, valid = enc(x)
    assert feats.shape == (2, 256, 32) and valid.all()  # 512 px at patch 32, class token dropped
    layers = [m for m in enc.backbone.modules() if type(m).__name__.endswith("EncoderLayer")]
    assert len(layers) == 2  # the last of 3 layers is dropped: penultimate features, never computed
    enc = VisionEncoder(VisionConfig(hf_config=dict(model_type="siglip_vision_model", hidden_size=32,
                                                    intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=2, image_size=224, patch_size=32),
                                     backend="hf"))
    assert enc(x)[0].shape == (2, 256, 32)
    conv = VisionEncoder(VisionConfig(name="convnext_atto", feature_layer=-2))
    feats, valid = conv(x)
    assert feats.shape[0] == 2 and feats.shape[1] == valid.shape[1] == 32 * 32


def test_real_checkpoints_fail_clearly_offline():
    """Real checkpoint names with HF_HUB_OFFLINE=1 (conftest): nothing is downloaded, the error says what to do."""
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    from vlm.config import LMConfig, VisionConfig
    from vlm.lm import build_lm
    from vlm.vision import MissingWeightsError, VisionEncoder

    with pytest.raises(MissingWeightsError, match="checkpoint_path"):
        VisionEncoder(VisionConfig(backend="hf", name="openai/clip-vit-large-patch14-336", pretrained=True))
    with pytest.raises(MissingWeightsError, match="checkpoint_path"):
        VisionEncoder(VisionConfig(name="vit_base_patch16_siglip_224", pretrained=True))
    with pytest.raises(MissingWeightsError, match="local folder"):
        build_lm(LMConfig(name="meta-llama/Meta-Llama-3-8B-Instruct"))


def test_loss_ignores_prompt_padding_and_images():
    model, proc = build("model/fusion=prefix_tiny")
    batch = mixed_batch(proc)
    out = model(batch)
    assert torch.isfinite(out.loss)
    batch2 = dict(batch)
    batch2["labels"] = torch.full_like(batch["labels"], -100)
    batch2["labels"][:, 1:3] = batch["labels"][:, 1:3]
    assert torch.isfinite(model(batch2).loss)


@pytest.fixture(autouse=True, scope="module")
def _quiet():
    np.seterr(all="ignore")
