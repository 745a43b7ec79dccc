"""Run a model on a task's questions: prompts, batched greedy generation, scoring, files.

`evaluate` writes to out_dir:
    predictions.jsonl   one line per question: question_id, question, prediction, answers, score, types, extra
    metrics.json        overall and per question_type / answer_type (score in %, n), the task, the metric
    submission.json     with task.submission == "vqa": the official results file [{"question_id", "answer"}]

`evaluate_config` is the whole of `python eval.py` once a config is composed and the task's data is there (also
train.py's eval_after); entry points build the synthetic corpus first where a task asks for it.

Images are decoded, tiled and tokenised in DataLoader workers while the model generates. Under torch.distributed
each rank takes every world_size-th question; rank 0 gathers the predictions and writes the files.
"""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from hydra.utils import to_absolute_path
from tqdm import tqdm

from vlm.eval.fewshot import DemoImages, Rices, draw_pool, pooled_features, run_fewshot
from vlm.eval.metrics import score
from vlm.eval.tasks import Question, Task
from vlm.images import load_image, load_media
from vlm.parallel import all_gather_objects, rank_world
from vlm.processor import Processor, collate, to_device
from vlm.prompts import generation_prompt


def build_messages(question: Question, task: Task, demos: Sequence[Question] = ()) -> list[dict]:
    """The chat request: [system], then per demonstration a user turn (image, question) and an assistant turn (its
    first reference answer), then the query's user turn = [image_url, text rendered from the task's prompt]."""
    messages = [{"role": "system", "content": task.system}] if task.system else []
    for q in (*demos, question):
        media = ({"type": "video", "video": {"frames": ["frame"] * len(q.image)}} if isinstance(q.image, list) else
                 {"type": "image_url", "image_url": {"url": "image", "detail": task.detail}})
        messages.append({"role": "user", "content": [
            media, {"type": "text", "text": task.prompt.format(question=q.question)}]})
        if q is not question:
            if not q.answers:
                raise ValueError(f"demonstration {q.question_id!r} has no answer")
            messages.append({"role": "assistant", "content": q.answers[0]})
    return messages


class QuestionDataset(torch.utils.data.Dataset):
    """Question i -> the encoded prompt (input_ids + views), decoded and tiled here (in the workers). With
    `demos_of` (few-shot: query index -> its demonstrations) the demonstrations' turns come first, each distinct
    demonstration image decoded once per worker."""

    def __init__(self, questions: list[Question], indices: list[int], processor: Processor, task: Task,
                 demos_of: Callable[[int], list[Question]] | None = None):
        self.questions, self.indices, self.processor, self.task = questions, indices, processor, task
        self.demos_of, self.demo_images = demos_of, DemoImages()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        q = self.questions[index]
        proc = self.processor
        demos = self.demos_of(index) if self.demos_of is not None else []
        text, add_bos = generation_prompt(build_messages(q, self.task, demos), proc.tokenizer, proc.image_token)
        try:
            images = [self.demo_images(d) for d in demos] + [load_media(q.image)]
        except Exception as e:
            raise type(e)(f"question {q.question_id!r}: {e}") from e
        sample = proc.encode(text, images, [self.task.detail] * len(images), add_bos=add_bos)
        sample["index"] = index
        return sample


def _collate(samples: list[dict], pad_token_id: int) -> dict:
    batch = collate(samples, pad_token_id=pad_token_id, padding_side="left")
    batch["index"] = [s["index"] for s in samples]
    return batch


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def summarise(rows: list[dict], task: Task) -> dict:
    """metrics.json's content: overall and per type (score in %, over the scored questions)."""
    scored = [r for r in rows if r["score"] is not None]
    metrics = {"task": task.name, "metric": task.metric, "n": len(rows), "n_scored": len(scored),
               "overall": 100 * sum(r["score"] for r in scored) / len(scored) if scored else None}
    for key in ("question_type", "answer_type"):
        groups = defaultdict(list)
        for r in scored:
            for t in _as_list(r.get(key)):
                groups[t].append(r["score"])
        if groups:
            metrics[key] = {t: {"n": len(v), "score": 100 * sum(v) / len(v)} for t, v in sorted(groups.items())}
    return metrics


