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
