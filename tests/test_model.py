"""The composed VLM (vlm/model.py): what is frozen and what trains, and checkpoints that rebuild the same model."""

from __future__ import annotations

import pytest
import torch
from _tiny import CLOSED_GATES, FROZEN_PAIR, TINY_VIT, build, mixed_batch

FROZEN = {"vision", "visual.global_resampler", "visual.tile_resampler"}  # the tiny default, after stage 0


@pytest.mark.parametrize(("overrides", "frozen"), [
    ((), FROZEN),
    (FROZEN_PAIR, {"vision", "lm"}),  # the design: a frozen pretrained pair
    ((*FROZEN_PAIR, "model/fusion=prefix", "model/resampler=tiny_qformer"), {"vision", "lm"}),
    ((*FROZEN_PAIR, "model.share_resamplers=true"), {"vision", "lm"}),
    (("model.share_resamplers=true",), {"vision", "visual.global_resampler", "visual.tile_queries"}),
], ids=["default", "frozen_pair", "prefix_qformer", "shared", "shared_default"])
def test_optimizer_step_moves_only_trainable(overrides, frozen):
    model, proc = build(CLOSED_GATES, *overrides)
    model.train()
    top = lambda name: next((f for f in frozen if name == f or name.startswith(f + ".")), None)
    assert not model.vision.training and model.lm.training == ("lm" not in frozen)  # frozen parts stay in eval mode
    params = dict(model.named_parameters())
    assert {top(n) for n, p in params.items() if not p.requires_grad} == frozen
    assert all(p.requires_grad for n, p in params.items() if top(n) is None)
    trainable = {n: p.detach().clone() for n, p in params.items() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    batch = mixed_batch(proc)
    # Two steps: with tanh gates at 0 the first step can move only the gates (Flamingo's init), the second
    # moves the cross-attention projections too.
    for _ in range(2):
        opt.zero_grad()
        model(batch).loss.backward()
        assert all(p.grad is None for n, p in params.items() if n in before)
        opt.step()
    for n, value in before.items():
        assert torch.equal(params[n], value), f"frozen {n} changed"
    unchanged = [n for n, value in trainable.items() if torch.equal(params[n], value)]
    assert not unchanged, f"trainable parameters did not change: {unchanged}"
    # checkpoints hold the trained weights and the frozen parts built without weights (here: all of them)
    assert set(model.checkpoint_state_dict()) >= set(params)


@pytest.mark.parametrize("overrides", [(), (TINY_VIT, *FROZEN_PAIR), ("model.freeze.vision=false",)],
                         ids=["default", "frozen_vit", "trained_resnet"])
def test_checkpoint_round_trip_rebuilds_the_same_model(tmp_path, overrides):
    """save_checkpoint -> load_checkpoint in a differently seeded process state gives the same logits: frozen parts
    built without weights (the tiny encoder and LLM, stage-0 resamplers) travel in the checkpoint, since no source
    can rebuild them, and so do the buffers of trained modules (a trained ResNet's BatchNorm running statistics)."""
    from vlm.checkpoint import load_checkpoint, save_checkpoint

    model, proc = build(*overrides)
    with torch.no_grad():
        for p in model.fusion.parameters():  # move the trained weights away from their init
            p.add_(0.5)
    batch = mixed_batch(proc, labels=False)
    with torch.no_grad():
        model.train()(batch)  # moves BatchNorm running statistics of a trained encoder away from their init
    if "trained" in str(overrides):
        assert any(k.endswith("running_mean") for k in model.checkpoint_state_dict())
    path = save_checkpoint(tmp_path / "c.pt", model.eval())
    torch.manual_seed(1234)  # a different random init for everything the checkpoint would not hold
    loaded = load_checkpoint(path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, model(batch).logits)


def test_unsourced_parts_follow_the_config():
    model, _ = build()
    assert model.unsourced_parts() == ("vision.", "lm.", "visual.global_resampler.", "visual.tile_resampler.",
                                       "visual.tile_queries")
    model.cfg.vision.pretrained, model.cfg.lm.name = True, "some/llm"  # as if both came from real weights
    model.cfg.freeze.resamplers = False
    assert model.unsourced_parts() == ()
    kept = model.checkpoint_state_dict()
    assert kept and all(k.startswith(("fusion.", "visual.view_embedding.", "learned_tokens.", "lm.")) for k in kept)


def test_freezing_is_configurable():
    model, _ = build("model.freeze.llm=false", "model.freeze.resamplers=false")
    assert all(p.requires_grad for p in model.lm.parameters())
    assert all(p.requires_grad for p in model.visual.parameters())
    assert not any(p.requires_grad for p in model.vision.parameters())
    model.train()
    assert model.lm.training and not model.vision.training


@pytest.mark.parametrize("fusion", ["tiny_xattn", "prefix"])
def test_rows_joining_and_leaving_a_decode_get_what_they_get_alone(fusion):
    """Continuous batching's decode (`start_decode`, `decode_step`, `Decode.merge` / `select`): a request that joins
    a running decode two steps in, a text-only one, one with two images joining later, each leaving after its own
    number of tokens, get exactly the greedy tokens `generate` gives each alone. (Cross-attention as the embedded
    default has it, text before any image untouched: with open_flamingo's `text_only_passthrough=false` a text-only
    row's output depends on whether its batch holds images, in any batching.)"""
    from _tiny import open_gates, photo

    from vlm.processor import collate

    passthrough = ["++model.fusion.text_only_passthrough=true"] if fusion == "tiny_xattn" else []
    model, proc = build(f"model/fusion={fusion}", *passthrough)
    if passthrough:
        open_gates(model, 1.0)  # the images matter
    model.eval()
    pad = proc.tokenizer.pad_token_id
    samples = [proc.encode("<image> What is it?", [photo(300, 200)]), proc.encode("Tell me something."),
               proc.encode("<image> and <image>: which?", [photo(90, 60), photo(600, 300)])]
    wanted = [7, 4, 6]  # tokens each row decodes before it leaves
    joins = {0: 0, 1: 2, 2: 3}  # the step each joins at
    alone = [model.generate(collate([s], pad_token_id=pad, padding_side="left"), max_new_tokens=n,
                            eos_token_id=-1)[0].tolist() for s, n in zip(samples, wanted)]
    pick = model.picker()
    state, nxt, active, got = None, None, [], {}
    for step in range(20):
        for r in [r for r, at in joins.items() if at == step]:  # join between steps
            logits, st = model.start_decode(collate([samples[r]], pad_token_id=pad, padding_side="left"))
            first = pick(logits)  # (1,)
            state, nxt = (st, first) if state is None else (state.merge(st), torch.cat([nxt, first]))
            active.append(r)
            got[r] = [int(first)]
        keep = [i for i, r in enumerate(active) if len(got[r]) < wanted[r]]
        if len(keep) < len(active):  # leave when done
            active = [active[i] for i in keep]
            if not active and len(got) == len(samples):
                break
            state, nxt = state.select(torch.tensor(keep)), nxt[keep]
        if not active:
            continue
        nxt = pick(model.decode_step(state, nxt))  # (B,)
        for i, r in enumerate(active):
            got[r].append(int(nxt[i]))
    assert [got[r] for r in range(3)] == alone
