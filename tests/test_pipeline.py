"""The streaming pipeline: shards -> samples -> batches; splitting, exact resume, bad samples, labels."""

from __future__ import annotations

import functools
import io
import json
import shutil
import tarfile

import pytest
import torch
from PIL import Image

from vlm.compose import model_config
from vlm.data.format import ShardSink, encode_image
from vlm.data.pipeline import (
    ShardStream,
    SkipCounter,
    Source,
    StreamPosition,
    check_shards,
    collate_stream,
    list_shards,
    mixture,
)
from vlm.processor import Processor
from vlm.tiling import plan_tiles, visual_tokens
from vlm.tokenizer import build_tokenizer


@functools.cache
def _processor(fusion: str = "tiny_xattn") -> Processor:
    cfg = model_config(f"model/fusion={fusion}")
    return Processor(cfg, build_tokenizer(cfg.lm))


def _jpeg(w: int, h: int, seed: int = 0) -> bytes:
    from skimage import data

    base = [data.astronaut(), data.coffee(), data.chelsea()][seed % 3]
    return encode_image(Image.fromarray(base).resize((w, h)), "JPEG")


def _chat(question: str, answer: str, images: list[tuple[str, str]]) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": ref, "detail": detail}} for ref, detail in images]
    return {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": parts + [{"type": "text", "text": question}]},
                         {"role": "assistant", "content": answer}],
            "meta": {"answers": [answer] * 10}}


def _write_corpus(directory, n: int = 24, per_shard: int = 3, prefix: str = "train", key: str = "s") -> list[str]:
    """n small chat samples (tiny images so the test is fast) over n / per_shard shards; returns keys."""
    keys = []
    with ShardSink(directory, prefix, max_count=per_shard) as sink:
        for i in range(n):
            name = f"{key}{i:04d}"
            sink.write(name, _chat(f"q{i}?", f"a{i}", [("0.png", "low")]),
                       {"0.png": encode_image(Image.new("RGB", (8 + i, 8), (i, 0, 0)), "PNG")})
            keys.append(name)
    return keys


def _loader(stream: ShardStream, batch_size: int = 2, workers: int = 0):
    pad = stream.processor.tokenizer.pad_token_id
    return torch.utils.data.DataLoader(stream, batch_size=batch_size, num_workers=workers,
                                       collate_fn=functools.partial(collate_stream, pad_token_id=pad))


@pytest.mark.parametrize("fusion", ["prefix", "tiny_xattn"])
def test_round_trip_shapes_labels_and_placeholders(tmp_path, fusion):
    proc = _processor(fusion)
    sizes = [((1024, 700), "high"), ((300, 200), "low"), ((1920, 1080), "auto"), ((150, 150), "high")]
    with ShardSink(tmp_path, "mix", max_count=10) as sink:
        sink.write("one", _chat("What is it?", "a cat", [("0.jpg", "high")]), {"0.jpg": _jpeg(1024, 700)})
        sink.write("two", _chat("Compare.", "same", [("0.jpg", "low"), ("1.jpg", "auto")]),
                   {"0.jpg": _jpeg(300, 200, 1), "1.jpg": _jpeg(1920, 1080, 2)})
        sink.write("doc", {"text": "A photo <image> of a cat.", "images": ["0.jpg"], "details": ["high"]},
                   {"0.jpg": _jpeg(150, 150)})
    stream = ShardStream(tmp_path, proc, epochs=1, shuffle_shards=False, shuffle_buffer=0)
    (batch,) = list(_loader(stream, batch_size=3))
    plans = [plan_tiles(w, h, d) for (w, h), d in sizes]
    assert batch["keys"] == ["one", "two", "doc"]
    assert batch["views_per_image"].tolist() == [p.num_views for p in plans]
    assert batch["images_per_sample"].tolist() == [1, 2, 1]
    assert batch["pixel_values"].shape == (sum(p.num_views for p in plans), 3, 512, 512)
    assert batch["pixel_mask"].shape == (sum(p.num_views for p in plans), 512, 512)
    image_id = proc.image_token_id
    per_image = [visual_tokens(p, proc.cfg) if fusion == "prefix" else 1 for p in plans]
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [per_image[0], per_image[1] + per_image[2],
                                                                per_image[3]]
    tok = proc.tokenizer
    labels = batch["labels"]
    assert not ((batch["input_ids"] == image_id) & (labels != -100)).any()  # image tokens never supervised
    supervised = [tok.decode(row[row != -100]) for row in labels]
    assert supervised == [" a cat</s>", " same</s>", "A photo  of a cat.</s>"]  # assistant turns only / doc text
    assert (labels[batch["attention_mask"] == 0] == -100).all()


