"""Stage 0 (vlm/vision_pretrain.py), on the tiny random model: the labels come from the right views, training moves the
encoder and the resamplers, the result is cached per configuration and loads into a fresh model."""

import numpy as np
import pytest
import torch

from vlm.compose import model_config
from vlm.config import TilingConfig
from vlm.data.synthetic import DEFAULT_VOCAB, POSITIONS, CorpusParams, make_corpus, render_scene
from vlm.model import VLM
from vlm.tiling import plan_tiles
from vlm.vision_pretrain import (
    VisionPretrainConfig,
    cache_key,
    corner_views,
    ensure_pretrained_vision,
    pretrain_vision,
    read_examples,
    stage_state,
)

CORPUS = dict(n_train=10, n_val=0, n_test=0, seed=5, shard_size=5, clear_text_tiles=True, aspect_range=(2.0, 2.0),
              text_region=(0.3, 0.3), text_cap_px=24)
MODEL = ()  # the tiny model: a tiny ResNet, its stage-0 resamplers frozen for the VLM stage
TRAIN = ("experiment=tiny_random",)  # train.py's recipe of that model (stage 0 included)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("v3")
    make_corpus(out, workers=1, **CORPUS)
    return out


def test_corner_views_index_the_corner_tiles():
    assert corner_views((3, 2)) == {"top left": 1, "top right": 3, "bottom left": 4, "bottom right": 6}
    assert corner_views((1, 1)) == {p: 1 for p in POSITIONS}


def test_each_corner_word_lies_inside_the_tile_it_labels():
    """The drawn word's box, in tile coordinates, is inside the tile `corner_views` picks for its corner."""
    params, tiling = CorpusParams(**CORPUS), TilingConfig()
    for index in range(8):
        _, scene = render_scene(params, np.random.default_rng([params.seed, 1, index]))
        plan = plan_tiles(scene.width, scene.height, "high", tiling)
        s = plan.resized[0] / scene.width
        cols = plan.grid[0]
        for pos, view in corner_views(plan.grid).items():
            r, c = divmod(view - 1, cols)
            x0, y0, x1, y1 = (v * s for v in scene.texts[pos][1])
            t = tiling.tile_size
            assert c * t <= x0 and x1 <= (c + 1) * t and r * t <= y0 and y1 <= (r + 1) * t, (index, pos)


def test_read_examples_labels_from_the_chats(corpus):
    ex = read_examples(corpus, images=6, tiling=TilingConfig(), workers=2)
    assert ex["tiles"].shape == (24, 3, 512, 512) and ex["globals"].shape == (6, 3, 512, 512)
    assert ex["words"].shape == (24,) and ex["colours"].shape == ex["shapes"].shape == (6,)
    words = ex["words"].view(6, 4)
    assert all(len(set(row.tolist())) == 4 for row in words)  # four distinct words per image
    assert int(ex["words"].max()) < len(DEFAULT_VOCAB)


def test_read_examples_refuses_a_corpus_without_clear_text_tiles(tmp_path):
    make_corpus(tmp_path, workers=1, **(CORPUS | dict(clear_text_tiles=False, aspect_range=(2.0, 3.0))))
    with pytest.raises(ValueError, match="clear_text_tiles"):
        read_examples(tmp_path, images=2, tiling=TilingConfig(), workers=1)


def test_stage0_trains_caches_and_loads(corpus):
    cfg = VisionPretrainConfig(images=10, held_out=2, steps=3, tiles_per_step=4, workers=1)
    torch.manual_seed(0)
    model = VLM(model_config(*MODEL))
    before = {k: v.clone() for k, v in stage_state(model).items()}
    metrics = ensure_pretrained_vision(model, corpus, cfg, seed=0)
    assert {"held_out_word_acc", "held_out_colour_acc", "held_out_shape_acc"} <= set(metrics)
    after = stage_state(model)
    for prefix in ("vision.", "visual.tile_resampler.", "visual.global_resampler."):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix)), prefix
    assert not any(p.requires_grad for p in model.vision.parameters())  # frozen again for the VLM stage
    path = corpus / "vision_pretrain" / f"{cache_key(model, corpus, cfg, 0)}.pt"
    assert path.exists()

    fresh = VLM(model_config(*MODEL))  # another init: the cached weights replace it
    assert ensure_pretrained_vision(fresh, corpus, cfg, seed=0) == metrics
    assert all(torch.equal(v, stage_state(fresh)[k]) for k, v in after.items())
    other = VLM(model_config(*MODEL, "model.tile_resampler.depth=2"))
    assert cache_key(other, corpus, cfg, 0) != cache_key(model, corpus, cfg, 0)
    cached = VLM(model_config(*MODEL, "++model.vision.feature_cache=/features"))  # where features go, not what
    assert cache_key(cached, corpus, cfg, 0) == cache_key(model, corpus, cfg, 0)


