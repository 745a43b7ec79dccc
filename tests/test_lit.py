"""VLMLitModule in a real Lightning fit, built from the composed train config as train.py builds it: the metrics of
each optimizer step under gradient accumulation (rates over all its micro-batches, MFU, the LR schedule counted in
optimizer steps), the training switches together, and training checkpoints that load without Lightning."""

from __future__ import annotations

import csv
import functools
import itertools
import subprocess
import sys
from collections import Counter

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger

from vlm.checkpoint import read_checkpoint
from vlm.compose import CONFIG_DIR, model_config
from vlm.data.pipeline import ShardStream, collate_stream
from vlm.data.synthetic import ensure_corpus
from vlm.lit import VLMLitModule, warmup_cosine
from vlm.processor import Processor
from vlm.throughput import RATES, batch_counts, step_flops
from vlm.training import StepTokens, stream_position

ACCUMULATE, STEPS, BATCH = 2, 3, 2
SWITCHES = ["trainer.precision=bf16-mixed", "model.freeze.vision=false", "model.vision.gradient_checkpointing=true",
            "model.lm.gradient_checkpointing=true"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's matmuls are too small for 2 threads to pay off; on busy shared cores 2 threads wait on each
    other (a fit takes 3-30 s instead of 1 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")  # 1024 x 512 images: 2 tiles + the global view each
    ensure_corpus(root, n_train=8, n_val=0, n_test=0, shard_size=4, width_range=(1024, 1024), aspect_range=(2.0, 2.0))
    return root / "train"


@pytest.fixture(scope="module", params=[[], SWITCHES], ids=["fp32", "bf16_checkpointing_vision_trained"])
def fit(request, corpus, tmp_path_factory):
    """A 3-step fit, 2 batches per optimizer step: (config, module, trainer, the loader's batches again)."""
    return _fit(corpus, tmp_path_factory.mktemp("fit"), *request.param)


def _fit(corpus, tmp_path, *overrides: str):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=tiny_random", f"trainer.max_steps={STEPS}",
                                          f"trainer.accumulate_grad_batches={ACCUMULATE}", *overrides])
    torch.manual_seed(0)
    module = VLMLitModule(instantiate(cfg.model), optimizer=instantiate(cfg.optim), schedule=instantiate(cfg.schedule),
                          max_steps=STEPS, mfu_peak_tflops=cfg.mfu_peak_tflops, run_config={"seed": cfg.seed})
    trainer = instantiate(cfg.trainer, logger=CSVLogger(tmp_path), log_every_n_steps=1, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False)
    proc = Processor(module.cfg, module.model.tokenizer)
    batches = lambda: StepTokens(torch.utils.data.DataLoader(
        ShardStream(corpus, proc, seed=cfg.seed), batch_size=BATCH,
        collate_fn=functools.partial(collate_stream, pad_token_id=proc.tokenizer.pad_token_id)),
        ACCUMULATE, module.model.num_label_tokens)
    trainer.fit(module, batches())
    return cfg, module, trainer, batches


def test_metrics_per_optimizer_step(fit):
    """Each step's logged rates times its logged duration give exactly what its 2 micro-batches held (counted
    again from the same stream), MFU is the analytic FLOPs over that time and the measured peak, the learning rate
    follows warmup-cosine in optimizer steps, and the gates are logged."""
    cfg, module, trainer, batches = fit
    assert cfg.mfu_peak_tflops is None and module.peak_flops > 0  # measured at the start
    assert trainer.global_step == STEPS and trainer.lr_scheduler_configs[0].scheduler.last_epoch == STEPS
    assert module.stream_position.batches == STEPS * ACCUMULATE

    consumed = list(itertools.islice(batches(), STEPS * ACCUMULATE))
    expected = [sum((batch_counts(b, module.model) for b in consumed[s * ACCUMULATE:(s + 1) * ACCUMULATE]), Counter())
                for s in range(STEPS)]
    assert all(c["samples"] == BATCH * ACCUMULATE and c["tiles"] > 0 for c in expected)
    with open(trainer.logger.experiment.metrics_file_path) as f:
        rows = {int(r["step"]): r for r in csv.DictReader(f) if r["lr"]}  # the rows of on_before_optimizer_step
    assert sorted(rows) == list(range(STEPS))
    for step, row in rows.items():
        assert float(row["lr"]) == pytest.approx(cfg.optim.lr * warmup_cosine(step, warmup=cfg.schedule.warmup,
                                                                              total=STEPS))
        assert row["gate/attn_0"] and row["gate/ff_1"]
        if step == 0:  # nothing to time the first step from
            assert row["samples_per_s"] == row["mfu"] == ""
            continue
        dt = float(row["step_time_s"])
        for name in RATES:
            assert float(row[f"{name}_per_s"]) * dt == pytest.approx(expected[step][name], rel=1e-5), name
        flops = step_flops(module.model, expected[step])
        assert float(row["mfu"]) == pytest.approx(flops / dt / module.peak_flops, rel=1e-5)


