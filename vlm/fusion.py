"""How visual tokens enter the LM: Flamingo's gated cross-attention, or a BLIP-2 / LLaVA prefix.

One object per fusion kind answers everything that depends on the kind, so the model never branches on it:
- `placeholders(visual_tokens)`: the tokens one image takes in the text (the processor asks it);
- `prepare(embeds, is_image, tokens, ...)`: the LM's input embeddings, and the media of this batch (or None);
- `learns_image_token`: whether the image token gets a learned embedding (`vlm.lm.LearnedTokens`);
- `media.layers(...)`: for one LM call, the functions to run before decoder layers (`vlm.lm` installs them for that
  call only and removes them after it), closed over that call's media. Nothing is kept in a module between calls.
- `metrics()`: what to log about it (the tanh gates), `matmul_tokens(counts)`: the tokens its weights multiply.

Shapes: B samples, T text tokens (of one LM call), I images in the batch, N visual tokens of the batch (flat),
K visual tokens per sample (all its images, zero padded), D visual width, Dl LM hidden width, De LM embedding width,
H heads, d head width.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from vlm.config import FusionConfig
from vlm.layers import FeedForward, GatedFeedForward, attend, attention_probs, merge_heads, split_heads
from vlm.lm import LayerFns


def check_counts(got: torch.Tensor, expected: torch.Tensor, got_name: str, expected_name: str) -> None:
    """Fail loudly, with the counts, when placeholders and visual features disagree (per sample)."""
    if not torch.equal(got, expected):
        bad = (got != expected).nonzero()[:, 0].tolist()
        raise ValueError(
            f"image placeholders and visual features disagree: sample(s) {bad} have {got[bad].tolist()} "
            f"{got_name} in the text but {expected[bad].tolist()} {expected_name} from their images "
            f"(totals {int(got.sum())} vs {int(expected.sum())})")


def per_sample(values: torch.Tensor, images_per_sample: torch.Tensor) -> torch.Tensor:
    """(I,) values of each image -> (B,) their sums per sample."""
    sample_of_image = torch.repeat_interleave(torch.arange(len(images_per_sample), device=values.device),
                                              images_per_sample)  # (I,)
    return torch.zeros_like(images_per_sample).index_add_(0, sample_of_image, values)  # (B,)


# ------------------------------------------------------------------------------------------- cross-attention
KEY_GLOBAL, KEY_TILE_CLASS, KEY_TILE = 0, 1, 2  # what a visual key is: a global-view token, a tile's class token, ...


def head_routing(cfg: FusionConfig) -> torch.Tensor:
    """(H, 3) bool: which key kinds each head attends to (FusionConfig.global_heads / tile_class_heads): global
    heads the global view, tile-class heads the tiles' class tokens, the rest every tile token."""
    sees = torch.zeros(cfg.heads, 3, dtype=torch.bool)  # (H, 3)
    g, c = cfg.global_heads, cfg.global_heads + cfg.tile_class_heads
    sees[:g, KEY_GLOBAL] = True
    sees[g:c, KEY_TILE_CLASS] = True
    sees[c:, KEY_TILE_CLASS] = sees[c:, KEY_TILE] = True
    return sees


