"""``mgll mcq export --format lmms-eval``: a question bank as a task folder for ``lmms-eval --include_path``.

Why: MLLM builders evaluate with lmms-eval; a task that asks the same text, sees the same pixels
and scores with the same extraction rule lets any model lmms-eval hosts take the ten-disease
benchmark, and lets anyone check our scoring against theirs (``mgll mcq import`` reads the samples
back). The folder::

    TASK.yaml        dataset_path: json over docs.jsonl; generate_until; per-disease metrics + average
    utils.py         doc_to_visual / doc_to_text / process_results / accuracy (mgll/mllm_eval/lmms_eval_task.py)
    mgll_extract.py  mgll's answer extraction, copied verbatim (mgll/mllm_eval/extract.py)
    docs.jsonl       one doc per prompt (per rotation for a circular bank)
    images/          one image per question, named by qid (see export_common for the bytes)
    README.md        the command to run it

``data_files`` must be an absolute path (``datasets`` resolves a relative one against the working
directory, not the YAML); everything else is relative to the folder. A moved folder needs that one
line edited, or the export run again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from mgll.data.question_bank import LETTERS, format_question, load_bank
from mgll.io import atomic_path
from mgll.mllm_eval.export_common import check_out, image_payload, metric_key
from mgll.mllm_eval.extract import option_names

__all__ = ["DEFAULT_TASK", "export_lmms_eval"]

DEFAULT_TASK = "mgll_fundus_mcq"
_HERE = Path(__file__).resolve().parent


def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML double-quoted scalar


def _task_yaml(task: str, docs: Path, metrics: list[str], max_new_tokens: int, meta: dict[str, Any]) -> str:
    lines = [
        f"# lmms-eval task written by `mgll mcq export` from {meta['bank']}",
        f"# {meta['n_questions']} questions, {meta['n_docs']} prompts, k={meta['k']}"
        + (", circular: a question is right only if every rotation of its options is" if meta["circular"] else ""),
        f"task: {task}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {_yaml_str(str(docs))}",
        "test_split: test",
        "output_type: generate_until",
        "doc_to_visual: !function utils.doc_to_visual",
        "doc_to_text: !function utils.doc_to_text",
        "doc_to_target: answer",
        "generation_kwargs:",
        f"  max_new_tokens: {int(max_new_tokens)}",
        "  temperature: 0",
        "  num_beams: 1",
        "  do_sample: false",
        "process_results: !function utils.process_results",
        "metric_list:",
    ]
    for m in metrics:
        lines += [f"  - metric: {m}", "    aggregation: !function utils.accuracy", "    higher_is_better: true"]
    lines += [
        "lmms_eval_specific_kwargs:",
        "  default:",
        '    pre_prompt: ""',
        '    post_prompt: ""',
        "metadata:",
        "  version: 1",
        f"  bank_fingerprint: {_yaml_str(meta['fingerprint'])}",
        f"  circular: {'true' if meta['circular'] else 'false'}",
    ]
    return "\n".join(lines) + "\n"


def _readme(task: str, out: Path, meta: dict[str, Any]) -> str:
    return f"""# {task}: ten-disease fundus multiple-choice QA (mgll)

Written by `mgll mcq export --format lmms-eval` from `{meta['bank']}` (fingerprint `{meta['fingerprint']}`):
{meta['n_questions']} questions, {meta['n_docs']} prompts{', circular' if meta['circular'] else ''}.

    lmms-eval --include_path {out} --tasks {task} --model llava_hf \\
        --model_args pretrained=MODEL_DIR --batch_size 1 --log_samples --output_path logs
    mgll mcq import logs/*/*_samples_{task}.jsonl --bank {meta['bank']} --out runs/MODEL_lmms

Metrics (percent): `average` is the unweighted mean of the per-disease accuracies (Table 2's
Average); one metric per disease. If this folder moves, edit `data_files` in `{task}.yaml`.
"""


def export_lmms_eval(
    bank_path: str | os.PathLike, out: str | os.PathLike, data_root: str | os.PathLike | None = None,
    task: str = DEFAULT_TASK, max_new_tokens: int = 16, overwrite: bool = False,
) -> dict[str, Any]:
    """Write the task folder ``out`` (atomically; an existing non-empty one only with ``overwrite``)."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", task):
        raise ValueError(f"--task-name {task!r}: expected letters, digits and '_' (an lmms-eval task name)")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens}: expected at least 1")
    bank = load_bank(bank_path)
    out = check_out(out, overwrite).resolve()
    fingerprint = bank.fingerprint()
    names: dict[str, list[str]] = {}
    docs: list[dict[str, Any]] = []
    metrics: list[str] = []
    with atomic_path(out) as tmp:
        (tmp / "images").mkdir(parents=True)
        for q in bank.questions:
            data, ext = image_payload(bank.image_path(q, data_root))
            image = f"images/{q.qid}{ext}"
            (tmp / image).write_bytes(data)
            key = metric_key(q.answer)
            if key not in metrics:
                metrics.append(key)
            variants = q.variants(bank.circular)
            for v in variants:
                docs.append({
                    "qid": q.qid,
                    "rotation": v.rotation,
                    "n_rotations": len(variants),
                    "image": image,
                    "prompt": format_question(bank.question, v.options),
                    "options": list(v.options),
                    "option_names": [names.setdefault(o, option_names(o)) for o in v.options],
                    "answer": LETTERS[v.answer_index],
                    "answer_index": v.answer_index,
                    "disease": q.answer,
                    "metric": key,
                    "bank": fingerprint,
                })
        with open(tmp / "docs.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
        meta = {"bank": str(Path(bank_path).resolve()), "fingerprint": fingerprint, "k": bank.k,
                "circular": bank.circular, "n_questions": len(bank.questions), "n_docs": len(docs)}
        (tmp / f"{task}.yaml").write_text(
            _task_yaml(task, out / "docs.jsonl", ["average", *sorted(metrics)], max_new_tokens, meta), encoding="utf-8")
        shutil.copyfile(_HERE / "lmms_eval_task.py", tmp / "utils.py")
        shutil.copyfile(_HERE / "extract.py", tmp / "mgll_extract.py")
        (tmp / "README.md").write_text(_readme(task, out, meta), encoding="utf-8")
    return {**meta, "out": str(out), "task": task, "yaml": str(out / f"{task}.yaml"), "metrics": ["average", *sorted(metrics)]}
