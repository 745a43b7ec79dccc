"""Shared blocks: activations, the pre-norm feed-forward, masked multi-head attention over SDPA; finding a
model's block stack and activation checkpointing.

Shapes: B batch, M queries, R keys (any sequences), D width, H heads, d head width.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from torch import nn

ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class FeedForward(nn.Sequential):
    """Pre-norm MLP, Flamingo style: LayerNorm -> Linear(D, mult*D) -> act -> Linear(mult*D, D)."""

    def __init__(self, dim: int, *, mult: int = 4, activation_name: str = "gelu", bias: bool = False,
                 hidden: int | None = None):
        hidden = hidden or dim * mult
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden, bias=bias),
            activation(activation_name),
            nn.Linear(hidden, dim, bias=bias),
        )


class GatedFeedForward(nn.Module):
    """Pre-norm gated MLP, LLaMA / IDEFICS style: RMSNorm -> down(act(gate(x)) * up(x)) (SwiGLU with act = silu)."""

    def __init__(self, dim: int, *, hidden: int, activation_name: str = "silu", eps: float = 1e-6):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=eps)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act = activation(activation_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)  # (B, M, D)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))  # (B, M, hidden) -> (B, M, D)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return rearrange(x, "b t (h d) -> b h t d", h=heads)  # (B, M, H*d) -> (B, H, M, d)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    return rearrange(x, "b h t d -> b t (h d)")  # (B, H, M, d) -> (B, M, H*d)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention on (B, H, T, d) tensors. `mask`: bool, True = may attend, broadcastable
    to (B, H, M, R). Every query row must allow at least one key (callers guarantee it)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (B, H, M, d)


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The attention probabilities `attend` uses, (B, H, M, R), materialised (for looking inside: `vlm.explain`)."""
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # (B, H, M, R)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1)  # (B, H, M, R)


def find_layer_stack(model: nn.Module, n: int) -> nn.ModuleList:
    """A model's stack of `n` blocks, found by shape (the largest ModuleList of length n), not by matching
    class or attribute names, so any transformers decoder or vision tower works."""
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not stacks:
        raise ValueError(f"could not find a stack of {n} layers in {type(model).__name__}")
    return max(stacks, key=lambda m: sum(p.numel() for p in m.parameters()))


def checkpoint_blocks(blocks: nn.Module) -> None:
    """Activation checkpointing per block: each block's activations are recomputed in backward instead of kept.
    Set on the block instances, so module names and state_dict keys stay as they were (and the model pickles)."""
    for block in blocks:
        block.forward = functools.partial(_checkpointed_forward, block)


def _checkpointed_forward(block: nn.Module, *args, **kwargs):
    forward = functools.partial(type(block).forward, block)
    if not torch.is_grad_enabled():  # nothing to save memory for
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def enable_hf_checkpointing(model: nn.Module) -> None:
    """transformers' own activation checkpointing (active in train mode), non-reentrant."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
