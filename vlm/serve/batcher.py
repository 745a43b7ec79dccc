"""Dynamic batching: requests wait in a bounded asyncio queue (full -> 429); one worker collects up to `max_batch_size`
samples (n counts) or waits `max_wait_ms`, groups them by sampling parameters (greedy together; sampled ones by
(temperature, top_p); a seeded request runs alone so its output depends only on its seed), and runs `VLM.generate`
on a left-padded batch in a dedicated thread so the event loop stays free. A streaming job gets each decode step's
tokens as they are made (`Job.tokens`), so its first chunk leaves after the first step, not after the batch."""

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
        self.task = asyncio.get_running_loop().create_task(self._loop())

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

    def _generate(self, group: list[Job]) -> list[list[list[int]]]:
        """One generate call for the group; returns, per job, n token lists (each cut to its max_tokens)."""
        samples = [j.sample for j in group for _ in range(j.n)]
        self.batches = (self.batches + [len(samples)])[-1000:]
        batch = collate(samples, pad_token_id=self.model.tokenizer.pad_token_id, padding_side="left")
        batch = to_device(batch, self.device)
        head = group[0]
        generator = None
        if head.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(head.seed)
        streams = [(j, i) for j, i in zip(group, [0, *itertools.accumulate(j.n for j in group)]) if j.tokens]

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
