"""The ``utils.py`` of a task folder written by ``mgll mcq export --format lmms-eval``.

This file is copied into the folder as it is. lmms-eval loads it by path for each ``!function
utils.NAME`` of the task YAML, in an environment that need not have mgll: it imports only the
standard library and PIL, reads images relative to its own folder (so the folder can move), and
scores answers with ``mgll_extract.py`` beside it, a verbatim copy of
:mod:`mgll.mllm_eval.extract` (each doc carries its options' vocabulary names), so an answer counts
here exactly when it counts in ``mgll mcq run --mode generate``.

One doc is one prompt: a question, or one rotation of its options for a circular bank. Every doc
reports the same record to ``average`` and to its disease's metric; :func:`accuracy` groups the
records by question (right only if every rotation is right), then by disease, and returns the
unweighted mean over diseases, so ``average`` is Table 2's Average and a disease metric is that
disease's accuracy. Percent, like ``mgll mcq compare``.
"""

from __future__ import annotations

import importlib.util
import sys
from collections import defaultdict
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
AVERAGE = "average"


def _load_extract():
    """``mgll_extract.py`` in an exported folder; ``extract.py`` when this file is read inside mgll."""
    for name in ("mgll_extract.py", "extract.py"):
        path = HERE / name
        if path.is_file():
            mod_name = f"_mgll_extract_{abs(hash(str(path)))}"
            if mod_name in sys.modules:
                return sys.modules[mod_name]
            spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module  # dataclasses look their module up while the class is built
            spec.loader.exec_module(module)
            return module
    raise FileNotFoundError(f"{HERE}: mgll_extract.py is missing; export the task again with `mgll mcq export`")


_extract = _load_extract()


def doc_to_visual(doc):
    """The question's image, RGB, read from the task folder."""
    with Image.open(HERE / doc["image"]) as im:
        return [im.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The text ``mgll mcq run`` asks (question, lettered options, instruction), with the optional
    ``pre_prompt`` / ``post_prompt`` lmms-eval lets a model config add (empty by default)."""
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['prompt']}{kw.get('post_prompt', '')}"


def _text(result) -> str:
    while isinstance(result, (list, tuple)):
        result = result[0] if result else ""
    if isinstance(result, dict):  # a serialised generation result
        result = result.get("text", "")
    return "" if result is None else str(result)


def process_results(doc, results):
    """Read the option off the answer with mgll's cascade; report one record to ``average`` and the disease."""
    text = _text(results)
    ext = _extract.extract_answer(text, doc["options"], names=doc["option_names"])
    record = {
        "qid": doc["qid"],
        "rotation": doc["rotation"],
        "n_rotations": doc["n_rotations"],
        "disease": doc["disease"],
        "answer_index": doc["answer_index"],
        "pred_index": ext.index,
        "method": ext.method,
        "correct": ext.index == doc["answer_index"],
        "bank": doc["bank"],
    }
    return {AVERAGE: record, doc["metric"]: record}


def accuracy(items):
    """Unweighted mean over diseases of per-disease accuracy (%); a question counts only when all its
    rotations were answered (``--limit`` can cut some) and is right only when every one is right."""
    by_q = defaultdict(dict)
    for r in items:
        by_q[r["qid"]][r["rotation"]] = r
    per = defaultdict(lambda: [0, 0])  # disease -> [right, questions]
    for rows in by_q.values():
        first = next(iter(rows.values()))
        if len(rows) < first["n_rotations"]:
            continue
        per[first["disease"]][0] += all(r["correct"] for r in rows.values())
        per[first["disease"]][1] += 1
    accs = [100.0 * right / n for right, n in per.values() if n]
    return sum(accs) / len(accs) if accs else float("nan")
