"""Is one image file fit to train on? A cheap header-level check and a full-decode check, per file.

Why both: a truncated or zero-byte image used to abort training only when the sampler reached it,
hours in. ``mgll train`` calls :func:`preflight_images` before step 1 with the header check, which
opens each file, checks PIL can identify it and that its size is within the pixel budget, and finds
truncation without decoding pixels: a PNG is ``verify()``-ed (inflates and CRC-checks the chunks,
no unfiltering), a JPEG must end with its end-of-image marker. Measured on a loaded 2-core machine
(benchmarks/results/image_budget.md): 0.24 ms per 64 px image (0.54 ms decoded), 8 ms for a
2000 x 2000 photo PNG (129 ms decoded). ``mgll check-data`` decodes every image (``decode=True``), which also finds
corrupt pixel data (16-bit grayscale is rescaled to 8 bits by ``mgll.data.rgb``, as training reads it).
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .pixel_budget import ImageTooLargeError, open_image, resolve_max_pixels
from .records import MultiGranularDataset, load_dataset
from .rgb import to_rgb

__all__ = ["REASONS", "inspect_image", "preflight_images"]

REASONS = {
    "missing": "the image file does not exist",
    "empty": "the file has zero bytes",
    "unreadable": "not an image PIL can identify",
    "truncated": "the file ends before the image does",
    "corrupt": "the pixel data cannot be decoded",
    "too_large": "over the pixel budget (MGLL_MAX_PIXELS or --max-pixels)",
    "not_rgb": "convert('RGB') fails",
}
_JPEG_TAIL = 64 * 1024  # JPEG trailers (MPO, camera data) end with an EOI too; a cut scan never contains FF D9


def _truncation(path: Path, fmt: str | None, im: Image.Image) -> str | None:
    if fmt == "PNG":
        try:
            im.verify()
        except Exception as e:  # noqa: BLE001 - PIL raises OSError/SyntaxError/struct.error for a bad stream
            return f"PNG stream check failed ({type(e).__name__}: {e})"
        return None
    if fmt in ("JPEG", "MPO"):
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - _JPEG_TAIL))
            if b"\xff\xd9" not in f.read():
                return "no JPEG end-of-image marker (FF D9) at the end of the file"
    return None


def _decode(im: Image.Image) -> list[tuple[str, str]]:
    try:
        im.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure means training would crash on this file
        msg = f"{type(e).__name__}: {e}"
        return [("truncated" if "truncated" in msg.lower() else "corrupt", msg)]
    try:
        to_rgb(im)  # what training does (16-bit grayscale is rescaled there, not clipped)
    except Exception as e:  # noqa: BLE001
        return [("not_rgb", f"mode {im.mode}: {type(e).__name__}: {e}")]
    return []


def inspect_image(path: str | os.PathLike, max_pixels: int | None = None, decode: bool = False,
                  digest: bool = False) -> dict:
    """``{"problems": [(reason, detail), ...], "sha256", "width", "height", "mode"}`` for one file; never raises.

    Header level by default (see the module docstring); ``decode`` loads the pixels and converts them
    as training does; ``digest`` hashes the file's bytes so the caller can find duplicates. Every
    ``detail`` starts with the file's path.
    """
    path = Path(path)
    out: dict = {"problems": [], "sha256": None, "width": None, "height": None, "mode": None}
    try:
        size = path.stat().st_size
    except OSError:
        out["problems"].append(("missing", f"{path}: no such file"))
        return out
    if size == 0:
        out["problems"].append(("empty", f"{path}: zero bytes"))
        return out
    if digest:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out["sha256"] = h.hexdigest()
    try:
        with open_image(path, max_pixels) as im:
            out.update(width=im.size[0], height=im.size[1], mode=im.mode)
            if decode:
                out["problems"] += [(reason, f"{path}: {detail}") for reason, detail in _decode(im)]
            else:
                cut = _truncation(path, im.format, im)
                if cut:
                    out["problems"].append(("truncated", f"{path}: {cut}"))
    except ImageTooLargeError as e:
        out["problems"].append(("too_large", str(e)))
    except UnidentifiedImageError:
        out["problems"].append(("unreadable", f"{path}: PIL cannot identify it as an image ({size} bytes)"))
    except Exception as e:  # noqa: BLE001 - whatever PIL raises, the answer is "this file is not usable"
        out["problems"].append(("unreadable", f"{path}: {type(e).__name__}: {e}"))
    return out


def _inspect_task(task: tuple) -> dict:
    return inspect_image(*task)


def inspect_many(paths: Sequence[Path], max_pixels: int, decode: bool, digest: bool, workers: int = 1,
                 bar=None) -> list[dict]:
    """:func:`inspect_image` over ``paths`` in order, in ``workers`` processes; ``bar`` (tqdm) is advanced per file."""
    tasks = [(p, max_pixels, decode, digest) for p in paths]
    workers = max(1, int(workers or 1))
    if workers == 1 or len(tasks) < 2:
        results = []
        for t in tasks:
            results.append(_inspect_task(t))
            if bar is not None:
                bar.update()
        return results
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    results = []
    with ctx.Pool(min(workers, len(tasks))) as pool:
        for r in pool.imap(_inspect_task, tasks, chunksize=max(1, min(64, len(tasks) // (4 * workers)))):
            results.append(r)
            if bar is not None:
                bar.update()
    return results


def preflight_images(
    dataset: MultiGranularDataset | str | os.PathLike,
    split: str | None = None,
    max_pixels: int | None = None,
    decode: bool = False,
    workers: int = 1,
) -> list[dict]:
    """Problems ``{"image", "reason", "detail"}`` of the split's images (all records when ``split`` is None).

    Header-only by default, for ``mgll train`` to call before step 1: a zero-byte, unidentifiable,
    truncated (PNG stream / JPEG end marker) or over-budget file is found up front (0.24 ms per 64 px
    image, 8 ms per 2000 x 2000 PNG) instead of when the sampler reaches it. ``decode=True`` decodes
    every image as training would. ``reason`` is a key of :data:`REASONS`; ``detail`` names the file.
    """
    ds = dataset if isinstance(dataset, MultiGranularDataset) else load_dataset(dataset, check_images=False)
    records = ds.records if split is None else ds.split(split)
    budget = resolve_max_pixels(max_pixels)
    results = inspect_many([ds.image_path(r) for r in records], budget, decode, False, workers)
    return [
        {"image": rec.image, "reason": reason, "detail": detail}
        for rec, res in zip(records, results)
        for reason, detail in res["problems"]
    ]
