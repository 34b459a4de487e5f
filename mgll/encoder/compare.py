"""``mgll compare RUN...``: several encoders' evaluations side by side, as a table and a bar chart.

Runs are evaluation folders (or their ``metrics.json``) from ``mgll probe`` / ``finetune`` /
``zeroshot``. Evaluations are matched by name (``fraction 1``, ``fraction 0.1`` ...); only names
present in every run are compared, and runs must score the same classes, otherwise the columns
would not mean the same thing. The Δ columns are plain differences of point estimates against the
first run; whether a gap is real is for the CIs beside them to say.

The figure is drawn on an explicit Agg canvas rather than through pyplot, so importing this module
never changes a user's matplotlib backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mgll.encoder.reports import evaluations, fmt, fmt_ci, markdown_table, read_metrics
from mgll.io import atomic_path, atomic_write_json, atomic_write_text

__all__ = ["compare_runs", "comparison_markdown", "plot_comparison"]

MACRO = "macro AUC"


def _labels(runs: Sequence[Path], reports: list[dict], labels: Sequence[str] | None) -> list[str]:
    if labels is not None:
        if len(labels) != len(runs):
            raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
        out = [str(x) for x in labels]
    else:
        out = [str(rep.get("label") or (r.parent.name if r.name == "metrics.json" else r.name)) for r, rep in zip(runs, reports)]
    seen: dict[str, int] = {}
    for i, lab in enumerate(out):  # two runs of the same encoder still need distinct columns
        seen[lab] = seen.get(lab, 0) + 1
        if seen[lab] > 1:
            out[i] = f"{lab} ({runs[i]})"
    return out


def _common_evals(runs: Sequence[Path], all_evals: list[dict[str, dict]]) -> list[str]:
    names = [k for k in all_evals[0] if all(k in ev for ev in all_evals[1:])]
    if not names and all(len(ev) == 1 for ev in all_evals):
        return ["*"]  # one evaluation each, named differently (e.g. a probe vs a zero-shot run)
    if not names:
        raise ValueError(
            "the runs share no evaluation name: " + "; ".join(f"{r}: {sorted(ev)}" for r, ev in zip(runs, all_evals))
        )
    return names


def _pick(ev: dict[str, dict], name: str) -> dict:
    return next(iter(ev.values())) if name == "*" else ev[name]


def build_comparison(runs: Sequence[str | Path], labels: Sequence[str] | None = None) -> dict:
    if not runs:
        raise ValueError("compare needs at least one run")
    paths = [Path(r) for r in runs]
    reports = [read_metrics(p) for p in paths]
    all_evals = []
    for p, rep in zip(paths, reports):
        try:
            all_evals.append(evaluations(rep))
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None
    names = _common_evals(paths, all_evals)
    labs = _labels(paths, reports, labels)
    out: dict[str, Any] = {"runs": [str(p) for p in paths], "labels": labs, "evaluations": {}}
    for name in names:
        evs = [_pick(ev, name) for ev in all_evals]
        classes = list(evs[0]["per_class"])
        for p, ev in zip(paths[1:], evs[1:]):
            if set(ev["per_class"]) != set(classes):
                diff = sorted(set(ev["per_class"]) ^ set(classes))
                raise ValueError(f"{p}: scores different classes from {paths[0]} (differing: {diff}); compare needs the same task")
        rows: dict[str, list[dict]] = {MACRO: [], "accuracy": [], "mAP": []}
        for ev in evs:
            ci = ev.get("ci") or {}
            rows[MACRO].append({"value": ev.get("macro_auc"), "ci": ci.get("macro_auc"), "excluded": ev.get("macro_auc_excluded", [])})
            rows["accuracy"].append({"value": ev.get("accuracy"), "ci": ci.get("accuracy")})
            rows["mAP"].append({"value": ev.get("map"), "ci": ci.get("map")})
        per_class: dict[str, list[dict]] = {}
        for c in classes:
            per_class[c] = [
                {
                    "value": ev["per_class"][c]["auc"],
                    "ci": (ev["per_class"][c].get("ci") or {}).get("auc"),
                    "undefined": ev["per_class"][c].get("undefined"),
                    "n_pos": ev["per_class"][c].get("n_pos"),
                }
                for ev in evs
            ]
        out["evaluations"][name if name != "*" else "evaluation"] = {
            "n": [ev.get("n") for ev in evs],
            "summary": rows,
            "per_class_auc": per_class,
        }
    return out


def _delta(cells: list[dict]) -> list[str]:
    base = cells[0]["value"]
    return [fmt(c["value"] - base) if c["value"] is not None and base is not None else "n/a" for c in cells[1:]]


def comparison_markdown(cmp: dict, title: str = "Encoder comparison") -> str:
    labs = cmp["labels"]
    deltas = [f"Δ {lab} − {labs[0]}" for lab in labs[1:]]
    lines = [f"# {title}", ""]
    for i, (lab, run) in enumerate(zip(labs, cmp["runs"])):
        lines.append(f"- run {i + 1}: **{lab}** (`{run}`)")
    lines.append("- values are point estimates with bootstrap 95% CIs; Δ is a plain difference against the first run\n")
    for name, ev in cmp["evaluations"].items():
        lines.append(f"## {name} (n test: {', '.join(str(x) for x in ev['n'])})\n")
        rows = []
        for metric, cells in ev["summary"].items():
            rows.append([f"**{metric}**"] + [fmt_ci(c["value"], c["ci"]) for c in cells] + _delta(cells))
        for cls, cells in ev["per_class_auc"].items():
            vals = [fmt_ci(c["value"], c["ci"]) if c["value"] is not None else "undefined" for c in cells]
            rows.append([f"{cls} (n_pos {cells[0]['n_pos']})"] + vals + _delta(cells))
        lines.append(markdown_table(["metric / class AUC", *labs, *deltas], rows))
        excluded = {tuple(c.get("excluded") or []) for c in ev["summary"][MACRO]}
        notes = [f"{lab}: macro AUC excludes {', '.join(c['excluded'])}" for lab, c in zip(labs, ev["summary"][MACRO]) if c.get("excluded")]
        if notes:
            lines.append("Undefined AUC (single label value in the test split): " + "; ".join(notes) + "\n")
        if len(excluded) > 1:
            lines.append("> warning: the runs' macro AUCs average over different class sets\n")
    return "\n".join(lines)


def plot_comparison(cmp: dict, path: str | Path, title: str = "Encoder comparison") -> Path:
    """Grouped bars (macro AUC, then per-class AUC) with CI error bars, one panel per evaluation."""
    labs = cmp["labels"]
    evs = cmp["evaluations"]
    n_cats = max(1 + len(ev["per_class_auc"]) for ev in evs.values())
    fig = Figure(figsize=(max(6.0, 0.55 * n_cats * max(1, len(labs)) + 2), 3.6 * len(evs)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(evs), 1, squeeze=False)[:, 0]
    width = 0.8 / max(1, len(labs))
    for ax, (name, ev) in zip(axes, evs.items()):
        cats = [MACRO] + list(ev["per_class_auc"])
        cells_by_cat = [ev["summary"][MACRO]] + [ev["per_class_auc"][c] for c in cats[1:]]
        x = np.arange(len(cats))
        for j, lab in enumerate(labs):
            vals = np.array([np.nan if cells[j]["value"] is None else cells[j]["value"] for cells in cells_by_cat])
            lo = np.array([v - c[j]["ci"][0] if c[j]["ci"] else 0.0 for v, c in zip(vals, cells_by_cat)])
            hi = np.array([c[j]["ci"][1] - v if c[j]["ci"] else 0.0 for v, c in zip(vals, cells_by_cat)])
            pos = x - 0.4 + width * (j + 0.5)
            ax.bar(pos, vals, width, label=lab, yerr=np.clip(np.nan_to_num(np.stack([lo, hi])), 0, None), capsize=2)
            for p, v in zip(pos, vals):
                if np.isnan(v):
                    ax.text(p, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=7)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xticks(x, [c if len(c) <= 22 else c[:20] + "…" for c in cats], rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("AUC (95% CI)")
        ax.set_title(f"{title}: {name}", fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return Path(path)


def compare_runs(
    runs: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None, title: str = "Encoder comparison"
) -> dict:
    """Write ``metrics.json`` (the comparison), ``metrics.md`` (the table) and ``compare.png`` into ``out``."""
    cmp = build_comparison(runs, labels)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = comparison_markdown(cmp, title)
    png = plot_comparison(cmp, out / "compare.png", title)
    json_path = atomic_write_json(out / "metrics.json", {"command": "compare", **cmp})
    md_path = atomic_write_text(out / "metrics.md", md)
    return {"json": json_path, "md": md_path, "png": png, "markdown": md, "comparison": cmp}
