"""DICOM pixels to a display image, the way a radiology viewer would show them.

Order follows the DICOM grayscale pipeline (PS3.3 C.11): stored values (BitsStored /
PixelRepresentation honoured) -> Modality LUT (RescaleSlope/Intercept or LUT) -> VOI LUT sequence,
else the first WindowCenter/Width, else a robust percentile window -> MONOCHROME1 inverted -> resized
so the longest side is ``size`` -> quantised to 8 or 16 bits. Shared by the X-ray builder and the demo.

Before anything is decoded, Rows x Columns x NumberOfFrames is checked against the pixel budget
(mgll.data.pixel_budget): an over-budget file raises :class:`DicomPixelError` with reason
``too_large``, because the float pipeline below costs ~35 bytes per pixel (2.4 GB for 8000 x 8000).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from .dicom_header import DicomPixelError, check_dicom_budget  # noqa: F401  (DicomPixelError re-exported)
from .pixel_budget import ImageTooLargeError, check_dicom_header

__all__ = [
    "DicomPixelError",
    "GRAY_PHOTOMETRICS",
    "check_budget",
    "dicom_to_array",
    "dicom_to_image",
    "quantise",
    "resize_longest",
]

GRAY_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")
PERCENTILES = (0.5, 99.5)  # robust window when the file carries none: ignores collimator edges and burnt-in text


def _read(ds_or_path, max_pixels: int | None = None):
    """A path is read header-first (mgll.data.dicom_header), so an over-budget file is never inflated."""
    if isinstance(ds_or_path, (str, os.PathLike)):
        import pydicom

        check_dicom_budget(Path(ds_or_path), max_pixels)
        return pydicom.dcmread(Path(ds_or_path))
    return ds_or_path


def check_budget(ds, max_pixels: int | None = None) -> None:
    """Raise ``DicomPixelError('too_large')`` when the dataset's header puts it over the pixel budget."""
    try:
        check_dicom_header(ds, None, max_pixels)
    except ImageTooLargeError as e:
        raise DicomPixelError("too_large", str(e)) from e


def _first(value) -> float:
    """Window tags may be multi-valued (alternative views); the first is the one the modality recommends."""
    if value is None:
        raise ValueError("missing")
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _stored_values(ds, max_pixels: int | None = None) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DicomPixelError("no_pixel_data", "the file has no Pixel Data element (7FE0,0010)")
    check_budget(ds, max_pixels)
    try:
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - decoders raise many types; all mean the same for us
        raise DicomPixelError("pixel_decode_failed", f"cannot decode pixel data: {type(e).__name__}: {e}") from None
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]  # a multi-frame radiograph is rare; the first frame is the acquisition
    return arr


