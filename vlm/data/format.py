"""The on-disk sample format (WebDataset tar shards) and the one writer every producer uses.

A sample is a group of tar members sharing a key:
    <key>.json          the record (below), UTF-8 JSON
    <key>.<i>.<ext>     image i of the sample, ext in jpg / png / webp (raw file bytes, never re-encoded); the
                        frames of a video are images too

The record is either a conversation in the OpenAI chat shape:
    {"messages": [
        {"role": "system", "content": "You are ..."},                       # optional, text only
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "0.jpg", "detail": "high"}},   # refers to member <key>.0.jpg
            {"type": "text", "text": "What is written in the top left corner?"}]},
        {"role": "assistant", "content": "STOP"}],                            # supervised turns
     "meta": {...}}                                                          # optional: ids, answers, types
or an interleaved document (MMC4 style), every `<image>` marker standing for the next image in order:
    {"text": "A recipe. <image> First chop the onions. <image> Then ...",
     "images": ["0.jpg", "1.png"], "details": ["auto", "low"], "meta": {...}}

`url` / `images` entries name the sample's own members by their suffix ("0.jpg"). `detail` is low / high /
auto (default auto). A video is a content part of its own, its frames in order (each a low-detail view, `VideoConfig`):
        {"type": "video", "video": {"frames": ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]}}
or a video file, decoded and sampled uniformly when read (`vlm.images.load_video`: `frames` evenly spread, or one
every 1 / `fps` seconds, capped at `frames`):
        {"type": "video", "video": {"file": "0.mp4", "frames": 8}}
and, in a document, a list of suffixes in `images`. Only assistant turns are supervised in conversations; documents
supervise all text.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi")


@dataclass(frozen=True)
class VideoFile:
    """An `image_refs` entry for a video file member: sampled into `frames` frames (or at `fps`) when read."""

    member: str
    frames: int | None = 8
    fps: float | None = None


def image_refs(record: dict) -> list[tuple[str | tuple[str, ...] | VideoFile, str]]:
    """(member suffix, detail) of every image the record uses, in order of appearance; a video's entry holds its
    frames' suffixes as a tuple, or its file as a `VideoFile` (detail "low")."""
    if "messages" in record:
        refs = []
        for message in record["messages"]:
            content = message.get("content")
            if isinstance(content, list):
                for part in content:
                    if part.get("type") == "image_url":
                        url = part["image_url"]
                        url = url if isinstance(url, dict) else {"url": url}
                        refs.append((url["url"], url.get("detail", "auto")))
                    elif part.get("type") == "video":
                        v = part["video"]
                        ref = (VideoFile(v["file"], v.get("frames", 8), v.get("fps")) if "file" in v
                               else tuple(v["frames"]))
                        refs.append((ref, "low"))
        return refs
    if "text" in record:
        images = [tuple(m) if isinstance(m, list) else m for m in record.get("images", [])]
        details = record.get("details") or ["auto"] * len(images)
        return list(zip(images, details))
    raise KeyError("record has neither 'messages' nor 'text'")


def members(ref: str | tuple[str, ...] | VideoFile) -> tuple[str, ...]:
    """The member suffixes an `image_refs` entry names: one image's, a video's frames', or its file's."""
    return (ref,) if isinstance(ref, str) else (ref.member,) if isinstance(ref, VideoFile) else ref


class ShardSink:
    """Writes samples to `<dir>/<prefix>-%06d.tar` shards of at most `max_count` samples each.

    `write(key, record, images)` takes `images` as {suffix: bytes} ("0.jpg": b"..."), checks that every image
    the record refers to is there, and stores the raw bytes (no re-encoding)."""

    def __init__(self, directory: str | Path, prefix: str = "shard", max_count: int = 1000, start_shard: int = 0):
        import webdataset as wds

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        pattern = str(self.directory / f"{prefix}-%06d.tar")
        # mtime fixed: the same samples always give the same bytes (reproducible, resumable conversions)
        self._writer = wds.ShardWriter(pattern, maxcount=max_count, start_shard=start_shard, verbose=0, mtime=0)
        self.count = 0

    def write(self, key: str, record: dict, images: dict[str, bytes]) -> None:
        if "." in key:
            raise ValueError(f"sample key {key!r} must not contain '.' (WebDataset splits members on it)")
        missing = [m for ref, _ in image_refs(record) for m in members(ref) if m not in images]
        if missing:
            raise ValueError(f"sample {key}: record refers to missing images {missing}")
        sample = {"__key__": key, "json": json.dumps(record, ensure_ascii=False).encode()}
        for suffix, data in images.items():
            ext = suffix.rsplit(".", 1)[-1].lower()
            if ext not in IMAGE_EXTS + VIDEO_EXTS:
                raise ValueError(f"sample {key}: member {suffix!r} must end in one of {IMAGE_EXTS + VIDEO_EXTS}")
            sample[suffix] = data
        self._writer.write(sample)
        self.count += 1

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def encode_image(image, fmt: str = "JPEG", quality: int = 90) -> bytes:
    """PIL image -> file bytes (for producers that draw or convert images)."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": quality} if fmt.upper() == "JPEG" else {}))
    return buf.getvalue()
