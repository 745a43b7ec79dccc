"""Tables and plots from finished runs.

    python -m vlm.report multirun/<time> [--out DIR]          # report.md + report.png: one row / bar group per job
    python -m vlm.report --loss-curve outputs/<run> [--out DIR]   # loss.png: training loss against step

A multirun folder is what `python train.py -m ... eval_after=true` writes: one job folder per run, each with
`.hydra/overrides.yaml` (the run's label), `eval/metrics.json` (vlm.eval.runner) and `run.json` (train.py).
Overrides that every job shares (e.g. eval_after=true) are left out of the labels. A job without metrics or
run.json (not evaluated, failed) still gets its row, with "-" where numbers are missing.
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import OmegaConf


@dataclass
class Run:
    path: Path
    overrides: list[str]
    metrics: dict | None  # eval/metrics.json
    info: dict | None  # run.json
    label: str = ""


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _job_order(path: Path) -> tuple:
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def load_runs(multirun_dir: str | Path) -> list[Run]:
    """Every job folder of a Hydra multirun folder (those with .hydra/overrides.yaml), in job order, labelled by the
    overrides that set it apart from the others."""
    jobs = sorted((p.parent.parent for p in Path(multirun_dir).glob("*/.hydra/overrides.yaml")), key=_job_order)
    if not jobs:
        raise FileNotFoundError(f"no job folders (*/.hydra/overrides.yaml) under {multirun_dir}")
    runs = [Run(job, list(OmegaConf.load(job / ".hydra" / "overrides.yaml")),
                _read_json(job / "eval" / "metrics.json"), _read_json(job / "run.json")) for job in jobs]
    shared = set.intersection(*(set(r.overrides) for r in runs)) if len(runs) > 1 else set()
    for r in runs:
        r.label = " ".join(o for o in r.overrides if o not in shared) or "(defaults)"
    return runs


def question_types(runs: list[Run]) -> list[str]:
    return sorted({t for r in runs if r.metrics for t in r.metrics.get("question_type", {})})


def scores(run: Run, types: list[str]) -> list[float | None]:
    """The run's score per question type, then overall (None where it has none)."""
    if not run.metrics:
        return [None] * (len(types) + 1)
    per_type = run.metrics.get("question_type", {})
    return [per_type[t]["score"] if t in per_type else None for t in types] + [run.metrics["overall"]]


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def markdown_table(runs: list[Run]) -> str:
    """One row per run: its label, the score per question type and overall (%), and the training wall time."""
    types = question_types(runs)
    first = next((r.metrics for r in runs if r.metrics), {"metric": "score", "task": "-"})
    lines = [f"{first['metric']} (%) on {first['task']}, training wall time in minutes", "",
             "| run | " + " | ".join([*types, "overall", "train min"]) + " |",
             "|---" * (len(types) + 3) + "|"]
    for r in runs:
        minutes = r.info["train_seconds"] / 60 if r.info else None
        lines.append(f"| {r.label} | " + " | ".join(_cell(v) for v in [*scores(r, types), minutes]) + " |")
    return "\n".join(lines)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    return path


def bar_chart(runs: list[Run], path: str | Path) -> Path:
    """Grouped bars: one group per question type (and overall), one bar per run."""
    groups = [*question_types(runs), "overall"]
    width = 0.8 / len(runs)
    fig = Figure(figsize=(max(8.0, 4.0 + 0.4 * len(groups) * len(runs)), 4.5), layout="constrained")
    ax = fig.add_subplot()
    for i, r in enumerate(runs):
        values = [float("nan") if v is None else v for v in scores(r, groups[:-1])]  # missing: no bar
        ax.bar([g + (i - (len(runs) - 1) / 2) * width for g in range(len(groups))], values, width, label=r.label)
    ax.set_xticks(range(len(groups)), groups)
    first = next((r.metrics for r in runs if r.metrics), {"metric": "score"})
    ax.set_ylabel(f"{first['metric']} (%)")
    ax.set_ylim(0, 100)
    fig.legend(loc="outside right upper", fontsize="small")
    return _save(fig, Path(path))


def read_loss(run_dir: str | Path) -> tuple[list[int], list[float]]:
    """(step, loss) from the CSV logger's logs/version_*/metrics.csv, sorted by step; a later version (a resumed
    run) wins where steps repeat."""
    files = sorted(Path(run_dir).glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not files:
        raise FileNotFoundError(f"no logs/version_*/metrics.csv under {run_dir} (train with logger=csv)")
    loss = {}
    for f in files:
        with open(f, newline="") as fh:
            loss |= {int(row["step"]): float(row["loss"]) for row in csv.DictReader(fh) if row.get("loss")}
    steps = sorted(loss)
    return steps, [loss[s] for s in steps]


def smooth(values: list[float], weight: float = 0.6) -> list[float]:
    """Exponential moving average, debiased at the start (TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def loss_curve(run_dir: str | Path, path: str | Path) -> Path:
    steps, loss = read_loss(run_dir)
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(steps, loss, alpha=0.3, label="loss")
    ax.plot(steps, smooth(loss), label="smoothed (EMA 0.6)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(str(run_dir))
    ax.legend()
    return _save(fig, Path(path))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlm.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="a multirun folder (or a run folder with --loss-curve)")
    parser.add_argument("--loss-curve", action="store_true", help="plot dir's training loss into loss.png")
    parser.add_argument("--out", help="where to write (default: dir)")
    args = parser.parse_args(argv)
    out = Path(args.out or args.dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.loss_curve:
        print(f"wrote {loss_curve(args.dir, out / 'loss.png')}")
        return
    runs = load_runs(args.dir)
    table = markdown_table(runs)
    (out / "report.md").write_text(table + "\n")
    print(f"{table}\n\nwrote {out / 'report.md'} and {bar_chart(runs, out / 'report.png')}")


if __name__ == "__main__":
    main()
