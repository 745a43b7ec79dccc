"""Where an answer looked: `python -m vlm.explain checkpoint=<run>/checkpoint.pt image=<file> question="..."` writes
`out` (default attention.png): the image, its tile grid, and a heat map of the answer's attention.

How (cross-attention fusion): the answer (greedy, as eval and the server decode it, or `answer=` given) is run once
more, teacher-forced after its prompt. At every gated cross-attention block, the attention of the tokens that predict
the answer over the sample's visual tokens is recomputed from the block's own inputs (heads, blocks and answer tokens
averaged): one weight per visual token, summing to 1. Each visual token is then carried back to its view's patches
through its resampler's last attention layer (its attention over the patches, heads averaged, renormalised over the
patches; the Perceiver's attention to the latents is left out), and each view's patch heat is laid onto the image
where the view sits: the global view over the whole image, a tile over its crop. `tile_heat` is the heat inside each
tile's crop (the global view's share included), `view_mass` the attention on each view's own tokens.

Prefix fusion (BLIP-2 / LLaVA, decoder-only LLMs): the visual tokens are in the LLM's input, so the weight per visual
token is the answer tokens' self-attention on their positions, every layer and head averaged (the LLM runs with
eager attention for that one call, to return its probabilities) and renormalised over the visual tokens (the
attention on the text is left out).

vs the gradient maps of LLaVA-style tooling: attention read off the model's own blocks (no backward, no
hyper-parameters), at the cost of saying nothing about the frozen encoder's inside.

Nothing is kept in a module: the probabilities are computed in forward pre-hooks that exist only during that call.

Shapes: T tokens, K visual tokens of the sample, V views (global view + tiles), L tokens of one view, P patches of
one view (class token first where the tower keeps one), g the patch grid side, h x w the image the views are cut from.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlm.fusion import CrossAttentionFusion, GatedCrossAttentionBlock
from vlm.images import load_image
from vlm.processor import Processor, collate, to_device
from vlm.prompts import generation_prompt
from vlm.resampler import PerceiverResampler, QFormer, QFormerAttention
from vlm.tiling import TilePlan


@dataclass
class Explanation:
    question: str
    answer: str
    plan: TilePlan
    canvas: Image.Image  # the image the views were cut from (the high-detail resize, or the original at detail low)
    heat: np.ndarray  # (h, w) attention mass per pixel of `canvas`, summing to 1
    view_mass: np.ndarray  # (V,) the answer's attention on each view's tokens (global view first), summing to 1
    tile_heat: np.ndarray  # (rows, cols) the heat inside each tile's crop; (0, 0) at detail low

    def summary(self) -> str:
        tiles = "" if not self.tile_heat.size else " tiles " + " | ".join(
            " ".join(f"{v:.2f}" for v in row) for row in self.tile_heat)
        return f"A: {self.answer!r}; global view {self.view_mass[0]:.2f};{tiles}"


def _last_attention(resampler) -> torch.nn.Module:
    """The module whose attention over the patches a resampler's outputs come from last."""
    if isinstance(resampler, PerceiverResampler):
        return resampler.layers[-1]
    if isinstance(resampler, QFormer):
        return [layer.cross_attn for layer in resampler.layers if layer.cross_attn is not None][-1]
    raise ValueError(f"vlm.explain: no attention to carry back through for {type(resampler).__name__}")


def _answer_ids(model, batch: dict, answer: str | None, max_new_tokens: int) -> list[int]:
    tok = model.tokenizer
    if answer is not None:
        return tok(answer, add_special_tokens=False)["input_ids"]
    new = model.generate(batch, max_new_tokens=max_new_tokens)[0].tolist()  # (n,)
    stops = {tok.eos_token_id, tok.pad_token_id}
    return new[:next((i for i, t in enumerate(new) if t in stops), len(new))]


