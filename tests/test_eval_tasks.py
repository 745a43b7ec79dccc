"""Evaluation tasks: every reader on small files in its official schema, `evaluate` end to end with a tiny untrained
VLM, the official VQA submission file, and batched generation equal to one-by-one generation."""

from __future__ import annotations

import json
from pathlib import Path

import easy_vqa
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from vlm.compose import model_config
from vlm.data import official
from vlm.eval.metrics import score
from vlm.eval.runner import evaluate, evaluate_config, markdown_table
from vlm.eval.tasks import TASK_DIR, Question, Task, load_task
from vlm.model import VLM
from vlm.processor import Processor

QUESTIONS = ["What colour is it?", "How many dots?", "What does the sign say?", "Is it day?", "Which way?"]


def _image(path: Path, seed: int, size: tuple[int, int] = (72, 48)) -> Path:
    """A tiny image with some structure (a few coloured blocks), JPEG or PNG by suffix."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = np.repeat(np.repeat(rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8), 8, 0), 8, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[:h, :w]).save(path)
    return path


def _write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _vqa_answers(answer: str) -> list[dict]:
    return [{"answer": answer if k < 6 else "other", "answer_confidence": "yes", "answer_id": k + 1}
            for k in range(10)]


def write_vqav2(root: Path, n: int = 5, subtype: str = "val2014", annotations: bool = True,
                image_name: str = "COCO_{subtype}_{image_id:012d}.jpg") -> None:
    image_subtype = subtype.replace("test-dev", "test")
    qs = [{"image_id": 100 + i, "question": QUESTIONS[i % 5], "question_id": 1000 + i} for i in range(n)]
    for q in qs:
        _image(root / "images" / image_name.format(subtype=image_subtype, image_id=q["image_id"]), q["image_id"])
    _write(root / "questions.json", {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
                                     "data_subtype": subtype, "questions": qs})
    if annotations:
        anns = [{"question_id": q["question_id"], "image_id": q["image_id"],
                 "question_type": ["what", "how many"][i % 2], "answer_type": ["other", "number"][i % 2],
                 "multiple_choice_answer": "red",
                 "answers": _vqa_answers("red")} for i, q in enumerate(qs)]
        _write(root / "annotations.json", {"info": {}, "data_subtype": subtype, "annotations": anns})


@pytest.fixture(scope="module")
def xattn():
    torch.manual_seed(0)
    model = VLM(model_config()).eval()
    for block in model.fusion.blocks:  # make the images matter
        block.attn_gate.data.fill_(0.5)
        block.ff_gate.data.fill_(0.5)
    return model, Processor(model.cfg, model.tokenizer)


@pytest.fixture(scope="module")
def prefix():
    torch.manual_seed(0)
    model = VLM(model_config("model/fusion=prefix")).eval()
    return model, Processor(model.cfg, model.tokenizer)


def run(model_proc, questions, task, out, **kw):
    model, proc = model_proc
    kw.setdefault("batch_size", 2)
    metrics = evaluate(model, proc, questions, task=task, out_dir=out, progress=False, **kw)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert json.loads((out / "metrics.json").read_text())["n"] == len(rows) == metrics["n"]
    assert all(isinstance(r["prediction"], str) for r in rows)
    return metrics, rows


def check_scored(metrics, rows, questions, types=("question_type",)):
    assert [r["question_id"] for r in rows] == [q.question_id for q in questions]
    assert all(0 <= r["score"] <= 1 for r in rows)
    assert 0 <= metrics["overall"] <= 100 and metrics["n_scored"] == len(questions)
    for key in types:
        assert key in metrics and sum(m["n"] for m in metrics[key].values()) >= len(questions)
    assert "| overall |" in markdown_table(metrics)


# ------------------------------------------------------------------------------------------------------- readers


def test_vqav2(tmp_path, xattn):
    write_vqav2(tmp_path)
    task = load_task("vqav2", data_root=str(tmp_path), max_new_tokens=3,
                     paths={"questions_json": "questions.json", "annotations_json": "annotations.json",
                            "image_dir": "images"})
    questions = task.read()
    assert len(questions) == 5 and questions[0].image == tmp_path / "images/COCO_val2014_000000000100.jpg"
    assert questions[1].answers == ["red"] * 6 + ["other"] * 4 and questions[1].question_type == "how many"
    metrics, rows = run(xattn, questions, task, tmp_path / "out")
    check_scored(metrics, rows, questions, ("question_type", "answer_type"))
    assert set(metrics["question_type"]) == {"what", "how many"} and set(metrics["answer_type"]) == {"other", "number"}
    assert rows[0]["image_id"] == 100 and rows[0]["answers"] == questions[0].answers
    sub = json.loads((tmp_path / "out/submission.json").read_text())  # vqav2.yaml asks for the results file too
    assert [s["question_id"] for s in sub] == [q.question_id for q in questions]


def test_vqav2_testdev_submission(tmp_path, xattn):
    write_vqav2(tmp_path, n=3, subtype="test-dev2015", annotations=False)
    task = load_task("vqav2_testdev", data_root=str(tmp_path), max_new_tokens=3,
                     paths={"questions_json": "questions.json", "annotations_json": None, "image_dir": "images"})
    questions = task.read()
    assert questions[0].image.name == "COCO_test2015_000000000100.jpg" and questions[0].answers == []
    metrics, rows = run(xattn, questions, task, tmp_path / "out")
    assert metrics["overall"] is None and metrics["n_scored"] == 0 and all(r["score"] is None for r in rows)
    sub = json.loads((tmp_path / "out/submission.json").read_text())
    assert sorted(s["question_id"] for s in sub) == [1000, 1001, 1002]
    assert all(set(s) == {"question_id", "answer"} and isinstance(s["question_id"], int)
               and isinstance(s["answer"], str) for s in sub)
    assert [s["answer"] for s in sub] == [r["prediction"] for r in rows]


def test_okvqa(tmp_path, xattn):
    write_vqav2(tmp_path, n=3)
    task = load_task("okvqa", data_root=str(tmp_path), max_new_tokens=2,
                     paths={"questions_json": "questions.json", "annotations_json": "annotations.json",
                            "image_dir": "images"})
    questions = task.read()
    metrics, rows = run(xattn, questions, task, tmp_path / "out", limit=2)
    assert len(rows) == 2 and task.submission is None and not (tmp_path / "out/submission.json").exists()
    check_scored(metrics, rows, questions[:2])


def test_synthetic_task_reads_the_corpus_naming(tmp_path, prefix):
    write_vqav2(tmp_path / "test/vqa", n=3, subtype="test", image_name="{image_id:012d}.jpg")
    task = load_task("synthetic", data_root=str(tmp_path), max_new_tokens=2)
    assert task.build_corpus and task.metric == "vqa_accuracy"
    questions = task.read()
    assert [q.image.name for q in questions] == ["000000000100.jpg", "000000000101.jpg", "000000000102.jpg"]
    metrics, rows = run(prefix, questions, task, tmp_path / "out")
    check_scored(metrics, rows, questions)


def test_textvqa(tmp_path, xattn):
    data = [{"question_id": 34602 + i, "question": QUESTIONS[i], "image_id": f"abc{i:04x}", "image_classes": ["Sign"],
             "set_name": "val", "answers": ["nous"] * 7 + ["stop"] * 3} for i in range(3)]
    for d in data:
        _image(tmp_path / "train_images" / f"{d['image_id']}.jpg", d["question_id"])
    _write(tmp_path / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "dataset_name": "textvqa", "data": data})
    task = load_task("textvqa", data_root=str(tmp_path), max_new_tokens=2)
    questions = task.read()
    assert questions[2].image == tmp_path / "train_images/abc0002.jpg" and len(questions[2].answers) == 10
    metrics, rows = run(xattn, questions, task, tmp_path / "out")
    assert [r["question_id"] for r in rows] == [34602, 34603, 34604]
    assert 0 <= metrics["overall"] <= 100 and "question_type" not in metrics


def test_vizwiz(tmp_path, xattn):
    data = []
    for i, atype in enumerate(["other", "yes/no", "unanswerable"]):
        name = f"VizWiz_val_{i:08d}.jpg"
        _image(tmp_path / "val" / name, i)
        answers = [{"answer": "unanswerable" if atype == "unanswerable" else "blue", "answer_confidence": "yes"}] * 10
        data.append({"image": name, "question": QUESTIONS[i], "answers": answers, "answer_type": atype,
                     "answerable": int(atype != "unanswerable")})
    _write(tmp_path / "Annotations/val.json", data)
    task = load_task("vizwiz", data_root=str(tmp_path), max_new_tokens=2)
    questions = task.read()
    assert [q.question_id for q in questions] == ["VizWiz_val_00000000", "VizWiz_val_00000001", "VizWiz_val_00000002"]
    assert questions[0].answers == ["blue"] * 10 and questions[2].extra["answerable"] == 0
    metrics, rows = run(xattn, questions, task, tmp_path / "out")
    check_scored(metrics, rows, questions, ("answer_type",))
    assert set(metrics["answer_type"]) == {"other", "yes/no", "unanswerable"}
    assert "| answer type | n |" in markdown_table(metrics)


def test_docvqa(tmp_path, prefix):
    data = [{"questionId": 49153 + i, "question": QUESTIONS[i], "image": f"documents/doc{i}.png", "docId": 14465,
             "answers": ["0.28", "28%"], "question_types": [["layout"], ["table/list", "layout"], ["form"]][i],
             "data_split": "val"} for i in range(3)]
    for i in range(3):
        _image(tmp_path / "val/documents" / f"doc{i}.png", i, size=(48, 64))
    _write(tmp_path / "val/val_v1.0.json", {"dataset_name": "docvqa", "dataset_split": "val", "data": data})
    task = load_task("docvqa", data_root=str(tmp_path), max_new_tokens=3)
    assert task.metric == "anls"
    questions = task.read()
    assert questions[1].image == tmp_path / "val/documents/doc1.png" and questions[1].question_type == ["table/list",
                                                                                                       "layout"]
    metrics, rows = run(prefix, questions, task, tmp_path / "out", batch_size=3)
    check_scored(metrics, rows, questions)
    assert {t: m["n"] for t, m in metrics["question_type"].items()} == {"form": 1, "layout": 2, "table/list": 1}


def test_chartqa(tmp_path, xattn):
    for src in ("human", "augmented"):
        entries = [{"imgname": f"{src}{i}.png", "query": QUESTIONS[i], "label": str(10 + i)} for i in range(2)]
        for i, e in enumerate(entries):
            _image(tmp_path / "test/png" / e["imgname"], i)
        _write(tmp_path / f"test/test_{src}.json", entries)
    task = load_task("chartqa", data_root=str(tmp_path), max_new_tokens=3)
    questions = task.read()
    assert [q.question_id for q in questions] == ["human_0", "human_1", "augmented_0", "augmented_1"]
    assert questions[3].answers == ["11"] and questions[3].image == tmp_path / "test/png/augmented1.png"
    metrics, rows = run(xattn, questions, task, tmp_path / "out")
    check_scored(metrics, rows, questions)
    assert set(metrics["question_type"]) == {"human", "augmented"} and all(r["score"] in (0, 1) for r in rows)


def test_easy_vqa_reads_the_installed_package(tmp_path, xattn):
    """No data_root: every official test question from the installed package, scored so that a right answer,
    however cased or punctuated, counts 100 %; eval.py's path (evaluate_config) with data_root null."""
    task = load_task("easy_vqa")
    assert task.data_root is None and task.detail == "low" and task.args == {"split": "test"}
    questions = task.read()
    texts, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    assert len(questions) == 9673 and len({q.question_id for q in questions}) == 9673
    assert [q.question for q in questions] == texts and [q.answers for q in questions] == [[a] for a in answers]
    assert all(q.image == Path(paths[i]) and q.extra == {"image_id": i} for q, i in zip(questions, image_ids))
    assert {q.question_type for q in questions} == {"shape", "colour", "yes/no"}
    assert task.read(official.easy_vqa_root()) == questions  # data_root given: a copy of the package's data folder
    assert score(task.metric, answers[0].capitalize() + ".", questions[0].answers) == 1.0
    assert score(task.metric, "purple", questions[0].answers) == 0.0

    cfg = OmegaConf.create({"task": OmegaConf.to_container(OmegaConf.load(TASK_DIR / "easy_vqa.yaml")),
                            "data_root": None, "limit": 4, "batch_size": 2, "num_workers": 0,
                            "max_new_tokens": 2})
    metrics = evaluate_config(cfg, lambda: xattn[0], tmp_path / "out")
    rows = [json.loads(line) for line in (tmp_path / "out/predictions.jsonl").read_text().splitlines()]
    check_scored(metrics, rows, questions[:4])
    assert all(r["score"] in (0, 1) for r in rows) and metrics["metric"] == "vqa_exact_match"
    assert json.loads((tmp_path / "out/metrics.json").read_text())["data_root"] is None


