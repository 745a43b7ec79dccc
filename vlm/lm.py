"""The LM adapter: everything that depends on the kind of language model lives here, behind one interface, so that
model.py never does: the input embeddings, a forward on embeddings with functions run before chosen decoder layers
(the fusion's, bound to that call), the loss and the label count, position ids, the decode loop and its caches, and
activation checkpointing.

`CausalLM` adapts any transformers `AutoModelForCausalLM`; `Seq2SeqLM` an `AutoModelForSeq2SeqLM` (T5 / FLAN-T5:
BLIP-2's prefix-LM loss, the soft prompt into the encoder). Both implement the same methods, return logits in the
same layout, and `build_language_model` picks one by the checkpoint's config.

Nothing here matches model names: the decoder stack is found by shape (`find_layer_stack`), widths are read from the
config, and the LM is always driven through `inputs_embeds`.

Shapes: B samples, T text tokens, n new (or target) tokens, Te encoder tokens, De LM embedding width, Dl LM hidden
width, W vocabulary.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from torch import nn

from vlm.config import LMConfig, LoRAConfig
from vlm.layers import find_layer_stack
from vlm.pretrained import missing_weights, resolve
from vlm.tokenizer import IGNORE_INDEX

LayerFns = dict[int, Callable[[torch.Tensor], torch.Tensor]]  # decoder layer index -> hidden (B, T, Dl) -> same
# For one LM call of a decode: (tokens generated so far, whether the LM's KV cache holds the rest) -> layer functions
LayersFor = Callable[[int, bool], LayerFns]


def lm_config(cfg: LMConfig):
    """The transformers config of the LM `cfg` describes (its `is_encoder_decoder` picks the adapter)."""
    from transformers import AutoConfig

    if cfg.hf_config is not None:
        return AutoConfig.for_model(**cfg.hf_config)
    if cfg.name:
        try:
            return AutoConfig.from_pretrained(resolve(cfg.name))
        except OSError as e:
            raise missing_weights("language model", cfg.name, "model.lm.name (a local folder)", e) from e
    raise ValueError("LMConfig needs `name` (hub id or local folder) or `hf_config`")


def build_lm(cfg: LMConfig) -> nn.Module:
    """The transformers LM: `AutoModelForSeq2SeqLM` for an encoder-decoder config, else `AutoModelForCausalLM`."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    dtype = getattr(torch, cfg.dtype)
    conf = lm_config(cfg)
    auto = AutoModelForSeq2SeqLM if conf.is_encoder_decoder else AutoModelForCausalLM
    if cfg.hf_config is not None:
        return auto.from_config(conf, dtype=dtype)
    try:
        return auto.from_pretrained(resolve(cfg.name), dtype=dtype)
    except OSError as e:
        raise missing_weights("language model", cfg.name, "model.lm.name (a local folder)", e) from e


def add_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """LoRA adapters (peft) injected in place into the LLM's `cfg.targets` linear layers: each becomes a peft LoRA
    layer around the original (`<name>.base_layer.weight`), with `lora_A` / `lora_B` beside it."""
    # vs peft's get_peft_model: no PeftModel wrapper, so the LM keeps its own class, forward and module paths (the
    # decoder stack is still found by shape, the fusion binds to the same layers) and the checkpoint keys stay ours.
    from peft import LoraConfig, inject_adapter_in_model

    names = {n.rpartition(".")[2] for n, m in model.named_modules() if n and not list(m.children())}
    unknown = sorted(set(cfg.targets) - names)
    if unknown:
        raise ValueError(f"model.lm.lora.targets {unknown}: no such layer in the LLM (its layers: {sorted(names)})")
    conf = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.targets),
                      bias="none")
    return inject_adapter_in_model(conf, model)


