import importlib.util
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from vlm.config import TilingConfig
from vlm.data.synthetic import (
    NUM_ANSWERS,
    POSITIONS,
    QUESTION_TYPES,
    CorpusParams,
    _tile_cuts,
    cap_height,
    corpus_matches,
    ensure_corpus,
    font_size_for,
    make_corpus,
    make_sample,
    read_manifest,
    render_scene,
    sample_ids,
)
from vlm.images import load_image
from vlm.tiling import plan_tiles

TINY = dict(n_train=12, n_val=4, n_test=6, seed=3, shard_size=5)
TRAIN_QUESTIONS = CorpusParams().train_questions  # the default: every question a scene answers
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    make_corpus(out, workers=1, **TINY)
    return out


def _samples(out: Path, split: str) -> list[dict]:
    shards = [str(out / s) for s in read_manifest(out)["splits"][split]["shards"]]
    return list(wds.WebDataset(shards, shardshuffle=False))


def _members(out: Path) -> dict[str, bytes]:
    """Every json and image member of every shard, by name."""
    found = {}
    for tar in sorted(out.glob("*/*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                found[f"{tar.name}/{m.name}"] = t.extractfile(m).read()
    return found


def test_shards_hold_chat_records_with_decodable_images(corpus):
    manifest = read_manifest(corpus)
    types = set()
    for split, n in (("train", 12), ("val", 4), ("test", 6)):
        assert manifest["splits"][split]["samples"] == n
        assert len(manifest["splits"][split]["shards"]) == -(-n // TINY["shard_size"])
        samples = _samples(corpus, split)
        assert len(samples) == n
        for s in samples:
            record = json.loads(s["json"])
            messages, meta = record["messages"], record["meta"]
            turns = meta["turns"] if split == "train" else [meta]  # train: a chat of train_questions questions
            assert len(messages) == 2 * len(turns) == 2 * (TRAIN_QUESTIONS if split == "train" else 1)
            image_id, question_id = sample_ids(split, int(s["__key__"].split("-")[1]))
            for t, (user, assistant, turn) in enumerate(zip(messages[::2], messages[1::2], turns)):
                assert user["role"] == "user" and assistant["role"] == "assistant"
                *image_part, text_part = user["content"]
                expected = [{"type": "image_url", "image_url": {"url": "0.jpg", "detail": "high"}}] if t == 0 else []
                assert image_part == expected  # the image comes with the first question only
                assert text_part["type"] == "text" and text_part["text"] == turn["question"]
                answer = assistant["content"]
                assert isinstance(answer, str) and answer == turn["answer"]
                assert set(turn) == {"question_id", "image_id", "question_type", "answers", "answer_type",
                                     "question", "answer"}
                assert turn["answers"] == [answer] * NUM_ANSWERS
                assert turn["answer_type"] == ("number" if answer.isdigit() else "other")
                assert turn["question_type"] in QUESTION_TYPES
                assert (turn["image_id"], turn["question_id"]) == (image_id, question_id + t)
                types.add(turn["question_type"])
            if split == "train":  # distinct questions about one image
                assert len({turn["question"] for turn in turns}) == len(turns)
            image = load_image(s["0.jpg"])
            assert 1024 <= max(image.size) <= 2048 and min(image.size) >= 256
    assert types == set(QUESTION_TYPES)
    totals = manifest["question_types"]
    assert sum(totals.values()) == 12 * TRAIN_QUESTIONS + 4 + 6 and set(totals) == set(QUESTION_TYPES)


def test_answers_match_the_drawn_scene():
    params = CorpusParams(**TINY)
    turns = []
    for split, code, index in [("train", 1, i) for i in range(4)] + [("test", 3, i) for i in range(12)]:
        _, record, _ = make_sample(params, split, index)
        _, scene = render_scene(params, np.random.default_rng([params.seed, code, index]))
        turns += [(scene, turn) for turn in record["meta"].get("turns", [record["meta"]])]
    for scene, turn in turns:
        question, answer, qtype = turn["question"], turn["answer"], turn["question_type"]
        if qtype == "text":
            position = next(p for p in POSITIONS if f" {p} " in question)
            assert answer == scene.texts[position][0]
            assert len({word for word, _ in scene.texts.values()}) == len(POSITIONS)
        elif qtype == "coarse":
            assert answer in scene.large[:2]
        else:
            assert question == f"How many {scene.counted}s are there?"
            assert answer == str(scene.count(scene.counted)) and 1 <= int(answer) <= params.max_count
            assert scene.counted != scene.large[0]


def test_text_sits_inside_one_tile_and_shapes_do_not_overlap():
    params, cfg = CorpusParams(), TilingConfig()
    for index in range(8):
        _, scene = render_scene(params, np.random.default_rng([99, 1, index]))
        plan = plan_tiles(scene.width, scene.height, "high")
        sx, sy = plan.resized[0] / scene.width, plan.resized[1] / scene.height
        for _, (x0, y0, x1, y1) in scene.texts.values():
            assert int(x0 * sx) // cfg.tile_size == int((x1 - 1) * sx) // cfg.tile_size
            assert int(y0 * sy) // cfg.tile_size == int((y1 - 1) * sy) // cfg.tile_size
        boxes = [b for _, b in scene.texts.values()] + [scene.large[2]] + [b for _, _, b in scene.medium]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)


@pytest.mark.parametrize("params, indices", [
    (CorpusParams(width_range=(1792, 2048), aspect_range=(4.0, 4.5), text_region=(0.22, 0.35), clear_text_tiles=True),
     range(8)),
    # 3 x 2 tiles, one word per corner tile: the shapes share the middle column (0.67 h wide), so the large shape is
    # sized to it. Sized to h (up to 0.75 h) it left no room for a counted shape in these scenes.
    (CorpusParams(aspect_range=(2.0, 2.0), text_region=(0.3, 0.3), text_cap_px=24, clear_text_tiles=True),
     [41, 237, 254, 274, 810]),
])
def test_clear_text_tiles_keeps_shapes_out_of_the_word_columns(params, indices):
    for index in indices:
        _, scene = render_scene(params, np.random.default_rng([7, 1, index]))
        cuts, _ = _tile_cuts(scene.width, scene.height, TilingConfig())
        for _, (x0, _, x1, _) in scene.texts.values():
            assert x1 <= cuts[0] or x0 >= cuts[-1]  # every word in the first or last tile column
        for _, _, (x0, _, x1, _) in [scene.large] + scene.medium:
            assert x0 >= cuts[0] and x1 <= cuts[-1]  # every shape between them
    with pytest.raises(ValueError, match="3 tile columns"):  # a 2-column image has no middle to draw in
        render_scene(CorpusParams(width_range=(1024, 1024), aspect_range=(2.0, 2.0), clear_text_tiles=True),
                     np.random.default_rng(0))


def test_deterministic_given_seed_and_independent_of_workers(corpus, tmp_path):
    make_corpus(tmp_path / "same", workers=2, **TINY)
    make_corpus(tmp_path / "other", workers=1, **(TINY | {"seed": 4}))
    reference, same, other = _members(corpus), _members(tmp_path / "same"), _members(tmp_path / "other")
    assert len(reference) == 2 * 22 and any(name.endswith(".0.jpg") for name in reference)
    assert same == reference
    assert other.keys() == reference.keys()
    assert all(other[name] != reference[name] for name in reference if name.endswith(".0.jpg"))


def test_official_formats_are_consistent_with_the_test_shards(corpus):
    metas = {}
    for s in _samples(corpus, "test"):
        record = json.loads(s["json"])
        metas[record["meta"]["question_id"]] = (record, s["0.jpg"])
    vqa = corpus / "test/vqa"
    questions = json.loads((vqa / "questions.json").read_text())
    annotations = json.loads((vqa / "annotations.json").read_text())
    assert {"info", "task_type", "data_type", "data_subtype", "license", "questions"} <= questions.keys()
    assert questions["task_type"] == "Open-Ended" and questions["data_subtype"] == "test"
    assert {"info", "license", "data_subtype", "annotations"} <= annotations.keys()
    assert sorted(q["question_id"] for q in questions["questions"]) == sorted(metas)
    assert sorted(a["question_id"] for a in annotations["annotations"]) == sorted(metas)
    for q in questions["questions"]:
        record, jpeg = metas[q["question_id"]]
        assert set(q) == {"image_id", "question", "question_id"}
        assert q["image_id"] == record["meta"]["image_id"]
        assert q["question"] == record["messages"][0]["content"][1]["text"]
        assert (vqa / "images" / f"{q['image_id']:012d}.jpg").read_bytes() == jpeg
    for a in annotations["annotations"]:
        record, _ = metas[a["question_id"]]
        meta = record["meta"]
        assert a["image_id"] == meta["image_id"] and a["question_type"] == meta["question_type"]
        assert a["answer_type"] == meta["answer_type"]
        assert a["multiple_choice_answer"] == record["messages"][1]["content"]
        assert [x["answer"] for x in a["answers"]] == meta["answers"]
        assert [x["answer_id"] for x in a["answers"]] == list(range(1, NUM_ANSWERS + 1))
        assert all(x["answer_confidence"] == "yes" for x in a["answers"])

    doc = json.loads((corpus / "test/docvqa/test_v1.0.json").read_text())
    assert {"dataset_name", "dataset_split", "dataset_version", "data"} <= doc.keys()
    text_ids = sorted(q for q, (r, _) in metas.items() if r["meta"]["question_type"] == "text")
    assert sorted(d["questionId"] for d in doc["data"]) == text_ids and text_ids
    for d in doc["data"]:
        assert {"questionId", "question", "image", "docId", "answers", "question_types", "data_split"} <= d.keys()
        record, jpeg = metas[d["questionId"]]
        assert d["docId"] == record["meta"]["image_id"] and d["data_split"] == "test"
        assert d["answers"] == [record["messages"][1]["content"]]
        assert (corpus / "test/docvqa" / d["image"]).read_bytes() == jpeg


def test_ensure_corpus_builds_only_when_needed(tmp_path):
    small = dict(n_train=3, n_val=1, n_test=2, seed=0, shard_size=2)
    assert ensure_corpus(tmp_path, workers=1, **small)["built"]
    shard = tmp_path / "train/train-000000.tar"
    stamp = shard.stat().st_mtime_ns
    assert corpus_matches(tmp_path, **small)
    assert not ensure_corpus(tmp_path, workers=1, **small)["built"]
    assert shard.stat().st_mtime_ns == stamp
    summary = ensure_corpus(tmp_path, workers=1, **(small | {"n_train": 1}))
    assert summary["built"] and read_manifest(tmp_path)["params"]["n_train"] == 1
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["train-000000.tar"]  # stale shard gone
    (tmp_path / "val/val-000000.tar").unlink()  # an incomplete corpus is rebuilt too
    assert ensure_corpus(tmp_path, workers=1, **(small | {"n_train": 1}))["built"]


def test_default_geometry_text_needs_the_tiles():
    """Over the default size range the text's cap height is >= 20 px in a tile and <= 8 px in the global view."""
    params, cfg = CorpusParams(), TilingConfig()
    (w_lo, w_hi), (a_lo, a_hi) = params.width_range, params.aspect_range
    assert 1024 <= w_lo and w_hi <= 2048
    for w in range(w_lo, w_hi + 1):
        for h in range(round(w / a_hi), round(w / a_lo) + 1):
            plan = plan_tiles(w, h, "high", cfg)
            s_tile = min(plan.resized[0] / w, plan.resized[1] / h)
            s_glob = min(cfg.tile_size / w, cfg.tile_size / h)
            cap = cap_height(font_size_for(w, h, params.text_cap_px, cfg))
            assert cap * s_tile >= 20, (w, h)
            assert cap * s_glob <= 8, (w, h)
            assert s_tile / s_glob >= 2.5, (w, h)


def test_params_validation_and_lists():
    assert CorpusParams(width_range=[1600, 1700], vocab=["A", "B", "C", "D"]).width_range == (1600, 1700)
    for bad in (dict(width_range=(512, 1024)), dict(vocab=("A", "B", "C")), dict(question_mix=(1, 1)),
                dict(detail="medium"), dict(aspect_range=(0.5, 1.0))):
        with pytest.raises(ValueError):
            CorpusParams(**bad)


def test_cli_builds_and_then_skips(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_synthetic", REPO / "data/make_synthetic.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    argv = ["--out", str(tmp_path), "--n-train", "2", "--n-val", "1", "--n-test", "1", "--workers", "1"]
    assert cli.main(argv)["built"]
    assert not cli.main(argv)["built"]
    assert "up to date" in capsys.readouterr().out
    assert read_manifest(tmp_path)["splits"]["train"]["samples"] == 2
    small = dict(n_train=2, n_val=1, n_test=1)  # unflagged, the CLI builds what train.py's ensure_corpus would
    assert read_manifest(tmp_path)["params"] == CorpusParams(**small).to_json()
    flags = ["--min-width", "1792", "--min-aspect", "4.0", "--max-aspect", "4.5", "--text-region", "0.2", "0.3",
             "--clear-text-tiles", "--train-questions", "3"]
    cli.main(argv + flags)
    assert read_manifest(tmp_path)["params"] == CorpusParams(
        **small, width_range=(1792, 2048), aspect_range=(4.0, 4.5), text_region=(0.2, 0.3), clear_text_tiles=True,
        train_questions=3).to_json()


def test_captions_describe_the_scene_and_convert_with_the_corpus_images(corpus, tmp_path):
    """caption(scene) names the large shape and colour, every small shape's count and each corner's word; the caption
    shards (data.convert synthetic_captions) hold the corpus's own JPEG bytes, asked "Describe the image briefly."."""
    import re

    from vlm.data.convert import CAPTION_PROMPT, convert_synthetic_captions
    from vlm.data.synthetic import caption, render_sample

    params = CorpusParams(**TINY)
    for index in range(6):
        _, scene, _ = render_sample(params, "train", index)
        text = caption(scene)
        shape, colour, _ = scene.large
        assert text.startswith(f"A large {colour} {shape}")
        for kind in {k for k, _, _ in scene.medium}:
            n = sum(k == kind for k, _, _ in scene.medium)
            assert re.search(rf"\b{n} small {kind}{'s' if n > 1 else ''}\b", text)
        assert [f"{scene.texts[p][0]} ({p})" in text for p in POSITIONS] == [True] * len(POSITIONS)

    out = tmp_path / "captions"
    summary = convert_synthetic_captions(out, root=corpus, limit=5, shard_size=2, progress=False)
    assert summary["written"] == 5
    corpus_jpegs = {s["__key__"]: s["0.jpg"] for s in _samples(corpus, "train")}
    captions = list(wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False))
    assert len(captions) == 5
    for i, sample in enumerate(captions):
        record = json.loads(sample["json"])
        assert record["messages"][0]["content"][1]["text"] == CAPTION_PROMPT
        _, scene, _ = render_sample(params, "train", i)
        assert record["messages"][1]["content"] == caption(scene) == record["meta"]["caption"]
        assert sample["0.jpg"] == corpus_jpegs[f"train-{i:07d}"]
