"""One chat completion, from a validated request to the response body or its stream of chunks.

Token accounting: `usage.prompt_tokens` is the real prompt length as the model sees it: text tokens plus, for every
image, its visual tokens (`vlm.tiling.token_budget`: 65 for the global view + 129 per tile with the default
resamplers). With xattn fusion the text holds one `<image>` marker per image and the visual tokens enter through
cross-attention; the marker is not counted, its image's visual tokens are. `completion_tokens` counts the generated
tokens, EOS included when the model emitted it (also when a stop string cut the text).

Streaming (`stream=true`) sends chat.completion.chunk events as the tokens are generated (each decode step's tokens
reach the request through `Job.tokens`), then each choice's finish_reason and `data: [DONE]`. Everything that can
be refused (the request, its images, the context length, a full queue) is checked before the stream starts, so
those errors keep their status codes; a failure during generation is sent as an `error` event in the stream.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi.responses import StreamingResponse
from starlette.datastructures import State

from vlm.images import Video
from vlm.prompts import generation_prompt
from vlm.serve.batcher import Job
from vlm.serve.fetch import FetchError, ImageFetcher
from vlm.serve.schema import APIError, ChatRequest, TextPart, VideoPart


def check_request(state: State, req: ChatRequest) -> tuple[int, list[str]]:
    """The request's limits against the server's: (max_tokens, stop strings), or APIError."""
    cfg = state.cfg
    if req.model is not None and req.model != cfg.model_name:
        raise APIError(404, f"the model {req.model!r} does not exist; this server serves {cfg.model_name!r}",
                       param="model", code="model_not_found")
    max_tokens = req.max_completion_tokens or req.max_tokens or cfg.default_max_tokens
    if max_tokens > cfg.max_tokens_limit:
        raise APIError(400, f"max_tokens {max_tokens} is above this server's limit {cfg.max_tokens_limit}",
                       param="max_tokens", code="invalid_value")
    if req.n > cfg.max_n:
        raise APIError(400, f"n must be at most {cfg.max_n}", param="n", code="invalid_value")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop takes at most 4 non-empty strings", param="stop", code="invalid_value")
    return max_tokens, stops


async def load_images(state: State, req: ChatRequest):
    """(images, details) in order of appearance, a video part as one `Video` of its frames; each distinct URL fetched
    once. GPT-4V's rules: images in user messages only (not the first system message), at most `max_images` (a video's
    frames count), no image marker in the text; a video has at most the model's `video.max_frames` frames."""
    marker = state.processor.image_token
    refs = []  # (url, detail, param)
    videos = []  # (index of its first frame in refs, frames)
    files = []  # (where it goes in refs, url, frames, fps, param): video files
    first_system = next((i for i, m in enumerate(req.messages) if m.role in ("system", "developer")), None)
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str) and marker in m.content:
            raise APIError(400, f"message text must not contain the image marker {marker!r}",
                           param=f"messages.{i}.content", code="invalid_content")
        for k, part in enumerate(m.content if isinstance(m.content, list) else []):
            if isinstance(part, TextPart):
                if marker in part.text:
                    raise APIError(400, f"message text must not contain the image marker {marker!r}",
                                   param=f"messages.{i}.content.{k}.text", code="invalid_content")
                continue
            if i == first_system:
                raise APIError(400, "images are not allowed in the system message",
                               param=f"messages.{i}.content.{k}", code="invalid_content")
            if isinstance(part, VideoPart):
                v, limit = part.video, state.processor.cfg.video.max_frames
                if v.url is not None:  # a video file, sampled after fetching
                    if v.num_frames > limit:
                        raise APIError(400, f"num_frames {v.num_frames}: this model takes at most {limit}",
                                       param=f"messages.{i}.content.{k}.video.num_frames", code="too_many_frames")
                    files.append((len(refs), v.url, v.num_frames, v.fps, f"messages.{i}.content.{k}.video.url"))
                    continue
                frames = v.frames
                if len(frames) > limit:
                    raise APIError(400, f"a video of {len(frames)} frames; this model takes at most {limit}: send "
                                   f"fewer frames", param=f"messages.{i}.content.{k}.video.frames",
                                   code="too_many_frames")
                videos.append((len(refs), len(frames)))
                refs += [(f if isinstance(f, str) else f.url, "low", f"messages.{i}.content.{k}.video.frames.{j}")
                         for j, f in enumerate(frames)]
                continue
            iu = part.image_url
            url, detail = (iu, "auto") if isinstance(iu, str) else (iu.url, iu.detail)
            refs.append((url, detail, f"messages.{i}.content.{k}.image_url"))
    if len(refs) > state.cfg.max_images:
        raise APIError(400, f"too many images: {len(refs)} > {state.cfg.max_images}", param="messages",
                       code="too_many_images")
    fetcher: ImageFetcher = state.fetcher
    tasks: dict[str, asyncio.Task] = {}
    for url, _, _ in refs:
        if url not in tasks:
            tasks[url] = asyncio.ensure_future(fetcher.load(url))
    clips = [asyncio.ensure_future(fetcher.load_video(url, n, fps)) for _, url, n, fps, _ in files]
    try:
        for (_, _, _, _, param), clip in zip(files, clips):
            try:
                await clip
            except FetchError as e:
                e.param = e.param or param
                raise
        await asyncio.gather(*tasks.values())
    except FetchError as e:
        for t in [*tasks.values(), *clips]:
            t.cancel()
        bad = next((p for u, _, p in refs if tasks[u].done() and not tasks[u].cancelled()
                    and tasks[u].exception() is e), None)
        e.param = e.param or bad
        raise
    images, details = [tasks[u].result() for u, _, _ in refs], [d for _, d, _ in refs]
    for start, n in reversed(videos):  # each video's frames -> one media item
        images[start:start + n], details[start:start + n] = [Video(images[start:start + n])], ["low"]
    for (where, *_), clip in reversed(list(zip(files, clips))):  # files, from the back (their `where` ascend)
        at = where - sum(n - 1 for start, n in videos if start < where)  # frame groups before it are one item now
        images.insert(at, clip.result())
        details.insert(at, "low")
    return images, details


