"""Visual resamplers: the patch features of each view -> a fixed budget of tokens per view.

`PerceiverResampler` (Flamingo) and `QFormer` (BLIP-2) share one interface:

    forward(media (V, P, Dv), mask (V, P) bool | None, latents (L, D) | None) -> (V, L, D)

`mask` is True for real patches (the padded patches of partial tiles are False) and is honoured in every
attention over the media. `latents` overrides the module's own learned queries, so two token budgets can
share one resampler's weights while each keeps its own queries.

The class token: each module owns ONE learned parameter, `queries`, of shape (num_queries + 1, D). Row 0 is
the class token, an extra learned query treated exactly like the others, and rows 1.. are the queries; so
output row 0 is the class token and L = cfg.num_tokens = num_queries + 1.

Shapes: V views (the batch), P patches per view, L latents / queries (class token included), D working
width, Dv media width, H heads, d head width; a Perceiver block's keys are the P patches and the L latents (P+L).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from vlm.config import QFormerTextConfig, ResamplerConfig
from vlm.layers import FeedForward, activation, attend, attention_probs, merge_heads, split_heads

QFORMER_DEFAULT_DIM = 768  # BERT-base width, as BLIP-2's Q-Former
PERCEIVER_LN_EPS = 1e-5  # torch's default, as Flamingo / Idefics


def init_queries(num_tokens: int, dim: int, *, std: float = 1.0) -> nn.Parameter:
    """The learned queries, class token first: (num_tokens, D) ~ N(0, std^2)."""
    return nn.Parameter(torch.randn(num_tokens, dim) * std)  # (L, D)


def _media_key_mask(mask: Tensor | None, extra: int = 0) -> Tensor | None:
    """(V, P) padding mask -> (V, 1, 1, P + extra) bool for `attend`; the `extra` keys (Perceiver latents)
    are always real. With no extra keys, a view whose patches are all padding would give NaN rows, so such a
    view attends to all its patches instead (its tokens are meaningless either way, but finite)."""
    if mask is None:
        return None
    mask = mask.bool()
    if not extra:
        mask = mask | ~mask.any(dim=-1, keepdim=True)  # (V, P): an all-padding view keeps every key
    else:
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], extra)], dim=-1)  # (V, P + extra)
    return rearrange(mask, "v t -> v 1 1 t")  # (V, 1, 1, P+L)


def _check_latents(latents: Tensor, dim: int) -> None:
    if latents.ndim != 2 or latents.shape[-1] != dim:
        raise ValueError(f"latents must be (L, {dim}); got {tuple(latents.shape)}")


def _cells(n: int) -> tuple[int, int]:
    """The most square (rows, cols) grid of n cells, rows <= cols: 64 -> (8, 8), 128 -> (8, 16)."""
    rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    return rows, n // rows


def start_latents(pool: PooledQueries | None, queries: Tensor, media: Tensor, mask: Tensor | None) -> Tensor:
    """(V, L, D) latents a resampler starts from: its queries for every view, plus pooled media when configured."""
    if pool is None:
        return repeat(queries, "l d -> v l d", v=media.shape[0])  # (L, D) -> (V, L, D)
    return pool(queries, media, mask)  # (V, L, D)


class PooledQueries(nn.Module):
    """Queries (L, D) + the media pooled into L cells -> (V, L, D) per-view latents.

    Query 1 + k gets the masked mean of cell k of the square patch grid (row-major), the class token the masked
    mean of the whole view; LayerNorm, then a projection media_dim -> D. Plain resamplers start with every
    latent averaging the whole view (near-identical tokens for every image) and must learn locality first
    (Honeybee, Cha et al. 2024); here each token starts as "what is in my cell".
    """

    def __init__(self, media_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(media_dim, dim)

    def forward(self, queries: Tensor, media: Tensor, mask: Tensor | None) -> Tensor:
        v, p, _ = media.shape
        side = math.isqrt(p)
        if side * side != p:
            raise ValueError(f"pooled_queries needs a square patch grid; got {p} patches")
        w = media.new_ones(v, p) if mask is None else mask.to(media.dtype)  # (V, P)
        grid = rearrange(media * w[..., None], "v (h w) d -> v d h w", h=side)  # (V, Dv, side, side)
        weight = rearrange(w, "v (h w) -> v 1 h w", h=side)  # (V, 1, side, side)
        shape = _cells(queries.shape[0] - 1)  # from the queries: shared resamplers pool per token budget
        cells = F.adaptive_avg_pool2d(grid, shape) / F.adaptive_avg_pool2d(weight, shape).clamp_min(1e-6)
        whole = (media * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)  # (V, Dv)
        pooled = torch.cat([whole[:, None], rearrange(cells, "v d h w -> v (h w) d")], dim=1)  # (V, L, Dv)
        return queries + self.proj(F.layer_norm(pooled, pooled.shape[-1:]))  # (L, D) + (V, L, D) -> (V, L, D)


class PerceiverLayer(nn.Module):
    """One Flamingo block: the latents attend to concat(media, latents) (pre-norm, no bias on q/k/v/out,
    optional per-head qk LayerNorm), residual; then a pre-norm feed-forward, residual.

    Takes the media already normalised *without* affine (`media_hat`, computed once for all blocks) and folds
    this block's `norm_media` scale and shift into the media k and v projections: to_k(norm_media(media)) =
    media_hat @ (W * gamma)^T + W @ beta. Same function, but with a frozen encoder (media without grad) the
    backward never needs the (V, P, D) input gradient of those projections, the largest GEMMs of the block.
    k and v stay separate projections: splitting one fused kv output costs two extra copies in the backward.
    """

    # vs IdeficsPerceiverAttention: media LayerNorm folded into k/v + SDPA (speed); a padding mask for tiles.

    def __init__(self, *, dim: int, heads: int, dim_head: int, ff_mult: int, activation_name: str,
                 qk_norm: bool, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dropout = heads, dropout
        self.norm_media = nn.LayerNorm(dim, eps=PERCEIVER_LN_EPS)  # affine only: normalised once, upstream
        self.norm_latents = nn.LayerNorm(dim, eps=PERCEIVER_LN_EPS)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.q_norm = nn.LayerNorm(dim_head) if qk_norm else None
        self.k_norm = nn.LayerNorm(dim_head) if qk_norm else None
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.ff = FeedForward(dim, mult=ff_mult, activation_name=activation_name, bias=False)

    def _qk(self, media_hat: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        q = split_heads(self.to_q(x), self.heads)  # (V, L, D) -> (V, H, L, d)
        k = split_heads(self._media_and_latents(self.to_k, media_hat, x), self.heads)  # (V, H, P+L, d)
        return (self.q_norm(q), self.k_norm(k)) if self.q_norm is not None else (q, k)

    def attention_probs(self, media_hat: Tensor, latents: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """forward's arguments -> the latents' attention over [media; latents] (V, H, L, P+L) (`vlm.explain`)."""
        return attention_probs(*self._qk(media_hat, self.norm_latents(latents)), key_mask)

    def forward(self, media_hat: Tensor, latents: Tensor, key_mask: Tensor | None = None) -> Tensor:
        x = self.norm_latents(latents)
        q, k = self._qk(media_hat, x)  # (V, H, L, d), (V, H, P+L, d)
        v = split_heads(self._media_and_latents(self.to_v, media_hat, x), self.heads)  # (V, H, P+L, d)
        out = attend(q, k, v, key_mask, dropout_p=self.dropout if self.training else 0.0)  # (V, H, L, d)
        latents = latents + self.to_out(merge_heads(out))  # (V, H, L, d) -> (V, L, D)
        return latents + self.ff(latents)

    def _media_and_latents(self, proj: nn.Linear, media_hat: Tensor, x: Tensor) -> Tensor:
        """proj(concat(norm_media(media), x)), norm_media's affine folded into proj for the media rows."""
        w, gamma, beta = proj.weight, self.norm_media.weight, self.norm_media.bias
        media = F.linear(media_hat, w * gamma, w @ beta)  # (V, P, D) -> (V, P, H*d)
        return torch.cat([media, proj(x)], dim=1)  # (V, P, H*d) + (V, L, H*d) -> (V, P+L, H*d)


