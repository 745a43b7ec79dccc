import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, PngImagePlugin

from vlm.images import DEFAULT_MAX_PIXELS, TOO_LARGE, UNDECODABLE, UNSUPPORTED, ImageError, load_image, to_rgb


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _gradient(w: int = 64, h: int = 48) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.uint8)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1))


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _bilevel_png(w: int, h: int) -> bytes:
    """A real, valid 1-bit PNG of w x h black pixels: all-zero scanlines compress to almost nothing."""
    raw = zlib.compress(bytes((1 + (w + 7) // 8) * h), 9)
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)  # 1-bit greyscale
    chunks = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", raw) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_accepted_formats(fmt):
    src = _gradient()
    out = load_image(_encode(src, fmt))
    assert out.mode == "RGB" and out.size == (64, 48)
    if fmt == "PNG":
        assert np.array_equal(np.array(out), np.array(src))
    elif fmt != "GIF":  # GIF quantises to a palette
        assert np.abs(np.array(out).astype(int) - np.array(src)).mean() < 8


def test_path_and_pil_sources(tmp_path):
    src = _gradient()
    path = tmp_path / "x.png"
    src.save(path)
    assert np.array_equal(np.array(load_image(path)), np.array(src))
    assert np.array_equal(np.array(load_image(str(path))), np.array(src))
    assert np.array_equal(np.array(load_image(src)), np.array(src))
    with pytest.raises(ImageError, match="unsupported image format 'BMP'"):
        load_image(Image.open(io.BytesIO(_encode(src, "BMP"))))
    with pytest.raises(TypeError):
        load_image(123)


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation(orientation):
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :40] = (255, 0, 0)  # left half red
    arr[:, 40:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = load_image(_encode(Image.fromarray(arr), "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (40, 80)  # width and height swapped
    px = np.array(out).astype(int)
    top, bottom = px[10, 20], px[70, 20]
    # 6: rotate 90 clockwise, the stored left edge ends on top; 8: counter-clockwise, it ends at the bottom
    red, blue = (top, bottom) if orientation == 6 else (bottom, top)
    assert red[0] > 200 and red[2] < 50
    assert blue[2] > 200 and blue[0] < 50
    assert "exif" not in out.info


def test_no_metadata():
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "secret")
    icc = b"\x00" * 128  # contents do not matter: it must simply not survive
    out = load_image(_encode(_gradient(), "PNG", pnginfo=info, icc_profile=icc))
    assert out.info == {}
    exif = Image.Exif()
    exif[0x010F] = "Camera maker"
    exif[0x0112] = 1
    out = load_image(_encode(_gradient(), "JPEG", exif=exif.tobytes(), icc_profile=icc))
    assert out.info == {}
    assert len(out.getexif()) == 0


def test_rgba_transparent_becomes_white():
    arr = np.zeros((2, 3, 4), np.uint8)
    arr[0, 0] = (10, 20, 30, 0)  # fully transparent
    arr[0, 1] = (10, 20, 30, 255)  # opaque
    arr[0, 2] = (0, 0, 0, 128)  # half: black over white -> ~127
    out = np.array(load_image(_encode(Image.fromarray(arr, "RGBA"), "PNG")))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [10, 20, 30]
    assert np.all(np.abs(out[0, 2].astype(int) - 127) <= 1)
    assert out[1, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency(fmt):
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    out = np.array(load_image(_encode(img, fmt, transparency=0)))
    assert out[0, 0].tolist() == [255, 255, 255]  # transparent red -> white
    assert out[0, 1].tolist() == [0, 0, 255]


def test_palette_without_transparency():
    img = Image.new("P", (1, 1))
    img.putpalette([0, 200, 0] + [0] * 765)
    assert np.array(load_image(_encode(img, "PNG")))[0, 0].tolist() == [0, 200, 0]


def test_grey_modes():
    grey = Image.fromarray(np.array([[0, 100, 255]], np.uint8))
    assert np.array(load_image(_encode(grey, "PNG")))[0].tolist() == [[0] * 3, [100] * 3, [255] * 3]
    la = Image.fromarray(np.array([[[0, 0], [0, 255], [200, 255]]], np.uint8), "LA")
    assert np.array(load_image(_encode(la, "PNG")))[0].tolist() == [[255] * 3, [0] * 3, [200] * 3]
    bilevel = Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1")
    assert np.array(load_image(_encode(bilevel, "PNG")))[0].tolist() == [[0] * 3, [255] * 3]


def test_sixteen_bit_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 65535, 1000]], np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    out = np.array(load_image(_encode(img, "PNG")))
    assert out.dtype == np.uint8 and out.shape == (1, 5, 3)
    assert out[0, :, 0].tolist() == [0, 1, 128, 255, 4]
    as_int32 = Image.fromarray(values.astype(np.int32))  # mode "I"
    assert as_int32.mode == "I"
    assert np.array(to_rgb(as_int32))[0, :, 0].tolist() == [0, 1, 128, 255, 4]


def test_cmyk_jpeg():
    img = Image.new("CMYK", (8, 8), (0, 0, 0, 0))  # no ink: white
    img.paste((255, 0, 0, 0), (0, 0, 4, 8))  # full cyan on the left
    out = np.array(load_image(_encode(img, "JPEG", quality=95))).astype(int)
    assert np.all(np.abs(out[4, 6] - 255) < 10)
    assert out[4, 1, 0] < 20 and out[4, 1, 1] > 235 and out[4, 1, 2] > 235


def test_to_rgb_passthrough():
    img = _gradient()
    assert to_rgb(img) is img


@pytest.mark.parametrize("fmt", ["TIFF", "BMP"])
def test_refused_formats(fmt):
    expected = rf"unsupported image format '{fmt}'; accepted: PNG, JPEG, WEBP, GIF \(non-animated\)"
    with pytest.raises(ImageError, match=expected):
        load_image(_encode(_gradient(), fmt))


def test_animated_gif_refused():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
    with pytest.raises(ImageError, match="animated GIF"):
        load_image(buf.getvalue())


def test_animated_webp_refused():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], duration=100)
    with pytest.raises(ImageError, match="animated WEBP"):
        load_image(buf.getvalue())


