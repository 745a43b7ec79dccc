"""The synthetic high-resolution VQA corpus: the project's embedded default dataset.

Each sample is one landscape image of 1536 to 2048 x 512 to 1024 px (aspect 2:1 to 3:1) and one question:
  text    "What is written in the top left corner?" -> "STOP". Every image has one word (or 2-digit number)
          from a small closed vocabulary in each corner region, four distinct ones, so the position matters.
  coarse  "What colour is the large shape?" -> "red", "What shape is the large object?" -> "circle".
  count   "How many triangles are there?" -> "3": 1 to 5 medium shapes of that kind (never the large shape's
          kind), plus 0 to 2 medium distractors of the third kind.
on a light, mildly mottled background. Large and medium shapes are plainly visible in the global view; the
text is sized so it is only readable in the 512 px tiles.

Why it needs the tiles (GPT-4V geometry, `vlm.tiling`): at detail="high" the tiles see the image at
    s_tile = min(1, 2048 / max(w, h)) * min(1, 768 / min(w', h'))     (w', h' after the first step)
and the global view (pad mode, aspect kept) at
    s_glob = min(512 / w, 512 / h).
For a square image s_tile / s_glob is only 1.5; for landscape images of width >= 1536 and aspect >= 2 it is
>= 3. The font size is chosen per image as the smallest whose cap height is >= `text_cap_px` (21) px at tile
scale; the global view then shows it at about a third of that, <= 7.6 px over the whole default size range.
Measured with the default font (`PIL.ImageFont.load_default`, Aileron; its cap heights step by 1-2 px):

    image        grid  s_glob  s_tile  ratio  font  cap (image)  cap in tile  cap in global view
    1536 x  768  3x2   0.333   1.000   3.0    31      22 px       22.0 px        7.3 px
    1536 x  512  3x1   0.333   1.000   3.0    31      22 px       22.0 px        7.3 px
    1792 x  717  4x2   0.286   1.000   3.5    31      22 px       22.0 px        6.3 px
    1829 x  914  3x2   0.280   0.840   3.0    38      27 px       22.7 px        7.6 px   (the worst case)
    2048 x 1024  3x2   0.250   0.750   3.0    40      28 px       21.0 px        7.0 px
    2048 x  683  4x2   0.250   1.000   4.0    31      22 px       22.0 px        5.5 px

(`tests/test_synthetic.py` checks cap * s_tile >= 20 and cap * s_glob <= 8 over the default size range.)
Each word is also kept inside one tile (never straddling a tile boundary) where its corner region allows.

Layout on disk (`make_corpus`):
    <out>/train/train-000000.tar ...   WebDataset shards in the `vlm.data.format` chat shape, one image per sample
                                       and a chat of `train_questions` (7) questions; meta = {image_id, turns}
    <out>/val/val-000000.tar ...       one question per sample; meta = {question_id, image_id, question_type,
    <out>/test/test-000000.tar ...     answers (10), answer_type}
    <out>/test/vqa/questions.json, annotations.json, images/{image_id:012d}.jpg     VQAv2 format (all of test)
    <out>/test/docvqa/test_v1.0.json, documents/{image_id}.jpg                     DocVQA format (text questions)
    <out>/manifest.json                parameters, version, counts; written last (its presence = complete)

Everything is a function of the parameters: sample i of a split draws from its own RNG seeded with
(seed, split, i), so shards are generated in parallel (a process pool over shards) and any sample can be
regenerated alone (`make_sample`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from functools import cache
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlm.config import TilingConfig
from vlm.data.format import ShardSink, encode_image
from vlm.tiling import DETAILS, plan_tiles

log = logging.getLogger(__name__)

VERSION = 1
SPLITS = ("train", "val", "test")
SPLIT_CODES = {"train": 1, "val": 2, "test": 3}
ID_STRIDE = 10**8  # image_id = SPLIT_CODES[split] * ID_STRIDE + index; question_id = image_id * 10
NUM_ANSWERS = 10
QUESTION_TYPES = ("text", "coarse", "count")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (215, 35, 35), "green": (30, 160, 60), "blue": (35, 75, 215), "yellow": (235, 190, 20),
           "purple": (140, 50, 180)}
DEFAULT_VOCAB = ("STOP", "OPEN", "EXIT", "PARK", "SALE", "GATE", "LAMP", "ROAD", "FISH", "BIRD", "MILK", "DOOR",
                 "17", "42", "58", "93")
QUESTIONS = {"text": "What is written in the {position} corner?", "colour": "What colour is the large shape?",
             "shape": "What shape is the large object?", "count": "How many {shape}s are there?"}
LICENSE = {"name": "Apache-2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"}
MANIFEST = "manifest.json"

# Layout, as fractions of the image height h (width is always >= 2h) or size.
_LARGE_SIDE = (0.50, 0.75)  # the large shape's bounding square
_MEDIUM_SIDE = (0.10, 0.16)  # counted shapes and distractors
_GAP = 0.03  # free space kept around every object


@dataclass(frozen=True)
class CorpusParams:
    """Everything the corpus is a function of (recorded in the manifest; `ensure_corpus` compares it)."""

    n_train: int = 4000
    n_val: int = 200
    n_test: int = 500
    seed: int = 0
    shard_size: int = 250  # samples per shard: 16 train shards by default (2 nodes x 2 workers split them)
    width_range: tuple[int, int] = (1536, 2048)  # image width (the long side), inclusive
    aspect_range: tuple[float, float] = (2.0, 3.0)  # width / height
    text_cap_px: int = 21  # the text's cap height at tile scale (the font size is chosen per image)
    text_region: tuple[float, float] = (0.30, 0.35)  # each word lies in its corner's region of this (w, h) fraction
    # Keep the shapes out of the first and last column of tiles (where the words are): a word is then the only thing
    # in its tile besides the background, instead of a needle among shapes. Needs grids of >= 3 columns.
    clear_text_tiles: bool = False
    vocab: tuple[str, ...] = DEFAULT_VOCAB  # what the corners say; at least 4 distinct entries
    question_mix: tuple[float, float, float] = (0.5, 0.25, 0.25)  # weights of text, coarse, count
    # Training images carry a multi-turn chat of this many distinct questions about the image (of the 7 a scene
    # answers: 4 corner texts, colour, shape, count; random order): 7x the supervision per encoded image. Val and
    # test keep one question per image (question_mix), as the VQA files they are scored from.
    train_questions: int = 7
    max_count: int = 5  # count questions: 1..max_count shapes of the asked kind
    max_distractors: int = 2  # plus 0..max_distractors medium shapes of the third kind
    detail: str = "high"  # the image_url detail written into every record
    jpeg_quality: int = 90

    def __post_init__(self):
        for name in ("width_range", "aspect_range", "text_region", "vocab", "question_mix"):  # Hydra / JSON give lists
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("n_train", "n_val", "n_test", "seed", "max_distractors"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.shard_size < 1 or self.max_count < 1 or self.text_cap_px < 1:
            raise ValueError("shard_size, max_count and text_cap_px must be >= 1")
        if not all(0 < f <= 0.5 for f in self.text_region):
            raise ValueError(f"text_region fractions must be in (0, 0.5], got {self.text_region}")
        if not 1 <= self.train_questions <= len(POSITIONS) + 3:
            raise ValueError(f"train_questions must be in 1..{len(POSITIONS) + 3}, got {self.train_questions}")
        lo, hi = self.width_range
        if not 1024 <= lo <= hi <= 2048:
            raise ValueError(f"width_range must lie within 1024..2048, got {self.width_range}")
        if not 1.0 <= self.aspect_range[0] <= self.aspect_range[1] or hi / self.aspect_range[1] < 256:
            raise ValueError(f"aspect_range must be landscape (>= 1) and leave heights >= 256, got "
                             f"{self.aspect_range}")
        if len(set(self.vocab)) < len(POSITIONS) or len(set(self.vocab)) != len(self.vocab):
            raise ValueError(f"vocab needs at least {len(POSITIONS)} distinct entries and no repeats")
        if any(not w or w != w.strip() for w in self.vocab):
            raise ValueError("vocab entries must be non-empty with no surrounding spaces")
        if len(self.question_mix) != len(QUESTION_TYPES) or min(self.question_mix) < 0 or sum(self.question_mix) <= 0:
            raise ValueError(f"question_mix must be {len(QUESTION_TYPES)} non-negative weights, got "
                             f"{self.question_mix}")
        if self.detail not in DETAILS:
            raise ValueError(f"detail must be one of {DETAILS}, got {self.detail!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")

    def count(self, split: str) -> int:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}[split]

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


# --- geometry -------------------------------------------------------------------------------------------------


def view_scales(width: int, height: int, cfg: TilingConfig | None = None) -> tuple[float, float]:
    """(s_tile, s_glob): the scale of the image in its detail="high" tiles and in the global view."""
    cfg = cfg or TilingConfig()
    plan = plan_tiles(width, height, "high", cfg)
    s_tile = min(plan.resized[0] / width, plan.resized[1] / height)
    return s_tile, min(cfg.tile_size / width, cfg.tile_size / height)


@cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


@cache
def cap_height(size: int) -> int:
    """Height in pixels of a capital letter in the default font at `size`."""
    _, top, _, bottom = _font(size).getbbox("H")
    return bottom - top


def font_size_for(width: int, height: int, text_cap_px: int, cfg: TilingConfig | None = None) -> int:
    """The smallest font size whose cap height is >= text_cap_px at tile scale."""
    s_tile, _ = view_scales(width, height, cfg)
    size = max(1, int(text_cap_px / s_tile / 0.7) - 4)  # Aileron's cap height is ~0.7 of the size
    while cap_height(size) * s_tile < text_cap_px:
        size += 1
    return size


def _tile_cuts(width: int, height: int, cfg: TilingConfig) -> tuple[list[float], list[float]]:
    """Tile boundaries in original image coordinates: (x cuts, y cuts)."""
    plan = plan_tiles(width, height, "high", cfg)
    (rw, rh), (cols, rows) = plan.resized, plan.grid
    xs = [k * cfg.tile_size * width / rw for k in range(1, cols)]
    ys = [k * cfg.tile_size * height / rh for k in range(1, rows)]
    return xs, ys


# --- rendering ------------------------------------------------------------------------------------------------

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)


@dataclass
class Scene:
    """What was drawn: the ground truth every question is asked from."""

    width: int
    height: int
    font_size: int
    texts: dict[str, tuple[str, Box]]  # position -> (word, box)
    large: tuple[str, str, Box]  # (shape, colour, box)
    counted: str  # the kind the count question asks about (never the large shape's)
    medium: list[tuple[str, str, Box]] = field(default_factory=list)  # (shape, colour, box)

    def count(self, shape: str) -> int:
        return sum(kind == shape for kind, _, _ in self.medium)


def _rng(params: CorpusParams, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([params.seed, SPLIT_CODES[split], index])


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A light colour, darkened by a few smooth blotches and a faint 4 px grain (cheap to JPEG-encode). Built at
    quarter resolution and upsampled once: most of the generation time is here."""
    base = rng.integers(228, 251, size=3).astype(np.int16)
    lw, lh = math.ceil(w / 4), math.ceil(h / 4)
    blotches = Image.fromarray(rng.integers(0, 14, size=(4, 10), dtype=np.uint8))
    blotches = np.asarray(blotches.resize((lw, lh), Image.Resampling.BICUBIC), dtype=np.int16)  # (lh, lw)
    grain = rng.integers(0, 6, size=(lh, lw), dtype=np.int16)  # (lh, lw)
    small = np.clip(base - (blotches + grain)[..., None], 0, 255).astype(np.uint8)  # (lh, lw, 3)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)


