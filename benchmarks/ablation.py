"""The term study: which MGLL terms, in which form, help a linear probe, on which data, at which budget?

Every variant is a config option of ``mgll.encoder.losses`` (equations there). Each run trains
``mgll-tiny-vit`` with the quickstart's recipe (batch 32, lr 1e-3, same data order per seed) and
linear-probes it (logistic regression on frozen features, C picked on the validation split):

    family   fundus (probe level ``disease``, 10 diseases + normal) or x-ray (``finding``, 10
             ChestX-ray14 findings + no finding), both from ``mgll synth`` with the same split sizes
             as ``mgll quickstart`` (train 420, val ~600, test ~2,000 images);
    budget   ``qs`` = the quickstart's 300 steps, ``4x`` = 1,200 steps;
    seed     0, 1, 2 (training seed; the data are fixed).

Selection and reporting are kept apart: the default is chosen on the **validation** macro AUC
(the probe's own C-selection score, mean over seeds and both families at the quickstart budget,
among variants with every seed on both families); every table reports the **test** split. Each
Δ is paired: per seed, a bootstrap over the same test images (both runs scored on each resample,
:mod:`mgll.evaluate.paired`); over seeds, the mean Δ with a Student-t interval (k − 1 df), as
``mgll compare --runs/--vs`` does. ``*`` marks a t-interval that excludes zero.

Runs are independent jobs in a fixed priority order (``JOBS``); each writes
``<work>/<family>/<budget>/<variant>/s<seed>/result.json`` and its test scores, and is skipped
when that file exists, so several workers can share the queue and an interrupted study resumes.
``report`` reads whatever finished and says exactly which runs exist and which do not.

    python benchmarks/ablation.py prepare                     # both synthetic datasets
    python benchmarks/ablation.py run --worker 0 --workers 2  # (and --worker 1 in another shell)
    python benchmarks/ablation.py report                      # results/ablation.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scipy.stats import rankdata  # noqa: E402

from mgll.evaluate.paired import t_interval  # noqa: E402
from mgll.io import atomic_write_json, atomic_write_text  # noqa: E402
from mgll.verdict import excludes_zero, fmt_delta_ci  # noqa: E402

FAMILIES = {"fundus": "disease", "xray": "finding"}
BUDGETS = {"qs": 300, "4x": 1200}
SEEDS = (0, 1, 2)
# train 420, val ~600, test ~2,000 images: the quickstart's training set, a test split large enough
# for a paired CI of about +-0.01 macro AUC (mgll.quickstart.QUICKSTART_SPLITS is the same)
N_IMAGES, SPLITS = 3020, (420, 600, 2000)

PAPER = {"pointwise": 1.0, "smooth_kl": 1.0}
PREV = {"pointwise": 0.1, "smooth_kl": 0.1}  # the defaults before this study: every option variant starts from them
VARIANTS: dict[str, tuple[str, dict]] = {
    "CLIP": ("clip", {}),
    "soft CLIP alone (a2 = a3 = 0)": ("mgll", {"pointwise": 0.0, "smooth_kl": 0.0}),
    "default (a2 = a3 = 0.1)": ("mgll", PREV),
    "paper weights (a2 = a3 = 1)": ("mgll", PAPER),
    # one option changed at a time from a2 = a3 = 0.1, ordered by how directly it tests the hypotheses
    "sKL: levels with >= 3 texts": ("mgll", {**PREV, "smooth_kl_levels": "min_texts", "smooth_kl_min_texts": 3}),
    "paper weights, L_P mean over pairs": ("mgll", {**PAPER, "pointwise_reduction": "mean_pairs"}),
    "L_P mean over pairs, a2 = 1": ("mgll", {**PREV, "pointwise": 1.0, "pointwise_reduction": "mean_pairs"}),
    "sKL warm-up (first half)": ("mgll", {**PREV, "smooth_kl_schedule": "warmup"}),
    "sKL decay (second half)": ("mgll", {**PREV, "smooth_kl_schedule": "decay"}),
    "L_P fine levels only": ("mgll", {**PREV, "pointwise_levels": "fine"}),
    "sKL text -> image": ("mgll", {**PREV, "smooth_kl_direction": "text_to_image"}),
    "L_P fixed temperature": ("mgll", {**PREV, "pointwise_temperature": "fixed"}),
    "L_P mean over positives": ("mgll", {**PREV, "pointwise_reduction": "mean_positives"}),
    "sCLIP coarse level x0.5": ("mgll", {**PREV, "soft_clip_coarse": 0.5}),
    "sCLIP coarse level x2": ("mgll", {**PREV, "soft_clip_coarse": 2.0}),
    "soft CLIP + L_P (a3 = 0)": ("mgll", {"pointwise": 0.1, "smooth_kl": 0.0}),
    "soft CLIP + L_sKL (a2 = 0)": ("mgll", {"pointwise": 0.0, "smooth_kl": 0.1}),
}
CORE = list(VARIANTS)[:4]
SOFT, CLIP = CORE[1], CORE[0]
# 4x: the core variants, and the variant the quickstart-budget rule chose (added once it was chosen,
# to see whether the choice holds at the longer budget)
FOURX = [*CORE, "soft CLIP + L_sKL (a2 = 0)"]


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def jobs() -> list[tuple[str, str, str, int]]:
    """(family, budget, variant, seed) in priority order: the four core variants on both families at
    the quickstart budget; the two option variants that test the issue's hypotheses directly; the
    core variants at 4x with one seed; the other option variants; the remaining 4x seeds."""
    options = list(VARIANTS)[4:]
    out = [(f, "qs", v, s) for v in CORE for f in FAMILIES for s in SEEDS]
    out += [(f, "qs", v, s) for v in options[:2] for f in FAMILIES for s in SEEDS]
    out += [(f, "4x", v, 0) for v in CORE for f in FAMILIES]
    out += [(f, "qs", v, s) for v in options[2:] for f in FAMILIES for s in SEEDS]
    out += [(f, "4x", v, s) for s in SEEDS[1:] for v in CORE for f in FAMILIES]
    out += [(f, "4x", v, s) for v in FOURX[len(CORE):] for f in FAMILIES for s in SEEDS]
    return out


def data_dir(work: Path, family: str) -> Path:
    return work / "data" / family


def run_dir(work: Path, family: str, budget: str, variant: str, seed: int) -> Path:
    return work / family / budget / slug(variant) / f"s{seed}"


def prepare(work: Path) -> None:
    from mgll.data.synthetic import make_synthetic

    for family in FAMILIES:
        d = data_dir(work, family)
        if (d / "records.jsonl").is_file():
            continue
        t0 = time.perf_counter()
        ds = make_synthetic(d, kind=family, n=N_IMAGES, size=64, seed=0, splits=SPLITS, overwrite=True)
        print(f"{family}: {ds.splits()} in {time.perf_counter() - t0:.0f} s", flush=True)


def run_job(work: Path, family: str, budget: str, variant: str, seed: int) -> dict | None:
    from mgll.encoder.trainer import train
    from mgll.evaluate.probe import run_probe
    from mgll.quickstart import quickstart_config

    out = run_dir(work, family, budget, variant, seed)
    if (out / "result.json").is_file():
        return None
    out.mkdir(parents=True, exist_ok=True)
    claim = out / ".claimed"  # holds the worker's pid, so two workers never train the same run
    if claim.is_file():
        try:
            pid = int(claim.read_text() or 0)
            if pid > 0:
                os.kill(pid, 0)
                return None  # a live worker has it
        except (ValueError, ProcessLookupError):
            pass
        claim.unlink()  # left by a stopped worker: the run starts over
    try:
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
    except FileExistsError:
        return None
    shutil.rmtree(out / "encoder", ignore_errors=True)  # a stopped worker's partial run
    loss, options = VARIANTS[variant]
    data = data_dir(work, family)
    cfg = quickstart_config(data, out / "encoder", loss, BUDGETS[budget], seed)
    for key, value in options.items():
        setattr(cfg.loss, key, value)
    t0 = time.perf_counter()
    train(cfg, progress=False)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rep = run_probe(out / "encoder", data, FAMILIES[family], bootstrap=0, seed=seed, out=out / "probe", progress=False)
    m = rep["results"]["fraction 1"]
    result = {
        "family": family, "budget": budget, "steps": BUDGETS[budget], "variant": variant, "seed": seed,
        "loss": loss, "options": options,
        "val_macro_auc": max(v for v in m["head"]["val_macro_auc_by_C"].values() if v is not None),
        "C": m["head"]["C"], "test_macro_auc": m["macro_auc"], "test_map": m["map"],
        "n": rep["n"], "train_s": round(train_s, 1), "probe_s": round(time.perf_counter() - t0, 1),
    }
    shutil.rmtree(out / "encoder" / "checkpoints", ignore_errors=True)  # the final encoder stays; resumable copies go
    atomic_write_json(out / "result.json", result)
    return result


def cmd_run(args) -> None:
    work = Path(args.work)
    prepare(work)
    queue = jobs()[args.worker :: args.workers] if args.workers > 1 else jobs()
    if args.only:
        queue = [j for j in queue if j[2] in args.only]
    for job in queue:
        t0 = time.perf_counter()
        r = run_job(work, *job)
        if r is not None:
            print(f"{job}: val {r['val_macro_auc']:.3f} test {r['test_macro_auc']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)


# ----------------------------------------------------------------------------------------- report


def _load(work: Path) -> dict[tuple, dict]:
    found = {}
    for f in work.glob("*/*/*/s*/result.json"):
        r = json.loads(f.read_text())
        found[(r["family"], r["budget"], r["variant"], r["seed"])] = {**r, "dir": f.parent}
    return found


def _scores(run: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    from mgll.evaluate.reports import read_metrics
    from mgll.evaluate.scores import read_scores

    probe = run["dir"] / "probe"
    sc = read_scores(probe, read_metrics(probe))
    return sc.images, sc.y, sc.scores["fraction 1"]


def _macro_auc(Y: np.ndarray, S: np.ndarray) -> float:
    """Macro AUC over the classes with both label values, by ranks (ties averaged): sklearn's roc_auc_score."""
    pos = Y.sum(0)
    ok = (pos > 0) & (pos < len(Y))
    r = rankdata(S[:, ok], axis=0)
    p, n = pos[ok], len(Y) - pos[ok]
    return float((((r * Y[:, ok]).sum(0) - p * (p + 1) / 2) / (p * n)).mean())


