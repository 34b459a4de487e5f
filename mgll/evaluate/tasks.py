"""A downstream classification task is one level of a dataset, optionally restricted to some classes.

The kind is read off the labels rather than declared, so the same dataset card serves a binary
status task, a multi-class task and a multi-label disease task without extra configuration:

* multi-label if any record (any split) carries more than one label at that level, whatever the
  restriction; the level's nature does not change because a user looks at a subset of classes;
* otherwise binary for 2 classes and multi-class for more.

Restricting with ``classes`` keeps the user's class order. Records with none of the kept classes
are *dropped* for single-label tasks (they have no target) and become *all-zero rows* for
multi-label tasks (they are genuine negatives for every kept class, and dropping them would inflate
prevalence and every metric). :func:`task_records` applies that rule; :func:`task_targets`
refuses single-label records that have no kept label instead of inventing a target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from mgll.data.records import MultiGranularDataset, Record, RecordError

__all__ = ["KINDS", "Task", "make_task", "task_records", "task_targets"]

KINDS = ("binary", "multiclass", "multilabel")


@dataclass
class Task:
    level: str
    classes: list[str]
    kind: str  # "binary" | "multiclass" | "multilabel"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task kind must be one of {KINDS}, got {self.kind!r}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"task classes contain duplicates: {self.classes}")
        if self.kind == "binary" and len(self.classes) != 2:
            raise ValueError(f"a binary task needs exactly 2 classes, got {self.classes}")
        if self.kind == "multiclass" and len(self.classes) < 3:
            raise ValueError(f"a multiclass task needs at least 3 classes, got {self.classes}")
        if not self.classes:
            raise ValueError("a task needs at least one class")

    @property
    def positive(self) -> str | None:
        """The class whose probability a binary score stands for (the second class)."""
        return self.classes[1] if self.kind == "binary" else None

    def to_dict(self) -> dict:
        return asdict(self)


def make_task(dataset: MultiGranularDataset, level: str, classes: Sequence[str] | None = None) -> Task:
    dataset.card.level(level)  # unknown level -> RecordError listing the known ones
    vocab = dataset.label_vocab(level)
    if classes is None:
        chosen = list(vocab)
    else:
        chosen = list(dict.fromkeys(str(c) for c in classes))
        unknown = [c for c in chosen if c not in vocab]
        if unknown:
            raise RecordError(
                f"dataset '{dataset.card.name}', level '{level}': unknown classes {unknown}; known: {vocab}"
            )
    multilabel = any(len(r.labels[level]) > 1 for r in dataset.records)
    if multilabel:
        kind = "multilabel"
    elif len(chosen) == 2:
        kind = "binary"
    elif len(chosen) > 2:
        kind = "multiclass"
    else:
        raise ValueError(
            f"level '{level}' is single-label and the task keeps {len(chosen)} class(es) {chosen}; "
            "a single-label task needs at least 2 classes"
        )
    return Task(level=level, classes=chosen, kind=kind)


def task_records(task: Task, records: Sequence[Record]) -> list[Record]:
    """The records the task is defined on: single-label tasks drop records with no kept label."""
    if task.kind == "multilabel":
        return list(records)
    keep = set(task.classes)
    return [r for r in records if any(lab in keep for lab in r.labels[task.level])]


def task_targets(task: Task, records: Sequence[Record]) -> np.ndarray:
    """binary: (N,) 0/1 (1 = ``task.classes[1]``); multiclass: (N,) class index; multilabel: (N, C) 0/1."""
    index = {c: i for i, c in enumerate(task.classes)}
    if task.kind == "multilabel":
        y = np.zeros((len(records), len(task.classes)), dtype=np.int64)
        for n, rec in enumerate(records):
            for lab in rec.labels[task.level]:
                if lab in index:
                    y[n, index[lab]] = 1
        return y
    y = np.empty(len(records), dtype=np.int64)
    for n, rec in enumerate(records):
        kept = [index[lab] for lab in rec.labels[task.level] if lab in index]
        if len(kept) != 1:
            where = f"{rec.image}" + (f" (records line {rec.line})" if rec.line else "")
            raise RecordError(
                f"{where}: field 'labels.{task.level}': a {task.kind} task needs exactly one of {task.classes}, "
                f"got {list(rec.labels[task.level])}; filter records with task_records() first"
            )
        y[n] = kept[0]
    return y