def test_missing_image_is_named(tmp_path):
    write_vqav2(tmp_path, n=2)
    (tmp_path / "images/COCO_val2014_000000000101.jpg").unlink()
    from vlm.eval.tasks import read_vqav2

    with pytest.raises(FileNotFoundError, match="COCO_val2014_000000000101"):
        read_vqav2(tmp_path / "questions.json", tmp_path / "annotations.json", tmp_path / "images")


def test_task_configs_are_valid():
    names = {p.stem for p in TASK_DIR.glob("*.yaml")}
    assert {"synthetic", "vqav2", "okvqa", "textvqa", "vizwiz", "docvqa", "chartqa", "easy_vqa"} <= names
    metrics = {}
    for name in names:
        task = load_task(name, data_root=".")
        metrics[name] = task.metric
        assert task.name == name and "{question}" in task.prompt
    assert metrics["docvqa"] == "anls" and metrics["chartqa"] == "relaxed_accuracy"
    assert metrics["vqav2"] == metrics["synthetic"] == "vqa_accuracy" and metrics["easy_vqa"] == "vqa_exact_match"
    assert load_task("vqav2_testdev").submission == "vqa"
    with pytest.raises(ValueError, match="metric"):
        Task(name="x", reader="vqav2", metric="bleu")


# ------------------------------------------------------------------------------------------ batched == one by one