def test_stage0_over_a_frozen_encoder_trains_only_the_resamplers(corpus, tmp_path):
    """`train_encoder=False` (a pretrained encoder, the real pair's recipe): the encoder's weights stay bit for bit,
    both resamplers move, every view is encoded once through the model's feature cache, and the setting is part of
    the cache key."""
    cfg = VisionPretrainConfig(images=6, held_out=2, steps=3, tiles_per_step=4, workers=1, train_encoder=False)
    torch.manual_seed(0)
    model = VLM(model_config(*MODEL, f"++model.vision.feature_cache={tmp_path / 'features'}"))
    before = {k: v.clone() for k, v in stage_state(model).items()}
    calls = []
    model.vision.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    metrics = pretrain_vision(model, read_examples(corpus, 6, model.cfg.tiling, 1, model.vision.resize_views), cfg)
    assert {"held_out_word_acc", "held_out_colour_acc", "held_out_shape_acc"} <= set(metrics)
    after = stage_state(model)
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith("vision."))
    for prefix in ("visual.tile_resampler.", "visual.global_resampler."):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix)), prefix
    assert sum(calls) == 6 * 5  # 4 corner tiles + 1 global view per image, once (the steps reuse the features)
    assert len(list((tmp_path / "features").rglob("*"))) > 30  # ... through the feature cache
    trained = VisionPretrainConfig(images=6, held_out=2, steps=3, tiles_per_step=4, workers=1)
    assert cache_key(model, corpus, cfg, 0) != cache_key(model, corpus, trained, 0)


def test_train_py_runs_stage0_then_freezes_the_pretrained_encoder(corpus, tmp_path):
    """train.py with `vision_pretrain`: stage 0 first (its metrics in run.json), and the final checkpoint carries
    the stage-0 encoder unchanged (frozen through the VLM stage)."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from vlm.checkpoint import read_checkpoint, trained_weights

    repo = Path(__file__).resolve().parents[1]
    shutil.rmtree(corpus / "vision_pretrain", ignore_errors=True)  # only this run's stage 0 in the cache
    run = tmp_path / "run"
    value = lambda v: str(list(v) if isinstance(v, tuple) else v).replace(" ", "").replace("True", "true")
    corpus_args = [f"++data.corpus.{k}={value(v)}" for k, v in CORPUS.items()]
    out = subprocess.run([sys.executable, "train.py", f"data.root={corpus}", f"hydra.run.dir={run}", *corpus_args,
                          *TRAIN, "vision_pretrain.images=10", "vision_pretrain.held_out=2",
                          "vision_pretrain.steps=2", "vision_pretrain.tiles_per_step=4", "vision_pretrain.workers=1",
                          "trainer.max_steps=2", "data.batch_size=2", "data.num_workers=0", "logger=none"],
                         cwd=repo, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads((run / "run.json").read_text())
    assert set(info["vision_pretrain"]) >= {"held_out_word_acc", "seconds"}
    (cached,) = (corpus / "vision_pretrain").glob("*.pt")
    stage0 = torch.load(cached)["state"]
    weights = trained_weights(read_checkpoint(run / "checkpoint.pt"))
    vision = [k for k in stage0 if k.startswith("vision.") and "num_batches" not in k]
    assert vision and all(torch.equal(stage0[k], weights[k]) for k in vision)


def test_frozen_resamplers_stay_out_of_the_optimizer_but_in_checkpoints():
    model = VLM(model_config(*MODEL))
    for part in (model.visual.global_resampler, model.visual.tile_resampler):
        assert not any(p.requires_grad for p in part.parameters()) and not part.training
    assert any(p.requires_grad for p in model.visual.view_embedding.parameters())  # tile positions still train
    kept = model.checkpoint_state_dict()
    assert all(k in kept for k in model.state_dict() if k.startswith(("visual.global_resampler.",
                                                                       "visual.tile_resampler.")))
