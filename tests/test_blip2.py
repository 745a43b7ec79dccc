"""BLIP-2 stage 1: the three self-attention masks, the text branch, parity of ITC / ITM with transformers'
`Blip2ForImageTextRetrieval`, BERT (the packaged MiniLM) as the text branch's init, the losses and retrieval metrics.

Shapes: B pairs, P patches, Dv media width, L queries (class token included), T text tokens, D width.
"""

from __future__ import annotations

import pytest
import torch
from _tiny import nontrivial_blip2
from transformers import Blip2Config, Blip2ForImageTextRetrieval

from vlm.blip2 import QFormerStage1, Stage1Config, retrieval_metrics
from vlm.config import QFormerTextConfig, ResamplerConfig
from vlm.hf_weights import init_qformer_from_bert, stage1_from_blip2_retrieval
from vlm.resampler import QFormer, build_resampler, stage1_mask

B, P, DV, T, VOCAB = 3, 12, 24, 6, 50


def qformer(dim: int = 32, **kw) -> QFormer:
    text = QFormerTextConfig(vocab_size=VOCAB, max_positions=16)
    cfg = ResamplerConfig(kind="qformer", num_queries=3, dim=dim, depth=2, heads=4, cross_attention_freq=1,
                          text=text, **kw)
    return QFormer(cfg, media_dim=DV).eval()


def text_batch(b: int = B, t: int = T, lengths=(6, 4, 2)) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(2, VOCAB, (b, t))
    mask = torch.arange(t)[None] < torch.tensor(lengths[:b])[:, None]  # (B, T)
    return ids.masked_fill(~mask, 0), mask


# ------------------------------------------------------------------------------------------------ masks


def test_stage1_masks_as_tables():
    """2 queries, then 3 text tokens of which the last is padding. Rows attend to columns."""
    text_mask = torch.tensor([[True, True, False]])
    expected = {
        "itc": [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0]],
        "itg": [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]],
        "itm": [[1, 1, 1, 1, 0]] * 5,
    }
    for mode, table in expected.items():
        got = stage1_mask(mode, 2, text_mask)
        assert got.shape == (1, 1, 5, 5)
        assert got[0, 0].int().tolist() == table, mode
    with pytest.raises(ValueError, match="unknown stage-1 mask"):
        stage1_mask("causal", 2, text_mask)


def test_itc_queries_and_text_never_see_each_other():
    model = qformer()
    media, ids, mask = torch.randn(B, P, DV), *text_batch()
    q, t = model.encode(media, None, ids, mask, "itc")
    q2, t2 = model.encode(torch.randn(B, P, DV), None, torch.randint(2, VOCAB, (B, T)), mask, "itc")
    assert not torch.allclose(q, q2) and not torch.allclose(t, t2)
    q_other_text, _ = model.encode(media, None, torch.randint(2, VOCAB, (B, T)), mask, "itc")
    _, t_other_image = model.encode(torch.randn(B, P, DV), None, ids, mask, "itc")
    torch.testing.assert_close(q_other_text, q)  # a query that saw the text would change
    torch.testing.assert_close(t_other_image, t)  # text that saw the queries (so the image) would change
    # one pass under the uni-modal mask = the two branches alone (what retrieval computes)
    torch.testing.assert_close(q, model(media))
    torch.testing.assert_close(t[mask], model.encode_text(ids, mask)[mask])


def test_itg_text_is_causal_and_grounded_queries_ignore_text():
    model = qformer()
    media, ids, mask = torch.randn(B, P, DV), *text_batch(lengths=(6, 6, 6))
    q, t = model.encode(media, None, ids, mask, "itg")
    later = ids.clone()
    later[:, 3:] = torch.randint(2, VOCAB, (B, T - 3))
    q2, t2 = model.encode(media, None, later, mask, "itg")
    torch.testing.assert_close(t2[:, :3], t[:, :3])  # token t sees nothing after it
    assert not torch.allclose(t2[:, 3:], t[:, 3:])
    torch.testing.assert_close(q2, q)  # queries never see the text
    _, t3 = model.encode(torch.randn(B, P, DV), None, ids, mask, "itg")
    assert not torch.allclose(t3[:, 0], t[:, 0])  # even the first token sees the queries


def test_itm_everything_sees_everything_but_padding():
    model = qformer()
    media, ids, mask = torch.randn(B, P, DV), *text_batch()
    q, t = model.encode(media, None, ids, mask, "itm")
    other = ids.clone()
    other[:, -1] = torch.randint(2, VOCAB, (B,))
    q2, t2 = model.encode(media, None, other, mask, "itm")
    assert not torch.allclose(q2[0], q[0]) and not torch.allclose(t2[0, 0], t[0, 0])  # sample 0: last token real
    torch.testing.assert_close(q2[1:], q[1:])  # samples 1, 2: the changed token is padding, no one sees it
    torch.testing.assert_close(t2[1:][mask[1:]], t[1:][mask[1:]])


