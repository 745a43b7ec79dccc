"""Typed configuration for every part of the model. Stdlib only: this is the root of the import graph.

Hydra yamls under `configs/` instantiate these dataclasses (`_target_: vlm.config.VLMConfig`), and tests
build them directly, so the model never depends on Hydra.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Literal


@dataclass
class TilingConfig:
    """GPT-4V's published `detail` geometry. The defaults are the API's numbers; change them only on purpose."""

    tile_size: int = 512  # side of one high-res crop, and of the low-res global view (detail="low")
    max_side: int = 2048  # step 1 of "high": fit inside max_side x max_side (only shrinks)
    short_side: int = 768  # step 2 of "high": shortest side down to short_side (only shrinks)
    auto_detail: Literal["low", "high"] = "high"  # what detail="auto" means
    global_resize: Literal["pad", "stretch"] = "pad"  # pad keeps the aspect ratio (padding masked out)
    force_detail: Literal["low", "high"] | None = None  # ablations: every image at this detail, whatever asked

    @property
    def max_grid(self) -> int:
        """Largest number of tile rows or columns any image can get: sizes the row/col embedding tables."""
        return math.ceil(self.max_side / self.tile_size)


@dataclass
class VisionConfig:
    """One frozen encoder for every view. `backend="timm"` takes any timm model name; `backend="hf"` a
    transformers vision tower (CLIP, SigLIP) by hub id / local path, or by `hf_config` for tests."""

    backend: Literal["timm", "hf"] = "timm"
    name: str = "vit_tiny_patch16_224"  # timm model name, or HF hub id when backend="hf"
    pretrained: bool = False  # load real weights (from `checkpoint_path` if given, else the hub cache)
    checkpoint_path: str | None = None  # local weights: timm file / HF folder; the offline way in
    image_size: int = 512  # every view is encoded at this size (resized from the tile size if they differ); ViT
                           # position embeddings are interpolated to it
    feature_layer: int = -2  # which block's output to use (penultimate by default, as LLaVA)
    # hf: keep the tower's class token as the first feature of every view (BLIP-2's Q-Former reads it; LLaVA drops it)
    keep_class_token: bool = False
    # hf: the tower's final LayerNorm (`post_layernorm`) on the chosen layer's output: BLIP-2 reads the last layer
    # normalised (`last_hidden_state` of its vision model); CLIP's `post_layernorm` normally only sees the pooled token
    post_layernorm: bool = False
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs
    hf_config: dict[str, Any] | None = None  # build a transformers tower from config (no weights)
    mean: tuple[float, float, float] | None = None  # pixel normalisation; None = the backbone's own
    std: tuple[float, float, float] | None = None
    gradient_checkpointing: bool = False  # recompute block activations in backward (matters only when trained)
    # Without gradients (a frozen encoder, eval, serving), views go through the encoder this many at a time: bounds
    # the encoder's activation memory (8-shot prompts at detail high are ~60 views a question). Not a cache key.
    max_views_per_call: int = 64
    # Run the encoder under autocast to this dtype ("bfloat16" / "float16"; None: its weights' dtype), features cast
    # back to the weights' dtype. EfficientNet-Lite0 at 512 px on 2 CPU cores: 163 -> 80 ms a view in bfloat16
    # (channels-last; README, "The real frozen pair"). Part of the feature cache's key.
    autocast: str | None = None
    # A disk cache of the frozen encoder's features per view (vlm/feature_cache.py): a folder, or None (off); the env
    # VLM_FEATURE_CACHE overrides it (a folder, or "off" / "null"). Used only while model.freeze.vision is true.
    feature_cache: str | None = None
    feature_cache_max_gb: float = 20.0  # the folder's size bound (all encoders in it); least recently used go first
    feature_cache_dtype: str | None = None  # None: the features' own dtype (bit-identical); "float16" / "bfloat16"


# Vision fields added after caches keyed on the whole VisionConfig existed (stage 0's, the feature cache's): at these
# values they change nothing, so `cache_fields` leaves them out and the older caches stay valid.
VISION_FIELDS_ADDED = {"keep_class_token": False, "post_layernorm": False}
VISION_FIELDS_UNKEYED = ("max_views_per_call",)  # how the features are computed, not what they are


def cache_fields(cfg: VisionConfig) -> dict[str, Any]:
    """The vision config as cache keys hash it: every field but those of `VISION_FIELDS_ADDED` at their no-op value
    and those that do not change the features (`VISION_FIELDS_UNKEYED`)."""
    return {k: v for k, v in asdict(cfg).items() if k not in VISION_FIELDS_UNKEYED and
            (k not in VISION_FIELDS_ADDED or v != VISION_FIELDS_ADDED[k])}


@dataclass
class QFormerTextConfig:
    """The Q-Former's text branch (BLIP-2 stage 1): BERT word + position embeddings and a text feed-forward in every
    layer, sharing the query branch's self-attention (its init: the resampler's `bert_init`)."""

    vocab_size: int = 30522  # BERT's uncased WordPiece vocabulary
    max_positions: int = 512
    pad_token_id: int = 0
    tokenizer: str | None = None  # a tokenizer folder; None: the resampler's bert_init
    max_length: int = 32  # captions are cut to this many tokens ([CLS] and [SEP] included)


@dataclass
class ResamplerConfig:
    """Perceiver (Flamingo) or Q-Former (BLIP-2): `num_queries` latents plus one class token. `mlp` (LLaVA's
    connector, no resampling): every patch through a 2-layer MLP, so `num_queries` must be the encoder's patches per
    view, plus the class token (the mean patch through the same MLP)."""

    kind: Literal["perceiver", "qformer", "mlp"] = "perceiver"
    num_queries: int = 64
    dim: int | None = None  # working width; None = the vision width (Perceiver) / 768 (Q-Former)
    depth: int = 6  # Perceiver blocks / Q-Former layers
    heads: int = 8
    dim_head: int = 64  # Perceiver only; the Q-Former uses dim // heads as BERT does
    ff_mult: int = 4
    activation: Literal["gelu", "relu", "gelu_tanh", "silu"] = "gelu"
    qk_norm: bool = False  # Perceiver: LayerNorm on per-head q and k (Idefics option)
    cross_attention_freq: int = 2  # Q-Former: cross-attention in layers 0, f, 2f, ...
    layer_norm_eps: float = 1e-12  # Q-Former LayerNorm eps (BERT's); the Perceiver uses torch's 1e-5
    dropout: float = 0.0
    # Add to every query the mean of its cell of the patch grid (the class token: of the whole view), projected to
    # D. Off in the reference models; a locality prior that makes every token image-dependent from step 0.
    pooled_queries: bool = False
    text: QFormerTextConfig | None = None  # Q-Former: the text branch of BLIP-2's stage 1 (null: queries only)
    # Q-Former: a BERT folder (`packaged:all_minilm_l6_v2`) whose embeddings, self-attention and feed-forward initialise
    # it when built (the feed-forward into both branches; cross-attention and queries stay fresh), as BLIP-2 starts from
    # BERT-base. Its width, depth, heads and feed-forward size must be the Q-Former's.
    bert_init: str | None = None
    # Q-Former: a (trained) LayerNorm on the media before the cross-attention, BLIP-2's `ln_vision` (its ViT features
    # arrive normalised; a convnet's, e.g. EfficientNet's stage 3 at std ~6 per channel, do not). Off: the reference.
    media_norm: bool = False
    # Q-Former: init std of the fresh cross-attention's value and output projections (BERT's 0.02 is BLIP-2's). What
    # the image adds to a query's residual at init scales with the media width: BLIP-2's 1408-wide ViT gives ~0.4 of
    # the query's unit std, a 112-wide EfficientNet stage ~0.08, and then stage 1's ITC never leaves ln B (measured:
    # 800 pairs, batch 24, 40 ITC steps without dropout: 2.03 at 0.02, 1.28 at 0.2; minilm_qformer uses 0.2).
    cross_init_std: float = 0.02

    @property
    def num_tokens(self) -> int:
        """Visual tokens one view contributes: the queries plus the class token."""
        return self.num_queries + 1


@dataclass
class FusionConfig:
    """How visual tokens enter the LLM: Flamingo gated cross-attention or a BLIP-2/LLaVA prefix."""

    kind: Literal["xattn", "prefix"] = "xattn"
    every_n_layers: int = 1  # xattn: a GATED XATTN-DENSE block before every n-th decoder layer
    # xattn: the decoder layers that get a block, counted from 0 (overrides every_n_layers). Blocks only in the upper
    # layers of a frozen LLM keep the backward out of the layers below the lowest one.
    layers: list[int] | None = None
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    only_immediate: bool = True  # xattn: a text token sees only the latest preceding image
    cache_media_kv: bool = True  # xattn: project media keys/values once per request, reuse every step
    # xattn: the gates' initial value. 0 (Flamingo) leaves a pretrained LLM's outputs untouched at init; a model
    # whose LLM trains from scratch (the tiny default) has nothing to protect and learns faster with open gates.
    gate_init: float = 0.0
    # xattn: a token with no image before it gets no block output at all, neither attention nor the gated
    # feed-forward (IDEFICS), so text-only conversations are exactly the LLM's, trained gates or not. False:
    # open_flamingo's behaviour (such tokens skip the attention only; the gated feed-forward runs on every token).
    text_only_passthrough: bool = True
    # xattn: view-routed heads. The first `global_heads` heads of every block attend only to the global view's tokens,
    # the next `tile_class_heads` only to the tiles' class tokens (one per tile), the others to all the tiles' tokens
    # (an image without tiles: every head sees its global view). 0 and 0: every head sees every token (Flamingo).
    # Routing keeps the 65 global tokens from being diluted among 6 x 129 tile tokens (README, "The embedded default").
    global_heads: int = 0
    tile_class_heads: int = 0
    # xattn: the block's layout. "flamingo": LayerNorm before the attention, a GELU MLP (ff_mult x the LM's width)
    # with its own LayerNorm. "idefics" (IDEFICS v1, what `vlm.hf_import` builds for IdeficsForVisionText2Text):
    # RMSNorms (eps `norm_eps`) before the attention and before a gated MLP of `ff_hidden` (activation `ff_activation`,
    # IDEFICS: silu), optional RMSNorms on the per-head queries and keys (`qk_norm`). Run it with
    # text_only_passthrough=false to be IDEFICS: it zeroes the attention of tokens with no image, not the MLP.
    block: Literal["flamingo", "idefics"] = "flamingo"
    ff_hidden: int | None = None  # the MLP's width; None: ff_mult x the LM's hidden width
    ff_activation: str = "gelu"
    qk_norm: bool = False
    norm_eps: float = 1e-5
    gate_shape: Literal["scalar", "vector"] = "scalar"  # one tanh gate per block, or one per LM channel (IDEFICS)
    projector: Literal["linear", "mlp"] = "mlp"  # prefix: visual width -> LLM width


@dataclass
class LoRAConfig:
    """Low-rank adapters on the LLM's linear layers (peft): W x + (alpha / r) B A x, B = 0 at init, so a model with
    fresh adapters is exactly the LLM; only A and B train (the base weights stay frozen and come from their source)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # module names (peft target_modules)
    # eval.py and the server fold B A into W once at load (one matmul per layer instead of three); the merged model's
    # outputs equal the adapted one's up to float rounding (tests/test_lm.py). Training never merges.
    merge_for_inference: bool = True


