import math

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from vlm.config import ResamplerConfig, TilingConfig, VLMConfig
from vlm.tiling import (
    TilePlan,
    ViewPositions,
    api_tokens,
    patch_mask,
    plan_tiles,
    resize,
    tile_image,
    tile_video,
    token_budget,
    untile,
    visual_tokens,
)

S = 512

# (width, height, detail, resized (w, h), grid (cols, rows), api tokens)
WORKED = [
    (1024, 1024, "high", (768, 768), (2, 2), 765),
    (2048, 4096, "high", (768, 1536), (2, 3), 1105),
    (4096, 8192, "low", (4096, 8192), (0, 0), 85),
    (150, 150, "high", (150, 150), (1, 1), 255),
    (513, 150, "high", (513, 150), (2, 1), 425),
    (1920, 1080, "high", (1365, 768), (3, 2), 1105),
    (4096, 256, "high", (2048, 128), (4, 1), 765),
]


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)  # (3, H, W)


def _extent(mask: torch.Tensor) -> tuple[int, int]:
    """(valid rows, valid cols) of a top-left rectangular mask (S, S)."""
    return int(mask.any(dim=1).sum()), int(mask.any(dim=0).sum())


@pytest.mark.parametrize(("w", "h", "detail", "resized", "grid", "tokens"), WORKED)
def test_worked_examples(w, h, detail, resized, grid, tokens):
    plan = plan_tiles(w, h, detail)
    assert plan == TilePlan(w, h, detail, resized, grid)
    tiles = grid[0] * grid[1]
    assert plan.num_tiles == tiles
    assert plan.num_views == 1 + tiles
    assert api_tokens(w, h, detail) == tokens == 85 + 170 * tiles
    assert visual_tokens(plan) == 65 + 129 * tiles
    assert visual_tokens(plan, VLMConfig()) == 65 + 129 * tiles


def test_visual_tokens_follows_config():
    cfg = VLMConfig(global_resampler=ResamplerConfig(num_queries=32),
                    tile_resampler=ResamplerConfig(num_queries=8))
    plan = plan_tiles(1024, 1024)
    assert visual_tokens(plan, cfg) == 33 + 4 * 9
    assert visual_tokens(plan_tiles(1024, 1024, "low"), cfg) == 33
    budget = token_budget(cfg)
    assert (budget.global_view, budget.tile) == (33, 9) and budget.image(plan) == 33 + 4 * 9
    views = ViewPositions.cat([ViewPositions.global_view(), ViewPositions.grid(1, 2)])
    assert budget.views(views).tolist() == [33, 9, 9]
    frames = [Image.new("RGB", (40, 30), (10 * i, 0, 0)) for i in range(3)]
    video = tile_video(frames, cfg.tiling)  # one low view per frame, numbered 1..3
    assert video.positions.frame.tolist() == [1, 2, 3] and video.pixels.shape[0] == 3 and video.plan.num_views == 3
    assert budget.image(video.plan) == 3 * 33 and budget.views(video.positions).tolist() == [33] * 3
    cfg.video.resample = "clip"  # the clip's tokens at its first frame
    clip = token_budget(cfg)
    assert clip.image(video.plan) == 33 and clip.views(video.positions).tolist() == [33, 0, 0]
    assert clip.image(plan) == 33 + 4 * 9  # images as before


def test_view_positions_index_cat_and_compare():
    grid = ViewPositions.grid(2, 3)
    assert len(grid) == 6 and grid.row.tolist() == [0, 0, 0, 1, 1, 1] and grid.col.tolist() == [0, 1, 2, 0, 1, 2]
    both = ViewPositions.cat([ViewPositions.global_view(), grid])
    assert len(both) == 7 and both[1:] == grid and both[0:1] == ViewPositions.global_view()
    assert both[torch.tensor([0, 6])].col.tolist() == [0, 2] and not both[1:] == ViewPositions.grid(3, 2)


def test_auto_detail():
    assert plan_tiles(1024, 1024, "auto") == plan_tiles(1024, 1024, "high")
    low = TilingConfig(auto_detail="low")
    plan = plan_tiles(1024, 1024, "auto", low)
    assert plan.detail == "low" and plan.num_tiles == 0
    assert api_tokens(1024, 1024, "auto", low) == 85


