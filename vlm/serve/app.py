"""OpenAI-compatible chat completions over a `VLM`: `POST /v1/chat/completions`, `GET /v1/models`.

Stateless; images come inline (data URLs) or by http(s) URL (`vlm.serve.fetch`). Every error, including schema
validation (422), answers in OpenAI's shape {"error": {"message", "type", "param", "code"}} (`vlm.serve.schema`).
The parts: settings `config.py`, request schema `schema.py`, one completion `chat.py`, dynamic batching
`batcher.py`, image intake `fetch.py`; this module builds the app: the model and what the routes share live on
`app.state` (cfg, model, processor, fetcher, batcher), and the routes and handlers are plain module functions.
"""

from __future__ import annotations

import os
import secrets
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlm.processor import Processor
from vlm.serve.batcher import Batcher
from vlm.serve.chat import complete
from vlm.serve.config import ServeConfig
from vlm.serve.fetch import FetchError, ImageFetcher
from vlm.serve.schema import APIError, ChatRequest, error_response, unsupported_fields

__all__ = ["ServeConfig", "create_app", "load_model"]


def load_model(cfg: ServeConfig):
    """The checkpoint's model (`vlm.checkpoint.load_checkpoint`), or the untrained tiny default."""
    if cfg.checkpoint:
        from vlm.checkpoint import load_checkpoint

        model = load_checkpoint(cfg.checkpoint, inference=True)
    else:
        from vlm.compose import model_config
        from vlm.model import VLM

        torch.manual_seed(cfg.seed)
        model = VLM(model_config())
    return model.eval()


# ------------------------------------------------------------------------------------------------------ routes
async def list_models(request: Request):
    name = request.app.state.cfg.model_name
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "vlm"}]}


async def chat_completions(request: Request, req: ChatRequest):
    unsupported = unsupported_fields(req)
    if unsupported:
        raise APIError(400, f"unsupported parameter{'s' if len(unsupported) > 1 else ''} "
                            f"{', '.join(repr(f) for f in unsupported)}: this server does not implement "
                            f"{'them' if len(unsupported) > 1 else 'it'}", param=unsupported[0],
                       code="unsupported_parameter")
    return await complete(request.app.state, req)


# ------------------------------------------------------------------------------------------- errors and guard
async def on_api_error(request: Request, e: APIError):
    return error_response(e.status, e.message, e.type, e.param, e.code)


async def on_fetch_error(request: Request, e: FetchError):
    return error_response(e.status, e.message, "invalid_request_error", e.param, e.code)


async def on_validation_error(request: Request, e: RequestValidationError):
    errs = e.errors()
    first = errs[0] if errs else {}
    param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
    msg = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', ()))}: {er.get('msg')}" for er in errs[:5])
    return error_response(422, msg or "invalid request", "invalid_request_error", param, "validation_error")


async def on_http_error(request: Request, e: StarletteHTTPException):
    return error_response(e.status_code, str(e.detail), "invalid_request_error", None, None)


async def on_internal_error(request: Request, e: Exception):
    return error_response(500, f"internal error: {type(e).__name__}", "server_error", None, None)


async def guard(request: Request, call_next):
    """The API key (when one is set) and the body size limit, before anything is parsed."""
    state = request.app.state
    if request.url.path.startswith("/v1/"):
        if state.api_key is not None:
            auth = request.headers.get("authorization", "")
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), state.api_key.encode()):
                return error_response(401, "missing or invalid API key (Authorization: Bearer <key>)",
                                      "invalid_request_error", None, "invalid_api_key")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > state.cfg.max_body_bytes:
            return error_response(413, f"request body larger than {state.cfg.max_body_bytes} bytes",
                                  "invalid_request_error", None, "request_too_large")
    return await call_next(request)


@asynccontextmanager
async def lifespan(app: FastAPI):
    state = app.state
    state.fetcher = ImageFetcher(state.cfg.fetch())
    state.batcher = Batcher(state.model, state.cfg, state.device)
    state.batcher.start()
    try:
        yield
    finally:
        await state.batcher.stop()
        await state.fetcher.aclose()


# --------------------------------------------------------------------------------------------------------- app
def create_app(cfg: ServeConfig | None = None, model=None) -> FastAPI:
    """The app for `cfg`, serving `model` (default: `load_model(cfg)`)."""
    cfg = cfg or ServeConfig()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    model = (model if model is not None else load_model(cfg)).to(device).eval()
    app = FastAPI(title="vlm", lifespan=lifespan)
    state = app.state
    state.cfg, state.model, state.device = cfg, model, device
    state.processor = Processor(model.cfg, model.tokenizer)
    state.api_key = cfg.api_key if cfg.api_key is not None else os.environ.get("VLM_API_KEY") or None
    state.max_positions = getattr(model.lm.model.config.get_text_config(), "max_position_embeddings", None)
    for error, handler in ((APIError, on_api_error), (FetchError, on_fetch_error),
                           (RequestValidationError, on_validation_error), (StarletteHTTPException, on_http_error),
                           (Exception, on_internal_error)):
        app.add_exception_handler(error, handler)
    app.middleware("http")(guard)
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    return app