class PerceiverResampler(nn.Module):
    """Flamingo's Perceiver Resampler: learned latents cross-attend to the media (plus themselves).

    Owns one learned parameter `queries` (num_queries + 1, D): row 0 is the class token (an extra learned
    query), rows 1.. the queries; output row 0 is the class token. Width D = cfg.dim or media_dim; an input
    projection media_dim -> D exists only when they differ. `cfg.dropout` is attention-probability dropout.
    """

    # vs IdeficsPerceiverResampler: media mask, `latents` override (weight sharing), input proj, any act.

    def __init__(self, cfg: ResamplerConfig, media_dim: int):
        super().__init__()
        dim = cfg.dim or media_dim
        self.cfg, self.media_dim, self.out_dim = cfg, media_dim, dim
        self.proj_in = nn.Linear(media_dim, dim) if dim != media_dim else None
        # std 1 as Flamingo / Idefics; with pooled queries the media pooling carries the content, the queries
        # only tell the cells apart (std 0.02, as BLIP-2's)
        self.queries = init_queries(cfg.num_tokens, dim, std=0.02 if cfg.pooled_queries else 1.0)
        self.pool = PooledQueries(dim, dim) if cfg.pooled_queries else None  # after proj_in
        self.layers = nn.ModuleList(
            PerceiverLayer(dim=dim, heads=cfg.heads, dim_head=cfg.dim_head, ff_mult=cfg.ff_mult,
                           activation_name=cfg.activation, qk_norm=cfg.qk_norm, dropout=cfg.dropout)
            for _ in range(cfg.depth)
        )
        self.norm_out = nn.LayerNorm(dim, eps=PERCEIVER_LN_EPS)

    def forward(self, media: Tensor, mask: Tensor | None = None, latents: Tensor | None = None) -> Tensor:
        queries = self.queries if latents is None else latents
        _check_latents(queries, self.out_dim)
        if self.proj_in is not None:
            media = self.proj_in(media)  # (V, P, Dv) -> (V, P, D)
        media_hat = F.layer_norm(media, media.shape[-1:], eps=PERCEIVER_LN_EPS)  # (V, P, D), affine in blocks
        x = start_latents(self.pool, queries, media, mask)  # (V, L, D)
        key_mask = _media_key_mask(mask, extra=queries.shape[0])  # (V, 1, 1, P + L): latents always real
        for layer in self.layers:
            x = layer(media_hat, x, key_mask)
        return self.norm_out(x)


