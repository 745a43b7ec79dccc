"""GPT-4V tile geometry and token counts: the single source of truth for every other module.

The published `detail` rule (defaults in `TilingConfig`):
  low:  one global view, the whole image at tile_size x tile_size (512). API cost 85.
  high: fit inside max_side x max_side (2048), then shortest side down to short_side (768); both steps only
        shrink and floor the scaled side, like OpenAI's calculator. Cut ceil(w/512) x ceil(h/512) tiles of
        512 px, zero-padding the right column / bottom row (masked out), plus the global view.
        API cost 85 + 170 * tiles.
  auto: `cfg.auto_detail`.
The model's own count is `token_budget(cfg)`: global_resampler.num_tokens per global view, tile_resampler.num_tokens
per tile; every module that counts visual tokens (processor, model, throughput, the server's usage) asks it.

Where a view sits is a `ViewPositions` (named fields, one row per view); every consumer reads it by name.

Shapes (the vocabulary of every model file, see the README's architecture section): V views (1 global view + rows x
cols tiles, row-major), C = 3 channels, S = tile_size, h x w the resized image, gh x gw a feature grid.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from vlm.config import TilingConfig, VLMConfig

API_BASE_TOKENS = 85  # GPT-4V: the global view (and all of detail="low")
API_TILE_TOKENS = 170  # GPT-4V: each 512 px tile of detail="high"
DETAILS = ("low", "high", "auto")


@dataclass(frozen=True)
class TilePlan:
    """Where an image's pixels go. `resized` is the image the views are made from: the high-detail resize,
    or the original size for detail="low" (its only view is made straight from the original)."""

    width: int  # original
    height: int
    detail: str  # resolved: "low" or "high"
    resized: tuple[int, int]  # (w, h)
    grid: tuple[int, int]  # (cols, rows); (0, 0) for low

    @property
    def num_tiles(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_views(self) -> int:
        return 1 + self.num_tiles


@dataclass(frozen=True)
class ClipPlan:
    """Where a video's pixels go: each of its `frames` frames is one low-detail global view (`frame`: the first
    frame's plan; frames of one video share a size)."""

    frames: int
    frame: TilePlan
    detail: str = "low"
    num_tiles: int = 0

    @property
    def num_views(self) -> int:
        return self.frames


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def resolve_detail(detail: str, cfg: TilingConfig | None = None) -> str:
    """'low' / 'high' / 'auto' -> 'low' or 'high'."""
    cfg = cfg or TilingConfig()
    if not isinstance(detail, str) or detail not in DETAILS:
        raise ValueError(f"detail must be one of {', '.join(DETAILS)}; got {detail!r}")
    if detail == "auto":
        detail = cfg.auto_detail
        if detail not in ("low", "high"):
            raise ValueError(f"TilingConfig.auto_detail must be 'low' or 'high', got {detail!r}")
    return detail