def test_two_nodes_two_workers_see_every_sample_once(tmp_path):
    keys = _write_corpus(tmp_path, n=24, per_shard=3)  # 8 shards over 4 splits
    seen = []
    for rank in range(2):
        stream = ShardStream(tmp_path, _processor(), seed=3, epochs=1, rank=rank, world_size=2, shuffle_buffer=4)
        for batch in _loader(stream, batch_size=2, workers=2):
            seen += batch["keys"]
    assert sorted(seen) == sorted(keys) and len(seen) == len(keys)


@pytest.mark.parametrize("workers", [0, 2])
def test_sample_split_deals_one_process_batches_to_ranks(tmp_path, workers):
    """split="sample": the 2 ranks' k-th batches of 2 together are the k-th batch of 4 of one process without
    workers, whatever the workers; the shard split (default) does not have this property."""
    _write_corpus(tmp_path, n=24, per_shard=3)
    batches = lambda rank, world, size, split="sample", workers=workers: [set(b["keys"]) for b in _loader(
        ShardStream(tmp_path, _processor(), seed=3, epochs=1, shuffle_buffer=4, rank=rank, world_size=world,
                    split=split, batch_size=size), batch_size=size, workers=workers)]
    one = batches(0, 1, 4, "shard", workers=0)
    assert len(one) == 6 and batches(0, 1, 4) == one
    ranks = [batches(rank, 2, 2) for rank in range(2)]
    assert [a | b for a, b in zip(*ranks)] == one and not any(a & b for a, b in zip(*ranks))
    assert [a | b for a, b in zip(*[batches(rank, 2, 2, "shard") for rank in range(2)])] != one


def test_epochs_reshuffle_and_are_deterministic(tmp_path):
    _write_corpus(tmp_path, n=12, per_shard=3)
    order = lambda seed: [k for b in _loader(ShardStream(tmp_path, _processor(), seed=seed, epochs=2,
                                                         shuffle_buffer=4)) for k in b["keys"]]
    a = order(1)
    assert a == order(1) and a != order(2)
    assert sorted(a[:12]) == sorted(a[12:]) and a[:12] != a[12:]


@pytest.mark.parametrize("split", ["shard", "sample"])
@pytest.mark.parametrize("workers", [0, 2])
def test_restore_position_reproduces_next_samples(tmp_path, workers, split):
    _write_corpus(tmp_path, n=24, per_shard=3)
    make = lambda position=None: ShardStream(tmp_path, _processor(), seed=5, epochs=None, shuffle_buffer=5,
                                             position=position, split=split, batch_size=2, rank=1, world_size=2)
    position = StreamPosition()
    reference = []
    for i, batch in enumerate(_loader(make(), workers=workers)):
        if i < 5:  # an odd number of consumed batches: the worker roles must rotate on resume
            position.update(batch)
        else:
            reference.append(batch["keys"])
        if len(reference) == 7:
            break
    restored = StreamPosition.from_state(position.state_dict())  # as stored in a checkpoint
    resumed = []
    for batch in _loader(make(restored), workers=workers):
        resumed.append(batch["keys"])
        if len(resumed) == 7:
            break
    assert resumed == reference


