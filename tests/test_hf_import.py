"""Whole-model import (`vlm.hf_import.from_hf`): transformers' BLIP-2, with an OPT and a T5 LM, and IDEFICS (v1), built
small from configs with random weights, against our imported `VLM`: logits to 1e-5 and identical greedy generations, on
real photos through both models' own preprocessing (BLIP-2's / IDEFICS's processor and ours).

Shapes: B samples, T text tokens, W vocabulary, n new tokens.
"""

from __future__ import annotations

import pytest
import torch
from _tiny import nontrivial_blip2
from PIL import Image
from skimage import data as skdata
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessor,
    IdeficsConfig,
    IdeficsForVisionText2Text,
    IdeficsImageProcessor,
)

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


# ------------------------------------------------------------------------------------------------- IDEFICS (v1)
def idefics(*, qk_norms: bool, alpha_type: str) -> IdeficsForVisionText2Text:
    """transformers' IDEFICS small from a config: 4 LLaMA layers, a gated cross-attention block before layers 0 and 2,
    the Perceiver, a CLIP tower, `<image>` (259) in the decoupled additional vocabulary, as in the real checkpoints."""
    torch.manual_seed(0)
    config = IdeficsConfig(
        vocab_size=IMAGE, additional_vocab_size=2, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, cross_layer_interval=2, qk_layer_norms=qk_norms, alpha_type=alpha_type,
        use_resampler=True, max_position_embeddings=128,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        vision_config=dict(embed_dim=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=SIZE, patch_size=8),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=6, resampler_depth=2, resampler_n_heads=2,
                              resampler_head_dim=8),
    )
    hf = IdeficsForVisionText2Text(config).eval()
    with torch.no_grad():  # its init leaves the gates at 0, every norm at 1 (0), the latents tiny: randomise them all,
        for name, p in hf.named_parameters():  # so that skipping any of them shows
            if "alpha" in name:
                p.normal_()
            elif "norm" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0.0, 0.2)
            elif p.dim() == 2 and "vision_model" not in name and "embed" not in name:
                p.mul_(4.0)  # layers louder than the residual stream: a random LM otherwise only echoes its input
        hf.model.perceiver_resampler.latents.normal_()
    return hf


IDEFICS_PROMPTS = ["User: look first. <image>What is it? <image>And this one? Assistant:",
                   "<image>Colour? Assistant:"]  # text before the first image; two images, then one


def idefics_inputs(ours, images: list[list[Image.Image]], batch: dict) -> dict:
    """What transformers' IDEFICS takes for our batch: its image processor's pixels (B, n, C, S, S), zero for the
    missing images, and the image attention mask its processor makes from the same ids (B, T, n)."""
    from transformers.models.idefics.processing_idefics import (
        image_attention_mask_for_packed_input_ids,
        incremental_to_binary_attention_mask,
    )

    proc = IdeficsImageProcessor(image_size=SIZE, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    n = max(map(len, images))
    pixels = torch.zeros(len(images), n, 3, SIZE, SIZE)
    for b, ims in enumerate(images):
        pixels[b, :len(ims)] = proc(ims, return_tensors="pt")  # (n, C, S, S)
    latest, _ = image_attention_mask_for_packed_input_ids(batch["input_ids"], ours.tokenizer, return_tensors="pt")
    mask = incremental_to_binary_attention_mask(latest, return_tensors="pt", num_classes=n)  # (B, T, n)
    return dict(pixel_values=pixels, image_attention_mask=mask, input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"])


@pytest.mark.parametrize("qk_norms,alpha_type", [(True, "vector"), (False, "float")])
def test_idefics_logits_and_greedy_generations_equal_transformers(qk_norms, alpha_type):
    hf = idefics(qk_norms=qk_norms, alpha_type=alpha_type)
    ours = from_hf(hf)
    assert ours.fusion.layer_ids == [0, 2] and ours.image_token_id == IMAGE
    proc = Processor(ours.cfg, ours.tokenizer)
    astronaut, coffee = photos()
    chelsea = Image.fromarray(skdata.chelsea()).resize((SIZE, SIZE))
    images = [[astronaut, coffee], [chelsea]]
    samples = [proc.encode_pieces([(p, False), (a, True)], ims, ["low"] * len(ims))
               for p, a, ims in zip(IDEFICS_PROMPTS, ANSWERS, images)]
    batch = collate(samples, pad_token_id=PAD)  # right padded: teacher-forced logits over the answers
    inputs = idefics_inputs(ours, images, batch)
    assert ours.vision.normalize(samples[0]["pixel_values"]).sub(inputs["pixel_values"][0]).abs().max() < 1e-5
    with torch.no_grad():
        mine = ours(batch).logits  # (B, T, W)
        theirs = hf(**inputs).logits  # (B, T, W)
        swapped = hf(**inputs | {"pixel_values": inputs["pixel_values"].flip(1)}).logits  # (B, T, W)
    real = batch["attention_mask"].bool()  # (B, T)
    torch.testing.assert_close(mine[real], theirs[real], atol=1e-5, rtol=1e-5)
    first_image = int((batch["input_ids"][0] == IMAGE).nonzero()[0])
    before, after = slice(0, first_image), slice(first_image, int(real[0].sum()))
    assert (theirs[0, after] - swapped[0, after]).abs().max() > 1e-2  # the images matter where they are seen
    torch.testing.assert_close(mine[0, before], theirs[0, before], atol=1e-5, rtol=1e-5)  # text before any image

    prompts = [proc.encode(p, ims, ["low"] * len(ims)) for p, ims in zip(IDEFICS_PROMPTS, images)]
    left = collate(prompts, pad_token_id=PAD, padding_side="left")
    mine = ours.generate(left, max_new_tokens=8)  # (B, n)
    theirs = hf.generate(**idefics_inputs(ours, images, left), max_new_tokens=8, do_sample=False)  # (B, T + n)
    theirs = theirs[:, left["input_ids"].shape[1]:]
    assert mine.shape[1] == 8 and mine.tolist() == theirs.tolist()
    assert mine[0].tolist() != mine[1].tolist() and len(set(mine.flatten().tolist())) > 1  # not one token repeated
    assert torch.equal(mine, ours.generate(left, max_new_tokens=8, use_cache=False))


def test_idefics_without_its_resampler_is_refused():
    hf = idefics(qk_norms=False, alpha_type="float")
    hf.config.use_resampler = False
    with pytest.raises(ValueError, match="use_resampler"):
        from_hf(hf)
