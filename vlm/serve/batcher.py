"""Batching: requests wait in a bounded asyncio queue (full -> 429) and are decoded in one dedicated thread, so the
event loop stays free. Rows are grouped by sampling parameters (greedy together; sampled ones by (temperature, top_p); a
seeded request alone, so its output depends only on its seed).

- continuous (`ServeConfig.batching`, the default for decoder-only LMs): between two decode steps, waiting requests
  join the running decode of their group (their prompt prefilled, images encoded once, then merged in:
  `VLM.start_decode`, `Decode.merge`), up to `max_batch_size` rows in all; a row leaves as soon as it has its EOS or
  its `max_tokens` (`Decode.select`), and its request is answered then, whatever the others still decode.
- static: up to `max_batch_size` rows or `max_wait_ms`, then `VLM.generate` to the longest request's end.

A streaming job gets each decode step's tokens as they are made (`Job.tokens`), so its first chunk leaves after the
first step, not after the batch."""

from __future__ import annotations

import asyncio
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from vlm.processor import collate, to_device
from vlm.serve.config import ServeConfig
from vlm.serve.schema import APIError


@dataclass
class Job:
    sample: dict  # processor output (input_ids, views, plans)
    n: int
    max_tokens: int
    key: tuple  # sampling group
    temperature: float
    top_p: float
    seed: int | None
    future: asyncio.Future
    # streaming: each decode step's tokens of this job's n rows, put here as they are made (from the worker thread)
    tokens: asyncio.Queue | None = None
    loop: asyncio.AbstractEventLoop | None = None


class Batcher:
    """Bounded queue -> batches of compatible jobs -> `VLM.generate` in one worker thread."""

    def __init__(self, model, cfg: ServeConfig, device: torch.device):
        self.model, self.cfg, self.device = model, cfg, device
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=cfg.max_queue)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlm-generate")
        self.task: asyncio.Task | None = None
        self.carry: Job | None = None
        self.batches: list[int] = []  # samples per generate call (for tests / benchmarks), last 1000

    def start(self) -> None:
        continuous = self.cfg.batching == "continuous" and getattr(self.model.lm, "kind", None) == "causal"
        if self.cfg.batching not in ("continuous", "static"):
            raise ValueError(f"batching must be continuous or static, got {self.cfg.batching!r}")
        self.task = asyncio.get_running_loop().create_task(self._continuous() if continuous else self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull as e:
            raise APIError(429, "server overloaded: too many queued requests, retry later", "server_error",
                           code="rate_limit_exceeded") from e

    async def _collect(self) -> list[Job]:
        first = self.carry or await self.queue.get()
        self.carry = None
        jobs, size = [first], first.n
        deadline = time.monotonic() + self.cfg.max_wait_ms / 1000
        while size < self.cfg.max_batch_size:
            try:
                job = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), left)
                except asyncio.TimeoutError:
                    break
            if size + job.n > self.cfg.max_batch_size:
                self.carry = job
                break
            jobs.append(job)
            size += job.n
        return jobs

    async def _continuous(self) -> None:
        await _continuous_loop(self)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [j for j in await self._collect() if not j.future.done()]  # cancelled: client went away
            groups: dict[tuple, list[Job]] = {}
            for j in jobs:
                groups.setdefault(j.key, []).append(j)
            for group in groups.values():
                try:
                    outs = await loop.run_in_executor(self.executor, self._generate, group)
                except Exception as e:  # noqa: BLE001 - reported to the waiting requests
                    for j in group:
                        if not j.future.done():
                            j.future.set_exception(e)
                    continue
                for j, out in zip(group, outs):
                    if not j.future.done():
                        j.future.set_result(out)

    def rows_batch(self, group: list[Job]) -> tuple[dict, torch.Generator | None]:
        """The group's rows (each job's sample n times) as one left-padded batch on the device, and the seeded
        generator when the group is a seeded request."""
        samples = [j.sample for j in group for _ in range(j.n)]
        batch = to_device(collate(samples, pad_token_id=self.model.tokenizer.pad_token_id, padding_side="left"),
                          self.device)
        seed = group[0].seed
        return batch, (torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None)

    def _generate(self, group: list[Job]) -> list[list[list[int]]]:
        """One generate call for the group; returns, per job, n token lists (each cut to its max_tokens)."""
        batch, generator = self.rows_batch(group)
        self.batches = (self.batches + [len(batch["input_ids"])])[-1000:]
        head = group[0]
        streams = [(j, i) for j, i in zip(group, [0, *itertools.accumulate(j.n for j in group)])
                   if j.tokens is not None]

        def on_token(nxt: torch.Tensor) -> None:  # (B,): hand each streaming job its rows' tokens, thread-safely
            step = nxt.tolist()
            for j, i in streams:
                j.loop.call_soon_threadsafe(j.tokens.put_nowait, step[i:i + j.n])

        with torch.inference_mode():
            tokens = self.model.generate(batch, max(j.max_tokens for j in group), do_sample=head.temperature > 0,
                                         temperature=head.temperature, top_p=head.top_p, generator=generator,
                                         on_token=on_token if streams else None)
        rows = tokens.cpu().tolist()
        out, i = [], 0
        for j in group:
            out.append([r[: j.max_tokens] for r in rows[i: i + j.n]])
            i += j.n
        return out


