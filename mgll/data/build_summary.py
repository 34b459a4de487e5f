"""What a build produced, in three forms: summary.json (machines), summary.md (people), a bar chart (eyes)."""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mgll.io import atomic_write_bytes, atomic_write_json, atomic_write_text

from .records import DatasetCard, Record

__all__ = ["summarize", "write_summary", "summary_markdown", "plot_label_frequencies"]

TOP_K_PLOT = 25  # labels per level in the chart; the JSON and table keep all of them


def summarize(
    card: DatasetCard,
    records: Sequence[Record],
    rejected: Mapping[str, int] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict:
    levels: dict[str, dict[str, int]] = {}
    for lv in card.level_names:
        c = Counter(lab for r in records for lab in r.labels.get(lv, ()))
        levels[lv] = dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))
    splits = Counter(r.split or "" for r in records)
    summary: dict[str, Any] = {
        "dataset": card.name,
        "records": len(records),
        "patients": len({r.patient for r in records if r.patient}),
        "splits": dict(sorted(splits.items())),
        "levels": levels,
        "rejected": dict(sorted((rejected or {}).items())),
        "rejected_total": int(sum((rejected or {}).values())),
    }
    summary.update(dict(extra or {}))
    return summary


def summary_markdown(summary: Mapping[str, Any]) -> str:
    lines = [f"# Build summary: {summary['dataset']}", ""]
    lines += [
        f"- records: {summary['records']}",
        f"- patients: {summary['patients']}",
        "- splits: " + (", ".join(f"{k or 'none'}={v}" for k, v in summary["splits"].items()) or "none"),
        f"- rejected: {summary['rejected_total']}",
    ]
    for k, v in summary.items():
        if k in {"dataset", "records", "patients", "splits", "levels", "rejected", "rejected_total"}:
            continue
        lines.append(f"- {k}: {v}")
    lines += ["", "## Labels per level", "", "| level | label | images |", "|---|---|---:|"]
    for lv, counts in summary["levels"].items():
        for lab, n in counts.items():
            lines.append(f"| {lv} | {lab.replace('|', '/')} | {n} |")
    lines += ["", "## Rejected files by reason", ""]
    if summary["rejected"]:
        lines += ["| reason | files |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in summary["rejected"].items()]
    else:
        lines.append("none")
    return "\n".join(lines) + "\n"


def plot_label_frequencies(summary: Mapping[str, Any], top_k: int = TOP_K_PLOT) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [(lv, list(c.items())[:top_k]) for lv, c in summary["levels"].items()]
    heights = [max(1.5, 0.28 * max(1, len(items)) + 0.8) for _, items in levels]
    fig, axes = plt.subplots(len(levels), 1, figsize=(9, sum(heights)), gridspec_kw={"height_ratios": heights})
    axes = [axes] if len(levels) == 1 else list(axes)
    for ax, (lv, items) in zip(axes, levels):
        names = [n if len(n) <= 60 else n[:57] + "..." for n, _ in items][::-1]
        ax.barh(range(len(items)), [v for _, v in items][::-1], color="#4477aa")
        ax.set_yticks(range(len(items)), names, fontsize=8)
        ax.set_title(f"{lv} (top {len(items)} of {len(summary['levels'][lv])} labels)", fontsize=10)
        ax.set_xlabel("images")
    fig.suptitle(f"{summary['dataset']}: label frequencies ({summary['records']} images)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_summary(out: Path | str, summary: Mapping[str, Any]) -> None:
    out = Path(out)
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", summary_markdown(summary))
    atomic_write_bytes(out / "label_frequencies.png", plot_label_frequencies(summary))
