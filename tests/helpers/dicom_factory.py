"""Write small but standard-conforming DICOM files for the builder tests and benchmarks."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def make_dataset(
    arr: np.ndarray,
    *,
    modality: str = "DX",
    photometric: str = "MONOCHROME2",
    bits_stored: int = 16,
    signed: bool = False,
    slope: float | None = None,
    intercept: float | None = None,
    center=None,
    width=None,
    study: str | None = "Chest",
    series: str | None = "PA",
    patient_id: str = "PID-4711-SECRET",
    patient_name: str = "Doe^Jane",
    pixels: bool = True,
    extra: dict | None = None,
) -> Dataset:
    """A DX dataset around ``arr``; ``extra`` sets more attributes by keyword (a list of Datasets for a sequence)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = DX_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19610407"
    ds.StudyDate = "20230916"
    ds.Modality = modality
    if study is not None:
        ds.StudyDescription = study
    if series is not None:
        ds.SeriesDescription = series
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept or 0
    if center is not None:
        ds.WindowCenter = center
        ds.WindowWidth = width
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    if pixels:
        ds.PixelData = arr.astype(np.int16 if signed else np.uint16).tobytes()
    return ds


def write_dicom(path: Path, arr: np.ndarray, j2k: bool = False, **kw) -> Dataset:
    ds = make_dataset(arr, **kw)
    if j2k:
        ds.compress(JPEG2000Lossless, arr.astype(np.int16 if kw.get("signed") else np.uint16))
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def value_offset(path: Path, keyword: str) -> int:
    """Byte offset of a top-level element's value in the file at ``path``, to cut a file short inside it."""
    tag = pydicom.datadict.tag_for_keyword(keyword)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # test files may hold invalid values on purpose
        ds = pydicom.dcmread(path, defer_size=0)
        elem = next(e for e in ds.elements() if e.tag == tag)
    return int(getattr(elem, "value_tell", None) or elem.file_tell)  # raw elements, or ones read already
