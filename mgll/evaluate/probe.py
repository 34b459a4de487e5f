"""Linear probe: a classifier on frozen, cached image features, scored on the test split.

Heads:

* ``logreg`` (default): scikit-learn ``LogisticRegression`` on standardised features (one-vs-rest
  for multi-label), its inverse regularisation ``C`` picked from a small grid by macro AUC on the
  validation split, then refit on the training subset.
* ``linear``: a torch ``nn.Linear`` trained with Adam (cross-entropy, or BCE for multi-label),
  early-stopped on validation loss and restored to its best epoch, as in the reference protocol.

Training fractions are sampled by patient (a patient's images are all in or all out, so the subset
never holds a patient that its complement also holds), stratified over all labels at once by
iterative stratification, then topped up so every class keeps at least one positive when the split
has one; seeded.
Without a ``val`` split, 15% of the training patients are held out the same way.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from mgll.data.records import MultiGranularDataset, Record, RecordError
from mgll.data.shards import open_dataset
from mgll.evaluate.features import FeatureSet, extract_features
from mgll.evaluate.metrics import evaluate_scores
from mgll.evaluate.reports import write_report
from mgll.evaluate.scores import write_scores
from mgll.evaluate.tasks import Task, make_task, task_records, task_targets

__all__ = [
    "C_GRID",
    "HEADS",
    "encoder_label",
    "fit_head",
    "fraction_indices",
    "indicator",
    "run_probe",
]

HEADS = ("logreg", "linear")
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # larger C barely differs on standardised features and converges slowly
VAL_FRACTION = 0.15
SMALL_PROBLEM = 4_000_000  # feature-matrix entries below which heads are fitted single-threaded


def indicator(task: Task, y: np.ndarray) -> np.ndarray:
    """Targets as an (N, C) 0/1 matrix for every kind (binary -> two columns)."""
    if task.kind == "multilabel":
        return np.asarray(y, dtype=np.int64)
    return np.eye(len(task.classes), dtype=np.int64)[np.asarray(y, dtype=np.int64)]


# ----------------------------------------------------------------------------- fractions


def fraction_indices(patients: Sequence[str | None], Y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a patient-level, label-stratified ``fraction`` of the records.

    ``patients[i]`` groups records (None = a patient of its own); ``Y`` is the (N, C) indicator.
    Whole patients are dealt into "kept" and "rest" by iterative stratification (Sechidis et al.,
    2011): the label with the fewest unassigned positives goes first, and each of its patients (in
    seeded order) joins the side that still wants the most of that label, so every label's count,
    not only the rarest one's, lands near ``fraction`` of its total. Then, rarest class first, one
    patient is added for any class left without a positive (when the split has one).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    n = len(patients)
    Y = np.asarray(Y)
    if Y.shape[0] != n:
        raise ValueError(f"{n} patient ids but {Y.shape[0]} label rows")
    if fraction >= 1.0 or n == 0:
        return np.arange(n)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(patients):
        groups.setdefault(p if p is not None else f"\0record{i}", []).append(i)
    rng = np.random.default_rng(seed)
    names = list(groups)
    order = [names[j] for j in rng.permutation(len(names))]
    counts = {p: Y[groups[p]].sum(0) for p in order}  # positives per class per patient
    ratios = np.array([fraction, 1.0 - fraction])
    want_labels = np.outer(ratios, Y.sum(0)).astype(np.float64)  # (2 sides, C)
    want_size = ratios * n
    side: dict[str, int] = {}

    def assign(p: str, s: int) -> None:
        side[p] = s
        want_labels[s] -= counts[p]
        want_size[s] -= len(groups[p])

    remaining = Y.sum(0).astype(np.float64)
    while True:
        live = np.flatnonzero(remaining > 0)
        if live.size == 0:
            break
        lab = live[np.argmin(remaining[live])]
        for p in order:
            if p in side or counts[p][lab] == 0:
                continue
            w = want_labels[:, lab]
            s = int(np.argmax(w)) if w[0] != w[1] else int(np.argmax(want_size))
            assign(p, s)
            remaining -= counts[p]
    for p in order:  # patients with no positive label: fill sides to size
        if p not in side:
            assign(p, int(np.argmax(want_size)))
    kept = {p for p, s in side.items() if s == 0}
    prevalence = Y.sum(0)
    for c in np.argsort(prevalence, kind="stable"):
        if prevalence[c] == 0 or any(counts[p][c] for p in kept):
            continue
        kept.add(next(p for p in order if p not in kept and counts[p][c]))
    if not kept:  # a tiny fraction of a label-free split: still train on something
        kept.add(order[0])
    return np.array(sorted(i for p in kept for i in groups[p]), dtype=np.int64)


# ----------------------------------------------------------------------------- heads


def _val_key(task: Task, y: np.ndarray, P: np.ndarray) -> tuple[float, float]:
    m = evaluate_scores(task, y, P, bootstrap=0)
    return (m["macro_auc"] if m["macro_auc"] is not None else -np.inf, m["accuracy"])


def _logreg_fit(task: Task, X: np.ndarray, y: np.ndarray, C: float, seed: int):
    base = LogisticRegression(C=C, max_iter=1000, random_state=seed)
    clf = OneVsRestClassifier(base) if task.kind == "multilabel" else base
    pipe = make_pipeline(StandardScaler(), clf)
    with warnings.catch_warnings():
        # constant label columns in small fractions and slow convergence at large C are expected here
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipe.fit(X, y)
    return pipe


def _logreg_proba(task: Task, pipe, X: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        P = pipe.predict_proba(X)
    if task.kind == "multilabel":
        return P
    full = np.zeros((X.shape[0], len(task.classes)))
    full[:, pipe.classes_.astype(int)] = P  # a class absent from the training subset scores 0
    return full


def _fit_logreg(task, Xtr, ytr, Xva, yva, seed):
    if task.kind != "multilabel" and len(np.unique(ytr)) < 2:
        raise ValueError(f"the training subset holds only class {task.classes[int(ytr[0])]!r}; a classifier needs two")
    scores = {}
    for C in C_GRID:
        pipe = _logreg_fit(task, Xtr, ytr, C, seed)
        scores[C] = _val_key(task, yva, _logreg_proba(task, pipe, Xva))
    best = max(C_GRID, key=lambda C: scores[C])  # first max = strongest regularisation among ties
    pipe = _logreg_fit(task, Xtr, ytr, best, seed)
    info = {"C": best, "val_macro_auc_by_C": {str(C): _finite(s[0]) for C, s in scores.items()}}
    return (lambda X: _logreg_proba(task, pipe, X)), info


def _finite(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


def _fit_linear(task, Xtr, ytr, Xva, yva, seed, lr=1e-2, weight_decay=1e-4, max_epochs=500, patience=20, batch_size=256):
    torch.manual_seed(seed)
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
    xt = torch.from_numpy(((Xtr - mu) / sd).astype(np.float32))
    xv = torch.from_numpy(((Xva - mu) / sd).astype(np.float32))
    multilabel = task.kind == "multilabel"
    yt = torch.from_numpy(ytr.astype(np.float32 if multilabel else np.int64))
    yv = torch.from_numpy(yva.astype(np.float32 if multilabel else np.int64))
    head = torch.nn.Linear(xt.shape[1], len(task.classes))
    loss_fn = torch.nn.BCEWithLogitsLoss() if multilabel else torch.nn.CrossEntropyLoss()
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    best, best_state, best_epoch, bad = float("inf"), None, 0, 0
    for epoch in range(max_epochs):
        head.train()
        for idx in torch.randperm(xt.shape[0], generator=gen).split(batch_size):
            opt.zero_grad()
            loss_fn(head(xt[idx]), yt[idx]).backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            v = float(loss_fn(head(xv), yv))
        if v < best - max(1e-4, 1e-3 * abs(best) if np.isfinite(best) else 0.0):  # stop on a plateau, not on noise
            best, best_epoch, bad = v, epoch, 0
            best_state = {k: t.clone() for k, t in head.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                break
    head.load_state_dict(best_state)

    @torch.no_grad()
    def predict(X: np.ndarray) -> np.ndarray:
        logits = head(torch.from_numpy(((X - mu) / sd).astype(np.float32)))
        return (torch.sigmoid(logits) if multilabel else torch.softmax(logits, 1)).double().numpy()

    return predict, {"best_epoch": best_epoch, "epochs": epoch + 1, "val_loss": best, "lr": lr, "weight_decay": weight_decay}


def fit_head(task: Task, Xtr, ytr, Xva, yva, head: str = "logreg", seed: int = 0):
    """Train a head; returns (predict_proba(X) -> (N, C) probabilities, info dict)."""
    # Probe problems are many small solves: BLAS/OpenMP/torch threading costs far more than it saves
    # on them (12x slower logreg, 40x slower linear head measured on 2 busy cores), so small ones run
    # single-threaded; large feature matrices keep the threads.
    small = np.asarray(Xtr).size < SMALL_PROBLEM
    if head == "logreg":
        with threadpool_limits(limits=1 if small else None):
            return _fit_logreg(task, Xtr, ytr, Xva, yva, seed)
    if head == "linear":
        threads = torch.get_num_threads()
        if small:
            torch.set_num_threads(1)
        try:
            return _fit_linear(task, Xtr, ytr, Xva, yva, seed)
        finally:
            torch.set_num_threads(threads)
    raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")


# ----------------------------------------------------------------------------- run


def encoder_label(encoder: str) -> str:
    """A short name for tables: the run folder's name for a saved encoder, else the architecture."""
    p = Path(encoder)
    if p.exists():
        p = p.resolve()
        return p.parent.name if p.name == "encoder" else p.name
    return encoder


