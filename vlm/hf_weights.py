"""Pretrained-weight mapping: transformers modules (resamplers, BERT, BLIP-2 stage 1) -> ours (`vlm.resampler`,
`vlm.blip2`). Whole published models (a `VLM`) come in through `vlm.hf_import`, which builds on these.

Each importer reads the shapes off the HF module (and its config), builds the matching `ResamplerConfig`,
maps the state dict key by key (concatenating q/k/v weights where we fuse the projections) and loads it
strictly, so a missing or unexpected key is an error rather than a silently random weight.

Shapes: L latents / queries (class token included), D width, Dv media width, H heads, d head width.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from vlm.blip2 import QFormerStage1, Stage1Config
from vlm.config import QFormerTextConfig, ResamplerConfig
from vlm.resampler import PerceiverResampler, QFormer

# transformers' ACT2FN names -> ours (vlm.layers.ACTIVATIONS)
HF_ACTIVATIONS = {
    "gelu": "gelu",  # exact erf GELU
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


def _activation_name(hf_act) -> str:
    if not isinstance(hf_act, str) or hf_act not in HF_ACTIVATIONS:
        raise ValueError(f"unsupported activation {hf_act!r}; supported: {sorted(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[hf_act]


def _ff_mult(intermediate: int, width: int, what: str) -> int:
    if intermediate % width:
        raise ValueError(f"{what}: intermediate size {intermediate} is not an integer multiple of the width "
                         f"{width}; ResamplerConfig only has `ff_mult`")
    return intermediate // width


def _load(ours: nn.Module, sd: dict[str, Tensor], like: Tensor) -> nn.Module:
    ours.load_state_dict(sd, strict=True)
    return ours.to(device=like.device, dtype=like.dtype)


# ------------------------------------------------------------ Idefics (v1) Perceiver -> PerceiverResampler


def idefics_perceiver_state_dict(hf_sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`IdeficsPerceiverResampler` state dict -> `PerceiverResampler` state dict."""
    sd = {"queries": hf_sd["latents"], "norm_out.weight": hf_sd["layer_norm.weight"],
          "norm_out.bias": hf_sd["layer_norm.bias"]}
    depth = len({k.split(".")[1] for k in hf_sd if k.startswith("blocks.")})
    for i in range(depth):
        attn, mlp, ours = f"blocks.{i}.0.", f"blocks.{i}.1.", f"layers.{i}."
        norms = [("context_layer_norm", "norm_media"), ("latents_layer_norm", "norm_latents"),
                 ("q_layer_norm", "q_norm"), ("k_layer_norm", "k_norm")]  # q/k norms only with qk_layer_norms
        for hf_name, our_name in norms:
            for p in ("weight", "bias"):
                if f"{attn}{hf_name}.{p}" in hf_sd:
                    sd[f"{ours}{our_name}.{p}"] = hf_sd[f"{attn}{hf_name}.{p}"]
        sd[f"{ours}to_q.weight"] = hf_sd[f"{attn}q_proj.weight"]
        sd[f"{ours}to_k.weight"] = hf_sd[f"{attn}k_proj.weight"]
        sd[f"{ours}to_v.weight"] = hf_sd[f"{attn}v_proj.weight"]
        sd[f"{ours}to_out.weight"] = hf_sd[f"{attn}output_proj.weight"]
        # IdeficsMLP (ln, fc, act, c_proj) -> our FeedForward (0 LayerNorm, 1 Linear, 2 act, 3 Linear)
        sd[f"{ours}ff.0.weight"], sd[f"{ours}ff.0.bias"] = hf_sd[f"{mlp}ln.weight"], hf_sd[f"{mlp}ln.bias"]
        sd[f"{ours}ff.1.weight"] = hf_sd[f"{mlp}fc.weight"]
        sd[f"{ours}ff.3.weight"] = hf_sd[f"{mlp}c_proj.weight"]
    return sd