def _overlaps(box: Box, others: list[Box], gap: int) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + gap and b[0] < x1 + gap and y0 < b[3] + gap and b[1] < y1 + gap for b in others)


def _straddles(lo: int, hi: int, cuts: list[float], margin: int = 2) -> bool:
    return any(lo - margin < c < hi + margin for c in cuts)


def _place_text(rng, position: str, tw: int, th: int, w: int, h: int, cuts,
                region: tuple[float, float]) -> tuple[int, int]:
    """Top-left corner for a tw x th text box in a corner region, inside one tile where possible."""
    region_w, region_h = region
    margin = max(8, h // 40)
    top, left = position.startswith("top"), position.endswith("left")
    xlo, xhi = (margin, int(w * region_w) - tw) if left else (int(w * (1 - region_w)), w - margin - tw)
    ylo, yhi = (margin, int(h * region_h) - th) if top else (int(h * (1 - region_h)), h - margin - th)
    for _ in range(64):
        x, y = int(rng.integers(xlo, max(xlo, xhi) + 1)), int(rng.integers(ylo, max(ylo, yhi) + 1))
        if not _straddles(x, x + tw, cuts[0]) and not _straddles(y, y + th, cuts[1]):
            break
    return x, y


def _place_square(rng, side: int, w: int, h: int, taken: list[Box], gap: int, tries: int = 200) -> Box | None:
    margin = max(8, h // 40)
    for _ in range(tries):
        x, y = int(rng.integers(margin, w - margin - side + 1)), int(rng.integers(margin, h - margin - side + 1))
        box = (x, y, x + side, y + side)
        if not _overlaps(box, taken, gap):
            return box
    return None


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: str, box: Box) -> None:
    x0, y0, x1, y1 = box
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)


