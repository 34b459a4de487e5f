"""A run's answers files: ``answers.jsonl`` and the per-process parts of a sharded run, read torn-line tolerant.

Scoring appends to them and the reports read them; both go through here, so neither needs the other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["ANSWERS_FILE", "PART_GLOB", "read_answers"]

ANSWERS_FILE = "answers.jsonl"
PART_GLOB = "answers.part-*-of-*.jsonl"


def _read_rows(path: Path, done: dict[tuple[str, int], dict]) -> None:
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done.setdefault((row["qid"], int(row["rotation"])), row)


def read_answers(out: str | os.PathLike) -> dict[tuple[str, int], dict]:
    """Answered variants: ``answers.jsonl`` and any shard part files not merged yet.

    A torn last line (the run died mid-write) is ignored and rescored. Parts of any shard count
    are read, so a sharded run resumes under another process count (or a single process).
    """
    out = Path(out)
    done: dict[tuple[str, int], dict] = {}
    for path in [out / ANSWERS_FILE, *sorted(out.glob(PART_GLOB))]:
        _read_rows(path, done)
    return done
