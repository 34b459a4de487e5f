"""Cross-process gathering so that every loss sees the global batch.

Features are gathered *with gradients* (``torch.distributed.nn.functional.all_gather``, whose
backward sums each rank's gradient back to the rank that owns the rows). Every rank then
computes the same global loss; DDP/DeepSpeed average the parameter gradients over ranks,
which gives exactly the gradient of the global loss on one process (tested to 1e-5).
Label sets travel as Python objects: they are what makes two texts one column.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["rank_and_world", "gather_objects", "gather_rows_with_grad"]


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list on one process)."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def gather_rows_with_grad(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's rows of ``t`` (rank r holds ``sizes[r]`` rows), keeping the graph.

    Ranks may hold different numbers of rows; they are padded to the largest for the
    collective and cut back afterwards.
    """
    rank, world = rank_and_world()
    if world == 1:
        return t
    if t.shape[0] != sizes[rank]:
        raise ValueError(f"rank {rank} holds {t.shape[0]} rows but sizes says {sizes[rank]}")
    longest = max(sizes)
    padded = F.pad(t, (0, 0) * (t.dim() - 1) + (0, longest - t.shape[0])) if t.shape[0] < longest else t
    with warnings.catch_warnings():
        # deprecated in favour of functional collectives, whose backward needs reduce_scatter,
        # which gloo (the CPU backend) lacks; this one falls back to all_to_all there
        warnings.simplefilter("ignore", FutureWarning)
        from torch.distributed.nn.functional import all_gather

        parts = all_gather(padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)