def positions_from_mask(mask: torch.Tensor | None, embeds: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding: 0 at each sample's first real token."""
    if mask is None:
        return torch.arange(embeds.shape[1], device=embeds.device)[None].expand(embeds.shape[0], -1)
    return (mask.long().cumsum(1) - 1).clamp(min=0)  # (B, T)


def sample_next(logits: torch.Tensor, *, do_sample: bool, temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, W) logits -> (B,) token ids: argmax, or temperature + nucleus sampling."""
    if not do_sample or temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)  # (B, W)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)  # (B, W)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest prefix reaching top_p (first always kept)
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)  # (B, W)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]  # (B,)


def _with_hidden(fn: Callable[[torch.Tensor], torch.Tensor], args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A decoder layer's call arguments with its hidden states (first positional, or `hidden_states=`) through `fn`."""
    if args:
        return (fn(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}


def _layer_forward(forward: Callable, before: Callable | None, checkpoint: bool, *args, **kwargs):
    """One decoder layer: `before` (a fusion block) on its input, then the layer itself; under `checkpoint` both are
    recomputed in backward (so are the cross-attention blocks), their activations never kept."""

    def run(*args, **kwargs):
        if before is not None:
            args, kwargs = _with_hidden(before, args, kwargs)
        return forward(*args, **kwargs)

    if checkpoint:
        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)
    return run(*args, **kwargs)


@contextlib.contextmanager
def layers_bound(layers, fns: LayerFns | None, checkpoint: bool):
    """For the duration of one LM call: each layer of `layers` runs `fns[index]` on its input first, and is
    checkpointed as a whole with it. The wrappers are instance attributes removed after the call; the LM's modules,
    hooks and state_dict keys are never touched otherwise."""
    fns = fns or {}
    wrapped = [i for i in range(len(layers)) if checkpoint or i in fns]
    for i in wrapped:
        layer = layers[i]
        layer.forward = functools.partial(_layer_forward, type(layer).forward.__get__(layer), fns.get(i), checkpoint)
    try:
        yield
    finally:
        for i in wrapped:
            del layers[i].forward


class _Adapter(nn.Module):
    """What every LM adapter shares: the transformers model (`self.model`), its LoRA adapters and the widths."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.model = build_lm(cfg)
        if cfg.lora is not None:
            self.model = add_lora(self.model, cfg.lora)
        conf = self.model.config.get_text_config()
        self.hidden_size = conf.hidden_size  # width inside the decoder layers (cross-attention works here)
        self.embed_dim = self.model.get_input_embeddings().embedding_dim  # width of inputs_embeds (prefix)
        self.vocab_size = conf.vocab_size
        # transformers >= 5.x names the cache argument `cache` (`past_key_values` before, deprecated since)
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)  # (B, T, De)

    # ---------------------------------------------------------------------------------------------- adapters
    def adapters(self) -> list[nn.Module]:
        """The LoRA layers (peft), in module order; [] without `cfg.lora`."""
        from peft.tuners.lora import LoraLayer

        return [m for m in self.model.modules() if isinstance(m, LoraLayer)] if self.cfg.lora is not None else []

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The adapters' own weights (A and B), never the base layers they wrap."""
        return [p for m in self.adapters() for name in ("lora_A", "lora_B") for p in getattr(m, name).parameters()]

    def adapters_train(self, mode: bool) -> None:
        """Adapter dropout follows the VLM's mode even while the frozen LLM around it stays in eval mode."""
        for m in self.adapters():
            m.lora_dropout.train(mode)

    def merge_adapters(self) -> int:
        """Fold every adapter into its base weight (W += (alpha / r) B A) for inference; returns how many merged.
        The adapter weights stay (a merged layer skips them), so `checkpoint_state_dict` is unchanged."""
        adapters = [m for m in self.adapters() if not m.merged]
        for m in adapters:
            m.merge()
        return len(adapters)

    # --------------------------------------------------------------------------------------------------- loss
    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor, num_tokens: torch.Tensor | float | None = None
             ) -> torch.Tensor:
        """Next-token cross-entropy over supervised positions (labels != -100), in float32: their mean, or their sum
        divided by `num_tokens` (a count over more than this batch, e.g. every rank of a data-parallel step).
        Every adapter returns logits in this layout: logits[:, t] predicts token t + 1."""
        logits = rearrange(logits[:, :-1], "b t w -> (b t) w").float()  # (B*(T-1), W)
        targets = rearrange(labels[:, 1:], "b t -> (b t)")  # (B*(T-1),)
        return _cross_entropy(logits, targets, num_tokens)

    @staticmethod
    def num_label_tokens(labels: torch.Tensor) -> torch.Tensor:
        """How many token losses `loss` sums for these labels (a 0-dim tensor): the targets after the shift."""
        return (labels[:, 1:] != IGNORE_INDEX).sum()


