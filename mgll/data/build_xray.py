"""MGLL-Xray from a folder of DICOM files: three label levels read from the headers, nothing annotated by hand.

Levels (coarse -> fine): ``modality`` (code and meaning, "DX (digital radiography)"), ``study``
(StudyDescription) and ``series`` (SeriesDescription), lower-cased with whitespace collapsed. A missing or
empty description follows ``missing``: ``"unknown"`` (default) labels it "unknown" so the image still
teaches the coarser levels; ``"skip"`` rejects the file with reason ``missing_tag``.

De-identification: the kept descriptions are scrubbed of the values of every attribute the DICOM PS3.15
Basic Application Level Confidentiality Profile lists (``deid.py`` says which and how), then of anything
shaped like a UID or a date. No header value is written anywhere under OUT, not even in file names
(images are named by a keyed hash of their source path; rejected and skipped files are listed by that
hash in rejected.jsonl and skipped.jsonl; ``--show-rejected`` prints their paths to the terminal only),
and none is printed: pydicom's warnings, which quote values, are swallowed. ``patient`` is an HMAC of
PatientID under a secret salt kept *outside* OUT (``--salt-file``, default ``~/.config/mgll/deid_salt``),
because an unkeyed or co-located salt would let anyone hash a list of candidate IDs and re-identify
patients. Builds sharing a salt give one patient the same hash, which keeps merged splits leak-free.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

from mgll.io import atomic_path, atomic_write_bytes, atomic_write_text

from .build_runner import STATE_DIR, Journal, check_build_config, clean_partials, finalize_build, run_tasks
from .deid import Scrubber, profile_edition, profile_tags
from .dicom_header import check_dicom_budget
from .dicom_pixels import DicomPixelError, dicom_to_array, quantise, resize_longest
from .dicom_read import DicomReadError, NotDicomError, read_dicom
from .pixel_budget import resolve_max_pixels
from .records import DatasetCard, Level

__all__ = [
    "MODALITY_MEANINGS",
    "build_xray",
    "load_salt",
    "normalise_description",
    "patient_hash",
    "process_dicom",
    "source_key",
    "xray_card",
]

MODALITY_MEANINGS = {
    "CR": "computed radiography",
    "DX": "digital radiography",
    "RF": "radio fluoroscopy",
    "XA": "x-ray angiography",
    "MG": "mammography",
    "IO": "intra-oral radiography",
    "PX": "panoramic x-ray",
    "CT": "computed tomography",
    "MR": "magnetic resonance",
    "US": "ultrasound",
    "NM": "nuclear medicine",
    "PT": "positron emission tomography",
    "OT": "other",
}
DEFAULT_SALT_FILE = Path("~/.config/mgll/deid_salt")
UNKNOWN = "unknown"
_UID = re.compile(r"\b\d+(?:\.\d+){3,}\b")
_DATE = re.compile(r"\b(?:\d{8}|\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{4})\b")


def xray_card(name: str = "mgll-xray", missing: str = "unknown") -> DatasetCard:
    return DatasetCard(
        name=name,
        levels=(
            Level("modality", "a {} radiograph"),
            Level("study", "an x-ray study: {}"),
            Level("series", "an x-ray series: {}"),
        ),
        description=(
            "Radiographs built from DICOM headers: modality -> StudyDescription -> SeriesDescription "
            f"(lower-cased, whitespace collapsed; missing descriptions: {missing}). Patients are keyed hashes."
        ),
    )


# --------------------------------------------------------------------------- de-identification


def load_salt(path: str | os.PathLike | None = None) -> bytes:
    """Read the secret salt, creating a random one (mode 0600) on first use."""
    path = Path(path or os.environ.get("MGLL_SALT_FILE") or DEFAULT_SALT_FILE).expanduser()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, secrets.token_hex(32).encode() + b"\n")
        os.chmod(path, 0o600)
    salt = path.read_bytes().strip()
    if len(salt) < 16:
        raise ValueError(f"{path}: salt is too short ({len(salt)} bytes); use at least 16 random bytes")
    return salt


def _keyed(salt: bytes, kind: str, value: str, n: int) -> str:
    return hmac.new(salt, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:n]


def source_key(rel_path: str, salt: bytes) -> str:
    return _keyed(salt, "source", rel_path, 24)


def patient_hash(patient_id: str, salt: bytes) -> str:
    return "p-" + _keyed(salt, "patient", patient_id, 20)


def salt_fingerprint(salt: bytes) -> str:
    """Lets a resumed build detect a different salt without storing anything that helps invert hashes."""
    return hashlib.sha256(b"mgll-salt-fingerprint:" + salt).hexdigest()[:16]


def normalise_description(text, scrub: Callable[[str], str] | None = None) -> str:
    """Lower-case, collapse whitespace, and strip the file's identifying values (``scrub``), dates and UIDs."""
    s = str(text or "").replace("^", " ")
    if scrub is not None:
        s = scrub(s)
    s = _DATE.sub(" ", _UID.sub(" ", s))
    return re.sub(r"\s+", " ", s).strip(" \t-_/,.;:").lower()


