"""Label sampling shared by both families: severity grades, and a primary label with its clinical companions.

The same three severity words drive the drawing and the text. Both families draw a label the same
way (normal with probability ``p_normal``, else one primary label by frequency, then each of its
companions with its own probability), from one generator, so the draw order is part of the bytes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

SEVERITIES: tuple[str, ...] = ("mild", "moderate", "severe")
SEVERITY_DEFAULT_P = (0.4, 0.35, 0.25)  # where no dataset gives a grade mix


def sample_severity(rng: np.random.Generator, p: tuple[float, float, float] = SEVERITY_DEFAULT_P) -> int:
    """Index into :data:`SEVERITIES` drawn with probabilities ``p``."""
    return int(rng.choice(3, p=list(p)))


def sample_with_companions(
    rng: np.random.Generator,
    p_normal: float,
    primary: Mapping[str, float],
    companions: Mapping[str, tuple[tuple[str, float], ...]],
) -> list[str]:
    """[] (normal) or [primary, companions...]: the primary by its relative frequency, each companion with its probability."""
    if rng.random() < p_normal:
        return []
    names = list(primary)
    p = np.array([primary[k] for k in names])
    chosen = [names[rng.choice(len(names), p=p / p.sum())]]
    for comp, prob in companions[chosen[0]]:
        if rng.random() < prob and comp not in chosen:
            chosen.append(comp)
    return chosen
