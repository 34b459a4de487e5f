"""``mgll check-data DATASET``: every problem a dataset has, found in one pass before any training run.

Why: training used to meet its data problems one at a time, when the sampler reached them: a
truncated PNG hours in, a non-UTF-8 byte as a bare ``UnicodeDecodeError`` with no file or line. This
reads every records line (listing all bad lines, where ``load_dataset`` stops at the first), decodes
every image once, in parallel, and reports:

* records lines the loader would refuse (not UTF-8, bad JSON, schema errors, duplicate entries);
* images that are missing, empty, unidentifiable, truncated, corrupt, over the pixel budget, not
  convertible to RGB (as training reads them: ``mgll.data.rgb``, which rescales 16-bit grayscale);
* duplicate images (same bytes, by SHA-256), flagged as a leak when the copies are in different splits;
* label problems the loader accepts but that are real mistakes: labels of one level that differ only
  by case or whitespace ("Glaucoma" / "glaucoma"), split names other than train/val/test (which is
  all that training and evaluation read), records without a split, a patient in more than one split.

A label used by a single image is not a problem and is not reported. Exit code 0 when clean, 1 when
problems were found, 2 when the dataset cannot be checked at all (no folder, no card, a bad card).
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter, defaultdict
from pathlib import Path

from tqdm import tqdm

from mgll.io import atomic_write_json

from .image_checks import REASONS, inspect_many, preflight_images
from .pixel_budget import resolve_max_pixels
from .records import Record, RecordError, records_path, scan_records

__all__ = ["SPLITS", "check_data", "format_report", "preflight_images", "register"]  # preflight: for mgll train

SPLITS = ("train", "val", "test")  # what train (data.split), probe, finetune and zeroshot read
REPORT_REASONS = {
    **REASONS,
    "bad_record": "a records line the loader refuses",
    "duplicate": "the same bytes as another record's image",
    "label_variants": "labels of one level that differ only by case or whitespace",
    "split_name": f"a split name other than {', '.join(SPLITS)}",
    "no_split": "records without a split, which no command reads",
    "patient_leak": "a patient whose records are in more than one split",
}


def _problem(reason: str, detail: str, image: str | None = None, line: int | None = None) -> dict:
    return {"reason": reason, "image": image, "line": line, "detail": detail}


def _duplicates(records: list[Record], results: list[dict]) -> list[dict]:
    first: dict[str, Record] = {}
    out = []
    for rec, res in zip(records, results):
        h = res["sha256"]
        if h is None:
            continue
        if h not in first:
            first[h] = rec
            continue
        orig = first[h]
        leak = f"; in splits {orig.split} and {rec.split}: a leak across splits" if orig.split != rec.split else ""
        out.append(_problem("duplicate", f"same bytes as {orig.image} (line {orig.line}){leak}", rec.image, rec.line))
    return out


def _label_variants(records: list[Record], levels: tuple[str, ...]) -> list[dict]:
    out = []
    for level in levels:
        forms: dict[str, Counter] = defaultdict(Counter)
        where: dict[str, Record] = {}
        for rec in records:
            for lab in rec.labels.get(level, ()):
                key = " ".join(lab.split()).casefold()
                forms[key][lab] += 1
                where.setdefault(f"{key}\0{lab}", rec)
        for key, counts in forms.items():
            if len(counts) < 2:
                continue
            rare = min(counts, key=lambda lab: (counts[lab], lab))
            rec = where[f"{key}\0{rare}"]
            listed = ", ".join(f"{lab!r} x{n}" for lab, n in counts.most_common())
            out.append(_problem(
                "label_variants",
                f"level '{level}': {listed} differ only by case or whitespace, so they train as different classes "
                f"(e.g. {rec.image}, line {rec.line})",
                rec.image, rec.line,
            ))
    return out


def _splits(records: list[Record]) -> list[dict]:
    out = []
    by_split: dict[str | None, list[Record]] = defaultdict(list)
    for rec in records:
        by_split[rec.split].append(rec)
    for name, recs in sorted(by_split.items(), key=lambda kv: (kv[0] is None, kv[0] or "")):
        if name in SPLITS:
            continue
        r0 = recs[0]
        if name is None:
            out.append(_problem("no_split", f"{len(recs)} record(s) have no split (first: line {r0.line}); training "
                                            f"and evaluation read records by split ({', '.join(SPLITS)})",
                                r0.image, r0.line))
        else:
            out.append(_problem("split_name", f"split '{name}' ({len(recs)} record(s), first on line {r0.line}) is "
                                              f"not one of {', '.join(SPLITS)}, so no command reads it",
                                r0.image, r0.line))
    splits_of: dict[str, dict[str, Record]] = defaultdict(dict)
    for rec in records:
        if rec.patient and rec.split in SPLITS:  # an unknown split name is reported above, not as a leak too
            splits_of[rec.patient].setdefault(rec.split, rec)
    for patient, seen in sorted(splits_of.items()):
        if len(seen) > 1:
            r0 = next(iter(seen.values()))
            where = ", ".join(f"{s} (line {r.line})" for s, r in sorted(seen.items()))
            out.append(_problem("patient_leak", f"patient '{patient}' is in splits {where}", r0.image, r0.line))
    return out


def check_data(
    dataset: str | os.PathLike,
    records: str | None = None,
    max_pixels: int | None = None,
    workers: int | None = 1,
    progress: bool = True,
) -> dict:
    """The report (see the module docstring); ``report["clean"]`` is True when no problem was found.

    Raises FileNotFoundError / RecordError (ValueErrors) only when the dataset cannot be checked at all.
    """
    t0 = time.perf_counter()
    root = Path(dataset)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    card, rec_path = records_path(root, records)
    budget = resolve_max_pixels(max_pixels)
    problems: list[dict] = []
    good: list[Record] = []
    for item in scan_records(rec_path, card):
        if isinstance(item, RecordError):
            problems.append(_problem("bad_record", str(item), None, item.line))
        else:
            good.append(item)
    workers = max(1, int(workers or os.cpu_count() or 1))
    with tqdm(total=len(good), desc="check-data", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        results = inspect_many([root / r.image for r in good], budget, True, True, workers, bar)
    for rec, res in zip(good, results):
        problems += [_problem(reason, detail, rec.image, rec.line) for reason, detail in res["problems"]]
    problems += _duplicates(good, results)
    problems += _label_variants(good, card.level_names)
    problems += _splits(good)
    problems.sort(key=lambda p: (p["line"] is None, p["line"] or 0, p["reason"]))
    return {
        "dataset": str(root),
        "records_file": str(rec_path),
        "records": len(good),
        "images_checked": len(good),
        "max_pixels": budget,
        "clean": not problems,
        "counts": dict(Counter(p["reason"] for p in problems).most_common()),
        "problems": problems,
        "reasons": {r: REPORT_REASONS[r] for r in sorted({p["reason"] for p in problems})},
        "seconds": round(time.perf_counter() - t0, 3),
    }


def format_report(report: dict) -> str:
    """A plain-text table for the terminal: one row per problem, then the count per reason."""
    head = (f"{report['dataset']}: {report['records']} records, {report['images_checked']} images decoded "
            f"(pixel budget {report['max_pixels']:,}) in {report['seconds']:.1f}s: ")
    if report["clean"]:
        return head + "no problems found."
    rows = [(p["reason"], p["image"] or "-", "-" if p["line"] is None else str(p["line"]), p["detail"])
            for p in report["problems"]]
    cols = [("reason", "image", "line", "detail")] + rows
    w = [min(48, max(len(r[i]) for r in cols)) for i in range(3)]
    lines = [head + f"{len(rows)} problem(s).", ""]
    for r in cols:
        lines.append(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:>{w[2]}}  {r[3]}")
    lines.append("")
    for reason, n in report["counts"].items():
        lines.append(f"{n:>6}  {reason}: {report['reasons'][reason]}")
    return "\n".join(lines)


def _cmd_check_data(args: argparse.Namespace) -> int:
    report = check_data(args.dataset, records=args.records, max_pixels=args.max_pixels, workers=args.workers,
                        progress=not args.no_progress)
    print(format_report(report))
    if args.out:
        atomic_write_json(args.out, report)
        print(f"report: {args.out}")
    return 0 if report["clean"] else 1


def register(subparsers) -> None:
    p = subparsers.add_parser("check-data", help="decode every image and check every record of a dataset; "
                                                 "exit 1 when problems are found")
    p.add_argument("dataset", help="dataset folder (card + records)")
    p.add_argument("--records", default=None, help="records file in the folder (default: the card's, else records.jsonl)")
    p.add_argument("--max-pixels", default=None,
                   help="pixel budget per image (default: MGLL_MAX_PIXELS, else 40M); larger images are reported")
    p.add_argument("--workers", type=int, default=None, help="processes decoding images (default: all cores)")
    p.add_argument("--out", default=None, help="also write the report as JSON here (atomically)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_check_data)
