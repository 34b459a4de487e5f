"""Which DICOM attributes identify someone, and scrubbing their values out of a text the builder keeps.

The builder keeps StudyDescription and SeriesDescription as labels. Free text like that can carry any
header value ("chest john doe", "pa born <physician> <institution>"), so before it is kept, the values of
every attribute the DICOM PS3.15 Basic Application Level Confidentiality Profile (Annex E, table E.1-1)
lists are removed from it: names of patients, physicians, operators and institutions, IDs, dates, times,
ages, addresses, station and device names, UIDs, wherever they sit in the dataset: a listed element
inside any sequence counts, and inside a listed sequence (OtherPatientIDsSequence, a physician's
identification sequence) every element counts, since the profile removes the sequence whole.

The table comes from ``dicom-anonymizer`` (KitwareMedical), which ships E.1-1 as tag lists by action (D,
Z, X, U and their combinations), one module per edition of the standard; the newest edition installed is
used and its name goes into the build config, so a resumed build cannot mix two editions. Both libraries
the issue named were read first and neither carries the table: pydicom/deid's default recipe is its own
CTP-derived list (no InstitutionName, StationName, InstitutionAddress or DeviceSerialNumber), and
dicognito picks elements by VR plus about thirty keywords of its own. Writing the table out by hand is
what caused this bug, so the table is taken from the one library that keeps it current. It needs only
pydicom and tqdm, which this package already has, and imports in a few milliseconds with no network.

Two kinds of attribute that the profile removes are not used to scrub:

* Descriptors (keywords ending in ``Description`` or ``Meaning``, and ``ProtocolName``). The profile
  removes them because free text *may* hold identity; they describe the exam and routinely repeat the
  kept descriptions word for word (ProtocolName "Chest PA", SeriesDescription "Chest PA"), so scrubbing
  them would erase the labels this builder exists to keep. The kept descriptions are descriptors too.
* Private attributes: vendor data, often copies of the same descriptions. A person name (VR PN) is
  used wherever it is, private or not listed, because a name identifies by what it is.

How a value is found in a text, case-insensitively and on word boundaries:

* a person name: each of its words (the ``^`` / ``=`` components, split on spaces) on its own, in any order;
* any other value: the whole value, or any run of two or more of its words side by side, in any order;
  a one-word value needs only that word;
* one-character words never match alone (PatientSex "M" must not eat the "m" of a text); words in
  scripts written without spaces (CJK) match as substrings.
"""

from __future__ import annotations

import pkgutil
import re
from collections.abc import Iterable, Iterator
from functools import lru_cache

__all__ = [
    "Scrubber",
    "identifying_values",
    "in_profile",
    "is_descriptor",
    "profile_edition",
    "profile_keywords",
    "profile_tags",
]

DESCRIPTOR_SUFFIXES = ("Description", "Meaning")
DESCRIPTOR_KEYWORDS = frozenset({"ProtocolName"})
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "AT"})
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_WORD = re.compile(r"\w+")
_SPACELESS_SCRIPT = 0x2E80  # CJK radicals onwards: kana, ideographs, hangul are not separated by spaces


# --------------------------------------------------------------------------- the profile


@lru_cache(maxsize=1)
def profile_edition() -> str:
    """The newest E.1-1 edition dicom-anonymizer ships, e.g. ``dicomfields_2026c``."""
    try:
        from dicomanonymizer import dicom_anonymization_databases as dbs
    except ImportError as e:
        raise ImportError("build-xray needs dicom-anonymizer for the PS3.15 profile: pip install 'mgll[dicom]'") from e
    editions = sorted(m.name for m in pkgutil.iter_modules(dbs.__path__) if m.name.startswith("dicomfields_"))
    if not editions:
        raise ImportError("dicom-anonymizer ships no dicomfields_* table; reinstall it: pip install -U dicom-anonymizer")
    return editions[-1]


@lru_cache(maxsize=1)
def profile_tags() -> tuple[frozenset[int], tuple[tuple[int, int, int, int], ...]]:
    """(exact tags, (group, element, group mask, element mask) patterns such as the 60xx overlay groups)."""
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    exact, masked = set(), []
    for t in dicom_anonymization_database_selector(profile_edition())["ALL_TAGS"]:
        if len(t) == 2:
            exact.add((t[0] << 16) | t[1])
        else:
            masked.append(tuple(t))
    return frozenset(exact), tuple(masked)


def in_profile(tag: int) -> bool:
    exact, masked = profile_tags()
    if tag in exact:
        return True
    group, elem = tag >> 16, tag & 0xFFFF
    return any(group & gm == g & gm and elem & em == e & em for g, e, gm, em in masked)


def profile_keywords() -> tuple[str, ...]:
    """Keywords of the listed attributes that pydicom's dictionary knows, sorted."""
    from pydicom.datadict import keyword_for_tag

    return tuple(sorted(kw for kw in map(keyword_for_tag, profile_tags()[0]) if kw))


