"""Every image mgll reads becomes 8-bit RGB here, so training, evaluation, checks and the demo see the same pixels.

PIL's ``convert("RGB")`` clips a 16-bit grayscale image ("I;16", as ``build-xray --bits 16`` writes)
at 255: a radiograph stored at 0-65535 trains as an almost white frame, silently. High-bit-depth
grayscale ("I;16*", "I", "F") is therefore stretched from its own minimum to its maximum. A fixed
65535 -> 255 scale was the other choice; it turns 12-bit data stored in 16-bit PNGs (0-4095, common
outside mgll) nearly black, while for ``build-xray`` output, whose window already spans 0-65535, the
stretch gives the picture ``--bits 8`` would have written, within one grey level.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["HIGH_DEPTH_MODES", "to_rgb"]

HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB of ``im``; high-bit-depth grayscale is min-max stretched, never clipped."""
    if im.mode not in HIGH_DEPTH_MODES:
        return im.convert("RGB")
    arr = np.asarray(im, dtype=np.float64)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.round(arr * 255).astype(np.uint8)).convert("RGB")
