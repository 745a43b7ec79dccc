"""Every setting of the server (`python -m vlm.serve key=value ...` overrides these)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlm.images import DEFAULT_MAX_PIXELS
from vlm.serve.fetch import MAX_IMAGE_BYTES, FetchConfig


@dataclass
class ServeConfig:
    checkpoint: str | None = None  # None: the untrained tiny default, VLM(model_config())
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "vlm-tiny"
    device: str = "auto"  # auto: cuda if available
    api_key: str | None = None  # None: from $VLM_API_KEY (unset: no authentication)
    # continuous: requests join the running decode between steps and leave it when done (decoder-only LMs; others
    # fall back); static: batches collected for `max_wait_ms`, each decoded to its end before the next starts
    batching: str = "continuous"
    max_batch_size: int = 8  # rows decoded together (n counts)
    max_wait_ms: float = 5.0  # static batching: how long a batch waits to fill
    max_queue: int = 256  # waiting requests; beyond that 429
    default_max_tokens: int = 64
    max_tokens_limit: int = 1024
    max_n: int = 8
    max_images: int = 16  # per request
    max_body_bytes: int = 100 * 1024 * 1024
    allow_hosts: list[str] = field(default_factory=list)  # image hosts that skip the address check
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    fetch_connect_timeout: float = 5.0
    fetch_read_timeout: float = 10.0
    fetch_total_timeout: float = 30.0
    max_redirects: int = 3
    seed: int = 0  # torch seed before building the untrained default model

    def fetch(self) -> FetchConfig:
        """What the image fetcher takes of these settings."""
        return FetchConfig(allow_hosts=tuple(self.allow_hosts), max_bytes=self.max_image_bytes,
                           max_pixels=self.max_pixels, connect_timeout=self.fetch_connect_timeout,
                           read_timeout=self.fetch_read_timeout, total_timeout=self.fetch_total_timeout,
                           max_redirects=self.max_redirects)