def encode(state: State, req: ChatRequest, images, details) -> tuple[dict, int]:
    """The model's input for the request and its prompt tokens (text + every image's visual tokens)."""
    proc = state.processor
    msgs = [{"role": "system" if m.role == "developer" else m.role,
             "content": m.content if not isinstance(m.content, list) else [p.model_dump() for p in m.content]}
            for m in req.messages]
    text, add_bos = generation_prompt(msgs, proc.tokenizer, proc.image_token)
    sample = proc.encode(text, images, details, add_bos=add_bos)
    plans = sample["plans"]
    text_tokens = len(sample["input_ids"]) - sum(proc.placeholders(p) for p in plans)
    return sample, text_tokens + sum(proc.budget.image(p) for p in plans)


def sampling_group(req: ChatRequest) -> tuple:
    """Requests with the same key share a generate call: greedy together, sampled by (temperature, top_p); a seeded
    request alone (its samples depend only on its seed)."""
    if req.temperature == 0:
        return ("greedy",)
    if req.seed is not None:
        return ("seeded", uuid.uuid4().hex)
    return ("sample", req.temperature, req.top_p)


async def complete(state: State, req: ChatRequest):
    """The response body (a dict) or, with `stream`, the StreamingResponse of its chunks."""
    max_tokens, stops = check_request(state, req)
    images, details = await load_images(state, req)
    sample, prompt_tokens = await asyncio.to_thread(encode, state, req, images, details)
    if state.max_positions and len(sample["input_ids"]) + max_tokens > state.max_positions:
        raise APIError(400, f"prompt ({len(sample['input_ids'])} tokens) plus max_tokens ({max_tokens}) exceeds "
                       f"the model's context of {state.max_positions}", param="messages",
                       code="context_length_exceeded")
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    job = Job(sample, req.n, max_tokens, sampling_group(req), req.temperature, req.top_p, req.seed, fut,
              tokens=asyncio.Queue() if req.stream else None, loop=loop)
    state.batcher.submit(job)  # a full queue answers 429 here, before any byte of a stream
    tok = state.processor.tokenizer
    cid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.cfg.model_name
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = live_events(tok, job, stops, prompt_tokens, cid, created, name, include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        rows = await fut
    except asyncio.CancelledError:
        fut.cancel()
        raise
    choices = [finish(tok, r, stops) for r in rows]
    return {"id": cid, "object": "chat.completion", "created": created, "model": name, "system_fingerprint": None,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": reason} for i, (text, reason, _, _) in enumerate(choices)],
            "usage": _usage(prompt_tokens, choices)}


def _usage(prompt_tokens: int, choices) -> dict:
    completion_tokens = sum(c[2] for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish(tok, row: list[int], stops: list[str]) -> tuple[str, str, int, list[int]]:
    """Generated ids -> (text, finish_reason, completion_tokens, content ids)."""
    eos_id = tok.eos_token_id
    ids, reason = row, "length"
    if eos_id is not None and eos_id in row:
        ids, reason = row[: row.index(eos_id)], "stop"
    n_tokens = len(ids) + (reason == "stop")
    text = tok.decode(ids, skip_special_tokens=True)
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        text, reason = text[:cut], "stop"
    return text, reason, n_tokens, ids


def stream_piece(tok, ids: list[int], sent: str, stops: list[str]) -> tuple[str, bool]:
    """(the text to send now, whether the choice has ended at a stop string) for a choice whose content tokens so far
    are `ids` and whose text `sent` has gone out: never past a stop string, never an incomplete UTF-8 character,
    never a tail that may still grow into a stop string (it waits for the next token)."""
    text = tok.decode(ids, skip_special_tokens=True)
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        text = text[:cut]
        return (text[len(sent):] if text.startswith(sent) else ""), True
    if text.endswith("\ufffd"):
        return "", False
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    safe = text[:len(text) - hold]
    return (safe[len(sent):] if safe.startswith(sent) else ""), False


async def live_events(tok, job: Job, stops: list[str], prompt_tokens: int, cid: str, created: int,
                      model_name: str, include_usage: bool):
    """Server-sent chunks as the tokens are generated: a role chunk per choice, then each step's text pieces, then
    (when the batch's generation has ended) the rest of the text `finish` gives the non-streaming response, each
    choice's finish_reason, the usage if asked, `data: [DONE]`. The streamed text equals the non-streaming content."""
    def event(choice_list, extra=None):
        chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                 "system_fingerprint": None, "choices": choice_list, **(extra or {})}
        return f"data: {json.dumps(chunk)}\n\n"

    def delta(i: int, piece: str):
        return event([{"index": i, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}])

    n, eos = job.n, tok.eos_token_id
    ids, sent, ended = [[] for _ in range(n)], [""] * n, [False] * n
    try:
        for i in range(n):
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        while not job.future.done():
            step = asyncio.ensure_future(job.tokens.get())
            await asyncio.wait({step, job.future}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                break
            for i, t in enumerate(step.result()):
                if ended[i]:
                    continue
                if t == eos or len(ids[i]) >= job.max_tokens:
                    ended[i] = True
                    continue
                ids[i].append(t)
                piece, ended[i] = stream_piece(tok, ids[i], sent[i], stops)
                if piece:
                    sent[i] += piece
                    yield delta(i, piece)
        try:
            rows = await job.future
        except Exception as e:  # noqa: BLE001 - the status line is gone: the error goes in the stream, as OpenAI's
            error = {"message": str(e), "type": "server_error", "param": None, "code": None}
            yield f"data: {json.dumps({'error': error})}\n\n"
            yield "data: [DONE]\n\n"
            return
    except asyncio.CancelledError:  # the client went away: its rows are not wanted
        job.future.cancel()
        raise
    choices = [finish(tok, r, stops) for r in rows]
    for i, (text, reason, _, _) in enumerate(choices):
        if text.startswith(sent[i]) and len(text) > len(sent[i]):
            yield delta(i, text[len(sent[i]):])
        yield event([{"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}])
    if include_usage:
        yield event([], {"usage": _usage(prompt_tokens, choices)})
    yield "data: [DONE]\n\n"
