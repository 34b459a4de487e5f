"""Ten-disease multiple-choice question bank built from a records dataset, as versioned JSONL.

Every random choice (which disease an image with several of the ten is asked about, which
distractors, which option order) is drawn from a generator seeded by ``(seed, image)``: a
question does not change when other records are added or removed, and the same seed gives
the same bank byte for byte. Distractors never name a disease the image also has, or the
question would have two right answers.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mgll.data import FUNDUS_DISEASES
from mgll.data.fundus_vocab import load_vocab
from mgll.io import atomic_path

__all__ = [
    "BANK_VERSION",
    "QUESTION",
    "INSTRUCTION",
    "LETTERS",
    "Question",
    "Variant",
    "QuestionBank",
    "format_question",
    "canonical_disease",
    "build_bank",
    "write_bank",
    "load_bank",
]

BANK_VERSION = 1
QUESTION = "Which of the following diseases is shown in this fundus image?"
INSTRUCTION = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJ"


def option_text(index: int, option: str) -> str:
    """An option as a model answers it and as ``loglik`` mode scores it: the letter and the disease."""
    return f"{LETTERS[index]}. {option}"


def format_question(question: str, options: tuple[str, ...] | list[str]) -> str:
    """The user-turn text every harness asks: question, lettered options, instruction.

    It lives with the bank (not the scorer) so the lmms-eval / VLMEvalKit exports can write the
    exact text ``mgll mcq run`` asks without importing torch or a model host.
    """
    lines = [question, *(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options)), INSTRUCTION]
    return "\n".join(lines)


@dataclass(frozen=True)
class Variant:
    """One prompt to score: the options in one order (rotation ``rotation`` of the question's order)."""

    qid: str
    rotation: int
    options: tuple[str, ...]
    answer_index: int


@dataclass(frozen=True)
class Question:
    qid: str
    image: str
    split: str | None
    answer: str
    options: tuple[str, ...]
    answer_index: int
    image_diseases: tuple[str, ...] = ()

    def variants(self, circular: bool) -> list[Variant]:
        """The question itself, or every rotation of its options (MMBench's CircularEval)."""
        k = len(self.options)
        rots = range(k) if circular else range(1)
        out = []
        for r in rots:
            opts = self.options[r:] + self.options[:r]
            out.append(Variant(self.qid, r, opts, (self.answer_index - r) % k))
        return out


@dataclass
class QuestionBank:
    questions: list[Question]
    k: int = 4
    seed: int = 0
    circular: bool = False
    question: str = QUESTION
    dataset: str = ""
    split: str | None = None
    level: str = "disease"
    skipped: list[str] = field(default_factory=list)
    version: int = BANK_VERSION
    max_per_disease: int | None = None

    def counts(self) -> dict[str, int]:
        """Questions per disease, in the canonical order, zeros included (small classes must be visible)."""
        c = Counter(q.answer for q in self.questions)
        return {d: c.get(d, 0) for d in FUNDUS_DISEASES}

    def header(self) -> dict[str, Any]:
        return {
            "type": "header",
            "version": self.version,
            "question": self.question,
            "k": self.k,
            "seed": self.seed,
            "circular": self.circular,
            "dataset": self.dataset,
            "split": self.split,
            "level": self.level,
            "n_questions": len(self.questions),
            "counts": self.counts(),
            "skipped": self.skipped,
            "max_per_disease": self.max_per_disease,
        }

    def fingerprint(self) -> str:
        """A hash of the questions as scored; a results cache from another bank must not be reused."""
        h = hashlib.sha256()
        h.update(json.dumps([self.question, self.circular], sort_keys=True).encode())
        for q in self.questions:
            h.update(json.dumps([q.qid, q.image, list(q.options), q.answer_index]).encode())
        return h.hexdigest()[:16]

    def image_path(self, q: Question, root: str | os.PathLike | None = None) -> Path:
        return Path(root or self.dataset) / q.image


def canonical_disease(label: str) -> str | None:
    """The canonical disease name of a label (any synonym the harmonised vocabulary knows), or None."""
    finding = load_vocab().resolve(label)
    if finding.kind == "disease":
        return finding.disease
    return None


def _rng(seed: int, image: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}\x00{image}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def build_bank(
    ds,
    k: int = 4,
    seed: int = 0,
    split: str | None = None,
    level: str = "disease",
    circular: bool = False,
    question: str = QUESTION,
    max_per_disease: int | None = None,
) -> QuestionBank:
    """One question per record whose ``level`` labels include one of the ten diseases.

    Records with none of the ten are not questions (normal fundus, other diseases); records
    whose other diseases leave fewer than ``k - 1`` distractors are skipped and listed.
    ``max_per_disease`` keeps at most that many questions per answer disease: those whose image
    hashes lowest under ``seed`` (so the kept set does not depend on record order), in record
    order. A long-tailed test split then gives every disease a similar count, and the unweighted
    Average is not paid for with thousands of questions about the head classes.
    """
    if not 2 <= k <= len(FUNDUS_DISEASES):
        raise ValueError(f"k={k}: expected 2..{len(FUNDUS_DISEASES)} options")
    if level not in ds.card.level_names:
        raise ValueError(f"{ds.root}: level {level!r} not in the dataset card (levels: {', '.join(ds.card.level_names)})")
    records = ds.records if split is None else ds.split(split)
    ten = set(FUNDUS_DISEASES)
    questions: list[Question] = []
    skipped: list[str] = []
    for rec in records:
        labels = rec.labels.get(level, ())
        has = {c for c in (canonical_disease(lab) for lab in labels) if c is not None}
        present = sorted(has & ten, key=FUNDUS_DISEASES.index)
        if not present:
            continue
        pool = [d for d in FUNDUS_DISEASES if d not in has]
        if len(pool) < k - 1:
            skipped.append(f"{rec.image} (line {rec.line}): has {len(has)} diseases, too few left for {k - 1} distractors")
            continue
        rng = _rng(seed, rec.image)
        answer = rng.choice(present)
        options = [answer, *rng.sample(pool, k - 1)]
        rng.shuffle(options)
        questions.append(
            Question(
                qid=f"q{len(questions):06d}",
                image=rec.image,
                split=rec.split,
                answer=answer,
                options=tuple(options),
                answer_index=options.index(answer),
                image_diseases=tuple(present),
            )
        )
    if not questions:
        raise ValueError(f"{ds.root}: no record in split {split!r} has one of the ten diseases at level {level!r}")
    if max_per_disease is not None:
        if max_per_disease < 1:
            raise ValueError(f"max_per_disease={max_per_disease}: expected >= 1")
        rank = {q.qid: hashlib.sha256(f"{seed}\x01{q.image}".encode()).hexdigest() for q in questions}
        keep: set[str] = set()
        for d in FUNDUS_DISEASES:
            ids = sorted((q.qid for q in questions if q.answer == d), key=rank.get)
            keep.update(ids[:max_per_disease])
        questions = [q for q in questions if q.qid in keep]
    return QuestionBank(
        questions=questions, k=k, seed=seed, circular=circular, question=question,
        dataset=str(Path(ds.root).resolve()), split=split, level=level, skipped=skipped,
        max_per_disease=max_per_disease,
    )


def write_bank(bank: QuestionBank, path: str | os.PathLike) -> Path:
    """Header line (version, settings, per-disease counts, skipped records) then one question per line."""
    lines = [json.dumps(bank.header())]
    for q in bank.questions:
        d = asdict(q)
        d["options"] = list(q.options)
        d["image_diseases"] = list(q.image_diseases)
        lines.append(json.dumps({"type": "question", **d}))
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


_QFIELDS = ("qid", "image", "answer", "options", "answer_index")


def load_bank(path: str | os.PathLike) -> QuestionBank:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: question bank not found (write one with `mgll mcq build`)")
    with open(path, encoding="utf-8") as f:
        rows = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    if not rows:
        raise ValueError(f"{path}: empty file, expected a header line")
    parsed = []
    for i, line in rows:
        try:
            parsed.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    _, head = parsed[0]
    if head.get("type") != "header":
        raise ValueError(f"{path}:1: type: expected 'header' as the first line")
    if head.get("version") != BANK_VERSION:
        raise ValueError(f"{path}:1: version: expected {BANK_VERSION}, got {head.get('version')!r}")
    questions = []
    for i, d in parsed[1:]:
        missing = [f for f in _QFIELDS if f not in d]
        if missing:
            raise ValueError(f"{path}:{i}: {missing[0]}: missing")
        opts = tuple(d["options"])
        if not 0 <= int(d["answer_index"]) < len(opts) or opts[int(d["answer_index"])] != d["answer"]:
            raise ValueError(f"{path}:{i}: answer_index: expected the index of {d['answer']!r} in options {list(opts)}")
        questions.append(
            Question(d["qid"], d["image"], d.get("split"), d["answer"], opts, int(d["answer_index"]),
                     tuple(d.get("image_diseases", ())))
        )
    return QuestionBank(
        questions=questions, k=int(head["k"]), seed=int(head["seed"]), circular=bool(head["circular"]),
        question=head["question"], dataset=head.get("dataset", ""), split=head.get("split"),
        level=head.get("level", "disease"), skipped=list(head.get("skipped", [])), version=head["version"],
        max_per_disease=head.get("max_per_disease"),
    )
