"""Attention maps (vlm/explain.py): the heat is a distribution laid where each view sits, the PNG is written by the
CLI and by eval.py, nothing is kept in the model, prefix fusion reads the LLM's attention; on a trained default run
(opt-in) the heat of a corner-text question sits on that corner's tile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny import build, open_gates, photo
from PIL import Image
from test_fusion import _held

from vlm.checkpoint import save_checkpoint
from vlm.explain import _lay_out, _tile_heat, explain, question_messages, render
from vlm.tiling import plan_tiles

REPO = Path(__file__).resolve().parents[1]


def test_heat_is_a_distribution_over_the_image_and_its_tiles(tmp_path):
    model, _ = build()
    open_gates(model, 1.0)
    before = _held(model)
    ex = explain(model, photo(700, 500), question_messages("What is in the top-left corner?"), max_new_tokens=3)
    assert _held(model) == before  # the hooks were removed
    cols, rows = ex.plan.grid
    assert ex.heat.shape == (ex.canvas.height, ex.canvas.width) and ex.tile_heat.shape == (rows, cols) == (1, 2)
    assert abs(ex.heat.sum() - 1) < 1e-5 and abs(ex.tile_heat.sum() - 1) < 1e-5 and (ex.heat >= 0).all()
    assert abs(ex.view_mass.sum() - 1) < 1e-5 and len(ex.view_mass) == 1 + rows * cols
    png = render(ex, tmp_path / "map.png", model.cfg.tiling.tile_size)
    assert Image.open(png).format == "PNG"
    low = explain(model, photo(700, 500), question_messages("What?", "low"), detail="low", answer="a cat")
    assert low.answer == "a cat" and low.tile_heat.shape == (0, 0) and low.view_mass.tolist() == [pytest.approx(1)]


def test_each_views_heat_lands_where_the_view_sits():
    """All of a tile's patch heat lands inside that tile's crop; the global view's spreads over the whole image."""
    model, _ = build()
    tiling = model.cfg.tiling
    s = tiling.tile_size
    plan = plan_tiles(1100, 700, "high", tiling)  # a partial right column and bottom row
    cols, rows = plan.grid
    image = Image.new("RGB", (1100, 700))
    for t in range(rows * cols):
        views = [torch.zeros(16)] + [torch.zeros(64) for _ in range(rows * cols)]  # 4 x 4 global grid, 8 x 8 tiles
        views[1 + t][0] = 1.0  # the tile's top-left patch
        _, heat = _lay_out(image, plan, tiling, views)
        r, c = divmod(t, cols)
        expected = np.zeros((rows, cols))
        expected[r, c] = 1
        assert np.allclose(_tile_heat(heat, plan, s), expected, atol=1e-6)
        ys, xs = np.nonzero(heat)
        assert ys.min() == r * s and xs.min() == c * s and ys.max() < r * s + s // 8 and xs.max() < c * s + s // 8
    square = plan_tiles(700, 700, "high", tiling)  # no padding in its global view
    views = [torch.full((16,), 1 / 16)] + [torch.zeros(64) for _ in range(square.num_tiles)]
    _, heat = _lay_out(Image.new("RGB", (700, 700)), square, tiling, views)  # a uniform global view: uniform
    assert heat.shape == square.resized[::-1] and abs(heat.sum() - 1) < 1e-3 and heat.std() / heat.mean() < 0.05


def test_prefix_fusion_reads_the_llms_attention_on_the_visual_tokens():
    """Prefix fusion: the answer's self-attention on the visual tokens' positions (eager for that call, then back to
    the LLM's own attention); an encoder-decoder LM is refused."""
    model, _ = build("model/fusion=prefix")
    attention = model.lm.model.config._attn_implementation
    before = _held(model)
    ex = explain(model, photo(700, 500), question_messages("What is on the right?"), max_new_tokens=3)
    assert _held(model) == before and model.lm.model.config._attn_implementation == attention
    assert abs(ex.heat.sum() - 1) < 1e-5 and abs(ex.view_mass.sum() - 1) < 1e-5 and ex.tile_heat.shape == (1, 2)
    t5, _ = build("model/lm=tiny_t5", "model/fusion=prefix")
    with pytest.raises(ValueError, match="seq2seq"):
        explain(t5, photo(300, 200), question_messages("What?"))


def test_cli_and_eval_write_maps(tmp_path):
    model, _ = build()
    open_gates(model, 1.0)
    ckpt = save_checkpoint(tmp_path / "checkpoint.pt", model, steps=0)
    image = tmp_path / "photo.png"
    photo(600, 400).save(image)
    out = subprocess.run([sys.executable, "-m", "vlm.explain", f"checkpoint={ckpt}", f"image={image}",
                          "question=What is on the left?", f"out={tmp_path}/map.png", "max_new_tokens=3"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "global view" in out.stdout and Image.open(tmp_path / "map.png").format == "PNG"
    bad = subprocess.run([sys.executable, "-m", "vlm.explain", f"checkpoint={ckpt}"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and "image=..." in bad.stderr and "question=..." in bad.stderr
    corpus = [f"data.root={tmp_path}/synthetic", "+data.corpus.n_train=4", "+data.corpus.n_val=0",
              "+data.corpus.n_test=4", "+data.corpus.shard_size=4"]
    ev = subprocess.run([sys.executable, "eval.py", *corpus, f"checkpoint={ckpt}", "limit=3", "explain=2",
                         "max_new_tokens=3", f"hydra.run.dir={tmp_path}/eval"], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    maps = sorted((tmp_path / "eval" / "attention").glob("*.png"))
    assert [p.stem for p in maps] == sorted(str(r["question_id"]) for r in rows[:2])


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("VLM_DEFAULT_RUN"),
                    reason="VLM_DEFAULT_RUN=<the checkpoint.pt of a default run> (make demo writes one) not set")
def test_trained_default_looks_at_the_asked_corner():
    """On fresh synthetic images (a corpus seed no split uses), a text question about one corner puts more of the
    answer's heat on that corner's tile than on any other tile."""
    from hydra import compose, initialize_config_dir

    from vlm.checkpoint import load_checkpoint
    from vlm.data.synthetic import POSITIONS, QUESTIONS, CorpusParams, render_scene

    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        corpus = compose("train").data.corpus
    model = load_checkpoint(os.environ["VLM_DEFAULT_RUN"], inference=True)
    hits, shares = 0, []
    for seed in range(987_654, 987_656):
        image, _ = render_scene(CorpusParams(**corpus, seed=seed), np.random.default_rng(seed))
        for pos in POSITIONS:
            ex = explain(model, image, question_messages(QUESTIONS["text"].format(position=pos)))
            rows, cols = ex.tile_heat.shape
            r = 0 if "top" in pos else rows - 1
            c = 0 if "left" in pos else cols - 1
            hits += int(np.argmax(ex.tile_heat) == r * cols + c)
            shares.append(ex.tile_heat[r, c])
    print(f"asked tile hottest in {hits}/{len(shares)}; its mean share {np.mean(shares):.3f}")
    assert hits == len(shares)
