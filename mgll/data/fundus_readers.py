"""One small reader per public fundus release layout: files on disk -> (image, terms, patient) items.

Readers only interpret the release's labels; turning terms into canonical diseases happens in
build_fundus through the shared vocabulary, so a reader never invents disease names.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .fundus_vocab import Finding, load_vocab

__all__ = ["IMAGE_EXTS", "Item", "READERS", "detect_format", "read_release"]

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".ppm"}
_SPLIT_WORDS = (("train", "train"), ("valid", "val"), ("val", "val"), ("test", "test"))


@dataclass
class Item:
    """One image to build. ``key`` identifies it across runs; ``path`` None means listed but not on disk."""

    key: str
    path: Path | None
    findings: list[Finding] = field(default_factory=list)
    patient: str | None = None


# --------------------------------------------------------------------------- helpers


def _images_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    return [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in rows]


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [h.strip() for h in next(csv.reader(f), [])]
    except (OSError, UnicodeDecodeError):
        return []


def _split_word(text: str) -> str | None:
    t = text.lower()
    for word, split in _SPLIT_WORDS:
        if word in t:
            return split
    return None


class _ImageIndex:
    """Find an image by file name or stem, preferring the copy whose folder names the CSV's split."""

    def __init__(self, root: Path):
        self.root = root
        self.by_name: dict[str, list[Path]] = defaultdict(list)
        for p in _images_under(root):
            self.by_name[p.name.lower()].append(p)
            self.by_name[p.stem.lower()].append(p)

    def find(self, name: str, split_hint: str | None = None) -> Path | None:
        cands = self.by_name.get(name.strip().lower(), [])
        if len(cands) > 1 and split_hint:
            preferred = [p for p in cands if _split_word(str(p.relative_to(self.root).parent)) == split_hint]
            cands = preferred or cands
        return cands[0] if cands else None


def _rel(root: Path, p: Path) -> str:
    return p.relative_to(root).as_posix()


# --------------------------------------------------------------------------- readers


def read_rfmid(src: Path) -> list[Item]:
    """RFMiD: ID, Disease_Risk and one 0/1 column per abbreviation; images named {ID}.png."""
    vocab = load_vocab()
    index = _ImageIndex(src)
    items = []
    csvs = [p for p in sorted(src.rglob("*.csv")) if {"ID", "Disease_Risk"} <= set(_csv_header(p))]
    if not csvs:
        raise ValueError(f"{src}: no RFMiD label CSV (columns ID, Disease_Risk, DR, ARMD, ...) found")
    for csv_path in csvs:
        hint = _split_word(csv_path.name)
        for row in _read_csv(csv_path):
            if not row.get("ID"):
                continue
            codes = [c for c, v in row.items() if c not in ("ID", "Disease_Risk") and v in ("1", "1.0")]
            findings = [vocab.code("rfmid", c) for c in codes]
            if not findings:
                risk = row.get("Disease_Risk", "0") in ("1", "1.0")
                findings = [vocab.code("odir_flags", "O") if risk else vocab.resolve(vocab.normal_name)]
            path = index.find(f"{row['ID']}.png", hint) or index.find(row["ID"], hint)
            items.append(Item(f"rfmid:{_rel(src, csv_path)}:{row['ID']}", path, findings))
    return items


def _odir_terms(text: str) -> list[str]:
    return [t for t in re.split(r"[,，;；]", text) if t.strip()]


def read_odir(src: Path) -> list[Item]:
    """ODIR-5K full_df.csv: per-eye diagnostic keywords. The patient-level N..O flags are ignored on purpose:
    they describe the patient, so using them per eye would label a healthy fellow eye as diseased."""
    vocab = load_vocab()
    index = _ImageIndex(src)
    need = {"ID", "Left-Fundus", "Right-Fundus", "Left-Diagnostic Keywords", "Right-Diagnostic Keywords"}
    csvs = [p for p in sorted(src.rglob("*.csv")) if need <= set(_csv_header(p))]
    if not csvs:
        raise ValueError(f"{src}: no ODIR table (full_df.csv with columns {sorted(need)}) found")
    items: dict[str, Item] = {}
    for csv_path in csvs:
        for row in _read_csv(csv_path):
            for side in ("Left", "Right"):
                name = row.get(f"{side}-Fundus", "")
                if not name or name.lower() in items:
                    continue
                findings = [vocab.resolve(t) for t in _odir_terms(row.get(f"{side}-Diagnostic Keywords", ""))]
                items[name.lower()] = Item(f"odir:{name}", index.find(name), findings, patient=f"odir-{row['ID']}")
    return list(items.values())