def is_descriptor(keyword: str) -> bool:
    return keyword in DESCRIPTOR_KEYWORDS or keyword.endswith(DESCRIPTOR_SUFFIXES)


# --------------------------------------------------------------------------- values in a dataset


def identifying_values(ds) -> list[tuple[str, str]]:
    """(VR, value) of every identifying element in ``ds`` and its file meta, sequences included."""
    found: list[tuple[str, str]] = []
    meta = getattr(ds, "file_meta", None)
    for d in (meta, ds) if meta is not None else (ds,):
        _collect(d, inherited=False, out=found)
    return found


def _collect(ds, inherited: bool, out: list[tuple[str, str]]) -> None:
    from pydicom.datadict import dictionary_VR, keyword_for_tag

    from .dicom_read import raw_elements

    for raw in list(raw_elements(ds)):  # nothing is converted or read unless needed below
        tag = int(raw.tag)
        if tag in PIXEL_TAGS:
            continue
        vr = raw.VR
        if vr is None:  # implicit VR file: the dictionary says
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                continue
        private = bool((tag >> 16) & 1)
        keyword = keyword_for_tag(tag)
        listed = in_profile(tag) and not private
        if vr == "SQ":
            for item in ds[tag].value or ():
                _collect(item, inherited or listed, out)
            continue
        if vr in BINARY_VRS or is_descriptor(keyword):
            continue
        if (private and vr != "PN") or not (listed or inherited or vr == "PN"):
            continue
        out += [(vr, v) for v in _strings(ds[tag].value)]


def _strings(value) -> Iterator[str]:
    from pydicom.multival import MultiValue

    for v in value if isinstance(value, (list, tuple, MultiValue)) else [value]:
        if isinstance(v, bytes):
            continue
        s = str(v if v is not None else "").strip()
        if s:
            yield s


# --------------------------------------------------------------------------- scrubbing


class Scrubber:
    """Removes a file's identifying values from any text; build it once per file, call it per text."""

    def __init__(self, values: Iterable[tuple[str, str]]):
        self.words: set[str] = set()  # each matches alone
        self.phrases: list[frozenset[str]] = []  # two or more side by side, any order
        self.literals: set[str] = set()  # matched as substrings: UIDs, spaceless-script words
        for vr, value in values:
            if vr == "UI":  # digits and dots when valid; an invalid one with letters goes in both cases
                self.literals |= {value, value.lower(), value.upper()}
                continue
            if vr == "PN":
                for w in _WORD.findall(value.replace("^", " ").replace("=", " ")):
                    self._add_word(w)
                continue
            ws = _WORD.findall(value)
            if len({w.casefold() for w in ws}) == 1:
                self._add_word(ws[0])
            elif ws:
                self.phrases.append(frozenset(w.casefold() for w in ws))
                for w in ws:
                    if _spaceless(w):
                        self._add_word(w)
        self._literals = sorted(self.literals, key=len, reverse=True)  # no case to fold: digits and dots, CJK

    @classmethod
    def from_dataset(cls, ds) -> Scrubber:
        return cls(identifying_values(ds))

    def _add_word(self, w: str) -> None:
        w = w.casefold()
        if len(w) < 2:
            return
        (self.literals if _spaceless(w) else self.words).add(w)

    def __call__(self, text: str) -> str:
        s = str(text or "")
        for lit in self._literals:
            s = s.replace(lit, " ")
        tokens = list(_WORD.finditer(s))
        folded = [t.group().casefold() for t in tokens]
        hit = [w in self.words for w in folded]
        for phrase in self.phrases:
            self._mark_runs(phrase, folded, hit)
        return _cut(s, tokens, hit)

    @staticmethod
    def _mark_runs(phrase: frozenset[str], folded: list[str], hit: list[bool]) -> None:
        i = 0
        while i < len(folded):
            j = i
            while j < len(folded) and folded[j] in phrase:
                j += 1
            run = set(folded[i:j])
            if len(run) >= 2 and sum(map(len, run)) >= 3:
                hit[i:j] = [True] * (j - i)
            i = max(j, i + 1)


def _spaceless(word: str) -> bool:
    return any(ord(c) >= _SPACELESS_SCRIPT for c in word)


def _cut(s: str, tokens: list[re.Match], hit: list[bool]) -> str:
    """Drop each run of hit words, with the punctuation glued to it ("(doe)", "pid-4711"), keep the rest."""
    out, pos, i = [], 0, 0
    while i < len(tokens):
        if not hit[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(tokens) and hit[j + 1]:
            j += 1
        start, end = tokens[i].start(), tokens[j].end()
        while start > pos and not s[start - 1].isspace() and not s[start - 1].isalnum():
            start -= 1
        while end < len(s) and not s[end].isspace() and not s[end].isalnum():
            end += 1
        out += [s[pos:start], " "]
        pos = end
        i = j + 1
    out.append(s[pos:])
    return "".join(out)
