"""Read a DICOM header without decoding (or inflating) the pixel data, then the file if it is within budget.

``pydicom.dcmread(stop_before_pixels=True)`` does not help for the Deflated Explicit VR Little Endian
transfer syntax: pydicom inflates the whole dataset into memory before parsing any of it, so a
130 KB file of 8000 x 8000 16-bit zeros costs 128 MB (290 MB peak) just to learn its size. Here the
deflated stream is inflated lazily, only as far as the parser reads, and the parser stops at the
Pixel Data tag, so the header of such a file costs its header's size.

Callers check the budget with :func:`check_dicom_budget` and then read the file as they always did
(``pydicom.dcmread`` or mgll.data.dicom_read), so the full read happens only for files within budget.
"""

from __future__ import annotations

import io
import os
import warnings
import zlib
from pathlib import Path

from .pixel_budget import ImageTooLargeError, check_dicom_header

__all__ = ["MAX_HEADER_BYTES", "DicomPixelError", "check_dicom_budget", "read_dicom_header"]

MAX_HEADER_BYTES = 64 * 2**20  # elements before Pixel Data (overlays, private blobs) beyond this mean a hostile file
_CHUNK = 64 * 1024
_PIXEL_TAGS = {0x7FE00010, 0x7FE00009, 0x7FE00008}  # Pixel Data, Double / Float Pixel Data


def _at_pixels(tag, vr, length) -> bool:
    return tag in _PIXEL_TAGS


def _past_meta(tag, vr, length) -> bool:
    return tag >> 16 != 2


class _Inflating(io.RawIOBase):
    """A seekable, read-only view of a raw deflate stream that inflates only what has been asked for."""

    def __init__(self, fh, limit: int = MAX_HEADER_BYTES):
        self._fh, self._limit = fh, limit
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buf = bytearray()
        self._pos = 0
        self._done = False

    def _fill(self, upto: int) -> None:
        while len(self._buf) < upto and not self._done:
            if len(self._buf) > self._limit:
                raise ValueError(f"more than {self._limit // 2**20} MB of header before the pixel data")
            data = self._z.unconsumed_tail or self._fh.read(_CHUNK)
            if not data:
                self._buf += self._z.flush()
                self._done = True
                break
            self._buf += self._z.decompress(data, _CHUNK)
            self._done = self._z.eof

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 2:
            self._fill(self._limit + 1)  # the end is only known once everything is inflated
            base = len(self._buf)
        else:
            base = self._pos if whence == 1 else 0
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, n: int = -1) -> bytes:
        end = self._limit + 1 if n is None or n < 0 else self._pos + n
        self._fill(end)
        out = bytes(self._buf[self._pos:end])
        self._pos += len(out)
        return out

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def read_dicom_header(path: str | os.PathLike):
    """Every element before Pixel Data, with ``file_meta``; nothing of the pixels is decoded or inflated.

    Raises ``pydicom.errors.InvalidDicomError`` for a file that is not DICOM, as ``dcmread`` does.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.filereader import read_dataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    path = Path(path)
    with open(path, "rb") as fh:
        if fh.read(132)[128:] == b"DICM":
            # group 2 is always explicit VR little endian; the parser rewinds to the first non-group-2 tag
            meta = read_dataset(fh, is_implicit_VR=False, is_little_endian=True, stop_when=_past_meta)
            if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
                ds = read_dataset(_Inflating(fh), is_implicit_VR=False, is_little_endian=True, stop_when=_at_pixels)
                ds.file_meta = FileMetaDataset(meta)
                ds.filename = str(path)
                return ds
    return pydicom.dcmread(path, stop_before_pixels=True)


class DicomPixelError(ValueError):
    """A DICOM file whose pixels cannot be (or may not be) turned into an image; ``reason`` is a stable code for rejected lists."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def check_dicom_budget(path: str | os.PathLike, max_pixels: int | None = None) -> int | None:
    """Header-only budget check of a DICOM file: call it before reading the file whole.

    Raises ``DicomPixelError`` with reason ``too_large`` (the message names the file, its size and
    the budget) so builders list the file as a rejection. Returns the pixel count, or None when the
    header cannot be read (not DICOM, cut short, no Rows/Columns): the full read that follows is the
    one that classifies such files, so this check never invents a second verdict for them.
    """
    try:
        with warnings.catch_warnings():  # pydicom's warnings quote header values; the full read reports problems
            warnings.simplefilter("ignore")
            header = read_dicom_header(path)
    except Exception:  # noqa: BLE001 - any unreadable header is the full reader's to report
        return None
    try:
        return check_dicom_header(header, path, max_pixels)
    except ImageTooLargeError as e:
        raise DicomPixelError("too_large", str(e)) from e
