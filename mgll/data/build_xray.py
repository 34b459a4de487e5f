"""MGLL-Xray from a folder of DICOM files: three label levels read from the headers, nothing annotated by hand.

Levels (coarse -> fine): ``modality`` (code and meaning, "DX (digital radiography)"), ``study``
(StudyDescription) and ``series`` (SeriesDescription), lower-cased with whitespace collapsed. A missing or
empty description follows ``missing``: ``"unknown"`` (default) labels it "unknown" so the image still
teaches the coarser levels; ``"skip"`` rejects the file with reason ``missing_tag``.

De-identification: no patient name, ID, date or UID is written anywhere under OUT, not even in file
names (images are named by a keyed hash of their source path, and rejected files are listed by that
hash; ``--show-rejected`` prints their paths to the terminal only). ``patient`` is an HMAC of PatientID
under a secret salt kept *outside* OUT (``--salt-file``, default ``~/.config/mgll/deid_salt``), because
an unkeyed or co-located salt would let anyone hash a list of candidate IDs and re-identify patients.
Builds sharing a salt give one patient the same hash, which keeps merged splits leak-free.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import shutil
from pathlib import Path

from mgll.io import atomic_path, atomic_write_bytes

from .build_runner import STATE_DIR, Journal, check_build_config, clean_partials, finalize_build, run_tasks
from .dicom_pixels import DicomPixelError, dicom_to_array, quantise, resize_longest
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


def _identifiers(ds) -> list[str]:
    from pydicom.multival import MultiValue

    ids = []
    for tag in ("PatientID", "OtherPatientIDs", "AccessionNumber"):
        v = ds.get(tag)
        if v:
            ids += [str(x) for x in (v if isinstance(v, (list, tuple, MultiValue)) else [v])]
    name = ds.get("PatientName")
    if name:
        ids += [p for p in re.split(r"[\^=\s,]+", str(name)) if len(p) >= 2]
    return [i.strip() for i in ids if i and i.strip()]


def normalise_description(text, identifiers=()) -> str:
    """Lower-case, collapse whitespace, and strip anything that looks like a name, ID, date or UID."""
    s = str(text or "").replace("^", " ")
    for ident in sorted(identifiers, key=len, reverse=True):
        s = re.sub(re.escape(ident), " ", s, flags=re.IGNORECASE)
    s = _DATE.sub(" ", _UID.sub(" ", s))
    return re.sub(r"\s+", " ", s).strip(" \t-_/,.;:").lower()


def _safe_detail(msg: str, path: str) -> str:
    msg = msg.replace(path, "<file>").replace(os.path.basename(path), "<file>")
    return re.sub(r"\s+", " ", _DATE.sub("<date>", _UID.sub("<uid>", msg)))[:200]


# --------------------------------------------------------------------------- per-file work


def process_dicom(task: dict) -> dict:
    """One source file -> one journal entry. Top level so multiprocessing can pickle it; never raises."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    path, key, out = task["path"], task["key"], Path(task["out"])
    rejected = {"key": key, "status": "rejected"}
    try:
        ds = pydicom.dcmread(path, defer_size="64 KB")
    except InvalidDicomError:
        return {"key": key, "status": "skipped", "reason": "not_dicom"}
    except Exception as e:  # noqa: BLE001 - a broken file of any kind is a rejection, not a crash
        return rejected | {"reason": "unreadable", "detail": _safe_detail(f"{type(e).__name__}: {e}", path)}
    try:
        sop = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
        if sop == "1.2.840.10008.1.3.10":  # Media Storage Directory (DICOMDIR): an index, not an image
            return {"key": key, "status": "skipped", "reason": "dicomdir"}
        modality = str(ds.get("Modality") or "").strip().upper()
        if modality not in task["modalities"]:
            return rejected | {"reason": "wrong_modality", "detail": modality or "<missing>"}
        ids = _identifiers(ds)
        labels = {"modality": [f"{modality} ({MODALITY_MEANINGS.get(modality, 'other')})"]}
        for level, tag in (("study", "StudyDescription"), ("series", "SeriesDescription")):
            text = normalise_description(ds.get(tag), ids)
            if not text:
                if task["missing"] == "skip":
                    return rejected | {"reason": "missing_tag", "detail": tag}
                text = UNKNOWN
            labels[level] = [text]
        try:
            img = quantise(resize_longest(dicom_to_array(ds), task["size"]), task["bits"])
        except DicomPixelError as e:
            return rejected | {"reason": e.reason, "detail": _safe_detail(str(e), path)}
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
        return rejected | {"reason": "unreadable", "detail": _safe_detail(f"{type(e).__name__}: {e}", path)}


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
) -> dict:
    """Build (or resume building) an MGLL-Xray dataset at ``out``; returns the summary dict."""
    src, out = Path(src), Path(out)
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
    check_build_config(
        out,
        {"builder": "xray", "size": size, "bits": bits, "modalities": list(modalities), "missing": missing,
         "salt": salt_fingerprint(salt)},
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
                      "modalities": modalities, "missing": missing, "salt": salt})
    import pydicom.pixels  # noqa: F401 - imported once here so forked workers inherit it instead of each importing

    with journal:
        run_tasks(process_dicom, tasks, journal, workers=workers, progress=progress, desc="build-xray")
    live = {source_key(f.relative_to(src).as_posix(), salt) for f in files}
    journal.entries = {k: e for k, e in journal.entries.items() if k in live}
    _, summary = finalize_build(
        out, xray_card(name, missing), journal, split, seed,
        {"source_files": len(files), "processed_this_run": len(tasks)},
    )
    return summary


def locate_rejected(src: str | os.PathLike, out: str | os.PathLike, salt_file=None) -> list[tuple[str, str, str]]:
    """(path, reason, detail) for each rejected file, recomputed from the salt; for the terminal only."""
    import json

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
