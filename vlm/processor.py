"""Text with `<image>` markers + images -> model inputs; collate to the flat batch `VLM.forward` takes.

Shared by the data pipeline, evaluation and the server, so placeholder counts always come from the fusion kind
(`vlm.fusion`) and the token budget (`vlm.tiling.token_budget`). Shapes: T text tokens, V views, S view side, I images,
B samples.
"""

from __future__ import annotations

import torch
from PIL import Image

from vlm.config import VLMConfig
from vlm.fusion import fusion_class
from vlm.images import Video
from vlm.tiling import TiledImage, ViewPositions, tile_image, tile_video, token_budget
from vlm.tokenizer import IGNORE_INDEX


class Processor:
    def __init__(self, cfg: VLMConfig, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.image_token = cfg.lm.image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.budget = token_budget(cfg)
        self._placeholders = fusion_class(cfg.fusion.kind).placeholders

    def detail_for(self, requested: str) -> str:
        """The detail an image is tiled at: what the sample / request asks, unless an ablation forces one."""
        return self.cfg.tiling.force_detail or requested

    def placeholders(self, plan) -> int:
        """Tokens one image occupies in the text: all its visual tokens (prefix) or one marker (xattn)."""
        return self._placeholders(self.budget.image(plan))

    def encode(self, text: str, images: list[Image.Image] = (), details: list[str] | None = None, *,
               add_bos: bool = True) -> dict:
        """One sample, unsupervised. `text` holds one `<image>` per image, where the image sits."""
        sample = self.encode_pieces([(text, False)], images, details, add_bos=add_bos)
        del sample["labels"]
        return sample

    def _tile(self, media: Image.Image | Video, detail: str, plan) -> TiledImage:
        """An image's views at its detail, or a video's (one low-detail view per frame, `VideoConfig`)."""
        if not isinstance(media, Video):
            return tile_image(media, detail, self.cfg.tiling, plan=plan)
        limit = self.cfg.video.max_frames
        if len(media) > limit:
            raise ValueError(f"a video of {len(media)} frames; this model takes at most {limit} "
                             f"(model.video.max_frames): sample fewer frames")
        return tile_video(media.frames, self.cfg.tiling)

    def encode_pieces(self, pieces: list[tuple[str, bool]], images: list[Image.Image] = (),
                      details: list[str] | None = None, *, add_bos: bool = True, plans=None) -> dict:
        """Text pieces, each (text, supervised), with `<image>` markers taking the images (or `Video`s) in order.
        Returns input_ids (T,), labels (T,) (-100 on unsupervised text and on every image token), and the views."""
        n_markers = sum(text.count(self.image_token) for text, _ in pieces)
        if n_markers != len(images):
            raise ValueError(f"text has {n_markers} {self.image_token} marker(s) but {len(images)} image(s) "
                             f"were given")
        details = [self.detail_for(d) for d in (details or ["auto"] * len(images))]
        plans = plans or [None] * len(images)  # plans of the original sizes, for images decoded in draft mode
        tiled = [self._tile(m, d, p) for m, d, p in zip(images, details, plans)]
        ids, labels = [], []
        if add_bos and self.tokenizer.bos_token_id is not None:
            ids, labels = [self.tokenizer.bos_token_id], [IGNORE_INDEX]
        next_image = iter(tiled)
        for text, supervised in pieces:
            chunks = text.split(self.image_token)
            for i, chunk in enumerate(chunks):
                if chunk:
                    chunk_ids = self.tokenizer(chunk, add_special_tokens=False)["input_ids"]
                    ids += chunk_ids
                    labels += chunk_ids if supervised else [IGNORE_INDEX] * len(chunk_ids)
                if i < len(chunks) - 1:
                    n = self.placeholders(next(next_image).plan)
                    ids += [self.image_token_id] * n
                    labels += [IGNORE_INDEX] * n
        sample = {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long),
                  "plans": [t.plan for t in tiled]}
        if tiled:
            sample |= {
                "pixel_values": torch.cat([t.pixels for t in tiled]),  # (V, 3, S, S) uint8
                "pixel_mask": torch.cat([t.mask for t in tiled]),  # (V, S, S)
                "view_positions": ViewPositions.cat([t.positions for t in tiled]),  # V views
                "views_per_image": torch.tensor([t.plan.num_views for t in tiled]),  # (I,)
            }
        return sample


def collate(samples: list[dict], *, pad_token_id: int, padding_side: str = "right") -> dict:
    """Pad text per batch (right for training, left for generation); concatenate views, never pad images."""
    T = max(len(s["input_ids"]) for s in samples)
    B = len(samples)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    has_labels = all("labels" in s for s in samples)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long) if has_labels else None
    for b, s in enumerate(samples):  # per-sample text copy in the collator, not in the model
        n = len(s["input_ids"])
        sl = slice(T - n, T) if padding_side == "left" else slice(0, n)
        input_ids[b, sl] = s["input_ids"]
        attention_mask[b, sl] = 1
        if has_labels:
            labels[b, sl] = s["labels"]
    with_images = [s for s in samples if "pixel_values" in s]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "images_per_sample": torch.tensor([len(s.get("views_per_image", ())) for s in samples])}
    if labels is not None:
        batch["labels"] = labels
    if with_images:
        for key in ("pixel_values", "pixel_mask", "views_per_image"):
            batch[key] = torch.cat([s[key] for s in with_images])
        batch["view_positions"] = ViewPositions.cat([s["view_positions"] for s in with_images])
    return batch


def to_device(batch: dict, device: torch.device | str) -> dict:
    """A batch's tensors (and view positions) on `device`; everything else as it is."""
    return {k: v.to(device) if torch.is_tensor(v) or isinstance(v, ViewPositions) else v for k, v in batch.items()}
