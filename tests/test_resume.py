"""Exact resume, end to end: `python train.py` killed with SIGKILL after it wrote a training checkpoint, then run
again in its folder, ends with the trained weights of an uninterrupted run bit for bit, having trained on the same
batches: none skipped, none repeated. Three runs of train.py per case, ~30 s on 2 busy cores."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vlm.checkpoint import LAST, read_checkpoint
from vlm.training import stream_position

REPO = Path(__file__).resolve().parents[1]
CORPUS = dict(n_train=16, n_val=0, n_test=0, shard_size=4, detail="low")  # 4 shards, one view per sample: fast
EVERY, STEPS = 3, 9  # checkpoints at steps 3, 6 and 9; killed after the first; 18+ samples: 2 passes


def _mixture(corpus: Path) -> list[str]:
    """data=mixture over the corpus' 4 training shards: two sources of 2 shards, weights 0.7 / 0.3."""
    shards = lambda span: f'["{corpus}/train/train-00000{{{span}}}.tar"]'
    return ["data=mixture", "data.build_corpus=true",
            f"data.sources=[{{name: a, train: {shards('0..1')}, weight: 0.7}}, "
            f"{{name: b, train: {shards('2..3')}, weight: 0.3}}]"]


def _train(corpus: Path, run_dir: Path, workers: int, accumulate: int, mix: bool = False) -> subprocess.Popen:
    args = [sys.executable, "train.py", f"data.root={corpus}", f"hydra.run.dir={run_dir}", "experiment=tiny_random",
            "vision_pretrain=null", *(_mixture(corpus) if mix else []),
            *(f"+data.corpus.{k}={v}" for k, v in CORPUS.items()),
            f"trainer.max_steps={STEPS}", f"checkpoint.every_n_steps={EVERY}", "log_samples=true", "logger=none",
            f"data.num_workers={workers}", f"trainer.accumulate_grad_batches={accumulate}", "data.batch_size=2",
            "+trainer.enable_progress_bar=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same in every run; on busy shared cores 2 threads are slower
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> str:
    """Its console output, once it has trained all steps and saved checkpoint.pt."""
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert f"after {STEPS} steps" in out
    return out + err


def _samples(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("workers,accumulate,mix", [(0, 1, False), (2, 3, False), (2, 1, True)])
def test_killed_run_resumes_exactly(tmp_path, workers, accumulate, mix):
    """In the main process; and with 2 DataLoader worker processes (which prefetch beyond what the steps consumed)
    and 3 batches per optimizer step, checkpointed after an odd number of batches (9), so that the workers'
    round-robin must continue with the other worker; and with a weighted mixture of two sources (data=mixture)."""
    corpus, ref, run = tmp_path / "synthetic", tmp_path / "ref", tmp_path / "run"  # the 1st run builds the corpus
    train = lambda run_dir: _train(corpus, run_dir, workers, accumulate, mix)
    out = _finish(train(ref))  # uninterrupted
    assert "resuming" not in out and "MFU peak:" in out  # the measured peak is noted in the log

    proc = train(run)
    deadline = time.monotonic() + 300
    while not (run / LAST).exists():  # Lightning writes a file in /tmp and renames it: never seen partial here
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL and not (run / "checkpoint.pt").exists()
    at_kill = read_checkpoint(run / LAST)
    assert at_kill["global_step"] in (EVERY, 2 * EVERY)  # killed mid-run, after a checkpoint (almost always the 1st)
    done = stream_position(at_kill).batches  # the batches the checkpointed steps consumed
    assert done == at_kill["global_step"] * accumulate
    killed = _samples(run)  # may go beyond the checkpoint: those batches are trained again after the resume

    out = _finish(train(run))  # the same command in the same folder: resumes
    assert f"resuming {run / LAST} at step {at_kill['global_step']}" in out and "differs" not in out
    resumed = _samples(run)[len(killed):]
    reference = _samples(ref)
    consumed = killed[:done] + resumed
    assert [s["batch"] for s in consumed] == list(range(STEPS * accumulate)) == [s["batch"] for s in reference]
    assert [s["stream_index"] for s in consumed] == [s["stream_index"] for s in reference]
    assert [s["keys"] for s in consumed] == [s["keys"] for s in reference]
    if mix:  # each sample's source in samples.jsonl; both sources drawn; restored per-source counts
        assert [s["sources"] for s in consumed] == [s["sources"] for s in reference]
        drawn = [name for s in reference for name in s["sources"]]
        assert set(drawn) == {"a", "b"}
        assert stream_position(at_kill).sources == dict(collections.Counter(
            name for s in killed[:done] for name in s["sources"]))
    first_pass = [k for s in reference for k in s["keys"]][:16]
    assert mix or len(set(first_pass)) == 16  # the reference itself reads each sample once per pass (a mixture's
    # sources make their own passes)

    final, expected = read_checkpoint(run / "checkpoint.pt"), read_checkpoint(ref / "checkpoint.pt")
    assert final["steps"] == expected["steps"] == STEPS
    assert final["state_dict"].keys() == expected["state_dict"].keys()
    for name, weight in expected["state_dict"].items():
        assert torch.equal(final["state_dict"][name], weight), name
    resumed_from = {k.removeprefix("model."): v for k, v in at_kill["state_dict"].items()}
    assert any(not torch.equal(resumed_from[k], w) for k, w in expected["state_dict"].items())  # it trained on
    # the last checkpoints of both runs (step 9, written after the resume): the same stream position, optimizer
    # and scheduler state
    last, ref_last = read_checkpoint(run / LAST), read_checkpoint(ref / LAST)
    assert last["global_step"] == ref_last["global_step"] == STEPS // EVERY * EVERY
    assert last["stream_position"] == ref_last["stream_position"]
    assert last["lr_schedulers"] == ref_last["lr_schedulers"]
    for a, b in zip(last["optimizer_states"][0]["state"].values(), ref_last["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
