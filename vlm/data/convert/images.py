"""Image intake for the converters: every image is validated with `vlm.images.load_image`; JPEG / PNG / WEBP keep
their bytes, GIF / BMP / TIFF are re-encoded to PNG; a bad image is a Skip with a reason code."""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from vlm.data.convert.driver import Skip
from vlm.data.format import encode_image
from vlm.images import DEFAULT_MAX_PIXELS, TOO_LARGE, UNDECODABLE, UNSUPPORTED, ImageError, load_image, to_rgb

# Formats whose bytes are kept as they are (first extension = the default one), and formats re-encoded to PNG.
_KEEP = {"JPEG": ("jpg", "jpeg"), "MPO": ("jpg", "jpeg"), "PNG": ("png",), "WEBP": ("webp",)}
_REENCODE = ("GIF", "BMP", "TIFF")


def _decode_other(data: bytes) -> Image.Image:
    """BMP / TIFF (formats `load_image` does not take) -> RGB, with the same pixel limit."""
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > DEFAULT_MAX_PIXELS:
            raise ImageError(f"image too large: {w}x{h} = {w * h} pixels, limit {DEFAULT_MAX_PIXELS}", TOO_LARGE)
        if getattr(img, "n_frames", 1) > 1:
            raise ImageError(f"unsupported image: multi-frame {img.format}", UNSUPPORTED)
        img.load()
        rgb = np.array(to_rgb(img), dtype=np.uint8)
    except ImageError:
        raise
    except MemoryError:
        raise
    except Exception as e:
        raise ImageError(f"could not decode image: {type(e).__name__}: {e}") from e
    return load_image(Image.fromarray(rgb))


def prepare_image(data: bytes, name: str = "") -> tuple[str, bytes]:
    """Validate image file bytes with `load_image`; return (extension, bytes to store).

    JPEG / PNG / WEBP keep their bytes (extension from `name` when it matches the content, else the content's);
    GIF / BMP / TIFF are re-encoded to PNG. Raises ImageError for anything else or anything undecodable."""
    try:
        with Image.open(io.BytesIO(data)) as probe:  # header only
            fmt = probe.format
    except Exception:
        fmt = None
    if fmt in _KEEP:
        load_image(data)
        ext = Path(name).suffix.lower().lstrip(".")
        return (ext if ext in _KEEP[fmt] else _KEEP[fmt][0]), data
    if fmt in _REENCODE:
        img = load_image(data) if fmt == "GIF" else _decode_other(data)
        return "png", encode_image(img, "PNG")
    load_image(data)  # raises ImageError naming the problem
    raise ImageError(f"unsupported image format {fmt!r}", UNSUPPORTED)  # pragma: no cover (load_image refuses first)


SKIP_REASONS = {TOO_LARGE: "image_too_large", UNSUPPORTED: "unsupported_image", UNDECODABLE: "undecodable_image"}


class ImageReader:
    """Reads and validates images under `root` (paths relative to it), caching the last few results: VQA-style
    datasets ask several questions about the same image in a row."""

    def __init__(self, root: str | Path | None, cache_size: int = 16):
        self.root = None if root is None else Path(root)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[str, bytes] | Skip] = OrderedDict()

    def read(self, rel: str) -> tuple[str, bytes]:
        """(extension, bytes) of image `rel`, or raises Skip (missing_image, undecodable_image, ...)."""
        if rel in self._cache:
            self._cache.move_to_end(rel)
            result = self._cache[rel]
        else:
            try:
                result = self._read(rel)
            except Skip as s:
                result = s
            self._cache[rel] = result
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        if isinstance(result, Skip):
            raise Skip(result.reason, result.detail)  # a fresh exception: re-raising one grows its traceback
        return result

    def _read(self, rel: str) -> tuple[str, bytes]:
        if not isinstance(rel, str) or not rel:
            raise Skip("malformed_item", f"image path {rel!r}")
        if self.root is None:
            raise Skip("missing_image", f"{rel}: no image folder given")
        p = Path(rel)
        if p.is_absolute() or ".." in p.parts:
            raise Skip("bad_image_path", f"{rel}: must be relative to the image folder, without '..'")
        path = self.root / p
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise Skip("missing_image", str(path)) from None
        except OSError as e:
            raise Skip("unreadable_image", f"{path}: {e}") from None
        try:
            return prepare_image(data, path.name)
        except ImageError as e:
            raise Skip(SKIP_REASONS[e.reason], f"{path}: {e}") from None
