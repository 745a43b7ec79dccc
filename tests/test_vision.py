"""The vision encoder (vlm/vision.py): padding never seen, the uint8 fast path, activation checkpointing of a trained
tower, feature layers and the transformers backend, and the offline failure for real weights."""

from __future__ import annotations

import pytest
import torch
from _tiny import CLOSED_GATES, TINY_VIT, build, mixed_batch, open_gates, photo

from vlm.config import LMConfig, VisionConfig
from vlm.lm import build_lm
from vlm.pretrained import MissingWeightsError
from vlm.processor import collate
from vlm.vision import VisionEncoder

TINY_CLIP = ["model.vision.backend=hf", "model.vision.name=tiny-clip", "model.vision.image_size=512",
             "+model.vision.hf_config={model_type: clip_vision_model, hidden_size: 32, intermediate_size: 64, "
             "num_hidden_layers: 3, num_attention_heads: 2, image_size: 224, patch_size: 32}"]


@pytest.mark.parametrize("vision", ["tiny_vit", "tiny_resnet"])
def test_padded_pixels_are_never_seen(vision):
    """Changing the padding of partial tiles (outside the masks) leaves the output unchanged, also for a convnet
    that encodes the views resized (tiny_resnet: 512 px views at 256 px)."""
    model, proc = build(f"model/vision={vision}")
    model.eval()
    open_gates(model, 1.0)
    sample = proc.encode("<image> describe", [photo(1920, 1080)])  # 1365x768: partial right and bottom tiles
    batch = collate([sample], pad_token_id=proc.tokenizer.pad_token_id)
    assert not batch["pixel_mask"].all()
    noisy = dict(batch)
    noise = torch.randint(0, 256, batch["pixel_values"].shape, dtype=torch.uint8)
    noisy["pixel_values"] = torch.where(batch["pixel_mask"][:, None], batch["pixel_values"], noise)
    with torch.no_grad():
        assert torch.allclose(model(batch).logits, model(noisy).logits, atol=1e-5, rtol=0)
        assert not torch.allclose(model(batch).logits, model(dict(batch, pixel_values=noise)).logits)


def test_uint8_views_resize_like_float_ones():
    """The encoder's CPU fast path (resize the uint8 views, then normalise) agrees with normalising and masking
    first (the path float views take) to within rounding (torch's fixed-point uint8 kernel: at most 1.5 levels, 0.3 on
    average), with the same masks and the padding exactly 0."""
    model, proc = build("model/vision=tiny_resnet")  # encodes the 512 px views at 256 px
    sample = proc.encode("<image> describe", [photo(1920, 1080)])  # partial right and bottom tiles
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


@pytest.mark.parametrize("backend", ["timm", "hf"])
def test_vision_gradient_checkpointing_matches(backend):
    """A trained vision tower with activation checkpointing: the same gradients as without, and its blocks really
    are recomputed in backward (masked partial tiles included). A frozen tower with the switch on is unaffected."""
    tower = TINY_CLIP if backend == "hf" else [TINY_VIT]
    blocks = ("Block", "CLIPEncoderLayer")  # timm ViT / transformers CLIP
    grads, calls = [], []
    for frozen, gc in ((False, False), (False, True), (True, True)):
        model, proc = build(f"model.freeze.vision={frozen}", f"model.vision.gradient_checkpointing={gc}", *tower)
        model.train()
        open_gates(model, 0.5)  # at 0 no gradient would reach the vision tower
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


def test_vision_feature_layer_and_hf_backend():
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
    with pytest.raises(MissingWeightsError, match="checkpoint_path"):
        VisionEncoder(VisionConfig(backend="hf", name="openai/clip-vit-large-patch14-336", pretrained=True))
    with pytest.raises(MissingWeightsError, match="checkpoint_path"):
        VisionEncoder(VisionConfig(name="vit_base_patch16_siglip_224", pretrained=True))
    with pytest.raises(MissingWeightsError, match="local folder"):
        build_lm(LMConfig(name="meta-llama/Meta-Llama-3-8B-Instruct"))


def test_frozen_encoder_runs_without_grad():
    model, proc = build(CLOSED_GATES)
    feats = []
    model.vision.register_forward_hook(lambda m, a, out: feats.append(out[0]))
    model.train()
    model(mixed_batch(proc)).loss.backward()
    assert not feats[0].requires_grad and not model.vision.training


def test_encoder_autocast_gives_float32_features_close_to_float32():
    """`vision.autocast=bfloat16` (the real pair's encoder setting): the same features within bf16 rounding, returned
    in the weights' dtype; without it nothing changes; an unknown dtype is refused."""
    model, proc = build()
    batch = collate([proc.encode("<image> describe", [photo(1024, 512)])], pad_token_id=proc.tokenizer.pad_token_id)
    args = batch["pixel_values"], batch["pixel_mask"]
    with torch.no_grad():
        ref, ref_mask = model.vision(*args)
        model.vision.cfg.autocast = "bfloat16"
        bf, bf_mask = model.vision(*args)
        model.vision.cfg.autocast = "int8"
        with pytest.raises(ValueError, match="autocast"):
            model.vision(*args)
    assert ref.dtype == bf.dtype == torch.float32 and torch.equal(ref_mask, bf_mask)
    assert not torch.equal(ref, bf)  # it did run in bf16
    assert torch.nn.functional.cosine_similarity(ref.flatten(), bf.flatten(), dim=0) > 0.999
    assert (ref - bf).norm() / ref.norm() < 0.05


def test_views_go_through_in_chunks_without_gradients():
    """`max_views_per_call`: without gradients a long batch of views is encoded a chunk at a time, the same features
    (to float rounding); with gradients in one call; the cache key does not change with it."""
    from vlm.config import VisionConfig, cache_fields
    from vlm.vision import VisionEncoder

    torch.manual_seed(0)
    enc = VisionEncoder(VisionConfig(backend="timm", name="resnet10t", pretrained=False, image_size=64,
                                     feature_layer=-1, max_views_per_call=3)).eval()
    calls, encode = [], enc._encode
    enc._encode = lambda x, m: (calls.append(len(x)), encode(x, m))[1]  # views per encoder call
    pixels = torch.randint(0, 255, (7, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        chunked, mask = enc(pixels)
    assert calls == [3, 3, 1] and chunked.shape[0] == 7 and mask.shape[0] == 7
    calls.clear()
    whole, _ = enc(pixels)  # gradients on: one call
    assert calls == [7]
    torch.testing.assert_close(chunked, whole.detach(), atol=1e-5, rtol=1e-4)
    assert cache_fields(enc.cfg) == cache_fields(VisionConfig(backend="timm", name="resnet10t", pretrained=False,
                                                              image_size=64, feature_layer=-1))