def markdown_table(metrics: dict) -> str:
    """question type | n | score %, then the same per answer type when the task has them, each with overall."""
    if metrics["overall"] is None:
        return f"{metrics['task']}: {metrics['n']} questions, no reference answers (not scored)"
    lines = []
    for key in ("question_type", "answer_type"):
        if key not in metrics and lines:
            continue
        lines += [f"| {key.replace('_', ' ')} | n | {metrics['metric']} % |", "|---|---|---|"]
        lines += [f"| {t} | {m['n']} | {m['score']:.1f} |" for t, m in metrics.get(key, {}).items()]
        lines += [f"| overall | {metrics['n_scored']} | {metrics['overall']:.1f} |", ""]
    return "\n".join(lines).rstrip()


@torch.no_grad()
def evaluate(model, processor: Processor, questions: list[Question], *, task: Task, batch_size: int = 16,
             limit: int | None = None, out_dir: str | Path, num_workers: int = 0, max_new_tokens: int | None = None,
             info: dict | None = None, progress: bool = True, verbose: bool = True,
             demos_of: Callable[[int], list[Question]] | None = None) -> dict:
    """Greedy answers to `questions` (the first `limit`), scored with task.metric; writes predictions.jsonl,
    metrics.json (+ `info`, e.g. the checkpoint) and the submission file if the task asks for one. Returns the
    metrics (every rank gets them). max_new_tokens: task.max_new_tokens unless given. `demos_of`: few-shot
    demonstrations per question index (`vlm.eval.fewshot`); predictions.jsonl then names them (`demos`)."""
    questions = list(questions)[:limit] if limit else list(questions)
    rank, world = rank_world(env=False)  # the process group's, if any: gathering needs one
    indices = list(range(rank, len(questions), world))
    pad = processor.tokenizer.pad_token_id
    loader = torch.utils.data.DataLoader(
        QuestionDataset(questions, indices, processor, task, demos_of), batch_size=batch_size, shuffle=False,
        num_workers=num_workers, collate_fn=functools.partial(_collate, pad_token_id=pad))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    new_tokens = max_new_tokens or task.max_new_tokens
    predictions: dict[int, str] = {}
    bar = tqdm(total=len(indices), desc=f"eval {task.name}", unit="q", disable=not progress or rank != 0,
               dynamic_ncols=True)
    try:
        for batch in loader:
            index = batch.pop("index")
            batch = to_device(batch, device)
            new = model.generate(batch, max_new_tokens=new_tokens)  # (B, N)
            for i, ids in zip(index, new.tolist()):
                predictions[i] = processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
            bar.update(len(index))
    finally:
        bar.close()
        model.train(was_training)
    if world > 1:
        predictions = {i: p for part in all_gather_objects(predictions) for i, p in part.items()}

    rows = []
    for i, q in enumerate(questions):
        pred = predictions[i]
        rows.append({"question_id": q.question_id, "question": q.question, "prediction": pred,
                     "answers": q.answers, "score": score(task.metric, pred, q.answers) if q.answers else None,
                     "question_type": q.question_type, "answer_type": q.answer_type, **q.extra,
                     **({"demos": [d.question_id for d in demos_of(i)]} if demos_of is not None else {})})
    metrics = summarise(rows, task)
    if rank == 0:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
        (out / "metrics.json").write_text(json.dumps({**(info or {}), **metrics}, indent=2, default=str))
        if task.submission == "vqa":
            sub = [{"question_id": q.question_id, "answer": predictions[i]} for i, q in enumerate(questions)]
            (out / "submission.json").write_text(json.dumps(sub))
        if verbose:
            print(f"\n{markdown_table(metrics)}\n\nwrote {out}/metrics.json")
    return metrics


def fewshot_table(result: dict, metric: str) -> str:
    """shots | demos | metric % mean ± std | per trial, one row per k."""
    lines = [f"| shots | demos | {metric} % (mean ± std) | trials |", "|---|---|---|---|"]
    for k, r in result["shots"].items():
        trials = ", ".join(f"{v:.1f}" for v in r["trials"])
        mode = "-" if int(k) == 0 else result["demos"]
        lines.append(f"| {k} | {mode} | {r['mean']:.1f} ± {r['std']:.1f} | {trials} |")
    return "\n".join(lines)