@pytest.mark.parametrize("overrides", [[], ["model.freeze.llm=true", "model.freeze.resamplers=false"],
                                       ["model.freeze.vision=false"]],
                         ids=["default", "frozen_pair", "all_trained"])
def test_step_flops_near_counted_flops(corpus, overrides):
    """The analytic estimate is within a third of the FLOPs torch counts in a training step's matmuls with weights
    (it leaves out the attention scores, which would dominate in a model this small, and the resamplers' keys/values
    over the patches): the tiny default (frozen encoder and stage-0 resamplers, trained LLM), the design's frozen pair
    (only the LLM and the encoder frozen), and everything trained."""
    from torch.utils.flop_counter import FlopCounterMode

    from vlm.model import VLM

    torch.manual_seed(0)
    model = VLM(model_config(*overrides))
    model.train()
    proc = Processor(model.cfg, model.tokenizer)
    batch = next(iter(torch.utils.data.DataLoader(
        ShardStream(corpus, proc), batch_size=BATCH,
        collate_fn=functools.partial(collate_stream, pad_token_id=proc.tokenizer.pad_token_id))))
    model.vision.flops_per_view()  # counted once, outside the step below
    with FlopCounterMode(display=False) as counter:
        model(batch).loss.backward()
    ops = counter.get_flop_counts()["Global"]  # {op: FLOPs}; attention runs as scaled_dot_product ops
    counted = sum(n for op, n in ops.items() if str(op) in ("aten.mm", "aten.addmm", "aten.convolution",
                                                             "aten.convolution_backward"))
    ratio = step_flops(model, batch_counts(batch, model)) / counted
    assert 0.75 < ratio < 1.33, (overrides, ratio)


def test_training_checkpoint_loads_without_lightning(fit, tmp_path):
    """A training checkpoint holds the trained weights, the stream position, the model and run configs; the
    serving / eval loader reads it in a process where Lightning cannot even be imported."""
    _, module, trainer, _ = fit
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    blob = read_checkpoint(path)
    assert blob["config"] == {"seed": 0} and blob["model_config"] == module.cfg.to_dict()
    assert stream_position(blob).state_dict() == module.stream_position.state_dict()
    assert blob["optimizer_states"] and blob["lr_schedulers"][0]["last_epoch"] == STEPS
    torch.save(module.model.checkpoint_state_dict(), tmp_path / "expected.pt")
    script = f"""
import sys
import torch
sys.modules["lightning"] = sys.modules["pytorch_lightning"] = None  # any import of Lightning fails
from vlm.checkpoint import load_checkpoint
model = load_checkpoint({str(path)!r})
expected = torch.load({str(tmp_path / "expected.pt")!r})
assert model.checkpoint_state_dict().keys() == expected.keys()
assert all(torch.equal(v, expected[k]) for k, v in model.checkpoint_state_dict().items())
print("loaded", len(expected))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == f"loaded {len(module.model.checkpoint_state_dict())}"


def test_checkpoints_hold_trained_and_unsourced_weights():
    """`state_dict` stays whole (FSDP's hooks and wrappers need that); checkpoints keep the trained weights and the
    frozen parts built without weights (a pretrained frozen encoder is left to its source)."""
    module = VLMLitModule(model_config())
    full = module.state_dict()
    checkpoint = {"state_dict": full}
    module.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == {f"model.{k}" for k in module.model.checkpoint_state_dict()}
    assert any(k.startswith("model.vision.") for k in checkpoint["state_dict"])  # random tiny encoder: kept
    module.model.cfg.vision.pretrained = True  # as if the encoder came from real weights
    checkpoint = {"state_dict": full}
    module.on_save_checkpoint(checkpoint)
    assert any(k.startswith("model.vision.") for k in full)
    assert not any(k.startswith("model.vision.") for k in checkpoint["state_dict"])
    assert any(k.startswith("model.visual.global_resampler.") for k in checkpoint["state_dict"])