def idefics_perceiver_config(hf: nn.Module, activation: str = "relu") -> ResamplerConfig:
    """The `ResamplerConfig` of a transformers `IdeficsPerceiverResampler`: its `n_latents` latents become our queries
    (num_queries = n_latents - 1; row 0 plays the class token). `activation` is the MLP's: IdeficsMLP hard-codes
    ReLU."""
    mlp = hf.blocks[0][1]
    if mlp.embed_dim != hf.embed_dim:
        raise ValueError(f"IdeficsMLP width (vision_config.embed_dim={mlp.embed_dim}) differs from the "
                         f"perceiver's embed_dim={hf.embed_dim}; build the IdeficsConfig with them equal")
    return ResamplerConfig(
        kind="perceiver", num_queries=hf.n_latents - 1, dim=hf.embed_dim, depth=len(hf.blocks),
        heads=hf.n_heads, dim_head=hf.head_dim,
        ff_mult=_ff_mult(hf.intermediate_dim, hf.embed_dim, "Idefics"),
        activation=activation, qk_norm=bool(hf.qk_layer_norms),
    )


def perceiver_from_idefics(hf: nn.Module, activation: str = "relu") -> PerceiverResampler:
    """Our `PerceiverResampler` with the weights of a transformers `IdeficsPerceiverResampler`
    (`idefics_perceiver_config`). Idefics has no media mask, so outputs agree for mask=None (or an all-True mask)."""
    ours = PerceiverResampler(idefics_perceiver_config(hf, activation), media_dim=hf.embed_dim)
    return _load(ours, idefics_perceiver_state_dict(hf.state_dict()), hf.latents)


# ------------------------------------------------------------ BLIP-2 Q-Former -> QFormer


def _bert_layers(hf_sd: Mapping[str, Tensor], *, depth: int, attn: str, query_ff: str | None, text_ff: str | None,
                 cross_attention_freq: int | None) -> dict[str, Tensor]:
    """BERT-style `encoder.layer.<i>.` keys -> our `QFormerLayer` keys. `attn`: the self-attention's sub-module name
    (BERT "self", BLIP-2 "attention"); `query_ff` / `text_ff`: the suffix of the HF feed-forward that becomes our
    query / text feed-forward ("" = BERT's `intermediate` / `output`, "_query" = BLIP-2's query branch; None: not
    mapped); `cross_attention_freq`: map BLIP-2's cross-attention of every f-th layer (None: none, BERT)."""
    sd = {}

    def post_ln(hf_prefix: str, ours: str) -> None:  # dense + LayerNorm of a BERT output sub-layer
        for p in ("weight", "bias"):
            sd[f"{ours}dense.{p}"] = hf_sd[f"{hf_prefix}output.dense.{p}"]
            sd[f"{ours}norm.{p}"] = hf_sd[f"{hf_prefix}output.LayerNorm.{p}"]

    for i in range(depth):
        hf, ours = f"encoder.layer.{i}.", f"layers.{i}."
        for p in ("weight", "bias"):
            qkv = [hf_sd[f"{hf}attention.{attn}.{n}.{p}"] for n in ("query", "key", "value")]
            sd[f"{ours}self_attn.to_qkv.{p}"] = torch.cat(qkv)  # 3 x (D, D) -> (3D, D)
        post_ln(f"{hf}attention.", f"{ours}self_attn.")
        if cross_attention_freq is not None and i % cross_attention_freq == 0:
            c = f"{hf}crossattention.attention."
            for p in ("weight", "bias"):
                for n, our_n in (("query", "to_q"), ("key", "to_k"), ("value", "to_v")):
                    sd[f"{ours}cross_attn.{our_n}.{p}"] = hf_sd[f"{c}{n}.{p}"]
            post_ln(f"{hf}crossattention.", f"{ours}cross_attn.")
        for suffix, ff in ((query_ff, "ff"), (text_ff, "text_ff")):
            if suffix is None:
                continue
            for p in ("weight", "bias"):
                sd[f"{ours}{ff}_in.{p}"] = hf_sd[f"{hf}intermediate{suffix}.dense.{p}"]
                sd[f"{ours}{ff}_out.{p}"] = hf_sd[f"{hf}output{suffix}.dense.{p}"]
                sd[f"{ours}{ff}_norm.{p}"] = hf_sd[f"{hf}output{suffix}.LayerNorm.{p}"]
    return sd


