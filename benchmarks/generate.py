"""Cost of one xattn decode step with cached vs recomputed media keys/values.

With `fusion.cache_media_kv=True` (the default) every gated cross-attention block projects the K visual tokens
of each sample to keys/values once per request (at prefill) and reuses them at every decode step; with False
it re-runs `to_kv` on all K visual tokens in every block at every step, as HF Idefics / open_flamingo do.
Both runs use the same model instance (only `model.cfg.fusion.cache_media_kv` is flipped, which
`CrossAttentionFusion.prepare` reads when it builds the media of a request), greedy decoding and eos disabled, so
the tokens must be equal.

Per decode step = (t(generate N tokens) - t(generate 1 token)) / (N - 1), paired within each repeat.
generate(1) does image encoding + prefill and stops before any decode step; generate(N) does the same work
plus N - 1 decode steps, so the difference is decode only (prefill projects media K/V in both modes alike).
Read the table as: per-step ms is what one new token costs at batch B; the recompute/cached ratio grows with
K (visual tokens per sample) and with the number of xattn blocks (LM depth / every_n_layers) and widths.
On a busy machine pass --threads below the number of idle cores: an OpenMP pool that shares its cores with
another process makes every small decode-step op wait for a scheduler slice (ms), which swamps the signal.

    .venv/bin/python benchmarks/generate.py
    .venv/bin/python benchmarks/generate.py --override model.lm.hf_config.hidden_size=256 \
        --override model.lm.hf_config.intermediate_size=512 --override model.lm.hf_config.num_hidden_layers=4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image

from vlm.compose import model_config
from vlm.model import VLM
from vlm.processor import Processor, collate, to_device
from vlm.tiling import visual_tokens

PROMPTS = ["<image> and <image>: what differs?", "Compare <image> with <image> in one sentence, please.",
           "<image><image> describe", "Look at <image>, then at <image>. Which one shows a cup of coffee?"]


def photos(sizes: list[tuple[int, int]]) -> list[Image.Image]:
    from skimage import data

    return [Image.fromarray(img()).resize(size, Image.BICUBIC)
            for img, size in zip((data.astronaut, data.coffee), sizes)]


def build_batch(proc: Processor, batch_size: int, detail: str, sizes) -> tuple[dict, list[int]]:
    imgs = photos(sizes)
    samples = [proc.encode(PROMPTS[b % len(PROMPTS)], imgs[::-1] if b % 2 else imgs, details=[detail] * 2)
               for b in range(batch_size)]
    k = [sum(visual_tokens(p, proc.cfg) for p in s["plans"]) for s in samples]
    return collate(samples, pad_token_id=proc.tokenizer.pad_token_id, padding_side="left"), k


def timed(model: VLM, batch: dict, n: int, device: torch.device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(batch, max_new_tokens=n, eos_token_id=-1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--override", action="append", default=[], help="Hydra override (repeatable)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--detail", default="high", choices=["low", "high", "auto"])
    ap.add_argument("--gate", type=float, default=0.5, help="every attn/ff gate (0: images ignored)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (per-step time is a difference against a 1-token run)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device visible")
    device = torch.device(args.device)

    torch.manual_seed(0)
    cfg = model_config(*args.override)
    if cfg.fusion.kind != "xattn":
        raise SystemExit("this benchmark is about xattn fusion (model.fusion.kind=xattn)")
    model = VLM(cfg).eval().to(device)
    for block in model.fusion.blocks:
        block.attn_gate.data.fill_(args.gate)
        block.ff_gate.data.fill_(args.gate)
    sizes = [(2048, 1536), (1024, 1024)]
    batch, k = build_batch(Processor(cfg, model.tokenizer), args.batch, args.detail, sizes)
    batch = to_device(batch, device)

    modes = {"cached": True, "recompute": False}
    gen = {m: [] for m in modes}
    step = {m: [] for m in modes}
    tokens = {}
    for rep in range(args.repeats + 1):  # repeat 0 is the warmup
        for mode, cache in modes.items():  # interleaved, so drift hits both modes alike
            model.cfg.fusion.cache_media_kv = cache
            t_n, out = timed(model, batch, args.new_tokens, device)
            t_1, _ = timed(model, batch, 1, device)
            tokens[mode] = out
            if rep:
                gen[mode].append(t_n)
                step[mode].append((t_n - t_1) / (args.new_tokens - 1))
    model.cfg.fusion.cache_media_kv = True

    same = torch.equal(tokens["cached"], tokens["recompute"])
    print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"new tokens {args.new_tokens}, repeats {args.repeats}, overrides {args.override or 'none'}")
    print(f"LM width {model.lm.hidden_size}, LM layers {len(model.lm.layers)}, xattn blocks "
          f"{len(model.fusion.blocks)} (heads {cfg.fusion.heads} x dim_head {cfg.fusion.dim_head}), "
          f"media width {model.visual.out_dim}, visual tokens per sample K {k}")
    print(f"identical tokens (torch.equal): {same}")
    med = {m: (statistics.median(gen[m]), 1e3 * statistics.median(step[m])) for m in modes}
    print(f"\n{'mode':<10} {'generate s':>11} {'per-step ms':>12} {'(min-max)':>15} {'recompute/cached':>17}")
    for m in modes:
        spread = f"({1e3 * min(step[m]):.1f}-{1e3 * max(step[m]):.1f})"
        ratio = med[m][1] / med["cached"][1]
        print(f"{m:<10} {med[m][0]:>11.3f} {med[m][1]:>12.2f} {spread:>15} {ratio:>17.2f}")
    assert same, "cached and recomputed media K/V gave different tokens"


if __name__ == "__main__":
    main()
