r"""Convert standard datasets into our WebDataset shards (the library is vlm/data/convert.py).

    python data/convert.py vqav2 --questions v2_OpenEnded_mscoco_val2014_questions.json \
        --annotations v2_mscoco_val2014_annotations.json --images val2014 --out shards/vqav2_val
    python data/convert.py okvqa --questions OpenEnded_mscoco_val2014_questions.json \
        --annotations mscoco_val2014_annotations.json --images val2014 --out shards/okvqa_val
    python data/convert.py textvqa --annotations TextVQA_0.5.1_val.json --images train_images --out shards/textvqa_val
    python data/convert.py docvqa --annotations val/val_v1.0.json --out shards/docvqa_val
    python data/convert.py chartqa --root "ChartQA Dataset" --split test --out shards/chartqa_test
    python data/convert.py easy-vqa --out shards/easy_vqa_train   # the installed easy-vqa package's files
    python data/convert.py coco-captions --captions captions_val2017.json --images val2017 --out shards/coco_val
    python data/convert.py llava --annotations llava_instruct_150k.json --images train2017 --out shards/llava

Common options: --limit N (first N items), --shard-size, --prefix, --detail, --overwrite, --no-progress.
Rerunning an interrupted command resumes it; the summary goes to <out>/summary.json.
"""

from __future__ import annotations

import argparse
import sys

from vlm.data import convert as C


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder for the shards, progress.json and summary.json")
    p.add_argument("--limit", type=int, default=None, help="convert only the first N items")
    p.add_argument("--shard-size", type=int, default=C.DEFAULT_SHARD_SIZE, help="samples per shard")
    p.add_argument("--prefix", default=None, help="shard name prefix (default: the dataset name)")
    p.add_argument("--detail", choices=("low", "high", "auto"), default="auto", help="image detail in the records")
    p.add_argument("--overwrite", action="store_true", help="delete an earlier conversion in --out and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="data/convert.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="dataset", required=True)

    for name in ("vqav2", "okvqa"):
        p = sub.add_parser(name, help=f"{name}: questions + annotations JSON, COCO images")
        p.add_argument("--questions", required=True, help="questions JSON")
        p.add_argument("--annotations", default=None, help="annotations JSON (leave out for test / test-dev)")
        p.add_argument("--images", required=True, help="folder with COCO_{subtype}_{image_id:012d}.jpg")
        p.add_argument("--subtype", default=None, help="image subtype, e.g. val2014 (default: data_subtype)")
        _common(p)

    p = sub.add_parser("textvqa", help="TextVQA_0.5.1_{split}.json + images")
    p.add_argument("--annotations", required=True, help="TextVQA_0.5.1_{train,val,test}.json")
    p.add_argument("--images", required=True, help="folder with {image_id}.jpg (train_images / test_images)")
    _common(p)

    p = sub.add_parser("docvqa", help="DocVQA {split}_v1.0.json")
    p.add_argument("--annotations", required=True, help="{train,val,test}_v1.0.json")
    p.add_argument("--images", default=None, help="folder the 'image' paths are relative to (default: the JSON's)")
    _common(p)

    p = sub.add_parser("chartqa", help="ChartQA {split}/{split}_{human,augmented}.json + {split}/png")
    p.add_argument("--root", required=True, help="folder holding train/ val/ test/")
    p.add_argument("--split", required=True, help="train, val or test")
    p.add_argument("--sources", nargs="+", choices=C.CHARTQA_SOURCES, default=list(C.CHARTQA_SOURCES))
    _common(p)

    p = sub.add_parser("easy-vqa", help="easy-VQA {split}/questions.json + {split}/images (the easy-vqa package)")
    p.add_argument("--root", default=None,
                   help="a copy of the package's data/ folder (default: the installed easy_vqa package's; "
                        f"`{C.EASY_VQA_INSTALL}`)")
    p.add_argument("--split", choices=C.EASY_VQA_SPLITS, default="train")
    _common(p)
    p.set_defaults(detail="low")  # 64x64 images: one global view

    p = sub.add_parser("coco-captions", help="COCO captions_{split}.json + images, one sample per image")
    p.add_argument("--captions", required=True, help="captions_{train,val}2017.json")
    p.add_argument("--images", required=True, help="folder with the images' file_name")
    p.add_argument("--prompt", default=C.CAPTION_PROMPT, help="the user turn's text")
    _common(p)

    p = sub.add_parser("llava", help="LLaVA-Instruct style conversations JSON + images")
    p.add_argument("--annotations", required=True, help="JSON list of {id, image, conversations}")
    p.add_argument("--images", default=None, help="folder the 'image' paths are relative to (default: the JSON's)")
    p.add_argument("--name", default="llava", help="dataset name in meta, keys and shard names")
    _common(p)

    p = sub.add_parser("synthetic-video", help="the synthetic video task (rendered, no input files): order questions")
    p.add_argument("--split", choices=["train", "val", "test"], default="train")
    p.add_argument("--n", type=int, default=1000, help="clips")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--size", type=int, default=256, help="frame side in px")
    p.add_argument("--seed", type=int, default=0)
    _common(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = dict(shard_size=args.shard_size, limit=args.limit, prefix=args.prefix, overwrite=args.overwrite,
                   progress=not args.no_progress)
    common = dict(detail=args.detail, **options)
    try:
        if args.dataset in ("vqav2", "okvqa"):
            C.convert_vqa(args.questions, args.images, args.out, annotations=args.annotations, subtype=args.subtype,
                          dataset=args.dataset, **common)
        elif args.dataset == "textvqa":
            C.convert_textvqa(args.annotations, args.images, args.out, **common)
        elif args.dataset == "docvqa":
            C.convert_docvqa(args.annotations, args.out, images=args.images, **common)
        elif args.dataset == "chartqa":
            C.convert_chartqa(args.root, args.split, args.out, sources=args.sources, **common)
        elif args.dataset == "easy-vqa":
            C.convert_easy_vqa(args.out, root=args.root, split=args.split, **common)
        elif args.dataset == "coco-captions":
            C.convert_coco_captions(args.captions, args.images, args.out, prompt=args.prompt, **common)
        elif args.dataset == "synthetic-video":
            C.convert_synthetic_video(args.out, split=args.split, n=args.n, frames=args.frames, size=args.size,
                                      seed=args.seed, **options)
        elif args.dataset == "llava":
            C.convert_llava(args.annotations, args.out, images=args.images, dataset=args.name, **common)
    except (ValueError, OSError) as e:  # bad arguments / inputs (bad items are skipped, not raised)
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