@torch.no_grad()
def explain(model, image: Image.Image, messages: list[dict], *, detail: str = "high", answer: str | None = None,
            max_new_tokens: int = 16) -> Explanation:
    """`messages`: an OpenAI chat whose one image_url part stands for `image` (as eval's `build_messages`)."""
    xattn = isinstance(model.fusion, CrossAttentionFusion)
    if not xattn and model.lm.kind != "causal":
        raise ValueError(f"vlm.explain reads the gated cross-attention, or a decoder-only LLM's self-attention over "
                         f"a prefix; this model has {model.fusion.kind!r} fusion into a {model.lm.kind} LM")
    model.eval()
    proc = Processor(model.cfg, model.tokenizer)
    text, add_bos = generation_prompt(messages, model.tokenizer, proc.image_token)
    detail = proc.detail_for(detail)
    sample = proc.encode(text, [image], [detail], add_bos=add_bos)
    pad, device = model.tokenizer.pad_token_id, next(model.parameters()).device
    ids = _answer_ids(model, to_device(collate([sample], pad_token_id=pad, padding_side="left"), device), answer,
                      max_new_tokens)
    prompt_len, (plan,) = len(sample["input_ids"]), sample["plans"]
    sample = {**sample, "input_ids": torch.cat([sample["input_ids"], torch.tensor(ids, dtype=torch.long)])}  # (T,)
    sample.pop("labels", None)
    batch = to_device(collate([sample], pad_token_id=pad), device)
    predicting = torch.arange(prompt_len - 1, prompt_len - 1 + max(len(ids), 1))  # the rows that predict the answer

    token_weights, patch_attn = [], []  # per block (K,); per resampler call (V_call, L, P)

    def on_block(block, args):
        probs = block.attention_probs(*args)[0][:, predicting]  # (H, n, K)
        token_weights.append(probs.mean((0, 1)))  # (K,)

    def on_resampler(module, args):
        probs = module.attention_probs(*args).mean(1)  # (V_call, L, P[+L]) heads averaged
        media = args[1] if isinstance(module, QFormerAttention) else args[0]  # (V_call, P, D)
        probs = probs[..., :media.shape[1]]  # (V_call, L, P): the patches (a Perceiver also attends to latents)
        patch_attn.append(probs / probs.sum(-1, keepdim=True).clamp_min(1e-12))

    visual = (batch["input_ids"][0] == model.image_token_id).nonzero()[:, 0]  # (K,) a prefix's visual positions

    def on_self_attention(module, args, out):  # eager attention returns (output, probabilities (B, H, T, T))
        probs = out[1][0][:, predicting][..., visual]  # (H, n, K)
        token_weights.append(probs.mean((0, 1)))  # (K,)

    if xattn:
        hooks = [b.register_forward_pre_hook(on_block) for b in model.fusion.blocks
                 if isinstance(b, GatedCrossAttentionBlock)]
    else:
        hooks = [layer.self_attn.register_forward_hook(on_self_attention) for layer in model.lm.layers]
    hooks += [_last_attention(r).register_forward_pre_hook(on_resampler) for r in model.visual.resamplers()]
    hf, attention = model.lm.model, model.lm.model.config._attn_implementation
    try:
        if not xattn:
            hf.set_attn_implementation("eager")
        model(batch)
    finally:
        for h in hooks:
            h.remove()
        if not xattn:
            hf.set_attn_implementation(attention)
    weights = torch.stack(token_weights).mean(0).float().cpu()  # (K,)
    weights = weights / weights.sum().clamp_min(1e-12)  # (K,) over the visual tokens (a prefix: the text's share out)
    patch_attn = [a.float().cpu() for a in patch_attn]
    views = _views_in_call_order(batch, patch_attn)  # V x (L, P), global view first
    lens = [a.shape[0] for a in views]
    if sum(lens) != len(weights):
        raise ValueError(f"vlm.explain: the resamplers made {sum(lens)} tokens, the cross-attention saw {len(weights)}")
    per_view = weights.split(lens)  # V x (L,)
    view_mass = torch.stack([w.sum() for w in per_view])  # (V,)
    patch_heat = [w @ a for w, a in zip(per_view, views)]  # V x (P,)
    canvas, heat = _lay_out(image, plan, model.cfg.tiling, patch_heat)
    heat = heat / max(heat.sum(), 1e-12)
    tile_heat = _tile_heat(heat, plan, model.cfg.tiling.tile_size)
    answer_text = model.tokenizer.decode(ids, skip_special_tokens=True).strip() if answer is None else answer
    question = " ".join(p.get("text", "") for m in messages if m["role"] == "user"
                        for p in (m["content"] if isinstance(m["content"], list) else [{"text": m["content"]}]))
    return Explanation(question.strip(), answer_text, plan, canvas, heat, view_mass.numpy(), tile_heat)


def _views_in_call_order(batch: dict, calls: list[torch.Tensor]) -> list[torch.Tensor]:
    """The resampler calls' (V_call, L, P) -> one (L, P) per view in view order. `VisualTokens` resamples the global
    views first, then the tiles (one call each when the batch has them)."""
    is_tile = batch["view_positions"].is_tile.bool().cpu()  # (V,)
    order = [(~is_tile).nonzero()[:, 0], is_tile.nonzero()[:, 0]]
    order = [idx for idx in order if len(idx)]
    if len(order) != len(calls):
        raise AssertionError(f"expected {len(order)} resampler calls, saw {len(calls)}")
    out = [None] * len(is_tile)
    for idx, attn in zip(order, calls):
        for i, v in enumerate(idx.tolist()):
            out[v] = attn[i]
    return out


def _grid(p: int) -> tuple[int, int]:
    """P patches of a square view -> (class tokens first, grid side g)."""
    side = math.isqrt(p)
    return p - side * side, side


