"""``mgll compare RUN...``: several encoders' evaluations side by side, as a table and a bar chart.

Runs are evaluation folders (or their ``metrics.json``) from ``mgll probe`` / ``finetune`` /
``zeroshot``. Evaluations are matched by name (``fraction 1``, ``fraction 0.1`` ...); only names
present in every run are compared, and runs must score the same classes, otherwise the columns
would not mean the same thing.

The Δ columns are differences against the first run. When every run saved its per-image scores
(``scores.npz``, written by ``mgll probe``) they carry a *paired* bootstrap 95% CI
(:mod:`mgll.evaluate.paired`): the runs were scored on the same test images, so the images are
resampled once for all of them, which cancels the test-split luck they share; side-by-side
per-run CIs overstate the uncertainty of a difference. Runs on different test images are refused
(a paired Δ over different images means nothing). Without scores (zero-shot / fine-tune reports,
older probes) Δ is the plain difference of point estimates, and the report says so.

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

from mgll.evaluate.metrics import as_matrices
from mgll.evaluate.paired import SUMMARY, delta_stat, score_runs
from mgll.evaluate.reports import evaluations, fmt, fmt_ci, markdown_table, read_metrics
from mgll.evaluate.scores import align, read_scores
from mgll.evaluate.tasks import Task
from mgll.io import atomic_path, atomic_write_json, atomic_write_text
from mgll.verdict import fmt_delta_ci, verdict

__all__ = ["compare_runs", "comparison_markdown", "compare_verdict", "plot_comparison"]

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


def _eval_name(ev: dict[str, dict], name: str) -> str:
    return next(iter(ev)) if name == "*" else name


def _bootstrap_defaults(evs: list[dict], bootstrap: int | None, seed: int | None) -> tuple[int, int]:
    """Unless given, the first run's own bootstrap size and seed (else 1000 / 0), so the paired CIs cost
    what the runs' CIs cost and ``bootstrap=0`` runs (quick checks) stay quick."""
    b = (evs[0].get("bootstrap") or {}) if evs else {}
    return (int(b.get("n", 1000)) if bootstrap is None else int(bootstrap)), (int(b.get("seed", 0)) if seed is None else int(seed))


def load_paired_inputs(paths: Sequence[Path], reports: list[dict], names: Sequence[str]) -> tuple[list | None, str | None]:
    """Per run, its scores aligned to the first run's images, or (None, why not) when a run has none.

    Runs on different images, or with different targets, raise ValueError naming both folders.
    """
    loaded = [read_scores(p, rep) for p, rep in zip(paths, reports)]
    missing = [str(p) for p, sc in zip(paths, loaded) if sc is None]
    if missing:
        return None, f"no per-image scores (scores.npz) in {', '.join(missing)}: Δ is a plain difference; re-run `mgll probe` for paired CIs"
    tasks = [rep.get("task") or {} for rep in reports]
    if not all(t.get("classes") and t.get("kind") for t in tasks):
        return None, "a report names no task (kind, classes): Δ is a plain difference"
    if any((t.get("kind"), t.get("classes")) != (tasks[0].get("kind"), tasks[0].get("classes")) for t in tasks[1:]):
        return None, "the runs list their classes in a different order or differ in task kind: Δ is a plain difference"
    for p, sc in zip(paths, loaded):
        for name, ev in zip(names, [evaluations(r) for r in reports]):
            if _eval_name(ev, name) not in sc.scores:
                raise ValueError(f"{p}: {sc.run / 'scores.npz'} has no scores for evaluation {_eval_name(ev, name)!r}")
    return [loaded[0]] + [align(loaded[0], sc) for sc in loaded[1:]], None


def _key(name: str) -> str:
    return name if name != "*" else "evaluation"


