"""The OpenAI-compatible server, in-process on 127.0.0.1, driven by the official `openai` client."""

from __future__ import annotations

import base64
import io
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from vlm.prompts import generation_prompt  # noqa: E402
from vlm.serve.app import ServeConfig, create_app, load_model  # noqa: E402
from vlm.tiling import plan_tiles, token_budget, visual_tokens  # noqa: E402

TIMEOUT = 60
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ helpers
def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def picture(w: int = 64, h: int = 48, colour=(200, 40, 90)) -> Image.Image:
    img = Image.new("RGB", (w, h), colour)
    img.paste((10, 220, 30), (0, 0, w // 2, h // 2))
    return img


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny valid-looking PNG whose header declares a huge canvas."""
    raw = encode(Image.new("L", (1, 1)), "PNG")
    ihdr = struct.pack(">II", width, height) + raw[24:29]
    chunk = b"IHDR" + ihdr
    return raw[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + raw[33:]


def image_msg(*urls: str, text: str = "What is this?", detail: str | None = None) -> list[dict]:
    parts: list[dict] = [{"type": "text", "text": text}]
    for u in urls:
        parts.append({"type": "image_url", "image_url": {"url": u} | ({"detail": detail} if detail else {})})
    return [{"role": "user", "content": parts}]


def expected_prompt_tokens(model, messages: list[dict], sizes_details: list[tuple[int, int, str]]) -> int:
    """Text tokens from the tokenizer (image markers removed) + visual_tokens(plan) per image."""
    tok, marker = model.tokenizer, model.cfg.lm.image_token
    text, add_bos = generation_prompt(messages, tok, marker)
    text_tokens = sum(len(tok(c, add_special_tokens=False)["input_ids"]) for c in text.split(marker) if c)
    text_tokens += int(add_bos and tok.bos_token_id is not None)
    return text_tokens + sum(visual_tokens(plan_tiles(w, h, d, model.cfg.tiling), model.cfg)
                             for w, h, d in sizes_details)


# ------------------------------------------------------------------------------------------------ servers
class ImageHandler(BaseHTTPRequestHandler):
    routes: dict = {}
    hits: dict = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).hits[self.path] = type(self).hits.get(self.path, 0) + 1
        route = self.routes.get(self.path)
        try:
            if route is None:
                self.send_response(404)
                self.end_headers()
            elif route[0] == "redirect":
                self.send_response(302)
                self.send_header("Location", route[1])
                self.end_headers()
            elif route[0] == "trickle":  # a slow peer: one byte every route[1] seconds, for ever (until cut)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(1 << 20))
                self.end_headers()
                for _ in range(1 << 20):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(route[1])
            elif route[0] == "big":  # no Content-Length: the client must stop reading itself
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                chunk = b"\0" * (1 << 20)
                for _ in range(route[1]):
                    self.wfile.write(chunk)
            else:
                self.send_response(200)
                self.send_header("Content-Type", route[1])
                self.send_header("Content-Length", str(len(route[2])))
                self.end_headers()
                self.wfile.write(route[2])
        except (BrokenPipeError, ConnectionResetError):
            pass


class Served:
    def __init__(self, app):
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def image_server():
    ImageHandler.routes, ImageHandler.hits = {}, {}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd.server_address[1], ImageHandler
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="session")
def model():
    return load_model(ServeConfig())


@pytest.fixture(scope="session")
def served(model, image_server):
    img_port, handler = image_server
    cfg = ServeConfig(allow_hosts=[f"127.0.0.1:{img_port}"], default_max_tokens=8, max_wait_ms=20,
                      fetch_total_timeout=10)
    s = Served(create_app(cfg, model=model))
    handler.routes.update({
        "/cat.png": ("file", "image/png", encode(picture(), "PNG")),
        "/wide.jpg": ("file", "image/jpeg", encode(picture(1024, 700), "JPEG")),
        "/to-private": ("redirect", "http://10.0.0.1/x.png"),
        "/to-api": ("redirect", f"http://127.0.0.1:{s.port}/v1/models"),
        "/loop": ("redirect", "/loop"),
        "/big": ("big", 21),
    })
    s.img = f"http://127.0.0.1:{img_port}"
    s.hits = handler.hits
    yield s
    s.close()


@pytest.fixture(scope="session")
def client(served):
    return openai.OpenAI(base_url=served.url, api_key="unused", timeout=TIMEOUT, max_retries=0)


def chat(client, messages, **kw):
    return client.chat.completions.create(model="vlm-tiny", messages=messages, **kw)


# ------------------------------------------------------------------------------------------------ success
def test_models(client):
    assert [m.id for m in client.models.list().data] == ["vlm-tiny"]


@pytest.mark.parametrize("fmt,mime,kw", [("PNG", "image/png", {}), ("JPEG", "image/jpeg", {"quality": 90}),
                                         ("WEBP", "image/webp", {}), ("GIF", "image/gif", {})])
def test_base64_formats(client, model, fmt, mime, kw):
    msgs = image_msg(data_url(encode(picture(), fmt, **kw), mime))
    r = chat(client, msgs, temperature=0, max_tokens=4)
    assert r.object == "chat.completion" and isinstance(r.choices[0].message.content, str)
    assert r.usage.prompt_tokens == expected_prompt_tokens(model, msgs, [(64, 48, "auto")])
    assert 1 <= r.usage.completion_tokens <= 4


def test_url_images_two_in_one_message_fetched_once(client, model, served):
    before = served.hits.get("/cat.png", 0)
    url = served.img + "/cat.png"
    msgs = image_msg(url, data_url(encode(picture(30, 90), "PNG")), url, text="Compare")
    r = chat(client, msgs, temperature=0, max_tokens=3)
    assert served.hits["/cat.png"] == before + 1  # the same URL twice in a request: fetched once
    assert r.usage.prompt_tokens == expected_prompt_tokens(model, msgs, [(64, 48, "auto"), (30, 90, "auto"),
                                                                          (64, 48, "auto")])


@pytest.mark.parametrize("detail", ["low", "high", "auto"])
def test_detail_token_counts(client, model, served, detail):
    msgs = image_msg(served.img + "/wide.jpg", detail=detail)
    r = chat(client, msgs, temperature=0, max_tokens=2)
    n = expected_prompt_tokens(model, msgs, [(1024, 700, detail)])
    assert r.usage.prompt_tokens == n
    tiles = 0 if detail == "low" else 4  # 1024x700: 2x2 tiles of 512
    assert visual_tokens(plan_tiles(1024, 700, detail, model.cfg.tiling), model.cfg) == 65 + 129 * tiles


def test_images_across_messages_keep_their_place(client, model):
    a, b = data_url(encode(picture(40, 40), "PNG")), data_url(encode(picture(600, 300), "PNG"))
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image_url", "image_url": a}, {"type": "text", "text": "A?"}]},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": [{"type": "text", "text": "And"},
                                         {"type": "image_url", "image_url": {"url": b, "detail": "low"}}]}]
    r = chat(client, msgs, temperature=0, max_tokens=2)
    assert r.usage.prompt_tokens == expected_prompt_tokens(model, msgs, [(40, 40, "auto"), (600, 300, "low")])


def test_stream_matches_non_streaming(client, served):
    msgs = image_msg(data_url(encode(picture(), "PNG")))
    full = chat(client, msgs, temperature=0, max_tokens=16)
    chunks = list(chat(client, msgs, temperature=0, max_tokens=16, stream=True,
                       stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    with httpx.stream("POST", served.url + "/chat/completions", timeout=TIMEOUT,
                      json={"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 3}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"


def test_n_and_stop(client):
    msgs = [{"role": "user", "content": "Say something."}]
    r = chat(client, msgs, temperature=0, max_tokens=16, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    text = r.choices[0].message.content
    assert r.choices[1].message.content == text  # greedy: both choices equal
    visible = [i for i, ch in enumerate(text) if ch.strip() and text.index(ch) == i and i > 0]
    if not visible:
        pytest.skip(f"greedy output {text!r} has no usable stop character")
    stop = text[visible[0]]
    r2 = chat(client, msgs, temperature=0, max_tokens=16, stop=[stop, "\x00never"])
    assert r2.choices[0].message.content == text[: visible[0]]
    assert r2.choices[0].finish_reason == "stop"


def test_seed_determinism(client):
    msgs = [{"role": "user", "content": "Tell me a story."}]
    runs = [chat(client, msgs, temperature=1.0, top_p=0.9, seed=s, max_tokens=12, n=2) for s in (7, 7, 8)]
    texts = [[c.message.content for c in r.choices] for r in runs]
    assert texts[0] == texts[1]


def test_concurrent_requests_are_batched(client, served):
    msgs = [{"role": "user", "content": "Batch me."}]
    single = chat(client, msgs, temperature=0, max_tokens=6).choices[0].message.content
    batcher = served.app.state.batcher
    start = len(batcher.batches)
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda _: chat(client, msgs, temperature=0, max_tokens=6), range(8)))
    assert all(o.choices[0].message.content == single for o in outs)
    assert max(batcher.batches[start:]) > 1


# ------------------------------------------------------------------------------------------------ refusals
def refused(client, messages, status: int, code: str | None = None, **kw):
    with pytest.raises(openai.APIStatusError) as e:
        chat(client, messages, **{"max_tokens": 2, **kw})
    err = e.value.response.json()["error"]
    assert e.value.status_code == status, err
    assert set(err) == {"message", "type", "param", "code"}
    if code is not None:
        assert err["code"] == code, err
    return err


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


@pytest.mark.parametrize("name,url,status,code,words", [
    ("tiff", lambda s: data_url(encode(picture(), "TIFF"), "image/tiff"), 415, "unsupported_image_format", "TIFF"),
    ("svg", lambda s: data_url(b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml"), 415,
     "unsupported_image_format", "SVG"),
    ("animated", lambda s: data_url(animated_gif(), "image/gif"), 415, "unsupported_image_format", "animated"),
    ("too_large", lambda s: "data:image/png;base64," + "A" * (28 * 1024 * 1024), 413, "image_too_large", None),
    ("bomb", lambda s: data_url(png_bomb()), 400, "image_too_many_pixels", "too large"),
    ("truncated", lambda s: data_url(encode(picture(300, 300), "PNG")[:400]), 400, "invalid_image", None),
    ("garbage", lambda s: data_url(b"not an image at all" * 10), 400, "invalid_image", None),
    ("bad_base64", lambda s: "data:image/png;base64,@@@@", 400, "invalid_image_url", None),
    ("private_ip", lambda s: "http://10.0.0.1/x.png", 400, "image_url_forbidden", None),
    ("loopback_not_allowed", lambda s: f"http://127.0.0.1:{s.port}/v1/models", 400, "image_url_forbidden", None),
    ("localhost_name", lambda s: f"http://localhost:{s.port}/x.png", 400, "image_url_forbidden", None),
    ("link_local", lambda s: "http://169.254.169.254/latest/meta-data", 400, "image_url_forbidden", None),
    ("ipv6_loopback", lambda s: "http://[::1]/x.png", 400, "image_url_forbidden", None),
    ("redirect_private", lambda s: s.img + "/to-private", 400, "image_url_forbidden", None),
    ("redirect_api", lambda s: s.img + "/to-api", 400, "image_url_forbidden", None),
    ("redirect_loop", lambda s: s.img + "/loop", 400, "image_fetch_failed", "redirects"),
    ("http_404", lambda s: s.img + "/missing.png", 400, "image_fetch_failed", "404"),
    ("big_download", lambda s: s.img + "/big", 413, "image_too_large", None),
    ("ftp", lambda s: "ftp://example.com/x.png", 400, "invalid_image_url", None),
])
def test_image_refusals(client, served, name, url, status, code, words):
    n_contacted = len(served.app.state.fetcher.contacted)
    err = refused(client, image_msg(url(served)), status, code)
    if words:
        assert words in err["message"], err
    new = served.app.state.fetcher.contacted[n_contacted:]
    assert not any(h.startswith(("10.", "169.254.", "[::1]", "localhost")) or h == f"127.0.0.1:{served.port}"
                   for h in new), new  # refused before any packet was sent
    assert chat(client, [{"role": "user", "content": "still there?"}], max_tokens=1).choices  # keeps answering


def test_full_queue_answers_429_and_the_server_recovers(model):
    """One request generating, a queue of one: the others of a burst are refused with 429 in OpenAI's shape (not
    queued without bound), and once the burst is over a normal request is answered."""
    s = Served(create_app(ServeConfig(max_queue=1, max_batch_size=1, max_wait_ms=0), model=model))
    try:
        c = openai.OpenAI(base_url=s.url, api_key="unused", timeout=TIMEOUT, max_retries=0)
        msgs = [{"role": "user", "content": "Keep talking."}]

        def one(_):
            try:
                return chat(c, msgs, max_tokens=96, temperature=0).choices[0].message.content
            except openai.APIStatusError as e:
                return e

        with ThreadPoolExecutor(12) as pool:
            outs = list(pool.map(one, range(12)))
        refused = [o for o in outs if isinstance(o, openai.APIStatusError)]
        assert refused and len(refused) < 12, outs
        for e in refused:
            err = e.response.json()["error"]
            assert e.status_code == 429 and err["code"] == "rate_limit_exceeded"
            assert set(err) == {"message", "type", "param", "code"}
        assert s.app.state.batcher.queue.qsize() == 0
        assert chat(c, msgs, max_tokens=2).choices[0].message.content is not None
    finally:
        s.close()


def test_a_trickling_image_host_is_cut_at_the_total_timeout_while_others_are_served(model, image_server):
    img_port, handler = image_server
    handler.routes["/trickle.png"] = ("trickle", 0.05)  # each byte well within the read timeout
    cfg = ServeConfig(allow_hosts=[f"127.0.0.1:{img_port}"], fetch_read_timeout=5, fetch_total_timeout=2)
    s = Served(create_app(cfg, model=model))
    try:
        c = openai.OpenAI(base_url=s.url, api_key="unused", timeout=TIMEOUT, max_retries=0)
        slow_msgs = image_msg(f"http://127.0.0.1:{img_port}/trickle.png")
        with ThreadPoolExecutor(1) as pool:
            start = time.monotonic()
            slow = pool.submit(lambda: refused(c, slow_msgs, 400, "image_fetch_failed"))
            time.sleep(0.3)
            fast = chat(c, [{"role": "user", "content": "hi"}], max_tokens=2)  # served while the fetch trickles
            fast_done = time.monotonic() - start
            err = slow.result(timeout=30)
            slow_done = time.monotonic() - start
        assert fast.choices[0].message.content is not None and fast_done < slow_done
        assert "timed out" in err["message"] and 1.5 < slow_done < 10
        assert chat(c, [{"role": "user", "content": "hi"}], max_tokens=2).choices[0].message.content is not None
    finally:
        s.close()


def test_request_refusals(client):
    img = data_url(encode(picture(), "PNG"))
    sys_img = [{"role": "system", "content": [{"type": "image_url", "image_url": img}]},
               {"role": "user", "content": "hi"}]
    refused(client, sys_img, 400, "invalid_content")
    refused(client, image_msg(img, detail="medium"), 422, "validation_error")
    refused(client, [{"role": "tool", "content": "x"}], 422, "validation_error")
    refused(client, [], 422, "validation_error")
    refused(client, [{"role": "user", "content": "x"}], 422, "validation_error", temperature=5)
    refused(client, [{"role": "user", "content": "an <image> marker"}], 400, "invalid_content")
    refused(client, [{"role": "user", "content": "x"}], 400, "invalid_value", max_tokens=10**6)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    asked = {"tools": [tool], "response_format": {"type": "json_object"}, "logprobs": True,
             "extra_body": {"functions": [tool["function"]]}}
    for field, value in asked.items():  # a feature we do not have: 400 naming it (GPT-4V refused tools too)
        err = refused(client, [{"role": "user", "content": "x"}], 400, "unsupported_parameter", **{field: value})
        name = field if field != "extra_body" else "functions"
        assert err["param"] == name and repr(name) in err["message"]
    # the values that mean "not used" pass, and the server answers a normal request after each refusal
    ok = chat(client, [{"role": "user", "content": "x"}], max_tokens=2, logprobs=False,
              response_format={"type": "text"}, tool_choice="none")
    assert ok.choices[0].message.content is not None
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    r = httpx.post(str(client.base_url) + "chat/completions", content=b"{not json", timeout=TIMEOUT,
                   headers={"content-type": "application/json"})
    assert r.status_code == 422 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_api_key(model):
    s = Served(create_app(ServeConfig(api_key="s3cret", default_max_tokens=2), model=model))
    try:
        msgs = [{"role": "user", "content": "hi"}]
        for key in ("wrong", ""):
            bad = openai.OpenAI(base_url=s.url, api_key=key or "x", timeout=TIMEOUT, max_retries=0)
            with pytest.raises(openai.AuthenticationError) as e:
                chat(bad, msgs)
            assert e.value.response.json()["error"]["code"] == "invalid_api_key"
        r = httpx.get(s.url + "/models", timeout=TIMEOUT)  # no Authorization header at all
        assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        good = openai.OpenAI(base_url=s.url, api_key="s3cret", timeout=TIMEOUT, max_retries=0)
        assert chat(good, msgs).choices
    finally:
        s.close()


@pytest.mark.slow
def test_real_pair_text_only_answers_paris():
    """The real frozen pair behind the server (untrained: closed gates, so SmolLM2 itself): a text-only question at
    temperature 0 through the official client gets SmolLM2's answer."""
    from vlm.compose import model_config
    from vlm.model import VLM

    s = Served(create_app(ServeConfig(default_max_tokens=16), model=VLM(model_config(model="pair")).eval()))
    try:
        client = openai.OpenAI(base_url=s.url, api_key="unused", timeout=TIMEOUT, max_retries=0)
        out = client.chat.completions.create(model="vlm-tiny", temperature=0, max_tokens=16, messages=[
            {"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in out.choices[0].message.content
    finally:
        s.close()


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("VLM_DEFAULT_RUN"),
                    reason="VLM_DEFAULT_RUN=<the checkpoint.pt of a default run> (make demo writes one) not set")
def test_default_run_behind_the_server_answers_paris_and_the_corner_words(tmp_path):
    """`python -m vlm.serve checkpoint=<the default run>` and the official client: a text-only question at temperature
    0 gets SmolLM2's Paris (text before any image is the frozen LLM exactly), and each corner of a fresh synthetic
    image (a corpus seed no split uses) is read back. Needs a trained run, so opt-in: VLM_DEFAULT_RUN."""
    import numpy as np

    from vlm.data.synthetic import POSITIONS, QUESTIONS, CorpusParams, render_scene

    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        corpus = compose("train").data.corpus
    image, scene = render_scene(CorpusParams(**corpus, seed=987_654), np.random.default_rng(987_654))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "vlm.serve", f"checkpoint={os.environ['VLM_DEFAULT_RUN']}",
                             f"port={port}"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=TIMEOUT,
                               max_retries=0)
        deadline = time.monotonic() + 180
        while True:
            try:
                name = client.models.list().data[0].id
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
                time.sleep(0.5)
        ask = lambda content: client.chat.completions.create(model=name, temperature=0, max_tokens=16, messages=[
            {"role": "user", "content": content}]).choices[0].message.content
        assert "Paris" in ask("What is the capital of France?")
        read = {pos: ask([{"type": "image_url", "image_url": {"url": url, "detail": "high"}},
                          {"type": "text", "text": QUESTIONS["text"].format(position=pos)}]).strip().rstrip(".")
                for pos in POSITIONS}
        assert read == {pos: scene.texts[pos][0] for pos in POSITIONS}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


CORPUS = ["+data.corpus.n_train=8", "+data.corpus.n_val=0", "+data.corpus.n_test=4", "+data.corpus.shard_size=4"]


def trained_and_evaluated(tmp_path, *overrides: str) -> tuple[Path, list[dict]]:
    """train.py for 3 steps on a tiny corpus (experiment=tiny_random without stage 0, plus `overrides`), then eval.py
    on its checkpoint: the run folder and eval's predictions on the 4 test questions."""
    import json

    corpus = [f"data.root={tmp_path}/synthetic", *CORPUS]
    run = tmp_path / "run"
    train = subprocess.run([sys.executable, "train.py", *corpus, "experiment=tiny_random", "vision_pretrain=null",
                            *overrides, "trainer.max_steps=3", "data.batch_size=2", "data.num_workers=0",
                            "logger=none", f"hydra.run.dir={run}"], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    ev = subprocess.run([sys.executable, "eval.py", *corpus, f"checkpoint={run}/checkpoint.pt", "batch_size=3",
                         "max_new_tokens=6", f"hydra.run.dir={tmp_path}/eval"], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    predicted = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(predicted) == 4
    assert any(r["prediction"] for r in predicted)  # answers to compare (an untrained tiny LLM: bytes)
    return run, predicted


def assert_served_as_evaluated(model, tmp_path, predicted: list[dict]) -> None:
    """Every test question, asked through the official client as eval asks it, gets eval's prediction."""
    from vlm.eval.runner import build_messages
    from vlm.eval.tasks import load_task

    task = load_task("synthetic", data_root=str(tmp_path / "synthetic"))
    questions = task.read(tmp_path / "synthetic")
    s = Served(create_app(ServeConfig(default_max_tokens=6), model=model))
    try:
        client = openai.OpenAI(base_url=s.url, api_key="unused", timeout=TIMEOUT, max_retries=0)
        for q, row in zip(questions, predicted):
            messages = build_messages(q, task)
            image = "data:image/jpeg;base64," + base64.b64encode(Path(q.image).read_bytes()).decode()
            messages[-1]["content"][0]["image_url"]["url"] = image
            out = client.chat.completions.create(model="vlm-tiny", temperature=0, max_tokens=6, messages=messages)
            assert row["question_id"] == q.question_id
            assert out.choices[0].message.content.strip() == row["prediction"]
    finally:
        s.close()


@pytest.mark.slow
def test_served_lora_checkpoint_answers_as_eval_scores_it(tmp_path):
    """train.py with LoRA on a frozen LLM (loaded from its folder) -> checkpoint.pt holding the adapters and the
    trained parts, no LLM base weight -> eval.py's predictions on the synthetic test split; the same checkpoint behind
    the server (adapters merged, as in eval.py) answers every question, asked through the official client as eval
    asks it, exactly as eval.py predicted."""
    import torch
    from _tiny import LORA, saved_tiny_lm

    run, predicted = trained_and_evaluated(tmp_path, *saved_tiny_lm(tmp_path / "lm"), LORA)
    assert all(r["prediction"] for r in predicted)
    saved = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)["state_dict"]
    lm_keys = [k for k in saved if k.startswith("lm.")]
    assert lm_keys and all(".lora_" in k for k in lm_keys)
    assert any(k.startswith("fusion.") for k in saved)
    model = load_model(ServeConfig(checkpoint=str(run / "checkpoint.pt")))
    assert model.lm.adapters() and all(m.merged for m in model.lm.adapters())
    assert_served_as_evaluated(model, tmp_path, predicted)


@pytest.mark.slow
def test_served_t5_checkpoint_answers_as_eval_scores_it(tmp_path):
    """The encoder-decoder path end to end: train.py with the tiny T5 (BLIP-2's prefix LM), eval.py on its checkpoint,
    and the server answering every question as eval predicted it."""
    # a random T5 at its init scale only echoes its decoder start token (a special token: empty answers); louder
    # layers make its answers bytes that can be compared
    run, predicted = trained_and_evaluated(tmp_path, "model/lm=tiny_t5", "model/fusion=prefix",
                                           "++model.lm.hf_config.initializer_factor=4.0")
    model = load_model(ServeConfig(checkpoint=str(run / "checkpoint.pt")))
    assert model.lm.kind == "seq2seq"
    assert_served_as_evaluated(model, tmp_path, predicted)


def video_msg(frames: list[str], text: str = "Which came first?") -> list[dict]:
    """Our request extension: a group of frames that is one video."""
    return [{"role": "user", "content": [{"type": "video", "video": {"frames": frames}},
                                         {"type": "text", "text": text}]}]


def test_video_request(client, model, served):
    """A video part: its frames fetched, one media item of one low-detail view per frame (usage counts 65 each);
    too many frames, none, or an animated GIF as a frame: a 4xx in OpenAI's shape, and the server keeps answering."""
    frames = [data_url(encode(picture(64, 48, (40 * i, 90, 200)), "PNG")) for i in range(3)]
    msgs = video_msg([frames[0], served.img + "/cat.png", frames[2]])
    r = chat(client, msgs, temperature=0, max_tokens=2)
    assert r.usage.prompt_tokens == expected_prompt_tokens(model, msgs, []) + 3 * token_budget(model.cfg).global_view
    limit = model.cfg.video.max_frames
    err = refused(client, video_msg(frames[:1] * (limit + 1)), 400, "too_many_frames")
    assert err["param"] == "messages.0.content.0.video.frames" and str(limit) in err["message"]
    refused(client, video_msg([]), 422, "validation_error")
    refused(client, video_msg([frames[0], data_url(animated_gif(), "image/gif")]), 415, "unsupported_image_format")
    assert chat(client, [{"role": "user", "content": "still there?"}], max_tokens=1).choices


def test_video_file_request(client, model):
    """A video file by data URL (our extension): sampled into `num_frames` low views; a file that does not decode is a
    400 naming the part, `frames` and `url` together a 422, too many frames a 400."""
    from _tiny import mp4

    clip = data_url(mp4(20), "video/mp4")
    msgs = [{"role": "user", "content": [{"type": "video", "video": {"url": clip, "num_frames": 3}},
                                         {"type": "text", "text": "Which came first?"}]}]
    r = chat(client, msgs, temperature=0, max_tokens=2)
    assert r.usage.prompt_tokens == expected_prompt_tokens(model, msgs, []) + 3 * token_budget(model.cfg).global_view
    bad = [{"role": "user", "content": [{"type": "video", "video": {"url": data_url(b"junk" * 99, "video/mp4")}}]}]
    err = refused(client, bad, 400, "invalid_image")
    assert err["param"] == "messages.0.content.0.video.url" and "video" in err["message"]
    both = [{"role": "user", "content": [{"type": "video", "video": {"url": clip, "frames": [clip]}}]}]
    refused(client, both, 422, "validation_error")
    many = [{"role": "user", "content": [{"type": "video", "video": {"url": clip, "num_frames": 99}}]}]
    refused(client, many, 400, "too_many_frames")
    assert chat(client, [{"role": "user", "content": "still there?"}], max_tokens=1).choices


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("VLM_VIDEO_RUN"),
                    reason="VLM_VIDEO_RUN=<the checkpoint.pt of a `train.py experiment=video` run> not set")
def test_trained_video_run_answers_order_questions_about_fresh_clips():
    """A served video checkpoint, fresh synthetic clips (a seed no split uses) sent as frames through the official
    client: which way the shape moved, and which word came first, both need the frames' order."""
    import numpy as np

    from vlm.data.convert.synthetic_video import VIDEO_QUESTIONS, render_clip

    model = load_model(ServeConfig(checkpoint=os.environ["VLM_VIDEO_RUN"]))
    s = Served(create_app(ServeConfig(default_max_tokens=8), model=model))
    right, asked = Counter(), Counter()
    try:
        client = openai.OpenAI(base_url=s.url, api_key="unused", timeout=TIMEOUT, max_retries=0)
        for seed in range(987_654, 987_662):
            frames, answers = render_clip(np.random.default_rng(seed))
            urls = [data_url(encode(f, "JPEG"), "image/jpeg") for f in frames]
            for kind in ("motion", "first"):
                out = chat(client, video_msg(urls, VIDEO_QUESTIONS[kind]), temperature=0, max_tokens=8)
                right[kind] += out.choices[0].message.content.strip().rstrip(".").lower() == answers[kind].lower()
                asked[kind] += 1
    finally:
        s.close()
    print({k: f"{right[k]}/{asked[k]}" for k in asked})
    assert right["motion"] >= 7 and right["first"] >= 6  # chance: 4 / 8 and 2 / 8


def slow_endless_model(monkeypatch) -> tuple:
    """The tiny default whose every decode step takes >= 50 ms once `slow["on"]` is set, and which never stops early
    (its EOS is the image marker, never generated): rows run to their max_tokens. Returns (model, slow)."""
    import vlm.model

    model = load_model(ServeConfig())  # the tiny default, its own seed
    model.tokenizer.eos_token = model.cfg.lm.image_token
    slow, real = {"on": False}, vlm.model.sample_next

    def slow_sample_next(*args, **kwargs):
        if slow["on"]:
            time.sleep(0.05)
        return real(*args, **kwargs)

    monkeypatch.setattr(vlm.model, "sample_next", slow_sample_next)
    return model, slow


def test_stream_sends_tokens_as_they_are_generated(monkeypatch):
    """True streaming: with each decode step slowed to 50 ms and no EOS possible (its EOS is the image marker, which
    is never generated), 40 tokens take > 2 s, and the first content chunk arrives after a few steps, long before the
    last; the streamed text still equals the non-streaming answer (greedy)."""
    model, slow = slow_endless_model(monkeypatch)
    s = Served(create_app(ServeConfig(default_max_tokens=40), model=model))
    try:
        c = openai.OpenAI(base_url=s.url, api_key="unused", timeout=TIMEOUT, max_retries=0)
        msgs = [{"role": "user", "content": "Tell me a long story."}]
        full = chat(c, msgs, temperature=0, max_tokens=40).choices[0].message.content
        slow["on"] = True
        start, first, text = time.monotonic(), None, ""
        for chunk in chat(c, msgs, temperature=0, max_tokens=40, stream=True):
            piece = chunk.choices[0].delta.content if chunk.choices else None
            if piece and first is None:
                first = time.monotonic() - start
            text += piece or ""
        total = time.monotonic() - start
    finally:
        s.close()
    assert text == full and total > 2.0
    assert first is not None and first < total / 2, (first, total)


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_a_short_request_joins_a_running_decode_and_leaves_early(monkeypatch, batching):
    """Continuous batching: a 3-token request sent while a 60-token one decodes (50 ms a step) joins it between steps
    and is answered after its own 3 steps, long before the other ends, with the tokens it gets alone; static
    batching makes it wait for the running batch first (the comparison)."""
    model, slow = slow_endless_model(monkeypatch)
    s = Served(create_app(ServeConfig(batching=batching, max_wait_ms=0), model=model))
    try:
        c = openai.OpenAI(base_url=s.url, api_key="unused", timeout=TIMEOUT, max_retries=0)
        short_msgs = [{"role": "user", "content": "Short, please."}]
        alone = chat(c, short_msgs, temperature=0, max_tokens=3).choices[0].message.content
        slow["on"] = True
        with ThreadPoolExecutor(2) as pool:
            start = time.monotonic()
            long = pool.submit(lambda: (chat(c, [{"role": "user", "content": "A long story."}], temperature=0,
                                             max_tokens=60), time.monotonic() - start))
            time.sleep(0.5)  # the long one is decoding
            sent = time.monotonic()
            short = chat(c, short_msgs, temperature=0, max_tokens=3)
            short_latency, short_done = time.monotonic() - sent, time.monotonic() - start
            long_out, long_done = long.result(timeout=60)
    finally:
        s.close()
    assert short.choices[0].message.content == alone and long_out.usage.completion_tokens == 60
    if batching == "continuous":
        assert short_latency < 1.0 and short_done < long_done - 1.0, (short_latency, short_done, long_done)
        assert max(s.app.state.batcher.batches) >= 2  # the two decoded together
    else:
        assert short_done > long_done - 0.5, (short_done, long_done)  # it waited for the long batch