def token_kinds(is_tile: torch.Tensor, tokens_per_view: torch.Tensor) -> torch.Tensor:
    """(V,) bool, (V,) tokens of each view -> (N,) each visual token's KEY_* kind (a view's row 0 is its class token,
    vlm/resampler.py)."""
    kind = torch.repeat_interleave(torch.where(is_tile, KEY_TILE, KEY_GLOBAL), tokens_per_view)  # (N,)
    start = torch.repeat_interleave(tokens_per_view.cumsum(0) - tokens_per_view, tokens_per_view)  # (N,)
    first = torch.arange(len(kind), device=kind.device) == start  # (N,) the class token of its view
    return torch.where(first & (kind == KEY_TILE), KEY_TILE_CLASS, kind)  # (N,)


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's GATED XATTN-DENSE: y += tanh(a) * xattn(y, media); y += tanh(b) * ffw(y). Gates start at
    `gate_init` (0 as in Flamingo unless configured). `cfg.block` picks the layout: Flamingo's (LayerNorm, GELU MLP)
    or IDEFICS's (RMSNorms, gated MLP, optional q/k norms, per-channel gates), see `FusionConfig.block`."""

    def __init__(self, cfg: FusionConfig, *, dim: int, media_dim: int):
        super().__init__()
        inner = cfg.heads * cfg.dim_head
        self.heads = cfg.heads
        self.text_only_passthrough = cfg.text_only_passthrough
        idefics = cfg.block == "idefics"
        norm = (lambda d: nn.RMSNorm(d, eps=cfg.norm_eps)) if idefics else (lambda d: nn.LayerNorm(d, eps=cfg.norm_eps))
        self.norm = norm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(media_dim, 2 * inner, bias=False)
        self.q_norm, self.k_norm = (norm(cfg.dim_head), norm(cfg.dim_head)) if cfg.qk_norm else (None, None)
        self.to_out = nn.Linear(inner, dim, bias=False)
        gate = (dim,) if cfg.gate_shape == "vector" else (1,)
        self.attn_gate = nn.Parameter(torch.full(gate, float(cfg.gate_init)))
        hidden = cfg.ff_hidden or dim * cfg.ff_mult
        self.ff = (GatedFeedForward(dim, hidden=hidden, activation_name=cfg.ff_activation, eps=cfg.norm_eps) if idefics
                   else FeedForward(dim, hidden=hidden, activation_name=cfg.ff_activation))
        self.ff_gate = nn.Parameter(torch.full(gate, float(cfg.gate_init)))

    def media_kv(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.to_kv(media).chunk(2, dim=-1)  # 2 x (B, K, H*d)
        k, v = split_heads(k, self.heads), split_heads(v, self.heads)  # 2 x (B, H, K, d)
        return (self.k_norm(k) if self.k_norm is not None else k), v  # the cache holds the normed keys

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        q = split_heads(self.to_q(self.norm(x)), self.heads)  # (B, T, Dl) -> (B, H, T, d)
        return self.q_norm(q) if self.q_norm is not None else q

    def attention_probs(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                        has_media: torch.Tensor) -> torch.Tensor:
        """forward's arguments -> its attention over the media keys (B, H, T, K); 0 on text with no image yet."""
        q = self.queries(x)  # (B, H, T, d)
        return attention_probs(q, kv[0].to(q.dtype), mask) * has_media[:, None]  # (B, H, T, K)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                has_media: torch.Tensor) -> torch.Tensor:
        q = self.queries(x)  # (B, H, T, d)
        out = merge_heads(attend(q, kv[0].to(q.dtype), kv[1].to(q.dtype), mask))  # (B, T, H*d)
        out = self.to_out(out)  # (B, T, Dl)
        if not self.text_only_passthrough:  # open_flamingo / IDEFICS: only the attention is zeroed before any image
            out = out * has_media
        y = x + torch.tanh(self.attn_gate) * out
        y = y + torch.tanh(self.ff_gate) * self.ff(y)
        # text before the first image leaves the block exactly as it came (bit for bit, whatever the gates)
        return torch.where(has_media, y, x) if self.text_only_passthrough else y


@dataclass
class CrossAttentionMedia:
    """One batch's media for the cross-attention blocks, made once per forward or per generated request.

    `kv`: each block's projected keys/values, computed once and reused by every LM call of a request (the media K/V
    cache); None recomputes them at every call (the reference path generation tests compare against)."""

    blocks: nn.ModuleList
    layer_ids: list[int]
    media: torch.Tensor  # (B, K, D) visual tokens per sample, zero padded
    key_image: torch.Tensor  # (B, K) 1-based index of the image each key belongs to within its sample; 0 = pad
    text_time: torch.Tensor  # (B, T) how many images precede (or are at) each prompt token
    only_immediate: bool
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None
    key_kind: torch.Tensor | None = None  # (B, K) KEY_GLOBAL / KEY_TILE_CLASS / KEY_TILE; None: heads not routed
    head_sees: torch.Tensor | None = None  # (H, 3) whether head h attends to keys of each kind

    def layers(self, new_tokens: int = 0, cached: bool = False) -> LayerFns:
        """The pre-layer functions of one LM call: over the prompt (`new_tokens` 0), or a decode step after
        `new_tokens` generated tokens, on the newest token alone (`cached`, the LM's KV cache holds the rest) or on
        the whole sequence. No image arrives while decoding: generated tokens keep the prompt's last image."""
        time = self.text_time  # (B, T)
        if new_tokens:
            last = time[:, -1:]  # (B, 1)
            time = last if cached else torch.cat([time, last.expand(-1, new_tokens)], dim=1)  # (B, 1) / (B, T+n)
        mask, has_media = self.attention_mask(time)
        return {layer: partial(self._block, slot, mask, has_media) for slot, layer in enumerate(self.layer_ids)}

    # ---------------------------------------------------------------- continuous batching (rows leave and join)
    def decoding(self) -> CrossAttentionMedia:
        """The media as decode steps need them: the K/V projected, each row's latest image time only (B, 1)."""
        kv = self.kv if self.kv is not None else [block.media_kv(self.media) for block in self.blocks]
        return CrossAttentionMedia(self.blocks, self.layer_ids, self.media, self.key_image, self.text_time[:, -1:],
                                   self.only_immediate, kv, self.key_kind, self.head_sees)

    def select(self, keep: torch.Tensor) -> CrossAttentionMedia:
        return CrossAttentionMedia(self.blocks, self.layer_ids, self.media[keep], self.key_image[keep],
                                   self.text_time[keep], self.only_immediate, [(k[keep], v[keep]) for k, v in self.kv],
                                   None if self.key_kind is None else self.key_kind[keep], self.head_sees)

    def merge(self, other: CrossAttentionMedia | None, rows: int) -> CrossAttentionMedia:
        """These rows, then `other`'s (`rows` of them; None: rows without images), keys zero-padded to the longer."""
        other = other if other is not None else self.empty(rows)
        K = max(self.media.shape[1], other.media.shape[1])
        pad = lambda x, dim: F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [0, K - x.shape[dim]])  # zeros after, on dim
        cat = lambda a, b, dim: torch.cat([pad(a, dim), pad(b, dim)])
        kind = None if self.key_kind is None else cat(self.key_kind, other.key_kind, 1)
        kv = [(cat(k, k2, 2), cat(v, v2, 2)) for (k, v), (k2, v2) in zip(self.kv, other.kv)]  # (B+B', H, K, d)
        time = torch.cat([self.text_time, other.text_time])  # (B+B', 1)
        return CrossAttentionMedia(self.blocks, self.layer_ids, cat(self.media, other.media, 1),
                                   cat(self.key_image, other.key_image, 1), time, self.only_immediate, kv, kind,
                                   self.head_sees)

    def empty(self, rows: int) -> CrossAttentionMedia:
        """Media for `rows` rows with no image: one padding key each (no token attends to it, has_media is False)."""
        media = self.media.new_zeros(rows, 1, self.media.shape[-1])  # (rows, 1, D)
        none = self.key_image.new_zeros(rows, 1)  # (rows, 1)
        kv = [(k.new_zeros(rows, k.shape[1], 1, k.shape[-1]), v.new_zeros(rows, v.shape[1], 1, v.shape[-1]))
              for k, v in self.kv]
        return CrossAttentionMedia(self.blocks, self.layer_ids, media, none, none.clone(), self.only_immediate, kv,
                                   None if self.key_kind is None else none.clone(), self.head_sees)

    def _block(self, slot: int, mask: torch.Tensor, has_media: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        block = self.blocks[slot]
        kv = self.kv[slot] if self.kv is not None else block.media_kv(self.media)
        return block(hidden, kv, mask, has_media)  # (B, T, Dl)

    def attention_mask(self, text_time: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, T, K) may-attend mask ((B, H, T, K) with routed heads) and (B, T, 1) has-media. Rows with no image
        before them (text_time 0) are opened to every key to keep SDPA finite, then their output is zeroed by
        has_media."""
        kt = self.key_image[:, None, :]  # (B, 1, K)
        tt = text_time[:, :, None]  # (B, T, 1)
        allowed = (kt == tt) if self.only_immediate else (kt <= tt)  # (B, T, K)
        allowed = (allowed & (kt > 0))[:, None]  # (B, 1, T, K)
        if self.key_kind is not None:
            sees = self.head_sees[:, self.key_kind].permute(1, 0, 2)[:, :, None]  # (B, H, 1, K)
            routed = allowed & sees  # (B, H, T, K)
            allowed = torch.where(routed.any(-1, keepdim=True), routed, allowed)  # no tiles: the global view
        has_media = tt > 0  # (B, T, 1)
        return allowed | ~has_media[:, None], has_media  # (B, 1 or H, T, K), (B, T, 1)


class CrossAttentionFusion(nn.Module):
    """Flamingo: gated cross-attention blocks before every n-th decoder layer of the LM; the text holds one `<image>`
    marker per image, whose embedding is learned (`learns_image_token`: the model's `LearnedTokens`)."""

    # vs open_flamingo: the LM's decoder layers are never wrapped or given state (`condition_vis_x`); the blocks run
    # through functions bound to one LM call, so the LM's state_dict keys stay untouched, and the media keys/values
    # are projected once per request, not at every decode step (HF Idefics and open_flamingo recompute them).

    kind = "xattn"
    count_names = ("<image> markers", "images")
    learns_image_token = True  # the marker's embedding trains; the LM's own table has no row for it

    def __init__(self, cfg: FusionConfig, *, lm_dim: int, media_dim: int, num_layers: int):
        super().__init__()
        if min(cfg.global_heads, cfg.tile_class_heads) < 0 or cfg.global_heads + cfg.tile_class_heads >= cfg.heads:
            raise ValueError(f"fusion.global_heads + tile_class_heads must leave a head for all tile tokens: "
                             f"{cfg.global_heads} + {cfg.tile_class_heads} of heads={cfg.heads}")
        self.cfg = cfg
        self.layer_ids = [i for i in range(num_layers) if (i + 1) % cfg.every_n_layers == 0]
        if cfg.layers is not None:
            self.layer_ids = sorted({int(i) % num_layers for i in cfg.layers})  # negative: from the top
        self.blocks = nn.ModuleList(GatedCrossAttentionBlock(cfg, dim=lm_dim, media_dim=media_dim)
                                    for _ in self.layer_ids)

    @staticmethod
    def placeholders(visual_tokens):
        """One marker per image, whatever its visual tokens (an int or an (I,) tensor of them)."""
        return torch.ones_like(visual_tokens) if torch.is_tensor(visual_tokens) else 1

    def prepare(self, embeds: torch.Tensor, is_image: torch.Tensor, tokens: torch.Tensor,
                tokens_per_image: torch.Tensor, images_per_sample: torch.Tensor, *, cache_kv: bool = True,
                token_kind: torch.Tensor | None = None) -> tuple[torch.Tensor, CrossAttentionMedia]:
        """embeds (B, T, De) as they are (the markers' rows are learned tokens), and the media: the flat visual tokens
        (N, D) scattered into per-sample keys (B, K, D), each remembering which image of its sample it came from
        (and, given `token_kind` (N,) of KEY_GLOBAL / KEY_TILE_CLASS / KEY_TILE, what it is, for routed heads)."""
        check_counts(is_image.sum(1), per_sample(self.placeholders(tokens_per_image), images_per_sample),
                     *self.count_names)
        B, dev = is_image.shape[0], tokens.device
        sample_of_image = torch.repeat_interleave(torch.arange(B, device=dev), images_per_sample)  # (I,)
        first_image = images_per_sample.cumsum(0) - images_per_sample  # (B,) index of each sample's 1st image
        rank_in_sample = torch.arange(len(tokens_per_image), device=dev) - first_image[sample_of_image] + 1  # (I,)
        tokens_per_sample = per_sample(tokens_per_image, images_per_sample)  # (B,)
        image_of_token = torch.repeat_interleave(torch.arange(len(tokens_per_image), device=dev),
                                                 tokens_per_image)  # (N,)
        sample_of_token = sample_of_image[image_of_token]  # (N,)
        first_token = tokens_per_sample.cumsum(0) - tokens_per_sample  # (B,)
        slot = torch.arange(len(tokens), device=dev) - first_token[sample_of_token]  # (N,) key index in sample
        media = tokens.new_zeros(B, int(tokens_per_sample.max()), tokens.shape[-1])  # (B, K, D)
        media[sample_of_token, slot] = tokens
        key_image = torch.zeros(media.shape[:2], dtype=torch.long, device=dev)  # (B, K)
        key_image[sample_of_token, slot] = rank_in_sample[image_of_token]
        key_kind, head_sees = None, None
        if self.cfg.global_heads or self.cfg.tile_class_heads:
            if token_kind is None:
                raise ValueError("fusion.global_heads / tile_class_heads route heads by view: prepare() needs "
                                 "token_kind")
            key_kind = torch.zeros(media.shape[:2], dtype=torch.long, device=dev)  # (B, K)
            key_kind[sample_of_token, slot] = token_kind
            head_sees = head_routing(self.cfg).to(dev)  # (H, 3)
        kv = [block.media_kv(media) for block in self.blocks] if cache_kv and self.cfg.cache_media_kv else None
        return embeds, CrossAttentionMedia(self.blocks, self.layer_ids, media, key_image, is_image.long().cumsum(1),
                                           self.cfg.only_immediate, kv, key_kind, head_sees)

    def metrics(self) -> dict[str, float]:
        """tanh of each gate (the mean over channels of a vector gate), by the decoder layer it precedes."""
        out = {}
        for kind in ("attn", "ff"):
            out |= {f"gate/{kind}_{layer}": torch.tanh(getattr(b, f"{kind}_gate")).mean().item()
                    for layer, b in zip(self.layer_ids, self.blocks)}
        return out

    @staticmethod
    def matmul_tokens(counts: Counter) -> int:
        """The tokens its weights multiply (for FLOPs): the text, padding included (the media K/V is left out)."""
        return counts["padded_text_tokens"]


# ------------------------------------------------------------------------------------------------------- prefix
class PrefixFusion(nn.Module):
    """BLIP-2 / LLaVA: the visual tokens, projected to the LM's embedding width, replace the image's placeholders
    (one per visual token) in the LM's input."""

    kind = "prefix"
    count_names = ("image placeholder tokens", "visual tokens")
    learns_image_token = False  # its placeholders' rows are the visual tokens

    def __init__(self, cfg: FusionConfig, *, media_dim: int, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        if cfg.projector == "linear":
            self.proj = nn.Linear(media_dim, embed_dim)
        else:  # LLaVA-1.5's two-layer MLP
            self.proj = nn.Sequential(nn.Linear(media_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim))

    @staticmethod
    def placeholders(visual_tokens):
        """One placeholder per visual token."""
        return visual_tokens

    def prepare(self, embeds: torch.Tensor, is_image: torch.Tensor, tokens: torch.Tensor,
                tokens_per_image: torch.Tensor, images_per_sample: torch.Tensor, *, cache_kv: bool = True,
                token_kind: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        check_counts(is_image.sum(1), per_sample(self.placeholders(tokens_per_image), images_per_sample),
                     *self.count_names)
        visual = self.proj(tokens).to(embeds.dtype)  # (N, D) -> (N, De)
        return embeds.masked_scatter(is_image[..., None], visual), None  # (B, T, De)

    def metrics(self) -> dict[str, float]:
        return {}

    @staticmethod
    def matmul_tokens(counts: Counter) -> int:
        return counts["visual_tokens"]


FUSIONS: dict[str, type[nn.Module]] = {"xattn": CrossAttentionFusion, "prefix": PrefixFusion}


def fusion_class(kind: str) -> type[nn.Module]:
    if kind not in FUSIONS:
        raise ValueError(f"fusion.kind must be one of {sorted(FUSIONS)}, got {kind!r}")
    return FUSIONS[kind]


def build_fusion(cfg: FusionConfig, *, lm, media_dim: int) -> nn.Module:
    """The fusion `cfg.kind` names, for the LM adapter `lm` (its widths and depth) and the visual width."""
    if fusion_class(cfg.kind) is PrefixFusion:
        return PrefixFusion(cfg, media_dim=media_dim, embed_dim=lm.embed_dim)
    if not lm.layers:
        raise ValueError(f"fusion.kind=xattn needs decoder layers to put blocks before; this {lm.kind} LM adapter "
                         f"has none (use model.fusion.kind=prefix, BLIP-2's way into an encoder-decoder LM)")
    return CrossAttentionFusion(cfg, lm_dim=lm.hidden_size, media_dim=media_dim, num_layers=len(lm.layers))
