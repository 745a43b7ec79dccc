"""Parallel helpers, kept out of the model: which rank this process is, gathering Python objects from every rank, and
gradient clipping that works under FSDP. The model never imports this (nor torch.distributed)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def rank_world(rank: int | None = None, world_size: int | None = None, *, env: bool = True) -> tuple[int, int]:
    """(rank, world size): given values win; else torch.distributed's, else (with `env`) the RANK / WORLD_SIZE
    environment variables (set by launchers before the process group exists), else (0, 1)."""
    if rank is None or world_size is None:
        if dist.is_available() and dist.is_initialized():
            r, w = dist.get_rank(), dist.get_world_size()
        elif env:
            r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        else:
            r, w = 0, 1
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return rank, world_size


def all_gather_objects(obj) -> list:
    """`obj` from every rank, in rank order ([obj] in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def clip_grad_norm(module: torch.nn.Module, max_norm: float) -> bool:
    """FSDP clips by its own global norm over the shards (Lightning's generic norm clipping refuses FSDP). Returns
    False when `module` is no FSDP module: clip it the usual way."""
    clip = getattr(module, "clip_grad_norm_", None)
    if clip is None:
        return False
    clip(max_norm)
    return True
