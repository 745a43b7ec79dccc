"""Encoder features of every view -> visual tokens: the two resamplers (one per token budget) and where each view sits.

Shapes: V views (global views + tiles of the batch), P patches per view, L tokens per view (queries + class token:
Lg = 65 for a global view, Lt = 129 for a tile), N visual tokens of the batch (flat), Dv vision width, D resampler
width, G video clips resampled whole (`video.resample=clip`), F frames of a clip.

This is the one place that dispatches views to the resampler of their budget; stage 0 (`vlm.vision_pretrain`) calls
`resample` too, so it trains what the VLM then uses.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from vlm.config import VLMConfig
from vlm.resampler import build_resampler, init_queries
from vlm.tiling import ViewPositions, token_budget


class ViewEmbedding(nn.Module):
    """Where a view sits: learned embeddings of its tile row and column counted from both ends of the grid, plus a
    global-vs-tile embedding, plus (videos, `VideoConfig.temporal_embeddings`) its frame's index, added to every token
    of the view."""

    # vs UReader (row, col only): counting from the far edge too makes "rightmost" / "bottom" one embedding whatever
    # the grid's size (2 to 8 columns).

    def __init__(self, dim: int, max_grid: int, *, tile_positions: bool = True, view_type: bool = True,
                 std: float = 0.02, frames: int = 0):
        super().__init__()
        self.grid = nn.ModuleList(nn.Embedding(max_grid, dim) for _ in range(4)) if tile_positions else None
        self.view_type = nn.Embedding(2, dim) if view_type else None
        self.time = nn.Embedding(frames, dim) if frames else None  # a video frame's index (temporal embedding)
        for emb in [*(self.grid or []), self.view_type, self.time]:
            if emb is not None:
                nn.init.normal_(emb.weight, std=std)

    def forward(self, tokens: torch.Tensor, positions: ViewPositions) -> torch.Tensor:
        """tokens (V, L, D) of the views `positions` describes."""
        emb = torch.zeros_like(tokens[:, 0])  # (V, D)
        if self.view_type is not None:
            emb = emb + self.view_type(positions.is_tile)
        if self.grid is not None:
            p = positions
            is_tile = p.is_tile[:, None].to(tokens.dtype)  # (V, 1): the global view gets no grid position
            for emb_k, index in zip(self.grid, (p.row, p.col, p.rows - 1 - p.row, p.cols - 1 - p.col)):
                emb = emb + is_tile * emb_k(index.clamp(min=0))  # (V, D)
        if self.time is not None:
            in_video = (positions.frame > 0)[:, None].to(tokens.dtype)  # (V, 1): still images get none
            emb = emb + in_video * self.time((positions.frame - 1).clamp(min=0))  # (V, D)
        return tokens + emb[:, None]  # (V, L, D)


class VisualTokens(nn.Module):
    """The global-view resampler, the tile resampler (or, with `share_resamplers`, one body and the tile budget's own
    queries) and the view embedding."""

    def __init__(self, cfg: VLMConfig, media_dim: int):
        super().__init__()
        self.budget = token_budget(cfg)
        self.global_resampler = build_resampler(cfg.global_resampler, media_dim)
        if cfg.share_resamplers:  # one body, two query sets
            self.tile_resampler = None
            std = self.global_resampler.queries.detach().std().item()  # the same init as the shared body's own queries
            self.tile_queries = init_queries(cfg.tile_resampler.num_tokens, self.global_resampler.out_dim, std=std)
        else:
            self.tile_resampler = build_resampler(cfg.tile_resampler, media_dim)
            if self.tile_resampler.out_dim != self.global_resampler.out_dim:
                raise ValueError(f"global and tile resamplers must emit the same width, got "
                                 f"{self.global_resampler.out_dim} and {self.tile_resampler.out_dim}")
        self.out_dim = self.global_resampler.out_dim
        video = cfg.video
        self.clip = video.resample == "clip"
        per_frame_time = video.temporal_embeddings and not self.clip
        self.view_embedding = ViewEmbedding(self.out_dim, cfg.tiling.max_grid,
                                            tile_positions=cfg.tile_position_embeddings,
                                            view_type=cfg.view_type_embedding, std=cfg.view_embedding_std,
                                            frames=video.max_frames if per_frame_time else 0)
        # a clip's temporal embeddings go on its frames' features, before the resampler (Flamingo)
        self.clip_time = None
        if self.clip and video.temporal_embeddings:
            self.clip_time = nn.Embedding(video.max_frames, media_dim)
            nn.init.normal_(self.clip_time.weight, std=cfg.view_embedding_std)

    def resamplers(self) -> list[nn.Module]:
        return [m for m in (self.global_resampler, self.tile_resampler) if m is not None]

    def resample(self, feats: torch.Tensor, mask: torch.Tensor, *, tiles: bool) -> torch.Tensor:
        """Views of one budget, (V, P, Dv) features and (V, P) patch mask -> (V, L, D) tokens, no view embedding."""
        if not tiles:
            return self.global_resampler(feats, mask)  # (V, Lg, D)
        if self.tile_resampler is None:
            return self.global_resampler(feats, mask, latents=self.tile_queries)  # (V, Lt, D)
        return self.tile_resampler(feats, mask)  # (V, Lt, D)

    def _resample_clips(self, feats: torch.Tensor, mask: torch.Tensor, positions: ViewPositions,
                        first: torch.Tensor) -> torch.Tensor:
        """Each clip's frames (consecutive views numbered 1..F from `first`) as one media sequence, with their temporal
        embeddings, into one global-resampler call: (G, Lg, D)."""
        frames = torch.diff(torch.cat([first, first.new_tensor([len(positions)])]))  # (G,) views up to the next clip
        frames = torch.stack([(positions.frame[s:s + n] > 0).sum() for s, n in zip(first.tolist(), frames.tolist())])
        F_max, P = int(frames.max()), feats.shape[1]
        media = feats.new_zeros(len(first), F_max, P, feats.shape[-1])  # (G, F, P, Dv)
        media_mask = mask.new_zeros(len(first), F_max, P)  # (G, F, P)
        for c, (s, n) in enumerate(zip(first.tolist(), frames.tolist())):
            media[c, :n], media_mask[c, :n] = feats[s:s + n], mask[s:s + n]
        if self.clip_time is not None:
            media = media + self.clip_time.weight[:F_max, None].to(media.dtype)  # (G, F, P, Dv)
        media = rearrange(media, "g f p d -> g (f p) d")  # (G, F*P, Dv)
        return self.global_resampler(media, rearrange(media_mask, "g f p -> g (f p)"))  # (G, Lg, D)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor, positions: ViewPositions) -> torch.Tensor:
        """Every view of the batch, (V, P, Dv) and (V, P) -> its tokens, view after view (N, D): one batched resampler
        call per budget, never a loop over views."""
        is_tile = positions.is_tile.bool()  # (V,)
        lens = self.budget.views(positions)  # (V,)
        starts = lens.cumsum(0) - lens  # (V,) where each view's tokens begin in the flat stream
        dtype = next(self.global_resampler.parameters()).dtype
        out = feats.new_zeros(int(lens.sum()), self.out_dim, dtype=dtype)  # (N, D)
        in_clip = positions.frame > 0 if self.clip else torch.zeros_like(is_tile)  # (V,) frames resampled as clips
        if bool(in_clip.any()):
            first = (positions.frame == 1).nonzero()[:, 0]  # (G,) each clip's first frame
            z = self._resample_clips(feats, mask, positions, first)  # (G, Lg, D)
            z = self.view_embedding(z, positions[first])  # (G, Lg, D)
            dest = rearrange(starts[first, None] + torch.arange(z.shape[1], device=first.device), "g l -> (g l)")
            out = out.index_copy(0, dest, rearrange(z, "g l d -> (g l) d").to(out.dtype))  # (N, D)
        for tiles, n in ((False, self.budget.global_view), (True, self.budget.tile)):
            idx = ((is_tile if tiles else ~is_tile) & ~in_clip).nonzero()[:, 0]  # (n,)
            if idx.numel() == 0:
                continue
            z = self.resample(feats[idx], mask[idx], tiles=tiles)  # (n, L, D)
            z = self.view_embedding(z, positions[idx])  # (n, L, D)
            dest = rearrange(starts[idx, None] + torch.arange(n, device=idx.device), "n l -> (n l)")  # (n*L,)
            out = out.index_copy(0, dest, rearrange(z, "n l d -> (n l) d").to(out.dtype))  # (N, D)
        return out