def test_bad_samples_are_skipped_and_counted(tmp_path):
    good = encode_image(Image.new("RGB", (16, 16)), "PNG")
    tiff = io.BytesIO()
    Image.new("RGB", (16, 16)).save(tiff, format="TIFF")
    chat = lambda: _chat("q?", "a", [("0.png", "low")])
    with ShardSink(tmp_path, "bad", max_count=100) as sink:
        sink.write("good1", chat(), {"0.png": good})
        sink.write("corrupt", chat(), {"0.png": good[:40]})  # truncated PNG
        sink.write("tiff", chat(), {"0.png": tiff.getvalue()})  # a TIFF in disguise
        sink.write("good2", chat(), {"0.png": good})
    # what our writer refuses to write, other producers may: appended raw
    wrong_ref = json.dumps(_chat("q?", "a", [("1.png", "low")])).encode()
    with tarfile.open(tmp_path / "bad-000000.tar", "a") as tar:
        for name, data in [("noimage.json", wrong_ref), ("noimage.0.png", good),  # refers to a missing member
                           ("nojson.0.png", good)]:  # a sample without its .json record
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cut = tmp_path / "cut"
    cut_keys = _write_corpus(cut, n=6, per_shard=6, prefix="cut", key="cut")
    whole = (cut / "cut-000000.tar").read_bytes()
    (tmp_path / "a-cut.tar").write_bytes(whole[: len(whole) // 2 - 100])  # cut mid-member (read first)
    _write_corpus(tmp_path, n=1, per_shard=1, prefix="z", key="z")  # counts travel with the next sample: one last
    stream = ShardStream(tmp_path, _processor(), epochs=1, shuffle_shards=False, shuffle_buffer=0)
    counter, keys = SkipCounter(), []
    for batch in _loader(stream, batch_size=1):
        counter.update(batch)
        keys += batch["keys"]
    from_cut = [k for k in keys if k.startswith("cut")]
    assert 1 <= len(from_cut) < 6 and from_cut == cut_keys[: len(from_cut)]  # the readable prefix of the cut shard
    assert sorted(set(keys) - set(from_cut)) == ["good1", "good2", "z0000"]
    total = counter.total
    assert total.get("bad_image") == 1 and total.get("unsupported_format") == 1
    assert total.get("missing_key") == 2  # the missing image member and the sample without .json
    assert total.get("bad_shard") == 1
    with pytest.raises(ValueError, match="could not decode|truncated|decode"):
        list(ShardStream(tmp_path / "bad-000000.tar", _processor(), epochs=1, shuffle_buffer=0, strict=True))


def test_too_long_samples_are_skipped(tmp_path):
    _write_corpus(tmp_path, n=4, per_shard=4)
    stream = ShardStream(tmp_path, _processor(), epochs=1, shuffle_buffer=0, max_length=5)
    assert list(_loader(stream)) == []
    stream.max_length = None
    assert len(list(_loader(stream))) == 2


def test_tokenizer_chat_template_supervises_assistant_turns_only(tmp_path):
    proc = _processor()
    tok = build_tokenizer(proc.cfg.lm)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    templated = Processor(proc.cfg, tok)
    with ShardSink(tmp_path, "t", max_count=10) as sink:
        record = _chat("q?", "yes", [("0.png", "low")])
        record["messages"] += [{"role": "user", "content": "and?"}, {"role": "assistant", "content": "no"}]
        sink.write("t0", record, {"0.png": encode_image(Image.new("RGB", (8, 8)), "PNG")})
    (batch,) = list(_loader(ShardStream(tmp_path, templated, epochs=1, shuffle_buffer=0), batch_size=1))
    labels = batch["labels"][0]
    assert tok.decode(labels[labels != -100]) == "yes</s>no</s>"
    assert tok.decode(batch["input_ids"][0]).startswith("<|system|>Be brief.</s><|user|><image>q?")


@pytest.mark.parametrize("fusion", ["prefix", "tiny_xattn"])
def test_converter_to_shards_to_batch(tmp_path, fusion):
    """Official VQAv2 files -> converter -> shards -> pipeline -> one batch mixing sizes and details."""
    from vlm.data.convert import convert_vqa

    sizes = {1: (1024, 700), 2: (300, 200), 3: (1920, 1080), 4: (150, 150)}
    images = tmp_path / "val2014"
    images.mkdir()
    for image_id, (w, h) in sizes.items():
        (images / f"COCO_val2014_{image_id:012d}.jpg").write_bytes(_jpeg(w, h, image_id))
    questions = [{"image_id": i, "question": f"What is in picture {i}?", "question_id": 10 * i} for i in sizes]
    annotations = [{"question_id": 10 * i, "image_id": i, "question_type": "what is", "answer_type": "other",
                    "multiple_choice_answer": f"thing {i}",
                    "answers": [{"answer": f"thing {i}", "answer_confidence": "yes", "answer_id": k + 1}
                                for k in range(10)]} for i in sizes]
    (tmp_path / "q.json").write_text(json.dumps({"data_subtype": "val2014", "questions": questions}))
    (tmp_path / "a.json").write_text(json.dumps({"data_subtype": "val2014", "annotations": annotations}))
    out = tmp_path / "shards"
    for detail in ("high", "low"):
        convert_vqa(tmp_path / "q.json", images, out / detail, annotations=tmp_path / "a.json", detail=detail,
                    progress=False)
    proc = _processor(fusion)
    shards = sorted(str(p) for p in out.glob("*/*.tar"))
    stream = ShardStream(shards, proc, epochs=1, shuffle_shards=False, shuffle_buffer=0)
    (batch,) = list(_loader(stream, batch_size=8))
    plans = [plan_tiles(*sizes[m["image_id"]], "high" if i < 4 else "low") for i, m in enumerate(batch["meta"])]
    assert len(plans) == 8  # out/high/*.tar sort before out/low/*.tar
    assert batch["views_per_image"].tolist() == [p.num_views for p in plans]
    per_sample = (batch["input_ids"] == proc.image_token_id).sum(1).tolist()
    assert per_sample == [visual_tokens(p, proc.cfg) if fusion == "prefix" else 1 for p in plans]
    tok = proc.tokenizer
    answers = [tok.decode(row[row != -100]) for row in batch["labels"]]
    assert answers == [f" thing {m['image_id']}</s>" for m in batch["meta"]]


def test_list_shards_takes_every_spelling_of_a_source(tmp_path):
    """A folder, a glob, a brace pattern, a list (of any of those), and the list Hydra gives for `data.train=[a,b]`."""
    from omegaconf import OmegaConf

    paths = [str(tmp_path / f"s-{i:02d}.tar") for i in range(3)]
    for p in paths:
        open(p, "wb").close()
    assert list_shards(tmp_path) == list_shards(str(tmp_path / "s-*.tar")) == paths
    assert list_shards(str(tmp_path / "s-{00..01}.tar")) == paths[:2]
    assert list_shards(paths[1:]) == list_shards(OmegaConf.create({"train": paths[1:]}).train) == paths[1:]
    # a list of spellings (two sources mixed): each expanded, in the list's order
    assert list_shards([str(tmp_path / "s-{01..02}.tar"), paths[0]]) == paths[1:] + paths[:1]


@pytest.fixture
def http_root(tmp_path):
    """A loopback http.server serving tmp_path/www; yields (folder, base URL)."""
    import http.server
    import threading

    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _batches(shards, workers: int = 0) -> list[dict]:
    stream = ShardStream(shards, _processor(), seed=3, epochs=2, shuffle_buffer=5)
    return list(_loader(stream, batch_size=3, workers=workers))


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset's gopen reads http(s) through curl")
def test_http_and_pipe_sources_train_like_local_shards(http_root):
    """The same shards over a loopback HTTP server (brace pattern in the URL) and through `pipe:cat` give the batches
    that reading them from disk gives: same keys, same tensors, same order (2 epochs, shuffled, 2 workers)."""
    root, base = http_root
    _write_corpus(root, n=12, per_shard=3)
    local = list_shards(root)
    assert list_shards(f"{base}/train-{{000000..000003}}.tar") == [f"{base}/train-{i:06d}.tar" for i in range(4)]
    want = _batches(local, workers=2)
    for source in ([f"{base}/train-{{000000..000003}}.tar"], [f"pipe:cat {s}" for s in local]):
        check_shards(list_shards(source))
        got = _batches(source, workers=2)
        assert [b["keys"] for b in got] == [b["keys"] for b in want] and len(want) == 8
        for g, w in zip(got, want):
            for name in ("input_ids", "labels", "pixel_values"):
                assert torch.equal(g[name], w[name])
            assert "bad_shard" not in (g["stream_stats"].get(0, {}) | g["stream_stats"].get(1, {}))


def test_bad_sources_fail_before_training(tmp_path, http_root):
    root, base = http_root
    _write_corpus(root, n=3, per_shard=3)
    (root / "notes.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(FileNotFoundError, match="no shards found"):
        list_shards(str(tmp_path / "nothing-*.tar"))  # an empty glob
    with pytest.raises(FileNotFoundError, match="1 of 2 training shards do not exist: .*missing-000000.tar"):
        check_shards([*list_shards(root / "train-000000.tar"), str(tmp_path / "missing-000000.tar")])
    with pytest.raises(FileNotFoundError, match="cannot read the training shard pipe:false"):
        check_shards(["pipe:false"])
    if shutil.which("curl"):
        with pytest.raises(FileNotFoundError, match=f"cannot read the training shard {base}/missing.tar"):
            check_shards([f"{base}/missing.tar"])  # 404
        with pytest.raises(ValueError, match="is not a tar file"):
            check_shards([f"{base}/notes.tar"])
        check_shards([f"{base}/train-000000.tar"])  # served, a tar: no error


def _two_sources(tmp_path, weights=(0.7, 0.3)) -> list[Source]:
    _write_corpus(tmp_path / "a", n=6, per_shard=2, prefix="a", key="a")
    _write_corpus(tmp_path / "b", n=6, per_shard=2, prefix="b", key="b")
    return mixture([{"name": "vqa", "train": [str(tmp_path / "a")], "weight": weights[0]},
                    {"name": "caps", "train": [str(tmp_path / "b" / "b-{000000..000002}.tar")], "weight": weights[1]}])


def test_mixture_draws_by_weight_and_counts_per_source(tmp_path):
    """Weights 0.7 / 0.3: over 2,000 samples the per-source counts (StreamPosition.sources, what the run logs) are
    within 3 points of the weights; each batch says its samples' sources; each source makes its own passes."""
    stream = ShardStream(_two_sources(tmp_path), _processor(), seed=1, epochs=None, shuffle_buffer=4)
    position, order = StreamPosition(), []
    for batch in _loader(stream, batch_size=8):
        position.update(batch)
        assert [k[0] for k in batch["keys"]] == ["a" if s == "vqa" else "b" for s in batch["sources"]]
        order += batch["keys"]
        if len(order) >= 2000:
            break
    assert sum(position.sources.values()) == 2000
    assert abs(position.sources["vqa"] / 2000 - 0.7) < 0.03 and abs(position.sources["caps"] / 2000 - 0.3) < 0.03
    from_a = [k for k in order if k.startswith("a")]
    assert all(len(set(from_a[i:i + 6])) == 6 for i in range(0, 600, 6))  # source a's passes: each sample once
    assert StreamPosition.from_state(position.state_dict()).sources == position.sources


def test_finite_mixture_delivers_every_sample_and_resumes_exactly(tmp_path):
    """One pass of each source: every sample once, whatever the weights (a source that runs out leaves the others);
    a restored position continues the mixed stream exactly (2 workers)."""
    sources = _two_sources(tmp_path, weights=(0.9, 0.1))
    keys = [k for b in _loader(ShardStream(sources, _processor(), seed=2, epochs=1, shuffle_buffer=3)) for k in
            b["keys"]]
    assert sorted(keys) == sorted([f"a{i:04d}" for i in range(6)] + [f"b{i:04d}" for i in range(6)])
    make = lambda position=None: ShardStream(sources, _processor(), seed=2, epochs=None, shuffle_buffer=3,
                                             position=position)
    position, reference = StreamPosition(), []
    for i, batch in enumerate(_loader(make(), workers=2)):
        if i < 5:
            position.update(batch)
        else:
            reference.append((batch["keys"], batch["sources"]))
        if len(reference) == 6:
            break
    resumed = []
    for batch in _loader(make(StreamPosition.from_state(position.state_dict())), workers=2):
        resumed.append((batch["keys"], batch["sources"]))
        if len(resumed) == 6:
            break
    assert resumed == reference


def test_bad_mixtures_are_refused(tmp_path):
    _write_corpus(tmp_path / "a", n=2, per_shard=2, prefix="a", key="a")
    a = [str(tmp_path / "a")]
    with pytest.raises(ValueError, match="weight must be > 0"):
        mixture([{"name": "a", "train": a, "weight": 0}])
    with pytest.raises(ValueError, match="distinct names"):
        mixture([{"name": "a", "train": a}, {"name": "a", "train": a}])
    with pytest.raises(ValueError, match="needs name, train"):
        mixture([{"name": "a", "shards": a}])
    with pytest.raises(FileNotFoundError, match="no shards found"):
        mixture([{"name": "a", "train": a}, {"name": "b", "train": [str(tmp_path / "none-*.tar")]}])
    stream = ShardStream(mixture([{"name": "a", "train": a}]), _processor(), epochs=None, rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"fewer shards than the 2 readers .*a \(1\)"):
        next(iter(stream))  # 2 ranks, 1 shard: rank 1 would never draw from it


def test_video_samples_round_trip_and_bad_ones_are_skipped(tmp_path):
    """A video content part (its frames as members) -> one media item of one low view per frame, numbered 1..F;
    a missing frame, an undecodable one and too many frames skip the sample and are counted."""
    frame = lambda i: encode_image(Image.new("RGB", (24, 16), (40 * i, 0, 0)), "PNG")
    video = lambda n: {"messages": [{"role": "user", "content": [
        {"type": "video", "video": {"frames": [f"{i}.png" for i in range(n)]}},
        {"type": "text", "text": "Which came first?"}]}, {"role": "assistant", "content": "red"}]}
    limit = _processor().cfg.video.max_frames
    with ShardSink(tmp_path, "v", max_count=100) as sink:
        sink.write("corrupt", video(2), {"0.png": frame(0), "1.png": frame(1)[:30]})
        sink.write("long", video(limit + 1), {f"{i}.png": frame(i) for i in range(limit + 1)})
        sink.write("good", video(3), {f"{i}.png": frame(i) for i in range(3)})  # last: skip counts travel with it
        with pytest.raises(ValueError, match="missing images"):
            sink.write("missing", video(2), {"0.png": frame(0)})
    stream = ShardStream(tmp_path, _processor(), epochs=1, shuffle_shards=False, shuffle_buffer=0)
    counter, batches = SkipCounter(), list(_loader(stream, batch_size=1))
    for b in batches:
        counter.update(b)
    (batch,) = batches
    assert batch["keys"] == ["good"] and batch["views_per_image"].tolist() == [3]
    assert batch["view_positions"].frame.tolist() == [1, 2, 3] and batch["pixel_values"].shape[0] == 3
    assert counter.total.get("bad_image") == 1 and counter.total.get("bad_record") == 1


def test_video_file_members_are_sampled_and_bad_ones_skipped(tmp_path):
    """A video part naming an MPEG-4 member: decoded and sampled into its `frames` (uniform); a file that does not
    decode skips the sample (bad_image), counted."""
    from _tiny import mp4

    clip = mp4(20)
    record = lambda frames: {"messages": [{"role": "user", "content": [
        {"type": "video", "video": {"file": "0.mp4", "frames": frames}}, {"type": "text", "text": "First?"}]},
        {"role": "assistant", "content": "red"}]}
    with ShardSink(tmp_path, "f", max_count=100) as sink:
        sink.write("broken", record(4), {"0.mp4": clip[:300]})
        sink.write("clip", record(4), {"0.mp4": clip})
    stream = ShardStream(tmp_path, _processor(), epochs=1, shuffle_shards=False, shuffle_buffer=0)
    (batch,) = list(_loader(stream, batch_size=1))
    counter = SkipCounter()
    counter.update(batch)
    assert batch["keys"] == ["clip"] and batch["views_per_image"].tolist() == [4]
    assert batch["view_positions"].frame.tolist() == [1, 2, 3, 4] and counter.total == {"bad_image": 1}
