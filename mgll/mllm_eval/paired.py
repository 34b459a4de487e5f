"""Paired bootstrap of MCQ accuracy differences between two runs over the same questions.

Two models answered the same bank, so which questions landed in it is luck they share; resampling
the questions once for both cancels it (each run's own binomial error is several points at 20
questions a disease). Per question the outcome is the one :func:`mgll.mllm_eval.report.summarise`
counts: right, or, for a circular bank, right under every rotation, so the bootstrap resamples
*original questions* and a question's rotations always stay together.

Resampling is stratified by disease: each disease's questions are redrawn with replacement to its
own count. Table 2's Average is the unweighted mean of per-disease accuracies over the diseases the
bank asks about; an unstratified redraw would let a rare disease drop out of a replicate and change
which diseases that replicate's average covers. Per replicate, Δ_d = mean of (right_B − right_A)
over the drawn questions of disease d (×100, points), and Δ_average = the mean of those Δ_d; the
CI is the 2.5/97.5 percentile over replicates, seeded.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mgll.verdict import excludes_zero

__all__ = ["outcomes", "paired_accuracy"]


def _name(res: dict) -> str:
    return f"{res['label']!r}" + (f" ({res['source']})" if res.get("source") else "")


def outcomes(res: dict) -> dict[str, tuple[str, bool]] | None:
    """qid -> (answer disease, right) from a result's ``questions``, or None for an older result without them."""
    qs = res.get("questions")
    if qs is None:
        return None
    return {q["qid"]: (q["disease"], bool(q["correct"])) for q in qs}


def _stat(delta: float, reps: np.ndarray, n: int, bootstrap: int, seed: int) -> dict[str, Any]:
    lo = hi = None
    if reps.size:
        lo, hi = (float(x) for x in np.percentile(reps, [2.5, 97.5]))
    return {"delta": float(delta), "lo": lo, "hi": hi, "excludes_zero": excludes_zero(lo, hi), "n": int(n),
            "bootstrap": int(bootstrap), "replicates": int(reps.size), "seed": int(seed),
            "method": "paired bootstrap over questions, stratified by disease, percentile 95% CI"}


def paired_accuracy(base: dict, other: dict, diseases: list[str], bootstrap: int = 1000, seed: int = 0) -> dict | None:
    """Δ = ``other`` − ``base`` accuracy (points) per disease and for the Average, with paired CIs.

    None when either result has no per-question outcomes. Runs on different questions (or a
    question whose answer differs: another bank) raise ValueError naming both runs.
    """
    qa, qb = outcomes(base), outcomes(other)
    if qa is None or qb is None:
        return None
    if set(qa) != set(qb):
        only_a, only_b = sorted(set(qa) - set(qb)), sorted(set(qb) - set(qa))
        raise ValueError(
            f"{_name(other)} vs {_name(base)}: not scored on the same questions ({len(only_a)} only in {base['label']!r}"
            f"{': ' + ', '.join(only_a[:3]) if only_a else ''}; {len(only_b)} only in {other['label']!r}"
            f"{': ' + ', '.join(only_b[:3]) if only_b else ''})"
        )
    differ = sorted(q for q in qa if qa[q][0] != qb[q][0])
    if differ:
        raise ValueError(f"{_name(other)} vs {_name(base)}: {len(differ)} questions have a different answer "
                         f"(e.g. {differ[0]}: {qa[differ[0]][0]!r} vs {qb[differ[0]][0]!r}); not the same bank")
    rng = np.random.default_rng(seed)
    b = max(int(bootstrap), 0)
    per: dict[str, dict] = {}
    reps_by_disease = []
    points = []
    n_total = 0
    for d in diseases:
        qids = sorted(q for q in qa if qa[q][0] == d)
        if not qids:
            continue
        diff = 100.0 * np.array([int(qb[q][1]) - int(qa[q][1]) for q in qids], dtype=np.float64)
        reps = diff[rng.integers(0, len(diff), (b, len(diff)))].mean(1) if b else np.empty(0)
        per[d] = _stat(diff.mean(), reps, len(diff), b, seed)
        reps_by_disease.append(reps)
        points.append(diff.mean())
        n_total += len(diff)
    if not per:
        return {"per_disease": {}, "average": None, "n": 0, "bootstrap": b, "seed": int(seed)}
    avg_reps = np.mean(np.stack(reps_by_disease), axis=0) if b else np.empty(0)
    return {"per_disease": per, "average": _stat(float(np.mean(points)), avg_reps, n_total, b, seed),
            "n": n_total, "bootstrap": b, "seed": int(seed)}
