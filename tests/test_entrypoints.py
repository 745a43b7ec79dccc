"""train.py and eval.py end to end on a tiny corpus: the README's main command in miniature."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_train_then_eval(tmp_path):
    corpus = ["+data.corpus.n_train=16", "+data.corpus.n_val=0", "+data.corpus.n_test=6", "+data.corpus.shard_size=4"]
    common = [f"data.root={tmp_path}/synthetic", f"run_root={tmp_path}/outputs", *corpus]
    train = subprocess.run([sys.executable, "train.py", *common, "experiment=tiny_random", "trainer.max_steps=2",
                            "vision_pretrain=null",
                            "data.batch_size=2", "data.num_workers=0"], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "after 2 steps" in train.stdout
    (ckpt,) = (tmp_path / "outputs").glob("*/checkpoint.pt")
    ev = subprocess.run([sys.executable, "eval.py", *common, "batch_size=3", "max_new_tokens=3"], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "| overall | 6 |" in ev.stdout
    (metrics,) = (tmp_path / "outputs" / "eval").glob("synthetic/*/metrics.json")
    m = json.loads(metrics.read_text())
    assert m["checkpoint"] == str(ckpt) and 0 <= m["overall"] <= 100
    assert len((metrics.parent / "predictions.jsonl").read_text().splitlines()) == 6


def test_data_convert_converts_the_packaged_datasets_once(tmp_path, capsys):
    """`data.convert` (train.py): the named datasets become shards before training, as data/convert.py writes them;
    a second call finds the conversion done and writes nothing."""
    from omegaconf import OmegaConf

    from vlm.cli import ensure_converted
    from vlm.data.pipeline import list_shards

    out = tmp_path / "easy"
    data = OmegaConf.create({"convert": {"easy_vqa": {"out": str(out), "split": "test", "limit": 5, "shard_size": 2}}})
    ensure_converted(data)
    shards = list_shards(out)
    assert [Path(s).name for s in shards] == [f"easy_vqa-00000{i}.tar" for i in range(3)]
    stamps = [Path(s).stat().st_mtime_ns for s in shards]
    ensure_converted(data)
    assert [Path(s).stat().st_mtime_ns for s in list_shards(out)] == stamps
    assert "wrote 5 samples in 3 shards" in capsys.readouterr().out
    ensure_converted(OmegaConf.create({}))  # no convert key: nothing to do


def _vqav2_official(root: Path, subtype: str = "val2014") -> None:
    """A VQAv2 split in its official layout (visualqa.org): questions JSON, annotations JSON (10 answers per question),
    images as COCO_<subtype>_<image id, 12 digits>.jpg; real photos from scikit-image."""
    from PIL import Image
    from skimage import data

    (root / subtype).mkdir(parents=True)
    photos = {1: data.chelsea(), 2: data.coffee(), 3: data.astronaut()}
    for image_id, pixels in photos.items():
        Image.fromarray(pixels).save(root / subtype / f"COCO_{subtype}_{image_id:012d}.jpg", quality=90)
    asked = [(1, "What animal is this?", "cat", "other"), (2, "What is in the cup?", "coffee", "other"),
             (3, "Is this a person?", "yes", "yes/no"), (1, "Is it a dog?", "no", "yes/no")]
    questions = [{"image_id": i, "question": q, "question_id": 10 * i + k} for k, (i, q, _, _) in enumerate(asked)]
    annotations = [{"question_id": 10 * i + k, "image_id": i, "question_type": "what", "answer_type": kind,
                    "multiple_choice_answer": a,
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j in range(10)]}
                   for k, (i, _, a, kind) in enumerate(asked)]
    (root / f"v2_OpenEnded_mscoco_{subtype}_questions.json").write_text(json.dumps(
        {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": subtype,
         "questions": questions}))
    (root / f"v2_mscoco_{subtype}_annotations.json").write_text(json.dumps(
        {"info": {}, "license": {}, "data_subtype": subtype, "annotations": annotations}))


def test_official_files_to_shards_to_training_to_official_eval(tmp_path):
    """A real-data run end to end: official VQAv2 files -> data/convert.py -> shards -> train.py data=shards ->
    checkpoint -> eval.py task=vqav2 on the official files -> metrics.json (and the official submission file)."""
    vqa = tmp_path / "vqav2"
    _vqav2_official(vqa)
    shards = tmp_path / "shards"
    convert = subprocess.run([sys.executable, "data/convert.py", "vqav2", "--no-progress", "--shard-size", "2",
                              "--questions", str(vqa / "v2_OpenEnded_mscoco_val2014_questions.json"),
                              "--annotations", str(vqa / "v2_mscoco_val2014_annotations.json"),
                              "--images", str(vqa / "val2014"), "--out", str(shards)],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert convert.returncode == 0, convert.stderr[-3000:]
    run = tmp_path / "run"
    train = subprocess.run([sys.executable, "train.py", "data=shards",
                            f'data.train=["{shards}/vqav2-{{000000..000001}}.tar"]',  # quoted: Hydra's grammar
                            "experiment=tiny_random", "vision_pretrain=null", "trainer.max_steps=2",
                            f"data.root={tmp_path}/no_corpus", "data.batch_size=2", "data.num_workers=0",
                            "logger=none", f"hydra.run.dir={run}"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "after 2 steps" in train.stdout
    assert not (tmp_path / "no_corpus").exists()  # data=shards builds no synthetic corpus
    stage2 = subprocess.run([sys.executable, "train.py", "data=shards", f'data.train=["{shards}"]',  # a folder
                             "experiment=tiny_random", "vision_pretrain=null", "trainer.max_steps=1",
                             f"init_from={run}/checkpoint.pt", "data.batch_size=2", "data.num_workers=0",
                             "logger=none", f"hydra.run.dir={tmp_path}/stage2"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert stage2.returncode == 0, stage2.stderr[-3000:]
    summary = json.loads((tmp_path / "stage2" / "run.json").read_text())["init_from"]
    assert summary["checkpoint"] == f"{run}/checkpoint.pt" and summary["loaded"] > 0 and not summary["fresh"]
    ev = subprocess.run([sys.executable, "eval.py", "task=vqav2", f"checkpoint={run}/checkpoint.pt", f"data_root={vqa}",
                         "batch_size=2", "max_new_tokens=2", f"hydra.run.dir={tmp_path}/eval"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["n"] == 4 and m["checkpoint"] == f"{run}/checkpoint.pt" and 0 <= m["overall"] <= 100
    submission = json.loads((tmp_path / "eval" / "submission.json").read_text())
    assert sorted(r["question_id"] for r in submission) == [10, 13, 21, 32]


def test_validation_loss_is_logged_and_the_best_checkpoint_kept(tmp_path):
    """data.val: the validation loss every trainer.val_check_interval batches in the CSV log, and
    checkpoints/best.ckpt holding the lowest of them beside last.ckpt."""
    import csv

    import torch

    corpus = ["+data.corpus.n_train=8", "+data.corpus.n_val=4", "+data.corpus.n_test=0", "+data.corpus.shard_size=4"]
    run = tmp_path / "run"
    train = subprocess.run([sys.executable, "train.py", f"data.root={tmp_path}/synthetic", *corpus,
                            "experiment=tiny_random", "vision_pretrain=null", "trainer.max_steps=6",
                            f"data.val={tmp_path}/synthetic/val", "trainer.val_check_interval=2",
                            "trainer.log_every_n_steps=1", "checkpoint.every_n_steps=3", "data.batch_size=2",
                            "data.num_workers=0", f"hydra.run.dir={run}"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    (log,) = run.glob("logs/*/metrics.csv")
    rows = list(csv.DictReader(log.open()))
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
    assert len(val) == 3 and all(v > 0 for _, v in val)  # after batches 2, 4 and 6
    best = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    (callback,) = [v for k, v in best["callbacks"].items() if "val_loss" in k]
    assert callback["best_model_score"].item() == min(v for _, v in val)
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_periodic_eval_is_logged_and_the_best_checkpoint_is_the_best_score(tmp_path):
    """eval_every / eval_limit: the first eval_limit synthetic test questions answered every eval_every steps, the
    scores in the CSV log at those steps; checkpoint.best by eval/overall (max) keeps the best of them."""
    import csv

    import torch

    corpus = ["+data.corpus.n_train=8", "+data.corpus.n_val=0", "+data.corpus.n_test=6", "+data.corpus.shard_size=4"]
    run = tmp_path / "run"
    train = subprocess.run([sys.executable, "train.py", f"data.root={tmp_path}/synthetic", *corpus,
                            "experiment=tiny_random", "vision_pretrain=null", "trainer.max_steps=6", "eval_every=2",
                            "eval_limit=4", "evaluate.max_new_tokens=4", "checkpoint.best.monitor=eval/overall",
                            "checkpoint.best.mode=max", "trainer.log_every_n_steps=5", "checkpoint.every_n_steps=0",
                            "data.batch_size=2", "data.num_workers=0", f"hydra.run.dir={run}"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    (log,) = run.glob("logs/*/metrics.csv")
    rows = list(csv.DictReader(log.open()))
    scores = {int(r["step"]): float(r["eval/overall"]) for r in rows if r.get("eval/overall")}
    assert sorted(scores) == [2, 4, 6] and all(0 <= v <= 100 for v in scores.values())
    assert any(k.startswith("eval/question_type/") for k in rows[0])  # per type too
    assert len((run / "eval_steps" / "step-000004" / "predictions.jsonl").read_text().splitlines()) == 4
    best = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    (callback,) = [v for k, v in best["callbacks"].items() if "eval/overall" in k]
    assert callback["best_model_score"].item() == max(scores.values())
    assert best["global_step"] == min(s for s, v in scores.items() if v == max(scores.values()))


def test_a_best_metric_the_run_never_logs_is_refused_before_training(tmp_path):
    train = subprocess.run([sys.executable, "train.py", "experiment=tiny_random", "vision_pretrain=null",
                            "checkpoint.best.monitor=eval/overall", f"data.root={tmp_path}/synthetic",
                            f"hydra.run.dir={tmp_path}/run"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert train.returncode != 0
    assert "checkpoint.best.monitor=eval/overall: set eval_every" in train.stderr