def shared_resamples(
    paths: Sequence[Path], reports: list[dict], names: Sequence[str], bootstrap: int | None, seed: int | None
) -> tuple[dict[str, tuple], str | None]:
    """Per evaluation, every run scored on the full split and on the same resamples (paired.score_runs).

    Returns ``({evaluation: (points (R, M), replicates (B, R, M), n, bootstrap, seed)}, None)``, or
    ``({}, why)`` when some run saved no per-image scores.
    """
    scores, note = load_paired_inputs(paths, reports, names)
    if scores is None:
        return {}, note
    task = Task(**{k: reports[0]["task"][k] for k in ("level", "classes", "kind")})
    out = {}
    for name in names:
        evs = [evaluations(rep) for rep in reports]
        b, s = _bootstrap_defaults([_pick(ev, name) for ev in evs], bootstrap, seed)
        mats = [as_matrices(task, sc.y, sc.scores[_eval_name(ev, name)]) for sc, ev in zip(scores, evs)]
        points, reps = score_runs(task.kind, mats[0][0], [S for _, S in mats], b, s)
        out[_key(name)] = (points, reps, int(mats[0][0].shape[0]), b, s)
    return out, None


def _paired(res: tuple, classes: Sequence[str], labs: list[str]) -> dict:
    """Δ of every run against the first, each metric a :func:`~mgll.evaluate.paired.delta_stat`."""
    points, reps, n, bootstrap, seed = res
    deltas = []
    for j in range(1, points.shape[0]):
        d, r = points[j] - points[0], reps[:, j] - reps[:, 0]
        st = [delta_stat(d[m], r[:, m], n, bootstrap, seed) for m in range(points.shape[1])]
        deltas.append({
            "label": labs[j],
            "summary": dict(zip(SUMMARY, st[: len(SUMMARY)])),
            "per_class_auc": dict(zip(classes, st[len(SUMMARY):])),
        })
    return {"vs": labs[0], "n": int(n), "bootstrap": int(bootstrap), "seed": int(seed), "deltas": deltas}


def build_comparison(
    runs: Sequence[str | Path], labels: Sequence[str] | None = None, bootstrap: int | None = None, seed: int | None = None,
    paired: bool = True,
) -> dict:
    """The comparison dict written to ``metrics.json``; ``bootstrap``/``seed`` are the paired bootstrap's.

    ``paired=False`` skips the paired Δs (the seeds form pairs runs itself).
    """
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
        out["evaluations"][_key(name)] = {
            "n": [ev.get("n") for ev in evs],
            "summary": rows,
            "per_class_auc": per_class,
        }
    if paired and len(paths) > 1:
        shared, note = shared_resamples(paths, reports, names, bootstrap, seed)
        for key, ev_out in out["evaluations"].items():
            ev_out["paired"] = _paired(shared[key], reports[0]["task"]["classes"], labs) if key in shared else None
            ev_out["paired_note"] = note
    return out


def _delta(cells: list[dict], paired: list[dict] | None = None) -> list[str]:
    if paired is not None:
        return [fmt_delta_ci(p) for p in paired]
    base = cells[0]["value"]
    return [fmt(c["value"] - base) if c["value"] is not None and base is not None else "n/a" for c in cells[1:]]


def _paired_cells(ev: dict, key: str, metric: str) -> list[dict] | None:
    p = ev.get("paired")
    return None if not p else [d[key][metric] for d in p["deltas"]]


