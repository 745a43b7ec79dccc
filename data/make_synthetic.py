"""Generate the synthetic high-resolution VQA corpus (see `vlm.data.synthetic`).

    python data/make_synthetic.py --out data/synthetic            # defaults; skipped if already up to date
    python data/make_synthetic.py --out /tmp/s --n-train 100 --force
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vlm.data.synthetic import CorpusParams, ensure_corpus, make_corpus  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    d = CorpusParams()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/synthetic", help="output folder (default: %(default)s)")
    ap.add_argument("--n-train", type=int, default=d.n_train)
    ap.add_argument("--n-val", type=int, default=d.n_val)
    ap.add_argument("--n-test", type=int, default=d.n_test)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--shard-size", type=int, default=d.shard_size, help="samples per shard")
    ap.add_argument("--min-width", type=int, default=d.width_range[0])
    ap.add_argument("--max-width", type=int, default=d.width_range[1])
    ap.add_argument("--min-aspect", type=float, default=d.aspect_range[0])
    ap.add_argument("--max-aspect", type=float, default=d.aspect_range[1])
    ap.add_argument("--text-cap-px", type=int, default=d.text_cap_px, help="text cap height at tile scale")
    ap.add_argument("--text-region", type=float, nargs=2, default=list(d.text_region), metavar=("W", "H"),
                    help="each word lies in its corner's region of this fraction of the image width and height")
    ap.add_argument("--clear-text-tiles", action="store_true", help="keep shapes out of the tile columns of the words")
    ap.add_argument("--train-questions", type=int, default=d.train_questions, help="questions per training image")
    ap.add_argument("--vocab", nargs="+", default=list(d.vocab), help="what the corners say")
    ap.add_argument("--question-mix", type=float, nargs=3, default=list(d.question_mix),
                    metavar=("TEXT", "COARSE", "COUNT"), help="question type weights")
    ap.add_argument("--max-count", type=int, default=d.max_count)
    ap.add_argument("--max-distractors", type=int, default=d.max_distractors)
    ap.add_argument("--detail", default=d.detail, choices=("low", "high", "auto"))
    ap.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality)
    ap.add_argument("--workers", type=int, default=2, help="generator processes (default: %(default)s)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the manifest matches")
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = dict(n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, seed=args.seed,
                  shard_size=args.shard_size, width_range=(args.min_width, args.max_width),
                  aspect_range=(args.min_aspect, args.max_aspect), text_cap_px=args.text_cap_px,
                  text_region=tuple(args.text_region), clear_text_tiles=args.clear_text_tiles,
                  train_questions=args.train_questions,
                  vocab=tuple(args.vocab), question_mix=tuple(args.question_mix), max_count=args.max_count,
                  max_distractors=args.max_distractors, detail=args.detail, jpeg_quality=args.jpeg_quality)
    start = time.perf_counter()
    build = make_corpus if args.force else ensure_corpus
    summary = build(args.out, workers=args.workers, **params)
    counts = {split: s["samples"] for split, s in summary["splits"].items()}
    shards = {split: len(s["shards"]) for split, s in summary["splits"].items()}
    verb = "built" if summary["built"] else "up to date:"
    print(f"{verb} {args.out}: samples {counts}, shards {shards}, question types "
          f"{json.dumps(summary['question_types'])} ({time.perf_counter() - start:.1f} s)")
    return summary


if __name__ == "__main__":
    main()
