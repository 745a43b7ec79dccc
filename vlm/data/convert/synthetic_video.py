"""The synthetic video task (Flamingo's video abilities, in the corpus's style): short clips whose answers need the
order of the frames. Each clip is `frames` frames (default 4) of `size` px on one background: a large shape of one
kind crosses the frame, left to right or right to left, by the same step each frame, and changes colour every frame
(a different colour of the corpus's five each time). Questions:
    first   "What colour was the shape first?"   -> the first frame's colour
    last    "What colour was the shape last?"    -> the last frame's colour
    motion  "Which way did the shape move?"      -> "left" / "right"
Every answer needs the order: the set of frames is the same for a clip and its reverse, which answers each question
differently. A model that sees the frames as a set is at chance: 1 / frames on first / last (it can still tell which
colours were shown), 1 / 2 on motion (the `no_temporal` ablation: `model.video.temporal_embeddings=false`). Colours
of large shapes are what the embedded default reads in its global view (coarse 100 %); its corner words it does not
(issue 14), so the task asks colours, not words.

Samples are drawn from their own RNG, seeded with (seed, split, index). Training samples are one chat with the three
questions in a random order (supervised answers); test samples one question each, cycling the types, with
`meta.answers` (10 copies, so the VQA accuracy is exact match) and `meta.question_type`. Keys
`synthetic_video_<split>-<index>`; frames `0.jpg` ... `<frames-1>.jpg` in the `vlm.data.format` video part.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vlm.data.convert.driver import Sample, Source, run_conversion
from vlm.data.convert.records import make_key
from vlm.data.format import encode_image
from vlm.data.synthetic import COLOURS, NUM_ANSWERS, SHAPES, SPLIT_CODES, _background, _draw_shape

VIDEO_QUESTIONS = {"first": "What colour was the shape first?", "last": "What colour was the shape last?",
                   "motion": "Which way did the shape move?"}
VIDEO_QUESTION_TYPES = tuple(VIDEO_QUESTIONS)


def render_clip(rng: np.random.Generator, *, frames: int = 4, size: int = 256) -> tuple[list[Image.Image], dict]:
    """The frames of one clip and its answers {"first", "last", "motion"}."""
    if frames > len(COLOURS):
        raise ValueError(f"a clip changes colour every frame: at most {len(COLOURS)} frames, got {frames}")
    colours = [list(COLOURS)[i] for i in rng.choice(len(COLOURS), size=frames, replace=False)]
    direction = "right" if rng.random() < 0.5 else "left"
    shape = SHAPES[rng.integers(len(SHAPES))]
    side = size * 2 // 5
    y = int(rng.integers(4, size - side - 4))
    xs = np.linspace(4, size - side - 4, frames).round().astype(int)  # evenly spaced across the frame
    xs = xs if direction == "right" else xs[::-1]
    background = _background(rng, size, size)  # one scene: only the shape's place and colour change
    out = []
    for colour, x in zip(colours, xs):
        img = background.copy()
        _draw_shape(ImageDraw.Draw(img), shape, colour, (int(x), y, int(x) + side, y + side))
        out.append(img)
    return out, {"first": colours[0], "last": colours[-1], "motion": direction}


def synthetic_video_source(split: str = "train", *, n: int = 1000, frames: int = 4, size: int = 256, seed: int = 0,
                           jpeg_quality: int = 90) -> Source:
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(SPLIT_CODES)}, got {split!r}")

    def convert(index: int, _: int) -> Sample:
        rng = np.random.default_rng([seed, 7, SPLIT_CODES[split], index])  # 7: not the image corpus's streams
        clip, answers = render_clip(rng, frames=frames, size=size)
        names = [f"{i}.jpg" for i in range(frames)]
        video = {"type": "video", "video": {"frames": names}}
        key = make_key("synthetic_video", f"{split}-{index:07d}")
        if split == "train":
            order = rng.permutation(len(VIDEO_QUESTION_TYPES))
            messages = []
            for j, t in enumerate(VIDEO_QUESTION_TYPES[i] for i in order):
                text = {"type": "text", "text": VIDEO_QUESTIONS[t]}
                messages += [{"role": "user", "content": [video, text] if j == 0 else [text]},
                             {"role": "assistant", "content": answers[t]}]
            meta = {"dataset": "synthetic_video", "answers": answers}
        else:
            t = VIDEO_QUESTION_TYPES[index % len(VIDEO_QUESTION_TYPES)]
            messages = [{"role": "user", "content": [video, {"type": "text", "text": VIDEO_QUESTIONS[t]}]},
                        {"role": "assistant", "content": answers[t]}]
            meta = {"dataset": "synthetic_video", "question_id": key, "question_type": t,
                    "answers": [answers[t]] * NUM_ANSWERS}
        record = {"messages": messages, "meta": meta}
        return Sample(key, record, {name: encode_image(f, "JPEG", quality=jpeg_quality)
                                    for name, f in zip(names, clip)})

    return Source("synthetic_video", range(n), convert,
                  {"split": split, "n": n, "frames": frames, "size": size, "seed": seed, "jpeg_quality": jpeg_quality},
                  item_id=lambda index, _: f"{split} clip {index}")


def convert_synthetic_video(out: str | Path, *, split: str = "train", n: int = 1000, frames: int = 4, size: int = 256,
                            seed: int = 0, **options: Any) -> dict:
    return run_conversion(synthetic_video_source(split, n=n, frames=frames, size=size, seed=seed), out, **options)
