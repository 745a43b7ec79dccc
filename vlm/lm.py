"""Thin adapter over any transformers causal LM, plus the tokenizer that goes with it.

Nothing here matches model names: the decoder stack is found by shape (`find_layer_stack`), widths are
read from the config, and the LM is always driven through `inputs_embeds`.
"""

from __future__ import annotations

import torch
from torch import nn

from vlm.config import LMConfig
from vlm.layers import enable_hf_checkpointing, find_layer_stack
from vlm.vision import missing_weights

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}


def build_lm(cfg: LMConfig) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, cfg.dtype)
    if cfg.hf_config is not None:
        conf = AutoConfig.for_model(**cfg.hf_config)
        model = AutoModelForCausalLM.from_config(conf, dtype=dtype)
    elif cfg.name:
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.name, dtype=dtype)
        except OSError as e:
            raise missing_weights("language model", cfg.name, "model.lm.name (a local folder)", e) from e
    else:
        raise ValueError("LMConfig needs `name` (hub id or local folder) or `hf_config`")
    if cfg.gradient_checkpointing:
        enable_hf_checkpointing(model)
    return model


def build_tokenizer(cfg: LMConfig):
    """The LM's own tokenizer (by `tokenizer` or `name`), or the built-in byte-level one for config-built LMs.
    The image token is added as a special token either way; it never needs a row in the LM's embedding table
    (the model replaces it before the lookup)."""
    source = cfg.tokenizer or (cfg.name if cfg.hf_config is None else None)
    if source is None:
        tok = byte_tokenizer()
    else:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(source)
        except OSError as e:
            raise missing_weights("tokenizer", source, "model.lm.tokenizer (a local folder)", e) from e
    tok.add_special_tokens({"additional_special_tokens": [cfg.image_token]})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def byte_tokenizer():
    """A download-free byte-level tokenizer: 256 byte tokens + <pad>, <s>, </s> (ids 256..258).
    Any text round-trips; tiny LMs built from config use it with `vocab_size >= 260`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}  # token id == byte value
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, **SPECIAL_TOKENS)
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer emits)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class LanguageModel(nn.Module):
    """What the VLM needs from a causal LM: embeddings, the decoder stack, widths, a forward on embeddings."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.model = build_lm(cfg)
        conf = self.model.config.get_text_config()
        self.hidden_size = conf.hidden_size  # width inside the decoder layers (cross-attention works here)
        self.embed_dim = self.model.get_input_embeddings().embedding_dim  # width of inputs_embeds (prefix)
        self.layers = find_layer_stack(self.model, conf.num_hidden_layers)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)  # (B, T, De)

    def forward(self, inputs_embeds, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False):
        return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=past_key_values, use_cache=use_cache, return_dict=True)