def _safe_detail(msg: str, path: str, scrub: Callable[[str], str] | None = None) -> str:
    """An error message fit for rejected.jsonl: no path, no header value, no UID or date, one short line."""
    msg = msg.replace(path, "<file>").replace(os.path.basename(path), "<file>")
    if scrub is not None:
        msg = scrub(msg)
    return re.sub(r"\s+", " ", _DATE.sub("<date>", _UID.sub("<uid>", msg))).strip()[:200]


# --------------------------------------------------------------------------- per-file work


def process_dicom(task: dict) -> dict:
    """One source file -> one journal entry. Top level so multiprocessing can pickle it; never raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom and the decoders quote header values in their warnings
        return _process(task)


def _process(task: dict) -> dict:
    path, key, out = task["path"], task["key"], Path(task["out"])
    rejected = {"key": key, "status": "rejected"}
    scrub = None
    try:  # from the header alone (a deflated file is inflated only up to its pixels): a 130 KB file can decode to GBs
        check_dicom_budget(path, task["max_pixels"])
    except DicomPixelError as e:
        return rejected | {"reason": e.reason, "detail": _safe_detail(str(e), path)}
    try:
        read = read_dicom(path)
    except NotDicomError:
        return {"key": key, "status": "skipped", "reason": "not_dicom"}
    except DicomReadError as e:
        return rejected | {"reason": e.reason, "detail": _safe_detail(e.detail, path)}
    try:
        ds = read.ds
        sop = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
        if sop == "1.2.840.10008.1.3.10":  # Media Storage Directory (DICOMDIR): an index, not an image
            return {"key": key, "status": "skipped", "reason": "dicomdir"}
        modality = str(ds.get("Modality") or "").strip().upper()
        if not modality:
            return rejected | {"reason": "missing_tag", "detail": "Modality"}
        if modality not in task["modalities"]:
            return rejected | {"reason": "wrong_modality", "detail": re.sub(r"[^A-Z0-9_ ]", "?", modality)[:16]}
        scrub = Scrubber.from_dataset(ds)
        labels = {"modality": [f"{modality} ({MODALITY_MEANINGS.get(modality, 'other')})"]}
        for level, tag in (("study", "StudyDescription"), ("series", "SeriesDescription")):
            text = normalise_description(ds.get(tag), scrub)
            if not text:
                if task["missing"] == "skip":
                    return rejected | {"reason": "missing_tag", "detail": tag}
                text = UNKNOWN
            labels[level] = [text]
        if read.pixels_truncated:
            return rejected | {"reason": "pixel_decode_failed", "detail": "truncated: " + read.pixels_truncated}
        try:
            img = quantise(resize_longest(dicom_to_array(ds, task["max_pixels"]), task["size"]), task["bits"])
        except DicomPixelError as e:
            return rejected | {"reason": e.reason, "detail": _safe_detail(str(e), path, scrub)}
        pid = str(ds.get("PatientID") or "").strip()
        patient = patient_hash(pid, task["salt"]) if pid else "u-" + key[:20]
        rel = f"images/{key[:2]}/{key}.png"
        with atomic_path(out / rel) as tmp:
            with open(tmp, "wb") as f:
                img.save(f, format="PNG")  # no text chunks: nothing from the header travels with the pixels
                f.flush()
                os.fsync(f.fileno())
        return {"key": key, "status": "ok", "image": rel, "labels": labels, "patient": patient}
    except Exception as e:  # noqa: BLE001
        return rejected | {"reason": "unreadable", "detail": _safe_detail(f"{type(e).__name__}: {e}", path, scrub)}


# --------------------------------------------------------------------------- driver


def _walk(src: Path, skip: Path | None) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(src):
        rootp = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (skip is None or (rootp / d).resolve() != skip))
        files += [rootp / n for n in sorted(names) if not n.startswith(".")]
    return files


def build_xray(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    size: int = 512,
    bits: int = 8,
    modalities=("CR", "DX"),
    missing: str = "unknown",
    split: str | None = None,
    seed: int = 0,
    workers: int | None = None,
    salt_file: str | os.PathLike | None = None,
    retry_rejected: bool = False,
    restart: bool = False,
    progress: bool = True,
    name: str = "mgll-xray",
    max_pixels: int | str | None = None,
) -> dict:
    """Build (or resume building) an MGLL-Xray dataset at ``out``; returns the summary dict.

    ``max_pixels``: the pixel budget per image (``mgll.data.pixel_budget``); larger files are
    rejected as ``too_large`` before their pixels are decoded.
    """
    src, out = Path(src), Path(out)
    max_pixels = resolve_max_pixels(max_pixels)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: source folder not found")
    if missing not in ("skip", "unknown"):
        raise ValueError(f"--missing must be 'skip' or 'unknown', got {missing!r}")
    if bits not in (8, 16):
        raise ValueError(f"--bits must be 8 or 16, got {bits}")
    modalities = tuple(sorted({m.strip().upper() for m in modalities if m.strip()}))
    if not modalities:
        raise ValueError("--modalities: give at least one modality code, e.g. CR,DX")
    salt = load_salt(salt_file)
    if restart:
        for p in (out / STATE_DIR, out / "images"):
            shutil.rmtree(p, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    check_build_config(  # "deid": labels scrubbed under another profile edition must not be mixed in
        out,
        {"builder": "xray", "size": size, "bits": bits, "modalities": list(modalities), "missing": missing,
         "salt": salt_fingerprint(salt), "deid": profile_edition()},
    )
    clean_partials(out)
    journal = Journal(out / STATE_DIR / "journal.jsonl")
    files = _walk(src, out.resolve())
    tasks = []
    for f in files:
        key = source_key(f.relative_to(src).as_posix(), salt)
        done = journal.entries.get(key)
        if done is not None:
            if done["status"] == "ok" and (out / done["image"]).is_file():
                continue
            if done["status"] in ("rejected", "skipped") and not retry_rejected:
                continue
        tasks.append({"path": str(f), "key": key, "out": str(out), "size": size, "bits": bits,
                      "modalities": modalities, "missing": missing, "salt": salt, "max_pixels": max_pixels})
    import pydicom.pixels  # noqa: F401 - imported once here so forked workers inherit it instead of each importing

    profile_tags()  # the profile table too, loaded once here for the same reason

    with journal:
        run_tasks(process_dicom, tasks, journal, workers=workers, progress=progress, desc="build-xray")
    live = {source_key(f.relative_to(src).as_posix(), salt) for f in files}
    journal.entries = {k: e for k, e in journal.entries.items() if k in live}
    _, summary = finalize_build(
        out, xray_card(name, missing), journal, split, seed,
        {"source_files": len(files), "processed_this_run": len(tasks)},
    )
    _write_skipped(out, journal.entries.values())
    return summary


def _write_skipped(out: Path, entries) -> None:
    """skipped.jsonl: files that are not images to build from (non-DICOM, DICOMDIR), by keyed hash like rejected.jsonl.

    Kept apart from rejected.jsonl because nothing is wrong with them (and ``--show-rejected`` lists problems
    only); listed so that the summary's ``skipped`` counts can be traced back to files."""
    skipped = sorted((e for e in entries if e["status"] == "skipped"), key=lambda e: e["key"])
    atomic_write_text(
        out / "skipped.jsonl",
        "".join(json.dumps({"key": e["key"], "reason": e.get("reason", "skipped")}) + "\n" for e in skipped),
    )


def locate_rejected(src: str | os.PathLike, out: str | os.PathLike, salt_file=None) -> list[tuple[str, str, str]]:
    """(path, reason, detail) for each rejected file, recomputed from the salt; for the terminal only."""
    src, out = Path(src), Path(out)
    salt = load_salt(salt_file)
    rej = {}
    rej_path = out / "rejected.jsonl"
    if rej_path.is_file():
        for line in rej_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                e = json.loads(line)
                rej[e["key"]] = e
    found = []
    for f in _walk(src, out.resolve()):
        e = rej.get(source_key(f.relative_to(src).as_posix(), salt))
        if e:
            found.append((str(f), e["reason"], e.get("detail", "")))
    return found