def render_scene(params: CorpusParams, rng: np.random.Generator,
                 cfg: TilingConfig | None = None) -> tuple[Image.Image, Scene]:
    """Draw one image (RGB) from `rng`: corner texts, one large shape, medium shapes."""
    cfg = cfg or TilingConfig()
    w = int(rng.integers(params.width_range[0], params.width_range[1] + 1))
    h = max(1, round(w / float(rng.uniform(*params.aspect_range))))
    image = _background(rng, w, h)
    draw = ImageDraw.Draw(image)

    size = font_size_for(w, h, params.text_cap_px, cfg)
    font, cuts = _font(size), _tile_cuts(w, h, cfg)
    words = rng.choice(len(params.vocab), size=len(POSITIONS), replace=False)
    texts = {}
    for position, k in zip(POSITIONS, words):
        word = params.vocab[int(k)]
        left, top, right, bottom = font.getbbox(word)
        tw, th = right - left, bottom - top
        x, y = _place_text(rng, position, tw, th, w, h, cuts, params.text_region)
        ink = tuple(int(v) for v in rng.integers(0, 70, size=3))
        draw.text((x - left, y - top), word, font=font, fill=ink)
        texts[position] = (word, (x, y, x + tw, y + th))

    gap = max(4, round(_GAP * h))
    taken = [box for _, box in texts.values()]
    room = h  # the side of the largest square the shapes may use
    if params.clear_text_tiles:  # the outer tile columns are reserved for the words
        xs = cuts[0]
        if len(xs) < 2:
            raise ValueError(f"clear_text_tiles needs >= 3 tile columns; a {w} x {h} image has {len(xs) + 1}")
        taken += [(0, 0, math.ceil(xs[0]), h), (int(xs[-1]), 0, w, h)]
        room = min(h, int(xs[-1] - xs[0]))  # the shapes share the middle columns
    colours = list(COLOURS)
    large_shape = SHAPES[int(rng.integers(len(SHAPES)))]
    large_colour = colours[int(rng.integers(len(colours)))]
    side = round(float(rng.uniform(*_LARGE_SIDE)) * room)
    large_box = None
    while large_box is None:  # shrink until it fits (it always does at the default sizes)
        large_box = _place_square(rng, side, w, h, taken, gap)
        side = round(side * 0.9)
    taken.append(large_box)
    _draw_shape(draw, large_shape, large_colour, large_box)

    others = [s for s in SHAPES if s != large_shape]
    counted = others[int(rng.integers(len(others)))]
    distractor = next(s for s in others if s != counted)
    kinds = [counted] * int(rng.integers(1, params.max_count + 1))
    kinds += [distractor] * int(rng.integers(0, params.max_distractors + 1))
    medium = []
    for kind in kinds:
        side = round(float(rng.uniform(*_MEDIUM_SIDE)) * h)
        colour = colours[int(rng.integers(len(colours)))]
        box = _place_square(rng, side, w, h, taken, gap)
        if box is None:  # no room left: the count is what was drawn
            continue
        taken.append(box)
        _draw_shape(draw, kind, colour, box)
        medium.append((kind, colour, box))
    if not any(kind == counted for kind, _, _ in medium):
        raise RuntimeError("could not place any counted shape; widen aspect_range or width_range")
    return image, Scene(w, h, size, texts, (large_shape, large_colour, large_box), counted, medium)


