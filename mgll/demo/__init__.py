"""Gradio demo comparing a base MLLM with its MGLL-swapped twin (``mgll demo``; docs/demo.md).

Only constants here, so ``mgll --help`` does not import torch or gradio to register the command.
"""

import os
from pathlib import Path

__all__ = ["DEFAULT_ROOT", "MAX_IMAGE_MB", "default_paths"]

DEFAULT_ROOT = Path("runs/quickstart")  # `mgll quickstart`'s default output: the demo's default models
MAX_IMAGE_MB = 20.0  # default upload limit per image


def default_paths(root: str | os.PathLike = DEFAULT_ROOT) -> dict[str, Path]:
    """The quickstart's artifacts: base = the CLIP-tower tiny LLaVA, swapped = the MGLL-tower one (same budget)."""
    root = Path(root)
    return {"base": root / "mcq" / "trained-clip", "swapped": root / "mcq" / "trained-mgll", "encoder": root / "encoder-mgll"}
