"""One frozen vision encoder for every view (global views and tiles), run as a single batched call.

Shapes: V views (all global views and tiles of a batch), C channels, S view side, P patches per view,
Dv vision width, gh x gw the patch grid.

Backends:
- timm: any model with `forward_intermediates` (ViT, SigLIP, EVA, ConvNeXt, NFNet, ...). Blocks after the
  requested layer are pruned, so asking for the penultimate layer never runs the last block.
- hf: a transformers vision tower (CLIP, SigLIP) by hub id / local folder, or built from `hf_config`.
Unlike open_flamingo (which keeps CLIP's pooled/last output), features come from a configurable layer,
penultimate by default, at 512 px with interpolated position embeddings, as LLaVA-1.5 does.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vlm.config import VisionConfig
from vlm.layers import checkpoint_blocks, enable_hf_checkpointing, find_layer_stack
from vlm.pretrained import missing_weights, resolve
from vlm.tiling import patch_mask

# Normalisation used when neither the config nor the backbone says otherwise.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


class VisionEncoder(nn.Module):
    """(V, C, S, S) uint8 or float pixels -> (V, P, Dv) features and the (gh, gw) patch grid."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.backend == "timm":
            if cfg.keep_class_token or cfg.post_layernorm:
                raise ValueError("vision.keep_class_token / post_layernorm are for backend=hf towers")
            self.backbone, mean, std = _build_timm(cfg)
            self.dim = self.backbone.feature_info[self._timm_index]["num_chs"]
            maskable = "attn_mask" in inspect.signature(self.backbone.forward_intermediates).parameters
            grid = getattr(getattr(self.backbone, "patch_embed", None), "grid_size", None)
            self._grid = tuple(grid) if maskable and grid is not None else None  # ViTs: mask inside the encoder
            self._channels_last = grid is None  # convnets
            if self._channels_last:
                self.backbone.to(memory_format=torch.channels_last)
            self.tokens_per_view = (math.prod(grid) + self.backbone.num_prefix_tokens if grid is not None else
                                    (cfg.image_size // self.backbone.feature_info[self._timm_index]["reduction"]) ** 2)
        elif cfg.backend == "hf":
            self._channels_last = False
            self.backbone, mean, std, self._hf_index = _build_hf(cfg)
            self.dim = self.backbone.config.hidden_size
            # class token(s) the tower puts before the patches (CLIP, BLIP-2: one; SigLIP: none)
            self._hf_prefix = int(hasattr(getattr(self.backbone, "embeddings", None), "class_embedding"))
            if cfg.post_layernorm and not hasattr(self.backbone, "post_layernorm"):
                raise ValueError(f"vision.post_layernorm: {type(self.backbone).__name__} has no post_layernorm")
            self._hf_norm = self.backbone.post_layernorm if cfg.post_layernorm else None
            self.tokens_per_view = (cfg.image_size // self.backbone.config.patch_size) ** 2 + self._hf_prefix
        else:
            raise ValueError(f"vision backend must be 'timm' or 'hf', got {cfg.backend!r}")
        mean, std = cfg.mean or mean, cfg.std or std
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        if cfg.gradient_checkpointing:
            self.enable_gradient_checkpointing()
        self._flops_per_view: int | None = None  # counted on first use (throughput's FLOPs)

    def flops_per_view(self) -> int:
        """Forward FLOPs of one view at the encoder's size, counted once by torch's FLOP counter (convnets do most of
        their work at resolutions above the final grid, so params x tokens misses it)."""
        if self._flops_per_view is None:
            from torch.utils.flop_counter import FlopCounterMode

            param = next(self.backbone.parameters())
            x = torch.zeros(1, 3, self.cfg.image_size, self.cfg.image_size, device=param.device)
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                self(x)
            self._flops_per_view = counter.get_total_flops()
        return self._flops_per_view

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block's activations in backward instead of keeping them. Only a trained tower saves
        memory; a frozen one runs without grad, unaffected."""
        blocks = getattr(self.backbone, "blocks", None)
        if self.cfg.backend == "hf":
            enable_hf_checkpointing(self.backbone)
        elif isinstance(blocks, (nn.Sequential, nn.ModuleList)):  # timm ViTs: their own switch skips masked calls
            checkpoint_blocks(blocks)
        else:
            self.backbone.set_grad_checkpointing(True)  # timm convnets: per stage

    def resize_views(self, pixels: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (V, C, S, S) at the tile size and their masks -> the views at the encoder's size, in their dtype, with
        the padding at the mean colour, and the resized masks (a resized pixel is real if any of its sources is).
        uint8 views are resized as uint8 images (torch's antialiased uint8 kernel on CPU, as the tiler resizes:
        ~10x cheaper than resizing normalised floats, and within rounding of it), so stage 0 can store them small."""
        size = self.cfg.image_size
        if tuple(pixels.shape[-2:]) == (size, size):
            return pixels, pixel_mask
        resize = partial(F.interpolate, size=(size, size), mode="bilinear", antialias=True)
        partial_views = (~pixel_mask.flatten(1).all(1)).nonzero()[:, 0]  # (Vp,)
        mask = pixel_mask.new_ones(len(pixels), size, size)  # (V, size, size)
        if len(partial_views):
            cover = resize(pixel_mask[partial_views, None].float(), mode="area", antialias=False)  # (Vp, 1, size, size)
            mask[partial_views] = cover[:, 0] > 0
            fill = (self.mean * 255).round() if pixels.dtype == torch.uint8 else self.mean  # (1, C, 1, 1)
            pixels = torch.where(pixel_mask[:, None], pixels, fill.to(pixels.dtype))  # (V, C, S, S)
        if pixels.dtype == torch.uint8 and pixels.device.type != "cpu":  # no uint8 kernel there: float, rounded back
            return resize(pixels.float()).round_().clamp_(0, 255).to(torch.uint8), mask
        return resize(pixels), mask  # (V, C, size, size)

    @property
    def _timm_index(self) -> int:
        return self.backbone._vlm_feature_index

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0, 1] float) pixels -> normalised float, in one pass after the cast (the tiny default's
        step time was dominated by separate divide / subtract passes over all views)."""
        scale = 1.0 / (self.std * 255.0) if pixels.dtype == torch.uint8 else 1.0 / self.std  # (1, C, 1, 1)
        return torch.addcmul(-self.mean / self.std, pixels.to(self.mean.dtype), scale)  # (V, C, S, S)

    def forward(self, pixels: torch.Tensor, pixel_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels (V, C, S, S), pixel_mask (V, S, S) True on real pixels -> features (V, P, Dv) and the patch
        validity mask (V, P) (a patch is valid if any of its pixels is). On timm ViTs the encoder itself is
        masked too, so padded patches of partial tiles do not leak into real ones through self-attention."""
        if pixel_mask is None:
            pixel_mask = torch.ones(pixels.shape[0], *pixels.shape[-2:], dtype=torch.bool, device=pixels.device)
        chunk = self.cfg.max_views_per_call
        if not torch.is_grad_enabled() and chunk and len(pixels) > chunk:  # bounded activation memory, same features
            parts = [self(pixels[i:i + chunk], pixel_mask[i:i + chunk]) for i in range(0, len(pixels), chunk)]
            return torch.cat([f for f, _ in parts]), torch.cat([m for _, m in parts])  # (V, P, Dv), (V, P)
        pixels, pixel_mask = self.resize_views(pixels, pixel_mask)  # (V, C, s, s): from the tile size to the encoder's
        # the padding is the mean colour whatever the input held: patches straddling the edge see no junk
        x = self.normalize(pixels).masked_fill(~pixel_mask[:, None], 0.0)  # (V, C, S, S); 0 = the mean colour
        x = x.to(next(self.backbone.parameters()).dtype)
        if self._channels_last:  # timm convnets on channels-last: 2x faster convolutions on CPU (tiny default)
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(self.cfg.autocast, x.device.type):
            feats, grid, valid = self._encode(x, pixel_mask)  # (V, P, Dv)
        if self.cfg.autocast is not None:
            feats = feats.to(x.dtype)  # autocast's dtype back to the weights' (downstream runs in those)
        return feats, valid if valid is not None else patch_mask(pixel_mask, grid)

    def _encode(self, x: torch.Tensor, pixel_mask: torch.Tensor):
        """Normalised views (V, C, S, S) -> features (V, P, Dv), the patch grid and the ViT patch mask (or None)."""
        if self.cfg.backend == "timm":
            kwargs, valid = {}, None
            if self._grid is not None:
                valid = patch_mask(pixel_mask, self._grid)  # (V, P)
                if not bool(valid.all()):
                    prefix = valid.new_ones(valid.shape[0], self.backbone.num_prefix_tokens)  # (V, R)
                    kwargs["attn_mask"] = torch.cat([prefix, valid], dim=1)[:, None, None, :]  # (V, 1, 1, R+P)
            (fmap,) = self.backbone.forward_intermediates(
                x, indices=[self._timm_index], intermediates_only=True, **kwargs)  # [(V, Dv, gh, gw)]
            grid = tuple(fmap.shape[-2:])
            feats = rearrange(fmap, "v d h w -> v (h w) d")  # (V, P, Dv)
        else:
            out = self.backbone(pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=True)
            feats = out.hidden_states[self._hf_index]  # (V, R+P, Dv)
            if self._hf_norm is not None:
                feats = self._hf_norm(feats)
            side = int((feats.shape[1] - self._hf_prefix) ** 0.5)
            grid, valid = (side, side), None
            if self.cfg.keep_class_token:  # the class token first, always valid
                patches = patch_mask(pixel_mask, grid)  # (V, P)
                valid = torch.cat([patches.new_ones(len(x), self._hf_prefix), patches], dim=1)  # (V, R+P)
            else:
                feats = feats[:, self._hf_prefix:]  # (V, P, Dv), class token dropped
        return feats, grid, valid


def _autocast(dtype: str | None, device_type: str):
    """`VisionConfig.autocast` as a context: nothing for None."""
    if dtype is None:
        return contextlib.nullcontext()
    if dtype not in ("bfloat16", "float16"):
        raise ValueError(f"vision autocast must be null, bfloat16 or float16, got {dtype!r}")
    return torch.autocast(device_type, dtype=getattr(torch, dtype))


def _build_timm(cfg: VisionConfig):
    import timm

    kwargs = dict(num_classes=0, **cfg.model_kwargs)
    if cfg.pretrained and cfg.checkpoint_path:
        kwargs["pretrained_cfg_overlay"] = dict(file=resolve(cfg.checkpoint_path))
    try:
        try:
            model = timm.create_model(cfg.name, pretrained=cfg.pretrained, img_size=cfg.image_size, **kwargs)
        except TypeError as e:  # convnets take any input size and have no img_size argument
            if "img_size" not in str(e):
                raise
            model = timm.create_model(cfg.name, pretrained=cfg.pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        if cfg.pretrained and not isinstance(e, TypeError):
            raise missing_weights("timm vision", cfg.name, "model.vision.checkpoint_path", e) from e
        raise
    if not hasattr(model, "forward_intermediates"):
        raise ValueError(f"timm model {cfg.name!r} has no forward_intermediates(); pick another backbone")
    # Keep only what feeds the requested layer: feature_layer=-2 prunes the last block.
    (index,) = model.prune_intermediate_layers([cfg.feature_layer], prune_norm=True, prune_head=True)
    model._vlm_feature_index = index
    pc = model.pretrained_cfg or {}
    return model, tuple(pc.get("mean", HALF)), tuple(pc.get("std", HALF))


def _tower_class(conf):
    """The transformers model class of a vision tower config: AutoModel's, or for towers AutoModel does not map
    (BLIP-2's `Blip2VisionConfig`) the class named after the config (`Blip2VisionModel`)."""
    import transformers
    from transformers import AutoModel

    if type(conf) in AutoModel._model_mapping:
        return AutoModel._model_mapping[type(conf)]
    cls = getattr(transformers, type(conf).__name__.removesuffix("Config") + "Model", None)
    if cls is None:
        raise ValueError(f"no transformers vision model for {type(conf).__name__}")
    return cls


def _build_hf(cfg: VisionConfig):
    from transformers import AutoConfig

    if cfg.hf_config is not None:
        conf = AutoConfig.for_model(**cfg.hf_config)
        model = _tower_class(conf)(conf)
    else:
        source = resolve(cfg.checkpoint_path or cfg.name)
        try:
            conf = AutoConfig.from_pretrained(source)
            conf = getattr(conf, "vision_config", conf)  # a full CLIP/SigLIP checkpoint: keep the tower
            model_cls = _tower_class(conf)
            model = model_cls.from_pretrained(source, config=conf) if cfg.pretrained else model_cls(conf)
        except OSError as e:
            raise missing_weights("transformers vision", cfg.name, "model.vision.checkpoint_path", e) from e
    conf = model.config
    layers = find_layer_stack(model, conf.num_hidden_layers)
    n = conf.num_hidden_layers
    index = cfg.feature_layer % (n + 1)  # hidden_states holds the embeddings + one entry per layer
    del layers[index:]  # the blocks after the requested layer never run
    clip_like = conf.model_type.startswith("clip")
    mean, std = (CLIP_MEAN, CLIP_STD) if clip_like else (HALF, HALF)
    return model, mean, std, index

