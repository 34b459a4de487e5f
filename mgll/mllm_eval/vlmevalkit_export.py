"""``mgll mcq export --format vlmevalkit``: a question bank as the MCQ TSV VLMEvalKit reads from ``$LMUData``.

Why: VLMEvalKit's ``run.py --data NAME`` treats an unknown ``NAME`` whose ``$LMUData/NAME.tsv`` has
``question``, ``A``, ``B`` and ``image`` columns as a custom MCQ dataset (``CustomMCQDataset``, an
``ImageMCQDataset``); so this file is all it takes to run the benchmark on any model VLMEvalKit hosts.

Columns: ``index``, ``image`` (base64 of the bytes :func:`~mgll.mllm_eval.export_common.image_payload`
picks), ``question``, ``A``.. (one per option), ``answer`` (letter), ``category`` (the disease, so
VLMEvalKit's report has one accuracy per disease), and ``qid`` (mgll's id, checked on import).
VLMEvalKit wraps ``question`` and the options in its own MCQ prompt (or the model's custom one).

Circular banks follow MMBench's layout: question ``i`` is row ``index = i``, its rotation ``k`` is
row ``i + k * 1e6`` whose ``image`` holds ``"i"`` (VLMEvalKit resolves such short values to that
row's image). VLMEvalKit applies CircularEval, right only if every rotation is, only when the
dataset name contains ``circular`` (or MMBench/CCBench/MMCR), so a circular bank must be written
under such a name and a plain one must not: the name is checked here, not discovered later.
"""

from __future__ import annotations

import base64
import csv
import io
import os
from pathlib import Path
from typing import Any

from mgll.data.question_bank import LETTERS, load_bank
from mgll.io import atomic_write_text
from mgll.mllm_eval.export_common import check_out, image_payload

__all__ = ["CIRCULAR_OFFSET", "DEFAULT_NAME", "export_vlmevalkit", "is_circular_name"]

CIRCULAR_OFFSET = 1_000_000
DEFAULT_NAME = "MGLL_FundusMCQ"
_CIRCULAR_MARKERS = ("mmbench", "ccbench", "circular", "mmcr")  # VLMEvalKit's ImageMCQDataset.evaluate


def is_circular_name(name: str) -> bool:
    """Whether VLMEvalKit would score dataset ``name`` with CircularEval."""
    return any(m in name.lower() for m in _CIRCULAR_MARKERS)


def _tsv_path(out: Path, name: str | None, circular: bool) -> Path:
    if out.suffix == ".tsv":
        if name and name != out.stem:
            raise ValueError(f"{out}: --name {name!r} differs from the file name; VLMEvalKit's NAME is the file's stem")
        return out
    return out / f"{name or DEFAULT_NAME + ('_circular' if circular else '')}.tsv"


def export_vlmevalkit(
    bank_path: str | os.PathLike, out: str | os.PathLike, data_root: str | os.PathLike | None = None,
    name: str | None = None, overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``out`` (a ``NAME.tsv`` path, or a folder such as ``$LMUData`` to hold ``NAME.tsv``)."""
    bank = load_bank(bank_path)
    path = _tsv_path(Path(out), name, bank.circular)
    dataset = path.stem
    if bank.circular != is_circular_name(dataset):
        want = "contain" if bank.circular else "not contain"
        raise ValueError(f"{path}: the bank is {'' if bank.circular else 'not '}circular, so the dataset name must "
                         f"{want} 'circular' (VLMEvalKit chooses CircularEval by name)")
    if len(bank.questions) >= CIRCULAR_OFFSET:
        raise ValueError(f"{bank_path}: {len(bank.questions)} questions; VLMEvalKit's circular indices allow < {CIRCULAR_OFFSET}")
    check_out(path, overwrite)
    letters = list(LETTERS[: bank.k])
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(["index", "image", "question", *letters, "answer", "category", "qid"])
    n_rows = 0
    for i, q in enumerate(bank.questions):
        data, _ = image_payload(bank.image_path(q, data_root))
        for v in q.variants(bank.circular):
            image = base64.b64encode(data).decode("ascii") if v.rotation == 0 else str(i)
            opts = list(v.options) + [""] * (bank.k - len(v.options))
            w.writerow([i + v.rotation * CIRCULAR_OFFSET, image, bank.question, *opts, LETTERS[v.answer_index], q.answer, q.qid])
            n_rows += 1
    atomic_write_text(path, buf.getvalue())
    return {"tsv": str(path), "dataset": dataset, "n_questions": len(bank.questions), "n_rows": n_rows,
            "circular": bank.circular, "fingerprint": bank.fingerprint()}
