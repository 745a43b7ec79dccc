"""BLIP-2 stage 1 as a run: `python train.py experiment=blip2_stage1` (configs/experiment/blip2_stage1.yaml).

The Q-Former (the run's `model.global_resampler`, with a text branch initialised from the packaged MiniLM BERT) learns
ITC + ITM + ITG (`vlm.blip2`) against the frozen encoder's features of each image's global view, on image-caption
shards (`data.train`: the synthetic corpus's captions, or any converted caption set). Held-out pairs (`stage1.held_out`)
are scored by image-text retrieval (R@1, R@5 both ways) before training (the untrained Q-Former) and at the end.
It writes into the run folder:
- `checkpoint.pt`: the Q-Former as `visual.global_resampler.*` (what `init_from` loads into a stage-2 VLM; its text
  branch and the `stage1.*` heads are reported unused there), with `model_config` naming the encoder;
- `stage1/metrics.csv` (step, the three losses, lr), `stage1/retrieval.json`, `stage1/losses.png`.

A plain loop, as stage 0 (`vlm.vision_pretrain`): the frozen encoder runs once per image, before the first step,
and the Q-Former trains on the stored features; there is no Lightning strategy here (one process).

Shapes: N pairs, P patches, Dv encoder width, T caption tokens.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from vlm.blip2 import QFormerStage1, Stage1Config, retrieval_metrics
from vlm.checkpoint import FORMAT_VERSION
from vlm.config import VLMConfig
from vlm.data.format import image_refs
from vlm.data.pipeline import check_shards, list_shards, read_tar
from vlm.hf_weights import init_qformer_from_bert
from vlm.images import load_image
from vlm.lit import warmup_cosine
from vlm.pretrained import resolve
from vlm.prompts import content_text
from vlm.resampler import build_resampler
from vlm.tiling import tile_image
from vlm.vision import VisionEncoder

log = logging.getLogger(__name__)


@dataclass
class Stage1RunConfig:
    steps: int = 300
    batch_size: int = 32
    lr: float = 1.0e-4  # BLIP-2's peak
    weight_decay: float = 0.05
    warmup_steps: int = 30
    train_limit: int | None = None  # read at most this many training pairs (None: all of `data.train`)
    held_out: str | None = None  # shards (a folder / glob / list) of held-out pairs for retrieval
    held_out_limit: int = 500
    encode_batch: int = 32  # views per encoder call when the features are computed
    # lr of the weights the Q-Former took from BERT (self-attention, feed-forwards, text embeddings), as a fraction
    # of `lr`; the fresh ones (cross-attention, queries, heads) get `lr`. BLIP-2 trains all at 1e-4 after 2,000
    # warm-up steps; in a short run at the lr the fresh weights need, the BERT weights are wrecked and ITC collapses
    # to a constant similarity (measured: 64 pairs, batch 16, 80 steps at 3e-4 for all: loss ln 16 exactly; fresh
    # at 1e-3 and BERT at 5e-5: 1.45, BERT frozen: 0.80).
    pretrained_lr_scale: float = 1.0
    log_every: int = 10
    seed: int = 0
    heads: Stage1Config = field(default_factory=Stage1Config)


def read_pairs(spec, limit: int | None, tiling) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str]]:
    """Image-caption chats from shards -> each image's global view (3, S, S) uint8, its mask (S, S), and the caption
    (the chat's last assistant turn). A sample without an image or an answer is skipped and counted."""
    views, masks, captions, skipped = [], [], [], Counter()
    shards = list_shards(spec)
    check_shards(shards)
    for path in shards:
        for sample in read_tar(path, skipped):
            if limit is not None and len(captions) >= limit:
                break
            record = json.loads(sample["json"])
            refs = image_refs(record)
            answers = [m["content"] for m in record.get("messages", []) if m.get("role") == "assistant"]
            text = content_text(answers[-1], image_token="") if answers else None
            if len(refs) != 1 or not text:
                skipped["not one image and a caption"] += 1
                continue
            tiled = tile_image(load_image(sample[refs[0][0]]), "low", tiling)
            views.append(tiled.pixels[0])
            masks.append(tiled.mask[0])
            captions.append(text)
    if skipped:
        log.warning("stage 1: skipped %s reading %s", dict(skipped), spec)
    if not captions:
        raise ValueError(f"no image-caption pairs in {spec}")
    return views, masks, captions


@torch.no_grad()
def encode(vision: VisionEncoder, views: list[torch.Tensor], masks: list[torch.Tensor], batch: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Global views -> frozen features (N, P, Dv) and patch masks (N, P), `batch` views an encoder call."""
    feats, pmasks = [], []
    for i in range(0, len(views), batch):
        f, m = vision(torch.stack(views[i:i + batch]), torch.stack(masks[i:i + batch]))  # (n, P, Dv), (n, P)
        feats.append(f.float())
        pmasks.append(m)
    return torch.cat(feats), torch.cat(pmasks)


@torch.no_grad()
def score_retrieval(model: QFormerStage1, feats: torch.Tensor, pmask: torch.Tensor, ids: torch.Tensor,
                    tmask: torch.Tensor, batch: int = 64) -> dict[str, float]:
    """ITC retrieval over held-out pairs (pair i: image i, caption i): R@1 / R@5, image->text and text->image."""
    was = model.training
    model.eval()
    img = torch.cat([model.image_features(feats[i:i + batch], pmask[i:i + batch]) for i in range(0, len(feats), batch)])
    txt = torch.cat([model.text_features(ids[i:i + batch], tmask[i:i + batch]) for i in range(0, len(ids), batch)])
    model.train(was)
    return {"pairs": len(ids), **retrieval_metrics(model.similarity(img, txt))}


def build_stage1(model_cfg: VLMConfig, media_dim: int, heads: Stage1Config) -> tuple[QFormerStage1, set[str]]:
    """The run's global resampler as a stage-1 Q-Former (from its `bert_init`, a BERT, if set) with the heads, and
    the names of the parameters BERT initialised (empty without `bert_init`)."""
    rcfg = model_cfg.global_resampler
    if rcfg.kind != "qformer" or rcfg.text is None:
        raise ValueError("BLIP-2 stage 1 trains a Q-Former with a text branch: model.global_resampler needs "
                         "kind=qformer and `text` (model/resampler=minilm_qformer)")
    qformer = build_resampler(replace(rcfg, bert_init=None), media_dim)
    from_bert: set[str] = set()
    if rcfg.bert_init is not None:
        with torch.random.fork_rng(devices=[]):  # as build_resampler: loading BERT leaves the RNG where it was
            fresh = init_qformer_from_bert(qformer, resolve(rcfg.bert_init))["fresh"]
        from_bert = {f"qformer.{n}" for n, _ in qformer.named_parameters() if n not in fresh}
    return QFormerStage1(qformer, heads), from_bert


def train_stage1(model_cfg: VLMConfig, run: Stage1RunConfig, train_spec, run_dir: Path, *,
                 run_config: dict | None = None) -> dict:
    """The whole stage: read, encode, score the untrained Q-Former, train, score again, save. Returns the summary."""
    from transformers import AutoTokenizer

    start = time.perf_counter()
    torch.manual_seed(run.seed)
    out_dir = run_dir / "stage1"
    out_dir.mkdir(parents=True, exist_ok=True)
    vision = VisionEncoder(model_cfg.vision).eval().requires_grad_(False)
    model, from_bert = build_stage1(model_cfg, vision.dim, run.heads)
    text_cfg = model_cfg.global_resampler.text
    source = text_cfg.tokenizer or model_cfg.global_resampler.bert_init
    if source is None:
        raise ValueError("stage 1 needs a tokenizer for the text branch: the resampler's text.tokenizer or bert_init")
    tokenizer = AutoTokenizer.from_pretrained(resolve(source))

    def tokens(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        t = tokenizer(captions, padding="longest", truncation=True, max_length=text_cfg.max_length,
                      return_tensors="pt")
        return t["input_ids"], t["attention_mask"].bool()  # (N, T), (N, T)

    views, masks, captions = read_pairs(train_spec, run.train_limit, model_cfg.tiling)
    feats, pmask = encode(vision, views, masks, run.encode_batch)  # (N, P, Dv), (N, P)
    ids, tmask = tokens(captions)
    held = None
    if run.held_out:
        hv, hm, hc = read_pairs(run.held_out, run.held_out_limit, model_cfg.tiling)
        held = (*encode(vision, hv, hm, run.encode_batch), *tokens(hc))
    print(f"stage 1: {len(captions)} training pairs, {0 if held is None else len(held[0])} held out; features "
          f"{tuple(feats.shape)} in {time.perf_counter() - start:.0f} s")
    retrieval = {"untrained": score_retrieval(model, *held)} if held else {}

    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}  # (from BERT, decayed) -> parameters
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((name in from_bert, p.ndim >= 2), []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "weight_decay": run.weight_decay if decayed else 0.0,
                              "lr_scale": run.pretrained_lr_scale if bert else 1.0}
                             for (bert, decayed), ps in groups.items()], lr=run.lr)

    def lr_at(step: int) -> float:  # the runs' schedule (configs/schedule/warmup_cosine.yaml), down to 0
        return run.lr * warmup_cosine(step, warmup=run.warmup_steps, total=run.steps, min_ratio=0.0)

    gen = torch.Generator().manual_seed(run.seed)
    rows = []
    model.train()
    fit_start = time.perf_counter()
    for step in range(run.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step) * group["lr_scale"]
        idx = torch.randperm(len(ids), generator=gen)[:run.batch_size]  # (B,)
        width = int(tmask[idx].sum(1).max())  # the batch's longest caption
        out = model(feats[idx], pmask[idx], ids[idx, :width], tmask[idx, :width], generator=gen)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        row = {"step": step + 1, **{k: round(v.item(), 5) for k, v in out.items()}, "lr": lr_at(step)}
        rows.append(row)
        if (step + 1) % run.log_every == 0 or step == 0:
            print(f"stage 1 step {step + 1}/{run.steps}: loss {row['loss']:.3f} (itc {row['itc']:.3f}, itm "
                  f"{row['itm']:.3f}, itg {row['itg']:.3f})")
    train_seconds = time.perf_counter() - fit_start
    if held:
        retrieval["trained"] = score_retrieval(model, *held)

    with open(out_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "retrieval.json").write_text(json.dumps(retrieval, indent=1))
    plot_losses(rows, out_dir / "losses.png", run.batch_size)
    state = {f"visual.global_resampler.{k}": v for k, v in model.qformer.state_dict().items()}
    state |= {f"stage1.{k}": v for k, v in model.state_dict().items() if not k.startswith("qformer.")}
    cfg_dict = model_cfg.to_dict()
    torch.save({"format_version": FORMAT_VERSION, "stage": "blip2_stage1",
                "model_config": {"vision": cfg_dict["vision"], "global_resampler": cfg_dict["global_resampler"]},
                "state_dict": state, "steps": run.steps, "retrieval": retrieval, "config": run_config},
               run_dir / "checkpoint.pt")
    summary = {"steps": run.steps, "pairs": len(ids), "train_seconds": round(train_seconds, 1),
               "total_seconds": round(time.perf_counter() - start, 1),
               "bert_init": model_cfg.global_resampler.bert_init,
               "first": rows[0], "last": rows[-1], "retrieval": retrieval, "stage1": asdict(run)}
    (run_dir / "run.json").write_text(json.dumps(summary, indent=1))
    for name, r in retrieval.items():
        print(f"stage 1 retrieval ({name}, {r['pairs']} held-out pairs): image->text R@1 {r['i2t_r1']:.1f} "
              f"R@5 {r['i2t_r5']:.1f}; text->image R@1 {r['t2i_r1']:.1f} R@5 {r['t2i_r5']:.1f} "
              f"(chance R@1 {r['chance_r1']:.1f})")
    print(f"saved {run_dir / 'checkpoint.pt'} after {run.steps} steps")
    return summary


def plot_losses(rows: list[dict], path: Path, batch_size: int, smooth: int = 10) -> None:
    """The three losses per step (thin) and their running mean over `smooth` steps, one panel each; dashed: what
    ITC and ITM score at chance (ln B; the entropy of 1 positive in 3 pairs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    steps = [r["step"] for r in rows]
    chance = {"itc": math.log(batch_size), "itm": -(math.log(1 / 3) / 3 + 2 * math.log(2 / 3) / 3)}
    for ax, name in zip(axes, ("itc", "itm", "itg")):
        values = [r[name] for r in rows]
        mean = [sum(values[max(0, i - smooth + 1):i + 1]) / len(values[max(0, i - smooth + 1):i + 1])
                for i in range(len(values))]
        ax.plot(steps, values, lw=0.6, alpha=0.4)
        ax.plot(steps, mean, lw=1.6)
        if name in chance:
            ax.axhline(chance[name], ls="--", lw=1, color="grey", label="chance")
            ax.legend(loc="upper right")
        ax.set_title(f"{name.upper()} loss")
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
