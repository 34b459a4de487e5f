"""What every dataset builder shares: a crash-safe journal, a parallel runner, splits and finalisation.

A build is a list of independent per-image tasks. Each finished task appends one JSON line to
``OUT/.build/journal.jsonl`` *after* its PNG has been renamed into place, so after a SIGKILL the
journal lists only complete images and a re-run does just the rest. The dataset files
(dataset.json, records.jsonl, rejected.jsonl, summary.*) are always rewritten whole, atomically,
from the journal, which is why a killed and resumed build ends byte-identical to a clean one.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mgll.io import atomic_write_json, atomic_write_text

from .records import DatasetCard, Record, write_dataset

__all__ = [
    "STATE_DIR",
    "Journal",
    "check_build_config",
    "clean_partials",
    "finalize_build",
    "hash_split",
    "parse_split_spec",
    "run_tasks",
]

STATE_DIR = ".build"
DEFAULT_SPLIT = "train=0.8,val=0.1,test=0.1"


class Journal:
    """Append-only JSONL of finished tasks keyed by ``key``; a torn last line (killed mid-write) is dropped."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        if self.path.is_file():
            good = 0
            raw = self.path.read_bytes()
            for line in raw.splitlines(keepends=True):
                try:
                    e = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    break
                if not line.endswith(b"\n"):
                    break
                self.entries[e["key"]] = e
                good += len(line)
            if good != len(raw):
                with open(self.path, "r+b") as f:
                    f.truncate(good)
        self._fh = None
        self._since_sync = 0

    def __enter__(self) -> Journal:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")
        return self

    def append(self, entry: dict) -> None:
        assert self._fh is not None, "use the journal as a context manager to write"
        self._fh.write(json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n")
        self._fh.flush()  # in the page cache: survives SIGKILL of this process
        self.entries[entry["key"]] = entry
        self._since_sync += 1
        if self._since_sync >= 256:
            os.fsync(self._fh.fileno())
            self._since_sync = 0

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None


def check_build_config(out: Path, config: Mapping[str, Any], overwrite_state: bool = False) -> None:
    """Refuse to resume with settings that would make old and new images disagree."""
    path = Path(out) / STATE_DIR / "config.json"
    config = json.loads(json.dumps(dict(config)))
    if path.is_file() and not overwrite_state:
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        if diff:
            raise ValueError(
                f"{path}: this output folder was built with different settings ({', '.join(diff)}: "
                f"{ {k: old.get(k) for k in diff} } now { {k: config.get(k) for k in diff} }); "
                "use a new output folder or --restart to rebuild it"
            )
        return
    atomic_write_json(path, config)


def clean_partials(out: Path) -> int:
    """Remove temporaries a killed run left behind (atomic_path names them '.NAME.*.tmp')."""
    n = 0
    for folder in [out, *(p for p in out.rglob("*") if p.is_dir() and not p.name.endswith(".tmp"))]:
        for p in folder.glob(".*.tmp"):
            if p.is_dir():
                import shutil

                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            n += 1
    return n


def parse_split_spec(spec: str | None) -> list[tuple[str, float]]:
    spec = spec or DEFAULT_SPLIT
    parts: list[tuple[str, float]] = []
    for chunk in spec.split(","):
        name, sep, frac = chunk.partition("=")
        try:
            value = float(frac)
        except ValueError:
            value = -1.0
        if not sep or not name.strip() or value < 0:
            raise ValueError(f"--split: '{chunk}' is not NAME=FRACTION (e.g. {DEFAULT_SPLIT})")
        parts.append((name.strip(), value))
    total = sum(f for _, f in parts)
    if total <= 0:
        raise ValueError(f"--split: fractions must sum to a positive number, got {spec}")
    return [(n, f / total) for n, f in parts]


def hash_split(group: str, seed: int, fractions: Sequence[tuple[str, float]]) -> str:
    """Deterministic split of one patient: it never depends on which other patients exist,
    so resumed, incremental and merged builds all agree."""
    h = hashlib.sha256(f"{seed}:{group}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    acc = 0.0
    for name, frac in fractions:
        acc += frac
        if u < acc:
            return name
    return fractions[-1][0]


def run_tasks(
    func: Callable[[Any], dict],
    tasks: Sequence[Any],
    journal: Journal,
    workers: int | None = None,
    progress: bool = True,
    desc: str = "build",
) -> None:
    """Run ``func`` (a picklable top-level function) over ``tasks`` and journal each result dict."""
    workers = max(1, int(workers or os.cpu_count() or 1))
    bar = tqdm(total=len(tasks), desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    try:
        if workers == 1 or len(tasks) <= 1:
            for t in tasks:
                journal.append(func(t))
                bar.update()
        else:
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
            with ctx.Pool(workers) as pool:
                for result in pool.imap_unordered(func, tasks, chunksize=1):
                    journal.append(result)
                    bar.update()
    finally:
        bar.close()


def _records_from(entries: Iterable[dict], fractions, seed: int) -> list[Record]:
    recs = []
    for e in sorted((e for e in entries if e["status"] == "ok"), key=lambda e: e["image"]):
        group = e.get("patient") or e["image"]
        recs.append(
            Record(
                image=e["image"],
                labels={k: tuple(v) for k, v in e["labels"].items()},
                split=hash_split(group, seed, fractions),
                patient=e.get("patient"),
            )
        )
    return recs


def finalize_build(
    out: Path,
    card: DatasetCard,
    journal: Journal,
    split_spec: str | None,
    seed: int,
    extra_summary: Mapping[str, Any] | None = None,
) -> tuple[list[Record], dict]:
    """Write dataset.json, records.jsonl, rejected.jsonl and the summary from the journal; drop orphans."""
    from .build_summary import summarize, write_summary

    out = Path(out)
    fractions = parse_split_spec(split_spec)
    entries = list(journal.entries.values())
    records = _records_from(entries, fractions, seed)
    write_dataset(out, card, records)
    rejected = sorted((e for e in entries if e["status"] == "rejected"), key=lambda e: e["key"])
    atomic_write_text(
        out / "rejected.jsonl",
        "".join(
            json.dumps({k: e[k] for k in ("key", "reason", "detail") if k in e}, ensure_ascii=False) + "\n"
            for e in rejected
        ),
    )
    # Images no record points to (a source file removed, a setting changed) must not linger.
    referenced = {r.image for r in records}
    images = out / "images"
    if images.is_dir():
        for p in images.rglob("*.png"):
            if p.relative_to(out).as_posix() not in referenced:
                p.unlink()
    clean_partials(out)
    stats = dict(extra_summary or {})
    stats["skipped"] = dict(Counter(e.get("reason", "skipped") for e in entries if e["status"] == "skipped"))
    summary = summarize(card, records, Counter(e["reason"] for e in rejected), stats)
    write_summary(out, summary)
    return records, summary