class _Replicates:
    """Each run's macro AUC on one shared set of test-image resamples per family (seeded), computed once.

    Every run of a family is scored on the same resamples, so the difference of two runs' vectors
    is the paired bootstrap of their Δ (as :func:`mgll.evaluate.paired.score_runs`, macro AUC only,
    which keeps a report over dozens of runs to a minute or two).
    """

    def __init__(self, bootstrap: int):
        self.bootstrap, self.idx, self.ref, self.cache = bootstrap, {}, {}, {}

    def __call__(self, run: dict) -> np.ndarray:
        key = str(run["dir"])
        if key not in self.cache:
            images, Y, S = _scores(run)
            fam = run["family"]
            if fam not in self.idx:
                rng = np.random.default_rng(0)
                self.idx[fam] = rng.integers(0, len(Y), (self.bootstrap, len(Y)))
                self.ref[fam] = (images, Y)
            if images != self.ref[fam][0] or not np.array_equal(Y, self.ref[fam][1]):
                raise ValueError(f"{run['dir']}: not the test images of the other {fam} runs")
            full = _macro_auc(Y, S)
            if abs(full - run["test_macro_auc"]) > 1e-9:
                raise AssertionError(f"{run['dir']}: rank AUC {full} != the probe's {run['test_macro_auc']}")
            self.cache[key] = np.array([_macro_auc(Y[i], S[i]) for i in self.idx[fam]])
        return self.cache[key]