def _ask(params: CorpusParams, rng: np.random.Generator, scene: Scene) -> tuple[str, str, str, str]:
    """(question, answer, question_type, answer_type) about the scene."""
    mix = np.asarray(params.question_mix, dtype=float)
    qtype = QUESTION_TYPES[int(rng.choice(len(QUESTION_TYPES), p=mix / mix.sum()))]
    if qtype == "text":
        position = POSITIONS[int(rng.integers(len(POSITIONS)))]
        answer = scene.texts[position][0]
        question = QUESTIONS["text"].format(position=position)
    elif qtype == "coarse":
        shape, colour, _ = scene.large
        ask_colour = bool(rng.integers(2))
        question, answer = (QUESTIONS["colour"], colour) if ask_colour else (QUESTIONS["shape"], shape)
    else:
        question, answer = QUESTIONS["count"].format(shape=scene.counted), str(scene.count(scene.counted))
    return question, answer, qtype, "number" if answer.isdigit() else "other"


def _all_questions(scene: Scene) -> list[tuple[str, str, str, str]]:
    """Every (question, answer, question_type, answer_type) the scene answers: 4 texts, colour, shape, count."""
    shape, colour, _ = scene.large
    qs = [(QUESTIONS["text"].format(position=pos), scene.texts[pos][0], "text") for pos in POSITIONS]
    qs += [(QUESTIONS["colour"], colour, "coarse"), (QUESTIONS["shape"], shape, "coarse"),
           (QUESTIONS["count"].format(shape=scene.counted), str(scene.count(scene.counted)), "count")]
    return [(q, a, t, "number" if a.isdigit() else "other") for q, a, t in qs]