def _mixed_questions(tmp_path: Path, n: int = 6) -> list[Question]:
    """Different image sizes (so different tile counts and prompt lengths: real left padding)."""
    sizes = [(72, 48), (600, 100), (40, 90), (530, 60), (64, 64), (300, 200)]  # 1 or 2 tiles
    return [Question(i, QUESTIONS[i % 5] + " " * (i % 3) + "x" * i, _image(tmp_path / f"{i}.png", i, sizes[i]),
                     ["red"] * 3 + ["blue"] * 7, question_type=f"t{i % 2}") for i in range(n)]


@pytest.mark.parametrize("fixture", ["xattn", "prefix"])
def test_batched_equals_one_by_one(tmp_path, fixture, request):
    model_proc = request.getfixturevalue(fixture)
    questions = _mixed_questions(tmp_path)
    task = Task(name="mixed", reader="vqav2", max_new_tokens=6)
    _, batched = run(model_proc, questions, task, tmp_path / "b4", batch_size=4)
    _, single = run(model_proc, questions, task, tmp_path / "b1", batch_size=1)
    assert [r["prediction"] for r in batched] == [r["prediction"] for r in single]
    assert len({r["prediction"] for r in batched}) > 1  # the images and questions make a difference


def test_dataloader_workers_give_the_same_predictions(tmp_path, xattn):
    questions = _mixed_questions(tmp_path, n=4)
    task = Task(name="mixed", reader="vqav2", max_new_tokens=4, detail="low")
    _, inline = run(xattn, questions, task, tmp_path / "w0", batch_size=2, num_workers=0)
    _, workers = run(xattn, questions, task, tmp_path / "w2", batch_size=2, num_workers=2)
    assert inline == workers