# ----------------------------------------------------------------------------------------------- continuous batching
@dataclass
class _Row:
    job: Job
    tokens: list[int]


@dataclass
class _Running:
    """One sampling group's decode in progress: its rows (in the decode's row order) and their next tokens (R,)."""

    decode: object  # vlm.model.Decode
    rows: list[_Row]
    next: torch.Tensor
    pick: object


def _done(row: _Row, eos: int | None) -> bool:
    return len(row.tokens) >= row.job.max_tokens or (eos is not None and bool(row.tokens) and row.tokens[-1] == eos)


class _Continuous:
    """The continuous loop's steps, run in the batcher's thread (all model calls there, one at a time)."""

    def __init__(self, batcher: Batcher):
        self.b = batcher

    def prefill(self, group: list[Job]) -> _Running:
        b = self.b
        batch, generator = b.rows_batch(group)
        head = group[0]
        pick = b.model.picker(do_sample=head.temperature > 0, temperature=head.temperature, top_p=head.top_p,
                              generator=generator)
        with torch.inference_mode():
            logits, decode = b.model.start_decode(batch)
            first = pick(logits)  # (R,)
        rows = [_Row(j, []) for j in group for _ in range(j.n)]
        return _Running(decode, rows, first, pick)

    def join(self, running: _Running, new: _Running) -> _Running:
        with torch.inference_mode():
            return _Running(running.decode.merge(new.decode), running.rows + new.rows,
                            torch.cat([running.next, new.next]), running.pick)

    def leave(self, running: _Running, keep: list[int]) -> _Running:
        index = torch.tensor(keep, device=running.next.device)
        with torch.inference_mode():
            return _Running(running.decode.select(index), [running.rows[i] for i in keep], running.next[index],
                            running.pick)

    def step(self, running: _Running) -> torch.Tensor:
        with torch.inference_mode():
            return running.pick(self.b.model.decode_step(running.decode, running.next))  # (R,)


async def _continuous_loop(b: Batcher) -> None:
    """Admit waiting requests between steps, one step of every running group, answer the rows that are done."""
    loop, c = asyncio.get_running_loop(), _Continuous(b)
    eos = b.model.tokenizer.eos_token_id
    running: dict[tuple, _Running] = {}
    run = lambda fn, *a: loop.run_in_executor(b.executor, fn, *a)

    def emit(r: _Running) -> None:  # the step's tokens to their rows, to streams, and the finished requests answered
        step = r.next.tolist()
        per_job: dict[int, list[int]] = {}
        for row, t in zip(r.rows, step):
            if not _done(row, eos):
                row.tokens.append(t)
            per_job.setdefault(id(row.job), []).append(row.tokens[-1] if row.tokens else t)
        for row in r.rows:
            j = row.job
            if j.tokens is not None and id(j) in per_job:
                j.tokens.put_nowait(per_job.pop(id(j)))
        for j in {id(row.job): row.job for row in r.rows}.values():
            mine = [row for row in r.rows if row.job is j]
            if not j.future.done() and all(_done(row, eos) for row in mine):
                j.future.set_result([row.tokens for row in mine])

    while True:
        # rows still decoding: finished ones stay in place (their tokens ignored) until their slots are wanted
        rows = sum(not _done(row, eos) and not row.job.future.done() for r in running.values() for row in r.rows)
        new: list[Job] = []
        if not running:  # idle: wait for the first request
            first = b.carry or await b.queue.get()
            b.carry = None
            new.append(first)
            rows += first.n
        # joins in groups: one prefill per group costs about what several decode steps do
        group_min = max(1, b.cfg.max_batch_size // 4) if running else 1
        while rows < b.cfg.max_batch_size and (b.cfg.max_batch_size - rows >= group_min or new):
            job = b.carry or (b.queue.get_nowait() if not b.queue.empty() else None)
            b.carry = None
            if job is None:
                break
            if rows + job.n > b.cfg.max_batch_size and rows:
                b.carry = job
                break
            new.append(job)
            rows += job.n
        groups: dict[tuple, list[Job]] = {}
        for j in new:
            if not j.future.done():  # cancelled while waiting: the client went away
                groups.setdefault(j.key, []).append(j)
        for key, group in groups.items():
            try:
                fresh = await run(c.prefill, group)
            except Exception as e:  # noqa: BLE001 - reported to the waiting requests
                for j in group:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            emit(fresh)
            if key not in running:
                running[key] = fresh
                continue
            try:
                running[key] = await run(c.join, running[key], fresh)
            except NotImplementedError:  # a cache that cannot be merged (sliding windows): decoded beside it
                running[(*key, id(fresh))] = fresh
        for key in list(running):
            r = running[key]
            keep = [i for i, row in enumerate(r.rows) if not _done(row, eos) and not row.job.future.done()]
            # leave only when it pays: every row done, a join just came in, or half the rows are done
            if keep and len(keep) > len(r.rows) // 2 and not groups:
                keep = list(range(len(r.rows)))
            if len(keep) < len(r.rows):
                if not keep:
                    del running[key]
                    continue
                r = running[key] = await run(c.leave, r, keep)
            b.batches = (b.batches + [len(r.rows)])[-1000:]
            try:
                r.next = await run(c.step, r)
            except Exception as e:  # noqa: BLE001
                for row in r.rows:
                    if not row.job.future.done():
                        row.job.future.set_exception(e)
                del running[key]
                continue
            emit(r)