def caption(scene: Scene) -> str:
    """One sentence per scene for the alignment stages (LLaVA / MiniGPT-4 stage 1): the large shape, the counted and
    distractor shapes, and what each corner says, e.g. "A large red circle, 3 small triangles and 1 small square.
    The corners read STOP (top left), OPEN (top right), 17 (bottom left) and FISH (bottom right)." """
    shape, colour, _ = scene.large
    kinds = Counter(kind for kind, _, _ in scene.medium)
    small = [f"{n} small {kind}{'s' if n > 1 else ''}" for kind, n in
             sorted(kinds.items(), key=lambda kv: (kv[0] != scene.counted, kv[0]))]
    things = [f"A large {colour} {shape}", *small]
    shapes = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
    corners = [f"{scene.texts[pos][0]} ({pos})" for pos in POSITIONS]
    return f"{shapes}. The corners read {', '.join(corners[:-1])} and {corners[-1]}."


def render_sample(params: CorpusParams, split: str, index: int,
                  cfg: TilingConfig | None = None) -> tuple[Image.Image, Scene, np.random.Generator]:
    """Sample `index` of `split`: its image, its scene and its RNG after drawing them (the questions come next)."""
    if not 0 <= index < ID_STRIDE:
        raise ValueError(f"index must be in 0..{ID_STRIDE - 1}, got {index}")
    rng = _rng(params, split, index)
    image, scene = render_scene(params, rng, cfg)
    return image, scene, rng


def sample_ids(split: str, index: int) -> tuple[int, int]:
    """(image_id, question_id) of sample `index` of `split`: unique across splits."""
    image_id = SPLIT_CODES[split] * ID_STRIDE + index
    return image_id, image_id * 10