def test_never_enlarges_and_grid_bounded():
    assert plan_tiles(100, 30).resized == (100, 30)
    assert plan_tiles(768, 2000).resized == (768, 2000)  # short side already 768, long side under 2048
    extreme = plan_tiles(100_000, 3)
    assert extreme.resized == (2048, 1)  # floor would give 0: sides stay >= 1
    cfg = TilingConfig()
    for w, h in [(8000, 8000), (100_000, 50), (50, 100_000), (2049, 2049), (3000, 500)]:
        cols, rows = plan_tiles(w, h).grid
        assert 1 <= cols <= cfg.max_grid and 1 <= rows <= cfg.max_grid


@pytest.mark.parametrize("detail", ["medium", "HIGH", None, ""])
def test_bad_detail(detail):
    with pytest.raises(ValueError, match="low, high, auto"):
        plan_tiles(10, 10, detail)


@pytest.mark.parametrize(("w", "h"), [(0, 10), (10, -1), (1.5, 10), (10, "10"), (True, 10)])
def test_bad_size(w, h):
    with pytest.raises(ValueError, match="positive integer"):
        plan_tiles(w, h)


def test_partial_tile_masks_513x150():
    img = _noise(513, 150)
    t = tile_image(img)
    assert t.pixels.shape == (3, 3, S, S) and t.pixels.dtype == torch.uint8
    assert t.mask.shape == (3, S, S) and t.mask.dtype == torch.bool
    p = t.positions
    assert [p.is_tile.tolist(), p.row.tolist(), p.col.tolist(), p.rows.tolist(), p.cols.tolist(), p.frame.tolist()] == [
        [0, 1, 1], [0, 0, 0], [0, 0, 1], [1, 1, 1], [1, 2, 2], [0, 0, 0]]
    assert _extent(t.mask[1]) == (150, 512)
    assert _extent(t.mask[2]) == (150, 1)
    assert int(t.mask[2].sum()) == 150
    assert (t.pixels[2][:, ~t.mask[2]] == 0).all()  # padded pixels are zero
    assert torch.equal(t.pixels[2, :, :150, 0], _tensor(img)[:, :, 512])


def test_partial_tile_masks_1920x1080():
    t = tile_image(_noise(1920, 1080))
    assert t.plan.resized == (1365, 768) and t.plan.grid == (3, 2)
    tiles = t.positions[1:]
    assert (tiles.rows == 2).all() and (tiles.cols == 3).all()  # every tile knows the grid: 2 rows, 3 cols
    assert list(zip(tiles.row.tolist(), tiles.col.tolist())) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    extents = [_extent(m) for m in t.mask[1:]]
    assert extents == [(512, 512), (512, 512), (512, 341), (256, 512), (256, 512), (256, 341)]
    assert (t.pixels[1:].permute(1, 0, 2, 3)[:, ~t.mask[1:]] == 0).all()


def _photo(name: str) -> Image.Image:
    arr = getattr(skdata, name)()
    return Image.fromarray(arr).convert("RGB")


@pytest.mark.parametrize(
    "make",
    [
        lambda: _noise(150, 150),  # smaller than one tile
        lambda: _noise(513, 150),
        lambda: _noise(1920, 1080),
        lambda: _noise(3000, 400, seed=1),  # panorama
        lambda: _noise(300, 1900, seed=2),  # tall
        lambda: _photo("astronaut"),
        lambda: _photo("coffee"),
        lambda: _photo("page").resize((1100, 547)),  # grayscale scan, grown past one tile
    ],
    ids=["small", "513x150", "1920x1080", "panorama", "tall", "astronaut", "coffee", "page"],
)
def test_tiles_reassemble_exactly(make):
    img = make()
    t = tile_image(img)
    expected = resize(img, t.plan.resized)
    rebuilt = untile(t)
    assert rebuilt.shape == (3, t.plan.resized[1], t.plan.resized[0])
    assert torch.equal(rebuilt, expected)
    assert t.pixels.shape[0] == t.mask.shape[0] == len(t.positions) == t.plan.num_views