def _paired(a: dict, b: dict, reps: _Replicates) -> dict:
    """Δ = b − a macro AUC on the same test images, paired bootstrap percentile CI (one seed)."""
    d = reps(b) - reps(a)
    d = d[np.isfinite(d)]
    lo, hi = (float(x) for x in np.percentile(d, [2.5, 97.5]))
    return {"delta": b["test_macro_auc"] - a["test_macro_auc"], "lo": lo, "hi": hi, "excludes_zero": excludes_zero(lo, hi),
            "n": int(len(reps.ref[a["family"]][1])), "bootstrap": reps.bootstrap}


def _arm(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None, "k": len(values)}


def summarise(found: dict, bootstrap: int) -> dict:
    reps = _Replicates(bootstrap)
    cells = {}
    for family in FAMILIES:
        for budget in BUDGETS:
            rows = {}
            for variant in VARIANTS:
                runs = {s: found[(family, budget, variant, s)] for s in SEEDS if (family, budget, variant, s) in found}
                if not runs:
                    continue
                row = {
                    "seeds": sorted(runs),
                    "val": _arm([r["val_macro_auc"] for r in runs.values()]),
                    "test": _arm([r["test_macro_auc"] for r in runs.values()]),
                    "test_map": _arm([r["test_map"] for r in runs.values()]),
                    "train_s": statistics.fmean(r["train_s"] for r in runs.values()),
                    "per_seed": {s: {"val": r["val_macro_auc"], "test": r["test_macro_auc"]} for s, r in runs.items()},
                }
                for ref_name, ref in (("vs_soft_clip", SOFT), ("vs_clip", CLIP)):
                    if ref == variant:
                        continue
                    pairs = [(found[(family, budget, ref, s)], runs[s]) for s in runs if (family, budget, ref, s) in found]
                    if not pairs:
                        continue
                    per_seed = [_paired(a, b, reps) for a, b in pairs]
                    mean = t_interval([p["delta"] for p in per_seed])
                    # the test-image sampling the seeds share: paired bootstrap of the seed-mean Δ
                    dm = np.mean([reps(b) - reps(a) for a, b in pairs], axis=0)
                    image_ci = [float(x) for x in np.percentile(dm[np.isfinite(dm)], [2.5, 97.5])]
                    row[ref_name] = {"per_seed": per_seed, "mean": mean, "image_ci_of_mean": image_ci}
                rows[variant] = row
            if rows:
                cells[f"{family}/{budget}"] = rows
    return cells


