"""Resamplers: shapes, masks, the latents override, gradients, and parity with transformers' modules.

Shapes: V views, P patches, Dv media width, L latents (class token included), D width.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel, IdeficsConfig
from transformers.models.idefics.perceiver import IdeficsPerceiverResampler

from vlm.config import ResamplerConfig
from vlm.hf_weights import perceiver_from_idefics, qformer_from_blip2
from vlm.resampler import PerceiverResampler, QFormer, build_resampler

V, P, DV = 3, 40, 48
KINDS = ["perceiver", "qformer"]


def small_cfg(kind: str, num_queries: int = 8, **kw) -> ResamplerConfig:
    base = dict(kind=kind, num_queries=num_queries, dim=32, depth=2, heads=4, dim_head=8, dropout=0.0)
    return ResamplerConfig(**{**base, **kw})


def make(kind: str, **kw) -> nn.Module:
    return build_resampler(small_cfg(kind, **kw), media_dim=DV).eval()


def padded_mask(valid: list[int], p: int = P) -> torch.Tensor:
    """(V, P) bool: view i has valid[i] real patches, the rest is padding."""
    return torch.arange(p)[None, :] < torch.tensor(valid)[:, None]  # (V, P)


def randomise_layer_norms(module: nn.Module) -> None:
    """Non-trivial LayerNorm affines, so parity cannot pass by accident with identity norms."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)


# ------------------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_queries", [64, 128])
def test_output_shape_default_budgets(kind, num_queries):
    model = make(kind, num_queries=num_queries)
    out = model(torch.randn(V, P, DV))
    assert out.shape == (V, num_queries + 1, model.out_dim)
    assert model.queries.shape == (num_queries + 1, model.out_dim)  # one parameter, class token is row 0


def test_widths_and_input_projection():
    same = PerceiverResampler(ResamplerConfig(dim=None, depth=1), media_dim=DV)
    assert same.out_dim == DV and same.proj_in is None
    proj = PerceiverResampler(ResamplerConfig(dim=64, depth=1), media_dim=DV)
    assert proj.out_dim == 64 and proj.proj_in is not None
    assert proj(torch.randn(2, 5, DV)).shape == (2, 65, 64)
    assert QFormer(ResamplerConfig(kind="qformer", depth=2), media_dim=DV).out_dim == 768


def test_build_resampler_dispatch_and_errors():
    assert isinstance(make("perceiver"), PerceiverResampler)
    assert isinstance(make("qformer"), QFormer)
    with pytest.raises(ValueError):
        build_resampler(ResamplerConfig(kind="nope"), media_dim=DV)
    with pytest.raises(ValueError):
        QFormer(ResamplerConfig(kind="qformer", dim=30, heads=4), media_dim=DV)  # 30 % 4 != 0


# ------------------------------------------------------------------------------------------------ masks


@pytest.mark.parametrize("kind", KINDS)
def test_padded_patches_do_not_change_output(kind):
    model = make(kind)
    media, mask = torch.randn(V, P, DV), padded_mask([P, 25, 7])
    out = model(media, mask)
    garbage = torch.where(mask[..., None], media, 100 * torch.randn_like(media))  # (V, P, Dv)
    torch.testing.assert_close(model(garbage, mask), out, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(garbage), model(media), atol=1e-3)  # without the mask it does matter


@pytest.mark.parametrize("kind", KINDS)
def test_all_true_mask_equals_no_mask(kind):
    model = make(kind)
    media = torch.randn(V, P, DV)
    torch.testing.assert_close(model(media, torch.ones(V, P, dtype=torch.bool)), model(media))
    torch.testing.assert_close(model(media, torch.ones(V, P, dtype=torch.long)), model(media))  # 0/1 mask


