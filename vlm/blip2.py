"""BLIP-2 stage 1: the Q-Former learns against the frozen encoder's features with three objectives, each under its own
self-attention mask over [queries; text] in the one shared transformer (`vlm.resampler.stage1_mask`):

- ITC, image-text contrastive (uni-modal mask): every query output and the text's [CLS] output are projected to
  `embed_dim` and L2-normalised; an image-text similarity is that of the most similar query; InfoNCE over the batch
  in both directions, with a learned temperature;
- ITM, image-text matching (bidirectional mask): a binary head on the query outputs (averaged over the queries), on
  the batch's positive pairs and on one hard negative per image and per text, drawn from the ITC similarities;
- ITG, image-grounded text generation (multimodal causal mask): the text's first token replaced by a decoder token,
  each token predicted from the queries and the text before it.

Model level only (no data, no Lightning): `vlm.blip2_stage1` trains it. The Q-Former is the stage-2 model's global
resampler: its weights (`qformer.*`) go into `visual.global_resampler.*` through `init_from`.

Shapes: B pairs in the batch, P patches, L queries (class token included), T text tokens, D Q-Former width,
E projection width (`embed_dim`), W text vocabulary, Ni / Nt images / texts scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm.layers import activation
from vlm.resampler import QFormer
from vlm.tokenizer import IGNORE_INDEX


@dataclass
class Stage1Config:
    embed_dim: int = 256  # BLIP-2's image_text_hidden_size
    temperature: float = 0.07  # ITC's initial temperature (learned, clamped to [0.001, 0.5] as BLIP-2)
    itg_label_smoothing: float = 0.1  # as BLIP-2's ITG loss
    # ITG's first token. BLIP-2 adds a [DEC] token to BERT's vocabulary; we take BERT's unused [unused0] row (no
    # vocabulary resize, so the text embeddings stay BERT's table).
    decoder_token_id: int = 1
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # itc, itm, itg: the total loss is their weighted sum


class LMHead(nn.Module):
    """BERT's prediction head: dense, activation, LayerNorm, then a decoder tied to the word embeddings (+ bias)."""

    def __init__(self, word: nn.Embedding, eps: float, activation_name: str):
        super().__init__()
        dim = word.embedding_dim
        self.dense, self.act, self.norm = nn.Linear(dim, dim), activation(activation_name), nn.LayerNorm(dim, eps=eps)
        self.word = word  # tied, not copied: the same Parameter as the text embeddings
        self.bias = nn.Parameter(torch.zeros(word.num_embeddings))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.norm(self.act(self.dense(x))), self.word.weight, self.bias)  # (B, T, D) -> (B, T, W)