@dataclass
class LMConfig:
    """Any transformers causal LM: a hub id / local folder, or `hf_config` (with `model_type`) for tests."""

    name: str | None = None
    hf_config: dict[str, Any] | None = None
    tokenizer: str | None = None  # None: `name`, or the built-in byte tokenizer for hf_config models
    dtype: str = "float32"
    image_token: str = "<image>"  # placeholder (prefix) / media marker (xattn)
    # xattn: the token of the LM's vocabulary whose embedding row initialises the learned marker, so that with closed
    # gates the VLM is exactly the LM reading that token at each image; null: the mean of the LM's embedding table
    image_token_init: str | None = None
    gradient_checkpointing: bool = False
    lora: LoRAConfig | None = None  # adapters on the frozen LLM (null: none)


@dataclass
class VideoConfig:
    """Videos (Flamingo; GPT-4V's guidance: send sampled frames as images): an ordered list of frames, each frame one
    low-detail global view, resampled on its own by the global resampler (a video of F frames costs F x the global
    view's tokens, 65) or all together (`resample: clip`, 65 tokens a video). The text holds one `<image>` marker per
    video (xattn: its tokens are one media item, every frame's) or all its tokens (prefix). `vlm.images.Video`
    carries the frames; `ViewPositions.frame` numbers them 1..F."""

    max_frames: int = 8  # a video with more frames is refused (sample it first: `vlm.images.sample_frames`)
    # "frame": each frame resampled on its own (F x 65 tokens a video); "clip": Flamingo's, every frame's features
    # (plus their temporal embeddings) into one global-resampler call, 65 tokens a video whatever its length
    resample: Literal["frame", "clip"] = "frame"
    # a learned embedding per frame index added to every token of that frame (Flamingo's temporal embeddings).
    # Without it the cross-attention sees a video's frames as a set: their order is lost (`no_temporal` ablation).
    temporal_embeddings: bool = False