def _patients(records: Sequence[Record]) -> list[str | None]:
    return [r.patient for r in records]


def _split_records(ds: MultiGranularDataset, task: Task, name: str) -> list[Record]:
    recs = task_records(task, ds.split(name))
    return recs


def _aligned(fs: FeatureSet, records: list[Record]) -> tuple[np.ndarray, list[Record]]:
    row = {img: i for i, img in enumerate(fs.images)}
    keep = [r for r in records if r.image in row]
    return fs.features[[row[r.image] for r in keep]], keep


def run_probe(
    encoder: str | Path,
    data: str | Path | MultiGranularDataset,
    level: str,
    classes: Sequence[str] | None = None,
    fractions: Sequence[float] = (1.0,),
    head: str = "logreg",
    bootstrap: int = 1000,
    seed: int = 0,
    out: str | Path | None = None,
    pretrained: str | None = None,
    cache_dir: str | Path | None = None,
    device: str | None = None,
    batch_size: int = 64,
    splits: tuple[str, str, str] = ("train", "val", "test"),
    progress: bool = True,
) -> dict:
    """Probe ``encoder`` on one level of a dataset; writes metrics.json/.md into ``out`` if given."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")
    t0 = time.perf_counter()
    encoder = str(encoder)
    ds = data if isinstance(data, MultiGranularDataset) else open_dataset(data)  # a folder, or shards unpacked once
    task = make_task(ds, level, classes)
    train_name, val_name, test_name = splits
    have = ds.splits()
    for needed in (train_name, test_name):
        if not have.get(needed):
            raise RecordError(f"{ds.root}: no records in split '{needed}' (splits: {have}); the probe needs train and test")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    warn: list[str] = []

    feats: dict[str, tuple[np.ndarray, list[Record]]] = {}
    cache: dict[str, dict] = {}
    skipped: list[dict] = []
    split_names = [train_name, test_name] + ([val_name] if have.get(val_name) else [])
    for name in split_names:
        recs = _split_records(ds, task, name)
        if not recs:
            raise RecordError(f"{ds.root}: split '{name}' has no records with a label in {task.classes}")
        fs = extract_features(
            encoder, ds, recs, name, pretrained=pretrained, cache_dir=cache_dir, batch_size=batch_size,
            device=device, progress=progress,
        )
        feats[name] = _aligned(fs, recs)
        cache[name] = {"hit": fs.cache_hit, "path": str(fs.cache_path) if fs.cache_path else None}
        skipped += [{"split": name, **s} for s in fs.skipped]
    for s in skipped:
        warn.append(f"skipped unreadable image {s['image']}: {s['reason']}")

    Xtr_all, rtr_all = feats[train_name]
    ytr_all = task_targets(task, rtr_all)
    if val_name in feats:
        Xva, rva = feats[val_name]
    else:
        held = fraction_indices(_patients(rtr_all), indicator(task, ytr_all), VAL_FRACTION, seed)
        mask = np.zeros(len(rtr_all), bool)
        mask[held] = True
        Xva, rva = Xtr_all[mask], [r for r, m in zip(rtr_all, mask) if m]
        Xtr_all, rtr_all = Xtr_all[~mask], [r for r, m in zip(rtr_all, mask) if not m]
        ytr_all = ytr_all[~mask]
        warn.append(f"no '{val_name}' split: held out {len(rva)} training images ({VAL_FRACTION:.0%} of patients) for validation")
    yva = task_targets(task, rva)
    Xte, rte = feats[test_name]
    yte = task_targets(task, rte)

    sides = {"train": rtr_all, "val": rva, "test": rte}
    pats = {k: {r.patient for r in v if r.patient is not None} for k, v in sides.items()}
    for a, b in (("train", "test"), ("train", "val"), ("val", "test")):
        shared = pats[a] & pats[b]
        if shared:
            warn.append(f"{len(shared)} patient(s) appear in both {a} and {b} (e.g. {sorted(shared)[:3]}): results may be optimistic")

    results: dict[str, dict] = {}
    test_scores: dict[str, np.ndarray] = {}  # kept for paired comparisons (`mgll compare`)
    for frac in fractions:
        idx = fraction_indices(_patients(rtr_all), indicator(task, ytr_all), float(frac), seed)
        Xtr, ytr = Xtr_all[idx], ytr_all[idx]
        predict, info = fit_head(task, Xtr, ytr, Xva, yva, head=head, seed=seed)
        P = predict(Xte)
        m = evaluate_scores(task, yte, P, bootstrap=bootstrap, seed=seed)
        m["train"] = {
            "fraction": float(frac),
            "n_images": int(len(idx)),
            "n_patients": len({rtr_all[i].patient or rtr_all[i].image for i in idx}),
            "n_pos": dict(zip(task.classes, indicator(task, ytr).sum(0).tolist())),
        }
        m["head"] = {"name": head, **info}
        results[f"fraction {float(frac):g}"] = m
        test_scores[f"fraction {float(frac):g}"] = P

    report = {
        "command": "probe",
        "label": encoder_label(encoder),
        "encoder": str(encoder),
        "pretrained": pretrained,
        "dataset": str(ds.root),
        "dataset_name": ds.card.name,
        "split": test_name,
        "task": task.to_dict(),
        "head": head,
        "seed": seed,
        "features": {"dim": int(Xte.shape[1]), "cache": cache, "skipped": skipped},
        "n": {"train": len(rtr_all), "val": len(rva), "test": len(rte)},
        "warnings": warn,
        "results": results,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if out is not None:
        # scores first: the report records their hash, so a report never points at another run's scores
        report["scores_file"] = write_scores(out, [r.image for r in rte], yte, test_scores)
        json_path, md_path = write_report(out, report, f"Linear probe: {report['label']} on {ds.card.name} / {level}")
        report["paths"] = {"json": str(json_path), "md": str(md_path)}
    return report