class QFormerStage1(nn.Module):
    """The Q-Former with BLIP-2's stage-1 heads: `vision_proj`, `text_proj` (D -> E), `itm_head` (D -> 2), `lm_head`
    (ITG, tied to the text embeddings) and the ITC temperature."""

    # vs LAVIS Blip2Qformer: one pass per objective with an explicit mask (LAVIS reuses the query keys/values as the
    # ITG decoder's past); negatives from this batch only (LAVIS gathers every rank's features first).

    def __init__(self, qformer: QFormer, cfg: Stage1Config | None = None):
        super().__init__()
        if qformer.text is None:
            raise ValueError("BLIP-2 stage 1 needs a Q-Former with a text branch (resampler config `text`)")
        self.cfg = cfg or Stage1Config()
        dim, e = qformer.out_dim, self.cfg.embed_dim
        self.qformer = qformer
        self.vision_proj, self.text_proj, self.itm_head = nn.Linear(dim, e), nn.Linear(dim, e), nn.Linear(dim, 2)
        self.lm_head = LMHead(qformer.text.word, qformer.cfg.layer_norm_eps, qformer.cfg.activation)
        self.temp = nn.Parameter(torch.tensor(self.cfg.temperature))
        for m in (self.vision_proj, self.text_proj, self.itm_head, self.lm_head.dense):
            QFormer._init_bert(m)

    # -------------------------------------------------------------------------------------------------- scores
    def image_features(self, media: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, P, Dv) -> normalised query features (B, L, E): the query outputs alone (what the itc mask gives them)."""
        return F.normalize(self.vision_proj(self.qformer(media, mask)), dim=-1)

    def text_features(self, input_ids: Tensor, text_mask: Tensor) -> Tensor:
        """(B, T) -> normalised [CLS] feature (B, E)."""
        return F.normalize(self.text_proj(self.qformer.encode_text(input_ids, text_mask)[:, 0]), dim=-1)

    @staticmethod
    def similarity(image_feats: Tensor, text_feats: Tensor) -> Tensor:
        """Cosine similarity of each image and text, that of the most similar query: (Ni, L, E), (Nt, E) -> (Ni, Nt)."""
        return torch.einsum("ile,te->ilt", image_feats, text_feats).amax(dim=1)  # (Ni, L, Nt) -> (Ni, Nt)

    def itm_logits(self, media: Tensor, mask: Tensor | None, input_ids: Tensor, text_mask: Tensor) -> Tensor:
        """Pairs (media[b], text[b]) -> (B, 2) logits (index 1: they match), the head averaged over the queries."""
        queries, _ = self.qformer.encode(media, mask, input_ids, text_mask, "itm")  # (B, L, D)
        return self.itm_head(queries).mean(dim=1)  # (B, L, 2) -> (B, 2)

    # -------------------------------------------------------------------------------------------------- losses
    def forward(self, media: Tensor, mask: Tensor | None, input_ids: Tensor, text_mask: Tensor,
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """A batch of B >= 2 matching pairs -> {"loss", "itc", "itm", "itg"} (scalars)."""
        b = media.shape[0]
        if b < 2:
            raise ValueError("BLIP-2 stage 1 needs at least 2 pairs a batch (ITC and ITM contrast them)")
        # ITC: one pass under the uni-modal mask (queries and text do not see each other)
        queries, text = self.qformer.encode(media, mask, input_ids, text_mask, "itc")  # (B, L, D), (B, T, D)
        image_feats = F.normalize(self.vision_proj(queries), dim=-1)  # (B, L, E)
        text_feats = F.normalize(self.text_proj(text[:, 0]), dim=-1)  # (B, E)
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        sim = self.similarity(image_feats, text_feats) / self.temp  # (B, B): image i, text j
        target = torch.arange(b, device=media.device)
        itc = (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target)) / 2

        # ITM: the positives, then each image with a hard negative text and each text with a hard negative image,
        # drawn in proportion to their ITC similarity (never the pair itself)
        with torch.no_grad():
            off = ~torch.eye(b, dtype=torch.bool, device=media.device)  # (B, B)
            weights = sim.detach().float().softmax(dim=1) * off  # (B, B)
            neg_text = torch.multinomial(weights + 1e-12 * off, 1, generator=generator).squeeze(1)  # (B,)
            weights = sim.detach().float().t().softmax(dim=1) * off
            neg_image = torch.multinomial(weights + 1e-12 * off, 1, generator=generator).squeeze(1)  # (B,)
        pick_media = torch.cat([media, media, media[neg_image]])  # (3B, P, Dv)
        pick_mask = None if mask is None else torch.cat([mask, mask, mask[neg_image]])  # (3B, P)
        pick_ids = torch.cat([input_ids, input_ids[neg_text], input_ids])  # (3B, T)
        pick_text_mask = torch.cat([text_mask, text_mask[neg_text], text_mask])  # (3B, T)
        logits = self.itm_logits(pick_media, pick_mask, pick_ids, pick_text_mask)  # (3B, 2)
        labels = torch.cat([target.new_ones(b), target.new_zeros(2 * b)])  # (3B,)
        itm = F.cross_entropy(logits, labels)

        # ITG: the caption from the queries, [DEC] first (multimodal causal mask)
        dec_ids = input_ids.clone()
        dec_ids[:, 0] = self.cfg.decoder_token_id
        _, text = self.qformer.encode(media, mask, dec_ids, text_mask, "itg")  # (B, T, D)
        labels = input_ids.masked_fill(~text_mask.bool(), IGNORE_INDEX)[:, 1:]  # (B, T-1): token t+1 from <= t
        scores = self.lm_head(text[:, :-1])  # (B, T-1, W)
        itg = F.cross_entropy(scores.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                              label_smoothing=self.cfg.itg_label_smoothing)
        w = self.cfg.weights
        return {"loss": w[0] * itc + w[1] * itm + w[2] * itg, "itc": itc, "itm": itm, "itg": itg}


def retrieval_metrics(sim: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Image-text retrieval recall from an (N, N) similarity whose diagonal holds the true pairs (one text per image):
    {"i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"} in percent, and `chance_r<k>` (k / N, percent)."""
    n = sim.shape[0]
    if sim.shape != (n, n):
        raise ValueError(f"retrieval needs one text per image: a square similarity, got {tuple(sim.shape)}")
    truth = torch.arange(n, device=sim.device)
    out = {}
    for name, s in (("i2t", sim), ("t2i", sim.t())):
        rank = (s > s[truth, truth][:, None]).sum(dim=1)  # (N,): how many candidates score above the true one
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * (rank < k).float().mean().item()
    out.update({f"chance_r{k}": 100.0 * min(k, n) / n for k in ks})
    return out