def _next_token(logits: torch.Tensor, done: torch.Tensor, pick: Callable[[torch.Tensor], torch.Tensor], pad: int,
                eos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step's tokens from the last position's logits (B, *, W): `pick`ed, `pad` for samples already done;
    and which samples are done after it."""
    nxt = pick(logits[:, -1].float())  # (B,)
    nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
    return nxt, done | torch.isin(nxt, eos)


@dataclass
class LMDecode:
    """A causal LM's decode in progress, between two steps, for continuous batching (the server's): the KV cache, the
    attention mask (B, T) as long as the cache, and each row's last position (B, 1). Rows leave (`select`) and join
    (`merge`: both left-padded to the longer one, the padding masked) between steps."""

    cache: object
    mask: torch.Tensor
    positions: torch.Tensor

    def select(self, keep: torch.Tensor) -> LMDecode:
        """The rows `keep` (R,) indexes, in that order."""
        self.cache.batch_select_indices(keep)
        return LMDecode(self.cache, self.mask[keep], self.positions[keep])

    def merge(self, other: LMDecode) -> LMDecode:
        """These rows, then `other`'s (its cache is consumed)."""
        T = max(self.mask.shape[1], other.mask.shape[1])
        odd = {type(layer).__name__ for layer in [*self.cache.layers, *other.cache.layers]} - {"DynamicLayer"}
        if odd:  # checked before anything changes: a refused merge leaves both caches as they were
            raise NotImplementedError(f"continuous batching joins plain DynamicCache layers, not {sorted(odd)}")
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, T, 2), _left_pad(theirs.keys, T, 2)])  # (B+B', H, T, d)
            mine.values = torch.cat([_left_pad(mine.values, T, 2), _left_pad(theirs.values, T, 2)])
        mask = torch.cat([_left_pad(self.mask, T, 1), _left_pad(other.mask, T, 1)])  # (B+B', T)
        return LMDecode(self.cache, mask, torch.cat([self.positions, other.positions]))


def _left_pad(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zeros prepended along `dim` up to `length`."""
    missing = length - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _dynamic_cache(config):
    """transformers' `DynamicCache` for a model config (no config argument before transformers 4.56)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:
        return DynamicCache()


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor, num_tokens: torch.Tensor | float | None
                   ) -> torch.Tensor:
    """(M, W) float logits, (M,) targets (-100: ignored) -> their mean loss, or their summed loss / `num_tokens`."""
    if num_tokens is None:
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum") / num_tokens


