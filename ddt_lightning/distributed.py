"""The one place where state that must agree across ranks is exchanged (conventions.md, rule 8).

Codebook EMA statistics, dead-code restarts, k-means initialisation and usage counters change through these
helpers, so that every rank holds the same codebook. Each helper is a no-op in a single process, which keeps the
models usable (and testable) without `torch.distributed` being initialised.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place and return it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `tensor` on every rank with rank `src`'s value, in place, and return it."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from all ranks along dim 0 (same shape on every rank)."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_mean_differentiable(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over ranks, out of place and differentiable (the gradient is all-reduced back): for a loss
    term that depends on a statistic of the global batch, such as the quantizer's code entropy."""
    if not is_distributed():
        return tensor
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(tensor, op=dist.ReduceOp.SUM) / world_size()
