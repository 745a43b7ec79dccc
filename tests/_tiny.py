"""What the model tests build: the tiny random model (`vlm.compose.model_config()`; trained by
`python train.py experiment=tiny_random`) with overrides, real photos from scikit-image, and a mixed batch
(several images per sample, different tile counts and details, a text-only sample)."""

from __future__ import annotations

import functools

import torch
from PIL import Image

from vlm.compose import model_config
from vlm.model import VLM
from vlm.processor import Processor, collate

CLOSED_GATES = "++model.fusion.gate_init=0.0"  # Flamingo's init (the tiny default opens them: configs/model/fusion)
FROZEN_PAIR = ("model.freeze.llm=true", "model.freeze.resamplers=false")  # the design: only the LLM frozen, as real
TINY_VIT = "model/vision=tiny_vit"  # a ViT, masked inside the encoder (the default is a ResNet)
LMS = ["tiny_llama", "tiny_qwen2", "tiny_opt", "tiny_gpt2"]
LORA = "model.lm.lora={r: 4, alpha: 8, targets: [q_proj, v_proj]}"


def saved_tiny_lm(folder) -> list[str]:
    """The tiny Llama saved as a pretrained folder (weights + the byte tokenizer), so that the VLM loads it from its
    source as it would a real LLM: the overrides that use it. A sourced frozen LLM is not in checkpoints."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from vlm.tokenizer import byte_tokenizer

    lm = model_config().lm
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**lm.hf_config)).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return [f"model.lm.name={folder}", "model.lm.hf_config=null", "model.freeze.llm=true"]


@functools.cache
def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    from skimage import data

    base = [data.astronaut(), data.coffee(), data.chelsea()][seed % 3]
    return Image.fromarray(base).resize((w, h), Image.BICUBIC)


def build(*overrides: str, seed: int = 0) -> tuple[VLM, Processor]:
    """The tiny default with `overrides`, seeded."""
    torch.manual_seed(seed)
    cfg = model_config(*overrides)
    model = VLM(cfg)
    return model, Processor(cfg, model.tokenizer)


def open_gates(model: VLM, attn: float = 0.5, ff: float | None = None) -> None:
    """Set every cross-attention gate (so the images show in the logits)."""
    for block in model.fusion.blocks:
        block.attn_gate.data.fill_(attn)
        if ff is not None:
            block.ff_gate.data.fill_(ff)


def mixed_batch(proc: Processor, padding_side: str = "right", labels: bool = True) -> dict:
    """Several images per sample, different tile counts and details in one batch, and a text-only sample."""
    samples = [
        proc.encode("<image>What is written in the corner? A cat.", [photo(1024, 700)]),
        proc.encode("First <image> then <image> compare them.", [photo(300, 200, 1), photo(800, 1200, 2)],
                    details=["low", "high"]),
        proc.encode("no image here at all"),
    ]
    if labels:
        for s in samples:
            s["labels"] = s["input_ids"].clone()
    return collate(samples, pad_token_id=proc.tokenizer.pad_token_id, padding_side=padding_side)


@torch.no_grad()
def nontrivial_blip2(hf: torch.nn.Module) -> torch.nn.Module:
    """A transformers BLIP-2 model with random LayerNorm affines and queries (its init has weight 1, bias 0 and zero
    queries): a parity test must not pass because a norm or the queries were skipped."""
    for m in hf.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0.0, 0.2)
    hf.query_tokens.normal_()
    return hf.eval()


def mp4(n: int = 20, w: int = 64, h: int = 48, rate: int = 10) -> bytes:
    """A real MPEG-4 clip (PyAV's encoder): frame i is a flat colour whose red channel is 12 * i."""
    import io

    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            frame = np.zeros((h, w, 3), np.uint8)
            frame[..., 0] = 12 * i
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