@pytest.mark.parametrize("kind", KINDS)
def test_mostly_masked_view_is_finite_and_equals_its_valid_part(kind):
    model = make(kind)
    media, mask = torch.randn(V, P, DV), padded_mask([P, 3, 0])  # view 2: every patch is padding
    out = model(media, mask)
    assert torch.isfinite(out).all()
    # a view with 3 real patches gives what the same view cropped to those 3 patches gives
    torch.testing.assert_close(out[1:2], model(media[1:2, :3]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_views_are_independent(kind):
    model = make(kind)
    media, mask = torch.randn(V, P, DV), padded_mask([P, 25, 7])
    out = model(media, mask)
    for i in range(V):
        alone = model(media[i : i + 1], mask[i : i + 1])  # (1, L, D)
        torch.testing.assert_close(alone, out[i : i + 1], atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------------- latents, grads


@pytest.mark.parametrize("kind", KINDS)
def test_latents_override_shares_weights(kind):
    model = make(kind, num_queries=8)
    media = torch.randn(V, P, DV)
    torch.testing.assert_close(model(media, latents=model.queries), model(media))
    other = nn.Parameter(torch.randn(17, model.out_dim))  # another budget's own queries: 16 + class token
    out = model(media, latents=other)
    assert out.shape == (V, 17, model.out_dim)
    out.sum().backward()
    assert other.grad is not None and other.grad.abs().sum() > 0
    assert model.queries.grad is None  # the override replaces, not adds to, the module's queries
    assert any(p.grad is not None for n, p in model.named_parameters() if n != "queries")  # body learns
    with pytest.raises(ValueError):
        model(media, latents=torch.randn(5, model.out_dim + 1))


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_queries_and_class_token(kind):
    model = make(kind).train()
    out = model(torch.randn(V, P, DV), padded_mask([P, 25, 7]))
    out.square().mean().backward()
    grad = model.queries.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert grad[0].abs().sum() > 0 and grad[1:].abs().sum() > 0  # class token (row 0) and queries


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize(("embed_dim", "head_dim", "qk_norm"),
                         [(64, 16, False), (96, 32, True), (128, 16, True)])
def test_parity_idefics_perceiver(embed_dim, head_dim, qk_norm):
    config = IdeficsConfig(vision_config={"embed_dim": embed_dim},
                           perceiver_config={"qk_layer_norms_perceiver": qk_norm})
    hf = IdeficsPerceiverResampler(config, embed_dim, depth=2, n_heads=4, head_dim=head_dim, n_latents=65)
    hf.eval()
    randomise_layer_norms(hf)
    ours = perceiver_from_idefics(hf).eval()
    assert ours.cfg.num_queries == 64 and ours.cfg.qk_norm == qk_norm and ours.cfg.ff_mult == 4
    assert (ours.layers[0].q_norm is not None) == qk_norm
    media = torch.randn(V, P, embed_dim)
    with torch.no_grad():
        theirs = hf(media)
        torch.testing.assert_close(ours(media), theirs, atol=1e-5, rtol=1e-5)
        all_real = torch.ones(V, P, dtype=torch.bool)  # (V, P)
        torch.testing.assert_close(ours(media, all_real), theirs, atol=1e-5, rtol=1e-5)


def blip2(hidden: int, layers: int, intermediate: int | None = None) -> tuple[Blip2QFormerModel, Tensor]:
    """A random BLIP-2 Q-Former (media width DV != hidden) with randomised LayerNorms, and query_tokens."""
    config = Blip2QFormerConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                intermediate_size=intermediate or 4 * hidden, cross_attention_frequency=2,
                                encoder_hidden_size=DV, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0)
    hf = Blip2QFormerModel(config).eval()
    randomise_layer_norms(hf)
    return hf, torch.randn(1, 65, hidden)


@pytest.mark.parametrize(("hidden", "layers"), [(64, 2), (96, 3), (128, 4)])
@pytest.mark.parametrize("masked", [True, False])
def test_parity_blip2_qformer(hidden, layers, masked):
    hf, query_tokens = blip2(hidden, layers)
    ours = qformer_from_blip2(hf, query_tokens).eval()
    assert ours.cfg.num_queries == 64 and ours.cfg.depth == layers and ours.media_dim == DV
    media = torch.randn(V, P, DV)
    mask = padded_mask([P, 25, 7]) if masked else None
    with torch.no_grad():
        theirs = hf(query_embeds=query_tokens.expand(V, -1, -1), encoder_hidden_states=media,
                    encoder_attention_mask=None if mask is None else mask.long()).last_hidden_state
        torch.testing.assert_close(ours(media, mask), theirs, atol=1e-5, rtol=1e-5)


def test_blip2_import_rejects_non_integer_ff_mult():
    hf, query_tokens = blip2(64, 2, intermediate=100)
    with pytest.raises(ValueError, match="integer multiple"):
        qformer_from_blip2(hf, query_tokens)


def test_blip2_import_ignores_text_branch():
    config = Blip2QFormerConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=256, encoder_hidden_size=DV, use_qformer_text_input=True,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf = Blip2QFormerModel(config).eval()
    randomise_layer_norms(hf)
    assert any(".intermediate.dense" in k for k in hf.state_dict())  # the text branch exists in HF
    query_tokens, media = torch.randn(1, 9, 64), torch.randn(V, P, DV)
    ours = qformer_from_blip2(hf, query_tokens).eval()
    with torch.no_grad():
        theirs = hf(query_embeds=query_tokens.expand(V, -1, -1), encoder_hidden_states=media)
        torch.testing.assert_close(ours(media), theirs.last_hidden_state, atol=1e-5, rtol=1e-5)


def test_idefics_import_rejects_inconsistent_vision_width():
    config = IdeficsConfig(vision_config={"embed_dim": 32})  # IdeficsMLP would be 32 wide, the perceiver 64
    hf = IdeficsPerceiverResampler(config, 64, depth=1, n_heads=4, head_dim=16, n_latents=9)
    with pytest.raises(ValueError, match="embed_dim"):
        perceiver_from_idefics(hf)


@pytest.mark.parametrize("kind", KINDS)
def test_pooled_queries_start_from_their_cell(kind):
    """pooled_queries: query 1 + k starts from the masked mean of cell k of the patch grid (class token: the view),
    so changing the patches of one cell moves only that cell's latent and the class token; padding never counts."""
    from vlm.resampler import _cells, start_latents

    torch.manual_seed(0)
    side, cells = 8, (2, 4)  # 64 patches, 8 queries on a 2 x 4 grid of 4 x 2 patch cells
    model = make(kind, num_queries=8, pooled_queries=True)
    assert _cells(8) == cells and _cells(64) == (8, 8) and _cells(128) == (8, 16)
    media = torch.randn(2, side * side, DV)  # (V, P, Dv)
    media = model.proj_in(media) if getattr(model, "proj_in", None) is not None else media
    base = start_latents(model.pool, model.queries, media, None)  # (V, L, D)
    assert base.shape == (2, 9, model.out_dim)
    grid = media.view(2, side, side, -1).clone()  # (V, side, side, D)
    grid[:, 4:8, 2:4] += torch.randn(grid.shape[-1])  # cell (row 1, col 1) = query 1 + 5
    moved = start_latents(model.pool, model.queries, grid.view(2, side * side, -1), None)
    changed = (moved - base).abs().amax(dim=(0, 2)) > 1e-6  # (L,)
    assert changed.tolist() == [True, False, False, False, False, False, True, False, False]
    mask = torch.ones(2, side * side, dtype=torch.bool)
    mask.view(2, side, side)[:, 4:8, 2:4] = False  # now that cell is padding: its content must not matter
    a = start_latents(model.pool, model.queries, media, mask)
    b = start_latents(model.pool, model.queries, grid.view(2, side * side, -1), mask)
    torch.testing.assert_close(a, b)
    out = model(torch.randn(2, side * side, DV), mask)  # the whole module runs with pooled queries
    assert out.shape == (2, 9, model.out_dim) and torch.isfinite(out).all()


def test_patch_mlp_connector_emits_every_patch_and_the_mean_as_class_token():
    """resampler kind mlp (LLaVA's connector): (V, P, Dv) -> (V, 1 + P, D), row 0 the MLP of the mean real patch,
    rows 1.. the MLP of each patch; num_queries must be P."""
    torch.manual_seed(0)
    m = build_resampler(ResamplerConfig(kind="mlp", num_queries=16, dim=24), 40)
    media, mask = torch.randn(3, 16, 40), torch.ones(3, 16, dtype=torch.bool)
    mask[1, 10:] = False
    out = m(media, mask)
    assert out.shape == (3, 17, 24) and m.out_dim == 24
    torch.testing.assert_close(out[:, 1:], m.mlp(media))
    torch.testing.assert_close(out[1, 0], m.mlp(media[1, :10].mean(0)))
    with pytest.raises(ValueError, match=r"num_queries \(16\) must be the encoder's patches per view, 9 here"):
        m(torch.randn(2, 9, 40))
    with pytest.raises(ValueError, match="no queries to share"):
        m(media, latents=torch.randn(5, 24))


def test_cross_init_std_sets_how_much_of_the_image_reaches_the_queries():
    """The fresh cross-attention's value / output projections start at `cross_init_std` (the rest stays at BERT's
    0.02), and with it the spread of the query outputs across different images."""
    media = torch.randn(8, P, DV)  # (V, P, Dv): 8 different images
    spread = {}
    for std in (0.02, 0.2):
        torch.manual_seed(0)
        q = make("qformer", cross_init_std=std)
        cross = q.layers[0].cross_attn
        assert cross.to_v.weight.std().item() == pytest.approx(std, rel=0.1)
        assert cross.dense.weight.std().item() == pytest.approx(std, rel=0.1)
        assert cross.to_k.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert q.layers[0].self_attn.to_qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
        with torch.no_grad():
            spread[std] = q(media).std(dim=0).mean().item()  # (V, L, D) -> across images
    assert spread[0.2] > 5 * spread[0.02]