def test_svg_refused():
    svg = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>'
    with pytest.raises(ImageError, match="unsupported image format 'SVG'"):
        load_image(svg)


def test_garbage_refused():
    with pytest.raises(ImageError, match="could not decode image"):
        load_image(b"this is not an image at all, just some text")
    with pytest.raises(ImageError, match="could not decode image"):
        load_image(b"")
    with pytest.raises(ImageError):
        load_image(np.random.default_rng(0).bytes(4096))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_refused(fmt):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = _encode(noisy, fmt)
    with pytest.raises(ImageError, match="could not decode image"):
        load_image(data[: len(data) // 2])


def test_pixel_limit_checked_before_decoding(monkeypatch):
    assert DEFAULT_MAX_PIXELS >= 8000 * 8000
    small = _encode(_gradient(), "PNG")
    with pytest.raises(ImageError, match=r"64x48 = 3072 pixels, limit 1000"):
        load_image(small, max_pixels=1000)
    assert load_image(small, max_pixels=None).size == (64, 48)

    bomb = _bilevel_png(9000, 8000)  # 72 MP: over our default, under PIL's own warning threshold
    assert len(bomb) < 20_000

    def no_decoding(self):
        raise AssertionError("pixel data decoded before the size check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageError, match=r"9000x8000 = 72000000 pixels, limit 64000000"):
        load_image(bomb)


def test_pil_bomb_guard_becomes_image_error():
    with pytest.raises(ImageError, match="too large"):
        load_image(_bilevel_png(20_000, 20_000))  # 400 MP: PIL's DecompressionBombError
    with pytest.raises(ImageError, match="too large"):
        load_image(_bilevel_png(10_000, 10_000), max_pixels=None)  # 100 MP: PIL's warning, as an error


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
    return buf.getvalue()


@pytest.mark.parametrize(("make", "kwargs", "reason"), [
    (lambda: _encode(_gradient(), "BMP"), {}, UNSUPPORTED),
    (lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="1" height="1"></svg>', {}, UNSUPPORTED),
    (_animated_gif, {}, UNSUPPORTED),
    (lambda: b"not an image", {}, UNDECODABLE),
    (lambda: _encode(_gradient(), "PNG")[:60], {}, UNDECODABLE),
    (lambda: _encode(_gradient(), "PNG"), {"max_pixels": 1000}, TOO_LARGE),
    (lambda: _bilevel_png(20_000, 20_000), {}, TOO_LARGE),
], ids=["bmp", "svg", "animated", "garbage", "truncated", "over_limit", "pil_bomb"])
def test_errors_carry_a_reason_code(make, kwargs, reason):
    """Callers (the pipeline's skip counts, the converters', the server's status codes) read `reason`, not the text."""
    with pytest.raises(ImageError) as err:
        load_image(make(), **kwargs)
    assert err.value.reason == reason


def test_video_files_decode_and_sample_uniformly():
    """An MPEG-4 clip of 20 frames at 10 fps: 4 frames spread evenly (segment middles 2, 7, 12, 17), or one every
    0.5 s (0, 5, 10, 15); bytes that are not a video, a truncated file and a video of no frames are refused."""
    from _tiny import mp4

    from vlm.images import load_video, sample_frames

    data = mp4(20)
    red = lambda v: [round(int(np.asarray(f)[0, 0, 0]) / 12) for f in v.frames]
    assert red(load_video(data, frames=4)) == [2, 7, 12, 17] == sample_frames(20, 4)
    assert red(load_video(data, frames=8, fps=2)) == [0, 5, 10, 15]
    assert len(load_video(data, frames=30)) == 20  # fewer frames than asked: all of them
    assert load_video(data, frames=1).frames[0].size == (64, 48)
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    for bad in (data[:200], b"not a video" * 50, png.getvalue()):
        with pytest.raises(ImageError, match="video") as e:
            load_video(bad)
        assert e.value.reason == "undecodable"
