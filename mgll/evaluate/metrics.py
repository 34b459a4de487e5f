"""Test-split metrics for a :class:`~mgll.evaluate.tasks.Task`: macro AUC, accuracy, mAP, bootstrap CIs.

Every number comes from scikit-learn (``roc_auc_score``, ``average_precision_score``,
``accuracy_score``); this module only decides what is fed to it and what to do when a metric is
undefined. All kinds are scored one-vs-rest on an indicator matrix ``Y`` (N, C) and a score matrix
``S`` (N, C); binary tasks become two columns (``1 - p``, ``p``), so their two per-class AUCs are
equal to each other and to the binary AUC, and the macro AUC is exactly the binary AUC.

Undefined values: a class whose test labels are all one value has no ROC curve. It keeps its row
with ``auc: None`` and the reason, it is listed in ``undefined``, and the macro AUC is the mean over
the *defined* classes with ``macro_auc_excluded`` naming the rest, so a report can never silently
average over fewer classes than it shows. AP needs at least one positive, so a class with no test
positives is undefined for AP too (an all-positive class has AP 1.0, which sklearn computes).

Multi-label accuracy is exact match (sklearn's ``accuracy_score`` on the indicator matrix, each label
thresholded at 0.5): per-label accuracy is dominated by the many easy negatives (predicting "absent"
everywhere scores ~90% on ten rare diseases), which would make every encoder look alike. The mean
per-label accuracy is reported as ``label_accuracy`` for readers who want it.

Bootstrap: test images are resampled with replacement ``bootstrap`` times from a generator seeded
by ``seed``; each replicate recomputes every metric on the classes defined in that replicate, and
the CI is the 2.5/97.5 percentile over the replicates where the metric is defined.
"""

from __future__ import annotations

import numpy as np
import sklearn
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score
from threadpoolctl import threadpool_limits

from mgll.evaluate.tasks import Task

__all__ = ["evaluate_scores", "undefined_reason", "as_matrices", "point_metrics", "percentile_ci"]

_SUM_TOL = 1e-3


def undefined_reason(n_pos: int, n: int) -> str | None:
    """Why AUC cannot be computed for a class with ``n_pos`` positives among ``n`` images, or None."""
    if n == 0:
        return "no test images"
    if n_pos == 0:
        return "only negatives in test split (n_pos=0)"
    if n_pos == n:
        return f"only positives in test split (n_pos={n_pos}, no negatives)"
    return None


