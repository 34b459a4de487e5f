"""Merge built datasets into one: a source tag per record, duplicate images dropped, splits leak-free.

Duplicates are found by a hash of the decoded pixels (not the file bytes), so the same photograph
re-encoded by two releases still counts once; the first input wins. A patient whose records sit in
different splits across inputs is moved whole into one split (its majority, or ``resplit``), so no
patient is in both training and evaluation data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter, defaultdict
from pathlib import Path

from mgll.io import atomic_path, atomic_write_text

from .build_runner import hash_split, parse_split_spec
from .build_summary import summarize, write_summary
from .pixel_budget import open_image
from .records import DatasetCard, Record, load_dataset, write_dataset

__all__ = ["merge_datasets", "pixel_hash"]


def pixel_hash(path: Path) -> str:
    with open_image(path) as im:
        im.load()
        h = hashlib.sha256(f"{im.mode}:{im.size}".encode())
        h.update(im.tobytes())
    return h.hexdigest()


def _parse_inputs(inputs) -> list[tuple[str, Path]]:
    out, used = [], Counter()
    for spec in inputs:
        name, sep, path = str(spec).partition("=")
        if not sep:
            name, path = "", str(spec)
        path = Path(path)
        if not name:
            name = load_dataset(path, check_images=False).card.name
        used[name] += 1
        out.append((name if used[name] == 1 else f"{name}-{used[name]}", path))
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def merge_datasets(inputs, out, resplit: str | None = None, seed: int = 0, name: str = "mgll-merged",
                   overwrite: bool = False) -> dict:
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: output folder is not empty (use --overwrite to replace it)")
    sources = _parse_inputs(inputs)
    if not sources:
        raise ValueError("merge: give at least one dataset folder")
    datasets = [(tag, load_dataset(path)) for tag, path in sources]
    card0 = datasets[0][1].card
    for _tag, ds in datasets[1:]:
        if ds.card.level_names != card0.level_names:
            raise ValueError(
                f"{ds.root}: levels {list(ds.card.level_names)} differ from {datasets[0][1].root}'s "
                f"{list(card0.level_names)}; only datasets with the same levels can be merged"
            )
    fractions = parse_split_spec(resplit) if resplit else None
    seen: dict[str, str] = {}
    dropped: Counter = Counter()
    kept: Counter = Counter()
    rows: list[tuple[str, Record]] = []
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        for tag, ds in datasets:
            for rec in ds.records:
                digest = pixel_hash(ds.image_path(rec))
                if digest in seen:
                    dropped[tag] += 1
                    continue
                seen[digest] = tag
                image = f"images/{tag}/{rec.image}"
                _link_or_copy(ds.image_path(rec), tmp / image)
                rows.append((tag, Record(image=image, labels=rec.labels, split=rec.split, patient=rec.patient)))
                kept[tag] += 1
        # leak-free splits: every patient ends in exactly one split
        by_patient: dict[str, list[int]] = defaultdict(list)
        for i, (_, r) in enumerate(rows):
            if r.patient:
                by_patient[r.patient].append(i)
        moved = 0
        for i, (tag, r) in enumerate(rows):
            if fractions and not r.patient:
                rows[i] = (tag, Record(r.image, r.labels, hash_split(f"{tag}:{r.image}", seed, fractions), None))
        for patient, idx in by_patient.items():
            splits = Counter(rows[i][1].split for i in idx)
            if fractions:
                target = hash_split(patient, seed, fractions)
            elif len(splits) > 1:
                target = sorted(splits.items(), key=lambda kv: (-kv[1], str(kv[0])))[0][0]
                moved += 1
            else:
                continue
            for i in idx:
                tag, r = rows[i]
                rows[i] = (tag, Record(r.image, r.labels, target, r.patient))
        card = DatasetCard(name=name, levels=card0.levels,
                           description=f"Merged from {', '.join(t for t, _ in sources)}; duplicate images dropped.")
        write_dataset(tmp, card, [r for _, r in rows])
        lines = (tmp / "records.jsonl").read_text(encoding="utf-8").splitlines()
        tagged = [json.dumps({**json.loads(line), "source": tag}, ensure_ascii=False) for line, (tag, _) in zip(lines, rows)]
        atomic_write_text(tmp / "records.jsonl", "".join(t + "\n" for t in tagged))
        summary = summarize(card, [r for _, r in rows], {}, {
            "sources": {t: kept[t] for t, _ in sources},
            "duplicates_dropped": {t: dropped[t] for t, _ in sources},
            "patients_resplit": moved if not fractions else len(by_patient),
        })
        write_summary(tmp, summary)
    return summary
