"""What the user hands the demo: the image file (picture or DICOM) and the question, checked before any model runs.

Every problem raises :class:`DemoInputError` with a message written for the page (it names the
file and says what was expected), which the UI shows instead of a traceback.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mgll.data.pixel_budget import ImageTooLargeError, open_image
from mgll.data.rgb import to_rgb
from mgll.demo import MAX_IMAGE_MB

__all__ = ["DICOM_SUFFIXES", "DemoInputError", "is_dicom", "load_image", "mcq_preset", "parse_question"]

DICOM_SUFFIXES = (".dcm", ".dicom")
DICOM_MAX_SIDE = 1024  # detector images (3000 px) are rendered down to this; the models see far less anyway
_OPTION_LINE = re.compile(r"^\s*([A-J])[.)]\s+(\S.*?)\s*$")


class DemoInputError(ValueError):
    """Input the user can fix (file, question); the message is written for the page, not a log."""


def is_dicom(path: str | os.PathLike) -> bool:
    """By suffix, or by the ``DICM`` magic after the 128-byte preamble (files exported without a suffix)."""
    p = Path(path)
    if p.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _too_large(name: str, e: ImageTooLargeError) -> DemoInputError:
    """Rebuilt from the parts: the budget message names the server-side path, the page shows the file name."""
    return DemoInputError(
        f"{name}: {e.size_text} is over this demo's {e.budget_text}, so it is not decoded "
        "(start it with `mgll demo --max-pixels N` or MGLL_MAX_PIXELS=N to change the limit)."
    )


def load_image(
    path: str | os.PathLike | None, max_mb: float = MAX_IMAGE_MB, max_pixels: int | None = None
) -> Image.Image:
    """The uploaded file as an RGB image; DICOM goes through the build-xray pixel pipeline.

    Raises :class:`DemoInputError` for a missing file, a file over ``max_mb``, a file that is not
    an image, a DICOM whose pixels cannot be rendered, and an image over the pixel budget
    (``max_pixels``, default ``MGLL_MAX_PIXELS`` or 40 MP). The budget is checked from the header
    before decoding: a 130 KB deflated DICOM or a small PNG can decode to gigabytes, which the
    file-size limit cannot see.
    """
    if path is None or str(path) == "":
        raise DemoInputError("No image: upload a fundus photograph, an X-ray (PNG/JPEG) or a DICOM file, or pick an example.")
    p = Path(path)
    if not p.is_file():
        raise DemoInputError(f"{p.name}: file not found on the server.")
    mb = p.stat().st_size / 2**20
    if mb > max_mb:
        raise DemoInputError(
            f"{p.name}: {mb:.1f} MB is over this demo's {max_mb:g} MB limit per image "
            "(start it with `mgll demo --max-image-mb N` to change the limit)."
        )
    if is_dicom(p):
        from mgll.data.dicom_header import check_dicom_budget
        from mgll.data.dicom_pixels import DicomPixelError, dicom_to_image

        try:
            check_dicom_budget(p, max_pixels)  # header only: a deflated file is not inflated to learn its size
            import pydicom

            with warnings.catch_warnings():  # a corrupt file's warnings would only repeat the error reported below
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(p)
            big = max(int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)) > DICOM_MAX_SIDE
            return dicom_to_image(ds, size=DICOM_MAX_SIDE if big else None, max_pixels=max_pixels).convert("RGB")
        except DicomPixelError as e:
            if isinstance(e.__cause__, ImageTooLargeError):
                raise _too_large(p.name, e.__cause__) from None
            raise DemoInputError(f"{p.name}: unreadable DICOM ({e}).") from None
        except Exception as e:  # pydicom raises many types on corrupt files; all mean "cannot render this"
            raise DemoInputError(f"{p.name}: unreadable DICOM ({type(e).__name__}: {e}).") from None
    try:
        with open_image(p, max_pixels) as im:
            im.load()
            return to_rgb(im)
    except ImageTooLargeError as e:
        raise _too_large(p.name, e) from None
    except UnidentifiedImageError:
        raise DemoInputError(
            f"{p.name}: not an image. Expected a PNG, JPEG, TIFF, BMP or WebP picture, or a DICOM file (.dcm)."
        ) from None
    except (OSError, ValueError) as e:
        raise DemoInputError(f"{p.name}: the image cannot be decoded ({e}).") from None


def mcq_preset() -> str:
    """The ten-disease question with all ten diseases as options, in ``mgll mcq``'s prompt format."""
    from mgll.data import FUNDUS_DISEASES
    from mgll.data.question_bank import QUESTION
    from mgll.mllm_eval.scoring import format_question

    return format_question(QUESTION, FUNDUS_DISEASES)


def parse_question(text: str | None) -> tuple[str, list[str] | None]:
    """``(question, options)``; options are the ``A. ...`` lines when they run A, B, C... (at least two)."""
    text = (text or "").strip()
    if not text:
        raise DemoInputError("Empty question: type a question, or pick the ten-disease multiple-choice preset.")
    found = [m.groups() for m in map(_OPTION_LINE.match, text.splitlines()) if m]
    letters = "".join(letter for letter, _ in found)
    if len(found) >= 2 and "ABCDEFGHIJ".startswith(letters):
        return text, [opt for _, opt in found]
    return text, None
