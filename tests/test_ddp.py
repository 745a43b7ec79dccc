"""Data parallel training: the loss is normalised by the label tokens of the whole optimizer step, and train.py on
2 CPU processes (Lightning DDP, gloo) ends with the parameters of one process with the same global batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlm.compose import model_config
from vlm.model import VLM
from vlm.processor import Processor, collate
from vlm.training import StepTokens

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
# 16 low-detail samples (one 512 px view each: fast steps); sample split: the ranks deal out one process's batches
CORPUS = ["+data.corpus.n_train=16", "+data.corpus.n_val=0", "+data.corpus.n_test=0", "+data.corpus.shard_size=4",
          "+data.corpus.detail=low", "data.split=sample", "data.num_workers=0"]
# float32 reduction order (padding to a different length, DDP's bucketed all-reduce) leaves ~2e-7 between the runs
# after 3 AdamW steps; normalising by each rank's own token mean instead leaves ~3e-3.
ATOL = 1e-5


def test_token_normalised_parts_add_up_to_the_batch_mean():
    """What each rank computes, its summed token losses / the label tokens of all ranks, adds up over the ranks to
    the token mean of the whole batch, in value and gradient; the mean of the ranks' own means does not."""
    cfg = model_config("model/fusion=prefix")  # visual tokens in the LM input: the resampler gets gradients
    model = VLM(cfg)
    proc = Processor(cfg, model.tokenizer)
    answers = ["yes", "a much longer answer than the others", "no", "red"]
    samples = [proc.encode_pieces([("<image>What is it?", False), (answer, True)],
                                  [Image.new("RGB", (96, 64), (60 * i, 0, 0))], ["high"])  # 1 tile: all used
               for i, answer in enumerate(answers)]
    batch = lambda part: collate(part, pad_token_id=proc.tokenizer.pad_token_id)
    whole, ranks = batch(samples), [batch(samples[:2]), batch(samples[2:])]
    counts = [model.num_label_tokens(r) for r in ranks]
    assert counts[0] != counts[1] and sum(counts) == model.num_label_tokens(whole)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = lambda loss: torch.autograd.grad(loss, params)
    mean = model(whole).loss
    parts = [model(r, num_tokens=sum(counts)).loss for r in ranks]
    torch.testing.assert_close(sum(parts), mean)
    for ours, ref in zip(grads(sum(parts)), grads(mean), strict=True):
        torch.testing.assert_close(ours, ref)
    assert (sum(model(r).loss for r in ranks) / 2 - mean).abs() > 1e-3


def test_step_tokens_counts_each_optimizer_step_ahead():
    batches = [{"labels": torch.tensor([[-100] + [1] * n])} for n in (1, 2, 3, 4, 5)]
    out = list(StepTokens(batches, 2, lambda b: (b["labels"] != -100).sum()))
    assert [b["labels"].tolist() for b in out] == [b["labels"].tolist() for b in batches]
    assert [int(b["step_tokens"]) for b in out] == [3, 3, 7, 7, 5]  # the last, shorter step counts its own


def _train(tmp: Path, name: str, *overrides: str) -> tuple[dict, Path]:
    """Run train.py; returns its checkpoint and its run folder."""
    run = subprocess.run([sys.executable, "train.py", f"data.root={tmp}/synthetic", f"run_root={tmp}/{name}", *CORPUS,
                          f"trainer.max_steps={STEPS}", "logger=none", "experiment=tiny_random", "vision_pretrain=null",
                          *overrides],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (run_dir,) = (tmp / name).iterdir()  # every rank in one run folder
    return torch.load(run_dir / "checkpoint.pt", weights_only=False), run_dir


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("ddp")
    return tmp, _train(tmp, "one", "data.batch_size=4")[0]


@pytest.mark.parametrize(("batch_size", "accumulate"), [(2, 1), (1, 2)])
def test_ddp_on_cpu_matches_one_process(one_process, batch_size, accumulate):
    """2 ranks x batch_size x accumulate = the one process's batch of 4, at every one of the steps."""
    tmp, one = one_process
    ddp, run_dir = _train(tmp, f"ddp_{batch_size}x{accumulate}", "trainer=ddp_cpu", f"data.batch_size={batch_size}",
                          f"trainer.accumulate_grad_batches={accumulate}")
    assert (run_dir / "train_ddp_process_1.log").exists()  # rank 1 ran train.py again, into rank 0's folder
    assert ddp["steps"] == one["steps"] == STEPS
    # the weights both runs started from: train.py seeds torch with `seed` (0) right before building the model
    torch.manual_seed(0)
    init = VLM(model_config()).checkpoint_state_dict()
    assert init.keys() == one["state_dict"].keys() == ddp["state_dict"].keys()
    frozen = [k for k in init if k.startswith(("vision.", "visual.global_resampler.", "visual.tile_resampler."))]
    assert frozen and all(torch.equal(one["state_dict"][k], init[k]) for k in frozen)  # that init, unchanged
    trained = [k for k in init if k.startswith(("lm.", "fusion."))]  # the LLM and the cross-attention (gates too)
    moved = lambda k: (one["state_dict"][k] - init[k]).abs().max() > 10 * ATOL
    assert len(trained) > 20 and all(moved(k) for k in trained)  # so agreeing below means training the same way
    for name, weight in one["state_dict"].items():
        torch.testing.assert_close(ddp["state_dict"][name], weight, rtol=0, atol=ATOL, msg=name)
