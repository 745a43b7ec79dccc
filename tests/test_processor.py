"""The processor (vlm/processor.py): placeholders per fusion kind from the one token budget, flat batches of views,
the marker count check, and batches moved to a device with their view positions."""

from __future__ import annotations

import pytest
import torch
from _tiny import build, mixed_batch, photo

from vlm.processor import collate, to_device
from vlm.tiling import ViewPositions, plan_tiles, token_budget, visual_tokens


def test_prefix_placeholders_follow_the_token_count():
    model, proc = build("model/fusion=prefix")
    sample = proc.encode("<image> hi", [photo(1024, 1024)])
    n_placeholders = int((sample["input_ids"] == proc.image_token_id).sum())
    assert n_placeholders == visual_tokens(plan_tiles(1024, 1024), model.cfg) == 65 + 4 * 129
    batch = collate([sample], pad_token_id=proc.tokenizer.pad_token_id)
    tokens, per_image = model.encode_images(batch["pixel_values"], batch["pixel_mask"], batch["view_positions"],
                                            batch["views_per_image"])
    assert tokens.shape == (581, model.visual.out_dim) and per_image.tolist() == [581]


def test_xattn_takes_one_marker_per_image():
    _, proc = build()
    sample = proc.encode("<image> and <image>", [photo(1024, 1024), photo(300, 200, 1)], details=["high", "low"])
    assert int((sample["input_ids"] == proc.image_token_id).sum()) == 2
    assert [proc.placeholders(p) for p in sample["plans"]] == [1, 1]
    assert [proc.budget.image(p) for p in sample["plans"]] == [581, 65] == [
        token_budget(proc.cfg).image(p) for p in sample["plans"]]
    with pytest.raises(ValueError, match="1 <image> marker"):
        proc.encode("<image> only one marker", [photo(10, 10), photo(10, 10)])


def test_tiles_per_image_batch_is_flat():
    """Different tile counts per image in one batch: views are concatenated, never padded to the largest."""
    _, proc = build()
    batch = mixed_batch(proc)
    plans = [plan_tiles(1024, 700), plan_tiles(300, 200, "low"), plan_tiles(800, 1200)]
    assert batch["views_per_image"].tolist() == [p.num_views for p in plans]
    assert batch["pixel_values"].shape[0] == len(batch["view_positions"]) == sum(p.num_views for p in plans)
    assert batch["images_per_sample"].tolist() == [1, 2, 0]
    pos = batch["view_positions"]
    assert pos.is_tile.tolist() == [0] + [1] * 4 + [0] + [0] + [1] * 6 and (pos.frame == 0).all()


def test_to_device_moves_tensors_and_view_positions():
    _, proc = build()
    batch = dict(mixed_batch(proc), keys=["a", "b", "c"])
    moved = to_device(batch, "meta")
    assert moved["input_ids"].device.type == "meta" and moved["view_positions"].row.device.type == "meta"
    assert moved["keys"] == ["a", "b", "c"] and isinstance(moved["view_positions"], ViewPositions)
    assert batch["view_positions"].row.device.type == "cpu"
    assert torch.equal(to_device(batch, "cpu")["view_positions"].cols, batch["view_positions"].cols)


def test_a_video_is_one_media_item_of_one_low_view_per_frame():
    from vlm.images import ImageError, Video

    frames = [photo(300 + 10 * i, 200) for i in range(3)]
    for fusion, placeholders in (("tiny_xattn", 1), ("prefix", 3 * 65)):
        model, proc = build(f"model/fusion={fusion}")
        s = proc.encode("First? <image> Answer:", [Video(frames)], ["high"])  # frames are low whatever is asked
        pos = s["view_positions"]
        assert s["views_per_image"].tolist() == [3] and pos.frame.tolist() == [1, 2, 3] and not pos.is_tile.any()
        assert int((s["input_ids"] == proc.image_token_id).sum()) == placeholders
        assert token_budget(model.cfg).image(s["plans"][0]) == 3 * 65
    with pytest.raises(ValueError, match="max_frames"):
        proc.encode("<image>", [Video(frames * 3)])
    with pytest.raises(ImageError, match="at least one frame"):
        Video([])
