"""The tokenizer that goes with an LM config: the LM's own (by `tokenizer` or `name`), or the download-free byte-level
one for LMs built from a config. Data, evaluation and the server build it without building a model."""

from __future__ import annotations

from vlm.config import LMConfig
from vlm.pretrained import missing_weights, resolve

IGNORE_INDEX = -100  # labels: not supervised (prompts, system turns, image placeholders, padding)
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}


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
            tok = AutoTokenizer.from_pretrained(resolve(source))
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
    return PreTrainedTokenizerFast(tokenizer_object=raw, **SPECIAL_TOKENS)


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