def comparison_markdown(cmp: dict, title: str = "Encoder comparison") -> str:
    labs = cmp["labels"]
    deltas = [f"Δ {lab} − {labs[0]}" for lab in labs[1:]]
    lines = [f"# {title}", ""]
    for i, (lab, run) in enumerate(zip(labs, cmp["runs"])):
        lines.append(f"- run {i + 1}: **{lab}** (`{run}`)")
    lines.append("- values are point estimates with each run's own bootstrap 95% CI; Δ is against the first run\n")
    for name, ev in cmp["evaluations"].items():
        lines.append(f"## {name} (n test: {', '.join(str(x) for x in ev['n'])})\n")
        p = ev.get("paired")
        if p and p["bootstrap"] > 0:
            lines.append(f"Δ [95% CI]: paired bootstrap over the same {p['n']} test images ({p['bootstrap']} replicates, "
                         f"seed {p['seed']}); * = the CI excludes 0\n")
        elif p:
            lines.append(f"Δ: difference on the same {p['n']} test images (bootstrap 0: no CI)\n")
        elif ev.get("paired_note"):
            lines.append(f"> note: {ev['paired_note']}\n")
        rows = []
        for metric, cells in ev["summary"].items():
            rows.append([f"**{metric}**"] + [fmt_ci(c["value"], c["ci"]) for c in cells] + _delta(cells, _paired_cells(ev, "summary", metric)))
        for cls, cells in ev["per_class_auc"].items():
            vals = [fmt_ci(c["value"], c["ci"]) if c["value"] is not None else "undefined" for c in cells]
            rows.append([f"{cls} (n_pos {cells[0]['n_pos']})"] + vals + _delta(cells, _paired_cells(ev, "per_class_auc", cls)))
        lines.append(markdown_table(["metric / class AUC", *labs, *deltas], rows))
        if p:
            lines += [f"- macro AUC: {verdict(d['summary'][MACRO], labs[0], d['label'])}" for d in p["deltas"]] + [""]
        excluded = {tuple(c.get("excluded") or []) for c in ev["summary"][MACRO]}
        notes = [f"{lab}: macro AUC excludes {', '.join(c['excluded'])}" for lab, c in zip(labs, ev["summary"][MACRO]) if c.get("excluded")]
        if notes:
            lines.append("Undefined AUC (single label value in the test split): " + "; ".join(notes) + "\n")
        if len(excluded) > 1:
            lines.append("> warning: the runs' macro AUCs average over different class sets\n")
    return "\n".join(lines)


def plot_comparison(cmp: dict, path: str | Path, title: str = "Encoder comparison", ylabel: str = "AUC (95% CI)") -> Path:
    """Grouped bars (macro AUC, then per-class AUC) with error bars (each cell's ``ci``), one panel per evaluation."""
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
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {name}", fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return Path(path)


def compare_verdict(cmp: dict, metric: str = MACRO, evaluation: str | None = None, run: int = 1, digits: int = 3) -> str:
    """One line on run ``run`` minus the first run, e.g. ``"MGLL − CLIP = +0.012 [−0.004, +0.027]: no difference at this size"``.

    ``cmp`` is ``compare_runs(...)["comparison"]`` or ``compare_seeds(...)["comparison"]`` (or
    either's saved ``metrics.json``; for seeds, the mean Δ with its t-interval); ``metric`` is a
    summary row (``"macro AUC"``, ``"mAP"``, ``"accuracy"``) or a class name; ``evaluation`` defaults
    to the first (``"fraction 1"`` for a default probe). Without per-image scores the line carries
    the plain difference and ``: no CI``.
    """
    ev = cmp["evaluations"][evaluation or next(iter(cmp["evaluations"]))]
    a, b = cmp["labels"][0], cmp["labels"][run]
    key = "summary" if metric in ev["summary"] else "per_class_auc"
    if cmp.get("form") == "seeds":  # mgll.evaluate.compare_seeds: the mean Δ over seeds and its t-interval
        return verdict(ev[key][metric]["mean_delta"], a, b, digits)
    if ev.get("paired"):
        return verdict(ev["paired"]["deltas"][run - 1][key][metric], a, b, digits)
    cells = ev[key][metric]
    va, vb = cells[0]["value"], cells[run]["value"]
    return verdict({"delta": None if va is None or vb is None else vb - va}, a, b, digits)


def compare_runs(
    runs: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None, title: str = "Encoder comparison",
    bootstrap: int | None = None, seed: int | None = None,
) -> dict:
    """Write ``metrics.json`` (the comparison), ``metrics.md`` (the table) and ``compare.png`` into ``out``.

    ``bootstrap``/``seed``: the paired bootstrap's replicates and seed (default: the first run's own).
    """
    cmp = build_comparison(runs, labels, bootstrap, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = comparison_markdown(cmp, title)
    png = plot_comparison(cmp, out / "compare.png", title)
    json_path = atomic_write_json(out / "metrics.json", {"command": "compare", **cmp})
    md_path = atomic_write_text(out / "metrics.md", md)
    return {"json": json_path, "md": md_path, "png": png, "markdown": md, "comparison": cmp}
