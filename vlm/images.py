"""Image intake shared by every entry point (training data, eval, server): bytes / path / PIL image in,
a fresh RGB image with no metadata out, or `ImageError` (a ValueError) saying why not.

Accepted: PNG, JPEG (including MPO, the multi-picture JPEG many cameras write: its primary image is used),
WEBP and GIF, all non-animated. The pixel count is checked against `max_pixels` from the header, before any
pixel data is decoded. EXIF orientation is applied, alpha is composited over white, 16-bit grey is scaled
(not clipped) to 8 bits, and the result is rebuilt from pixel data alone (no EXIF, ICC profile, text chunks).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# 64 megapixels (8000 x 8000): above any real photo or scan we train on, about 200 MB as RGB. PIL's own
# guard (`Image.MAX_IMAGE_PIXELS`, ~89 MP warning / ~179 MP error) stays in force above it.
DEFAULT_MAX_PIXELS = 64_000_000
ACCEPTED = "PNG, JPEG, WEBP, GIF (non-animated)"
_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "MPO": "JPEG", "WEBP": "WEBP", "GIF": "GIF"}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
WHITE = (255, 255, 255)


UNSUPPORTED, TOO_LARGE, UNDECODABLE = "unsupported", "too_large", "undecodable"  # ImageError.reason


class ImageError(ValueError):
    """The input is not an image we accept. `reason` says why, for callers to act on (never the message text):
    UNSUPPORTED (a format we do not take, or animated), TOO_LARGE (over the pixel limit), UNDECODABLE."""

    def __init__(self, message: str, reason: str = UNDECODABLE):
        super().__init__(message)
        self.reason = reason


def _sniff(data: bytes) -> str | None:
    """Name formats PIL cannot identify, for a clearer refusal."""
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<"):
        if b"<svg" in head:
            return "SVG"
        return "HTML" if b"<html" in head or b"<!doctype html" in head else "XML"
    if head.startswith(b"%pdf"):
        return "PDF"
    if data[4:8] == b"ftyp":
        return "HEIF/" + data[8:12].decode("ascii", "replace").strip()
    return None


def _open(data: bytes, max_pixels: int | None) -> Image.Image:
    with warnings.catch_warnings():
        # max_pixels=None leaves PIL's guard in charge, so its warning is an error; otherwise ours is.
        warnings.simplefilter("error" if max_pixels is None else "ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data))  # reads the header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(f"image too large: {e}", TOO_LARGE) from e
        except UnidentifiedImageError as e:
            fmt = _sniff(data)
            if fmt is not None:
                raise ImageError(f"unsupported image format {fmt!r}; accepted: {ACCEPTED}", UNSUPPORTED) from e
            raise ImageError(f"could not decode image: {e}") from e
        except MemoryError:
            raise
        except Exception as e:  # any parser failure is bad input
            raise ImageError(f"could not decode image: {type(e).__name__}: {e}") from e


def _check_and_decode(img: Image.Image, max_pixels: int | None) -> Image.Image:
    """Format, animation and size checks from the header, then decode the first frame's pixels."""
    if img.format is not None:  # None: an image built in memory, nothing to check
        if img.format not in _FORMATS:
            raise ImageError(f"unsupported image format {img.format!r}; accepted: {ACCEPTED}", UNSUPPORTED)
        if img.format != "MPO" and getattr(img, "is_animated", False):
            raise ImageError(f"unsupported image: animated {img.format}; accepted: {ACCEPTED}", UNSUPPORTED)
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(f"image too large: {w}x{h} = {w * h} pixels, limit {max_pixels}", TOO_LARGE)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        warnings.warn("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on: truncated images will not be refused",
                      stacklevel=3)
    try:
        if img.format == "MPO":
            img.seek(0)
        img.load()
    except MemoryError:
        raise
    except Exception as e:  # truncated / corrupt data
        raise ImageError(f"could not decode image: {type(e).__name__}: {e}") from e
    return img


def _draft(img: Image.Image, draft) -> None:
    """Ask libjpeg for a reduced decode that still covers what `draft` needs (sizes in upright orientation)."""
    try:
        turned = img.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientations that swap width and height
    except Exception:
        turned = False
    w, h = img.size
    need_w, need_h = draft(h, w) if turned else draft(w, h)
    if turned:
        need_w, need_h = need_h, need_w
    img.draft(img.mode, (need_w, need_h))