class CausalLM(_Adapter):
    """A decoder-only LM: next-token loss on shifted labels, positions from the attention mask (left padding), a
    decode loop with the LM's own KV cache (transformers' `DynamicCache`)."""

    # vs transformers' gradient_checkpointing_enable: ours wraps each layer with the fusion function before it and
    # runs whenever gradients are recorded (theirs only in train mode, so never for a frozen LLM, and it would not
    # recompute a cross-attention that runs outside the layer).

    kind = "causal"

    def __init__(self, cfg: LMConfig):
        super().__init__(cfg)
        self.layers = find_layer_stack(self.model, self.model.config.get_text_config().num_hidden_layers)

    # -------------------------------------------------------------------------------------------------- calls
    def call(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
             fns: LayerFns | None = None, cache=None) -> torch.Tensor:
        """One LM call on embeddings (B, T, De) -> logits (B, T, W). `cache`: the KV cache a decode goes on with.
        Activation checkpointing (`cfg.gradient_checkpointing`) applies whenever gradients are recorded, in eval
        mode too: a frozen LLM in eval mode still passes gradients into the cross-attention, and its activations
        are what costs the memory."""
        checkpoint = self.cfg.gradient_checkpointing and torch.is_grad_enabled() and cache is None
        kwargs = {self._cache_arg: cache} if cache is not None else {}
        with layers_bound(self.layers, fns, checkpoint):
            out = self.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=cache is not None, return_dict=True, **kwargs)
        return out.logits

    def forward(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                fns: LayerFns | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Training / scoring: embeddings (B, T, De) -> logits (B, T, W), positions from the mask (`labels`: only
        an encoder-decoder LM needs them, to split prompt from target)."""
        return self.call(embeds, attention_mask, positions_from_mask(attention_mask, embeds), fns)

    def supervised_loss(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                        fns: LayerFns | None = None, num_tokens: torch.Tensor | float | None = None) -> torch.Tensor:
        """Training: `loss(forward(...), labels)` with the output embedding applied only where a loss is taken (a
        frozen 49k-word head over every prompt and system token costs more than a small LM's last layers). Falls back
        to the full logits for LMs whose logits are more than the output embedding of the decoder's last hidden state
        (final soft-capping)."""
        conf = self.model.config.get_text_config()
        head, decoder = self.model.get_output_embeddings(), getattr(self.model, "get_decoder", lambda: None)()
        if getattr(conf, "final_logit_softcapping", None) or head is None or decoder is None:
            return self.loss(self.forward(embeds, attention_mask, fns), labels, num_tokens)
        checkpoint = self.cfg.gradient_checkpointing and torch.is_grad_enabled()
        with layers_bound(self.layers, fns, checkpoint):
            hidden = decoder(inputs_embeds=embeds, attention_mask=attention_mask,
                             position_ids=positions_from_mask(attention_mask, embeds), use_cache=False,
                             return_dict=True).last_hidden_state  # (B, T, Dl)
        targets = labels[:, 1:]  # (B, T-1)
        keep = targets != IGNORE_INDEX  # (B, T-1)
        logits = head(hidden[:, :-1][keep]).float()  # (M, W): the supervised positions only
        return _cross_entropy(logits, targets[keep], num_tokens)

    # ------------------------------------------------------------------------------------------------- decode
    @torch.no_grad()
    def generate(self, embeds: torch.Tensor, attention_mask: torch.Tensor, *, pick: Callable[[torch.Tensor],
                 torch.Tensor], max_new_tokens: int, eos: torch.Tensor, pad: int, layers: LayersFor | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """Decode after a left-padded prompt (B, T, De): `pick` turns the last logits (B, W) into tokens (B,);
        `layers(new, cached)` gives each call's pre-layer functions. With `use_cache` the LM's KV cache keeps the
        past and each step runs on the new token alone; without it every step reruns the whole sequence (the
        reference). Returns the new tokens (B, n <= max_new_tokens), `pad` after a sample's EOS."""
        fns = layers or (lambda new, cached: None)
        mask = attention_mask
        if use_cache:
            logits, state = self.prefill(embeds, mask, fns(0, False))  # (B, 1, W)
        else:
            logits = self.call(embeds, mask, positions_from_mask(mask, embeds), fns(0, False))  # (B, T, W)
        done = torch.zeros(len(embeds), dtype=torch.bool, device=embeds.device)
        new_tokens = []
        for _ in range(max_new_tokens):
            nxt, done = _next_token(logits, done, pick, pad, eos)  # (B,), (B,)
            new_tokens.append(nxt)
            if bool(done.all()) or len(new_tokens) == max_new_tokens:
                break
            if use_cache:
                logits = self.step(state, nxt, fns(len(new_tokens), True))  # (B, 1, W)
            else:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, T+1)
                embeds = torch.cat([embeds, self.embed(nxt[:, None])], dim=1)  # (B, T+n, De)
                logits = self.call(embeds, mask, positions_from_mask(mask, embeds), fns(len(new_tokens), False))
        if not new_tokens:
            return torch.zeros(len(embeds), 0, dtype=torch.long, device=embeds.device)
        return torch.stack(new_tokens, dim=1)  # (B, n)

    def _new_cache(self):
        return _dynamic_cache(self.model.config)

    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor, fns: LayerFns | None = None
                ) -> tuple[torch.Tensor, LMDecode]:
        """A left-padded prompt (B, T, De) through the LM into a new KV cache: the last position's logits (B, 1, W)
        and the decode state the steps go on from."""
        positions = positions_from_mask(attention_mask, embeds)  # (B, T)
        cache = self._new_cache()
        logits = self.call(embeds, attention_mask, positions, fns, cache)[:, -1:]  # (B, 1, W)
        return logits, LMDecode(cache, attention_mask, positions[:, -1:])

    @torch.no_grad()
    def step(self, state: LMDecode, tokens: torch.Tensor, fns: LayerFns | None = None) -> torch.Tensor:
        """One decode step: each row's new token (B,) in, its next logits (B, 1, W) out; `state` moves on."""
        state.mask = torch.cat([state.mask, torch.ones_like(state.mask[:, :1])], dim=1)  # (B, T+1)
        state.positions = state.positions + 1  # (B, 1)
        return self.call(self.embed(tokens[:, None]), state.mask, state.positions, fns, state.cache)  # (B, 1, W)