def plan_tiles(width: int, height: int, detail: str = "high", cfg: TilingConfig | None = None) -> TilePlan:
    """GPT-4V's geometry for a width x height image. Floor rounding (exact integer arithmetic), sides >= 1."""
    cfg = cfg or TilingConfig()
    width, height = _positive_int("width", width), _positive_int("height", height)
    detail = resolve_detail(detail, cfg)
    if detail == "low":
        return TilePlan(width, height, "low", (width, height), (0, 0))
    w, h = width, height
    if w > cfg.max_side or h > cfg.max_side:  # step 1: long side down to max_side
        if w >= h:
            w, h = cfg.max_side, max(1, h * cfg.max_side // w)
        else:
            w, h = max(1, w * cfg.max_side // h), cfg.max_side
    if min(w, h) > cfg.short_side:  # step 2: short side down to short_side
        if w <= h:
            w, h = cfg.short_side, max(1, h * cfg.short_side // w)
        else:
            w, h = max(1, w * cfg.short_side // h), cfg.short_side
    grid = (math.ceil(w / cfg.tile_size), math.ceil(h / cfg.tile_size))
    return TilePlan(width, height, "high", (w, h), grid)


def api_tokens(width: int, height: int, detail: str = "high", cfg: TilingConfig | None = None) -> int:
    """What the GPT-4V API bills for the image: 85 + 170 * tiles."""
    return API_BASE_TOKENS + API_TILE_TOKENS * plan_tiles(width, height, detail, cfg).num_tiles


@dataclass(frozen=True)
class TokenBudget:
    """Visual tokens per view: the one place the model's token count comes from (65 / 129 by default)."""

    global_view: int  # tokens of a global view (the whole of detail="low")
    tile: int  # tokens of each high-res tile
    clip: bool = False  # videos resampled as one clip (`VideoConfig.resample`): a global view's tokens a video

    def image(self, plan: TilePlan | ClipPlan) -> int:
        """The visual tokens of one image (its global view plus its tiles) or one video (a global view per frame, or
        one for the clip)."""
        if self.clip and isinstance(plan, ClipPlan):
            return self.global_view
        return self.global_view * (plan.num_views - plan.num_tiles) + plan.num_tiles * self.tile

    def views(self, positions: ViewPositions) -> torch.Tensor:
        """(V,) tokens of each view; resampled as a clip, a video's tokens sit at its first frame, its others have
        none."""
        lens = torch.where(positions.is_tile.bool(), self.tile, self.global_view)  # (V,)
        return lens.masked_fill(positions.frame > 1, 0) if self.clip else lens  # (V,)


def token_budget(cfg: VLMConfig | None = None) -> TokenBudget:
    """The budget a model config gives its views: each resampler's queries plus its class token."""
    cfg = cfg or VLMConfig()
    return TokenBudget(cfg.global_resampler.num_tokens, cfg.tile_resampler.num_tokens, cfg.video.resample == "clip")


def visual_tokens(plan: TilePlan, cfg: VLMConfig | None = None) -> int:
    """The model's visual tokens for one image (`token_budget(cfg).image(plan)`)."""
    return token_budget(cfg).image(plan)


@dataclass
class ViewPositions:
    """Where each of V views sits, one (V,) long tensor per field. The global view is (is_tile 0, row 0, col 0,
    rows 1, cols 1); a tile knows its row and column and the grid's size. `frame`: the index of the video frame the
    view is, 1..F (0 for still images)."""

    is_tile: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    frame: torch.Tensor

    @classmethod
    def global_view(cls) -> ViewPositions:
        return cls(*torch.tensor([[0], [0], [0], [1], [1], [0]]))  # V = 1

    @classmethod
    def grid(cls, rows: int, cols: int) -> ViewPositions:
        """The rows x cols tiles of one image, row-major."""
        row, col = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")  # (rows, cols) each
        row, col = row.flatten(), col.flatten()  # (V,) each
        return cls(torch.ones_like(row), row, col, torch.full_like(row, rows), torch.full_like(row, cols),
                   torch.zeros_like(row))

    @classmethod
    def cat(cls, parts: Sequence[ViewPositions]) -> ViewPositions:
        return cls(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)))

    def _apply(self, fn) -> ViewPositions:
        return type(self)(*(fn(getattr(self, f.name)) for f in fields(self)))

    def __getitem__(self, index) -> ViewPositions:
        return self._apply(lambda t: t[index])

    def __len__(self) -> int:
        return len(self.is_tile)

    def to(self, *args, **kwargs) -> ViewPositions:
        return self._apply(lambda t: t.to(*args, **kwargs))

    def pin_memory(self) -> ViewPositions:  # DataLoader(pin_memory=True) calls it
        return self._apply(torch.Tensor.pin_memory)

    def __eq__(self, other) -> bool:
        return isinstance(other, ViewPositions) and all(
            torch.equal(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))


@dataclass
class TiledImage:
    """The views of one image. View 0 is the global view; tiles follow row-major (row 0 left to right...)."""

    pixels: torch.Tensor  # uint8 (V, C, S, S)
    mask: torch.Tensor  # bool (V, S, S), True on real pixels
    positions: ViewPositions  # V views
    plan: TilePlan


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """(C, h, w) uint8 pixels, laid out channels-last (what the fast resize kernel wants)."""
    return rearrange(torch.from_numpy(np.array(image, dtype=np.uint8)), "h w c -> c h w")  # (C, h, w)


def resize(image: Image.Image | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The one resize every view goes through: antialiased bicubic to (w, h) -> uint8 (C, h, w).
    torch's uint8 channels-last kernel matches PIL's BICUBIC to within rounding and is ~7x faster here."""
    x = _to_tensor(image) if isinstance(image, Image.Image) else image  # (C, h, w)
    if tuple(x.shape[-2:]) == (size[1], size[0]):
        return x
    return F.interpolate(x[None], size=(size[1], size[0]), mode="bicubic", antialias=True)[0]  # (C, h, w)


def _pad(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Zero-pad the last two dims on the bottom / right to (height, width)."""
    out = x.new_zeros((*x.shape[:-2], height, width))  # (..., height, width)
    out[..., : x.shape[-2], : x.shape[-1]] = x
    return out


def _global_view(image: torch.Tensor, cfg: TilingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole image (C, h, w) as one S x S view: stretched, or fitted (may enlarge) top-left and zero-padded."""
    s = cfg.tile_size
    if cfg.global_resize == "stretch":
        return resize(image, (s, s)), torch.ones(s, s, dtype=torch.bool)  # (C, S, S), (S, S)
    if cfg.global_resize != "pad":
        raise ValueError(f"TilingConfig.global_resize must be 'pad' or 'stretch', got {cfg.global_resize!r}")
    h, w = image.shape[-2:]
    long = max(w, h)
    view = resize(image, (max(1, w * s // long), max(1, h * s // long)))  # (C, h', w')
    mask = torch.ones(view.shape[1:], dtype=torch.bool)  # (h', w')
    return _pad(view, s, s), _pad(mask, s, s)  # (C, S, S), (S, S)


def tile_image(image: Image.Image, detail: str = "high", cfg: TilingConfig | None = None, *,
               plan: TilePlan | None = None) -> TiledImage:
    """Cut an RGB image (see `vlm.images.load_image`) into GPT-4V views. `plan`: the plan of the image as it
    was before a reduced-size decode (`draft_size`), so the geometry follows the original size."""
    cfg = cfg or TilingConfig()
    if image.mode != "RGB":
        raise ValueError(f"tile_image expects an RGB image, got mode {image.mode!r}; use vlm.images.to_rgb")
    plan = plan or plan_tiles(image.width, image.height, detail, cfg)
    if plan.detail == "low":
        view, view_mask = _global_view(_to_tensor(image), cfg)
        return TiledImage(view[None], view_mask[None], ViewPositions.global_view(), plan)  # V = 1

    s, (cols, rows) = cfg.tile_size, plan.grid
    resized = resize(image, plan.resized)  # (C, h, w)
    x = _pad(resized, rows * s, cols * s)  # (C, rows*S, cols*S)
    valid = torch.ones(resized.shape[1:], dtype=torch.bool)  # (h, w)
    valid = _pad(valid, rows * s, cols * s)  # (rows*S, cols*S)
    tiles = rearrange(x, "c (r s1) (q s2) -> (r q) c s1 s2", s1=s, s2=s)  # (V-1, C, S, S)
    tile_mask = rearrange(valid, "(r s1) (q s2) -> (r q) s1 s2", s1=s, s2=s)  # (V-1, S, S)
    view, view_mask = _global_view(resized, cfg)  # (C, S, S), (S, S)

    positions = ViewPositions.cat([ViewPositions.global_view(), ViewPositions.grid(rows, cols)])  # V views
    pixels = torch.cat([view[None], tiles])  # (V, C, S, S)
    mask = torch.cat([view_mask[None], tile_mask])  # (V, S, S)
    return TiledImage(pixels, mask, positions, plan)


def tile_video(frames: Sequence[Image.Image], cfg: TilingConfig | None = None) -> TiledImage:
    """A video's frames, in order -> one low-detail global view per frame, numbered 1..F (`ViewPositions.frame`)."""
    cfg = cfg or TilingConfig()
    views = [tile_image(f, "low", cfg) for f in frames]
    positions = ViewPositions.cat([v.positions for v in views])  # F views
    positions.frame = torch.arange(1, len(views) + 1)  # (F,)
    return TiledImage(torch.cat([v.pixels for v in views]), torch.cat([v.mask for v in views]), positions,
                      ClipPlan(len(views), views[0].plan))  # (F, C, S, S), (F, S, S)


def draft_size(plan: TilePlan, cfg: TilingConfig | None = None) -> tuple[int, int]:
    """The smallest decoded size that loses nothing for this plan: a JPEG may be decoded at 1/2, 1/4 or 1/8
    scale (`load_image(..., draft=...)`) down to this, which is faster than decoding in full and resizing."""
    cfg = cfg or TilingConfig()
    if plan.detail == "high":
        return plan.resized
    long = max(plan.width, plan.height)
    return max(1, plan.width * cfg.tile_size // long), max(1, plan.height * cfg.tile_size // long)


def untile(tiled: TiledImage) -> torch.Tensor:
    """Reassemble the tiles into the resized image, uint8 (C, h, w): the inverse of `tile_image`'s cut,
    cropped to the extent of the masks (which must be one top-left rectangle)."""
    cols, rows = tiled.plan.grid
    if tiled.plan.num_tiles == 0:
        raise ValueError("a low-detail image has no tiles to reassemble")
    x = rearrange(tiled.pixels[1:], "(r q) c s1 s2 -> c (r s1) (q s2)", r=rows, q=cols)  # (C, rows*S, cols*S)
    valid = rearrange(tiled.mask[1:], "(r q) s1 s2 -> (r s1) (q s2)", r=rows, q=cols)  # (rows*S, cols*S)
    h, w = int(valid.any(dim=1).sum()), int(valid.any(dim=0).sum())
    if not (valid[:h, :w].all() and int(valid.sum()) == h * w):
        raise ValueError("tile masks do not form one top-left rectangle")
    return x[:, :h, :w]  # (C, h, w)


def patch_mask(mask: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Pixel mask bool (V, S, S) -> feature-cell mask bool (V, gh*gw): a cell is valid if any pixel in it is
    (adaptive max pool, so it also works when S is not a multiple of the patch size)."""
    cells = F.adaptive_max_pool2d(mask.float(), tuple(grid_hw))  # (V, gh, gw)
    return rearrange(cells > 0, "v gh gw -> v (gh gw)")  # (V, gh*gw)
