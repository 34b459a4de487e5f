"""MGLL-Fundus from a public fundus release: status -> disease -> clinical explanation.

Each release's labels are read by a small reader (fundus_readers), harmonised through the shipped
vocabulary (fundus_vocab.yaml) and explained from the project's knowledge table
(fundus_knowledge.yaml). Images are cropped to the fundus (the black surround removed) and resized;
the run is parallel, resumable and keeps a rejected list, sharing build_runner with build-xray.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from mgll.io import atomic_path

from .build_runner import STATE_DIR, Journal, check_build_config, clean_partials, finalize_build, run_tasks
from .fundus_readers import Item, read_release
from .fundus_vocab import explain, load_vocab
from .pixel_budget import ImageTooLargeError, open_image, resolve_max_pixels
from .records import DatasetCard, Level

__all__ = ["build_fundus", "crop_black_border", "fundus_card", "item_labels", "process_fundus"]

BORDER_THRESHOLD = 0.06  # fraction of the image's bright level below which a pixel counts as black surround


def fundus_card(name: str) -> DatasetCard:
    return DatasetCard(
        name=name,
        levels=(
            Level("status", "a fundus photograph of a {} eye"),
            Level("disease", "a fundus photograph showing {}"),
            Level("explanation", "{}"),
        ),
        description="Fundus photographs: status -> harmonised disease names -> clinical explanation per disease/grade.",
    )


def crop_black_border(rgb: np.ndarray) -> np.ndarray:
    """Crop to the bounding box of the illuminated fundus; leave the image alone if that box looks wrong."""
    lum = rgb.astype(np.float32).max(axis=2)
    bright = np.percentile(lum, 99)
    if bright <= 0:
        return rgb
    mask = lum > BORDER_THRESHOLD * bright
    rows = np.flatnonzero(mask.mean(axis=1) > 0.01)
    cols = np.flatnonzero(mask.mean(axis=0) > 0.01)
    if rows.size == 0 or cols.size == 0:
        return rgb
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    if (r1 - r0) * (c1 - c0) < 0.1 * lum.size:  # a dark or odd picture: cropping would lose it
        return rgb
    return rgb[r0:r1, c0:c1]


def item_labels(item: Item) -> tuple[dict[str, list[str]] | None, str | None, list[str]]:
    """(labels, reject reason, unmapped terms) for one item."""
    vocab = load_vocab()
    if any(f.kind == "reject" for f in item.findings):
        return None, "not_a_fundus_image", []
    diseases: dict[str, str | None] = {}
    unmapped = []
    for f in item.findings:
        if f.kind in ("disease", "unmapped"):
            if f.kind == "unmapped":
                unmapped.append(f.disease)
            if f.disease not in diseases or (f.grade and not diseases[f.disease]):
                diseases[f.disease] = f.grade
    if not diseases:
        if not any(f.kind == "normal" for f in item.findings):
            return None, "no_label", unmapped
        return {"status": ["normal"], "disease": [vocab.normal_name], "explanation": [explain(vocab.normal_name)]}, None, []
    names = list(diseases)
    return (
        {"status": ["abnormal"], "disease": names, "explanation": [explain(d, diseases[d]) for d in names]},
        None,
        unmapped,
    )


def _image_name(key: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", key.rsplit("/", 1)[-1].rsplit(":", 1)[-1].rsplit(".", 1)[0])[:40]
    return f"images/{stem}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.png"


def process_fundus(task: dict) -> dict:
    """One image -> journal entry. Top level so multiprocessing can pickle it; never raises."""
    key, out = task["key"], Path(task["out"])
    try:
        with open_image(task["path"], task.get("max_pixels")) as im:  # the budget is checked before decoding
            im.load()
            rgb = np.asarray(im.convert("RGB"))
    except ImageTooLargeError as e:
        return {"key": key, "status": "rejected", "reason": e.reason, "detail": f"{e.size_text} is over the {e.budget_text}"}
    except Exception as e:  # noqa: BLE001 - a broken image of any kind is a rejection, not a crash
        return {"key": key, "status": "rejected", "reason": "unreadable", "detail": f"{type(e).__name__}: {e}"[:200]}
    if task["crop"]:
        rgb = crop_black_border(rgb)
    img = Image.fromarray(rgb)
    if task["size"]:
        h, w = rgb.shape[:2]
        s = task["size"] / max(h, w)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS, reducing_gap=3.0)
    rel = task["image"]
    with atomic_path(out / rel) as tmp:
        with open(tmp, "wb") as f:
            img.save(f, format="PNG")
            f.flush()
            os.fsync(f.fileno())
    return {"key": key, "status": "ok", "image": rel, "labels": task["labels"], "patient": task["patient"]}


def build_fundus(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    fmt: str = "auto",
    size: int = 512,
    crop: bool = True,
    split: str | None = None,
    seed: int = 0,
    workers: int | None = None,
    retry_rejected: bool = False,
    restart: bool = False,
    strict_vocab: bool = False,
    progress: bool = True,
    name: str | None = None,
    max_pixels: int | None = None,
) -> dict:
    """Build (or resume) an MGLL-Fundus dataset from one release; returns the summary dict.

    Images over ``max_pixels`` (default ``MGLL_MAX_PIXELS``, else 40 MP) are rejected as ``too_large``
    from their header, undecoded. The budget is not part of the resume check: raising it and passing
    ``retry_rejected`` builds the images it refused before.
    """
    src, out = Path(src), Path(out)
    max_pixels = resolve_max_pixels(max_pixels)
    fmt, items = read_release(src, fmt)
    if restart:
        for p in (out / STATE_DIR, out / "images"):
            shutil.rmtree(p, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    check_build_config(out, {"builder": "fundus", "format": fmt, "size": size, "crop": crop, "strict_vocab": strict_vocab})
    clean_partials(out)
    journal = Journal(out / STATE_DIR / "journal.jsonl")
    unmapped: Counter = Counter()
    tasks, pre = [], []
    for it in items:
        labels, reason, unknown = item_labels(it)
        unmapped.update(unknown)
        if reason is None and strict_vocab and unknown:
            reason = "unmapped_label"
        if reason is None and it.path is None:
            reason = "missing_image"
        if reason is not None:
            pre.append({"key": it.key, "status": "rejected", "reason": reason,
                        **({"detail": ", ".join(unknown)} if unknown else {})})
            continue
        done = journal.entries.get(it.key)
        entry = {"key": it.key, "path": str(it.path), "out": str(out), "image": _image_name(it.key), "labels": labels,
                 "patient": it.patient, "size": size, "crop": crop, "max_pixels": max_pixels}
        if done is not None:
            if done["status"] == "ok" and (out / done["image"]).is_file():
                if done["labels"] != labels or done.get("patient") != it.patient:
                    journal.entries[it.key] = done | {"labels": labels, "patient": it.patient}  # label-only update
                continue
            if done["status"] == "rejected" and not retry_rejected:
                continue
        tasks.append(entry)
    live = {it.key for it in items}
    with journal:
        for e in pre:
            if journal.entries.get(e["key"]) != e:
                journal.append(e)
        run_tasks(process_fundus, tasks, journal, workers=workers, progress=progress, desc=f"build-fundus {fmt}")
    journal.entries = {k: e for k, e in journal.entries.items() if k in live}
    _, summary = finalize_build(
        out, fundus_card(name or f"mgll-fundus-{fmt}"), journal, split, seed,
        {"format": fmt, "source_items": len(items), "processed_this_run": len(tasks),
         "unmapped_terms": dict(unmapped.most_common())},
    )
    return summary
