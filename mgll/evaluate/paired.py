"""Paired bootstrap of metric differences between encoders scored on the same test images.

Each arm's own 95% CI (about ±0.035 macro AUC on a few hundred images) mostly measures which
images happened to land in the test split, and that luck is *shared* by two encoders scored on
the same split: an image that is hard for one is usually hard for the other. Resampling the images
once per replicate and scoring every arm on that same resample cancels the shared part, so the CI
of Δ = B − A is the one that answers "is B better than A on this population", and is usually much
narrower than the two arms' CIs side by side suggest.

Per replicate: one index set ``idx`` (n draws with replacement from a generator seeded by
``seed``), every run scored on ``(Y[idx], S_run[idx])`` by
:func:`mgll.evaluate.metrics.point_metrics` (the same code as each run's own bootstrap), Δ taken per
replicate; the CI is the 2.5/97.5 percentile of the defined Δs. A class with a single label value
in a replicate has no AUC there, for every arm at once (the labels are shared), so it drops out of
that replicate's per-class Δ and out of *both* arms' macro AUC alike; ``replicates`` counts the
replicates where a Δ was defined.

Several seeds: :func:`t_interval` over the per-seed Δs; see :mod:`mgll.evaluate.compare_seeds`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import sklearn
from scipy import stats as sps
from threadpoolctl import threadpool_limits

from mgll.evaluate.metrics import percentile_ci, point_metrics
from mgll.verdict import excludes_zero

__all__ = ["SUMMARY", "metric_names", "score_runs", "delta_stat", "t_interval"]

SUMMARY = ("macro AUC", "accuracy", "mAP")  # the summary rows of `mgll compare`, in its order


def metric_names(classes: Sequence[str]) -> list[str]:
    """Column layout of the vectors below: the summary metrics, then one AUC per class."""
    return [*SUMMARY, *classes]


def _vector(kind: str, Y: np.ndarray, S: np.ndarray) -> np.ndarray:
    m = point_metrics(kind, Y, S)
    head = [np.nan if m[k] is None else m[k] for k in ("macro_auc", "accuracy", "map")]
    return np.concatenate([head, m["auc"]])


def score_runs(kind: str, Y: np.ndarray, scores: Sequence[np.ndarray], bootstrap: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every run on the full split and on shared resamples of it.

    ``Y`` is the (N, C) indicator and ``scores`` one (N, C) matrix per run, rows aligned (see
    :func:`mgll.evaluate.scores.align`). Returns ``points`` (R, M) and ``replicates`` (B, R, M),
    NaN where a metric is undefined, columns as :func:`metric_names`. Replicate b of every run uses
    the same images, which is what makes any difference of two runs' columns paired.
    """
    n, c = Y.shape
    points = np.stack([_vector(kind, Y, S) for S in scores])
    reps = np.full((max(bootstrap, 0), len(scores), len(SUMMARY) + c), np.nan)
    rng = np.random.default_rng(seed)
    # as in metrics._bootstrap: inputs were validated once, and tiny sklearn calls gain nothing from threads
    with sklearn.config_context(skip_parameter_validation=True, assume_finite=True), threadpool_limits(limits=1):
        for b in range(max(bootstrap, 0)):
            idx = rng.integers(0, n, n)
            Yb = Y[idx]
            for r, S in enumerate(scores):
                reps[b, r] = _vector(kind, Yb, S[idx])
    return points, reps


def _num(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def delta_stat(delta: float, replicates: np.ndarray, n: int, bootstrap: int, seed: int) -> dict:
    """One Δ as stored in the JSON: point, percentile CI over the defined replicate Δs, and provenance."""
    reps = np.asarray(replicates, dtype=np.float64)
    ci = percentile_ci(reps) if reps.size else None
    lo, hi = (ci if ci else (None, None))
    return {
        "delta": _num(delta),
        "lo": lo,
        "hi": hi,
        "excludes_zero": excludes_zero(lo, hi),
        "n": int(n),
        "bootstrap": int(bootstrap),
        "replicates": int(np.isfinite(reps).sum()),
        "seed": int(seed),
        "method": "paired bootstrap over test images, percentile 95% CI",
    }


def t_interval(deltas: Sequence[float | None], level: float = 0.95) -> dict:
    """Mean of per-seed Δs with a Student-t interval (k − 1 degrees of freedom); no interval for k < 2."""
    d = np.asarray([x for x in deltas if x is not None and np.isfinite(x)], dtype=np.float64)
    k = int(d.size)
    out: dict = {"delta": float(d.mean()) if k else None, "lo": None, "hi": None, "k": k, "sd": None,
                 "method": f"t-interval over {k} seed Δs (df {max(k - 1, 0)})"}
    if k >= 2:
        sd = float(d.std(ddof=1))
        half = float(sps.t.ppf(0.5 + level / 2, k - 1) * sd / np.sqrt(k))
        out.update(sd=sd, lo=out["delta"] - half, hi=out["delta"] + half)
    out["excludes_zero"] = excludes_zero(out["lo"], out["hi"])
    return out