def blip2_qformer_state_dict(hf_sd: Mapping[str, Tensor], query_tokens: Tensor, *, depth: int,
                             cross_attention_freq: int, text_embeddings: Mapping[str, Tensor] | None = None
                             ) -> dict[str, Tensor]:
    """`Blip2QFormerModel` state dict + `query_tokens` (1, L, D) -> `QFormer` state dict. The query branch always;
    the text branch (`intermediate` / `output`, BLIP-2's `use_qformer_text_input`) when `text_embeddings` (the state
    dict of a `Blip2TextEmbeddings`) is given."""
    sd = {"queries": query_tokens.reshape(-1, query_tokens.shape[-1]),  # (1, L, D) -> (L, D)
          "norm_in.weight": hf_sd["layernorm.weight"], "norm_in.bias": hf_sd["layernorm.bias"]}
    text = text_embeddings is not None
    sd |= _bert_layers(hf_sd, depth=depth, attn="attention", query_ff="_query", text_ff="" if text else None,
                       cross_attention_freq=cross_attention_freq)
    if text:
        sd["text.word.weight"] = text_embeddings["word_embeddings.weight"]
        sd["text.position.weight"] = text_embeddings["position_embeddings.weight"]
    return sd


def bert_qformer_state_dict(bert_sd: Mapping[str, Tensor], depth: int, text: bool = True) -> dict[str, Tensor]:
    """A `BertModel` state dict -> the `QFormer` weights BLIP-2 initialises from BERT: the input LayerNorm, every
    layer's self-attention and its feed-forward as the query feed-forward (BLIP-2 copies `intermediate` into
    `intermediate_query`); with `text`, also the text feed-forward and the text embeddings (BERT's token-type-0 row
    folded into the positions: BERT adds it to every token). Cross-attention and the queries are not BERT's."""
    sd = _bert_layers(bert_sd, depth=depth, attn="self", query_ff="", text_ff="" if text else None,
                      cross_attention_freq=None)
    emb = "embeddings."
    if text:
        sd["text.word.weight"] = bert_sd[f"{emb}word_embeddings.weight"]
        sd["text.position.weight"] = bert_sd[f"{emb}position_embeddings.weight"] + bert_sd[
            f"{emb}token_type_embeddings.weight"][0]  # (Tmax, D) + (D,)
    sd["norm_in.weight"], sd["norm_in.bias"] = bert_sd[f"{emb}LayerNorm.weight"], bert_sd[f"{emb}LayerNorm.bias"]
    return sd


def init_qformer_from_bert(qformer: QFormer, folder: str) -> dict[str, list[str]]:
    """Load a BERT folder's weights into a Q-Former (`bert_qformer_state_dict`; its text branch too if it has one);
    the BERT's sizes must be the Q-Former's. Returns the Q-Former weights BERT did not provide (`fresh`: the
    cross-attention and the queries)."""
    from transformers import AutoModel

    from vlm.pretrained import missing_weights

    try:
        bert = AutoModel.from_pretrained(folder)
    except OSError as err:
        raise missing_weights("BERT (Q-Former init)", folder, "the resampler's bert_init", err) from err
    c, cfg = bert.config, qformer.cfg
    want = {"hidden_size": qformer.out_dim, "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.heads,
            "intermediate_size": cfg.ff_mult * qformer.out_dim, "layer_norm_eps": cfg.layer_norm_eps}
    if cfg.text is not None:
        want |= {"vocab_size": cfg.text.vocab_size, "max_position_embeddings": cfg.text.max_positions}
    differ = {k: (getattr(c, k), v) for k, v in want.items() if getattr(c, k) != v}
    if _activation_name(c.hidden_act) != cfg.activation:
        differ["hidden_act"] = (c.hidden_act, cfg.activation)
    if differ:
        raise ValueError(f"{folder}: its BERT does not fit this Q-Former (BERT, Q-Former): {differ}")
    sd = bert_qformer_state_dict(bert.state_dict(), cfg.depth, text=cfg.text is not None)
    result = qformer.load_state_dict(sd, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"BERT -> Q-Former mapping produced unknown keys {result.unexpected_keys[:5]}")
    return {"fresh": sorted(result.missing_keys)}


