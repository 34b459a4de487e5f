"""One line on a paired difference: ``MGLL − CLIP = +0.012 [−0.004, +0.027]: no difference at this size``.

Shared by ``mgll compare`` (probe metrics) and ``mgll mcq compare`` (accuracy in points), so both
say the same thing the same way. "No difference at this size" rather than "no difference": a CI
that spans zero says the test set is too small to tell, not that the encoders are equal.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["excludes_zero", "fmt_signed", "fmt_delta_ci", "verdict"]

MINUS = "\u2212"


def excludes_zero(lo: float | None, hi: float | None) -> bool:
    """True when the interval lies strictly on one side of zero (a zero-width CI at 0 does not)."""
    return lo is not None and hi is not None and (lo > 0 or hi < 0)


def fmt_signed(x: float | None, digits: int = 3) -> str:
    """``+0.012`` / ``−0.004`` (a true minus sign, so columns of signed numbers line up)."""
    if x is None:
        return "n/a"
    s = f"{x:+.{digits}f}"
    if float(s) == 0:  # "-0.000" after rounding reads like a loss
        s = f"{0.0:+.{digits}f}"
    return s.replace("-", MINUS)


def fmt_delta_ci(stat: Mapping, digits: int = 3, star: bool = True) -> str:
    """``+0.012 [−0.004, +0.027]``, with ``*`` when the CI excludes zero; just the Δ without a CI."""
    d = stat.get("delta")
    if d is None:
        return "n/a"
    lo, hi = stat.get("lo"), stat.get("hi")
    if lo is None or hi is None:
        return fmt_signed(d, digits)
    mark = "*" if star and excludes_zero(lo, hi) else ""
    return f"{fmt_signed(d, digits)} [{fmt_signed(lo, digits)}, {fmt_signed(hi, digits)}]{mark}"


def verdict(stat: Mapping, a: str = "A", b: str = "B", digits: int = 3) -> str:
    """One line for a Δ = ``b`` − ``a`` entry (any mapping with ``delta``, ``lo``, ``hi``).

    ``"MGLL − CLIP = +0.012 [−0.004, +0.027]: no difference at this size"`` when the CI holds
    zero, ``"...: MGLL higher"`` / ``"...: MGLL lower"`` when it does not, ``"...: no CI"`` when
    there is none (no bootstrap, or a single seed), ``"MGLL − CLIP: undefined"`` without a Δ.
    """
    head = f"{b} {MINUS} {a}"
    d = stat.get("delta")
    if d is None:
        return f"{head}: undefined"
    lo, hi = stat.get("lo"), stat.get("hi")
    text = f"{head} = {fmt_delta_ci(stat, digits, star=False)}"
    if lo is None or hi is None:
        return f"{text}: no CI"
    if not excludes_zero(lo, hi):
        return f"{text}: no difference at this size"
    return f"{text}: {b} {'higher' if lo > 0 else 'lower'}"
