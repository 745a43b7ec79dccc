"""Whole published models from transformers -> our `VLM`, with logit parity (tests/test_hf_import.py).

`from_hf(hf_model)` reads the shapes off the model's config, builds the `VLMConfig` that reproduces it (its
preprocessing included) and loads every weight strictly, part by part, so a missing or unexpected key is an error:
- `Blip2ForConditionalGeneration` (OPT, or any decoder-only LM; T5 / FLAN-T5 through `vlm.lm.Seq2SeqLM`): one
  global view at its image size, stretched (its processor resizes to a square), CLIP normalisation, no tiles; the
  vision model's last layer after its `post_layernorm`, class token kept; the Q-Former as the global resampler (its
  32 queries = our class token + 31); `language_projection` as a linear prefix projector; the image placeholders
  where its processor puts them (`blip2_text`).
- `IdeficsForVisionText2Text` (IDEFICS v1, the open Flamingo): one global view at its image size, stretched, CLIP
  normalisation, no tiles; the CLIP-style tower's last layer (no `post_layernorm`, class token kept) into its Perceiver
  (the global resampler); its gated cross-attention as our blocks in IDEFICS's layout (`FusionConfig.block=idefics`:
  RMSNorms, gated MLP, q/k norms, float or vector gates) before every `cross_layer_interval`-th decoder layer from
  layer 0, each text token seeing only the latest image before it, tokens with no image getting no attention output
  but the gated MLP (IDEFICS's `cross_attention_gate`: `text_only_passthrough=false`); its LLaMA as a transformers
  `LlamaForCausalLM`, the decoupled embedding and head (`additional_vocab_size`) concatenated into one table; the
  `<image>` token's embedding as our learned image marker.

Feeding both the same image and text: give an image already at the model's size (`hf.config.vision_config.
image_size`, both resizes are then the identity) and `blip2_text(vlm, prompt)` to our `Processor.encode(...,
add_bos=False)`; its `input_ids` are what BLIP-2's processor makes for the same prompt, so they go to both models.
IDEFICS: images at `hf.config.vision_config.image_size`, our text with one `<image>` marker per image where its
processor puts `<image>` (it wraps each in `<fake_token_around_image>`: write those into the text too, the
checkpoint's tokenizer knows them), `Processor.encode`'s ids to both; transformers' IDEFICS also needs the
`image_attention_mask` its processor makes from those ids (tests/test_hf_import.py builds it with the processor's
own functions).
"""

from __future__ import annotations

import torch
from torch import nn

from vlm.config import FusionConfig, LMConfig, TilingConfig, VisionConfig, VLMConfig
from vlm.hf_weights import (
    _activation_name,
    blip2_qformer_config,
    blip2_qformer_state_dict,
    idefics_perceiver_config,
    idefics_perceiver_state_dict,
)
from vlm.model import VLM
from vlm.vision import CLIP_MEAN, CLIP_STD


def from_hf(hf_model: nn.Module, *, tokenizer: str | None = None) -> VLM:
    """Our `VLM` with the weights of a transformers model (see the module doc for the classes it takes).
    `tokenizer`: the checkpoint's tokenizer folder (its image token must be the model's `image_token_index`); None:
    the built-in byte tokenizer, for models built from a config."""
    importers = {"Blip2ForConditionalGeneration": _from_blip2, "IdeficsForVisionText2Text": _from_idefics}
    name = type(hf_model).__name__
    if name not in importers:
        raise ValueError(f"from_hf: no importer for {name}; it takes {sorted(importers)}")
    return importers[name](hf_model, tokenizer)


def blip2_config(hf_config, *, tokenizer: str | None = None) -> VLMConfig:
    """A transformers `Blip2Config` -> the `VLMConfig` that reproduces the model and its preprocessing."""
    vc, qc, tc = hf_config.vision_config, hf_config.qformer_config, hf_config.text_config
    resampler = blip2_qformer_config(qc, hf_config.num_query_tokens)
    image_token = "<image>"  # BLIP-2's processor's, added to its tokenizer (id `image_token_index`)
    return VLMConfig(
        vision=VisionConfig(backend="hf", hf_config=vc.to_dict(), image_size=vc.image_size, feature_layer=-1,
                            keep_class_token=True, post_layernorm=True, mean=CLIP_MEAN, std=CLIP_STD),
        lm=LMConfig(hf_config=tc.to_dict(), tokenizer=tokenizer, image_token=image_token),
        tiling=TilingConfig(tile_size=vc.image_size, force_detail="low", global_resize="stretch"),
        global_resampler=resampler, tile_resampler=resampler, share_resamplers=True,
        tile_position_embeddings=False, view_type_embedding=False,
        fusion=FusionConfig(kind="prefix", projector="linear"),
    )


