"""Converters from standard datasets into our WebDataset shards, one module per dataset; the shared driver (resume,
skip counting, summary) is `driver.py`, image intake `images.py`, the records they write `records.py`. See
`vlm.data.convert.driver` for what every conversion guarantees; `python data/convert.py --help` for the CLI."""

from vlm.data.convert.chartqa import CHARTQA_SOURCES, chartqa_source, convert_chartqa
from vlm.data.convert.coco import coco_captions_source, convert_coco_captions
from vlm.data.convert.docvqa import convert_docvqa, docvqa_source
from vlm.data.convert.driver import DEFAULT_SHARD_SIZE, InjectedFailure, Sample, Skip, Source, run_conversion
from vlm.data.convert.easy_vqa import EASY_VQA_INSTALL, EASY_VQA_SPLITS, convert_easy_vqa, easy_vqa_source
from vlm.data.convert.images import ImageReader, prepare_image
from vlm.data.convert.llava import convert_llava, llava_source
from vlm.data.convert.records import CAPTION_PROMPT, make_key
from vlm.data.convert.synthetic_captions import convert_synthetic_captions, synthetic_captions_source
from vlm.data.convert.synthetic_video import convert_synthetic_video, synthetic_video_source
from vlm.data.convert.textvqa import convert_textvqa, textvqa_source
from vlm.data.convert.vqa import convert_vqa, vqa_source
from vlm.images import ImageError

__all__ = ["CAPTION_PROMPT", "CHARTQA_SOURCES", "DEFAULT_SHARD_SIZE", "EASY_VQA_INSTALL", "EASY_VQA_SPLITS",
           "ImageError", "ImageReader", "InjectedFailure", "Sample", "Skip", "Source", "chartqa_source",
           "coco_captions_source", "convert_chartqa", "convert_coco_captions", "convert_docvqa", "convert_easy_vqa",
           "convert_llava", "convert_synthetic_captions", "convert_textvqa", "convert_vqa", "docvqa_source",
           "easy_vqa_source", "llava_source", "make_key", "prepare_image", "run_conversion",
           "synthetic_captions_source", "textvqa_source", "vqa_source", "convert_synthetic_video",
           "synthetic_video_source"]
