"""The LM adapter (vlm/lm.py): the loss over supervised targets only, the decode loop with and without caches, batched
and seeded generation, activation checkpointing that really recomputes the decoder layers and their cross-attention,
and no deprecated transformers API."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from _tiny import CLOSED_GATES, FROZEN_PAIR, build, mixed_batch, open_gates, photo

from vlm.processor import collate
from vlm.tokenizer import IGNORE_INDEX


def _qa(proc, answer: str, image=None):
    """A supervised sample: unsupervised prompt (with an image), the answer supervised."""
    return proc.encode_pieces([("<image>What is it?", False), (f" {answer}</s>", True)], [image or photo(600, 300)])


def test_loss_is_the_mean_over_supervised_targets():
    """The loss is the mean cross-entropy of exactly the answer tokens (computed here from the logits on its own),
    whatever the labels say at image placeholders, and a sample's token losses do not change when a longer sample
    pads it in the batch."""
    model, proc = build("model/fusion=prefix")  # 65 + 129 x 2 image placeholders in the text
    pad = proc.tokenizer.pad_token_id
    a = _qa(proc, "a cat")
    batch = collate([a], pad_token_id=pad)
    out = model(batch)
    labels = batch["labels"][0]
    answer = (labels != IGNORE_INDEX).nonzero()[:, 0]  # positions of the answer tokens
    assert len(answer) == len(" a cat") + 1  # byte tokens and the EOS
    logp = F.log_softmax(out.logits[0].float(), dim=-1)  # (T, W)
    expected = -logp[answer - 1, labels[answer]].mean()  # token t is predicted at position t - 1
    torch.testing.assert_close(out.loss, expected)

    marked = dict(batch, labels=batch["input_ids"].clone())  # image placeholders "supervised" too
    marked["labels"][batch["input_ids"] != proc.image_token_id] = batch["labels"][batch["input_ids"] !=
                                                                                 proc.image_token_id]
    assert (marked["labels"] == proc.image_token_id).sum() == 65 + 2 * 129
    torch.testing.assert_close(model(marked).loss, out.loss)  # never supervised

    longer = _qa(proc, "a much longer answer than the first", photo(1100, 300, 1))
    both = collate([a, longer], pad_token_id=pad)
    assert both["attention_mask"][0].sum() < both["attention_mask"].shape[1]  # sample 0 right-padded
    sums = [model.lm.loss(o.logits[:1], model.loss_labels(b)[:1], num_tokens=1)
            for o, b in ((out, batch), (model(both), both))]
    torch.testing.assert_close(sums[0], sums[1], atol=1e-4, rtol=1e-5)
    assert model.num_label_tokens(both) == len(answer) + len(" a much longer answer than the first") + 1


@pytest.mark.parametrize("overrides", [[], ["model/fusion=prefix"], ["model/lm=tiny_gpt2"],
                                       ["model/lm=tiny_opt", "model/resampler=tiny_qformer"],
                                       ["model/lm=tiny_qwen2", "model.fusion.only_immediate=false"],
                                       ["model/lm=tiny_t5", "model/fusion=prefix"]])
def test_generation_with_cache_equals_without(overrides):
    """The LM's KV cache and the media K/V cache change nothing: every step recomputed from scratch gives the same
    tokens."""
    model, proc = build(*overrides)
    model.eval()
    if model.cfg.fusion.kind == "xattn":
        open_gates(model, 0.5, 0.5)
    batch = mixed_batch(proc, padding_side="left", labels=False)
    cached = model.generate(batch, max_new_tokens=12, use_cache=True, eos_token_id=-1)
    uncached = model.generate(batch, max_new_tokens=12, use_cache=False, eos_token_id=-1)
    assert cached.shape == (3, 12)
    assert torch.equal(cached, uncached)


def test_batched_left_padded_generation_equals_one_by_one():
    model, proc = build()
    model.eval()
    batch = mixed_batch(proc, padding_side="left", labels=False)
    together = model.generate(batch, max_new_tokens=8, eos_token_id=-1)
    samples = [proc.encode("<image>What is written in the corner? A cat.", [photo(1024, 700)])]
    alone = model.generate(collate(samples, pad_token_id=proc.tokenizer.pad_token_id), max_new_tokens=8,
                           eos_token_id=-1)
    assert torch.equal(together[0], alone[0])


def test_generation_stops_at_eos_and_pads_after_it():
    model, proc = build()
    model.eval()
    batch = mixed_batch(proc, padding_side="left", labels=False)
    free = model.generate(batch, max_new_tokens=6, eos_token_id=-1)
    eos = int(free[0, 2])  # make sample 0's third token an EOS
    first = int((free[0] == eos).nonzero()[0, 0])  # where sample 0 emits it first
    stopped = model.generate(batch, max_new_tokens=6, eos_token_id=[eos, -1])
    assert torch.equal(stopped[0, :first + 1], free[0, :first + 1])
    assert (stopped[0, first + 1:] == proc.tokenizer.pad_token_id).all()
    assert (free != proc.image_token_id).all()  # the image token is never generated


def test_sampling_is_seeded():
    model, proc = build()
    model.eval()
    batch = mixed_batch(proc, padding_side="left", labels=False)
    a, b, c = (model.generate(batch, 6, do_sample=True, temperature=1.0, top_p=0.9,
                              generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_decoding_uses_no_deprecated_transformers_api():
    """No FutureWarning / DeprecationWarning from transformers while generating (the cache argument is the one the
    installed transformers names)."""
    model, proc = build()
    model.eval()
    batch = mixed_batch(proc, padding_side="left", labels=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        model.generate(batch, max_new_tokens=3)
        model(mixed_batch(proc))


@pytest.mark.parametrize("frozen_llm", [True, False], ids=["frozen_llm", "trained_llm"])
@pytest.mark.parametrize("lm", ["tiny_llama", "tiny_qwen2"])
def test_activation_checkpointing_recomputes_layers_and_cross_attention(frozen_llm, lm):
    """With `model.lm.gradient_checkpointing`, every decoder layer and the cross-attention block before it run again
    in backward (counted on submodules, which the recompute calls), for a frozen LLM in eval mode too; the
    gradients equal those of a run without checkpointing."""
    freeze = FROZEN_PAIR if frozen_llm else ("model.freeze.llm=false",)
    grads, counts = [], []
    for checkpointing in (False, True):
        model, proc = build(*freeze, f"model/lm={lm}", f"model.lm.gradient_checkpointing={checkpointing}")
        model.train()
        assert model.lm.training != frozen_llm
        open_gates(model, 0.5, 0.5)
        calls = {"layer": 0, "xattn": 0}
        count = lambda key, calls=calls: lambda *_: calls.__setitem__(key, calls[key] + 1)
        for layer in model.lm.layers:
            layer.mlp.register_forward_pre_hook(count("layer"))
        for block in model.fusion.blocks:
            block.ff.register_forward_pre_hook(count("xattn"))
        model(mixed_batch(proc)).loss.backward()
        counts.append(calls)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    n_layers, n_blocks = len(model.lm.layers), len(model.fusion.blocks)
    assert counts[0] == {"layer": n_layers, "xattn": n_blocks}  # one forward each
    assert counts[1] == {"layer": 2 * n_layers, "xattn": 2 * n_blocks}  # and once more in backward
    assert grads[0].keys() == grads[1].keys()
    assert any(k.startswith("lm.") for k in grads[0]) != frozen_llm
    assert any(k.startswith("fusion.") for k in grads[0])
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-5, msg=k)


def test_t5_checkpointing_recomputes_both_stacks_with_the_same_gradients():
    """The encoder-decoder adapter: with `model.lm.gradient_checkpointing` every encoder and decoder block runs again
    in backward, and the gradients (the prefix-LM loss through both stacks into the projector) are unchanged."""
    grads, counts = [], []
    for checkpointing in (False, True):
        model, proc = build("model/lm=tiny_t5", "model/fusion=prefix",
                            f"model.lm.gradient_checkpointing={checkpointing}")
        model.train()
        calls = [0]
        for block in model.lm.blocks:  # T5Block: its last sub-layer is the feed-forward
            block.layer[-1].register_forward_pre_hook(lambda *_, c=calls: c.__setitem__(0, c[0] + 1))
        batch = collate([_qa(proc, "a cat"), _qa(proc, "two dogs", photo(300, 200, 1))],
                        pad_token_id=proc.tokenizer.pad_token_id)
        model(batch, logits=False).loss.backward()
        counts.append(calls[0])
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert model.lm.kind == "seq2seq" and counts == [len(model.lm.blocks), 2 * len(model.lm.blocks)]
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("fusion.") for k in grads[0])
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-5, msg=k)


def test_checkpointing_is_off_without_gradients():
    model, proc = build("model.lm.gradient_checkpointing=true", CLOSED_GATES)
    calls = []
    model.lm.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(mixed_batch(proc))
    model.eval().generate(mixed_batch(proc, padding_side="left", labels=False), max_new_tokens=2)
    assert len(calls) == 1 + 2  # the forward; generation's prefill and one step


def test_lora_trains_only_the_adapters_and_checkpoints_hold_only_trained_weights(tmp_path):
    """model.lm.lora on a frozen LLM loaded from its folder: fresh adapters leave the LLM as it was (B = 0); training
    changes only the adapters and the VLM's trained parts; the checkpoint holds the adapters and no base weight of the
    LLM; loaded back it gives the same logits, and merged for inference the same up to float rounding."""
    from _tiny import LORA, saved_tiny_lm

    from vlm.checkpoint import load_checkpoint, save_checkpoint

    sourced = saved_tiny_lm(tmp_path / "lm")
    model, proc = build(*sourced, LORA)
    plain, _ = build(*sourced)
    batch = mixed_batch(proc)
    assert len(model.lm.adapters()) == 4  # q_proj and v_proj of 2 layers
    assert all(not p.any() for m in model.lm.adapters() for p in m.lora_B.parameters())
    torch.testing.assert_close(model.lm.model(inputs_embeds=model.lm.embed(batch["input_ids"])).logits,
                               plain.lm.model(inputs_embeds=plain.lm.embed(batch["input_ids"])).logits)

    tensors = lambda: {**dict(model.named_parameters()), **dict(model.named_buffers())}  # each tensor once
    before = {k: v.detach().clone() for k, v in tensors().items()}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(batch).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {k for k, v in tensors().items() if not torch.equal(v, before[k])}
    assert changed <= trained
    lm_changed = {k for k in changed if k.startswith("lm.")}
    assert lm_changed and all(".lora_" in k for k in lm_changed)
    assert any(k.startswith("fusion.") for k in changed)

    saved = model.checkpoint_state_dict()
    adapters = {n for n, _ in model.named_parameters() if ".lora_" in n}
    assert {k for k in saved if k.startswith("lm.")} == adapters
    path = save_checkpoint(tmp_path / "checkpoint.pt", model)
    model.eval()
    reference = model(batch).logits
    torch.testing.assert_close(load_checkpoint(path).eval()(batch).logits, reference, rtol=0, atol=0)
    merged = load_checkpoint(path, inference=True).eval()
    assert all(m.merged for m in merged.lm.adapters())
    torch.testing.assert_close(merged(batch).logits, reference, rtol=1e-5, atol=1e-5)
    gen = mixed_batch(proc, padding_side="left", labels=False)
    assert torch.equal(merged.generate(gen, max_new_tokens=6), model.generate(gen, max_new_tokens=6))


def test_lora_refuses_a_target_the_llm_does_not_have():
    with pytest.raises(ValueError, match=r"lora.targets \['qkv'\]: no such layer"):
        build("model.lm.lora={targets: [qkv]}")
