"""vlm.report on a multirun folder in the real formats: Hydra's overrides.yaml, the runner's metrics.json
(vlm.eval.runner.summarise), train.py's run.json and Lightning's CSVLogger metrics.csv; and on a real sweep (the
README's ablation command in miniature: train.py -m ... eval_after=true, then python -m vlm.report)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf
from PIL import Image

from vlm.eval.runner import summarise
from vlm.eval.tasks import load_task
from vlm.report import load_runs, main, markdown_table, read_loss, smooth

REPO = Path(__file__).resolve().parents[1]
TASK = load_task("synthetic", data_root="data/synthetic")


def _job(root: Path, num: int, overrides: list[str], scores: dict[str, list[float]] | None,
         train_seconds: float | None) -> Path:
    """One job folder as `train.py -m ... eval_after=true` leaves it; scores: question type -> per-question score."""
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(overrides, job / ".hydra" / "overrides.yaml")  # as Hydra writes it
    if scores is not None:
        rows = [{"score": s, "question_type": t, "answer_type": "other"} for t, v in scores.items() for s in v]
        (job / "eval").mkdir()
        (job / "eval" / "metrics.json").write_text(json.dumps({"checkpoint": str(job / "checkpoint.pt"),
                                                               **summarise(rows, TASK)}, indent=2))
    if train_seconds is not None:
        (job / "run.json").write_text(json.dumps({"steps": 300, "train_seconds": train_seconds,
                                                  "total_seconds": train_seconds + 20, "eval_after": True,
                                                  "overrides": overrides}))
    return job


@pytest.fixture
def multirun(tmp_path) -> Path:
    root = tmp_path / "multirun" / "2025-01-01_00-00-00"
    _job(root, 0, ["experiment=baseline", "eval_after=true"],
         {"text": [1.0, 0.0], "coarse": [1.0, 1.0], "count": [0.0, 0.0, 1.0, 1.0]}, 90.0)
    _job(root, 1, ["experiment=no_tiles", "eval_after=true"],
         {"text": [0.0, 0.0], "coarse": [1.0, 0.0], "count": [1.0, 1.0, 1.0, 1.0]}, 30.0)
    _job(root, 10, ["experiment=prefix", "eval_after=true"], None, None)  # a job that failed before evaluating
    (root / "multirun.yaml").write_text("hydra: {}\n")  # Hydra's own file beside the jobs: not a job
    return root


def _assert_png(path: Path) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100
        im.verify()


def test_table_rows_and_columns(multirun):
    runs = load_runs(multirun)
    assert [r.label for r in runs] == ["experiment=baseline", "experiment=no_tiles", "experiment=prefix"]  # 0, 1, 10
    lines = markdown_table(runs).splitlines()
    assert lines[0] == "vqa_accuracy (%) on synthetic, training wall time in minutes"
    assert lines[2] == "| run | coarse | count | text | overall | train min |"
    assert lines[4] == "| experiment=baseline | 100.0 | 50.0 | 50.0 | 62.5 | 1.5 |"
    assert lines[5] == "| experiment=no_tiles | 50.0 | 100.0 | 0.0 | 62.5 | 0.5 |"
    assert lines[6] == "| experiment=prefix | - | - | - | - | - |"


def test_single_run_keeps_its_whole_label(tmp_path):
    _job(tmp_path, 0, ["eval_after=true"], {"text": [1.0]}, 60.0)
    (run,) = load_runs(tmp_path)
    assert run.label == "eval_after=true"


def test_cli_writes_table_and_chart(multirun, tmp_path, capsys):
    out = tmp_path / "report"
    main([str(multirun), "--out", str(out)])
    table = (out / "report.md").read_text()
    assert "| experiment=no_tiles | 50.0 | 100.0 | 0.0 | 62.5 | 0.5 |" in table
    assert table.strip() in capsys.readouterr().out
    _assert_png(out / "report.png")


def test_empty_folder_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no job folders"):
        load_runs(tmp_path)


def _log_losses(run_dir: Path, losses: dict[int, float], version: int) -> None:
    logger = CSVLogger(save_dir=str(run_dir), name="logs", version=version)
    for step, loss in losses.items():
        logger.log_metrics({"loss": loss, "lr": 1e-3}, step=step)
        logger.log_metrics({"samples_per_s": 8.0}, step=step)  # rows without a loss, as training_step logs them
    logger.save()


def test_loss_curve_from_csv_logger(tmp_path):
    _log_losses(tmp_path, {9: 5.0, 19: 4.0, 29: 3.5}, version=0)
    _log_losses(tmp_path, {29: 3.0, 39: 2.5}, version=1)  # resumed: the later version wins at step 29
    assert read_loss(tmp_path) == ([9, 19, 29, 39], [5.0, 4.0, 3.0, 2.5])
    result = subprocess.run([sys.executable, "-m", "vlm.report", "--loss-curve", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    _assert_png(tmp_path / "loss.png")


def test_smooth():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # debiased: no ramp up from 0
    noisy = [1.0, 3.0] * 20
    smoothed = smooth(noisy)
    assert smoothed[0] == 1.0 and max(smoothed[10:]) - min(smoothed[10:]) < 0.5 * (max(noisy) - min(noisy))


@pytest.mark.slow
def test_sweep_with_eval_after_then_report(tmp_path):
    corpus = ["+data.corpus.n_train=8", "+data.corpus.n_val=0", "+data.corpus.n_test=4", "+data.corpus.shard_size=4"]
    sweep = subprocess.run(
        [sys.executable, "train.py", "-m", "model=tiny", "data=synthetic", "vision_pretrain=null",
         "experiment=baseline,no_tiles", "eval_after=true",
         "optim.lr=5e-3", "gate_lr_scale=1.0",
         f"data.root={tmp_path}/synthetic", f"hydra.sweep.dir={tmp_path}/multirun", *corpus, "trainer.max_steps=2",
         "data.batch_size=2", "data.num_workers=0", "evaluate.batch_size=4", "evaluate.max_new_tokens=2",
         "evaluate.num_workers=0"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    for job in ("0", "1"):
        run = json.loads((tmp_path / "multirun" / job / "run.json").read_text())
        assert run["steps"] == 2 and 0 < run["train_seconds"] < run["total_seconds"]
        metrics = json.loads((tmp_path / "multirun" / job / "eval" / "metrics.json").read_text())
        assert metrics["n"] == 4 and metrics["checkpoint"] == str(tmp_path / "multirun" / job / "checkpoint.pt")
    report = subprocess.run([sys.executable, "-m", "vlm.report", str(tmp_path / "multirun")], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr[-2000:]
    lines = (tmp_path / "multirun" / "report.md").read_text().splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ")]
    assert [r[0] for r in rows] == ["run", "experiment=baseline", "experiment=no_tiles"]
    assert all(c != "-" for r in rows[1:] for c in r)  # every number is there
    _assert_png(tmp_path / "multirun" / "report.png")
