"""Finite or stop: a training step whose loss or gradient norm is NaN/inf is skipped, and a run that
keeps producing them stops with an error instead of writing NaN weights.

One bad batch (a rare overflow) should not end a week-long run, so a non-finite step is skipped and
counted; ``patience`` of them in a row means the weights or the settings are broken (a corrupt
resume, a learning rate that diverged) and nothing later will be finite either, so the run stops and
names the step and the term. Under several processes every rank takes the same decision (the flag
is all-reduced), or one rank would step while another waits in a collective.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the CLI imports this module for its error type
    import torch

__all__ = ["FiniteGuard", "NonFiniteError", "all_ranks_agree", "assert_finite_tensors", "finite_or_none"]


class NonFiniteError(RuntimeError):
    """The run produced non-finite values it cannot recover from; the message names where."""


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN: a non-finite number is written as null."""
    return value if math.isfinite(value) else None


def all_ranks_agree(ok: bool, device: torch.device) -> bool:
    """True only if ``ok`` holds on every process (one all-reduce of a single value)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], device=device, dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def assert_finite_tensors(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse to write weights that hold NaN or inf; the message names the first bad tensor."""
    import torch

    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise NonFiniteError(f"{where}: tensor {bad[0]!r}{more} holds NaN or inf; refusing to write non-finite weights")


class FiniteGuard:
    """Decides per step whether to apply it; raises :class:`NonFiniteError` after ``patience`` bad steps in a row."""

    def __init__(self, patience: int = 3, what: str = "train"):
        if patience < 1:
            raise ValueError(f"{what}: max_nonfinite_steps must be >= 1, got {patience}")
        self.patience = patience
        self.what = what
        self.in_a_row = 0
        self.skipped: list[int] = []

    @staticmethod
    def bad_terms(terms: Mapping[str, float], grad_norm: float | None = None) -> list[str]:
        bad = [f"{k}={v}" for k, v in terms.items() if not math.isfinite(v)]
        if grad_norm is not None and not math.isfinite(grad_norm):
            bad.append(f"grad_norm={grad_norm}")
        return bad

    def step_ok(self, step: int, bad: Iterable[str], agreed_ok: bool | None = None) -> bool:
        """Record step ``step`` (1-based); ``bad`` lists its non-finite terms on this rank.

        ``agreed_ok`` is the all-ranks decision when the caller has one (see ``all_ranks_agree``).
        """
        bad = list(bad)
        ok = not bad if agreed_ok is None else agreed_ok
        if ok:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped.append(step)
        if self.in_a_row >= self.patience:
            where = ", ".join(bad) if bad else "another process"
            raise NonFiniteError(
                f"step {step}: non-finite {where}; {self.in_a_row} steps in a row were skipped "
                f"(steps {self.skipped[-self.in_a_row]}-{step}), so the run stops here. The weights or the "
                "settings are broken (a corrupt checkpoint, a learning rate that diverges); nothing non-finite "
                "was saved"
            )
        return False
