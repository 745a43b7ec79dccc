"""Visual tokens (vlm/visual.py): each view goes to the resampler of its budget, view embeddings say where it sits,
and the shared-body variant keeps the tile budget's own queries."""

from __future__ import annotations

import torch
from _tiny import build, mixed_batch, open_gates, photo

from vlm.processor import collate
from vlm.tiling import ViewPositions


def test_views_go_to_the_resampler_of_their_budget():
    """The flat token stream is, view after view, the global resampler's 65 tokens for a global view and the tile
    resampler's 129 for a tile, each plus its view embedding."""
    model, proc = build()
    batch = mixed_batch(proc)
    with torch.no_grad():
        feats, pmask = model.vision(batch["pixel_values"], batch["pixel_mask"])  # (V, P, Dv)
        tokens = model.visual(feats, pmask, batch["view_positions"])  # (N, D)
        pos = batch["view_positions"]
        start = 0
        for v in range(len(pos)):
            tile = bool(pos.is_tile[v])
            resampler = model.visual.tile_resampler if tile else model.visual.global_resampler
            z = model.visual.view_embedding(resampler(feats[v:v + 1], pmask[v:v + 1]), pos[v:v + 1])[0]  # (L, D)
            assert len(z) == (129 if tile else 65)
            torch.testing.assert_close(tokens[start:start + len(z)], z)
            start += len(z)
    assert start == len(tokens) == int(model.visual.budget.views(pos).sum())


def test_shared_resamplers_keep_the_tile_budgets_queries():
    model, proc = build("model.share_resamplers=true")
    visual = model.visual
    assert visual.tile_resampler is None and visual.tile_queries.shape == (129, visual.out_dim)
    feats = torch.randn(2, 256, model.vision.dim)
    with torch.no_grad():
        tiles = visual.resample(feats, None, tiles=True)  # (2, 129, D)
        ref = visual.global_resampler(feats, None, latents=visual.tile_queries)
    assert torch.equal(tiles, ref) and visual.resample(feats, None, tiles=False).shape == (2, 65, visual.out_dim)


def test_view_position_embeddings_switch():
    model, _ = build("model.tile_position_embeddings=false")
    assert model.visual.view_embedding.grid is None and model.visual.view_embedding.view_type is not None
    model, _ = build()
    emb = model.visual.view_embedding
    z = torch.zeros(4, 5, model.visual.out_dim)
    # the global view, two tiles of a 2x2 grid, the last column of a 2x3 grid
    pos = ViewPositions.cat([ViewPositions.global_view(), ViewPositions.grid(2, 2)[1:3], ViewPositions.grid(2, 3)[2:3]])
    assert pos.col.tolist() == [0, 1, 0, 2] and pos.cols.tolist() == [1, 2, 2, 3]
    out = emb(z, pos)
    assert not torch.equal(out[1], out[2])  # two tiles at different places differ
    assert torch.equal(out[0], emb.view_type.weight[0].expand(5, -1))  # global: type only
    # the rightmost tile of either grid shares the "distance to the last column" embedding (0), not the column
    torch.testing.assert_close(out[1] - out[3], (emb.grid[1].weight[1] - emb.grid[1].weight[2]).expand(5, -1))


def test_temporal_embeddings_give_the_frames_an_order():
    """Without temporal embeddings the cross-attention sees a video's frames as a set: reversing them leaves the
    logits as they were (`no_temporal`); with them the order shows. Still images get no temporal embedding."""
    from vlm.images import Video

    frames = [photo(300 + 10 * i, 200) for i in range(4)]
    for temporal in (False, True):
        model, proc = build(f"++model.video.temporal_embeddings={temporal}")
        open_gates(model, 1.0)
        model.eval()
        samples = [proc.encode("First? <image> Answer:", [Video(f)]) for f in (frames, frames[::-1])]
        with torch.no_grad():
            logits = model(collate(samples, pad_token_id=proc.tokenizer.pad_token_id)).logits  # (2, T, W)
        assert torch.allclose(logits[0], logits[1], atol=1e-5) != temporal
        assert (model.visual.view_embedding.time is not None) == temporal
    still = collate([proc.encode("<image> What?", [photo(300, 200)])], pad_token_id=proc.tokenizer.pad_token_id)
    with torch.no_grad():
        before = model(still).logits
        model.visual.view_embedding.time.weight.normal_(std=10.0)
        assert torch.equal(before, model(still).logits)


def test_a_clip_resampled_as_one_takes_one_global_views_tokens():
    """`video.resample=clip` (Flamingo): all of a video's frames into one resampler call, 65 tokens a video beside
    images and per-frame budgets unchanged; its temporal embeddings go on the frames' features, and without them the
    clip is a set of frames (reversed: the same logits up to float rounding over the permuted keys)."""
    from vlm.images import Video

    frames = [photo(300 + 10 * i, 200) for i in range(4)]
    for temporal in (False, True):
        model, proc = build("++model.video.resample=clip", f"++model.video.temporal_embeddings={temporal}")
        open_gates(model, 1.0)
        model.eval()
        assert (model.visual.clip_time is not None) == temporal and model.visual.view_embedding.time is None
        if temporal:
            model.visual.clip_time.weight.data.normal_()
        samples = [proc.encode("First? <image> Answer:", [Video(f)]) for f in (frames, frames[::-1])]
        samples.append(proc.encode("<image> then <image>", [photo(300, 200), Video(frames[:2])]))
        batch = collate(samples, pad_token_id=proc.tokenizer.pad_token_id)
        with torch.no_grad():
            _, per_image = model.encode_images(batch["pixel_values"], batch["pixel_mask"], batch["view_positions"],
                                               batch["views_per_image"])  # (I,)
            logits = model(batch).logits  # (3, T, W)
        assert per_image.tolist() == [65, 65, 65 + 129, 65]  # a clip, a clip, an image with one tile, a clip
        assert torch.allclose(logits[0], logits[1], atol=1e-3) != temporal
