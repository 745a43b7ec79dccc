"""Whole-model import (`vlm.hf_import.from_hf`): transformers' BLIP-2, with an OPT and a T5 LM, built small from configs
with random weights, against our imported `VLM`: logits to 1e-5 and identical greedy generations, on a real photo
through both models' own preprocessing (BLIP-2's processor and ours).

Shapes: B samples, T text tokens, W vocabulary, n new tokens.
"""

from __future__ import annotations

import pytest
import torch
from _tiny import nontrivial_blip2
from PIL import Image
from skimage import data as skdata
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

from vlm.hf_import import blip2_text, from_hf
from vlm.processor import Processor, collate
from vlm.tokenizer import IGNORE_INDEX, byte_tokenizer
from vlm.vision import CLIP_MEAN, CLIP_STD

SIZE, QUERIES = 32, 6
PAD, BOS, EOS, IMAGE = 256, 257, 258, 259  # the byte tokenizer's specials; <image> is added next (vlm.tokenizer)
TEXT = {
    "opt": dict(model_type="opt", vocab_size=300, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=PAD,
                bos_token_id=BOS, eos_token_id=EOS),
    "t5": dict(model_type="t5", vocab_size=300, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
               num_heads=4, pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD),
}


def blip2(lm: str) -> Blip2ForConditionalGeneration:
    torch.manual_seed(0)
    config = Blip2Config(
        vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=SIZE, patch_size=8),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            encoder_hidden_size=24, cross_attention_frequency=1),
        text_config=TEXT[lm], num_query_tokens=QUERIES, image_token_index=IMAGE,
    )
    hf = Blip2ForConditionalGeneration(config).eval()
    nontrivial_blip2(hf)
    with torch.no_grad():
        for name, p in hf.language_model.named_parameters():  # layers louder than the residual stream: a random LM
            if p.dim() == 2 and "embed" not in name and "shared" not in name:  # otherwise only echoes its input
                p.mul_(4.0)
    return hf


def photos() -> list[Image.Image]:
    """Two real photos at the model's size (both resizes are then the identity)."""
    return [Image.fromarray(skdata.astronaut()).resize((SIZE, SIZE)), Image.fromarray(skdata.coffee()).resize(
        (SIZE, SIZE))]


def hf_processor() -> Blip2Processor:
    images = BlipImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return Blip2Processor(images, tok, num_query_tokens=QUERIES)


PROMPTS = ["Question: what is this? Answer:", "Question: colour? Answer:"]
ANSWERS = [" a cup", " red and white"]


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_blip2_logits_and_greedy_generations_equal_transformers(lm):
    hf = blip2(lm)
    ours = from_hf(hf)
    assert ours.lm.kind == {"opt": "causal", "t5": "seq2seq"}[lm]
    proc = Processor(ours.cfg, ours.tokenizer)
    theirs_proc = hf_processor()
    images = photos()
    prompt_samples = [proc.encode(blip2_text(ours, p), [im], ["high"], add_bos=False) for p, im in zip(PROMPTS, images)]
    ref = theirs_proc(images=images, text=PROMPTS, return_tensors="pt", padding=True)
    for b, s in enumerate(prompt_samples):  # the same tokens as BLIP-2's processor, image tokens first
        n = int(ref["attention_mask"][b].sum())
        assert s["input_ids"].tolist() == ref["input_ids"][b, :n].tolist()
        assert s["input_ids"][:QUERIES].tolist() == [IMAGE] * QUERIES
    assert ours.vision.normalize(prompt_samples[0]["pixel_values"]).sub(ref["pixel_values"][:1]).abs().max() < 1e-5

    # teacher-forced logits: prompt + answer (right padded); BLIP-2 takes the answer as labels (T5) or in the text
    answers = [ours.tokenizer(a, add_special_tokens=False)["input_ids"] for a in ANSWERS]
    train = [proc.encode_pieces([(blip2_text(ours, p), False), (a, True)], [im], ["low"], add_bos=False)
             for p, a, im in zip(PROMPTS, ANSWERS, images)]
    batch = collate(train, pad_token_id=PAD)
    with torch.no_grad():
        logits = ours(batch).logits  # (B, T, W): logits[:, t] predicts token t + 1
        if lm == "opt":  # the whole padded batch, answers in the text
            theirs = hf(pixel_values=ref["pixel_values"], input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"]).logits  # (B, T, W)
        else:  # prompts into the encoder (BLIP-2's processor's padded batch), answers as labels
            labels = torch.full((len(answers), max(map(len, answers))), IGNORE_INDEX)
            for b, a in enumerate(answers):
                labels[b, :len(a)] = torch.tensor(a)
            theirs = hf(pixel_values=ref["pixel_values"], input_ids=ref["input_ids"],
                        attention_mask=ref["attention_mask"], labels=labels).logits  # (B, m, W)
        for b, (s, a) in enumerate(zip(prompt_samples, answers)):
            n, m = len(s["input_ids"]), len(a)
            mine = logits[b, :n + m - 1] if lm == "opt" else logits[b, n - 1:n + m - 1]
            torch.testing.assert_close(mine, theirs[b, :n + m - 1] if lm == "opt" else theirs[b, :m],
                                       atol=1e-5, rtol=1e-5)
        assert torch.allclose(ours(batch).loss, ours(batch, logits=False).loss, atol=1e-6)

    # greedy generation, batched (left padded) against BLIP-2's generate on the same padded batch
    left = collate(prompt_samples, pad_token_id=PAD, padding_side="left")
    mine = ours.generate(left, max_new_tokens=8)  # (B, n)
    theirs = hf.generate(pixel_values=ref["pixel_values"], input_ids=left["input_ids"],
                         attention_mask=left["attention_mask"], max_new_tokens=8, do_sample=False)
    theirs = theirs[:, left["input_ids"].shape[1]:] if lm == "opt" else theirs[:, 1:]  # drop prompt / start token
    assert mine.shape[1] == 8 and mine.tolist() == theirs.tolist()
    assert torch.equal(mine, ours.generate(left, max_new_tokens=8, use_cache=False))


def test_from_hf_refuses_what_it_cannot_import():
    hf = blip2("opt")
    hf.config.image_token_index = 299
    with pytest.raises(ValueError, match="image_token_index"):
        from_hf(hf)
    with pytest.raises(ValueError, match="no importer"):
        from_hf(hf.language_model)


def test_t5_prefix_lm_split_and_loss():
    """The split: the encoder gets every token before the first supervised one; the loss is the decoder's."""
    ours = from_hf(blip2("t5"))
    lm = ours.lm
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[0, 3:5] = torch.tensor([5, 6])
    labels[1, 4:] = torch.tensor([7, 8])
    first, outputs, _ = lm.split(mask, labels, torch.zeros(2, 6, 1))
    assert first.tolist() == [3, 4] and outputs.tolist() == [2, 2]
    first, outputs, _ = lm.split(mask, None, torch.zeros(2, 6, 1))  # no labels: one prediction after the prompt
    assert first.tolist() == [5, 6] and outputs.tolist() == [1, 1]
    with pytest.raises(ValueError, match="no prompt"):
        lm.split(mask, torch.where(mask.bool(), 1, IGNORE_INDEX), torch.zeros(2, 6, 1))
    with pytest.raises(ValueError, match="prefix"):
        ours.cfg.fusion.kind = "xattn"
        from vlm.fusion import build_fusion
        build_fusion(ours.cfg.fusion, lm=lm, media_dim=32)
