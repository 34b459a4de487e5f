"""Severity grades shared by both families: the same three words drive the drawing and the text."""

from __future__ import annotations

import numpy as np

SEVERITIES: tuple[str, ...] = ("mild", "moderate", "severe")
SEVERITY_DEFAULT_P = (0.4, 0.35, 0.25)  # where no dataset gives a grade mix


def sample_severity(rng: np.random.Generator, p: tuple[float, float, float] = SEVERITY_DEFAULT_P) -> int:
    """Index into :data:`SEVERITIES` drawn with probabilities ``p``."""
    return int(rng.choice(3, p=list(p)))
