"""Read one DICOM file for a builder: quietly, and with a truthful reason when it cannot be used.

pydicom is lenient on purpose: a file cut short parses without an exception. It keeps the elements it
could read and drops the rest, and when the cut falls inside an undefined-length element (encapsulated
pixel data, a sequence) it may keep none at all. A truncated radiograph then looked like a file without a
Modality and was rejected as ``wrong_modality <missing>``. So the parsed elements are checked against the
file's size here: a file that ends inside an element, or part-way through the next element's header, is
``truncated``. A cut inside Pixel Data is reported apart (``pixels_truncated``), because the header read
before it is whole and still tells what the file was.

pydicom's warnings are swallowed, not shown: they quote element values ("Invalid value for VR PN:
'DOE^JOHN'"), and a builder must not print header values to the terminal or its logs.
"""

from __future__ import annotations

import os
import re
import struct
import warnings
from dataclasses import dataclass

__all__ = ["DicomReadError", "NotDicomError", "ReadResult", "raw_elements", "read_dicom"]

PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # Float / Double Float / Pixel Data
UNDEFINED_LENGTH = 0xFFFFFFFF
_PREAMBLE_AND_PREFIX = 132  # 128-byte preamble + b"DICM"
_GROUP_LENGTH_ELEMENT = 12  # (0002,0000) UL, explicit VR little endian, as PS3.10 requires for the meta header
_BYTES = re.compile(r"b'(?:[^'\\]|\\.)*'|b\"(?:[^\"\\]|\\.)*\"")  # raw value bytes quoted in an error


class NotDicomError(ValueError):
    """The file is not DICOM at all (no 'DICM' prefix, no meta header): counted, never rejected."""


class DicomReadError(ValueError):
    """A DICOM file that cannot be used; ``reason`` is a stable code for rejected.jsonl."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class ReadResult:
    ds: object  # pydicom FileDataset
    pixels_truncated: str | None  # why the pixel data is incomplete; None when the file is whole


def read_dicom(path: str | os.PathLike, defer_size: str | int | None = "64 KB") -> ReadResult:
    """Read ``path``; raise NotDicomError or DicomReadError (``truncated`` / ``unreadable``) when unusable."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path, defer_size=defer_size)
        except InvalidDicomError as e:
            raise NotDicomError("no DICOM file meta header or DICM prefix") from e
        except (EOFError, struct.error):  # pydicom ran out of bytes inside an element header
            raise DicomReadError("truncated", "the file ends inside an element header") from None
        except Exception as e:  # noqa: BLE001 - a broken file of any kind is a rejection, not a crash
            raise DicomReadError("unreadable", f"{type(e).__name__}: {_BYTES.sub('<bytes>', str(e))}") from None
    eof_warned = any("end of file" in str(w.message).lower() for w in caught)
    if _deflated(ds):
        # offsets count bytes of the inflated stream, not of the file: only pydicom's own EOF warning tells
        cut = ("header", "the deflated data set ends early") if eof_warned else None
    else:
        cut = _truncation(ds, os.path.getsize(path), eof_warned)
    if cut is None:
        return ReadResult(ds, None)
    where, detail = cut
    if where == "pixels":
        return ReadResult(ds, detail)
    raise DicomReadError("truncated", detail)


def raw_elements(ds):
    """Top-level elements, unconverted where not read yet; a deferred value (large pixel data) stays unread.

    ``Dataset.elements()`` would read every deferred value, and a converted element no longer knows its length."""
    for tag in sorted(ds.keys()):
        yield ds.get_item(tag, keep_deferred=True)


def _deflated(ds) -> bool:
    from pydicom.uid import UID

    try:
        return UID(str(ds.file_meta.get("TransferSyntaxUID", ""))).is_deflated
    except ValueError:  # not a transfer syntax pydicom knows: read as it was, so not deflated
        return False


def _name(tag: int) -> str:
    from pydicom.datadict import keyword_for_tag
    from pydicom.tag import Tag

    t = Tag(tag)
    return f"{keyword_for_tag(t) or 'element'} {t}"


def _truncation(ds, size: int, eof_warned: bool) -> tuple[str, str] | None:
    """('header' | 'pixels', detail) when the file is cut short, else None."""
    meta_end = None
    if "FileMetaInformationGroupLength" in ds.file_meta:
        try:
            meta_end = _PREAMBLE_AND_PREFIX + _GROUP_LENGTH_ELEMENT + int(ds.file_meta.FileMetaInformationGroupLength)
        except (TypeError, ValueError):
            return "header", "the file ends inside its meta header"
    if meta_end is not None and size < meta_end:
        return "header", f"the file ends inside its meta header ({size} of {meta_end} bytes)"
    elems = list(raw_elements(ds))
    if not elems:
        if eof_warned:
            return "header", "the file ends inside an undefined-length element, so pydicom kept no element at all"
        if meta_end is None or size > meta_end:
            return "header", "no data element could be read after the meta header"
        return None
    last = max(elems, key=_value_tell)
    tell = _value_tell(last)
    length = getattr(last, "length", None)  # a RawDataElement knows its declared length
    if length is None or tell < 0:
        return ("header", "the file ends inside an element") if eof_warned else None
    if length == UNDEFINED_LENGTH:
        end = tell + len(last.value or b"") + 8  # value read up to its delimiter item, then the 8-byte delimiter
    else:
        end = tell + length
    where = "pixels" if last.tag in PIXEL_TAGS else "header"
    if end > size:
        return where, f"the file ends inside {_name(last.tag)}: {size - tell} of {end - tell} value bytes present"
    if eof_warned:
        return where, f"the file ends inside an undefined-length element after {_name(last.tag)}"
    if end < size and last.tag not in PIXEL_TAGS:
        return "header", f"the file ends inside the header of the element after {_name(last.tag)}"
    return None


def _value_tell(elem) -> int:
    tell = getattr(elem, "value_tell", None)  # RawDataElement
    if tell is None:
        tell = getattr(elem, "file_tell", None)  # DataElement converted while reading
    return -1 if tell is None else int(tell)