def _two_class(src: Path, fmt: str, folders: dict[str, str], prefixes: dict[str, str]) -> tuple[list[Item], int]:
    """Shared by ADAM and REFUGE: class from a parent folder name, else from the file-name prefix."""
    vocab = load_vocab()
    items, unlabelled = [], 0
    for p in _images_under(src):
        code = next((folders[q.lower()] for q in reversed(p.relative_to(src).parent.parts) if q.lower() in folders),
                    None)
        if code is None and p.stem[:1] in prefixes and p.stem[1:2].isdigit():
            code = prefixes[p.stem[:1]]
        if code is None:
            unlabelled += 1
            continue
        items.append(Item(f"{fmt}:{_rel(src, p)}", p, [vocab.code(fmt, code)]))
    return items, unlabelled


def read_adam(src: Path) -> list[Item]:
    """ADAM: Training400/AMD and Training400/Non-AMD, files A0001.jpg / N0001.jpg."""
    items, _ = _two_class(src, "adam", {"amd": "AMD", "non-amd": "Non-AMD"}, {"A": "AMD", "N": "Non-AMD"})
    if not items:
        raise ValueError(f"{src}: no ADAM images (AMD/ or Non-AMD/ folders, or A*/N* file names) found")
    return items


def _refuge_sheet(src: Path) -> dict[str, str]:
    labels: dict[str, str] = {}
    for p in sorted(src.rglob("*")):
        if "glaucoma_label" not in p.name.lower().replace(" ", "_"):
            continue
        if p.suffix.lower() == ".csv":
            rows = _read_csv(p)
        elif p.suffix.lower() in (".xlsx", ".xls"):
            try:
                import openpyxl
            except ImportError:
                raise ValueError(f"{p}: reading .xlsx needs openpyxl (pip install 'mgll[fundus]') or save it as CSV") from None
            sheet = openpyxl.load_workbook(p, read_only=True).active
            it = sheet.iter_rows(values_only=True)
            head = [str(h or "").strip() for h in next(it)]
            rows = [{h: str(v if v is not None else "").strip() for h, v in zip(head, r)} for r in it]
        else:
            continue
        for r in rows:
            name = next((v for k, v in r.items() if "name" in k.lower() or k.lower() in ("img", "image")), "")
            lab = next((v for k, v in r.items() if "glaucoma" in k.lower()), "")
            if name and lab in ("0", "1", "0.0", "1.0"):
                labels[name.lower()] = "Glaucoma" if lab.startswith("1") else "Non-Glaucoma"
    return labels


def read_refuge(src: Path) -> list[Item]:
    """REFUGE: Glaucoma/ and Non-Glaucoma/ folders or g/n file prefixes; validation/test via Glaucoma_label sheet."""
    vocab = load_vocab()
    sheet = _refuge_sheet(src)
    items, _ = _two_class(src, "refuge", {"glaucoma": "Glaucoma", "non-glaucoma": "Non-Glaucoma"},
                          {"g": "Glaucoma", "n": "Non-Glaucoma"})
    seen = {it.key for it in items}
    for p in _images_under(src):
        code = sheet.get(p.name.lower())
        key = f"refuge:{_rel(src, p)}"
        if code and key not in seen:
            items.append(Item(key, p, [vocab.code("refuge", code)]))
    if not items:
        raise ValueError(f"{src}: no REFUGE images (Glaucoma/Non-Glaucoma folders, g*/n* names or a label sheet)")
    return sorted(items, key=lambda it: it.key)


