"""Which option a free-text answer picks: a cascade from the strictest reading to the loosest.

A letter stated as the answer wins over option text (models often restate the letter then
ramble); option text counts only when exactly one option (or one of its vocabulary synonyms)
is named. Anything else is a failure: counted wrong and listed, never guessed.

This file imports only the standard library at module level: ``mgll mcq export --format lmms-eval``
copies it verbatim into the task folder (with each option's names precomputed by
:func:`option_names`), so lmms-eval scores answers with this very cascade, mgll installed or not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Extraction", "extract_answer", "option_names"]


@dataclass(frozen=True)
class Extraction:
    index: int | None  # None: no option could be read off the answer
    method: str  # letter | answer_is | leading_letter | paren_letter | text | none | ambiguous

    @property
    def ok(self) -> bool:
        return self.index is not None


def _norm(s: str) -> str:
    s = s.lower().replace("-", " ")
    s = re.sub(r"[^\w\s]", " ", s)
    return " ".join(s.split())


def option_names(option: str) -> list[str]:
    """The option's canonical name plus its harmonised-vocabulary synonyms (``AMD``, ``tessellated fundus``)."""
    names = {_norm(option)}
    try:
        from mgll.data.fundus_vocab import load_vocab

        vocab = load_vocab()
        canon = vocab.resolve(option)
        if canon.kind == "disease":
            names |= {_norm(t) for t, f in vocab._lookup.items() if f.kind == "disease" and f.disease == canon.disease}
    except (OSError, ValueError):  # options outside the fundus vocabulary still match by their own text
        pass
    return sorted(n for n in names if len(n) >= 2)


def extract_answer(text: str, options: list[str] | tuple[str, ...], letters: str | None = None,
                   names: list[list[str]] | None = None) -> Extraction:
    """Which option ``text`` picks. ``names``: each option's :func:`option_names`, when computed
    beforehand (an exported task has no vocabulary to read them from)."""
    if names is None:
        names = [option_names(opt) for opt in options]
    letters = letters or "ABCDEFGHIJ"[: len(options)]
    valid = letters[: len(options)]
    s = re.sub(r"[*`]", "", text or "").strip()  # markdown emphasis: "**B**"
    cls = "".join(valid)

    def pick(letter: str, method: str) -> Extraction:
        return Extraction(valid.index(letter.upper()), method)

    # 1. the whole answer is a letter: "B", "b", "B.", "(B)", "B)"
    m = re.fullmatch(rf"\(?\s*([{cls}{cls.lower()}])\s*\)?\s*[.:]?", s)
    if m:
        return pick(m.group(1), "letter")
    # 2. "The answer is B", "Answer: B) cataract", "answer is (C)", "Option B", "correct choice is D"
    found = set(re.findall(rf"\b(?:answer|option|choice)\s*(?:is|would be|:)?\s*:?\s*\(?([{cls}])\b(?![-'])", s, flags=re.I))
    found = {f.upper() for f in found if f.isupper() or not f.lower() == "a"}  # "the answer is a cataract"
    if len(found) == 1:
        return pick(found.pop(), "answer_is")
    if len(found) > 1:
        return Extraction(None, "ambiguous")
    # 3. the answer starts with a letter marker: "B) cataract", "B. Cataract", "(B) ..."
    m = re.match(rf"\(?([{cls}])[).:]\s", s + " ")
    if m:
        return pick(m.group(1), "leading_letter")
    # 4. a single parenthesised letter anywhere: "I would pick (C) here"
    found = set(re.findall(rf"\(([{cls}])\)", s))
    if len(found) == 1:
        return pick(found.pop(), "paren_letter")
    # 5. exactly one option named (by its text or a vocabulary synonym), whole words only
    norm = f" {_norm(s)} "
    hits = [i for i in range(len(options)) if any(f" {n} " in norm for n in names[i])]
    if len(hits) == 1:
        return Extraction(hits[0], "text")
    return Extraction(None, "ambiguous" if hits else "none")