@dataclass
class FreezeConfig:
    vision: bool = True
    llm: bool = True
    resamplers: bool = False  # both resamplers (and shared tile queries); the tiny default freezes its stage-0 ones
    # the learned <image> marker (xattn) keeps its initial embedding: with it trained, every step backpropagates
    # through the whole frozen LLM down to the input; frozen, only through the layers above the lowest xattn block
    image_token: bool = False


@dataclass
class VLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    global_resampler: ResamplerConfig = field(default_factory=lambda: ResamplerConfig(num_queries=64))
    tile_resampler: ResamplerConfig = field(default_factory=lambda: ResamplerConfig(num_queries=128))
    share_resamplers: bool = False  # one set of weights for both budgets (queries stay separate)
    tile_position_embeddings: bool = True  # learned row + column embeddings on tile tokens
    view_type_embedding: bool = True  # learned global-vs-tile embedding
    view_embedding_std: float = 0.02  # init std of those embeddings (the visual tokens' own scale is ~1)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    video: VideoConfig = field(default_factory=VideoConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VLMConfig:
        return _from_dict(cls, d)

    @classmethod
    def build(cls, **kwargs: Any) -> VLMConfig:
        """Hydra's `_target_` for a model node: nested dicts in, typed config out."""
        return _from_dict(cls, kwargs)


def _from_dict(cls, d):
    """Rebuild nested dataclasses from plain dicts (checkpoints, OmegaConf containers); nested types are read
    off the field annotations, so adding a config section needs no registration here."""
    if is_dataclass(d):
        return d
    names = {f.name: f.type for f in fields(cls)}
    unknown = set(d) - set(names) - {"_target_", "_convert_"}
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {}
    for name, annotation in names.items():
        if name in d:
            # string annotations (postponed): `X` or `X | None` name the dataclass X
            sub = globals().get(annotation.removesuffix(" | None")) if isinstance(annotation, str) else annotation
            nested = isinstance(sub, type) and is_dataclass(sub) and d[name] is not None
            kwargs[name] = _from_dict(sub, d[name]) if nested else d[name]
    return cls(**kwargs)