def read_idrid(src: Path) -> list[Item]:
    """IDRiD disease grading: retinopathy grade 0-4 and risk of macular edema 0-2 per image."""
    vocab = load_vocab()
    grades = vocab.formats["idrid"]
    index = _ImageIndex(src)
    csvs = [p for p in sorted(src.rglob("*.csv")) if any(h.lower() == "retinopathy grade" for h in _csv_header(p))]
    if not csvs:
        raise ValueError(f"{src}: no IDRiD grading CSV (columns 'Image name', 'Retinopathy grade', ...) found")
    items = []
    for csv_path in csvs:
        hint = _split_word(csv_path.name)
        for row in _read_csv(csv_path):
            low = {k.lower(): v for k, v in row.items()}
            name = low.get("image name", "")
            if not name:
                continue
            dr = grades["retinopathy_grade"].get(low.get("retinopathy grade", "").split(".")[0], "invalid")
            me = grades["macular_edema_risk"].get(low.get("risk of macular edema", "0").split(".")[0] or "0", "invalid")
            if "invalid" in (dr, me):
                raise ValueError(f"{csv_path}: image '{name}': grade out of range (retinopathy 0-4, edema 0-2)")
            findings = []
            if dr:
                findings.append(Finding("disease", "diabetic retinopathy", dr))
            if me:
                findings.append(Finding("disease", "diabetic macular edema", me))
            if not findings:
                findings.append(vocab.resolve(vocab.normal_name))
            items.append(Item(f"idrid:{_rel(src, csv_path)}:{name}", index.find(name, hint), findings))
    return items


def read_folder(src: Path) -> list[Item]:
    """One sub-folder per class (its name goes through the vocabulary); nested folders inherit the class."""
    vocab = load_vocab()
    items = []
    for cls in sorted(d for d in src.iterdir() if d.is_dir() and not d.name.startswith(".")):
        for p in _images_under(cls):
            items.append(Item(f"folder:{_rel(src, p)}", p, [vocab.resolve(cls.name)]))
    if not items:
        raise ValueError(f"{src}: no class sub-folders with images found")
    return items


_HEADER_WORDS = {"image", "images", "path", "file", "filename", "file_name", "image_path", "img", "image_id", "id"}


def read_csv_table(src: Path) -> list[Item]:
    """A generic table: image,label[,label...]; a cell may hold several labels separated by ; or |."""
    vocab = load_vocab()
    tables = [src] if src.is_file() else sorted(src.glob("*.csv"))
    if not tables:
        raise ValueError(f"{src}: no .csv table (image,label[,label...]) found")
    items = []
    for table in tables:
        with open(table, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
        if rows and rows[0][0].strip().lower() in _HEADER_WORDS:
            rows = rows[1:]
        for n, row in enumerate(rows, start=1):
            img = row[0].strip()
            terms = [t for cell in row[1:] for t in re.split(r"[;|]", cell) if t.strip()]
            if not terms:
                raise ValueError(f"{table}: row {n} ('{img}'): no label; expected image,label[,label...]")
            path = table.parent / img
            items.append(Item(f"csv:{_rel(table.parent, path) if path.is_file() else img}",
                              path if path.is_file() else None, [vocab.resolve(t) for t in terms]))
    return items


READERS = {
    "rfmid": read_rfmid,
    "odir": read_odir,
    "adam": read_adam,
    "refuge": read_refuge,
    "idrid": read_idrid,
    "folder": read_folder,
    "csv": read_csv_table,
}


def detect_format(src: Path) -> str:
    if src.is_file() and src.suffix.lower() == ".csv":
        return "csv"
    headers = {p: set(_csv_header(p)) for p in sorted(src.rglob("*.csv"))}
    if any({"ID", "Disease_Risk"} <= h for h in headers.values()):
        return "rfmid"
    if any("Left-Diagnostic Keywords" in h for h in headers.values()):
        return "odir"
    if any(any(x.lower() == "retinopathy grade" for x in h) for h in headers.values()):
        return "idrid"
    dirs = {d.name.lower() for d in src.rglob("*") if d.is_dir()}
    if {"amd", "non-amd"} <= dirs:  # both: a plain "glaucoma" class folder must not look like a release
        return "adam"
    if {"glaucoma", "non-glaucoma"} <= dirs or any("glaucoma_label" in p.name.lower() for p in src.rglob("*")):
        return "refuge"
    if any(p.parent == src for p in headers):
        return "csv"
    if any(d.is_dir() and _images_under(d) for d in src.iterdir()):
        return "folder"
    raise ValueError(
        f"{src}: cannot tell the release layout; pass --format (one of {', '.join(READERS)})"
    )


def read_release(src: Path, fmt: str = "auto") -> tuple[str, list[Item]]:
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: source not found")
    fmt = detect_format(src) if fmt == "auto" else fmt
    if fmt not in READERS:
        raise ValueError(f"unknown fundus format '{fmt}'; choose one of {', '.join(READERS)} or auto")
    return fmt, READERS[fmt](src)
