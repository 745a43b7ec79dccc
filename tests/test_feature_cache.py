"""The disk cache of frozen encoder features (vlm/feature_cache.py) and its use in `VLM.encode_images`: hits are
bit-identical to encoding, another encoder / feature layer / weights / stored dtype never reads them, corrupt entries
are recomputed and counted, the size bound holds after every write batch, LRU eviction, the config and env switch."""

from __future__ import annotations

import os
import time
from dataclasses import replace

import pytest
import torch
from _tiny import build, photo

from vlm.config import VisionConfig
from vlm.feature_cache import ENV, FeatureCache, FeatureCacheConfig, open_cache
from vlm.processor import collate
from vlm.vision import VisionEncoder


def cached(tmp_path, *overrides: str, seed: int = 0):
    """The tiny default (+ overrides) caching its frozen encoder's features under tmp_path."""
    model, proc = build(f"++model.vision.feature_cache='{tmp_path}'", *overrides, seed=seed)
    assert model.feature_cache.root == str(tmp_path) and model.feature_cache.max_bytes == 20 * 2**30
    return model, proc


def batch_of(proc, *images) -> dict:
    samples = [proc.encode("<image> describe", [im]) for im in images]
    return collate(samples, pad_token_id=proc.tokenizer.pad_token_id)


def encode(model, batch) -> torch.Tensor:
    with torch.no_grad():
        tokens, _ = model.encode_images(batch["pixel_values"], batch["pixel_mask"], batch["view_positions"],
                                        batch["views_per_image"])  # (N, D)
    return tokens


def stats(model, batch):
    return open_cache(model.feature_cache, model.vision, batch["pixel_values"].device).stats


def entries(root) -> list:
    return sorted(p for p in root.rglob("*.feat"))


def count_encoded(model) -> list[int]:
    """Views per encoder call, appended as the encoder runs."""
    calls = []
    model.vision.register_forward_pre_hook(lambda _, args: calls.append(len(args[0])))
    return calls