def make_sample(params: CorpusParams, split: str, index: int,
                cfg: TilingConfig | None = None) -> tuple[str, dict, bytes]:
    """(key, record, JPEG bytes) of sample `index` of `split`; a pure function of its arguments."""
    image, scene, rng = render_sample(params, split, index, cfg)
    if split == "train" and params.train_questions > 1:
        pool = _all_questions(scene)
        turns = [pool[int(k)] for k in rng.permutation(len(pool))[:params.train_questions]]
    else:
        turns = [_ask(params, rng, scene)]
    image_id, question_id = sample_ids(split, index)
    messages = []
    for t, (question, answer, _, _) in enumerate(turns):  # the image comes with the first question
        image_part = [{"type": "image_url", "image_url": {"url": "0.jpg", "detail": params.detail}}] if t == 0 else []
        messages += [{"role": "user", "content": [*image_part, {"type": "text", "text": question}]},
                     {"role": "assistant", "content": answer}]
    metas = [{"question_id": question_id + t, "image_id": image_id, "question_type": qtype,
              "answers": [answer] * NUM_ANSWERS, "answer_type": atype, "question": question, "answer": answer}
             for t, (question, answer, qtype, atype) in enumerate(turns)]
    record = {"messages": messages, "meta": metas[0] if len(metas) == 1 else {"image_id": image_id, "turns": metas}}
    return f"{split}-{index:07d}", record, encode_image(image, "JPEG", quality=params.jpeg_quality)


# --- corpus ---------------------------------------------------------------------------------------------------


def _shard_tasks(params: CorpusParams) -> list[tuple[str, int, int, int]]:
    """(split, shard, start, stop) for every shard, test shards first (they also write the official files)."""
    tasks = []
    for split in ("test", "train", "val"):
        n = params.count(split)
        for shard, start in enumerate(range(0, n, params.shard_size)):
            tasks.append((split, shard, start, min(n, start + params.shard_size)))
    return tasks


def _write_shard(args: tuple[CorpusParams, str, str, int, int, int]) -> dict:
    params, out_dir, split, shard, start, stop = args
    out = Path(out_dir)
    entries = []
    with ShardSink(out / split, prefix=split, max_count=params.shard_size, start_shard=shard) as sink:
        for index in range(start, stop):
            key, record, jpeg = make_sample(params, split, index)
            sink.write(key, record, {"0.jpg": jpeg})
            meta = record["meta"]
            entries += meta.get("turns", [meta])
            if split == "test":
                (out / "test/vqa/images" / f"{meta['image_id']:012d}.jpg").write_bytes(jpeg)
                if meta["question_type"] == "text":
                    (out / "test/docvqa/documents" / f"{meta['image_id']}.jpg").write_bytes(jpeg)
    return {"split": split, "shard": f"{split}/{split}-{shard:06d}.tar", "entries": entries}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1))
    os.replace(tmp, path)


def _write_official(out: Path, entries: list[dict]) -> dict:
    """VQAv2 questions / annotations for every test sample and DocVQA annotations for the text questions."""
    info = {"description": "Synthetic high-resolution VQA (vlm.data.synthetic)", "version": str(VERSION),
            "contributor": "vlm"}
    questions = [{"image_id": e["image_id"], "question": e["question"], "question_id": e["question_id"]}
                 for e in entries]
    annotations = [{"question_id": e["question_id"], "image_id": e["image_id"], "question_type": e["question_type"],
                    "answer_type": e["answer_type"], "multiple_choice_answer": e["answer"],
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                for k, a in enumerate(e["answers"])]} for e in entries]
    _write_json(out / "test/vqa/questions.json",
                {"info": info, "task_type": "Open-Ended", "data_type": "synthetic", "data_subtype": "test",
                 "license": LICENSE, "questions": questions})
    _write_json(out / "test/vqa/annotations.json",
                {"info": info, "license": LICENSE, "data_subtype": "test", "annotations": annotations})
    docs = [{"questionId": e["question_id"], "question": e["question"], "image": f"documents/{e['image_id']}.jpg",
             "docId": e["image_id"], "answers": list(dict.fromkeys(e["answers"])), "question_types": ["layout"],
             "data_split": "test"} for e in entries if e["question_type"] == "text"]
    _write_json(out / "test/docvqa/test_v1.0.json",
                {"dataset_name": "synthetic", "dataset_split": "test", "dataset_version": "1.0", "data": docs})
    return {"vqa": {"questions": "test/vqa/questions.json", "annotations": "test/vqa/annotations.json",
                    "images": "test/vqa/images", "count": len(questions)},
            "docvqa": {"annotations": "test/docvqa/test_v1.0.json", "documents": "test/docvqa/documents",
                       "count": len(docs)}}