def test_query_only_qformer_refuses_text():
    cfg = ResamplerConfig(kind="qformer", num_queries=3, dim=32, depth=1, heads=4)
    with pytest.raises(ValueError, match="no text branch"):
        QFormer(cfg, media_dim=DV).encode_text(*text_batch())


# ------------------------------------------------------------------------------------------------ parity


def blip2_retrieval(hidden: int = 32, layers: int = 2) -> Blip2ForImageTextRetrieval:
    config = Blip2Config(
        vision_config=dict(hidden_size=DV, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                            intermediate_size=2 * hidden, encoder_hidden_size=DV, vocab_size=VOCAB,
                            max_position_embeddings=16, cross_attention_frequency=1, use_qformer_text_input=True),
        num_query_tokens=5, image_text_hidden_size=16,
    )
    hf = Blip2ForImageTextRetrieval(config).eval()
    return nontrivial_blip2(hf)


def test_itc_and_itm_scores_equal_blip2_retrieval():
    hf = blip2_retrieval()
    ours = stage1_from_blip2_retrieval(hf).eval()
    pixels = torch.randn(2, 3, 32, 32)
    ids, mask = text_batch(b=2, lengths=(6, 3))
    with torch.no_grad():
        media = hf.vision_model(pixel_values=pixels)[0]  # (2, 17, Dv): the same encoder features for both
        theirs_itc = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask.long()).logits_per_image  # (2, 2)
        sim = ours.similarity(ours.image_features(media), ours.text_features(ids, mask))
        theirs_itm = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask.long(),
                        use_image_text_matching_head=True).logits_per_image  # (2, 2): pair b = image b, text b
        itm = ours.itm_logits(media, None, ids, mask)
    torch.testing.assert_close(sim, theirs_itc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(itm, theirs_itm, atol=1e-5, rtol=1e-5)


def test_minilm_initialises_the_text_branch_exactly():
    """The packaged all-MiniLM-L6-v2 (a real 6-layer BERT): the text branch alone computes BERT's hidden states."""
    from transformers import AutoModel, AutoTokenizer

    from vlm.pretrained import resolve

    folder = resolve("packaged:all_minilm_l6_v2")
    cfg = ResamplerConfig(kind="qformer", num_queries=8, dim=384, depth=6, heads=12, ff_mult=4,
                          cross_attention_freq=2, text=QFormerTextConfig())
    model = QFormer(cfg, media_dim=DV).eval()
    fresh = init_qformer_from_bert(model, folder)["fresh"]
    built = build_resampler(ResamplerConfig(**{**cfg.__dict__, "bert_init": "packaged:all_minilm_l6_v2"}), DV)
    for k, v in built.state_dict().items():  # bert_init: the same, when the resampler is built
        if k not in fresh:
            torch.testing.assert_close(v, model.state_dict()[k])
    assert fresh and all(k == "queries" or ".cross_attn." in k for k in fresh)
    tok = AutoTokenizer.from_pretrained(folder)
    batch = tok(["a red circle and a blue square", "the word CAT in the top left corner"], padding=True,
                return_tensors="pt")
    bert = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        want = bert(**batch).last_hidden_state
        got = model.encode_text(batch["input_ids"], batch["attention_mask"].bool())
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    wrong = ResamplerConfig(**{**cfg.__dict__, "depth": 4})
    with pytest.raises(ValueError, match="does not fit"):
        init_qformer_from_bert(QFormer(wrong, media_dim=DV), folder)


# ------------------------------------------------------------------------------------------------ losses


def test_stage1_losses_train_every_head():
    model = QFormerStage1(qformer(), Stage1Config(embed_dim=16)).train()
    media, (ids, mask) = torch.randn(4, P, DV), text_batch(b=4, lengths=(6, 4, 2, 5))
    out = model(media, None, ids, mask, generator=torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "itc", "itm", "itg"} and all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    for name in ("vision_proj.weight", "text_proj.weight", "itm_head.weight", "lm_head.dense.weight", "temp",
                 "qformer.queries", "qformer.layers.0.cross_attn.to_k.weight", "qformer.text.word.weight",
                 "qformer.layers.1.text_ff_in.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert model.lm_head.word.weight is model.qformer.text.word.weight  # tied
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = out["loss"].item()
    for _ in range(30):
        opt.zero_grad()
        loss = model(media, None, ids, mask)["loss"]
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    with pytest.raises(ValueError, match="at least 2 pairs"):
        model(media[:1], None, ids[:1], mask[:1])


def test_retrieval_metrics():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.0, 0.2, 0.7]])  # image 1's best text is text 0
    m = retrieval_metrics(sim, ks=(1, 2))
    assert m["i2t_r1"] == pytest.approx(200 / 3) and m["i2t_r2"] == 100.0
    assert m["t2i_r1"] == 100.0  # each text's best image is its own (text 1: 0.5 > 0.2 > 0.1)
    assert m["chance_r1"] == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="square"):
        retrieval_metrics(torch.zeros(2, 3))