def _lay_out(image: Image.Image, plan: TilePlan, tiling, patch_heat: list[torch.Tensor]
             ) -> tuple[Image.Image, np.ndarray]:
    """Each view's patch heat (mass per patch) spread over the pixels it covers on the canvas."""
    s = tiling.tile_size
    w, h = plan.resized if plan.detail == "high" else (plan.width, plan.height)
    canvas = image.convert("RGB").resize((w, h), Image.BICUBIC) if (w, h) != image.size else image.convert("RGB")
    heat = torch.zeros(h, w)

    def density(p_heat: torch.Tensor) -> torch.Tensor:  # (P,) -> (S, S) mass per view pixel
        prefix, g = _grid(len(p_heat))
        cells = p_heat[prefix:].reshape(1, 1, g, g) / (s / g) ** 2  # (1, 1, g, g)
        return F.interpolate(cells, size=(s, s), mode="nearest")[0, 0]  # (S, S)

    # the global view: the whole canvas, stretched onto the view or fitted into its top-left corner
    d = density(patch_heat[0])  # (S, S)
    if tiling.global_resize == "pad":
        long = max(w, h)
        d = d[: max(1, h * s // long), : max(1, w * s // long)]  # the view's real pixels
    scale = d.numel() / (w * h)  # view pixels per canvas pixel
    heat += F.interpolate(d[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0] * scale
    cols, rows = plan.grid
    for i, p_heat in enumerate(patch_heat[1:]):  # tiles, row-major, one canvas pixel per view pixel
        r, c = divmod(i, cols)
        y, x = r * s, c * s
        heat[y:min(y + s, h), x:min(x + s, w)] += density(p_heat)[: min(s, h - y), : min(s, w - x)]
    return canvas, heat.clamp_min(0).numpy()


def _tile_heat(heat: np.ndarray, plan: TilePlan, s: int) -> np.ndarray:
    cols, rows = plan.grid
    cells = [heat[r * s:(r + 1) * s, c * s:(c + 1) * s].sum() for r in range(rows) for c in range(cols)]
    return np.array(cells, dtype=np.float64).reshape(rows, cols)  # (rows, cols)


def render(ex: Explanation, path: str | Path, tile_size: int) -> Path:
    """The PNG: the image, the heat map over it, the tile grid with each tile's share, question and answer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w, h = ex.canvas.size
    fig, ax = plt.subplots(figsize=(7, 7 * h / w + 0.6), dpi=110)
    ax.imshow(ex.canvas)
    ax.imshow(ex.heat / max(ex.heat.max(), 1e-12), cmap="jet", alpha=0.45, extent=(0, w, h, 0))
    rows, cols = ex.tile_heat.shape
    for c in range(1, cols):
        ax.axvline(c * tile_size, color="white", lw=1.5, ls="--")
    for r in range(1, rows):
        ax.axhline(r * tile_size, color="white", lw=1.5, ls="--")
    for r in range(rows):
        for c in range(cols):
            x, y = min((c + 0.5) * tile_size, w - 40), min((r + 0.5) * tile_size, h - 20)
            ax.text(x, y, f"{100 * ex.tile_heat[r, c]:.0f}%", color="white", fontsize=12, ha="center",
                    bbox=dict(facecolor="black", alpha=0.5, lw=0))
    ax.set_title(f"Q: {ex.question}\nA: {ex.answer}   (global view {100 * ex.view_mass[0]:.0f}% of the attention)",
                 fontsize=10)
    ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def question_messages(question: str, detail: str = "high", system: str | None = None) -> list[dict]:
    """One user turn: the image, then the question (what the server gets from a client)."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "image", "detail": detail}}, {"type": "text", "text": question}]}]


@dataclass
class ExplainConfig:
    checkpoint: str | None = None
    image: str | None = None
    question: str | None = None
    out: str = "attention.png"
    detail: str = "high"
    answer: str | None = None  # None: the model's own greedy answer
    max_new_tokens: int = 16


def main(argv: list[str] | None = None) -> Explanation:
    from omegaconf import OmegaConf

    from vlm.checkpoint import load_checkpoint

    argv = sys.argv[1:] if argv is None else argv
    if bad := [a for a in argv if "=" not in a]:
        raise SystemExit(f"arguments must be key=value, got {bad}")
    try:
        cfg = ExplainConfig(**OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(ExplainConfig),
                                                                      OmegaConf.from_dotlist(argv))))
    except Exception as e:  # unknown key or wrong type
        raise SystemExit(f"bad argument: {e}") from e
    missing = [k for k in ("checkpoint", "image", "question") if getattr(cfg, k) is None]
    if missing:
        raise SystemExit(f"vlm.explain needs {', '.join(f'{k}=...' for k in missing)}")
    model = load_checkpoint(cfg.checkpoint, inference=True)
    ex = explain(model, load_image(cfg.image), question_messages(cfg.question, cfg.detail), detail=cfg.detail,
                 answer=cfg.answer, max_new_tokens=cfg.max_new_tokens)
    print(f"{render(ex, cfg.out, model.cfg.tiling.tile_size)}: {ex.summary()}")
    return ex


if __name__ == "__main__":
    main()