def _candidates(cells: dict, budget: str) -> dict:
    scores = {}
    for variant in VARIANTS:
        vals = []
        for family in FAMILIES:
            row = cells.get(f"{family}/{budget}", {}).get(variant)
            if row is None or len(row["seeds"]) < len(SEEDS):
                break
            vals.append(row["val"]["mean"])
        else:
            scores[variant] = {"val_mean_over_families": statistics.fmean(vals),
                               **{f: cells[f"{f}/{budget}"][variant]["val"]["mean"] for f in FAMILIES}}
    return scores


def choose_default(cells: dict) -> dict:
    """Best mean validation macro AUC over both families at the quickstart budget (3 seeds on each).

    The rule was fixed before the runs: the quickstart trains at that budget. The same choice at
    4x (where it has every seed) is reported beside it, so a budget-dependent answer is visible.
    """
    out = {"rule": "highest validation macro AUC, mean over seeds and over both families, quickstart budget; "
                   "MGLL variants (loss.name = mgll) with all seeds on both families"}
    for budget in BUDGETS:
        scores = _candidates(cells, budget)
        mgll_only = {k: v for k, v in scores.items() if VARIANTS[k][0] == "mgll"}
        best = max(mgll_only, key=lambda k: mgll_only[k]["val_mean_over_families"]) if mgll_only else None
        out[budget] = {"best": best, "candidates": scores}
    out["chosen"], out["candidates"] = out["qs"]["best"], out["qs"]["candidates"]
    return out


def _fmt_arm(a: dict) -> str:
    return f"{a['mean']:.3f} ± {a['sd']:.3f}" if a["sd"] is not None else f"{a['mean']:.3f}"


def _fmt_delta(d: dict | None) -> str:
    if d is None:
        return "-"
    m = d["mean"]
    if m["k"] >= 2:
        return fmt_delta_ci(m)
    p = d["per_seed"][0]
    return f"{fmt_delta_ci(p)} (1 seed, image CI)"


def statements(cells: dict) -> list[str]:
    """Plain sentences from the numbers: a variant helps / hurts where its t-interval excludes zero."""
    out = []
    for key, rows in cells.items():
        helps, hurts, flat = [], [], []
        for variant, row in rows.items():
            d = row.get("vs_soft_clip")
            if d is None or d["mean"]["k"] < 2:
                continue
            m = d["mean"]
            (helps if m["excludes_zero"] and m["delta"] > 0 else hurts if m["excludes_zero"] else flat).append(
                f"{variant} ({fmt_delta_ci(m, star=False)})")
        fam, budget = key.split("/")
        if helps or hurts or flat:
            out.append(f"- **{fam}, {budget} budget**, vs soft CLIP alone (mean Δ over seeds, t-interval): "
                       f"better: {'; '.join(helps) or 'none'}. Worse: {'; '.join(hurts) or 'none'}. "
                       f"No difference detectable with these seeds: {'; '.join(flat) or 'none'}.")
    return out


