"""Fusion of visual tokens into a frozen causal LM: Flamingo gated cross-attention, or a BLIP-2/LLaVA prefix.

Shapes: B batch, T text tokens, K visual tokens per sample (all its images, padded), I images in the batch,
D visual width, Dl LM hidden width, De LM embedding width, H heads, d head width.

xattn differs from open_flamingo in two ways. (1) Instead of wrapping decoder layers and stashing vision
features in them (`condition_vis_x`), we register forward pre-hooks on the LM's own decoder layers, so its
state_dict keys stay untouched, and the media reaches them through `XAttnFusion.media(...)`, a context that
lives for exactly one LM call. (2) Media keys/values are projected once per request and reused at every
decode step (`MediaState.kv`); HF Idefics and open_flamingo recompute them each step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from vlm.config import FusionConfig
from vlm.layers import FeedForward, attend, merge_heads, split_heads


@dataclass
class MediaState:
    """Everything the cross-attention layers need for one LM call (prefill, decode step or training step)."""

    media: torch.Tensor  # (B, K, D) visual tokens per sample, zero padded
    key_image: torch.Tensor  # (B, K) 1-based index of the image each key belongs to within its sample; 0 = pad
    text_time: torch.Tensor  # (B, T) how many images precede (or are at) each text token of this call
    only_immediate: bool = True
    cache_kv: bool = True
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> (k, v)

    def attention_mask(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, T, K) may-attend mask and (B, T, 1) has-media. Rows with no image before them (text_time 0)
        are opened to every key to keep SDPA finite, then their output is zeroed by has_media."""
        kt = self.key_image[:, None, :]  # (B, 1, K)
        tt = self.text_time[:, :, None]  # (B, T, 1)
        allowed = (kt == tt) if self.only_immediate else (kt <= tt)  # (B, T, K)
        allowed = allowed & (kt > 0)
        has_media = tt > 0  # (B, T, 1)
        return (allowed | ~has_media)[:, None], has_media  # (B, 1, T, K), (B, T, 1)


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's GATED XATTN-DENSE: y += tanh(a) * xattn(y, media); y += tanh(b) * ffw(y). Gates start at
    `gate_init` (0 as in Flamingo unless configured)."""

    def __init__(self, *, dim: int, media_dim: int, heads: int, dim_head: int, ff_mult: int, gate_init: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(media_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.attn_gate = nn.Parameter(torch.full((1,), float(gate_init)))
        self.ff = FeedForward(dim, mult=ff_mult, activation_name="gelu")
        self.ff_gate = nn.Parameter(torch.full((1,), float(gate_init)))

    def media_kv(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.to_kv(media).chunk(2, dim=-1)  # 2 x (B, K, H*d)
        return split_heads(k, self.heads), split_heads(v, self.heads)  # 2 x (B, H, K, d)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                has_media: torch.Tensor) -> torch.Tensor:
        q = split_heads(self.to_q(self.norm(x)), self.heads)  # (B, H, T, d)
        out = merge_heads(attend(q, kv[0].to(q.dtype), kv[1].to(q.dtype), mask))  # (B, T, H*d)
        out = self.to_out(out) * has_media  # (B, T, Dl); text before the first image gets nothing
        x = x + torch.tanh(self.attn_gate) * out
        return x + torch.tanh(self.ff_gate) * self.ff(x)


class XAttnFusion(nn.Module):
    """Gated cross-attention blocks before every n-th decoder layer of the LM, installed as pre-hooks."""

    def __init__(self, cfg: FusionConfig, *, lm_dim: int, media_dim: int, num_layers: int):
        super().__init__()
        self.cfg = cfg
        self.layer_ids = [i for i in range(num_layers) if (i + 1) % cfg.every_n_layers == 0]
        self.blocks = nn.ModuleList(
            GatedCrossAttentionBlock(dim=lm_dim, media_dim=media_dim, heads=cfg.heads, dim_head=cfg.dim_head,
                                     ff_mult=cfg.ff_mult, gate_init=cfg.gate_init)
            for _ in self.layer_ids
        )
        self._state: MediaState | None = None
        self._mask: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handles = []

    def attach(self, layers: nn.ModuleList) -> None:
        """Install the pre-hooks on the LM's decoder layers (found generically by `find_layer_stack`)."""
        for h in self._handles:
            h.remove()
        self._handles = [
            layers[layer].register_forward_pre_hook(self._hook(slot), with_kwargs=True)
            for slot, layer in enumerate(self.layer_ids)
        ]

    def _hook(self, slot: int):
        def pre_hook(module, args, kwargs):
            state = self._state
            if state is None:  # the LM used on its own: untouched
                return None
            block = self.blocks[slot]
            kv = state.kv.get(slot) if state.cache_kv else None
            if kv is None:
                kv = block.media_kv(state.media)
                if state.cache_kv:
                    state.kv[slot] = kv
            if args:
                return (block(args[0], kv, *self._mask), *args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = block(kwargs["hidden_states"], kv, *self._mask)
            return args, kwargs

        return pre_hook

    @contextlib.contextmanager
    def media(self, state: MediaState | None):
        """Make `state` visible to the decoder-layer hooks for the duration of one LM call."""
        if state is None:
            yield
            return
        self._state, self._mask = state, state.attention_mask()
        try:
            yield
        finally:
            self._state, self._mask = None, None

    def gates(self) -> dict[str, float]:
        return {f"gate/attn_{layer}": torch.tanh(b.attn_gate).item() for layer, b in zip(self.layer_ids,
                                                                                          self.blocks)} | {
            f"gate/ff_{layer}": torch.tanh(b.ff_gate).item() for layer, b in zip(self.layer_ids, self.blocks)}


class PrefixProjector(nn.Module):
    """BLIP-2 / LLaVA: project visual tokens to the LM's embedding width; the model splices them in."""

    def __init__(self, cfg: FusionConfig, *, media_dim: int, embed_dim: int):
        super().__init__()
        if cfg.projector == "linear":
            self.proj = nn.Linear(media_dim, embed_dim)
        else:  # LLaVA-1.5's two-layer MLP
            self.proj = nn.Sequential(nn.Linear(media_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens)  # (N, D) -> (N, De)
