"""``mgll mcq import``: another harness's predictions on an exported bank, as an mgll run folder.

Why: ``mgll mcq compare`` renders Table 2 from run folders; reading lmms-eval's ``--log_samples``
JSONL or VLMEvalKit's prediction file back puts a model only those harnesses host in the same
table, scored by the same rule: every answer text goes through :func:`~mgll.mllm_eval.extract.extract_answer`
against the bank's options, and :func:`~mgll.mllm_eval.report.summarise` applies the per-disease,
unweighted-average and all-rotations-right rules. The folder holds ``answers.jsonl`` (the rows
``mgll mcq run --mode generate`` writes), ``run.json`` and ``results.json``/``results.md``.

Each row is matched to the bank, never assumed: lmms-eval rows by the qid/rotation (and bank
fingerprint) our task's ``process_results`` records, VLMEvalKit rows by ``index`` (question
``index % 1e6``, rotation ``index // 1e6``) with their ``qid`` and options checked, so predictions
from another bank are refused with the file and line, not silently mis-scored.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mgll.data.question_bank import LETTERS, QuestionBank, Variant, load_bank
from mgll.io import atomic_path
from mgll.mllm_eval.export_common import check_out
from mgll.mllm_eval.extract import extract_answer
from mgll.mllm_eval.vlmevalkit_export import CIRCULAR_OFFSET

__all__ = ["FORMATS", "detect_format", "read_lmms_eval", "read_vlmevalkit", "import_predictions"]

FORMATS = ("lmms-eval", "vlmevalkit")


def detect_format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        return "lmms-eval"
    if suffix in (".xlsx", ".tsv", ".csv"):
        return "vlmevalkit"
    raise ValueError(f"{path}: cannot tell the format from {suffix or 'no extension'!r}; "
                     "pass --format lmms-eval (samples .jsonl) or vlmevalkit (.xlsx/.tsv/.csv)")


def _first_text(value) -> str:
    while isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    if isinstance(value, dict):
        value = value.get("text", "")
    return "" if value is None else str(value)


def read_lmms_eval(path: Path, bank: QuestionBank) -> Iterator[tuple[str, int, str, str]]:
    """``(qid, rotation, answer text, where)`` per line of an lmms-eval ``*_samples_TASK.jsonl``."""
    fingerprint = bank.fingerprint()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                sample = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(sample, dict):
                raise ValueError(f"{where}: expected a JSON object per line")
            # our process_results record (logged under each metric), or the doc older lmms-eval logs
            ident = next((v for v in sample.values() if isinstance(v, dict) and "qid" in v and "rotation" in v), None)
            ident = ident or sample.get("doc")
            if not isinstance(ident, dict) or "qid" not in ident:
                raise ValueError(f"{where}: qid: missing; not a samples file of a task written by `mgll mcq export`")
            if ident.get("bank", fingerprint) != fingerprint:
                raise ValueError(f"{where}: bank: fingerprint {ident['bank']} but {bank.dataset or 'this bank'} has "
                                 f"{fingerprint}; import against the bank the task was exported from")
            if "filtered_resps" in sample:
                text = sample["filtered_resps"]
            elif "resps" in sample:
                text = sample["resps"]
            else:
                raise ValueError(f"{where}: filtered_resps: missing; run lmms-eval with --log_samples")
            yield str(ident["qid"]), int(ident["rotation"]), _first_text(text), where


def _table_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix == ".xlsx":
        try:
            import openpyxl
        except ImportError:
            raise ValueError(f"{path}: reading .xlsx needs openpyxl (pip install openpyxl, or save it as .tsv)") from None
        try:
            wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
        except Exception as e:  # zipfile.BadZipFile, KeyError, ...: a file that is not a workbook
            raise ValueError(f"{path}: not a readable .xlsx ({e.__class__.__name__}: {e})") from None
        rows = wb.worksheets[0].iter_rows(values_only=True)
        header = [str(h) if h is not None else "" for h in next(rows, ())]
        for n, row in enumerate(rows, 2):
            yield n, dict(zip(header, row))
        wb.close()
        return
    csv.field_size_limit(1 << 30)  # a TSV with base64 images in it has huge cells
    with open(path, encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","), 2):
            yield n, row


def read_vlmevalkit(path: Path, bank: QuestionBank) -> Iterator[tuple[str, int, str, str]]:
    """``(qid, rotation, prediction, where)`` per row of a VLMEvalKit ``MODEL_NAME.xlsx``/``.tsv`` prediction file."""
    seen_header = False
    for n, row in _table_rows(path):
        where = f"{path}:{n}"
        if not seen_header:
            for col in ("index", "prediction"):
                if col not in row:
                    raise ValueError(f"{path}: column {col!r} missing; expected VLMEvalKit's prediction file "
                                     "(MODEL_NAME.xlsx, with index and prediction)")
            seen_header = True
        try:
            index = int(float(row["index"]))
        except (TypeError, ValueError):
            raise ValueError(f"{where}: index: {row['index']!r} is not an integer") from None
        i, rotation = index % CIRCULAR_OFFSET, index // CIRCULAR_OFFSET
        if i >= len(bank.questions):
            raise ValueError(f"{where}: index {index}: the bank has {len(bank.questions)} questions; "
                             "import against the bank the TSV was exported from")
        q = bank.questions[i]
        if row.get("qid") not in (None, "") and str(row["qid"]) != q.qid:
            raise ValueError(f"{where}: qid: {row['qid']!r} but the bank's question {i} is {q.qid!r}; "
                             "import against the bank the TSV was exported from")
        variants = q.variants(bank.circular)
        if rotation >= len(variants):
            raise ValueError(f"{where}: index {index}: rotation {rotation} but the bank has {len(variants)} per question")
        opts = [row.get(c) for c in LETTERS[: len(variants[rotation].options)]]
        if all(o is not None for o in opts) and [str(o) for o in opts] != list(variants[rotation].options):
            raise ValueError(f"{where}: options {opts} differ from the bank's {list(variants[rotation].options)}; "
                             "import against the bank the TSV was exported from")
        yield q.qid, rotation, _first_text(row["prediction"]), where


def _score(v: Variant, text: str) -> dict[str, Any]:
    ext = extract_answer(text, v.options)
    return {"qid": v.qid, "rotation": v.rotation, "answer_index": v.answer_index, "pred_index": ext.index,
            "text": text, "method": ext.method, "correct": ext.index == v.answer_index}


def import_predictions(
    pred: str | os.PathLike, bank_path: str | os.PathLike, out: str | os.PathLike, fmt: str = "auto",
    label: str | None = None, overwrite: bool = False,
) -> dict[str, Any]:
    """Score ``pred`` against the bank and write the run folder ``out``; returns its ``results.json``."""
    from mgll.mllm_eval.report import summarise, write_results

    pred = Path(pred)
    if not pred.is_file():
        raise FileNotFoundError(f"{pred}: prediction file not found")
    fmt = detect_format(pred) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: expected auto, {', '.join(FORMATS)}")
    bank = load_bank(bank_path)
    out = check_out(out, overwrite)
    variants = {(v.qid, v.rotation): v for q in bank.questions for v in q.variants(bank.circular)}
    reader = read_lmms_eval if fmt == "lmms-eval" else read_vlmevalkit
    answers: dict[tuple[str, int], dict] = {}
    where_of: dict[tuple[str, int], str] = {}
    for qid, rotation, text, where in reader(pred, bank):
        key = (qid, rotation)
        if key not in variants:
            raise ValueError(f"{where}: qid {qid} rotation {rotation} is not in {bank_path}; "
                             "import against the bank the task was exported from")
        row = _score(variants[key], text)
        if key in answers and answers[key]["text"] != text:
            raise ValueError(f"{where}: qid {qid} rotation {rotation} already answered differently at {where_of[key]} "
                             "(two runs appended to one file?)")
        answers[key], where_of[key] = row, where
    if not answers:
        raise ValueError(f"{pred}: no predictions in the file")
    if bank.circular and fmt == "vlmevalkit" and all(r == 0 for _, r in answers):
        raise ValueError(f"{pred}: only rotation 0 rows, but the bank is circular; import VLMEvalKit's prediction file "
                         "(MODEL_NAME.xlsx), not its *_result file, which keeps one row per question")
    spec = {"host": fmt, "mode": "generate", "source": str(pred.resolve()), "bank": str(Path(bank_path).resolve()),
            "bank_fingerprint": bank.fingerprint(), "circular": bank.circular}
    result = summarise(bank, answers, label=label or out.name)
    result.update(run={**spec, "imported": len(answers)}, skipped_images=[])
    order = [(v.qid, v.rotation) for q in bank.questions for v in q.variants(bank.circular)]
    with atomic_path(out) as tmp:
        tmp.mkdir()
        with open(tmp / "answers.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(answers[k]) + "\n" for k in order if k in answers)
        (tmp / "run.json").write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
        write_results(tmp, result)
    return result
