"""The harmonised fundus vocabulary and knowledge table (package data files) as lookups."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from importlib import resources

import yaml

__all__ = ["Finding", "Vocabulary", "load_knowledge", "load_vocab", "normalise_term"]

_SPELLING = (
    (r"haemorrhag", "hemorrhag"),
    (r"oedema", "edema"),
    (r"fibres", "fibers"),
    (r"fibre", "fiber"),
    (r"naevus", "nevus"),
    (r"tesselat", "tessellat"),
    (r"\bnon proliferative\b", "nonproliferative"),
    (r"\bnon-proliferative\b", "nonproliferative"),
)


def normalise_term(text: str) -> str:
    """Lower case, unify separators and spelling variants, so one vocabulary entry matches every release."""
    s = str(text).strip().lower()
    for pat, rep in _SPELLING:
        s = re.sub(pat, rep, s)
    s = re.sub(r"[-_/]+", " ", s)
    s = re.sub(r"[\s,.;:()]+", " ", s)
    return s.strip()


@dataclass(frozen=True)
class Finding:
    """A term resolved against the vocabulary: ``kind`` is disease | normal | ignore | reject | unmapped."""

    kind: str
    disease: str | None = None
    grade: str | None = None


@dataclass
class Vocabulary:
    normal_name: str
    diseases: tuple[str, ...]
    formats: dict
    _lookup: dict[str, Finding] = field(repr=False, default_factory=dict)

    def resolve(self, term: str) -> Finding:
        key = normalise_term(term)
        if not key:
            return Finding("ignore")
        return self._lookup.get(key, Finding("unmapped", disease=key))

    def code(self, fmt: str, code: str) -> Finding:
        """A release-specific code (RFMiD column, ADAM folder...) -> finding; unknown codes fall back to terms."""
        target = self.formats.get(fmt, {}).get(code)
        if target is None:
            return self.resolve(code)
        return self.resolve(target)


@functools.lru_cache(maxsize=1)
def load_vocab() -> Vocabulary:
    raw = yaml.safe_load(resources.files("mgll.data").joinpath("fundus_vocab.yaml").read_text(encoding="utf-8"))
    lookup: dict[str, Finding] = {}

    def add(term: str, finding: Finding) -> None:
        key = normalise_term(term)
        old = lookup.get(key)
        if old is not None and old != finding:
            raise ValueError(f"fundus_vocab.yaml: term '{term}' maps to both {old} and {finding}")
        lookup[key] = finding

    normal = raw["normal_name"]
    add(normal, Finding("normal", normal))
    for t in raw["normal"]:
        add(t, Finding("normal", normal))
    for t in raw["ignore"]:
        add(t, Finding("ignore"))
    for t in raw["reject"]:
        add(t, Finding("reject", normalise_term(t)))
    for name, syns in raw["diseases"].items():
        add(name, Finding("disease", name))
        for t in syns:
            add(t, Finding("disease", name))
    for t, (name, grade) in raw["graded_terms"].items():
        if name not in raw["diseases"]:
            raise ValueError(f"fundus_vocab.yaml: graded term '{t}' names unknown disease '{name}'")
        add(t, Finding("disease", name, grade))
    return Vocabulary(normal, tuple(raw["diseases"]), raw["formats"], lookup)


@functools.lru_cache(maxsize=1)
def load_knowledge() -> dict[str, dict]:
    return yaml.safe_load(
        resources.files("mgll.data").joinpath("fundus_knowledge.yaml").read_text(encoding="utf-8")
    )


def explain(disease: str, grade: str | None = None) -> str:
    """The explanation text; a disease the table lacks (an unmapped term) gets a plain generic sentence."""
    entry = load_knowledge().get(disease)
    if entry is None:
        return f"fundus findings of {disease}"
    if grade and grade in entry.get("grades", {}):
        return entry["grades"][grade]
    return entry["default"]
