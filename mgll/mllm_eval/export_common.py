"""What the lmms-eval and VLMEvalKit exports share: the output guard, the image bytes, the metric names.

Images: a harness decodes whatever bytes it is given with PIL and ``convert("RGB")``. For an 8-bit
RGB or grayscale JPEG/PNG that is exactly what ``mgll mcq run`` sees (:func:`mgll.data.rgb.to_rgb`),
so the file travels as it is (no re-encoding, no size change). Anything else (16-bit grayscale,
palette, RGBA, TIFF, ...) would decode differently elsewhere (PIL clips 16-bit at 255), so it travels
as a lossless PNG of mgll's own RGB reading. Either way the other harness sees mgll's pixels.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

from mgll.data.pixel_budget import open_image
from mgll.data.rgb import to_rgb
from mgll.mllm_eval.report import SHORT_NAMES

__all__ = ["PASS_THROUGH", "check_out", "image_payload", "metric_key"]

# (PIL format, mode) pairs whose bytes decode to mgll's pixels under a plain convert("RGB")
PASS_THROUGH = {("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "L")}
_EXT = {"JPEG": ".jpg", "PNG": ".png"}


def check_out(out: str | os.PathLike, overwrite: bool) -> Path:
    """``out`` may be replaced only when it is absent, an empty folder, or ``overwrite`` is set."""
    out = Path(out)
    exists = out.is_file() or (out.is_dir() and any(out.iterdir()))
    if exists and not overwrite:
        raise FileExistsError(f"{out}: already exists; pass --overwrite to replace it")
    if out.is_dir() and out.suffix == ".tsv":
        raise ValueError(f"{out}: is a folder, expected a .tsv file path")
    return out


def image_payload(path: str | os.PathLike) -> tuple[bytes, str]:
    """``(bytes, extension)`` of the image a harness should decode for this question (see module doc)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: question image not found (pass --data if the dataset moved)")
    try:
        with open_image(path) as im:  # the pixel budget is checked before decoding
            key = (im.format, im.mode)
            if key in PASS_THROUGH:
                return path.read_bytes(), _EXT[im.format]
            rgb = to_rgb(im)
    except OSError as e:
        raise ValueError(f"{path}: unreadable image ({e.__class__.__name__}: {e})") from None
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue(), ".png"


def metric_key(disease: str) -> str:
    """A metric name for a disease: its Table 2 short name, lower-case, e.g. ``amd``, ``media_haze``."""
    return re.sub(r"[^a-z0-9]+", "_", SHORT_NAMES.get(disease, disease).lower()).strip("_")
