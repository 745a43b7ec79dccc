"""VLM: tiled views -> one frozen encoder -> two resamplers (+ view positions) -> fusion into a frozen LLM.

Shapes: B samples, T text tokens, I images in the batch, V views (global views + tiles of all images),
C channels, S view side, P patches per view, Lg / Lt tokens per global view / tile (65 / 129), N visual
tokens of the whole batch, K visual tokens per sample (padded), Dv vision width, D resampler width,
Dl LM hidden width, De LM embedding width, W vocabulary.

The batch (made by `vlm.processor.collate`) keeps images flat, never padded to the largest image:
    input_ids (B, T), attention_mask (B, T), labels (B, T) optional,
    pixel_values (V, C, S, S) uint8, pixel_mask (V, S, S) bool, view_positions (V, 5) = (is_tile, row, col, rows, cols),
    views_per_image (I,), images_per_sample (B,).
Views are ordered image by image (global view first, then tiles row-major), images sample by sample,
in the order their placeholders appear in the text.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vlm.config import VLMConfig
from vlm.fusion import MediaState, PrefixProjector, XAttnFusion
from vlm.lm import LanguageModel, build_tokenizer
from vlm.resampler import build_resampler, init_queries
from vlm.vision import VisionEncoder

IGNORE_INDEX = -100


@dataclass
class VLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor  # (B, T, W)


class ViewEmbedding(nn.Module):
    """Where a view sits: learned embeddings of its tile row and column counted from both ends of the grid, plus a
    global-vs-tile embedding, added to every token of the view. UReader embeds (row, col) only; counting from the
    far edge too makes "rightmost" / "bottom" one embedding whatever the grid's size (2 to 8 columns)."""

    def __init__(self, dim: int, max_grid: int, *, tile_positions: bool = True, view_type: bool = True,
                 std: float = 0.02):
        super().__init__()
        self.grid = nn.ModuleList(nn.Embedding(max_grid, dim) for _ in range(4)) if tile_positions else None
        self.view_type = nn.Embedding(2, dim) if view_type else None
        for emb in [*(self.grid or []), self.view_type]:
            if emb is not None:
                nn.init.normal_(emb.weight, std=std)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens (n, L, D); positions (n, 5) = (is_tile, row, col, rows, cols)."""
        emb = torch.zeros_like(tokens[:, 0])  # (n, D)
        if self.view_type is not None:
            emb = emb + self.view_type(positions[:, 0])
        if self.grid is not None:
            row, col, rows, cols = positions[:, 1:].unbind(1)  # 4 x (n,)
            is_tile = positions[:, :1].to(tokens.dtype)  # (n, 1): the global view gets no grid position
            for emb_k, index in zip(self.grid, (row, col, rows - 1 - row, cols - 1 - col)):
                emb = emb + is_tile * emb_k(index.clamp(min=0))  # (n, D)
        return tokens + emb[:, None]  # (n, L, D)


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = build_tokenizer(cfg.lm)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(cfg.lm.image_token)
        self.vision = VisionEncoder(cfg.vision)
        self.lm = LanguageModel(cfg.lm)

        # Two budgets (65 global, 129 per tile); share_resamplers keeps one body and two query sets.
        self.global_resampler = build_resampler(cfg.global_resampler, self.vision.dim)
        if cfg.share_resamplers:
            self.tile_resampler = None
            std = self.global_resampler.queries.detach().std().item()  # the same init as the shared body's own queries
            self.tile_queries = init_queries(cfg.tile_resampler.num_tokens, self.global_resampler.out_dim, std=std)
        else:
            self.tile_resampler = build_resampler(cfg.tile_resampler, self.vision.dim)
            if self.tile_resampler.out_dim != self.global_resampler.out_dim:
                raise ValueError(f"global and tile resamplers must emit the same width, got "
                                 f"{self.global_resampler.out_dim} and {self.tile_resampler.out_dim}")
        dim = self.global_resampler.out_dim
        self.view_embedding = ViewEmbedding(dim, cfg.tiling.max_grid, tile_positions=cfg.tile_position_embeddings,
                                            view_type=cfg.view_type_embedding, std=cfg.view_embedding_std)

        if cfg.fusion.kind == "xattn":
            self.xattn = XAttnFusion(cfg.fusion, lm_dim=self.lm.hidden_size, media_dim=dim,
                                     num_layers=len(self.lm.layers))
            self.xattn.attach(self.lm.layers)
            # Flamingo's <image> marker is a learned input embedding (the LM's table stays frozen and unresized).
            self.media_marker = nn.Parameter(self.lm.embed(torch.arange(
                min(self.image_token_id, self.lm.model.config.get_text_config().vocab_size - 1))).mean(0).detach()
                .clone())
            self.projector = None
        elif cfg.fusion.kind == "prefix":
            self.xattn = None
            self.projector = PrefixProjector(cfg.fusion, media_dim=dim, embed_dim=self.lm.embed_dim)
        else:
            raise ValueError(f"fusion.kind must be 'xattn' or 'prefix', got {cfg.fusion.kind!r}")
        self.apply_freeze()

    # ----------------------------------------------------------------------------------------------- freezing
    def frozen_parts(self) -> list[nn.Module]:
        resamplers = [m for m in (self.global_resampler, self.tile_resampler) if m is not None]
        return [m for m, frozen in ((self.vision, self.cfg.freeze.vision), (self.lm, self.cfg.freeze.llm),
                                    *((r, self.cfg.freeze.resamplers) for r in resamplers)) if frozen]

    def apply_freeze(self) -> None:
        for part in (self.vision, self.lm, self.global_resampler, self.tile_resampler):
            if part is not None:
                part.requires_grad_(part not in self.frozen_parts())
        if self.tile_resampler is None:  # shared body: the tile budget's own queries follow it
            self.tile_queries.requires_grad_(not self.cfg.freeze.resamplers)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for part in self.frozen_parts():  # frozen parts stay in eval mode (no dropout, fixed norms)
            part.eval()
        return self

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True):
        """Load a checkpoint's weights (`checkpoint_state_dict`) into a model whose pretrained frozen parts came
        from their source; with `strict`, every weight a checkpoint holds must be in `state`."""
        missing = set(self.checkpoint_state_dict()) - set(state)
        if strict and missing:
            raise KeyError(f"checkpoint lacks trained weights {sorted(missing)[:8]}")
        return self.load_state_dict(state, strict=False)

    def unsourced_parts(self) -> tuple[str, ...]:
        """Prefixes of the parts built from a config without weights (the tiny models): their random init exists
        only in this process, so checkpoints keep them even when frozen."""
        vision = not self.cfg.vision.pretrained or self.cfg.vision.hf_config is not None
        frozen_resamplers = self.cfg.freeze.resamplers  # trained in stage 0 or random: no source rebuilds them
        parts = (("vision.", vision), ("lm.", self.cfg.lm.name is None), ("global_resampler.", frozen_resamplers),
                 ("tile_resampler.", frozen_resamplers), ("tile_queries", frozen_resamplers))
        return tuple(prefix for prefix, random in parts if random)

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """What checkpoints hold: the trained weights, plus the parts no source can rebuild (`unsourced_parts`);
        pretrained frozen LLM / encoder weights come from their source."""
        random = self.unsourced_parts()
        names = {n for n, p in self.named_parameters() if p.requires_grad or n.startswith(random)}
        owners = {n.rpartition(".")[0] for n in names}  # modules with a kept weight keep their buffers too
        names |= {n for n, _ in self.named_buffers() if n.rpartition(".")[0] in owners or n.startswith(random)}
        return {k: v for k, v in self.state_dict().items() if k in names}  # (BatchNorm statistics included)

    # ------------------------------------------------------------------------------------------------ vision
    def encode_images(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, view_positions: torch.Tensor,
                      views_per_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All views of the batch through one encoder call, then both resamplers (one batched call each).
        Returns the visual tokens of the batch, image after image, (N, D) and tokens per image (I,)."""
        frozen = self.cfg.freeze.vision
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            feats, pmask = self.vision(pixel_values, pixel_mask)  # (V, P, Dv), (V, P)
        is_tile = view_positions[:, 0].bool()  # (V,)
        g_idx, t_idx = (~is_tile).nonzero()[:, 0], is_tile.nonzero()[:, 0]  # (G,), (Nt,)

        lg, lt = self.cfg.global_resampler.num_tokens, self.cfg.tile_resampler.num_tokens
        lens = torch.where(is_tile, lt, lg)  # (V,) tokens per view
        starts = lens.cumsum(0) - lens  # (V,) where each view's tokens begin in the flat stream
        out = feats.new_zeros(int(lens.sum()), self.global_resampler.out_dim, dtype=self._dtype())  # (N, D)
        for idx, resampler, latents, n in (
            (g_idx, self.global_resampler, None, lg),
            (t_idx, self.tile_resampler or self.global_resampler,
             self.tile_queries if self.tile_resampler is None else None, lt),
        ):  # two budgets, not a loop over views
            if idx.numel() == 0:
                continue
            z = resampler(feats[idx], pmask[idx], latents=latents)  # (n, L, D)
            z = self.view_embedding(z, view_positions[idx])  # (n, L, D)
            dest = rearrange(starts[idx, None] + torch.arange(n, device=idx.device), "n l -> (n l)")  # (n*L,)
            out = out.index_copy(0, dest, rearrange(z, "n l d -> (n l) d").to(out.dtype))  # (N, D)
        image_of_view = torch.repeat_interleave(torch.arange(len(views_per_image), device=lens.device),
                                                views_per_image)  # (V,)
        tokens_per_image = torch.zeros_like(views_per_image).index_add_(0, image_of_view, lens)  # (I,)
        return out, tokens_per_image

    def _dtype(self) -> torch.dtype:
        return next(self.global_resampler.parameters()).dtype

    # ------------------------------------------------------------------------------------------------ inputs
    def prepare_inputs(self, batch: dict) -> tuple[torch.Tensor, MediaState | None]:
        """Token ids + images -> LM input embeddings (B, T, De) and, for xattn, the media state."""
        input_ids = batch["input_ids"]
        is_image = input_ids == self.image_token_id  # (B, T)
        embeds = self.lm.embed(input_ids.masked_fill(is_image, 0))  # (B, T, De); placeholder rows replaced below
        per_sample = is_image.sum(1)  # (B,)
        images_per_sample = batch.get("images_per_sample")
        if images_per_sample is None or int(images_per_sample.sum()) == 0:
            if int(per_sample.sum()):
                raise ValueError(f"image placeholders and images disagree: {int(per_sample.sum())} image token(s) "
                                 f"in the text but no images in the batch")
            return embeds, None
        tokens, tokens_per_image = self.encode_images(batch["pixel_values"], batch["pixel_mask"],
                                                      batch["view_positions"], batch["views_per_image"])
        sample_of_image = torch.repeat_interleave(torch.arange(len(input_ids), device=input_ids.device),
                                                  images_per_sample)  # (I,)
        if self.projector is not None:  # prefix: one placeholder per visual token
            expected = torch.zeros_like(per_sample).index_add_(0, sample_of_image, tokens_per_image)  # (B,)
            _check_counts(per_sample, expected, "image placeholder tokens", "visual tokens")
            visual = self.projector(tokens).to(embeds.dtype)  # (N, De)
            return embeds.masked_scatter(is_image[..., None], visual), None
        # xattn: one marker per image in the text; visual tokens go to the cross-attention layers
        _check_counts(per_sample, images_per_sample, "<image> markers", "images")
        embeds = torch.where(is_image[..., None], self.media_marker.to(embeds.dtype), embeds)  # (B, T, De)
        return embeds, self.media_state(tokens, tokens_per_image, images_per_sample, is_image)

    def media_state(self, tokens, tokens_per_image, images_per_sample, is_image) -> MediaState:
        """Scatter the flat visual tokens (N, D) into per-sample keys (B, K, D), remembering which image of its
        sample each key came from, so each text token can be masked to its latest preceding image."""
        B, dev = is_image.shape[0], tokens.device
        sample_of_image = torch.repeat_interleave(torch.arange(B, device=dev), images_per_sample)  # (I,)
        first_image = images_per_sample.cumsum(0) - images_per_sample  # (B,) index of each sample's 1st image
        rank_in_sample = torch.arange(len(tokens_per_image), device=dev) - first_image[sample_of_image] + 1  # (I,)
        tokens_per_sample = torch.zeros_like(images_per_sample).index_add_(
            0, sample_of_image, tokens_per_image)  # (B,)
        image_of_token = torch.repeat_interleave(torch.arange(len(tokens_per_image), device=dev),
                                                 tokens_per_image)  # (N,)
        sample_of_token = sample_of_image[image_of_token]  # (N,)
        first_token = tokens_per_sample.cumsum(0) - tokens_per_sample  # (B,)
        slot = torch.arange(len(tokens), device=dev) - first_token[sample_of_token]  # (N,) key index in sample
        media = tokens.new_zeros(B, int(tokens_per_sample.max()), tokens.shape[-1])  # (B, K, D)
        media[sample_of_token, slot] = tokens
        key_image = torch.zeros(media.shape[:2], dtype=torch.long, device=dev)  # (B, K)
        key_image[sample_of_token, slot] = rank_in_sample[image_of_token]
        return MediaState(media=media, key_image=key_image, text_time=is_image.long().cumsum(1),
                          only_immediate=self.cfg.fusion.only_immediate, cache_kv=self.cfg.fusion.cache_media_kv)

    # ------------------------------------------------------------------------------------------------ forward
    def run_lm(self, embeds, attention_mask, position_ids, state: MediaState | None, past_key_values=None,
               use_cache=False):
        media = self.xattn.media(state) if self.xattn is not None else contextlib.nullcontext()
        with media:
            return self.lm(embeds, attention_mask=attention_mask, position_ids=position_ids,
                           past_key_values=past_key_values, use_cache=use_cache)

    def forward(self, batch: dict, num_tokens: torch.Tensor | float | None = None) -> VLMOutput:
        """`num_tokens`: divide the summed token losses by it instead of taking their mean (`lm_loss`)."""
        embeds, state = self.prepare_inputs(batch)  # (B, T, De)
        attention_mask = batch.get("attention_mask")
        out = self.run_lm(embeds, attention_mask, positions_from_mask(attention_mask, embeds), state)
        loss = None
        if batch.get("labels") is not None:
            loss = lm_loss(out.logits, self.loss_labels(batch), num_tokens)
        return VLMOutput(loss=loss, logits=out.logits)

    def loss_labels(self, batch: dict) -> torch.Tensor:
        """The labels the loss uses (B, T): image placeholders are never supervised."""
        return batch["labels"].masked_fill(batch["input_ids"] == self.image_token_id, IGNORE_INDEX)

    def num_label_tokens(self, batch: dict) -> torch.Tensor:
        """How many token losses `lm_loss` sums for this batch (a 0-dim tensor)."""
        return (self.loss_labels(batch)[:, 1:] != IGNORE_INDEX).sum()

    # ---------------------------------------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(self, batch: dict, max_new_tokens: int = 32, *, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
                 use_cache: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Greedy or sampled decoding on a left-padded batch. Visual features are computed once; with
        `use_cache` the LM's KV cache and (xattn) the projected media keys/values are reused every step.
        Returns the new tokens (B, max_new_tokens), padded with pad_token_id after EOS."""
        input_ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask
        eos = eos_token_id if eos_token_id is not None else self.tokenizer.eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=input_ids.device)
        pad = self.tokenizer.pad_token_id
        embeds, state = self.prepare_inputs(batch)  # (B, T, De): images encoded once per request
        if state is not None and not use_cache:
            state.cache_kv = False  # the no-cache path recomputes everything: the reference for tests
        positions = positions_from_mask(mask, embeds)  # (B, T)
        prompt_time = state.text_time if state is not None else None  # (B, T)
        cache = None
        if use_cache:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.lm.model.config)
        out = self.run_lm(embeds, mask, positions, state, past_key_values=cache, use_cache=use_cache)
        done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        new_tokens = []
        for _ in range(max_new_tokens):
            logits = out.logits[:, -1].float()  # (B, W)
            if self.image_token_id < logits.shape[-1]:
                logits[:, self.image_token_id] = float("-inf")  # images come from the request, never the model
            nxt = sample_next(logits, do_sample=do_sample, temperature=temperature, top_p=top_p,
                              generator=generator)  # (B,)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            new_tokens.append(nxt)
            done = done | torch.isin(nxt, eos)
            if bool(done.all()) or len(new_tokens) == max_new_tokens:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, T+1)
            step_embeds = self.lm.embed(nxt[:, None])  # (B, 1, De)
            if state is not None:  # no image arrives while decoding: new tokens keep the last image
                state.text_time = prompt_time[:, -1:] if use_cache else torch.cat(
                    [prompt_time, prompt_time[:, -1:].expand(-1, len(new_tokens))], dim=1)  # (B, 1) / (B, T+n)
            if use_cache:
                positions = positions[:, -1:] + 1  # (B, 1)
                out = self.run_lm(step_embeds, mask, positions, state, past_key_values=out.past_key_values,
                                  use_cache=True)
            else:
                embeds = torch.cat([embeds, step_embeds], dim=1)  # (B, T+n, De)
                out = self.run_lm(embeds, mask, positions_from_mask(mask, embeds), state)
        return torch.stack(new_tokens, dim=1) if new_tokens else input_ids.new_zeros(len(input_ids), 0)


def positions_from_mask(mask: torch.Tensor | None, embeds: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding: 0 at each sample's first real token."""
    if mask is None:
        return torch.arange(embeds.shape[1], device=embeds.device)[None].expand(embeds.shape[0], -1)
    return (mask.long().cumsum(1) - 1).clamp(min=0)  # (B, T)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_tokens: torch.Tensor | float | None = None
            ) -> torch.Tensor:
    """Next-token cross-entropy over supervised positions (labels != -100), in float32: their mean, or their sum
    divided by `num_tokens` (a count over more than this batch, e.g. every rank of a data-parallel step)."""
    logits = rearrange(logits[:, :-1], "b t w -> (b t) w").float()  # (B*(T-1), W)
    targets = rearrange(labels[:, 1:], "b t -> (b t)")  # (B*(T-1),)
    if num_tokens is None:
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum") / num_tokens


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


def _check_counts(got: torch.Tensor, expected: torch.Tensor, got_name: str, expected_name: str) -> None:
    """Fail loudly, with the counts, when placeholders and visual features disagree (per sample)."""
    if not torch.equal(got, expected):
        bad = (got != expected).nonzero()[:, 0].tolist()
        raise ValueError(
            f"image placeholders and visual features disagree: sample(s) {bad} have {got[bad].tolist()} "
            f"{got_name} in the text but {expected[bad].tolist()} {expected_name} from their images "
            f"(totals {int(got.sum())} vs {int(expected.sum())})")