def _exif_transpose(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not lose a good image
        return img


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    out = Image.new("RGB", rgba.size, WHITE)
    out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return out


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Alpha (and palette / tRNS transparency) is composited over white; 16-bit grey is
    scaled x*255/65535 rounded (mode "I" is read as 16-bit, clipped to 0..65535); CMYK, 1-bit, L, YCbCr...
    use PIL's conversion."""
    mode = img.mode
    if mode in _ALPHA_MODES:
        return _composite_on_white(img.convert("RGBA"))
    if "transparency" in img.info and mode in ("P", "L", "RGB", "1"):
        return _composite_on_white(img.convert("RGBA"))
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT_MODES:
        x = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        grey = ((x + 128) // 257).astype(np.uint8)  # round(x / 257) == round(x * 255 / 65535)
        return Image.fromarray(grey).convert("RGB")
    return img.convert("RGB")


def load_image(source: bytes | str | os.PathLike | Image.Image, *,
               max_pixels: int | None = DEFAULT_MAX_PIXELS, draft=None) -> Image.Image:
    """Open, check and normalise one image. Returns a new RGB image with empty `info`.

    `draft(width, height) -> (min_width, min_height)`: given the upright size, the smallest size the caller
    needs; JPEGs are then decoded at the largest 1/2, 1/4 or 1/8 scale that still covers it (much faster than
    decoding in full and shrinking afterwards).

    Raises ImageError for an unsupported format (named), an animated image, more than `max_pixels` pixels
    (None: only PIL's own limit), or data that does not decode (including truncated files). A missing path
    raises the usual OSError."""
    if isinstance(source, Image.Image):
        img = source
    else:
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
        elif isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                data = f.read()
        else:
            raise TypeError(f"load_image takes bytes, a path or a PIL image, not {type(source).__name__}")
        img = _open(data, max_pixels)
        if draft is not None and img.format == "JPEG":
            _draft(img, draft)
    img = _check_and_decode(img, max_pixels)
    rgb = to_rgb(_exif_transpose(img))
    out = rgb.copy() if rgb is source else rgb  # never hand back (or mutate) the caller's own image
    out.info = {}  # pixels only: no EXIF, ICC profile or comments travel on
    return out


class Video:
    """A video as its frames, in order: RGB images (each through `load_image`). Frames are what GPT-4V's guidance
    sends for video, and what the model sees (`vlm.tiling.tile_video`); a video file is decoded and sampled into
    frames before it gets here (`sample_frames`)."""

    def __init__(self, frames):
        self.frames = [f if isinstance(f, Image.Image) and f.mode == "RGB" else load_image(f) for f in frames]
        if not self.frames:
            raise ImageError("a video needs at least one frame, got none", UNDECODABLE)

    def __len__(self) -> int:
        return len(self.frames)

    def __repr__(self) -> str:
        return f"Video({len(self.frames)} frames, {self.frames[0].width}x{self.frames[0].height})"


def sample_frames(n_total: int, frames: int) -> list[int]:
    """Uniform sampling: the indices of `frames` frames spread evenly over `n_total` (each segment's middle frame,
    as Flamingo / torchvision's uniform clip samplers), all of them when there are no more than `frames`."""
    if n_total <= frames:
        return list(range(n_total))
    return [int((i + 0.5) * n_total / frames) for i in range(frames)]


def load_media(source, **kwargs) -> Image.Image | Video:
    """`load_image(source)`, or a `Video` of a list of frames (each through `load_image`)."""
    if isinstance(source, (list, tuple)):
        return Video([load_image(f, **kwargs) for f in source])
    return load_image(source, **kwargs)



def load_video(source: bytes | str | os.PathLike, *, frames: int | None = 8, fps: float | None = None,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Video:
    """A video file (any container and codec FFmpeg decodes, through PyAV) -> a `Video` of uniformly sampled frames:
    `frames` frames spread evenly over the clip (`sample_frames`), or with `fps` one frame every 1 / fps seconds
    (then `frames` caps their number). `ImageError`: UNDECODABLE when the bytes are not a video FFmpeg can decode
    (or it has no frames), TOO_LARGE when one frame has more than `max_pixels` pixels."""
    import av

    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise ImageError("not a video: the file has no video stream", UNDECODABLE)
            if container.format.name == "image2" or container.format.name.endswith("_pipe"):  # FFmpeg's still images
                raise ImageError(f"not a video but a still image ({container.format.name}): send it as an image",
                                 UNDECODABLE)
            stream = container.streams.video[0]
            if max_pixels is not None and stream.width * stream.height > max_pixels:
                raise ImageError(f"video frames of {stream.width}x{stream.height} px exceed {max_pixels} pixels",
                                 TOO_LARGE)
            decoded = [(f.time, f.to_image()) for f in container.decode(stream)]  # (seconds, RGB) in order
    except av.FFmpegError as e:
        raise ImageError(f"video does not decode: {e}", UNDECODABLE) from e
    if not decoded:
        raise ImageError("video does not decode: no frames", UNDECODABLE)
    if fps is not None:
        start, picked, next_t = decoded[0][0] or 0.0, [], 0.0
        for i, (t, _) in enumerate(decoded):
            if (t or 0.0) - start >= next_t - 1e-6:
                picked.append(i)
                next_t += 1.0 / fps
        if frames is not None and len(picked) > frames:
            picked = [picked[j] for j in sample_frames(len(picked), frames)]
    else:
        picked = sample_frames(len(decoded), frames or len(decoded))
    return Video([decoded[i][1].convert("RGB") for i in picked])
