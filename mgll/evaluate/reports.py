"""metrics.json plus a readable metrics.md for every evaluation command.

A report is either one evaluation (the dict :func:`mgll.evaluate.metrics.evaluate_scores` returns,
optionally with extra keys such as ``encoder``) or a run summary holding several evaluations under
``results`` (name -> evaluation, e.g. one per training fraction). Both render the same way: a
summary row per evaluation, then a per-class table where undefined values say why.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mgll.io import atomic_write_json, atomic_write_text

__all__ = [
    "evaluations",
    "fmt",
    "fmt_ci",
    "markdown_table",
    "metrics_markdown",
    "read_metrics",
    "write_report",
]

METRICS_JSON = "metrics.json"
METRICS_MD = "metrics.md"


def fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def fmt_ci(value: float | None, ci: Sequence[float] | None, digits: int = 3) -> str:
    """``0.853 [0.812, 0.891]``, or just the value when there is no interval."""
    if value is None:
        return "n/a"
    if not ci:
        return fmt(value, digits)
    return f"{fmt(value, digits)} [{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]"


def _cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; numbers in ``rows`` are printed with :func:`fmt`."""
    out = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"markdown_table: row has {len(row)} cells, header has {len(headers)}: {row!r}")
        out.append("| " + " | ".join(_cell(fmt(v)) for v in row) + " |")
    return "\n".join(out) + "\n"


def evaluations(metrics: dict) -> dict[str, dict]:
    """The evaluations inside a report: ``results`` if present, else the report itself (name '')."""
    if "results" in metrics:
        return dict(metrics["results"])
    if "per_class" in metrics:
        return {"": metrics}
    raise ValueError("not a metrics report: expected 'results' or 'per_class' keys")


def _summary_rows(evals: dict[str, dict]) -> list[list[Any]]:
    rows = []
    for name, m in evals.items():
        ci = m.get("ci") or {}
        excluded = m.get("macro_auc_excluded") or []
        rows.append(
            [
                name or "-",
                m.get("n"),
                fmt_ci(m.get("macro_auc"), ci.get("macro_auc")),
                f"{m.get('macro_auc_classes', len(m.get('per_class', {})))}/{len(m.get('per_class', {}))}"
                + (f" (excluded: {', '.join(excluded)})" if excluded else ""),
                fmt_ci(m.get("accuracy"), ci.get("accuracy")),
                fmt_ci(m.get("map"), ci.get("map")),
                (m.get("train") or {}).get("n_images", "-"),
            ]
        )
    return rows


def metrics_markdown(metrics: dict, title: str) -> str:
    evals = evaluations(metrics)
    lines = [f"# {title}", ""]
    for key in ("encoder", "dataset", "split", "head"):
        if metrics.get(key) is not None:
            lines.append(f"- {key}: `{metrics[key]}`")
    task = metrics.get("task")
    if isinstance(task, dict):
        lines.append(f"- task: level `{task.get('level')}`, {task.get('kind')}, {len(task.get('classes', []))} classes")
    first = next(iter(evals.values()))
    if first.get("bootstrap", {}).get("n"):
        b = first["bootstrap"]
        lines.append(f"- 95% CIs: bootstrap over test images, {b['n']} replicates, seed {b['seed']}")
    if first.get("kind") == "multilabel":
        lines.append("- accuracy: exact match over all labels at threshold 0.5")
    lines += ["", markdown_table(["eval", "n test", "macro AUC [95% CI]", "AUC classes", "accuracy", "mAP", "n train"], _summary_rows(evals))]
    for w in metrics.get("warnings") or []:
        lines.append(f"> warning: {w}\n")
    for name, m in evals.items():
        lines.append(f"## per class{f' ({name})' if name else ''}\n")
        rows = []
        for cls, pc in m["per_class"].items():
            ci = pc.get("ci") or {}
            auc = fmt_ci(pc["auc"], ci.get("auc")) if pc["auc"] is not None else f"undefined: {pc['undefined']}"
            rows.append([cls, pc["n_pos"], pc["n"], auc, fmt_ci(pc["ap"], ci.get("ap"))])
        lines.append(markdown_table(["class", "n_pos", "n", "AUC [95% CI]", "AP [95% CI]"], rows))
        if m.get("undefined"):
            excl = ", ".join(f"{u['class']} ({u['reason']})" for u in m["undefined"])
            lines.append(f"AUC undefined for {len(m['undefined'])} class(es), excluded from the macro AUC: {excl}\n")
    return "\n".join(lines)


def write_report(out_dir: str | Path, metrics: dict, title: str) -> tuple[Path, Path]:
    """Write ``metrics.json`` and ``metrics.md`` into ``out_dir`` (each atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = metrics_markdown(metrics, title)  # render first: a malformed dict must not leave a json behind
    json_path = atomic_write_json(out / METRICS_JSON, metrics)
    md_path = atomic_write_text(out / METRICS_MD, md)
    return json_path, md_path


def read_metrics(path: str | Path) -> dict:
    """A report from a run folder or a metrics.json path, with a clear error when it is missing."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_JSON
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no {METRICS_JSON} (expected an evaluation run folder)")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: invalid JSON ({e})") from None