def as_matrices(task: Task, y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to (Y indicator (N, C) int, S probabilities (N, C) float)."""
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    c = len(task.classes)
    n = y.shape[0] if y.ndim else 0
    if s.shape[0] != n:
        raise ValueError(f"scores have {s.shape[0]} rows but y_true has {n}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values")
    if s.size and (s.min() < -1e-6 or s.max() > 1 + 1e-6):
        raise ValueError(f"scores must be probabilities in [0, 1], got range [{s.min():.3g}, {s.max():.3g}]")
    if task.kind == "binary":
        if y.ndim != 1 or not np.isin(y, (0, 1)).all():
            raise ValueError("binary y_true must be a (N,) array of 0/1")
        if s.ndim == 2 and s.shape[1] == 2:
            s = s[:, 1]
        if s.ndim != 1:
            raise ValueError(f"binary scores must be (N,) or (N, 2), got shape {s.shape}")
        y = y.astype(np.int64)
        return np.stack([1 - y, y], 1), np.stack([1 - s, s], 1)
    if s.ndim != 2 or s.shape[1] != c:
        raise ValueError(f"{task.kind} scores must be (N, {c}) for classes {task.classes}, got shape {s.shape}")
    if task.kind == "multiclass":
        if y.ndim != 1 or (n and (y.min() < 0 or y.max() >= c)) or not np.all(y == np.round(y)):
            raise ValueError(f"multiclass y_true must be (N,) class indices in [0, {c})")
        if n and np.abs(s.sum(1) - 1).max() > _SUM_TOL:
            raise ValueError("multiclass scores must be probabilities whose rows sum to 1 (apply softmax)")
        return np.eye(c, dtype=np.int64)[y.astype(np.int64)], s
    if y.shape != (n, c) or not np.isin(y, (0, 1)).all():
        raise ValueError(f"multilabel y_true must be an (N, {c}) 0/1 indicator matrix, got shape {y.shape}")
    return y.astype(np.int64), s


def _accuracy(kind: str, Y: np.ndarray, S: np.ndarray) -> float:
    if kind == "multilabel":
        return float(accuracy_score(Y, (S >= 0.5).astype(np.int64)))
    if kind == "binary":
        return float(accuracy_score(Y[:, 1], (S[:, 1] >= 0.5).astype(np.int64)))
    return float(accuracy_score(Y.argmax(1), S.argmax(1)))


def _per_class_values(Y: np.ndarray, S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class AUC and AP (NaN where undefined), one sklearn call each over the defined columns."""
    c = Y.shape[1]
    n_pos = Y.sum(0)
    auc = np.full(c, np.nan)
    ap = np.full(c, np.nan)
    auc_ok = (n_pos > 0) & (n_pos < Y.shape[0])
    ap_ok = n_pos > 0
    if auc_ok.any():
        auc[auc_ok] = roc_auc_score(Y[:, auc_ok], S[:, auc_ok], average=None)
    if ap_ok.any():
        ap[ap_ok] = average_precision_score(Y[:, ap_ok], S[:, ap_ok], average=None)
    return auc, ap


def _nanmean(v: np.ndarray) -> float | None:
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else None


def _ci(values: list[float | None] | np.ndarray) -> list[float] | None:
    v = np.asarray([x for x in values if x is not None and not np.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return None
    lo, hi = np.percentile(v, [2.5, 97.5])
    return [float(lo), float(hi)]


def evaluate_scores(task: Task, y_true, scores, bootstrap: int = 1000, seed: int = 0) -> dict:
    """Metrics for one task on one split; see the module docstring for definitions."""
    Y, S = as_matrices(task, y_true, scores)
    n, c = Y.shape
    if n == 0:
        raise ValueError("no test images to evaluate")
    n_pos = Y.sum(0)
    auc, ap = _per_class_values(Y, S)
    per_class: dict[str, dict] = {}
    undefined: list[dict] = []
    for k, name in enumerate(task.classes):
        reason = undefined_reason(int(n_pos[k]), n)
        per_class[name] = {
            "auc": None if np.isnan(auc[k]) else float(auc[k]),
            "ap": None if np.isnan(ap[k]) else float(ap[k]),
            "n_pos": int(n_pos[k]),
            "n": int(n),
            "undefined": reason,
        }
        if reason is not None:
            undefined.append(
                {"class": name, "metrics": ["auc"] + (["ap"] if np.isnan(ap[k]) else []), "reason": reason}
            )
    excluded = [u["class"] for u in undefined]
    out = {
        "kind": task.kind,
        "level": task.level,
        "classes": list(task.classes),
        "n": int(n),
        "macro_auc": _nanmean(auc),
        "accuracy": _accuracy(task.kind, Y, S),
        "map": _nanmean(ap),
        "macro_auc_classes": int(c - len(excluded)),
        "macro_auc_excluded": excluded,
        "per_class": per_class,
        "undefined": undefined,
    }
    if task.kind == "multilabel":
        out["label_accuracy"] = float(np.mean([accuracy_score(Y[:, k], S[:, k] >= 0.5) for k in range(c)]))
    out["ci"], class_ci = _bootstrap(task.kind, Y, S, bootstrap, seed)
    for k, name in enumerate(task.classes):
        per_class[name]["ci"] = {"auc": class_ci["auc"][k], "ap": class_ci["ap"][k]}
    out["bootstrap"] = {"n": int(bootstrap), "seed": int(seed), "level": 0.95}
    return out


def _bootstrap(kind: str, Y: np.ndarray, S: np.ndarray, b: int, seed: int) -> tuple[dict, dict]:
    c = Y.shape[1]
    if b <= 0:
        return {"macro_auc": None, "accuracy": None, "map": None}, {"auc": [None] * c, "ap": [None] * c}
    rng = np.random.default_rng(seed)
    n = Y.shape[0]
    macro, acc, maps = [], [], []
    aucs = np.full((b, c), np.nan)
    aps = np.full((b, c), np.nan)
    # Inputs were validated once above; skipping sklearn's per-call re-validation makes the
    # replicates about a third faster without touching the maths, and thousands of tiny calls
    # gain nothing from BLAS threads.
    with sklearn.config_context(skip_parameter_validation=True, assume_finite=True), threadpool_limits(limits=1):
        for i in range(b):
            idx = rng.integers(0, n, n)
            Yb, Sb = Y[idx], S[idx]
            aucs[i], aps[i] = _per_class_values(Yb, Sb)
            macro.append(_nanmean(aucs[i]))
            maps.append(_nanmean(aps[i]))
            acc.append(_accuracy(kind, Yb, Sb))
    ci = {"macro_auc": _ci(macro), "accuracy": _ci(acc), "map": _ci(maps)}
    per = {"auc": [_ci(aucs[:, k]) for k in range(c)], "ap": [_ci(aps[:, k]) for k in range(c)]}
    return ci, per


def point_metrics(kind: str, Y: np.ndarray, S: np.ndarray) -> dict:
    """Macro AUC, mAP, accuracy and per-class AUC/AP (NaN where undefined) of one (resampled) split.

    The numbers one bootstrap replicate above computes, for callers that resample themselves (the
    paired bootstrap of :mod:`mgll.evaluate.paired`), so every replicate anywhere is scored by the
    same code and undefined classes are dropped from the macro averages the same way.
    ``Y``/``S`` are the matrices :func:`as_matrices` returns.
    """
    auc, ap = _per_class_values(Y, S)
    return {"macro_auc": _nanmean(auc), "map": _nanmean(ap), "accuracy": _accuracy(kind, Y, S), "auc": auc, "ap": ap}


def percentile_ci(values) -> list[float] | None:
    """The 2.5/97.5 percentile interval over the defined (not None, not NaN) values, or None."""
    return _ci(values)