def markdown(cells: dict, choice: dict, found: dict, args) -> str:
    lines = [
        "# The MGLL term study: linear-probe macro AUC, synthetic fundus and X-ray",
        "",
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `python benchmarks/ablation.py report` from "
        f"{len(found)} finished runs. Each run: `mgll-tiny-vit`, batch 32, lr 1e-3, the quickstart's recipe; "
        f"data from `mgll synth` (64 px, data seed 0; train {SPLITS[0]}, val ~{SPLITS[1]}, test ~{SPLITS[2]} images, "
        "split by patient); probe = logistic regression on frozen features, C chosen on val. "
        "Fundus probes the `disease` level, X-ray the `finding` level (both multi-label, 11 classes).",
        "",
        "Columns: **val** = validation macro AUC (what the default is chosen on), **test** = test macro AUC, "
        "mean ± sd over seeds; **Δ vs soft CLIP** and **Δ vs CLIP** = paired test macro-AUC difference, mean over "
        f"seeds with a t-interval over the per-seed Δs (each per-seed Δ is a paired bootstrap over the same test "
        f"images, {args.bootstrap} replicates, in `ablation.json`); `*` = interval excludes zero. "
        "A variant with one seed shows that seed's image-bootstrap CI instead. \"default (a2 = a3 = 0.1)\" is the "
        "objective's default *before* this study; the option variants change one setting of it.",
        "",
    ]
    statement = Path(args.out) / "ablation_statement.md"  # the hand-written reading of the tables, if there is one
    if statement.is_file():
        lines += [statement.read_text(encoding="utf-8").strip(), ""]
    lines += ["## Chosen default (validation split)", ""]
    lines.append(f"Rule (fixed before the runs): {choice['rule']}.")
    for budget in BUDGETS:
        c = choice[budget]
        lines += ["", f"**{budget} budget ({BUDGETS[budget]} steps)**" + ("" if budget == "qs" else
                  ": the same ranking at 4x, for reference (it does not set the default)"), ""]
        if not c["candidates"]:
            lines.append("No variant has all seeds on both families at this budget.")
            continue
        lines += ["| variant | val, mean of both families | fundus val | xray val |", "|---|---|---|---|"]
        for v, sc in sorted(c["candidates"].items(), key=lambda kv: -kv[1]["val_mean_over_families"]):
            mark = (" **(chosen)**" if budget == "qs" else " **(best)**") if v == c["best"] else ""
            lines.append(f"| {v}{mark} | {sc['val_mean_over_families']:.4f} | {sc['fundus']:.4f} | {sc['xray']:.4f} |")
    lines += ["", "## Which terms help where", "", *statements(cells), ""]
    for key, rows in cells.items():
        fam, budget = key.split("/")
        lines += [f"## {fam}, {budget} budget ({BUDGETS[budget]} steps)", "",
                  "| variant | seeds | val | test | Δ vs soft CLIP | Δ vs CLIP | train s/run |", "|---|---|---|---|---|---|---|"]
        for variant, row in rows.items():
            lines.append(f"| {variant} | {','.join(map(str, row['seeds']))} | {_fmt_arm(row['val'])} | {_fmt_arm(row['test'])} | "
                         f"{_fmt_delta(row.get('vs_soft_clip'))} | {_fmt_delta(row.get('vs_clip'))} | {row['train_s']:.0f} |")
        lines.append("")
    missing = [j for j in jobs() if j not in found]
    lines += ["## What ran and what did not", "",
              f"{len(found)} of {len(jobs())} planned runs finished "
              f"({len(VARIANTS)} variants × {len(FAMILIES)} families × {len(SEEDS)} seeds at the quickstart budget, "
              f"plus {len(FOURX)} variants at 4x: the {len(CORE)} core ones and the variant the quickstart-budget rule "
              "chose, added after it was chosen). Not run:"]
    by_group: dict[tuple, list[int]] = {}
    for f, b, v, s in missing:
        by_group.setdefault((b, v, f), []).append(s)
    for (b, v, f), seeds in by_group.items():
        lines.append(f"- {v}, {f}, {b} budget: seeds {', '.join(map(str, seeds))}")
    if not missing:
        lines.append("- nothing: the full grid ran.")
    return "\n".join(lines) + "\n"


def cmd_report(args) -> None:
    work = Path(args.work)
    found = _load(work)
    cells = summarise(found, args.bootstrap)
    choice = choose_default(cells)
    out = Path(args.out)
    runs = [{k: v for k, v in r.items() if k != "dir"} for r in found.values()]
    atomic_write_json(out / "ablation.json", {"variants": {k: {"loss": v[0], "options": v[1]} for k, v in VARIANTS.items()},
                                              "budgets": BUDGETS, "seeds": SEEDS, "runs": runs, "cells": cells, "default": choice})
    md = markdown(cells, choice, found, args)
    atomic_write_text(out / "ablation.md", md)
    print(md)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "runs" / "ablation"))
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare").set_defaults(func=lambda a: prepare(Path(a.work)))
    r = sub.add_parser("run")
    r.add_argument("--worker", type=int, default=0)
    r.add_argument("--workers", type=int, default=1)
    r.add_argument("--only", nargs="*", help="only these variant names")
    r.set_defaults(func=cmd_run)
    rep = sub.add_parser("report")
    rep.add_argument("--bootstrap", type=int, default=500)
    rep.add_argument("--out", default=str(Path(__file__).parent / "results"))
    rep.set_defaults(func=cmd_report)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
