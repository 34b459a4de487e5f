"""The on-disk dataset contract shared by training, evaluation and the synthetic generators.

A dataset is a folder holding a card (``dataset.json`` / ``dataset.yaml`` / ``dataset.yml``) and a
JSONL records file. Everything downstream trusts what :func:`load_dataset` returns, so every
malformed input is rejected here with a :class:`RecordError` that names the file, the 1-based line
and the field, instead of surfacing later as a confusing shape or key error inside a training loop.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mgll.io import atomic_write_text

CARD_NAMES = ("dataset.json", "dataset.yaml", "dataset.yml")
DEFAULT_RECORDS = "records.jsonl"

__all__ = [
    "CARD_NAMES",
    "DEFAULT_RECORDS",
    "DatasetCard",
    "Level",
    "MultiGranularDataset",
    "Record",
    "RecordError",
    "find_card",
    "load_card",
    "load_dataset",
    "records_path",
    "scan_records",
    "write_dataset",
]


class RecordError(ValueError):
    """Raised for any malformed card or record; subclassing ValueError keeps ``except ValueError`` callers working.

    ``path`` and ``line`` (1-based, None for the card as a whole) say where, for tools that list many errors.
    """

    def __init__(self, message: str, path: Path | str | None = None, line: int | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.line = line


def _where(path: Path | str, line: int | None = None, field_name: str | None = None) -> str:
    loc = str(path)
    if line:
        loc += f":{line}"
    if field_name:
        loc += f": field '{field_name}'"
    return loc


def _err(path: Path | str, msg: str, line: int | None = None, field_name: str | None = None) -> RecordError:
    return RecordError(f"{_where(path, line, field_name)}: {msg}", path, line)


@dataclass(frozen=True)
class Level:
    """One granularity of labels; the template turns a bare label into the caption the text tower sees."""

    name: str
    template: str

    def text(self, label: str) -> str:
        return self.template.format(label)


@dataclass(frozen=True)
class DatasetCard:
    name: str
    levels: tuple[Level, ...]
    description: str = ""

    @property
    def level_names(self) -> tuple[str, ...]:
        return tuple(lv.name for lv in self.levels)

    def level(self, name: str) -> Level:
        for lv in self.levels:
            if lv.name == name:
                return lv
        # RecordError (not KeyError) so a typo in a config reads as a data problem with the fix listed.
        raise RecordError(
            f"dataset '{self.name}': unknown level '{name}'; known levels: {list(self.level_names)}"
        )

    def to_dict(self) -> dict:
        d: dict[str, Any] = {
            "name": self.name,
            "levels": [{"name": lv.name, "template": lv.template} for lv in self.levels],
        }
        if self.description:
            d["description"] = self.description
        return d


@dataclass(frozen=True)
class Record:
    image: str
    labels: dict[str, tuple[str, ...]]
    split: str | None = None
    patient: str | None = None
    line: int = field(default=0, compare=False)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"image": self.image}
        if self.split is not None:
            d["split"] = self.split
        if self.patient is not None:
            d["patient"] = self.patient
        d["labels"] = {k: list(v) for k, v in self.labels.items()}
        return d


@dataclass
class MultiGranularDataset:
    root: Path
    card: DatasetCard
    records: list[Record]

    def image_path(self, rec: Record) -> Path:
        return self.root / rec.image

    def split(self, name: str) -> list[Record]:
        return [r for r in self.records if r.split == name]

    def splits(self) -> dict[str, int]:
        # Records without a split are counted under "" rather than dropped, so totals always add up.
        return dict(Counter(r.split if r.split is not None else "" for r in self.records))

    def label_vocab(self, level: str) -> list[str]:
        self.card.level(level)
        return sorted({lab for r in self.records for lab in r.labels[level]})

    def __len__(self) -> int:
        return len(self.records)


# --------------------------------------------------------------------------- card


def find_card(root: Path | str) -> Path:
    root = Path(root)
    for name in CARD_NAMES:
        p = root / name
        if p.is_file():
            return p
    raise RecordError(f"{root}: no dataset card found (expected one of {', '.join(CARD_NAMES)})")


def _parse_card(obj: Any, path: Path | str) -> DatasetCard:
    if not isinstance(obj, Mapping):
        raise _err(path, f"card must be an object/mapping, got {type(obj).__name__}")
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _err(path, "missing or non-string dataset name", field_name="name")
    desc = obj.get("description", "")
    if desc is None:
        desc = ""
    if not isinstance(desc, str):
        raise _err(path, "description must be a string", field_name="description")
    levels_raw = obj.get("levels")
    if not isinstance(levels_raw, list) or not levels_raw:
        raise _err(path, "levels must be a non-empty list ordered coarse -> fine", field_name="levels")
    levels: list[Level] = []
    seen: set[str] = set()
    for i, lv in enumerate(levels_raw):
        fld = f"levels[{i}]"
        if not isinstance(lv, Mapping):
            raise _err(path, "each level must be an object with 'name' and 'template'", field_name=fld)
        lname = lv.get("name")
        if not isinstance(lname, str) or not lname.strip():
            raise _err(path, "missing or non-string level name", field_name=f"{fld}.name")
        lname = lname.strip()
        tmpl = lv.get("template")
        if not isinstance(tmpl, str) or "{}" not in tmpl:
            raise _err(
                path,
                f"level '{lname}': template must be a string containing '{{}}'",
                field_name=f"{fld}.template",
            )
        try:
            tmpl.format("x")
        except (IndexError, KeyError, ValueError) as e:
            raise _err(
                path,
                f"level '{lname}': template is not a valid format string ({e})",
                field_name=f"{fld}.template",
            ) from None
        if lname in seen:
            raise _err(path, f"duplicate level name '{lname}'", field_name=f"{fld}.name")
        seen.add(lname)
        levels.append(Level(lname, tmpl))
    return DatasetCard(name=name.strip(), levels=tuple(levels), description=desc)


def _bad_utf8(path: Path | str, line: int, byte: int, column: int) -> RecordError:
    as_latin1 = bytes([byte]).decode("latin-1")
    return _err(
        path,
        f"not valid UTF-8: byte 0x{byte:02x} ({as_latin1!r} in Latin-1) at column {column}; save the file as UTF-8",
        line,
    )


def _read_card_obj(path: Path) -> Any:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise _bad_utf8(path, line, raw[e.start], column) from None
    try:
        if path.suffix == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise _err(path, f"cannot parse card: {e}") from None


def load_card(root: Path | str) -> DatasetCard:
    path = find_card(root)
    return _parse_card(_read_card_obj(path), path)


# --------------------------------------------------------------------------- records

_DRIVE = re.compile(r"^[A-Za-z]:")


def _normalise_image(image: str, path: Path | str, line: int) -> str:
    """Reject paths that could read outside the dataset folder; return a canonical POSIX form for duplicate checks."""
    if not image.strip():
        raise _err(path, "empty image path", line, "image")
    unified = image.replace("\\", "/")
    if unified.startswith("/") or _DRIVE.match(unified):
        raise _err(
            path,
            f"image path '{image}' is absolute; it must be relative to the dataset folder",
            line,
            "image",
        )
    if ".." in unified.split("/"):
        raise _err(path, f"image path '{image}' escapes the dataset folder ('..')", line, "image")
    return posixpath.normpath(unified)


def _parse_labels(raw: Any, card: DatasetCard, path: Path | str, line: int) -> dict[str, tuple[str, ...]]:
    if raw is None:
        raise _err(path, "missing 'labels'", line, "labels")
    if not isinstance(raw, Mapping):
        raise _err(
            path,
            f"'labels' must be an object mapping level -> list of labels, got {type(raw).__name__}",
            line,
            "labels",
        )
    known = card.level_names
    for k in raw:
        if k not in known:
            raise _err(path, f"unknown level '{k}'; the card's levels are {list(known)}", line, f"labels.{k}")
    out: dict[str, tuple[str, ...]] = {}
    for lv in known:
        fld = f"labels.{lv}"
        if lv not in raw:
            raise _err(path, f"a level with no labels: level '{lv}' is missing", line, fld)
        vals = raw[lv]
        if not isinstance(vals, list):
            raise _err(
                path,
                f"non-list labels: expected a list of strings, got {type(vals).__name__} {vals!r}",
                line,
                fld,
            )
        cleaned: list[str] = []
        for v in vals:
            if not isinstance(v, str) or not v.strip():
                raise _err(
                    path, f"non-list labels: every label must be a non-empty string, got {v!r}", line, fld
                )
            s = v.strip()
            if s not in cleaned:
                cleaned.append(s)
        if not cleaned:
            raise _err(path, f"a level with no labels: level '{lv}' has an empty list", line, fld)
        out[lv] = tuple(cleaned)
    return out


def _opt_str(obj: Mapping, key: str, path: Path | str, line: int) -> str | None:
    v = obj.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise _err(path, f"'{key}' must be a string, got {type(v).__name__}", line, key)
    return v


def _parse_record(obj: Any, card: DatasetCard, path: Path | str, line: int) -> Record:
    if not isinstance(obj, Mapping):
        raise _err(path, f"record must be a JSON object, got {type(obj).__name__}", line)
    image = obj.get("image")
    if not isinstance(image, str):
        raise _err(path, "missing or non-string 'image'", line, "image")
    _normalise_image(image, path, line)
    labels = _parse_labels(obj.get("labels"), card, path, line)
    return Record(
        image=image,
        labels=labels,
        split=_opt_str(obj, "split", path, line),
        patient=_opt_str(obj, "patient", path, line),
        line=line,
    )


_ESCAPED = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" turns each undecodable byte into


def records_path(root: Path | str, records: str | None = None) -> tuple[DatasetCard, Path]:
    """The dataset's card and the path of its records file (the card's ``records`` key, else records.jsonl)."""
    root = Path(root)
    card_path = find_card(root)
    card_obj = _read_card_obj(card_path)
    card = _parse_card(card_obj, card_path)
    rec_name = records
    if rec_name is None:
        rec_name = card_obj.get("records", DEFAULT_RECORDS)
        if not isinstance(rec_name, str) or not rec_name.strip():
            raise _err(card_path, "'records' must name a file in the dataset folder", field_name="records")
    rec_path = root / rec_name
    if not rec_path.is_file():
        raise RecordError(f"{rec_path}: records file not found")
    return card, rec_path


def scan_records(rec_path: Path, card: DatasetCard) -> Iterator[Record | RecordError]:
    """Each non-blank line on its own: its :class:`Record`, or the :class:`RecordError` it would raise.

    :func:`load_dataset` stops at the first error; ``mgll check-data`` lists them all. Bytes that are
    not UTF-8 are reported per line (file, line, byte) rather than as a bare UnicodeDecodeError at a
    position in the file: the file is decoded with ``surrogateescape`` so one bad byte spoils only its
    line. Duplicate image entries are reported on their second line. Image files are not looked at.
    """
    first_line: dict[str, int] = {}
    with rec_path.open(encoding="utf-8", errors="surrogateescape") as fh:
        for lineno, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            bad = _ESCAPED.search(text)
            if bad:
                yield _bad_utf8(rec_path, lineno, ord(bad.group()) - 0xDC00, bad.start() + 1)
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield _err(rec_path, f"invalid JSON: {e.msg} (column {e.colno})", lineno, "<json>")
                continue
            try:
                rec = _parse_record(obj, card, rec_path, lineno)
                key = _normalise_image(rec.image, rec_path, lineno)
            except RecordError as e:
                yield e
                continue
            if key in first_line:
                yield _err(
                    rec_path,
                    f"duplicate image entry '{rec.image}' (first on line {first_line[key]}, again on line {lineno})",
                    lineno,
                    "image",
                )
                continue
            first_line[key] = lineno
            yield rec


def load_dataset(
    root: Path | str, records: str | None = None, check_images: bool = True
) -> MultiGranularDataset:
    root = Path(root)
    card, rec_path = records_path(root, records)
    out: list[Record] = []
    for rec in scan_records(rec_path, card):
        if isinstance(rec, RecordError):
            raise rec
        if check_images and not (root / rec.image).is_file():
            raise _err(rec_path, f"image file does not exist: {root / rec.image}", rec.line, "image")
        out.append(rec)
    return MultiGranularDataset(root=root, card=card, records=out)


# --------------------------------------------------------------------------- writing


def write_dataset(root: Path | str, card: DatasetCard, records: Iterable[Record]) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    card_path = root / "dataset.json"
    rec_path = root / DEFAULT_RECORDS
    # Validate before touching disk: a writer bug should fail here, not at the next load.
    _parse_card(card.to_dict(), card_path)
    lines: list[str] = []
    seen: dict[str, int] = {}
    for i, rec in enumerate(records, start=1):
        d = rec.to_dict()
        d["labels"] = {lv: d["labels"][lv] for lv in card.level_names if lv in d["labels"]} | {
            k: v for k, v in d["labels"].items() if k not in card.level_names
        }
        _parse_record(d, card, rec_path, i)
        key = _normalise_image(rec.image, rec_path, i)
        if key in seen:
            raise _err(
                rec_path, f"duplicate image entry '{rec.image}' (records {seen[key]} and {i})", i, "image"
            )
        seen[key] = i
        lines.append(json.dumps(d, ensure_ascii=False))
    atomic_write_text(card_path, json.dumps(card.to_dict(), indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(rec_path, "".join(line + "\n" for line in lines))
    return root
