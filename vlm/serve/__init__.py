"""OpenAI-compatible inference server: `python -m vlm.serve [checkpoint=...] [host=...] [port=...] ...`.

See `vlm.serve.app` (endpoints, batching, token accounting) and `vlm.serve.fetch` (safe image intake).
Needs the `serve` extra (fastapi, uvicorn, httpx); no Lightning.
"""

from vlm.serve.app import create_app
from vlm.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]
