"""Serving throughput: N concurrent streaming clients against the tiny default model on 127.0.0.1, continuous
batching against static batching (both at max_batch_size=B, in the same run), and no batching (B=1). Reports
requests/s, time to first token (the first content chunk), p50 / p95 latency and the process's RSS.

    .venv/bin/python benchmarks/serve.py [--clients 64] [--requests 256] [--batch 16] [--max-tokens 4,16,64]

Each request: one small data-URL PNG (detail=low) plus a short question, greedy decoding, streamed; its max_tokens
cycles through --max-tokens (mixed lengths), and the model's EOS is set to a token it never generates, so every
request decodes exactly its max_tokens. The request count and the wall time (--time-limit per configuration) are
both bounded. Uses the official AsyncOpenAI client.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import resource
import statistics
import threading
import time

import openai
import uvicorn
from PIL import Image

from vlm.serve.app import ServeConfig, create_app, load_model


def start(app) -> tuple[uvicorn.Server, threading.Thread, int]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    return server, thread, server.servers[0].sockets[0].getsockname()[1]


async def drive(port: int, clients: int, requests: int, max_tokens: list[int], time_limit: float) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), (120, 30, 200)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "What colour is this?"},
                                             {"type": "image_url", "image_url": {"url": url, "detail": "low"}}]}]
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", timeout=120,
                                max_retries=0)
    await client.chat.completions.create(model="vlm-tiny", messages=messages, max_tokens=max_tokens[0],
                                         temperature=0)  # warm-up
    latencies: list[float] = []
    first_tokens: list[float] = []
    errors = 0
    todo = iter(range(requests))
    stop_at = time.monotonic() + time_limit

    async def worker():
        nonlocal errors
        for i in todo:
            if time.monotonic() > stop_at:
                return
            t, first = time.perf_counter(), None
            try:
                stream = await client.chat.completions.create(model="vlm-tiny", messages=messages, temperature=0,
                                                              max_tokens=max_tokens[i % len(max_tokens)], stream=True)
                async for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - t
                latencies.append(time.perf_counter() - t)
                first_tokens.append(first if first is not None else latencies[-1])
            except openai.APIError:
                errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    lat = sorted(latencies)
    q = statistics.quantiles(lat, n=20) if len(lat) >= 2 else lat * 19
    return {"done": len(lat), "errors": errors, "wall_s": wall, "rps": len(lat) / wall,
            "ttft_ms": 1000 * statistics.median(first_tokens), "p50_ms": 1000 * statistics.median(lat),
            "p95_ms": 1000 * q[18]}


def rss_mb() -> float:
    """Resident memory of this process (server and clients share it) from /proc, in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-tokens", default="4,16,64", help="comma-separated: request i gets the (i mod k)-th")
    ap.add_argument("--time-limit", type=float, default=120.0)
    args = ap.parse_args()
    lengths = [int(n) for n in args.max_tokens.split(",")]
    model = load_model(ServeConfig())
    model.tokenizer.eos_token = model.cfg.lm.image_token  # never generated: each request decodes its max_tokens
    print(f"{args.clients} streaming clients, {args.requests} requests, max_tokens cycling {lengths}; "
          f"RSS after loading the model {rss_mb():.0f} MB\n")
    print("| batching | max_batch_size | ok | errors | wall s | req/s | TTFT p50 ms | p50 ms | p95 ms | mean rows | "
          "RSS MB (peak) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    results = {}
    for batching, batch in (("continuous", args.batch), ("static", args.batch), ("static", 1)):
        app = create_app(ServeConfig(batching=batching, max_batch_size=batch, max_wait_ms=5,
                                     max_queue=4 * args.clients), model=model)
        server, thread, port = start(app)
        try:
            r = asyncio.run(drive(port, args.clients, args.requests, lengths, args.time_limit))
            sizes = app.state.batcher.batches
            mean_batch = sum(sizes) / max(len(sizes), 1)
        finally:
            server.should_exit = True
            thread.join(timeout=30)
        results[(batching, batch)] = r
        print(f"| {batching} | {batch} | {r['done']} | {r['errors']} | {r['wall_s']:.1f} | {r['rps']:.2f} | "
              f"{r['ttft_ms']:.0f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {mean_batch:.1f} | "
              f"{rss_mb():.0f} ({peak_rss_mb():.0f}) |")
    cont, stat = results[("continuous", args.batch)], results[("static", args.batch)]
    print(f"\ncontinuous / static at max_batch_size={args.batch}: req/s x{cont['rps'] / stat['rps']:.2f}, "
          f"TTFT x{stat['ttft_ms'] / cont['ttft_ms']:.2f} faster, p95 x{stat['p95_ms'] / cont['p95_ms']:.2f} lower")


if __name__ == "__main__":
    main()
