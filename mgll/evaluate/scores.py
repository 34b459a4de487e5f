"""Per-image test scores of an evaluation run (``scores.npz``), and lining two runs up image by image.

A paired comparison resamples the *same* test images for both encoders, so it needs what the
summary numbers in ``metrics.json`` throw away: each image's id, its target and every evaluation's
score row. The probe writes them next to its report:

* ``images``: the test records' image paths (their ids within the dataset), in row order;
* ``y``: the targets exactly as given to :func:`~mgll.evaluate.metrics.evaluate_scores`;
* ``names``: the evaluation names (``fraction 1`` ...) and ``scores_<i>``: evaluation i's (N, C) scores.

The file is written *before* ``metrics.json``, which records its SHA-256; a reader that finds a
different hash (the probe died between the two writes, or an older file was copied in) refuses it
instead of pairing a report with someone else's scores.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mgll.io import atomic_write_bytes

__all__ = ["SCORES_FILE", "RunScores", "write_scores", "read_scores", "align"]

SCORES_FILE = "scores.npz"


@dataclass
class RunScores:
    run: Path  # the run folder, for error messages
    images: list[str]
    y: np.ndarray
    scores: dict[str, np.ndarray]  # evaluation name -> (N, C)


def write_scores(out: str | Path, images: Sequence[str], y, scores: Mapping[str, np.ndarray]) -> dict:
    """Write ``out/scores.npz`` atomically; returns ``{"path", "sha256"}`` for the report to record."""
    images = [str(i) for i in images]
    y = np.asarray(y)
    arrays = {"images": np.asarray(images, dtype=str), "y": y, "names": np.asarray(list(scores), dtype=str)}
    for i, s in enumerate(scores.values()):
        s = np.asarray(s, dtype=np.float64)
        if s.shape[0] != len(images):
            raise ValueError(f"scores have {s.shape[0]} rows for {len(images)} images")
        arrays[f"scores_{i}"] = s
    if y.shape[0] != len(images):
        raise ValueError(f"targets have {y.shape[0]} rows for {len(images)} images")
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    data = buf.getvalue()
    atomic_write_bytes(Path(out) / SCORES_FILE, data)
    return {"path": SCORES_FILE, "sha256": hashlib.sha256(data).hexdigest()}


def read_scores(run: str | Path, report: Mapping) -> RunScores | None:
    """The per-image scores a report points to, or None when it has none (an older or non-probe run).

    ``run`` is the run folder or its ``metrics.json``. A file whose hash differs from the one the
    report recorded raises: it belongs to another evaluation.
    """
    run = Path(run)
    folder = run.parent if run.name.endswith(".json") else run
    ref = report.get("scores_file")
    if not ref:
        return None
    path = folder / ref["path"]
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: metrics.json names {ref['path']} but it is missing")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != ref.get("sha256"):
        raise ValueError(f"{path}: does not match the hash in {folder / 'metrics.json'} (from another run?)")
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        names = [str(n) for n in z["names"]]
        return RunScores(folder, [str(i) for i in z["images"]], z["y"], {n: z[f"scores_{i}"] for i, n in enumerate(names)})


def _examples(items: set[str], k: int = 3) -> str:
    some = sorted(items)[:k]
    return ", ".join(some) + (" ..." if len(items) > k else "")


def align(ref: RunScores, other: RunScores) -> RunScores:
    """``other`` with its rows in ``ref``'s image order; ValueError naming both runs if the images differ.

    Rows are matched by image id, so two probes that listed the same test images in a different
    order still pair up; a different image set, a duplicated id or a differing target is an error,
    because a paired statistic over different images is no longer paired.
    """
    where = f"{other.run} vs {ref.run}"
    if other.images != ref.images:
        a, b = set(ref.images), set(other.images)
        if a != b:
            raise ValueError(
                f"{where}: not evaluated on the same test images ({len(a - b)} only in {ref.run}"
                + (f": {_examples(a - b)}" if a - b else "")
                + f"; {len(b - a)} only in {other.run}"
                + (f": {_examples(b - a)}" if b - a else "")
                + ")"
            )
        if len(a) != len(ref.images) or len(b) != len(other.images):
            raise ValueError(f"{where}: duplicated image ids ({len(ref.images)} vs {len(other.images)} rows for {len(a)} images)")
        row = {img: i for i, img in enumerate(other.images)}
        order = np.array([row[img] for img in ref.images])
        other = RunScores(other.run, list(ref.images), other.y[order], {k: v[order] for k, v in other.scores.items()})
    if other.y.shape != ref.y.shape:
        raise ValueError(f"{where}: same test images but targets of shape {other.y.shape} vs {ref.y.shape}; not the same task")
    if not np.array_equal(other.y, ref.y):
        bad = int(np.any((other.y != ref.y).reshape(len(ref.images), -1), axis=1).sum())
        raise ValueError(f"{where}: same test images but different targets for {bad} of them; not the same task")
    return other