def test_synthetic_task_generates_long_enough_for_every_corpus_answer():
    """Generation stops at the task's max_new_tokens: the longest answer the corpus asks for, as the built-in byte
    tokenizer supervises it (" triangle</s>" under the plain template), must fit, or it is scored truncated."""
    from vlm.data.synthetic import COLOURS, DEFAULT_VOCAB, SHAPES, CorpusParams
    from vlm.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(model_config().lm)
    answers = [*DEFAULT_VOCAB, *SHAPES, *COLOURS, *(str(k) for k in range(CorpusParams().max_count + 1))]
    longest = max(len(tokenizer(" " + a, add_special_tokens=False)["input_ids"]) + 1 for a in answers)  # + </s>
    assert longest == 10
    assert load_task("synthetic", data_root="unused").max_new_tokens >= longest


def test_synthetic_video_task_reads_clips_and_scores_them(tmp_path, xattn):
    """The video task's test split: rendered on first use (its `convert`), read as questions whose image is the list
    of frames, evaluated through a video part (one media item, a low view per frame) and scored per question type."""
    from vlm.cli import ensure_converted

    task = load_task("synthetic_video", data_root=str(tmp_path), max_new_tokens=3,
                     convert={"synthetic_video": {"out": str(tmp_path / "test"), "split": "test", "n": 6,
                                                  "shard_size": 6}})
    ensure_converted(OmegaConf.create({"convert": task.convert}))
    questions = task.read()
    assert len(questions) == 6 and all(isinstance(q.image, list) and len(q.image) == 4 for q in questions)
    assert [q.question_type for q in questions[:3]] == ["first", "last", "motion"]
    assert questions[2].answers[0] in ("left", "right") and questions[0].question_id == "synthetic_video_test-0000000"
    metrics, rows = run(xattn, questions, task, tmp_path / "out")
    check_scored(metrics, rows, questions, ("question_type",))
    assert set(metrics["question_type"]) == {"first", "last", "motion"}
