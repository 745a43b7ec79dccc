"""Few-shot evaluation (vlm/eval/fewshot.py): demonstration prompts, random and RICES selection, the eval.py path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from test_eval_tasks import write_vqav2

from vlm.compose import model_config
from vlm.eval.fewshot import Rices, draw_pool, mean_std, random_demos
from vlm.eval.runner import build_messages, evaluate_config
from vlm.eval.tasks import Question, Task, read_chat_shards
from vlm.images import load_image
from vlm.model import VLM
from vlm.processor import Processor
from vlm.prompts import generation_prompt
from vlm.tiling import tile_image


@pytest.fixture(scope="module")
def xattn():
    torch.manual_seed(0)
    model = VLM(model_config()).eval()
    for block in model.fusion.blocks:  # make the images matter
        block.attn_gate.data.fill_(0.5)
        block.ff_gate.data.fill_(0.5)
    return model, Processor(model.cfg, model.tokenizer)


def _blocks(path, seed: int, noise: float = 0.0):
    """A 96 x 64 image of coloured blocks; `noise` adds a little per-pixel jitter (a near copy)."""
    rng = np.random.default_rng(seed)
    arr = np.repeat(np.repeat(rng.integers(0, 256, size=(8, 12, 3)), 8, 0), 8, 1).astype(np.float64)
    if noise:
        arr += np.random.default_rng(1000 + seed).normal(0, noise, arr.shape)
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path)
    return path


def _pool(tmp_path, n: int = 8) -> list[Question]:
    """n images, two questions on image 3 (pool questions sharing an image share its features)."""
    pool = [Question(f"p{i}", f"question {i}?", _blocks(tmp_path / f"p{i}.png", i), [f"a{i}"]) for i in range(n)]
    pool.insert(4, Question("p3b", "another question?", pool[3].image, ["b3"]))
    return pool


def test_demonstrations_come_first_as_earlier_turns(xattn):
    """build_messages: a user turn (image, question) and an assistant turn (the first answer) per demonstration,
    then the query; the processor gets one image per turn."""
    model, proc = xattn
    demos = [Question("d0", "What colour?", "x.png", ["red", "blue"]), Question("d1", "How many?", "y.png", ["3"])]
    query = Question("q", "Which shape?", "z.png")
    task = Task(name="t", reader="vqav2", prompt="Q: {question}", detail="low")
    messages = build_messages(query, task, demos)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in messages if m["role"] == "assistant"] == ["red", "3"]
    assert [m["content"][1]["text"] for m in messages if m["role"] == "user"] == \
        ["Q: What colour?", "Q: How many?", "Q: Which shape?"]
    assert build_messages(query, task) == messages[-1:]
    text, add_bos = generation_prompt(messages, proc.tokenizer, proc.image_token)
    assert text.count(proc.image_token) == 3 and text.index("red") < text.index("How many?")
    with pytest.raises(ValueError, match="no answer"):
        build_messages(query, task, [Question("d2", "?", "x.png")])


def test_random_demos_are_reproducible_and_differ_by_trial_and_query(tmp_path):
    pool = [Question(i, "?", "x.png", ["a"]) for i in range(50)]
    a = random_demos(pool, 4, seed=0, trial=0, query=7)
    assert a == random_demos(pool, 4, seed=0, trial=0, query=7) and len({q.question_id for q in a}) == 4
    assert a != random_demos(pool, 4, seed=0, trial=1, query=7)
    assert a != random_demos(pool, 4, seed=0, trial=0, query=8)
    with pytest.raises(ValueError, match="pool of 50"):
        random_demos(pool, 51, seed=0, trial=0, query=0)
    assert draw_pool(pool, 10, seed=3) == draw_pool(pool, 10, seed=3) and len(draw_pool(pool, 10, seed=3)) == 10
    assert draw_pool(pool, None, seed=3) == pool and mean_std([1.0, 3.0]) == (2.0, 1.0)


def test_rices_picks_the_nearest_training_images(tmp_path, xattn):
    """Queries that are near copies of pool images 5 and 3 get those images' questions as their nearest
    demonstrations (last, next to the query), and the whole order is the cosine ranking of the encoder's masked-mean
    global-view features, computed here directly from the encoder."""
    model, _ = xattn
    pool = _pool(tmp_path)
    queries = [_blocks(tmp_path / "q5.png", 5, noise=6.0), _blocks(tmp_path / "q3.png", 3, noise=6.0)]
    rices = Rices.build(model, pool)
    assert rices.features.shape[0] == 8 and rices.image_of.tolist() == [0, 1, 2, 3, 3, 4, 5, 6, 7]

    def direct(path) -> torch.Tensor:  # the reference: encoder on the low-detail view, mean over real patches
        t = tile_image(load_image(path), "low", model.cfg.tiling)
        with torch.no_grad():
            f, m = model.vision(t.pixels[:1], t.mask[:1])  # (1, P, Dv), (1, P)
        return F.normalize((f * m[..., None]).sum(1) / m.sum(), dim=-1)[0]  # (Dv,)

    reference = torch.stack([direct(q.image) for q in pool])  # (Q, Dv)
    for path, source in zip(queries, (["p5"], ["p3", "p3b"])):
        q = direct(path)
        [found] = rices.find(q[None], 4)
        assert found[-1].question_id == source[0] and {d.question_id for d in found[-len(source):]} == set(source)
        want = torch.sort(reference @ q, descending=True, stable=True).indices[:4].tolist()
        assert [d.question_id for d in reversed(found)] == [pool[i].question_id for i in want]
    assert rices.find(q[None], 0) == [[]]


def test_rices_features_are_cached_per_encoder_and_pool(tmp_path, xattn):
    model, _ = xattn
    pool = _pool(tmp_path, n=4)
    built = Rices.load_or_build(model, pool, tmp_path / "cache", "encoder-a")
    [path] = (tmp_path / "cache").glob("rices-*.pt")
    path.write_bytes(path.read_bytes()[:40])  # torn: rebuilt, the same features
    again = Rices.load_or_build(model, pool, tmp_path / "cache", "encoder-a")
    torch.testing.assert_close(again.features, built.features, rtol=0, atol=0)
    loaded = Rices.load_or_build(model, pool, tmp_path / "cache", "encoder-a")
    torch.testing.assert_close(loaded.features, built.features, rtol=0, atol=0)
    Rices.load_or_build(model, pool[:3], tmp_path / "cache", "encoder-a")
    Rices.load_or_build(model, pool, tmp_path / "cache", "encoder-b")
    assert len(list((tmp_path / "cache").glob("rices-*.pt"))) == 3  # another pool, another encoder: other files


def test_fewshot_through_evaluate_config(tmp_path, xattn):
    """eval.py's path with shots: a VQAv2-format task whose `demos` split is another VQAv2 folder; k = 0 runs once,
    random k = 2 per trial, RICES once (it does not depend on the trial); each prediction names its 2 demonstrations."""
    write_vqav2(tmp_path / "val", n=3)
    write_vqav2(tmp_path / "train", n=5, subtype="train2014")
    paths = {"questions_json": "{}/questions.json", "annotations_json": "{}/annotations.json", "image_dir": "{}/images"}
    task = {"name": "mini", "reader": "vqav2", "data_root": str(tmp_path), "max_new_tokens": 2, "detail": "low",
            "paths": {k: v.format("val") for k, v in paths.items()},
            "demos": {"paths": {k: v.format("train") for k, v in paths.items()}}}
    for demos in ("rices", "random"):
        cfg = OmegaConf.create({"task": task, "data_root": str(tmp_path), "limit": None, "batch_size": 2,
                                "num_workers": 0, "max_new_tokens": None, "shots": [0, 2], "demos": demos,
                                "trials": 2, "demo_pool": None, "seed": 0, "rices_cache": str(tmp_path / "rc")})
        out = tmp_path / demos
        result = evaluate_config(cfg, lambda: xattn[0], out)
        saved = json.loads((out / "fewshot.json").read_text())
        assert saved["pool"] == 5 and saved["n"] == 3 and set(saved["shots"]) == {"0", "2"}
        runs = 1 if demos == "rices" else 2
        assert len(result["shots"][0]["trials"]) == 1 and len(result["shots"][2]["trials"]) == runs
        rows = [json.loads(line) for line in
                (out / f"2shot_{demos}_t{runs - 1}" / "predictions.jsonl").read_text().splitlines()]
        assert len(rows) == 3 and all(len(r["demos"]) == 2 for r in rows)
    with pytest.raises(ValueError, match="8 shots from a pool of 5 questions"):  # more shots than the train split
        evaluate_config(OmegaConf.merge(cfg, {"shots": [0, 8]}), lambda: xattn[0], tmp_path / "too_many")
    assert not (tmp_path / "too_many" / "0shot").exists()  # refused before any evaluation ran
    with pytest.raises(ValueError, match="no demonstration split"):
        Task(name="x", reader="vqav2").read_demos()


def test_chat_shards_give_each_images_first_question(tmp_path):
    """The synthetic task's pool: the training shards' first (question, answer) per sample, the image as bytes."""
    from vlm.data.synthetic import ensure_corpus

    ensure_corpus(tmp_path, n_train=3, n_val=0, n_test=1, shard_size=2, width_range=(1024, 1024),
                  aspect_range=(2.0, 2.0))
    pool = read_chat_shards(tmp_path / "train")
    assert len(pool) == 3 and len(read_chat_shards(tmp_path / "train", limit=2)) == 2
    for q in pool:
        assert isinstance(q.image, bytes) and load_image(q.image).size == (1024, 512)
        assert q.question.endswith("?") and len(q.answers) == 1 and q.answers[0]