# ------------------------------------------------------------------------------------------------ the run


def test_stage1_knows_which_weights_came_from_bert():
    """build_stage1 names the parameters the packaged MiniLM initialised (they train at `pretrained_lr_scale`): all
    of the Q-Former but its cross-attention, queries and media norm; the weights are build_resampler's."""
    from vlm.blip2_stage1 import build_stage1
    from vlm.compose import model_config

    cfg = model_config("model/resampler=minilm_qformer")
    model, from_bert = build_stage1(cfg, 16, Stage1Config())
    fresh = {n for n, _ in model.named_parameters() if n not in from_bert}
    assert from_bert and all(n.startswith("qformer.") for n in from_bert)
    def is_new(name: str) -> bool:  # what BLIP-2 adds to BERT
        return ".cross_attn." in name or name.split(".")[1] in ("queries", "norm_media")

    qformer = [n for n, _ in model.named_parameters() if n.startswith("qformer.")]
    assert [n for n in qformer if n in fresh] == [n for n in qformer if is_new(n)]
    assert fresh - set(qformer) == {n for n, _ in model.named_parameters() if not n.startswith("qformer.")}
    assert "qformer.text.word.weight" in from_bert and "qformer.layers.0.self_attn.to_qkv.weight" in from_bert
    reference = build_resampler(cfg.global_resampler, 16).state_dict()
    for name in from_bert:
        torch.testing.assert_close(model.state_dict()[name], reference[name.removeprefix("qformer.")])


def test_stage1_run_saves_the_qformer_that_stage2_starts_from(tmp_path):
    """vlm.blip2_stage1 on caption shards of a tiny corpus (the tiny model's encoder, a small Q-Former with BERT's
    tokenizer): metrics, retrieval and a checkpoint whose Q-Former `init_from` loads into a stage-2 VLM, reporting the
    text branch and the heads as unused."""
    from vlm.blip2_stage1 import Stage1RunConfig, train_stage1
    from vlm.checkpoint import init_from, read_checkpoint
    from vlm.compose import model_config
    from vlm.data.convert import convert_synthetic_captions
    from vlm.data.synthetic import ensure_corpus
    from vlm.model import VLM

    root = tmp_path / "corpus"
    ensure_corpus(root, n_train=8, n_val=0, n_test=4, shard_size=4, width_range=(1024, 1024), aspect_range=(2.0, 2.0))
    for split in ("train", "test"):
        convert_synthetic_captions(tmp_path / f"captions_{split}", root=root, split=split, progress=False)
    common = ("model/resampler=tiny_qformer", "++model.tiling.force_detail=low")
    text = "++model.global_resampler.text={vocab_size: 30522, tokenizer: 'packaged:all_minilm_l6_v2', max_length: 48}"
    run = Stage1RunConfig(steps=3, batch_size=4, warmup_steps=1, log_every=1, held_out=str(tmp_path / "captions_test"))
    summary = train_stage1(model_config(*common, text), run, str(tmp_path / "captions_train"), tmp_path / "run")
    assert summary["pairs"] == 8 and summary["retrieval"]["trained"]["pairs"] == 4
    assert set(summary["retrieval"]) == {"untrained", "trained"}
    rows = (tmp_path / "run" / "stage1" / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,loss,itc,itm,itg,lr" and len(rows) == 4
    assert (tmp_path / "run" / "stage1" / "losses.png").stat().st_size > 0

    stage2 = VLM(model_config(*common, "model/fusion=prefix", "model.freeze.resamplers=false"))
    report = init_from(stage2, tmp_path / "run" / "checkpoint.pt")
    query_branch = stage2.visual.global_resampler.state_dict()
    assert report["loaded"] == len(query_branch)
    assert report["unused"] and all(k.startswith(("visual.global_resampler.text.", "stage1.")) or ".text_ff_" in k
                                    for k in report["unused"])
    saved = read_checkpoint(tmp_path / "run" / "checkpoint.pt")["state_dict"]
    for k, v in query_branch.items():
        torch.testing.assert_close(v, saved[f"visual.global_resampler.{k}"])


def test_media_norm_is_blip2s_ln_vision():
    """media_norm: the media are layer-normalised before the Q-Former sees them (so their scale does not matter)."""
    model = qformer(media_norm=True)
    media, ids, mask = torch.randn(B, P, DV), *text_batch()
    torch.testing.assert_close(model(media * 50 + 3), model(media), atol=1e-4, rtol=1e-4)
    q, _ = model.encode(media * 50 + 3, None, ids, mask, "itm")
    torch.testing.assert_close(q, model.encode(media, None, ids, mask, "itm")[0], atol=1e-4, rtol=1e-4)