def qformer_from_blip2(hf: nn.Module, query_tokens: Tensor) -> QFormer:
    """Our `QFormer` with the weights of a transformers `Blip2QFormerModel` and BLIP-2's `query_tokens`
    ((1, L, D) or (L, D); num_queries = L - 1, row 0 plays the class token). The media width is the config's
    `encoder_hidden_size`. BLIP-2 has one dropout per kind (hidden, attention probs); we take
    `hidden_dropout_prob` for both (0 in eval either way)."""
    c = hf.config
    num_tokens = query_tokens.shape[-2]
    if query_tokens.shape[-1] != c.hidden_size:
        raise ValueError(f"query_tokens width {query_tokens.shape[-1]} != hidden_size {c.hidden_size}")
    cfg = blip2_qformer_config(c, num_tokens)
    ours = QFormer(cfg, media_dim=c.encoder_hidden_size)
    sd = blip2_qformer_state_dict(hf.state_dict(), query_tokens, depth=cfg.depth,
                                  cross_attention_freq=cfg.cross_attention_freq)
    return _load(ours, sd, hf.layernorm.weight)


def blip2_qformer_config(c, num_tokens: int, text: QFormerTextConfig | None = None) -> ResamplerConfig:
    """A transformers `Blip2QFormerConfig` (+ BLIP-2's query count, class token included) -> our config."""
    return ResamplerConfig(
        kind="qformer", num_queries=num_tokens - 1, dim=c.hidden_size, depth=c.num_hidden_layers,
        heads=c.num_attention_heads, ff_mult=_ff_mult(c.intermediate_size, c.hidden_size, "Q-Former"),
        activation=_activation_name(c.hidden_act), cross_attention_freq=c.cross_attention_frequency,
        layer_norm_eps=c.layer_norm_eps, dropout=float(c.hidden_dropout_prob), text=text,
    )


def stage1_from_blip2_retrieval(hf: nn.Module) -> QFormerStage1:
    """Our stage-1 Q-Former and heads (`vlm.blip2.QFormerStage1`) with the weights of a transformers
    `Blip2ForImageTextRetrieval` (its Q-Former with the text branch, `use_qformer_text_input`): queries, text
    embeddings, both branches, `vision_projection` / `text_projection` / `itm_head`. BLIP-2 has no ITG head there:
    ours keeps its init. Feed both the same encoder features (`hf.vision_model(pixels)[0]`) to compare scores."""
    c = hf.config.qformer_config
    if not c.use_qformer_text_input:
        raise ValueError("this BLIP-2 Q-Former has no text branch (qformer_config.use_qformer_text_input=False)")
    text = QFormerTextConfig(vocab_size=c.vocab_size, max_positions=c.max_position_embeddings,
                             pad_token_id=c.pad_token_id)
    cfg = blip2_qformer_config(c, hf.query_tokens.shape[1], text)
    ours = QFormerStage1(QFormer(cfg, media_dim=c.encoder_hidden_size),
                         Stage1Config(embed_dim=hf.config.image_text_hidden_size))
    sd = {f"qformer.{k}": v for k, v in blip2_qformer_state_dict(
        hf.qformer.state_dict(), hf.query_tokens, depth=cfg.depth, cross_attention_freq=cfg.cross_attention_freq,
        text_embeddings=hf.embeddings.state_dict()).items()}
    for ours_name, theirs in (("vision_proj", hf.vision_projection), ("text_proj", hf.text_projection),
                              ("itm_head", hf.itm_head)):
        sd |= {f"{ours_name}.{k}": v for k, v in theirs.state_dict().items()}
    own = ours.state_dict()
    sd |= {k: own[k] for k in own if k.startswith("lm_head.") or k == "temp"}  # not in BLIP-2's retrieval model
    sd["lm_head.word.weight"] = sd["qformer.text.word.weight"]  # tied
    return _load(ours, sd, hf.query_tokens)
