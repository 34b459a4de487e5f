"""Procedural fundus-like and X-ray-like datasets with real multi-granular structure.

They exist so the whole pipeline (contract, training, evaluation, MLLM swap) can be exercised and
tested without downloading a medical dataset. The images are cartoons, but the *structure* is the
point: labels at several granularities that are visibly grounded in the pixels, diseases that
co-occur the way they do clinically, severity that changes both the picture and the text, and
nuisance variation a model has to ignore. Everything is vectorised numpy on a coordinate grid so
600 images at 64 px render in a few seconds on one core.

Determinism: label sampling uses one generator seeded by ``seed``; each image is rendered from its
own generator seeded by ``(seed, index)``, so the bytes do not depend on ``workers``.
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from mgll.data.records import MultiGranularDataset, Record, load_dataset, write_dataset
from mgll.io import atomic_path

__all__ = [
    "FUNDUS_DISEASES",
    "FUNDUS_EXPLANATIONS",
    "NORMAL_DISEASE",
    "NORMAL_EXPLANATION",
    "SEVERITIES",
    "NO_FINDING",
    "XRAY_FINDINGS",
    "XRAY_MODALITIES",
    "XRAY_REPORTS",
    "XRAY_SERIES",
    "XRAY_STUDIES",
    "fundus_card",
    "make_synthetic",
    "render_fundus",
    "render_xray",
    "xray_card",
]

from .fundus import (
    FUNDUS_DISEASES,
    FUNDUS_EXPLANATIONS,
    NORMAL_DISEASE,
    NORMAL_EXPLANATION,
    _fundus_labels,
    _plan_fundus,
    fundus_card,
    render_fundus,
)
from .sampling import SEVERITIES
from .xray import (
    NO_FINDING,
    XRAY_FINDINGS,
    XRAY_MODALITIES,
    XRAY_REPORTS,
    XRAY_SERIES,
    XRAY_STUDIES,
    _plan_xray,
    _xray_labels,
    render_xray,
    xray_card,
)

_SPLIT_NAMES = ("train", "val", "test")


def _render_task(task: tuple) -> None:
    kind, index, spec, size, seed, path = task
    if kind == "fundus":
        image = Image.fromarray(render_fundus(spec["diseases"], size, (seed, index)), "RGB")
    else:
        image = Image.fromarray(
            render_xray(spec["modality"], spec["study"], spec["series"], size, (seed, index), spec.get("findings")), "L"
        )
    with atomic_path(path) as tmp:  # a killed run never leaves a truncated PNG behind
        image.save(tmp, format="PNG")


def _assign_splits(patients: list[str], splits: Sequence[float], rng: np.random.Generator) -> dict[str, str]:
    fr = np.asarray(splits, dtype=np.float64)
    if fr.ndim != 1 or not 1 <= fr.size <= 3 or (fr < 0).any() or fr.sum() <= 0:
        raise ValueError(f"splits must be 1-3 non-negative fractions (train, val, test), got {splits!r}")
    fr = fr / fr.sum()
    order = rng.permutation(len(patients))
    bounds = np.round(np.cumsum(fr) * len(patients)).astype(int)
    out = {}
    for rank, idx in enumerate(order):
        k = int(np.searchsorted(bounds, rank, side="right"))
        out[patients[idx]] = _SPLIT_NAMES[min(k, fr.size - 1)]
    return out


def make_synthetic(
    out: str | Path,
    kind: str = "fundus",
    n: int = 400,
    size: int = 64,
    seed: int = 0,
    splits: Sequence[float] = (0.7, 0.15, 0.15),
    workers: int = 1,
    overwrite: bool = False,
) -> MultiGranularDataset:
    """Generate a synthetic dataset folder and return it loaded (and therefore validated).

    Refuses a non-empty ``out`` unless ``overwrite``: stale images from a bigger earlier run would
    otherwise sit next to the new records and silently mislead anyone browsing the folder.
    """
    if kind not in ("fundus", "xray"):
        raise ValueError(f"kind must be 'fundus' or 'xray', got {kind!r}")
    if n < 1:
        raise ValueError("n must be >= 1")
    if size < 16:
        raise ValueError("size must be >= 16 pixels for the signs to be drawable")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass overwrite=True to replace it")
        shutil.rmtree(out / "images", ignore_errors=True)
    (out / "images").mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    plan = _plan_fundus(n, rng) if kind == "fundus" else _plan_xray(n, rng)
    patients = list(dict.fromkeys(p for p, _ in plan))
    split_of = _assign_splits(patients, splits, np.random.default_rng([seed, 7]))

    tasks, records = [], []
    for i, (patient, spec) in enumerate(plan):
        rel = f"images/{i:06d}.png"
        tasks.append((kind, i, spec, size, seed, str(out / rel)))
        if kind == "fundus":
            labels = _fundus_labels(spec["diseases"])
        else:
            labels = _xray_labels(spec)
        records.append(Record(image=rel, labels=labels, split=split_of[patient], patient=patient))

    if workers > 1 and len(tasks) > 1:
        methods = mp.get_all_start_methods()
        ctx = mp.get_context("fork" if "fork" in methods else "spawn")
        with ctx.Pool(min(workers, len(tasks))) as pool:
            for _ in pool.imap_unordered(_render_task, tasks, chunksize=max(1, len(tasks) // (workers * 8))):
                pass
    else:
        for t in tasks:
            _render_task(t)

    card = fundus_card() if kind == "fundus" else xray_card()
    write_dataset(out, card, records)
    return load_dataset(out)