class QFormerAttention(nn.Module):
    """A BERT attention sub-layer, post-LN: LayerNorm(x + dropout(dense(attention))). Self-attention over the
    queries when `context_dim` is None, else cross-attention from the queries to the media."""

    # vs Blip2QFormerAttention: one fused qkv GEMM for self-attention over the queries (speed); bool mask.

    def __init__(self, *, dim: int, heads: int, eps: float, dropout: float, context_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"Q-Former width {dim} is not a multiple of heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.is_cross = context_dim is not None
        if self.is_cross:
            self.to_q = nn.Linear(dim, dim)
            self.to_k = nn.Linear(context_dim, dim)  # k, v unfused: splitting a fused kv of the media costs
            self.to_v = nn.Linear(context_dim, dim)  # two big copies in the backward
        else:
            self.to_qkv = nn.Linear(dim, 3 * dim)
        self.dense = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def attention_probs(self, x: Tensor, context: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """A cross-attention's forward arguments -> the queries' attention over the media (V, H, L, P)."""
        q = split_heads(self.to_q(x), self.heads)  # (V, L, D) -> (V, H, L, d)
        return attention_probs(q, split_heads(self.to_k(context), self.heads), key_mask)  # (V, H, L, P)

    def forward(self, x: Tensor, context: Tensor | None = None, key_mask: Tensor | None = None) -> Tensor:
        if self.is_cross:
            q = split_heads(self.to_q(x), self.heads)  # (V, L, D) -> (V, H, L, d)
            k = split_heads(self.to_k(context), self.heads)  # (V, P, Dv) -> (V, H, P, d)
            v = split_heads(self.to_v(context), self.heads)  # (V, P, Dv) -> (V, H, P, d)
        else:
            qkv = self.to_qkv(x)  # (V, L, D) -> (V, L, 3*H*d)
            q, k, v = rearrange(qkv, "v l (n h d) -> n v h l d", n=3, h=self.heads)  # 3 x (V, H, L, d)
        out = attend(q, k, v, key_mask, dropout_p=self.dropout if self.training else 0.0)  # (V, H, L, d)
        return self.norm(x + self.drop(self.dense(merge_heads(out))))  # (V, H, L, d) -> (V, L, D)


class QFormerLayer(nn.Module):
    """Self-attention, optional cross-attention to the media, then the BERT feed-forward; all post-LN.

    With a text branch (`text=True`) the input is [queries; text]: one self-attention over both (its mask says who
    sees whom: `stage1_mask`), cross-attention for the query rows only, and a feed-forward per branch."""

    # vs Blip2QFormerLayer: no chunking; the query rows alone when there is no text (the stage-2 resampler).

    def __init__(self, *, dim: int, heads: int, ff_mult: int, activation_name: str, eps: float,
                 dropout: float, media_dim: int | None, text: bool = False):
        super().__init__()
        attn = dict(dim=dim, heads=heads, eps=eps, dropout=dropout)
        self.self_attn = QFormerAttention(**attn)
        self.cross_attn = QFormerAttention(**attn, context_dim=media_dim) if media_dim is not None else None
        self.ff_in = nn.Linear(dim, ff_mult * dim)
        self.act = activation(activation_name)  # "gelu" is the exact erf GELU, as BERT
        self.ff_out = nn.Linear(ff_mult * dim, dim)
        self.ff_drop = nn.Dropout(dropout)
        self.ff_norm = nn.LayerNorm(dim, eps=eps)
        if text:  # BLIP-2's `intermediate` / `output`: the text rows' own feed-forward
            self.text_ff_in = nn.Linear(dim, ff_mult * dim)
            self.text_ff_out = nn.Linear(ff_mult * dim, dim)
            self.text_ff_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor, media: Tensor | None, key_mask: Tensor | None = None, *,
                num_queries: int | None = None, self_mask: Tensor | None = None) -> Tensor:
        """x (V, L+T, D): `num_queries` = L query rows (None: all rows are queries), then T text rows; `self_mask`
        (V, 1, L+T, L+T) bool for the self-attention, `key_mask` (V, 1, 1, P) for the cross-attention."""
        n = x.shape[1] if num_queries is None else num_queries
        x = self.self_attn(x, key_mask=self_mask)  # (V, L+T, D)
        q, t = x[:, :n], x[:, n:]  # (V, L, D), (V, T, D)
        if self.cross_attn is not None and n:
            q = self.cross_attn(q, media, key_mask)
        q = self._ff(q, self.ff_in, self.ff_out, self.ff_norm)
        if not t.shape[1]:
            return q
        t = self._ff(t, self.text_ff_in, self.text_ff_out, self.text_ff_norm)
        return torch.cat([q, t], dim=1)  # (V, L+T, D)

    def _ff(self, x: Tensor, ff_in: nn.Linear, ff_out: nn.Linear, norm: nn.LayerNorm) -> Tensor:
        h = self.act(ff_in(x))  # (V, M, D) -> (V, M, ff_mult*D)
        return norm(x + self.ff_drop(ff_out(h)))  # (V, M, ff_mult*D) -> (V, M, D)


STAGE1_MODES = ("itc", "itm", "itg")


def stage1_mask(mode: str, num_queries: int, text_mask: Tensor) -> Tensor:
    """BLIP-2 stage 1's self-attention mask over [queries; text], (V, T) text padding -> (V, 1, L+T, L+T) bool
    (True: the row may attend to the column):
    - itc, uni-modal: queries see the queries, text sees the text;
    - itg, multimodal causal: queries see the queries, a text token sees every query and the text up to itself;
    - itm, bidirectional: everything sees everything.
    Padded text is never a key."""
    if mode not in STAGE1_MODES:
        raise ValueError(f"unknown stage-1 mask {mode!r}; choose one of {STAGE1_MODES}")
    v, t = text_mask.shape
    pos = torch.arange(num_queries + t, device=text_mask.device)  # (L+T,)
    is_query = pos < num_queries  # (L+T,)
    if mode == "itm":
        allowed = torch.ones(len(pos), len(pos), dtype=torch.bool, device=pos.device)  # (L+T, L+T)
    elif mode == "itc":
        allowed = is_query[:, None] == is_query[None, :]  # (L+T, L+T)
    else:  # itg: a query row sees query keys; a text row every key up to itself (all the queries come first)
        allowed = is_query[None, :] | (~is_query[:, None] & (pos[None, :] <= pos[:, None]))  # (L+T, L+T)
    keys = torch.cat([text_mask.new_ones(v, num_queries), text_mask], dim=1).bool()  # (V, L+T)
    return rearrange(allowed[None] & keys[:, None, :], "v m r -> v 1 m r")  # (V, 1, L+T, L+T)


class QFormerTextEmbeddings(nn.Module):
    """BERT's word + absolute position embeddings (no token types: BERT's type-0 row is folded into the positions
    on import); the Q-Former's input LayerNorm normalises them with the queries."""

    def __init__(self, cfg: QFormerTextConfig, dim: int):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, dim, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_positions, dim)

    def forward(self, input_ids: Tensor) -> Tensor:
        if input_ids.shape[1] > self.position.num_embeddings:
            raise ValueError(f"text of {input_ids.shape[1]} tokens; the Q-Former has {self.position.num_embeddings} "
                             f"positions")
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        return self.word(input_ids) + self.position(pos)  # (V, T, D)