def test_global_view_pad_keeps_aspect():
    img = _photo("coffee")  # 600x400, under the short side: high keeps it, global view enlarges to 512x341
    t = tile_image(img)
    assert t.plan.resized == (600, 400)
    assert _extent(t.mask[0]) == (512 * 400 // 600, 512)
    assert int(t.mask[0].sum()) == 341 * 512
    assert (t.pixels[0][:, ~t.mask[0]] == 0).all()
    assert torch.equal(t.pixels[0, :, :341, :], resize(img, (512, 341)))

    tall = tile_image(_noise(300, 1900), "low")  # low: made from the original, 512 * 300 // 1900 = 80 wide
    assert _extent(tall.mask[0]) == (512, 80)
    tiny = tile_image(_noise(4000, 2), "low")
    assert _extent(tiny.mask[0]) == (1, 512)  # at least one pixel


def test_global_view_stretch_and_low():
    cfg = TilingConfig(global_resize="stretch")
    img = _noise(1920, 1080)
    t = tile_image(img, "high", cfg)
    assert t.mask[0].all()
    assert torch.equal(t.pixels[0], resize(resize(img, (1365, 768)), (512, 512)))
    low = tile_image(img, "low", cfg)
    assert low.pixels.shape == (1, 3, S, S) and low.mask.shape == (1, S, S)
    assert low.positions == ViewPositions.global_view() and int(low.positions.rows) == 1
    assert low.plan.num_views == 1 and low.mask.all()
    with pytest.raises(ValueError, match="no tiles"):
        untile(low)


def test_tile_image_wants_rgb():
    with pytest.raises(ValueError, match="RGB"):
        tile_image(Image.new("RGBA", (10, 10)))


def test_patch_mask():
    mask = torch.zeros(2, S, S, dtype=torch.bool)
    mask[0] = True
    mask[1, :256, :341] = True
    cells = patch_mask(mask, (32, 32))
    assert cells.shape == (2, 32 * 32) and cells.dtype == torch.bool
    assert cells[0].all()
    grid = cells[1].view(32, 32)
    assert int(grid.any(dim=0).sum()) == math.ceil(341 / 16) == 22
    assert int(grid.any(dim=1).sum()) == 16
    assert int(grid.sum()) == 22 * 16
    # a cell with a single valid pixel counts as valid
    one = torch.zeros(1, S, S, dtype=torch.bool)
    one[0, 0, 0] = True
    assert patch_mask(one, (32, 32)).sum() == 1


def test_patch_mask_of_tiled_image():
    t = tile_image(_noise(1920, 1080))
    cells = patch_mask(t.mask, (32, 32)).view(-1, 32, 32)  # (V, 32, 32)
    assert int(cells[3].any(dim=0).sum()) == 22  # right column tile: 341 px wide
    assert int(cells[4].any(dim=1).sum()) == 16  # bottom row tile: 256 px high


@pytest.mark.parametrize(("size", "orientation", "detail"), [((2048, 1536), None, "high"), ((1536, 2048), 6, "high"),
                                                             ((2000, 1000), None, "low")])
def test_draft_decode_keeps_the_original_geometry(size, orientation, detail):
    """JPEGs decoded at reduced scale (`load_image(draft=...)`) tile exactly like a full decode, pixels close."""
    import io

    from skimage import data

    from vlm.images import load_image
    from vlm.tiling import draft_size

    img = Image.fromarray(data.astronaut()).resize(size)
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    img.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    full = load_image(buf.getvalue())
    plans = []
    drafted = load_image(buf.getvalue(), draft=lambda w, h: draft_size(plans.append(plan_tiles(w, h, detail)) or
                                                                        plans[-1]))
    plan = plan_tiles(*full.size, detail)
    assert plans == [plan]
    assert drafted.width < full.width and drafted.width >= draft_size(plan)[0]
    assert drafted.height >= draft_size(plan)[1]
    a, b = tile_image(full, detail), tile_image(drafted, detail, plan=plan)
    assert a.plan == b.plan and a.pixels.shape == b.pixels.shape and torch.equal(a.mask, b.mask)
    assert (a.pixels.float() - b.pixels.float()).abs().mean() < 3.0  # same picture, a different decode path


@pytest.mark.parametrize("size", [(977, 768), (512, 341), (150, 100), (700, 1200)])
def test_resize_matches_pil_bicubic(size):
    """Our resize (torch's antialiased uint8 bicubic) agrees with PIL's BICUBIC to within rounding."""
    img = _photo("astronaut").resize((1400, 1100))
    ours = resize(img, size).int()
    pil = _tensor(img.resize(size, Image.Resampling.BICUBIC)).int()
    assert ours.shape == pil.shape
    assert (ours - pil).abs().max() <= 2 and (ours - pil).abs().float().mean() < 0.05  # two rounded passes