@pytest.mark.parametrize("vision", ["tiny_resnet", "tiny_vit"])
def test_hits_are_bit_identical_to_encoding(tmp_path, vision):
    """All misses, then all hits (the encoder never runs), then a mix (only the misses run, in one call): the visual
    tokens and the logits equal the uncached model's bit for bit. Partial tiles (ViT: masked attention) included."""
    model, proc = cached(tmp_path, f"model/vision={vision}")
    batch = batch_of(proc, photo(700, 400), photo(300, 200, 1))  # 2x1 tiles (partial right one), 1x1
    views = len(batch["pixel_values"])
    assert not batch["pixel_mask"].all()
    uncached = build(f"model/vision={vision}")[0]
    reference = encode(uncached, batch)
    calls = count_encoded(model)
    assert torch.equal(encode(model, batch), reference)
    assert calls == [views] and len(entries(tmp_path)) == views
    s = stats(model, batch)
    assert (s.hits, s.misses, s.corrupt) == (0, views, 0)
    assert torch.equal(encode(model, batch), reference)
    assert calls == [views] and (s.hits, s.misses) == (views, views)  # no encoder call
    for path in entries(tmp_path)[::2]:
        path.unlink()
    assert torch.equal(encode(model, batch), reference)
    assert calls == [views, (views + 1) // 2] and s.misses == views + (views + 1) // 2
    with torch.no_grad():
        one = batch_of(proc, photo(300, 200, 1))  # all hits
        assert torch.equal(model.eval()(one).logits, uncached.eval()(one).logits)


def test_another_encoder_or_weights_misses(tmp_path):
    """The same encoder rebuilt (same seed) hits; another feature layer, encoder, random init or stored dtype, or
    changed weights of the same encoder, miss and write their own folder."""
    model, proc = cached(tmp_path)
    batch = batch_of(proc, photo(300, 200))  # 1 tile + the global view
    pixels, mask, views = batch["pixel_values"], batch["pixel_mask"], len(batch["pixel_values"])
    encode(model, batch)

    def run(cfg: VisionConfig, seed: int = 0, dtype: str | None = None):
        torch.manual_seed(seed)
        encoder = VisionEncoder(cfg).eval()
        cache = open_cache(FeatureCacheConfig(str(tmp_path), model.feature_cache.max_bytes, dtype), encoder, "cpu")
        before = (cache.stats.hits, cache.stats.misses)
        with torch.no_grad():
            cache.encode(encoder, pixels, mask)
        return cache.stats.hits - before[0], cache.stats.misses - before[1]

    assert run(model.cfg.vision) == (views, 0)  # the tiny default's encoder rebuilt with the seed `build` used
    folders = {p.name for p in tmp_path.iterdir()}
    vit = dict(name="vit_tiny_patch16_224", image_size=512, feature_layer=-1,
               model_kwargs=dict(patch_size=32, embed_dim=64, depth=2, num_heads=2))  # configs/model/vision/tiny_vit
    for changes, seed, dtype in [(dict(feature_layer=-2), 0, None), (vit, 0, None), ({}, 1, None), ({}, 0, "float16")]:
        assert run(replace(model.cfg.vision, **changes), seed, dtype) == (0, views), (changes, seed, dtype)
        assert len(now := {p.name for p in tmp_path.iterdir()}) == len(folders) + 1
        folders = now
    with torch.no_grad():
        next(model.vision.parameters()).mul_(1.5)  # weights changed in place (as load_state_dict does)
    before = stats(model, batch).misses
    encode(model, batch)
    assert stats(model, batch).misses == before + views


def test_a_bf16_mixed_run_shares_entries_with_fp32_when_the_encoder_sets_its_own_autocast(tmp_path):
    """The real pair's encoder runs under its own `vision.autocast`: a bf16-mixed training run and an fp32 eval compute
    the same features, so they share entries (bit-identical); without the field, the outer autocast is keyed."""
    for own, shared in [(None, False), ("bfloat16", True)]:
        model, proc = cached(tmp_path / str(own))
        model.vision.cfg.autocast = own
        batch = batch_of(proc, photo(300, 200))
        views = len(batch["pixel_values"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = encode(model, batch)
        plain = encode(model, batch)
        s = stats(model, batch)
        assert (s.hits, s.misses) == ((views, views) if shared else (0, views)), own
        assert mixed.shape == plain.shape
        with torch.no_grad():
            pixels, mask = batch["pixel_values"], batch["pixel_mask"]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                features_mixed = model.vision(pixels, mask)[0]  # (V, P, Dv) no cache
            features_plain = model.vision(pixels, mask)[0]
        assert torch.equal(features_mixed, features_plain) == shared, own  # why sharing is exact (and only then)


def test_corrupt_entries_are_recomputed_counted_and_overwritten(tmp_path):
    model, proc = cached(tmp_path)
    batch = batch_of(proc, photo(1024, 700))  # 2x2 tiles + the global view
    views = len(batch["pixel_values"])
    reference = encode(model, batch)
    truncated, flipped, garbage = entries(tmp_path)[:3]
    truncated.write_bytes(truncated.read_bytes()[:-100])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    garbage.write_bytes(b"not an entry")
    assert torch.equal(encode(model, batch), reference)
    s = stats(model, batch)
    assert (s.corrupt, s.hits, s.misses) == (3, views - 3, views + 3)
    assert torch.equal(encode(model, batch), reference)  # overwritten: all hits now
    assert (s.corrupt, s.hits) == (3, 2 * views - 3)


def test_the_size_bound_holds_after_every_write_batch(tmp_path):
    """Many views through two caches sharing a root (two ranks) with room for a few entries: after each write batch
    the root is under the bound, the batch just written is kept, and the least recently used entries went first."""
    model, _ = build()
    encoder = model.vision
    entry = 32 + 256 * 64 * 4 + 256  # header + (P, Dv) float32 + mask
    bound = 5 * entry
    ranks = [FeatureCache(tmp_path, "enc", bound, rescan_s=0.0) for _ in range(2)]  # rescan_s=0: a strict bound
    gen = torch.Generator().manual_seed(0)
    written = []
    with torch.no_grad():
        for step in range(6):
            views = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8, generator=gen)  # (V, C, S, S)
            feats, _ = ranks[step % 2].encode(encoder, views)
            assert feats.shape == (2, 256, 64)
            written.append(FeatureCache.view_keys(views, torch.ones(2, 256, 256, dtype=torch.bool)))
            assert sum(p.stat().st_size for p in entries(tmp_path)) <= bound
            assert all(ranks[0].path(k).exists() for k in written[-1])
    assert sum(r.stats.evicted for r in ranks) == 6 * 2 - len(entries(tmp_path)) > 0
    # LRU: age what is there, read the oldest back (a hit refreshes it), then write past the bound
    kept = sorted(entries(tmp_path), key=lambda p: p.stat().st_mtime)
    now = time.time()
    for age, path in enumerate(reversed(kept)):
        os.utime(path, (now - 100 - age, now - 100 - age))
    oldest = kept[0]
    assert ranks[0].read(oldest.stem) is not None
    with torch.no_grad():
        ranks[0].encode(encoder, torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8, generator=gen))
    assert oldest.exists() and not kept[1].exists()


def test_config_env_and_a_trained_encoder(tmp_path, monkeypatch):
    """VisionConfig.feature_cache (+ max_gb, dtype), VLM_FEATURE_CACHE overriding it (a folder or off), and a trained
    encoder never cached; float16 storage: hits equal misses, close to the float32 features."""
    cfg = VisionConfig(feature_cache="/a", feature_cache_max_gb=0.5, feature_cache_dtype="bfloat16")
    assert FeatureCacheConfig.from_vision(cfg, {}) == FeatureCacheConfig("/a", 2**29, "bfloat16")
    assert FeatureCacheConfig.from_vision(cfg, {ENV: "/b"}).root == "/b"
    assert FeatureCacheConfig.from_vision(cfg, {ENV: "null"}) is None
    assert FeatureCacheConfig.from_vision(VisionConfig(), {}) is None
    assert FeatureCacheConfig.from_vision(VisionConfig(), {ENV: str(tmp_path)}).root == str(tmp_path)
    monkeypatch.setenv(ENV, str(tmp_path / "env"))
    trained, proc = build("model.freeze.vision=false")
    assert trained.feature_cache.root == str(tmp_path / "env")
    batch = batch_of(proc, photo(300, 200))
    encode(trained, batch)
    assert not (tmp_path / "env").exists()
    monkeypatch.delenv(ENV)
    model, _ = build()
    reference = encode(model, batch)
    model.feature_cache = FeatureCacheConfig(str(tmp_path / "fp16"), dtype="float16")
    miss, hit = encode(model, batch), encode(model, batch)
    assert stats(model, batch).hits == len(batch["pixel_values"])
    assert torch.equal(miss, hit) and miss.dtype == reference.dtype
    torch.testing.assert_close(hit, reference, rtol=1e-2, atol=1e-3)