class Seq2SeqLM(_Adapter):
    """An encoder-decoder LM (T5 / FLAN-T5: transformers' `AutoModelForSeq2SeqLM`) as BLIP-2's prefix LM: each
    sample's prompt (every real token before its first supervised one, the soft prompt included) goes into the
    encoder, the rest of its text comes from the decoder, which starts at the config's `decoder_start_token_id`.
    Logits come back in the causal layout, logits[:, t] predicting token t + 1 (the decoder's outputs placed at the
    prompt's last position onwards, zeros elsewhere), so the VLM's loss, scoring and label count are the same for
    both kinds. Cross-attention fusion (functions before decoder layers) is not built for it."""

    # vs BLIP-2's T5 path (prompt ids into the encoder, `labels` ids separately): one batch layout for every LM, the
    # split made here from the labels, so the processor, collate, eval and the server do not know the LM's kind.

    kind = "seq2seq"

    def __init__(self, cfg: LMConfig):
        super().__init__(cfg)
        conf = self.model.config
        if conf.decoder_start_token_id is None:
            raise ValueError("encoder-decoder LM: its config has no decoder_start_token_id")
        self.start_token_id = int(conf.decoder_start_token_id)
        self.layers = []  # no decoder layer takes a fusion function
        encoder, decoder = self.model.get_encoder(), self.model.get_decoder()
        self.blocks = [*find_layer_stack(encoder, conf.num_layers),  # what activation checkpointing wraps
                       *find_layer_stack(decoder, getattr(conf, "num_decoder_layers", None) or conf.num_layers)]

    # -------------------------------------------------------------------------------------------- the split
    @staticmethod
    def split(attention_mask: torch.Tensor | None, labels: torch.Tensor | None, embeds: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where each sample's target starts and ends in `embeds` (B, T, De): (first (B,), outputs (B,), real mask
        (B, T)). `first` is the first supervised real token (no target: one past the last real token); the decoder
        makes `outputs` = max(1, target length) predictions, output j at position first - 1 + j of the causal layout."""
        (b, length), device = embeds.shape[:2], embeds.device
        real = (torch.ones(b, length, dtype=torch.bool, device=device) if attention_mask is None
                else attention_mask.bool())  # (B, T)
        t = torch.arange(length, device=real.device)  # (T,)
        last = torch.where(real, t, -1).amax(1)  # (B,)
        sup = real & (labels != IGNORE_INDEX) if labels is not None else torch.zeros_like(real)  # (B, T)
        first = torch.where(sup.any(1), torch.where(sup, t, length).amin(1), last + 1)  # (B,)
        if bool(((real & (t < first[:, None])).sum(1) == 0).any()):
            raise ValueError("encoder-decoder LM: a sample has no prompt (its first real token is supervised); the "
                             "encoder needs at least one token")
        return first, (last + 1 - first).clamp(min=1), real

    def _encode(self, embeds: torch.Tensor, real: torch.Tensor, first: torch.Tensor):
        """The prompts (every real token before `first`) through the encoder -> (its output, its mask (B, Te))."""
        te = int(first.max())
        mask = (real & (torch.arange(real.shape[1], device=real.device) < first[:, None]))[:, :te]  # (B, Te)
        hidden = self.model.get_encoder()(inputs_embeds=embeds[:, :te], attention_mask=mask.long(),
                                          return_dict=True)  # last_hidden_state (B, Te, Dl)
        return hidden, mask

    def _start(self, like: torch.Tensor) -> torch.Tensor:
        """The decoder start token's embedding for every sample, (B, 1, De)."""
        return self.embed(torch.full((len(like), 1), self.start_token_id, device=like.device))

    def _decode(self, embeds: torch.Tensor, first: torch.Tensor, outputs: torch.Tensor, encoded, enc_mask,
                checkpoint: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced decoder: the start token, then each target token but the last -> logits (B, n, W) and the
        valid-output mask (B, n)."""
        n = int(outputs.max())
        j = torch.arange(n, device=embeds.device)  # (n,)
        valid = j < outputs[:, None]  # (B, n)
        src = (first[:, None] - 1 + j).clamp(0, embeds.shape[1] - 1)  # (B, n): target j - 1 feeds output j
        dec = embeds.gather(1, src[..., None].expand(-1, -1, embeds.shape[-1]))  # (B, n, De)
        dec = torch.cat([self._start(embeds).to(dec.dtype), dec[:, 1:]], dim=1)  # (B, n, De)
        with layers_bound(self.blocks, None, checkpoint):
            logits = self.model(encoder_outputs=encoded, attention_mask=enc_mask.long(), decoder_inputs_embeds=dec,
                                decoder_attention_mask=valid.long(), use_cache=False, return_dict=True).logits
        return logits, valid  # (B, n, W), (B, n)

    def _teacher_forced(self, embeds, attention_mask, labels, fns):
        if fns:
            raise ValueError("an encoder-decoder LM takes no cross-attention fusion (model.fusion.kind=prefix)")
        checkpoint = self.cfg.gradient_checkpointing and torch.is_grad_enabled()
        first, outputs, real = self.split(attention_mask, labels, embeds)
        with layers_bound(self.blocks, None, checkpoint):
            encoded, enc_mask = self._encode(embeds, real, first)
        logits, valid = self._decode(embeds, first, outputs, encoded, enc_mask, checkpoint)
        return logits, valid, first

    # -------------------------------------------------------------------------------------------------- calls
    def forward(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                fns: LayerFns | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """embeddings (B, T, De) -> logits (B, T, W) in the causal layout. `labels` (B, T) say where each target
        starts; without them the whole text is the prompt and only the next token is predicted (at the last real
        position)."""
        logits, valid, first = self._teacher_forced(embeds, attention_mask, labels, fns)  # (B, n, W), (B, n)
        out = logits.new_zeros(*embeds.shape[:2], logits.shape[-1])  # (B, T, W)
        b, j = valid.nonzero(as_tuple=True)  # (M,), (M,)
        out[b, first[b] - 1 + j] = logits[b, j]
        return out

    def supervised_loss(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                        fns: LayerFns | None = None, num_tokens: torch.Tensor | float | None = None) -> torch.Tensor:
        """Training: BLIP-2's prefix-LM loss, the decoder's cross-entropy on each sample's target tokens."""
        logits, valid, first = self._teacher_forced(embeds, attention_mask, labels, fns)  # (B, n, W), (B, n)
        src = (first[:, None] + torch.arange(logits.shape[1], device=labels.device)).clamp(max=labels.shape[1] - 1)
        targets = labels.gather(1, src).masked_fill(~valid, IGNORE_INDEX)  # (B, n)
        return _cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), num_tokens)

    # ------------------------------------------------------------------------------------------------- decode
    @torch.no_grad()
    def generate(self, embeds: torch.Tensor, attention_mask: torch.Tensor, *, pick: Callable[[torch.Tensor],
                 torch.Tensor], max_new_tokens: int, eos: torch.Tensor, pad: int, layers: LayersFor | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """The prompt (B, T, De) through the encoder once, then the decoder from its start token, with its own
        self-attention cache (`use_cache`) or rerun over every token so far (the reference). Returns the new tokens
        (B, n <= max_new_tokens), `pad` after a sample's EOS."""
        if layers is not None:
            raise ValueError("an encoder-decoder LM takes no cross-attention fusion (model.fusion.kind=prefix)")
        first, _, real = self.split(attention_mask, None, embeds)
        encoded, enc_mask = self._encode(embeds, real, first)
        cache = self._new_cache() if use_cache else None
        dec = self._start(embeds).to(embeds.dtype)  # (B, 1, De)
        done = torch.zeros(len(embeds), dtype=torch.bool, device=embeds.device)
        new_tokens = []
        for _ in range(max_new_tokens):
            kwargs = {self._cache_arg: cache} if cache is not None else {}
            step = dec[:, -1:] if cache is not None else dec  # (B, 1 or n, De)
            logits = self.model(encoder_outputs=encoded, attention_mask=enc_mask.long(), decoder_inputs_embeds=step,
                                use_cache=cache is not None, return_dict=True, **kwargs).logits  # (B, *, W)
            nxt, done = _next_token(logits, done, pick, pad, eos)  # (B,), (B,)
            new_tokens.append(nxt)
            if bool(done.all()) or len(new_tokens) == max_new_tokens:
                break
            dec = torch.cat([dec, self.embed(nxt[:, None]).to(dec.dtype)], dim=1)  # (B, n+1, De)
        if not new_tokens:
            return torch.zeros(len(embeds), 0, dtype=torch.long, device=embeds.device)
        return torch.stack(new_tokens, dim=1)  # (B, n)

    def _new_cache(self):
        from transformers import EncoderDecoderCache

        return EncoderDecoderCache(_dynamic_cache(self.model.config), _dynamic_cache(self.model.config))


class LearnedTokens(nn.Module):
    """Tokens the VLM adds to a frozen LM without touching its embedding table (Flamingo's `<image>` marker; the
    table stays frozen and unresized): each has a learned embedding that replaces the table's lookup, initialised to
    the row of the LM token `init_ids[name]` if given, else to the mean of the LM's input embeddings. Parameter
    `<name>` per token."""

    def __init__(self, lm: nn.Module, token_ids: dict[str, int], init_ids: dict[str, int] | None = None):
        super().__init__()
        self.token_ids = dict(token_ids)
        init_ids = init_ids or {}
        if token_ids:
            mean = lm.embed(torch.arange(min(min(token_ids.values()), lm.vocab_size - 1))).mean(0)  # (De,)
            for name in token_ids:
                row = lm.embed(torch.tensor([init_ids[name]]))[0] if name in init_ids else mean  # (De,)
                self.register_parameter(name, nn.Parameter(row.detach().clone()))

    def forward(self, input_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """embeds (B, T, De) of `input_ids` (B, T), the learned tokens' rows replaced."""
        for name, token_id in self.token_ids.items():
            embeds = torch.where((input_ids == token_id)[..., None], getattr(self, name).to(embeds.dtype), embeds)
        return embeds  # (B, T, De)


def build_language_model(cfg: LMConfig) -> nn.Module:
    """The adapter for the LM `cfg` describes, chosen by its config: `Seq2SeqLM` for an encoder-decoder
    (`is_encoder_decoder`), else `CausalLM`."""
    return (Seq2SeqLM if lm_config(cfg).is_encoder_decoder else CausalLM)(cfg)
