"""Safe image intake for the server: data URLs and http(s) URLs -> checked RGB images, or `FetchError`.

Status codes (OpenAI error shape, see `vlm.serve.app`):
  400  malformed data URL / base64, unsupported scheme, refused address, HTTP error from the origin, too many
       redirects, timeouts, truncated or corrupt image data, and images over the *pixel* limit (a decompression
       bomb is a small payload declaring a huge canvas: the request is bad, not too large; code
       "image_too_many_pixels").
  413  more than `max_bytes` (20 MB) of encoded image: checked on the base64 length before decoding, on the
       declared Content-Length, and while streaming the download (aborted as soon as it passes the limit).
  415  a format we do not accept (TIFF, SVG, animated GIF, ...), named in the message.

Address safety: only http and https; every hop's host is resolved and *all* its addresses must be global
unicast (no loopback, private, link-local, multicast, reserved, shared or unspecified addresses, IPv4-mapped
IPv6 included) before anything is sent, and the request then goes to the checked address (Host header and TLS
SNI keep the name), so DNS rebinding between the check and the connect does not help. Redirects are followed
by hand (at most `max_redirects`), each re-checked. Hosts in `allow_hosts` ("host" or "host:port") skip the
address check (tests serve images from 127.0.0.1 this way). Proxies from the environment are ignored.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from PIL import Image

from vlm.images import (
    DEFAULT_MAX_PIXELS,
    TOO_LARGE,
    UNDECODABLE,
    UNSUPPORTED,
    ImageError,
    Video,
    load_image,
    load_video,
)

MAX_IMAGE_BYTES = 20 * 1024 * 1024


class FetchError(Exception):
    """An image the server refuses: `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


# ImageError.reason -> (status, code): an unsupported format is 415; a decompression bomb (a small payload declaring a
# huge canvas) is a bad request, not a too-large one; anything undecodable is a bad request
_IMAGE_ERRORS = {UNSUPPORTED: (415, "unsupported_image_format"), TOO_LARGE: (400, "image_too_many_pixels"),
                 UNDECODABLE: (400, "invalid_image")}


def classify_image_error(e: ImageError) -> FetchError:
    status, code = _IMAGE_ERRORS[e.reason]
    return FetchError(status, str(e), code)


def decode_data_url(url: str, max_bytes: int = MAX_IMAGE_BYTES, media: str = "image") -> bytes:
    """`data:<media>/<type>;base64,<payload>` -> bytes. The payload's length is checked before decoding."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise FetchError(400, "malformed data URL: no ',' separator", "invalid_image_url")
    params = header[len("data:"):].split(";")
    if "base64" not in [p.strip().lower() for p in params[1:]]:
        raise FetchError(400, "data URLs must be base64 encoded (data:image/...;base64,...)", "invalid_image_url")
    if not params[0].strip().lower().startswith(f"{media}/"):
        raise FetchError(400, f"data URL media type must be {media}/*, got {params[0]!r}", "invalid_image_url")
    if len(payload) > 4 * ((max_bytes + 2) // 3) + 4:  # before decoding: base64 is 4 chars per 3 bytes
        raise FetchError(413, f"image larger than {max_bytes} bytes", "image_too_large")
    try:
        data = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise FetchError(400, f"invalid base64 in data URL: {e}", "invalid_image_url") from e
    if len(data) > max_bytes:
        raise FetchError(413, f"image larger than {max_bytes} bytes", "image_too_large")
    return data


def address_allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Global unicast only."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_private or ip.is_loopback or ip.is_link_local
                                 or ip.is_reserved or ip.is_unspecified)


@dataclass
class FetchConfig:
    allow_hosts: tuple[str, ...] = ()
    max_bytes: int = MAX_IMAGE_BYTES
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    total_timeout: float = 30.0
    max_redirects: int = 3


class ImageFetcher:
    """Turns image URLs into checked images. One shared `httpx.AsyncClient` (no redirects, no env proxies)."""

    def __init__(self, cfg: FetchConfig | None = None):
        import httpx

        self.cfg = cfg or FetchConfig()
        self.allow = {h.lower() for h in self.cfg.allow_hosts}
        timeout = httpx.Timeout(connect=self.cfg.connect_timeout, read=self.cfg.read_timeout,
                                write=self.cfg.read_timeout, pool=self.cfg.connect_timeout)
        self.client = httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=timeout)
        self.contacted: list[str] = []  # hosts (as connected to) a request was actually sent to; for tests

    async def aclose(self) -> None:
        await self.client.aclose()

    async def load(self, url: str) -> Image.Image:
        """Bytes from the URL, then `vlm.images.load_image` in a worker thread."""
        data = await self.fetch_bytes(url)
        try:
            return await asyncio.to_thread(load_image, data, max_pixels=self.cfg.max_pixels)
        except ImageError as e:
            raise classify_image_error(e) from e

    async def load_video(self, url: str, frames: int, fps: float | None) -> Video:
        """A video file's bytes from the URL, then `vlm.images.load_video` (uniform sampling) in a worker thread."""
        data = await self.fetch_bytes(url, media="video")
        try:
            return await asyncio.to_thread(load_video, data, frames=frames, fps=fps, max_pixels=self.cfg.max_pixels)
        except ImageError as e:
            raise classify_image_error(e) from e

    async def fetch_bytes(self, url: str, media: str = "image") -> bytes:
        if not isinstance(url, str) or not url:
            raise FetchError(400, "image_url must be a non-empty string", "invalid_image_url")
        if url[:5].lower() == "data:":
            return decode_data_url(url, self.cfg.max_bytes, media)
        try:
            return await asyncio.wait_for(self._fetch_http(url), self.cfg.total_timeout)
        except asyncio.TimeoutError as e:
            raise FetchError(400, f"timed out fetching image after {self.cfg.total_timeout} s",
                             "image_fetch_failed") from e

    async def _pinned(self, url: str) -> tuple[str, dict, dict]:
        """Check one hop; returns (url to request, headers, extensions). Non-allowlisted hosts are pinned to
        the checked address."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise FetchError(400, f"unsupported image URL scheme {parts.scheme!r}: use https, http or data",
                             "invalid_image_url")
        try:
            host, port = parts.hostname, parts.port or (443 if scheme == "https" else 80)
        except ValueError as e:
            raise FetchError(400, f"malformed image URL: {e}", "invalid_image_url") from e
        if not host:
            raise FetchError(400, "image URL has no host", "invalid_image_url")
        if parts.username or parts.password:
            raise FetchError(400, "image URLs with credentials are not accepted", "invalid_image_url")
        if host in self.allow or f"{host}:{port}" in self.allow:
            return url, {}, {}
        try:
            infos = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                res = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(
                    host, port, type=socket.SOCK_STREAM), self.cfg.connect_timeout)
            except (OSError, asyncio.TimeoutError) as e:
                raise FetchError(400, f"could not resolve image host {host!r}", "image_fetch_failed") from e
            infos = [ipaddress.ip_address(r[4][0].split("%")[0]) for r in res]
        if not infos or not all(address_allowed(ip) for ip in infos):
            bad = next((ip for ip in infos if not address_allowed(ip)), None)
            raise FetchError(400, f"image URL host {host!r} resolves to a non-public address ({bad}); refused",
                             "image_url_forbidden")
        ip = infos[0]
        literal = f"[{ip}]" if ip.version == 6 else str(ip)
        netloc = literal if parts.port is None else f"{literal}:{parts.port}"
        pinned = parts._replace(netloc=netloc).geturl()
        host_header = host if parts.port is None else f"{host}:{parts.port}"
        ext = {"sni_hostname": host} if scheme == "https" else {}
        return pinned, {"Host": host_header}, ext

    async def _fetch_http(self, url: str) -> bytes:
        import httpx

        max_bytes = self.cfg.max_bytes
        for _ in range(self.cfg.max_redirects + 1):
            target, headers, ext = await self._pinned(url)
            self.contacted.append(urlsplit(target).netloc)
            try:
                headers = {**headers, "Accept-Encoding": "identity"}
                req = self.client.build_request("GET", target, headers=headers, extensions=ext)
                resp = await self.client.send(req, stream=True)
                try:
                    if resp.is_redirect:
                        loc = resp.headers.get("location")
                        if not loc:
                            raise FetchError(400, "redirect without a Location header", "image_fetch_failed")
                        url = urljoin(url, loc)
                        continue
                    if resp.status_code != 200:
                        raise FetchError(400, f"fetching the image returned HTTP {resp.status_code}",
                                         "image_fetch_failed")
                    declared = resp.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > max_bytes:
                        raise FetchError(413, f"image larger than {max_bytes} bytes", "image_too_large")
                    buf = bytearray()
                    async for chunk in resp.aiter_raw():  # raw: a gzip bomb is not inflated
                        buf += chunk
                        if len(buf) > max_bytes:
                            raise FetchError(413, f"image larger than {max_bytes} bytes", "image_too_large")
                    return bytes(buf)
                finally:
                    await resp.aclose()
            except httpx.TimeoutException as e:
                raise FetchError(400, f"timed out fetching image: {type(e).__name__}", "image_fetch_failed") from e
            except httpx.HTTPError as e:
                raise FetchError(400, f"could not fetch image: {type(e).__name__}: {e}",
                                 "image_fetch_failed") from e
        raise FetchError(400, f"too many redirects (more than {self.cfg.max_redirects})", "image_fetch_failed")