def _clear(out: Path) -> None:
    """Remove what a previous build wrote (only our own files)."""
    (out / MANIFEST).unlink(missing_ok=True)
    for split in SPLITS:
        for path in (out / split).glob(f"{split}-*.tar"):
            path.unlink()
    for folder, pattern in (("test/vqa/images", "*.jpg"), ("test/docvqa/documents", "*.jpg"),
                            ("test/vqa", "*.json"), ("test/docvqa", "*.json")):
        for path in (out / folder).glob(pattern):
            path.unlink()


def make_corpus(out_dir: str | os.PathLike, *, workers: int = 2, **params) -> dict:
    """Build the corpus under `out_dir` (replacing a previous build) and return the manifest plus timing.

    `params` are `CorpusParams` fields (n_train, n_val, n_test, seed, shard_size, ...); `workers` processes
    generate the shards in parallel (1: in this process). The output does not depend on `workers`."""
    p = CorpusParams(**params)
    out = Path(out_dir)
    start_time = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    _clear(out)
    if p.n_test:
        (out / "test/vqa/images").mkdir(parents=True, exist_ok=True)
        (out / "test/docvqa/documents").mkdir(parents=True, exist_ok=True)
    tasks = [(p, str(out), *task) for task in _shard_tasks(p)]
    log.info("building the synthetic corpus in %s: %d shards, %d workers", out, len(tasks), workers)
    if workers > 1 and len(tasks) > 1:
        with Pool(min(workers, len(tasks))) as pool:
            results = list(pool.imap_unordered(_write_shard, tasks))
    else:
        results = [_write_shard(task) for task in tasks]

    splits, totals, test_entries = {}, Counter(), []
    for split in SPLITS:
        done = sorted((r for r in results if r["split"] == split), key=lambda r: r["shard"])
        types = Counter(e["question_type"] for r in done for e in r["entries"])
        totals.update(types)
        splits[split] = {"samples": p.count(split), "shards": [r["shard"] for r in done],
                         "question_types": {t: types[t] for t in QUESTION_TYPES}}
        if split == "test":
            test_entries = sorted((e for r in done for e in r["entries"]), key=lambda e: e["question_id"])
    official = _write_official(out, test_entries) if p.n_test else {}
    manifest = {"name": "synthetic-hires-vqa", "version": VERSION, "params": p.to_json(), "splits": splits,
                "question_types": {t: totals[t] for t in QUESTION_TYPES}, "official": official}
    _write_json(out / MANIFEST, manifest)  # last: its presence marks a complete build
    return manifest | {"built": True, "seconds": round(time.perf_counter() - start_time, 2), "out_dir": str(out)}


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    path = Path(out_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def corpus_matches(out_dir: str | os.PathLike, **params) -> bool:
    """Whether `out_dir` holds a complete build of this version with exactly these parameters."""
    manifest, out = read_manifest(out_dir), Path(out_dir)
    if manifest is None or manifest.get("version") != VERSION:
        return False
    if manifest.get("params") != CorpusParams(**params).to_json():
        return False
    files = [s for split in manifest["splits"].values() for s in split["shards"]]
    files += [v for entry in manifest.get("official", {}).values() for k, v in entry.items()
              if k in ("questions", "annotations")]
    return all((out / f).is_file() for f in files)


def ensure_corpus(out_dir: str | os.PathLike, *, workers: int = 2, **params) -> dict:
    """Build the corpus unless `out_dir` already holds one with the same parameters and version; return its
    manifest (`built` says whether this call generated it)."""
    if corpus_matches(out_dir, **params):
        log.info("synthetic corpus in %s is up to date", out_dir)
        return read_manifest(out_dir) | {"built": False, "out_dir": str(out_dir)}
    return make_corpus(out_dir, workers=workers, **params)


PARAM_NAMES = tuple(f.name for f in fields(CorpusParams))
