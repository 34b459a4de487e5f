"""Turn a batch's per-level label sets into distinct texts and 0/1 targets.

Columns are distinct strings, not samples: two images that share "a fundus photograph
showing drusen" share one column, so the text is never a negative for either of them
(the public reference code builds one column per sample and so contrasts identical texts).
Every text string is encoded once per step even when several levels or captions produce it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = ["BatchTexts", "build_batch_texts", "caption_for"]

LabelSets = Sequence[Mapping[str, Sequence[str]]]


@dataclass
class BatchTexts:
    """Distinct texts of a batch and how images map onto them.

    ``texts``: every distinct string to encode, in first-appearance order.
    ``level_columns[l]``: indices into ``texts`` of level l's K_l columns.
    ``level_targets[l]``: (B, K_l) float 0/1 incidence, y_ik = 1 iff image i carries column k.
    ``caption_index``: per image, the index into ``texts`` of its joined caption (CLIP/SigLIP).
    """

    texts: list[str]
    level_columns: list[list[int]]
    level_targets: list[torch.Tensor]
    caption_index: list[int]


def caption_for(labels: Mapping[str, Sequence[str]], levels) -> str:
    """One caption joining all labels of all levels, coarse to fine, each in its level's template."""
    return ". ".join(level.text(", ".join(labels[level.name])) for level in levels)


def build_batch_texts(label_sets: LabelSets, levels, captions: bool = False, per_level: bool = True) -> BatchTexts:
    """``levels``: the card's Level objects (name + template), coarse to fine."""
    index: dict[str, int] = {}
    texts: list[str] = []

    def intern(text: str) -> int:
        if text not in index:
            index[text] = len(texts)
            texts.append(text)
        return index[text]

    level_columns: list[list[int]] = []
    level_targets: list[torch.Tensor] = []
    if per_level:
        for level in levels:
            columns: dict[int, int] = {}  # text index -> column
            rows: list[list[int]] = []
            for i, labels in enumerate(label_sets):
                if level.name not in labels or not labels[level.name]:
                    raise ValueError(f"image {i} of the batch has no labels at level {level.name!r}")
                row = []
                for label in labels[level.name]:
                    t = intern(level.text(label))
                    row.append(columns.setdefault(t, len(columns)))
                rows.append(row)
            y = torch.zeros(len(label_sets), len(columns))
            for i, row in enumerate(rows):
                y[i, row] = 1.0
            level_columns.append(list(columns))
            level_targets.append(y)
    caption_index = [intern(caption_for(labels, levels)) for labels in label_sets] if captions else []
    return BatchTexts(texts, level_columns, level_targets, caption_index)
