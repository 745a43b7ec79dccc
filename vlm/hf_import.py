"""Whole published models from transformers -> our `VLM`, with logit parity (tests/test_hf_import.py).

`from_hf(hf_model)` reads the shapes off the model's config, builds the `VLMConfig` that reproduces it (its
preprocessing included) and loads every weight strictly, part by part, so a missing or unexpected key is an error:
- `Blip2ForConditionalGeneration` (OPT, or any decoder-only LM; T5 / FLAN-T5 through `vlm.lm.Seq2SeqLM`): one
  global view at its image size, stretched (its processor resizes to a square), CLIP normalisation, no tiles; the
  vision model's last layer after its `post_layernorm`, class token kept; the Q-Former as the global resampler (its
  32 queries = our class token + 31); `language_projection` as a linear prefix projector; the image placeholders
  where its processor puts them (`blip2_text`).

Feeding both the same image and text: give an image already at the model's size (`hf.config.vision_config.
image_size`, both resizes are then the identity) and `blip2_text(vlm, prompt)` to our `Processor.encode(...,
add_bos=False)`; its `input_ids` are what BLIP-2's processor makes for the same prompt, so they go to both models.
"""

from __future__ import annotations

from torch import nn

from vlm.config import FusionConfig, LMConfig, TilingConfig, VisionConfig, VLMConfig
from vlm.hf_weights import blip2_qformer_config, blip2_qformer_state_dict
from vlm.model import VLM
from vlm.vision import CLIP_MEAN, CLIP_STD


def from_hf(hf_model: nn.Module, *, tokenizer: str | None = None) -> VLM:
    """Our `VLM` with the weights of a transformers model (see the module doc for the classes it takes).
    `tokenizer`: the checkpoint's tokenizer folder (its image token must be the model's `image_token_index`); None:
    the built-in byte tokenizer, for models built from a config."""
    importers = {"Blip2ForConditionalGeneration": _from_blip2}
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