def _honour_bits(arr: np.ndarray, ds) -> np.ndarray:
    """Mask the bits above BitsStored (overlays, garbage) and sign-extend signed data."""
    if not np.issubdtype(arr.dtype, np.integer):
        return arr
    stored = int(ds.get("BitsStored") or 0)
    if not stored or stored >= arr.dtype.itemsize * 8:
        return arr
    a = arr.astype(np.int32) & ((1 << stored) - 1)
    if int(ds.get("PixelRepresentation") or 0) == 1:
        sign = 1 << (stored - 1)
        a = (a ^ sign) - sign
    return a


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    x = x.astype(np.float64)
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    # PS3.3 C.11.2.1.2.1: the -0.5 / (w-1) terms make integer inputs land on exact output steps.
    return np.clip((x - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _percentile_window(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    sample = x[:: max(1, x.shape[0] // 512), :: max(1, x.shape[1] // 512)]
    lo, hi = np.percentile(sample, PERCENTILES)
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float32)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def _voi(x: np.ndarray, ds) -> np.ndarray:
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        from pydicom.pixels import apply_voi

        item = ds.VOILUTSequence[0]
        lut = np.asarray(item.LUTData, dtype=np.float64)
        idx = x if np.issubdtype(x.dtype, np.integer) else np.round(x).astype(np.int64)  # a LUT is indexed
        out = apply_voi(idx, ds, index=0).astype(np.float64)
        lo, hi = float(lut.min()), float(lut.max())
        return np.zeros_like(out) if hi <= lo else (out - lo) / (hi - lo)
    try:
        center = _first(ds.get("WindowCenter"))
        width = _first(ds.get("WindowWidth"))
    except (ValueError, TypeError):
        return _percentile_window(x)
    function = str(ds.get("VOILUTFunction") or "LINEAR")
    if not np.isfinite(center) or not np.isfinite(width) or width < (1.0 if function.upper() == "LINEAR" else 1e-9):
        return _percentile_window(x)
    return _window(x, center, width, function)


def dicom_to_array(ds_or_path, max_pixels: int | None = None) -> np.ndarray:
    """Grayscale display values in [0, 1] (float32), full resolution, bright = dense (bone).

    ``max_pixels`` overrides the pixel budget (default: ``MGLL_MAX_PIXELS``, else 40 MP).
    """
    ds = _read(ds_or_path, max_pixels)
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    if photometric not in GRAY_PHOTOMETRICS:
        raise DicomPixelError(
            "unsupported_photometric",
            f"PhotometricInterpretation '{photometric or '<missing>'}' is not grayscale (expected one of {GRAY_PHOTOMETRICS})",
        )
    arr = _stored_values(ds, max_pixels)
    if arr.ndim != 2:
        raise DicomPixelError("pixel_decode_failed", f"expected a 2-D grayscale frame, got shape {arr.shape}")
    arr = _honour_bits(arr, ds)
    from pydicom.pixels import apply_modality_lut

    y = _voi(np.asarray(apply_modality_lut(arr, ds)), ds)
    if photometric == "MONOCHROME1":
        y = 1.0 - y  # MONOCHROME1 stores air bright; viewers invert so bone is bright
    return np.asarray(y, dtype=np.float32)


def resize_longest(img: np.ndarray, size: int | None) -> np.ndarray:
    """Resize a float image (H, W) or (H, W, C) so its longest side is ``size``; aspect ratio kept."""
    if not size:
        return img
    h, w = img.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) == (h, w):
        return img
    channels = [img] if img.ndim == 2 else [img[..., c] for c in range(img.shape[2])]
    out = []
    for ch in channels:
        pil = Image.fromarray(np.ascontiguousarray(ch, dtype=np.float32))  # float32 -> "F"
        out.append(np.asarray(pil.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0)))
    res = out[0] if img.ndim == 2 else np.stack(out, axis=-1)
    return np.clip(res, 0.0, 1.0)


def quantise(img: np.ndarray, bits: int = 8) -> Image.Image:
    """[0, 1] floats -> an 8-bit ('L'/'RGB') or 16-bit ('I;16') PIL image."""
    if bits == 8:
        arr = np.round(np.clip(img, 0, 1) * 255.0).astype(np.uint8)
        return Image.fromarray(arr)  # uint8 (H, W) -> "L", (H, W, 3) -> "RGB"
    if bits == 16:
        if img.ndim != 2:
            raise ValueError("16-bit output is grayscale only")
        arr = np.round(np.clip(img, 0, 1) * 65535.0).astype(np.uint16)
        return Image.fromarray(arr)  # uint16 (H, W) -> "I;16"
    raise ValueError(f"bits must be 8 or 16, got {bits}")


def _color_array(ds, max_pixels: int | None = None) -> np.ndarray:
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    arr = _stored_values(ds, max_pixels)
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
    elif photometric not in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"):
        raise DicomPixelError("unsupported_photometric", f"PhotometricInterpretation '{photometric}' is not supported")
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise DicomPixelError("pixel_decode_failed", f"expected an (H, W, 3) colour frame, got shape {arr.shape}")
    top = float(np.iinfo(arr.dtype).max) if np.issubdtype(arr.dtype, np.integer) else max(float(arr.max()), 1.0)
    return (arr.astype(np.float32) / top).clip(0, 1)


def dicom_to_image(
    ds_or_path, size: int | None = 512, bits: int = 8, allow_color: bool = True, max_pixels: int | None = None
) -> Image.Image:
    """Render a DICOM dataset or file as a PIL image (grayscale pipeline above; colour passed through)."""
    ds = _read(ds_or_path, max_pixels)
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    if allow_color and photometric and photometric not in GRAY_PHOTOMETRICS:
        img = _color_array(ds, max_pixels)
        bits = 8
    else:
        img = dicom_to_array(ds, max_pixels)
    return quantise(resize_longest(img, size), bits)