class QFormer(nn.Module):
    """BLIP-2's Querying Transformer: learned queries, LayerNorm + dropout, then BERT-style post-LN layers of
    self-attention, cross-attention to the media in layers i % cross_attention_freq == 0, and a feed-forward.

    Owns one learned parameter `queries` (num_queries + 1, D): row 0 is the class token (an extra learned
    query), rows 1.. the queries; output row 0 is the class token. Width D = cfg.dim or 768, head width
    D // heads, LayerNorm eps cfg.layer_norm_eps, dropout cfg.dropout (hidden and attention probabilities).
    With `cfg.text` it also has BLIP-2's text branch (stage 1): `encode` runs [queries; text] under one of the
    three stage-1 masks, `encode_text` the text alone. As a stage-2 resampler only the query branch runs.
    """

    # vs Blip2QFormerModel: owns its queries and text embeddings (BLIP-2 keeps them outside); bool masks.

    def __init__(self, cfg: ResamplerConfig, media_dim: int):
        super().__init__()
        dim = cfg.dim or QFORMER_DEFAULT_DIM
        self.cfg, self.media_dim, self.out_dim = cfg, media_dim, dim
        self.queries = init_queries(cfg.num_tokens, dim, std=0.02)  # BLIP-2's initializer_range
        self.pool = PooledQueries(media_dim, dim) if cfg.pooled_queries else None
        self.text = QFormerTextEmbeddings(cfg.text, dim) if cfg.text is not None else None
        self.norm_media = nn.LayerNorm(media_dim) if cfg.media_norm else None  # BLIP-2's ln_vision
        self.norm_in = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.drop_in = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            QFormerLayer(dim=dim, heads=cfg.heads, ff_mult=cfg.ff_mult, activation_name=cfg.activation,
                         eps=cfg.layer_norm_eps, dropout=cfg.dropout, text=cfg.text is not None,
                         media_dim=media_dim if i % cfg.cross_attention_freq == 0 else None)
            for i in range(cfg.depth)
        )
        self.apply(self._init_bert)
        for layer in self.layers:  # the image's share of the query stream at init (ResamplerConfig.cross_init_std)
            if layer.cross_attn is not None:
                nn.init.normal_(layer.cross_attn.to_v.weight, std=cfg.cross_init_std)
                nn.init.normal_(layer.cross_attn.dense.weight, std=cfg.cross_init_std)

    @staticmethod
    def _init_bert(module: nn.Module) -> None:
        """BERT / BLIP-2 init: Linear and Embedding weights ~ N(0, 0.02), zero biases (LayerNorms stay ones /
        zeros)."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, media: Tensor, mask: Tensor | None = None, latents: Tensor | None = None) -> Tensor:
        queries = self.queries if latents is None else latents
        _check_latents(queries, self.out_dim)
        media = self._norm_media(media)
        x = self.norm_in(start_latents(self.pool, queries, media, mask))  # (V, L, D)
        x = self.drop_in(x)
        key_mask = _media_key_mask(mask)  # (V, 1, 1, P)
        for layer in self.layers:
            x = layer(x, media, key_mask)
        return x

    def encode(self, media: Tensor, mask: Tensor | None, input_ids: Tensor, text_mask: Tensor, mode: str
               ) -> tuple[Tensor, Tensor]:
        """[queries; text] through the shared layers under the stage-1 mask `mode` (`stage1_mask`): media (V, P, Dv)
        with its patch mask (V, P), text (V, T) with its padding mask -> query outputs (V, L, D), text outputs
        (V, T, D)."""
        media = self._norm_media(media)
        start = start_latents(self.pool, self.queries, media, mask)  # (V, L, D)
        n = start.shape[1]
        x = torch.cat([start, self._text_embeds(input_ids)], dim=1)  # (V, L+T, D)
        x = self.drop_in(self.norm_in(x))
        self_mask = stage1_mask(mode, n, text_mask)  # (V, 1, L+T, L+T)
        key_mask = _media_key_mask(mask)  # (V, 1, 1, P)
        for layer in self.layers:
            x = layer(x, media, key_mask, num_queries=n, self_mask=self_mask)
        return x[:, :n], x[:, n:]  # (V, L, D), (V, T, D)

    def encode_text(self, input_ids: Tensor, text_mask: Tensor) -> Tensor:
        """The text alone (what the itc mask gives the text rows, without the queries): (V, T) -> (V, T, D)."""
        x = self.drop_in(self.norm_in(self._text_embeds(input_ids)))  # (V, T, D)
        self_mask = rearrange(text_mask.bool(), "v t -> v 1 1 t")  # (V, 1, 1, T)
        for layer in self.layers:
            x = layer(x, None, num_queries=0, self_mask=self_mask)
        return x

    def _norm_media(self, media: Tensor) -> Tensor:
        return media if self.norm_media is None else self.norm_media(media)  # (V, P, Dv)

    def _text_embeds(self, input_ids: Tensor) -> Tensor:
        if self.text is None:
            raise ValueError("this Q-Former has no text branch: set its resampler config's `text`")
        return self.text(input_ids)  # (V, T, D)


class PatchMLP(nn.Module):
    """LLaVA's connector as a resampler kind: no queries, every patch of a view becomes a token through
    Linear-GELU-Linear (LLaVA-1.5's `mlp2x_gelu`), so "resampler vs none" is one switch on one pipeline. Row 0, the
    class token, is the view's mean real patch through the same MLP; rows 1.. the P patches in order."""

    # vs LLaVA: the MLP ends at the resampler width D (the prefix projector then maps to the LLM), not at the LLM's
    # width, so every fusion kind takes it; a view's padded patches stay (as LLaVA's padded image does).

    def __init__(self, cfg: ResamplerConfig, media_dim: int):
        super().__init__()
        self.num_patches = cfg.num_queries
        self.out_dim = cfg.dim or media_dim
        self.mlp = nn.Sequential(nn.Linear(media_dim, self.out_dim), activation(cfg.activation),
                                 nn.Linear(self.out_dim, self.out_dim))

    def forward(self, media: Tensor, mask: Tensor | None = None, latents: Tensor | None = None) -> Tensor:
        if latents is not None:
            raise ValueError("resampler kind mlp has no queries to share: set share_resamplers=false")
        if media.shape[1] != self.num_patches:
            raise ValueError(f"resampler kind mlp emits every patch: its num_queries ({self.num_patches}) must be the "
                             f"encoder's patches per view, {media.shape[1]} here")
        weight = torch.ones_like(media[..., 0]) if mask is None else mask.to(media.dtype)  # (V, P)
        mean = (media * weight[..., None]).sum(1) / weight.sum(1, keepdim=True).clamp(min=1)  # (V, Dv)
        return self.mlp(torch.cat([mean[:, None], media], dim=1))  # (V, 1+P, D)


RESAMPLERS: dict[str, type[nn.Module]] = {"perceiver": PerceiverResampler, "qformer": QFormer, "mlp": PatchMLP}


def build_resampler(cfg: ResamplerConfig, media_dim: int) -> nn.Module:
    """The resampler `cfg.kind` names, reading media of width `media_dim`; its output width is `.out_dim`."""
    if cfg.kind not in RESAMPLERS:
        raise ValueError(f"unknown resampler kind {cfg.kind!r}; choose one of {sorted(RESAMPLERS)}")
    resampler = RESAMPLERS[cfg.kind](cfg, media_dim)
    if cfg.bert_init is not None:
        if cfg.kind != "qformer":
            raise ValueError(f"bert_init initialises a Q-Former; this resampler is a {cfg.kind}")
        from vlm.hf_weights import init_qformer_from_bert  # it imports this module
        from vlm.pretrained import resolve

        with torch.random.fork_rng(devices=[]):  # loading BERT must not move the caller's RNG (the later inits)
            init_qformer_from_bert(resampler, resolve(cfg.bert_init))
    return resampler