def blip2_text(vlm: VLM, prompt: str) -> str:
    """The text, with our `<image>` marker, whose tokens are what BLIP-2's processor makes of `prompt` and one image:
    the image tokens first, then the LM tokenizer's own special tokens (BOS for OPT; T5 appends EOS instead)."""
    tok = vlm.tokenizer
    ids = tok(prompt)["input_ids"]  # the LM tokenizer's own special tokens, as BLIP-2's processor adds them
    return vlm.cfg.lm.image_token + tok.decode(ids, skip_special_tokens=False)


def _from_blip2(hf: nn.Module, tokenizer: str | None) -> VLM:
    c = hf.config
    if getattr(c, "image_token_index", None) is None:
        raise ValueError("this BLIP-2 config has no image_token_index (a checkpoint from before transformers "
                         "4.46's placeholders); set config.image_token_index to its tokenizer's '<image>' id")
    vlm = VLM(blip2_config(c, tokenizer=tokenizer))
    if vlm.image_token_id != c.image_token_index:
        raise ValueError(f"the tokenizer's '<image>' is id {vlm.image_token_id}, the model's image_token_index "
                         f"{c.image_token_index}: pass tokenizer= the checkpoint's tokenizer folder")
    resampler = vlm.visual.global_resampler
    parts = [
        (vlm.vision.backbone, hf.vision_model.state_dict()),
        (resampler, blip2_qformer_state_dict(hf.qformer.state_dict(), hf.query_tokens, depth=resampler.cfg.depth,
                                             cross_attention_freq=resampler.cfg.cross_attention_freq)),
        (vlm.fusion.proj, hf.language_projection.state_dict()),
        (vlm.lm.model, hf.language_model.state_dict()),
    ]
    for module, sd in parts:
        module.load_state_dict(sd, strict=True)
    vlm.visual.tile_queries.data.copy_(hf.query_tokens[0])  # tiles (never at detail low) ask the same queries
    loaded = {id(p) for module, _ in parts for p in module.parameters()} | {id(vlm.visual.tile_queries)}
    left = [n for n, p in vlm.named_parameters() if id(p) not in loaded]
    if left:
        raise AssertionError(f"from_hf left parameters at their random init: {left[:8]}")
    like = hf.language_projection.weight
    return vlm.to(device=like.device, dtype=like.dtype).eval()