def evaluate_fewshot(model, processor: Processor, questions: list[Question], pool: list[Question], *, task: Task,
                     shots, demos: str, trials: int, seed: int, out_dir: str | Path, limit: int | None = None,
                     rices_cache: str | Path | None = None, info: dict | None = None, **kwargs) -> dict:
    """`vlm.eval.fewshot.run_fewshot` with `evaluate` per (k, trial), each into `out_dir/<k>shot_<demos>_t<trial>`;
    writes `out_dir/fewshot.json` and prints the table. kwargs: `evaluate`'s (batch_size, num_workers, ...)."""
    questions = list(questions)[:limit] if limit else list(questions)

    def nearest(k: int) -> list[list[Question]]:
        from vlm.feature_cache import encoder_key

        device = next(model.parameters()).device.type
        index = Rices.load_or_build(model, pool, rices_cache, encoder_key(model.cfg.vision, model.vision, device))
        query = pooled_features(model, [q.image for q in questions])  # (N, Dv), decoded a batch at a time
        return index.find(query, k)

    def evaluate_one(k: int, mode: str, trial: int, demos_of) -> dict:
        sub = Path(out_dir) / (f"{k}shot" if k == 0 else f"{k}shot_{mode}_t{trial}")
        return evaluate(model, processor, questions, task=task, out_dir=sub, demos_of=demos_of, verbose=False,
                        info={**(info or {}), "shots": k, "demos": mode, "trial": trial}, **kwargs)

    result = run_fewshot(evaluate_one, questions, pool, shots=shots, demos=demos, trials=trials, seed=seed,
                         nearest=nearest)
    result = {"task": task.name, "metric": task.metric, "n": len(questions), **(info or {}), **result}
    rank, _ = rank_world(env=False)
    if rank == 0:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "fewshot.json").write_text(json.dumps(result, indent=2, default=str))
        print(f"\n{task.name}, {len(questions)} questions, demonstrations from a pool of {len(pool)}:\n"
              f"{fewshot_table(result, task.metric)}\n\nwrote {out_dir}/fewshot.json")
    return result


def write_attention_maps(model, questions: list[Question], task: Task, out_dir: str | Path) -> list[Path]:
    """`vlm.explain`'s map of each question's scored prediction (predictions.jsonl), as attention/<question_id>.png."""
    from vlm.explain import explain, render

    out = Path(out_dir)
    predicted = {}
    with open(out / "predictions.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            predicted[str(row["question_id"])] = row["prediction"]
    paths = []
    for q in questions:
        ex = explain(model, load_image(q.image), build_messages(q, task), detail=task.detail,
                     answer=predicted[str(q.question_id)])
        paths.append(render(ex, out / "attention" / f"{q.question_id}.png", model.cfg.tiling.tile_size))
        print(f"{paths[-1]}: {ex.summary()}")
    return paths


def evaluate_config(cfg, load_model: Callable[[], torch.nn.Module], out_dir: str | Path,
                    info: dict | None = None) -> dict:
    """`python eval.py` (and train.py's eval_after) for an eval config node with the keys of configs/eval.yaml:
    task (a configs/eval/<task>.yaml), data_root, batch_size, limit, num_workers, max_new_tokens. The questions are
    read before load_model() is called, so a wrong folder fails before a model is loaded."""
    task = Task.from_config(cfg.task)
    root = None if cfg.data_root is None else Path(to_absolute_path(cfg.data_root))  # None: the reader's default
    questions = task.read(root)
    where = "the reader's default location" if root is None else root
    print(f"task: {task.name} ({len(questions)} questions under {where})")
    shots = cfg.get("shots")
    pool = None
    if shots is not None:  # few-shot: the demonstration pool is read before the model too
        shots = [shots] if isinstance(shots, int) else list(shots)
        pool = draw_pool(task.read_demos(root), cfg.get("demo_pool"), cfg.get("seed", 0))
        print(f"few-shot: k = {shots}, demos {cfg.demos}, {cfg.trials} trial(s), a pool of {len(pool)}")
    model = load_model()
    processor = Processor(model.cfg, model.tokenizer)
    info = {**(info or {}), "data_root": None if root is None else str(root)}
    common = dict(task=task, batch_size=cfg.batch_size, limit=cfg.limit, out_dir=out_dir, num_workers=cfg.num_workers,
                  max_new_tokens=cfg.max_new_tokens, info=info)
    if shots is None:
        metrics = evaluate(model, processor, questions, **common)
        if cfg.get("explain") and rank_world(env=False)[0] == 0:
            write_attention_maps(model, questions[:cfg.explain], task, out_dir)
        return metrics
    rices_cache = cfg.get("rices_cache")
    return evaluate_fewshot(model, processor, questions, pool, shots=shots, demos=cfg.demos, trials=cfg.trials,
                            seed=cfg.get("seed", 0), rices_cache=None if rices_cache is None
                            else to_absolute_path(rices_cache), **common)
