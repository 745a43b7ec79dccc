"""A training step with the frozen encoder's features read from the disk cache (vlm/feature_cache.py) against the
same step encoding every view, measured in the same run (a script, not a test).

    .venv/bin/python benchmarks/feature_cache.py                    # the default (the real pair), CPU: ~3 minutes
    .venv/bin/python benchmarks/feature_cache.py --precision bf16-mixed
    .venv/bin/python benchmarks/feature_cache.py --steps 10 --device cuda
    .venv/bin/python benchmarks/feature_cache.py --model tiny --images 2   # the tiny model, real-size encoder

The model (`--model pair`, the default) is the embedded default, configs/model/pair.yaml: the packaged frozen
EfficientNet-Lite0 (stride 16: 32 x 32 x 112 per 512 px view) and SmolLM2-135M; `--model tiny` is the tiny model with
a real-size frozen encoder (efficientnet_lite0 built without weights: the timing is the same). The batch is the
default's: `data.batch_size` = 8 synthetic-corpus training images with configs/data/synthetic.yaml's corpus (2:1,
detail=high: 7 views each), their chats supervised. A step is forward + backward + AdamW step of what trains. The
cached model gets one untimed step that fills the cache, then every step hits; uncached and cached steps alternate,
so load from other processes hits both alike. The losses must be equal (a hit is bit-identical to encoding).
Medians; read the ratio.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time

import torch
from omegaconf import OmegaConf
from PIL import Image

from vlm.compose import CONFIG_DIR, model_config
from vlm.data.synthetic import CorpusParams, make_sample
from vlm.feature_cache import FeatureCacheConfig, open_cache
from vlm.model import VLM
from vlm.processor import Processor, collate, to_device
from vlm.prompts import chat_pieces

ENCODER = ["model.vision.name=efficientnet_lite0", "model.vision.image_size=512", "model.vision.feature_layer=3",
           "~model.vision.model_kwargs", "model.vision.pretrained=false"]


def corpus_batch(proc: Processor, images: int) -> dict:
    """`images` training samples of the default's synthetic corpus (configs/data/synthetic.yaml), collated."""
    params = CorpusParams(**OmegaConf.load(CONFIG_DIR / "data" / "synthetic.yaml")["corpus"])
    samples = []
    for i in range(images):
        _, record, jpeg = make_sample(params, "train", i)
        pieces, add_bos = chat_pieces(record["messages"], proc.tokenizer, proc.image_token)
        samples.append(proc.encode_pieces(pieces, [Image.open(io.BytesIO(jpeg)).convert("RGB")], ["high"],
                                          add_bos=add_bos))
    return collate(samples, pad_token_id=proc.tokenizer.pad_token_id)


def step(model: VLM, opt: torch.optim.Optimizer, batch: dict, precision: str = "32-true") -> tuple[float, float]:
    """One training step: (seconds, loss); `precision` as Lightning's (bf16-mixed: the forward under autocast)."""
    device = batch["input_ids"].device.type
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        loss = model(batch, logits=False).loss  # as training runs it
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - t, loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8, help="images per batch (the default's batch_size)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="pair", help="configs/model/<name>.yaml; pair: its own real encoder")
    ap.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"],
                    help="the trainer's precision (bf16-mixed: autocast, as Lightning runs it)")
    ap.add_argument("--override", action="append", default=[], help="more Hydra overrides of the model config")
    args = ap.parse_args()

    cfg = model_config(*(ENCODER if args.model == "tiny" else []), *args.override, model=args.model)
    models = []
    for _ in range(2):  # the same seed: the same weights; each its own optimizer state
        torch.manual_seed(0)
        model = VLM(cfg).to(args.device).train()
        models.append((model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)))
    plain, cached = models
    assert plain[0].feature_cache is None, "unset VLM_FEATURE_CACHE for the uncached baseline"
    proc = Processor(cfg, plain[0].tokenizer)
    batch = to_device(corpus_batch(proc, args.images), args.device)
    views = len(batch["pixel_values"])
    with tempfile.TemporaryDirectory() as root:
        cached[0].feature_cache = FeatureCacheConfig(root)
        step(*plain, batch, args.precision)  # warm-up (allocator, kernels)
        fill = step(*cached, batch, args.precision)[0]  # every view a miss: encoded and written
        times, losses = {"uncached": [], "cached": []}, {"uncached": [], "cached": []}
        for _ in range(args.steps):
            for name, (model, opt) in (("uncached", plain), ("cached", cached)):
                seconds, loss = step(model, opt, batch, args.precision)
                times[name].append(seconds)
                losses[name].append(loss)
        stats = open_cache(cached[0].feature_cache, cached[0].vision, batch["pixel_values"].device).stats
        on_disk = stats.bytes
    un, ca = statistics.median(times["uncached"]), statistics.median(times["cached"])
    print(f"\nmodel={args.model}, {args.images} synthetic-corpus images ({views} views of 512 px), "
          f"efficientnet_lite0 stride 16 "
          f"({cached[0].vision.tokens_per_view} x {cached[0].vision.dim} per view), {args.device}, "
          f"{torch.get_num_threads()} torch threads, {args.precision}, {args.steps} timed steps each\n")
    print("| step (fwd+bwd+opt) | median s | vs uncached |\n|---|---|---|")
    print(f"| uncached (encoder on every view) | {un:.3f} | 1.00x |")
    print(f"| cached, filling (all misses, written) | {fill:.3f} | {un / fill:.2f}x |")
    print(f"| cached (all hits) | {ca:.3f} | {un / ca:.2f}x |")
    print(f"\ncache: {stats.hits} hits, {stats.misses} misses, {stats.corrupt} corrupt, {on_disk / 2**20:.1f} MiB "
          f"({on_disk / max(stats.misses, 1) / 2**10:.0f} KiB per view); losses equal: "
          f"{losses['uncached'] == losses['cached']}")


if __name__ == "__main__":
    main()