# ------------------------------------------------------------------------------------------------- IDEFICS (v1)
def idefics_config(hf_config, perceiver: nn.Module, *, tokenizer: str | None = None) -> VLMConfig:
    """A transformers `IdeficsConfig` (and its built `IdeficsPerceiverResampler`, whose shapes the resampler config is
    read off) -> the `VLMConfig` that reproduces the model and its preprocessing."""
    c, vc = hf_config, hf_config.vision_config
    tower = dict(model_type="clip_vision_model", hidden_size=vc.embed_dim, intermediate_size=vc.intermediate_size,
                 num_hidden_layers=vc.num_hidden_layers, num_attention_heads=vc.num_attention_heads,
                 image_size=vc.image_size, patch_size=vc.patch_size, num_channels=vc.num_channels,
                 hidden_act=vc.hidden_act, layer_norm_eps=vc.layer_norm_eps)  # IDEFICS's tower is CLIP's
    rope = dict(c.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
    llama = dict(model_type="llama", vocab_size=c.vocab_size + c.additional_vocab_size, hidden_size=c.hidden_size,
                 intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                 num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_attention_heads,
                 hidden_act=c.hidden_act, rms_norm_eps=c.rms_norm_eps,
                 max_position_embeddings=c.max_position_embeddings,
                 rope_parameters=rope, tie_word_embeddings=False, pad_token_id=c.pad_token_id,
                 bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id)
    resampler = idefics_perceiver_config(perceiver)
    interval, heads = c.cross_layer_interval, c.num_attention_heads
    return VLMConfig(
        vision=VisionConfig(backend="hf", hf_config=tower, image_size=vc.image_size, feature_layer=-1,
                            keep_class_token=True, mean=CLIP_MEAN, std=CLIP_STD),
        lm=LMConfig(hf_config=llama, tokenizer=tokenizer, image_token="<image>"),
        tiling=TilingConfig(tile_size=vc.image_size, force_detail="low", global_resize="stretch"),
        global_resampler=resampler, tile_resampler=resampler, share_resamplers=True,
        tile_position_embeddings=False, view_type_embedding=False,
        fusion=FusionConfig(kind="xattn", block="idefics", layers=[i * interval for i in range(
            c.num_hidden_layers // interval)], heads=heads, dim_head=c.hidden_size // heads,
            ff_hidden=c.intermediate_size, ff_activation=_activation_name(c.hidden_act), qk_norm=c.qk_layer_norms,
            norm_eps=c.rms_norm_eps, gate_shape="vector" if c.alpha_type == "vector" else "scalar",
            only_immediate=True, text_only_passthrough=False),
    )


def _idefics_block_state_dict(hf_sd: dict, gate_shape: tuple[int, ...]) -> dict:
    """One `IdeficsGatedCrossAttentionLayer` state dict -> one `GatedCrossAttentionBlock` state dict."""
    sd = {"norm.weight": hf_sd["input_layernorm.weight"], "to_q.weight": hf_sd["cross_attn.q_proj.weight"],
          "to_kv.weight": torch.cat([hf_sd["cross_attn.k_proj.weight"], hf_sd["cross_attn.v_proj.weight"]]),
          "to_out.weight": hf_sd["cross_attn.o_proj.weight"],
          "attn_gate": hf_sd["alpha_cross_attn"].reshape(gate_shape),
          "ff_gate": hf_sd["alpha_dense"].reshape(gate_shape),
          "ff.norm.weight": hf_sd["post_attention_layernorm.weight"]}
    sd |= {f"ff.{n}.weight": hf_sd[f"mlp.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj")}
    if "cross_attn.q_layer_norm.weight" in hf_sd:
        sd["q_norm.weight"] = hf_sd["cross_attn.q_layer_norm.weight"]
        sd["k_norm.weight"] = hf_sd["cross_attn.k_layer_norm.weight"]
    return sd


def _decoupled(module: nn.Module) -> torch.Tensor:
    """IDEFICS's decoupled embedding / head -> one weight, the additional rows after the regular ones."""
    extra = [getattr(module, n) for n in ("additional_embedding", "additional_fc") if hasattr(module, n)]
    return torch.cat([module.weight, extra[0].weight]) if extra else module.weight  # (W, Dl)


def _from_idefics(hf: nn.Module, tokenizer: str | None) -> VLM:
    c, m = hf.config, hf.model
    if not c.use_resampler:
        raise ValueError("from_hf: this IDEFICS config has use_resampler=false (every patch into the "
                         "cross-attention); our visual tokens always come from a resampler")
    vlm = VLM(idefics_config(c, m.perceiver_resampler, tokenizer=tokenizer))
    if vlm.image_token_id >= c.vocab_size + c.additional_vocab_size:
        raise ValueError(f"the tokenizer's '<image>' is id {vlm.image_token_id}, beyond the model's "
                         f"{c.vocab_size} + {c.additional_vocab_size} tokens: pass tokenizer= the checkpoint's folder")
    lm_sd = {k: v for k, v in m.state_dict().items() if k.startswith(("layers.", "norm."))}
    lm_sd = {"model." + k: v for k, v in lm_sd.items() if "rotary_emb" not in k}
    lm_sd |= {"model.embed_tokens.weight": _decoupled(m.embed_tokens), "lm_head.weight": _decoupled(hf.lm_head)}
    gate = tuple(vlm.fusion.blocks[0].attn_gate.shape)
    blocks = {f"{i}.{k}": v for i, layer in enumerate(m.gated_cross_attn_layers)
              for k, v in _idefics_block_state_dict(layer.state_dict(), gate).items()}
    parts = [
        (vlm.vision.backbone, m.vision_model.state_dict()),  # transformers 5 CLIPVisionModel: the same keys
        (vlm.visual.global_resampler, idefics_perceiver_state_dict(m.perceiver_resampler.state_dict())),
        (vlm.fusion.blocks, blocks),
        (vlm.lm.model, lm_sd),
    ]
    for module, sd in parts:
        module.load_state_dict(sd, strict=True)
    with torch.no_grad():
        vlm.visual.tile_queries.copy_(m.perceiver_resampler.latents)  # tiles (never at detail low) ask the same
        vlm.learned_tokens.image.copy_(_decoupled(m.embed_tokens)[vlm.image_token_id])  # the marker is IDEFICS's
    loaded = {id(p) for module, _ in parts for p in module.parameters()}
    loaded |= {id(vlm.visual.tile_queries), id(vlm.learned_tokens.image)}
    left = [n for n, p in vlm.named_parameters() if id(p) not in loaded]
    if left:
        raise AssertionError(f"from_hf left parameters at their random init: {left[:8]}")
    theirs = sum(p.numel() for p in hf.parameters())
    ours = sum(p.numel() for module, _ in parts for p in module.parameters())
    if theirs != ours:  # every IDEFICS weight has a place here (the mappings above drop nothing unnoticed)
        raise AssertionError(f"from_hf: IDEFICS has {theirs} parameters, the imported parts {ours}")
    like = hf.lm_head.weight
    return vlm.to(device=like.device, dtype=like.dtype).eval()
