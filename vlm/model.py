"""VLM: tiled views -> one frozen encoder -> two resamplers (+ view positions) -> fusion into a frozen LLM.

The model composes the parts and asks them; it never branches on a part's kind:
- `vision` (`VisionEncoder`): every view of the batch in one encoder call;
- `visual` (`VisualTokens`): both resamplers and the view embedding, features -> flat visual tokens;
- `fusion` (`vlm.fusion`): placeholders, the LM's input embeddings, functions bound to one LM call;
- `learned_tokens` (`vlm.lm.LearnedTokens`): the learned embeddings of the tokens the VLM adds (the `<image>` marker);
- `lm` (`vlm.lm` adapter): loss, positions, decode loop and caches, activation checkpointing.

Shapes: B samples, T text tokens, I images in the batch, V views (global views + tiles of all images), C channels,
S view side, P patches per view, N visual tokens of the batch (flat), K visual tokens per sample (padded), Dv vision
width, D resampler width, De LM embedding width, W vocabulary.

The batch (made by `vlm.processor.collate`) keeps images flat, never padded to the largest image:
    input_ids (B, T), attention_mask (B, T), labels (B, T) optional,
    pixel_values (V, C, S, S) uint8, pixel_mask (V, S, S) bool, view_positions (`ViewPositions` of V views),
    views_per_image (I,), images_per_sample (B,).
Views are ordered image by image (global view first, then tiles row-major), images sample by sample,
in the order their placeholders appear in the text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from vlm.config import VLMConfig
from vlm.feature_cache import FeatureCacheConfig, open_cache
from vlm.fusion import CrossAttentionMedia, build_fusion, token_kinds
from vlm.lm import LearnedTokens, LMDecode, build_language_model, sample_next
from vlm.tiling import ViewPositions
from vlm.tokenizer import IGNORE_INDEX, build_tokenizer
from vlm.vision import VisionEncoder
from vlm.visual import VisualTokens


@dataclass
class Decode:
    """A decode in progress: the LM's state (`vlm.lm.LMDecode`) and, with cross-attention, the rows' media."""

    lm: LMDecode
    media: CrossAttentionMedia | None

    def __len__(self) -> int:
        return len(self.lm.positions)

    def select(self, keep: torch.Tensor) -> Decode:
        return Decode(self.lm.select(keep), self.media.select(keep) if self.media is not None else None)

    def merge(self, other: Decode) -> Decode:
        media = self.media
        if media is None and other.media is not None:
            media = other.media.empty(len(self))
        if media is not None:
            media = media.merge(other.media, len(other))
        return Decode(self.lm.merge(other.lm), media)


@dataclass
class VLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None  # (B, T, W); None from forward(logits=False)


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = build_tokenizer(cfg.lm)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(cfg.lm.image_token)
        vision = VisionEncoder(cfg.vision)  # built in this order: the random inits follow from the seed
        lm = build_language_model(cfg.lm)
        visual = VisualTokens(cfg, vision.dim)
        fusion = build_fusion(cfg.fusion, lm=lm, media_dim=visual.out_dim)
        learned = {"image": self.image_token_id} if fusion.learns_image_token else {}
        init = {}
        if cfg.lm.image_token_init is not None:
            init["image"] = self.tokenizer.convert_tokens_to_ids(cfg.lm.image_token_init)
            if init["image"] is None or init["image"] == self.tokenizer.unk_token_id or init["image"] >= lm.vocab_size:
                raise ValueError(f"lm.image_token_init {cfg.lm.image_token_init!r} is not one token of the LM's "
                                 f"vocabulary")
        # Registered in this order (the order of `parameters()`, so of the optimizer's groups and of the gradient norm
        # clipping sums): the learned tokens first, as format-1 models had their marker, so training is bit for bit
        # the same as theirs.
        self.learned_tokens = LearnedTokens(lm, learned, init)
        self.vision, self.lm, self.visual, self.fusion = vision, lm, visual, fusion
        # where a frozen encoder's features are cached on disk (a path config, no tensors; None: off); assignable
        self.feature_cache: FeatureCacheConfig | None = FeatureCacheConfig.from_vision(cfg.vision)
        self.apply_freeze()

    # ----------------------------------------------------------------------------------------------- freezing
    def frozen_parts(self) -> list[nn.Module]:
        freeze = self.cfg.freeze
        parts = [(self.vision, freeze.vision), (self.lm, freeze.llm),
                 *((r, freeze.resamplers) for r in self.visual.resamplers())]
        return [m for m, frozen in parts if frozen]

    def apply_freeze(self) -> None:
        frozen = self.frozen_parts()
        for part in (self.vision, self.lm, *self.visual.resamplers()):
            part.requires_grad_(part not in frozen)
        for p in self.lm.adapter_parameters():  # LoRA trains inside the frozen LLM
            p.requires_grad_(True)
        self.learned_tokens.requires_grad_(not self.cfg.freeze.image_token)
        if self.visual.tile_resampler is None:  # shared body: the tile budget's own queries follow it
            self.visual.tile_queries.requires_grad_(not self.cfg.freeze.resamplers)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for part in self.frozen_parts():  # frozen parts stay in eval mode (no dropout, fixed norms)
            part.eval()
        self.lm.adapters_train(mode)
        return self

    # ---------------------------------------------------------------------------------------------- weights
    def unsourced_parts(self) -> tuple[str, ...]:
        """Prefixes of the parts built from a config without weights (the tiny models): their random init exists
        only in this process, so checkpoints keep them even when frozen."""
        vision = not self.cfg.vision.pretrained or self.cfg.vision.hf_config is not None
        resamplers = self.cfg.freeze.resamplers  # trained in stage 0 or random: no source rebuilds them
        parts = (("vision.", vision), ("lm.", self.cfg.lm.name is None), ("visual.global_resampler.", resamplers),
                 ("visual.tile_resampler.", resamplers), ("visual.tile_queries", resamplers))
        return tuple(prefix for prefix, random in parts if random)

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """What checkpoints hold: the trained weights, plus the parts no source can rebuild (`unsourced_parts`);
        pretrained frozen LLM / encoder weights come from their source."""
        random = self.unsourced_parts()
        names = {n for n, p in self.named_parameters() if p.requires_grad or n.startswith(random)}
        owners = {n.rpartition(".")[0] for n in names}  # modules with a kept weight keep their buffers too
        names |= {n for n, _ in self.named_buffers() if n.rpartition(".")[0] in owners or n.startswith(random)}
        return {k: v for k, v in self.state_dict().items() if k in names}  # (BatchNorm statistics included)

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True):
        """Load a checkpoint's weights (`checkpoint_state_dict`) into a model whose pretrained frozen parts came
        from their source; with `strict`, every weight a checkpoint holds must be in `state`."""
        missing = set(self.checkpoint_state_dict()) - set(state)
        if strict and missing:
            raise KeyError(f"checkpoint lacks trained weights {sorted(missing)[:8]}")
        return self.load_state_dict(state, strict=False)

    # ------------------------------------------------------------------------------------------------ vision
    def encode_views(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (V, C, S, S) -> encoder features (V, P, Dv) and patch mask (V, P): from `self.feature_cache` when the
        encoder is frozen and a cache is set (a hit is bit-identical), else the encoder (no grad when frozen)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze.vision):
            if self.feature_cache is not None and self.cfg.freeze.vision:
                cache = open_cache(self.feature_cache, self.vision, pixel_values.device)
                return cache.encode(self.vision, pixel_values, pixel_mask)  # (V, P, Dv), (V, P)
            return self.vision(pixel_values, pixel_mask)  # (V, P, Dv), (V, P)

    def encode_images(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, view_positions: ViewPositions,
                      views_per_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All views of the batch through one encoder call, then both resamplers (one batched call each).
        Returns the visual tokens of the batch, image after image, (N, D) and tokens per image (I,).
        With `self.feature_cache` and a frozen encoder, cached views skip the encoder (the same features)."""
        feats, pmask = self.encode_views(pixel_values, pixel_mask)  # (V, P, Dv), (V, P)
        tokens = self.visual(feats, pmask, view_positions)  # (N, D)
        lens = self.visual.budget.views(view_positions)  # (V,)
        image_of_view = torch.repeat_interleave(torch.arange(len(views_per_image), device=lens.device),
                                                views_per_image)  # (V,)
        tokens_per_image = torch.zeros_like(views_per_image).index_add_(0, image_of_view, lens)  # (I,)
        return tokens, tokens_per_image

    # ------------------------------------------------------------------------------------------------ inputs
    def prepare_inputs(self, batch: dict, *, cache_kv: bool = True):
        """Token ids + images -> the LM's input embeddings (B, T, De) and the fusion's media for this batch (None
        for prefix fusion or a batch without images). `cache_kv`: the media keys/values are projected once."""
        input_ids = batch["input_ids"]
        is_image = input_ids == self.image_token_id  # (B, T)
        embeds = self.lm.embed(input_ids.masked_fill(is_image, 0))  # (B, T, De); placeholder rows replaced below
        embeds = self.learned_tokens(input_ids, embeds)  # (B, T, De)
        images_per_sample = batch.get("images_per_sample")
        if images_per_sample is None or int(images_per_sample.sum()) == 0:
            if bool(is_image.any()):
                raise ValueError(f"image placeholders and images disagree: {int(is_image.sum())} image token(s) "
                                 f"in the text but no images in the batch")
            return embeds, None
        positions = batch["view_positions"]
        tokens, tokens_per_image = self.encode_images(batch["pixel_values"], batch["pixel_mask"], positions,
                                                      batch["views_per_image"])  # (N, D), (I,)
        is_tile = positions.is_tile.bool()  # (V,)
        return self.fusion.prepare(embeds, is_image, tokens, tokens_per_image, images_per_sample, cache_kv=cache_kv,
                                   token_kind=token_kinds(is_tile, self.visual.budget.views(positions)))

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, batch: dict, num_tokens: torch.Tensor | float | None = None, *, logits: bool = True
                ) -> VLMOutput:
        """`num_tokens`: divide the summed token losses by it instead of taking their mean (`lm.loss`). `logits=False`
        (training): the loss alone, the LM's output layer run only where a loss is taken; `logits` is then None."""
        embeds, media = self.prepare_inputs(batch)  # (B, T, De)
        fns = media.layers() if media is not None else None
        if not logits:
            if batch.get("labels") is None:
                raise ValueError("forward(logits=False) needs labels: it returns only the loss")
            loss = self.lm.supervised_loss(embeds, batch.get("attention_mask"), self.loss_labels(batch), fns,
                                           num_tokens)
            return VLMOutput(loss=loss, logits=None)
        labels = self.loss_labels(batch) if batch.get("labels") is not None else None
        logits = self.lm(embeds, batch.get("attention_mask"), fns, labels=labels)  # (B, T, W)
        loss = self.lm.loss(logits, labels, num_tokens) if labels is not None else None
        return VLMOutput(loss=loss, logits=logits)

    def loss_labels(self, batch: dict) -> torch.Tensor:
        """The labels the loss uses (B, T): image placeholders are never supervised."""
        return batch["labels"].masked_fill(batch["input_ids"] == self.image_token_id, IGNORE_INDEX)

    def num_label_tokens(self, batch: dict) -> torch.Tensor:
        """How many token losses the loss sums for this batch (a 0-dim tensor)."""
        return self.lm.num_label_tokens(self.loss_labels(batch))

    # ---------------------------------------------------------------------------------------------- generate
    @torch.no_grad()
    def picker(self, *, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
               generator: torch.Generator | None = None, on_token: Callable[[torch.Tensor], None] | None = None
               ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The next-token choice of a decode: last logits (B, W) -> tokens (B,), never the image token."""
        def pick(logits: torch.Tensor) -> torch.Tensor:  # (B, W) -> (B,)
            if self.image_token_id < logits.shape[-1]:
                logits[:, self.image_token_id] = float("-inf")  # images come from the request, never the model
            nxt = sample_next(logits, do_sample=do_sample, temperature=temperature, top_p=top_p, generator=generator)
            if on_token is not None:
                on_token(nxt)
            return nxt

        return pick

    # ----------------------------------------------------------------- continuous batching (the server's decode)
    @torch.no_grad()
    def start_decode(self, batch: dict) -> tuple[torch.Tensor, Decode]:
        """A left-padded batch's prompt through the model: its last logits (B, W) and the decode state (images
        encoded once, media keys/values projected once) that `decode_step` goes on from; rows of several states
        join with `Decode.merge` and leave with `Decode.select` between steps. Decoder-only LMs."""
        if self.lm.kind != "causal":
            raise NotImplementedError(f"continuous batching decodes causal LMs; this one is {self.lm.kind}")
        embeds, media = self.prepare_inputs(batch)  # (B, T, De)
        logits, state = self.lm.prefill(embeds, batch["attention_mask"], media.layers() if media else None)
        return logits[:, -1].float(), Decode(state, media.decoding() if media is not None else None)

    @torch.no_grad()
    def decode_step(self, state: Decode, tokens: torch.Tensor) -> torch.Tensor:
        """Each row's new token (B,) -> its next logits (B, W); `state` moves on a step."""
        fns = state.media.layers(1, cached=True) if state.media is not None else None
        return self.lm.step(state.lm, tokens, fns)[:, -1].float()  # (B, W)

    def generate(self, batch: dict, max_new_tokens: int = 32, *, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
                 use_cache: bool = True, generator: torch.Generator | None = None,
                 on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Greedy or sampled decoding on a left-padded batch. Images are encoded once per request; with `use_cache`
        the LM's KV cache and (xattn) the projected media keys/values are reused at every step, without it every
        step recomputes everything (the reference for tests). Returns the new tokens (B, max_new_tokens at most),
        padded with pad_token_id after EOS. `on_token`: called with each step's picked tokens (B,) as they are made
        (the server streams them; rows already past their EOS are still reported, the caller ignores them)."""
        input_ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask
        eos = eos_token_id if eos_token_id is not None else self.tokenizer.eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=input_ids.device)
        embeds, media = self.prepare_inputs(batch, cache_kv=use_cache)  # (B, T, De)
        pick = self.picker(do_sample=do_sample, temperature=temperature, top_p=top_p, generator=generator,
                           on_token=on_token)
        return self.lm.generate(embeds, mask, pick=pick, max_new_tokens=max_new_tokens, eos=eos,
                                pad=self.tokenizer.pad_token_id, layers=media.layers if media is not None else None,
                                use_cache=use_cache)
