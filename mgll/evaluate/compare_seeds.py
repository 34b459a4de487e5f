"""``mgll compare --runs A1 A2 A3 --vs B1 B2 B3``: two training recipes, several seeds each.

Runs pair by position (A_i with B_i: same seed, same test images). Per arm: mean ± sd over seeds
(sample sd, k − 1). Per seed pair: the paired bootstrap Δ of :mod:`mgll.evaluate.paired`.

Mean Δ and its 95% CI: a Student-t interval over the k per-seed Δs (df k − 1). Why not a
bootstrap over seeds and images jointly: with k = 3 seeds a resample of seeds takes only 10
distinct values, so its percentile interval is too narrow and jumpy exactly when seeds are few;
the t-interval is exact for normally distributed seed Δs and widens honestly (t = 4.30 at k = 3).
It answers "does the recipe beat the other across training seeds, on this test set". The
test-image sampling that every seed shares is reported beside it as the ``image CI``: the paired
image bootstrap of the *mean* Δ (every run scored on the same resamples, so it comes free with
the per-seed CIs). The ``*`` mark and :func:`~mgll.evaluate.compare.compare_verdict` use the
t-interval; a claim that should also hold for other test images wants both to exclude zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mgll.evaluate.compare import MACRO, _common_evals, build_comparison, plot_comparison, shared_resamples
from mgll.evaluate.metrics import percentile_ci
from mgll.evaluate.paired import SUMMARY, delta_stat, t_interval
from mgll.evaluate.reports import evaluations, fmt, markdown_table, read_metrics
from mgll.io import atomic_write_json, atomic_write_text
from mgll.verdict import fmt_delta_ci, verdict

__all__ = ["build_seed_comparison", "seed_comparison_markdown", "compare_seeds"]


def _arm(values: list[float | None]) -> dict:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    return {
        "mean": float(v.mean()) if v.size else None,
        "sd": float(v.std(ddof=1)) if v.size >= 2 else None,
        "k": int(v.size),
        "values": values,
    }


def build_seed_comparison(
    runs_a: Sequence[str | Path], runs_b: Sequence[str | Path], labels: Sequence[str] | None = None,
    bootstrap: int | None = None, seed: int | None = None,
) -> dict:
    """The seeds comparison dict (``form: "seeds"``) written to ``metrics.json``."""
    if not runs_a or len(runs_a) != len(runs_b):
        raise ValueError(f"--runs and --vs need the same number of runs (one B per A, same seed), got {len(runs_a)} and {len(runs_b)}")
    k = len(runs_a)
    labs = [str(x) for x in labels] if labels else ["A", "B"]
    if len(labs) != 2:
        raise ValueError(f"the seeds form takes two labels (one per arm), got {len(labs)}")
    paths = [Path(r) for r in (*runs_a, *runs_b)]
    run_labels = [f"{labs[0]} {i + 1}" for i in range(k)] + [f"{labs[1]} {i + 1}" for i in range(k)]
    base = build_comparison(paths, run_labels, paired=False)  # per-run cells, and the same-task checks
    reports = [read_metrics(p) for p in paths]
    names = _common_evals(paths, [evaluations(r) for r in reports])
    loaded, pairs_note = shared_resamples(paths, reports, names, bootstrap, seed)
    out: dict[str, Any] = {"form": "seeds", "runs_a": [str(p) for p in paths[:k]], "runs_b": [str(p) for p in paths[k:]],
                           "labels": labs, "k": k, "evaluations": {}}
    for name, ev in base["evaluations"].items():
        sc = loaded.get(name)  # (points (2k, M), replicates (B, 2k, M), n, bootstrap, seed) or None
        cells = [*ev["summary"].items(), *ev["per_class_auc"].items()]
        rows: dict[str, dict] = {"summary": {}, "per_class_auc": {}}
        for m, (metric, cs) in enumerate(cells):
            vals = [c["value"] for c in cs]
            row: dict[str, Any] = {"a": _arm(vals[:k]), "b": _arm(vals[k:])}
            if sc is not None:
                points, reps, n, b, s = sc
                d = points[k:, m] - points[:k, m]
                r = reps[:, k:, m] - reps[:, :k, m]  # (B, k): replicate b used the same images for every run
                row["per_seed"] = [delta_stat(d[i], r[:, i], n, b, s) for i in range(k)]
                ci = percentile_ci(r.mean(1)) if r.size else None
                row["image_ci"] = {"lo": ci[0] if ci else None, "hi": ci[1] if ci else None, "bootstrap": b, "seed": s, "n": n}
            else:
                d = [None if x is None or y is None else y - x for x, y in zip(vals[:k], vals[k:])]
                row["per_seed"] = [{"delta": x, "lo": None, "hi": None} for x in d]
            row["mean_delta"] = t_interval([p["delta"] for p in row["per_seed"]])
            rows["summary" if m < len(SUMMARY) else "per_class_auc"][metric] = row
        out["evaluations"][name] = {"n": ev["n"], **rows, "paired_note": pairs_note}
    return out


def _mean_sd(arm: dict) -> str:
    if arm["mean"] is None:
        return "n/a"
    return fmt(arm["mean"]) + (f" ± {fmt(arm['sd'])}" if arm["sd"] is not None else "")


def _image_ci(row: dict) -> str:
    ci = row.get("image_ci")
    if not ci or ci["lo"] is None:
        return "n/a"
    return fmt_delta_ci({"delta": row["mean_delta"]["delta"], "lo": ci["lo"], "hi": ci["hi"]})


def seed_comparison_markdown(cmp: dict, title: str = "Encoder comparison") -> str:
    a, b = cmp["labels"]
    k = cmp["k"]
    lines = [f"# {title}", ""]
    for lab, runs in ((a, cmp["runs_a"]), (b, cmp["runs_b"])):
        lines.append(f"- **{lab}**: {len(runs)} runs: " + ", ".join(f"`{r}`" for r in runs))
    lines += [
        f"- runs pair by position ({a} i with {b} i); arms are mean ± sd over the {k} seeds",
        f"- Δ seed i: {b} i − {a} i with its paired bootstrap 95% CI over the same test images",
        f"- mean Δ: Student-t 95% interval over the {k} seed Δs (df {k - 1}); image CI: paired bootstrap of the mean Δ "
        "over test images (seeds held fixed); * = that CI excludes 0",
        "",
    ]
    head = ["metric / class AUC", f"{a} (mean ± sd)", f"{b} (mean ± sd)", *(f"Δ seed {i + 1}" for i in range(k)),
            "mean Δ [95% t-CI]", "mean Δ [95% image CI]"]
    for name, ev in cmp["evaluations"].items():
        lines.append(f"## {name} (n test: {', '.join(str(x) for x in sorted(set(ev['n']), key=str))})\n")
        if ev.get("paired_note"):
            lines.append(f"> note: {ev['paired_note']}\n")
        table = []
        for key in ("summary", "per_class_auc"):
            for metric, row in ev[key].items():
                label = f"**{metric}**" if key == "summary" else metric
                table.append([label, _mean_sd(row["a"]), _mean_sd(row["b"]), *(fmt_delta_ci(p) for p in row["per_seed"]),
                              fmt_delta_ci(row["mean_delta"]), _image_ci(row)])
        lines.append(markdown_table(head, table))
        lines += [f"- macro AUC, mean over seeds: {verdict(ev['summary'][MACRO]['mean_delta'], a, b)}", ""]
    return "\n".join(lines)


def _plot_view(cmp: dict) -> dict:
    """The seeds comparison as plot_comparison's input: one bar per arm at its mean, ±1 sd whiskers."""
    def cell(arm: dict) -> dict:
        m, sd = arm["mean"], arm["sd"] or 0.0
        return {"value": m, "ci": None if m is None else [m - sd, m + sd]}

    evs = {}
    for name, ev in cmp["evaluations"].items():
        evs[name] = {
            "summary": {MACRO: [cell(ev["summary"][MACRO]["a"]), cell(ev["summary"][MACRO]["b"])]},
            "per_class_auc": {c: [cell(r["a"]), cell(r["b"])] for c, r in ev["per_class_auc"].items()},
        }
    return {"labels": cmp["labels"], "evaluations": evs}


def compare_seeds(
    runs_a: Sequence[str | Path], runs_b: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None,
    title: str = "Encoder comparison", bootstrap: int | None = None, seed: int | None = None,
) -> dict:
    """Write ``metrics.json``, ``metrics.md`` and ``compare.png`` (arm means ± sd) into ``out``."""
    cmp = build_seed_comparison(runs_a, runs_b, labels, bootstrap, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = seed_comparison_markdown(cmp, title)
    png = plot_comparison(_plot_view(cmp), out / "compare.png", title, ylabel="AUC (mean ± sd over seeds)")
    json_path = atomic_write_json(out / "metrics.json", {"command": "compare", **cmp})
    md_path = atomic_write_text(out / "metrics.md", md)
    return {"json": json_path, "md": md_path, "png": png, "markdown": md, "comparison": cmp}
