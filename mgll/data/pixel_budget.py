"""One pixel budget for every place that decodes an image: builders, training, evaluation, the demo.

Why: a compressed file says nothing about its decoded size. A 130 KB deflated DICOM of 8000 x 8000
16-bit pixels cost 2.4 GB in build-xray; a 12000 x 12000 PNG doubled training memory; PNGs over
PIL's own bomb limit crashed with a ``DecompressionBombError`` that named no file. Every image is
therefore sized from its header first (PIL's ``Image.open`` is lazy; DICOM Rows x Columns x frames)
and refused with an :class:`ImageTooLargeError` naming the file *before* anything is decoded.

The budget counts spatial pixels of everything a decoder would produce (all frames of a
multi-frame DICOM), not channels, so an RGB JPEG and a grayscale PNG of the same size cost the
same. Default 40 MP: a 4000 x 5000 mammogram (20 MP) and 3000 x 3000 CR (9 MP) fit, an
8000 x 8000 image (64 MP) does not. Override with ``MGLL_MAX_PIXELS`` (``40000000``, ``4e7``,
``40M``) or the ``max_pixels`` argument / ``--max-pixels`` option, which win over the variable.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from PIL import Image

from .rgb import to_rgb

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ENV_VAR",
    "ImageTooLargeError",
    "check_dicom_header",
    "check_size",
    "load_rgb",
    "open_image",
    "resolve_max_pixels",
]

DEFAULT_MAX_PIXELS = 40_000_000
ENV_VAR = "MGLL_MAX_PIXELS"
_HINT = f"{ENV_VAR} or --max-pixels"
_PIL_BOMB = re.compile(r"\((\d+) pixels\)")


class ImageTooLargeError(ValueError):
    """An image over the pixel budget; ``reason`` matches the builders' rejected-list code."""

    reason = "too_large"

    def __init__(self, path, pixels: int, budget: int, dims: str | None = None, nbytes: int | None = None):
        self.path, self.pixels, self.budget = str(path), int(pixels), int(budget)
        size = f"{dims} = {_mp(pixels)}" if dims else _mp(pixels)
        self.size_text = size + (f" ({_bytes(nbytes)} decoded)" if nbytes else "")
        self.budget_text = _budget_text(budget)
        super().__init__(f"{path}: {self.size_text} is over the {self.budget_text} ({_HINT})")


def _bytes(n: int) -> str:
    return f"{n / 2**20:,.0f} MB" if n >= 2**20 else f"{n / 1024:,.0f} KB"


def _mp(n: int) -> str:
    return f"{n / 1e6:.1f} MP" if n >= 100_000 else f"{n:,} pixels"


def _budget_text(n: int) -> str:
    return f"{n / 1e6:g} MP pixel budget" if n >= 100_000 else f"{n:,}-pixel budget"


def _parse(value, source: str) -> int:
    text = str(value).strip().upper().removesuffix("P")
    scale = 1_000_000 if text.endswith("M") else 1
    try:
        n = int(float(text.removesuffix("M")) * scale)
    except ValueError:
        raise ValueError(f"{source}: {value!r} is not a pixel count (e.g. 40000000, 4e7 or 40M)") from None
    if n <= 0:
        raise ValueError(f"{source}: the pixel budget must be positive, got {value!r}")
    return n


def resolve_max_pixels(max_pixels: int | str | None = None) -> int:
    """The budget in force: the argument, else ``MGLL_MAX_PIXELS``, else :data:`DEFAULT_MAX_PIXELS`."""
    if max_pixels is not None:
        return _parse(max_pixels, "max_pixels (--max-pixels)")
    env = os.environ.get(ENV_VAR, "").strip()
    return _parse(env, ENV_VAR) if env else DEFAULT_MAX_PIXELS


def check_size(path, width: int, height: int, max_pixels: int | None = None, *, frames: int = 1,
               nbytes: int | None = None) -> int:
    """Raise :class:`ImageTooLargeError` when ``width x height x frames`` is over budget; return the count."""
    budget = resolve_max_pixels(max_pixels)
    pixels = int(width) * int(height) * max(1, int(frames))
    if pixels > budget:
        dims = f"{width}x{height}" + (f" x {frames} frames" if frames > 1 else "")
        raise ImageTooLargeError(path, pixels, budget, dims, nbytes)
    return pixels


def _int_tag(ds, name: str, default: int) -> int:
    try:
        return int(ds.get(name) or default)
    except (TypeError, ValueError):
        return default


def check_dicom_header(ds, path=None, max_pixels: int | None = None) -> int | None:
    """Budget check from Rows x Columns x NumberOfFrames, before any pixel is decoded.

    The error also states the decoded bytes (x SamplesPerPixel x BitsAllocated/8) because that is
    what the decoder allocates first. Returns the pixel count, or None when Rows/Columns are absent
    (the pixel pipeline then reports the file for what it is, e.g. no pixel data).
    """
    rows, cols = _int_tag(ds, "Rows", 0), _int_tag(ds, "Columns", 0)
    if not rows or not cols:
        return None
    frames = _int_tag(ds, "NumberOfFrames", 1)
    samples = _int_tag(ds, "SamplesPerPixel", 1)
    bits = _int_tag(ds, "BitsAllocated", 16)
    nbytes = rows * cols * max(1, frames) * max(1, samples) * max(1, (bits + 7) // 8)
    name = path if path is not None else getattr(ds, "filename", None) or "<dicom>"
    return check_size(name, cols, rows, max_pixels, frames=frames, nbytes=nbytes)


def _lift_pil_limit(budget: int) -> None:
    """PIL refuses images over 2 x ``MAX_IMAGE_PIXELS`` inside ``Image.open``, before our check can name
    the file. Raising its limit to the budget (never lowering it) means an image we accept is never
    refused by PIL; one over both limits still gets a named error from :func:`open_image`."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < budget:
        Image.MAX_IMAGE_PIXELS = budget


def open_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """``Image.open`` (lazy: only the header is read) plus the budget check; use it as a context manager.

    Raises :class:`ImageTooLargeError` naming the file, also where PIL's own bomb check fires first.
    Other failures (missing file, not an image) propagate as PIL raises them.
    """
    budget = resolve_max_pixels(max_pixels)
    _lift_pil_limit(budget)
    try:
        im = Image.open(path)
    except Image.DecompressionBombError as e:
        m = _PIL_BOMB.search(str(e))
        raise ImageTooLargeError(path, int(m.group(1)) if m else budget + 1, budget) from None
    try:
        w, h = im.size
        check_size(path, w, h, budget)  # PIL decodes one frame of a multi-frame file, so frames do not count
    except BaseException:
        im.close()
        raise
    return im


def load_rgb(path: str | os.PathLike | Path, max_pixels: int | None = None) -> Image.Image:
    """The image as RGB, its size checked against the budget before it is decoded."""
    with open_image(path, max_pixels) as im:
        return to_rgb(im)
