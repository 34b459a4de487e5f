"""Per-disease accuracy of one run, and the paper's Table 2 comparison of several runs.

The average is the unweighted mean over the diseases that have questions (the paper's
"Average"), so a rare disease weighs as much as a common one; the per-disease question counts
are printed next to it because a class of five questions swings by 20 points per answer.
A run labelled ``"X + MGLL"`` is paired with the run labelled ``"X"`` and gets a delta row; both
answered the same questions, so the delta's 95% CI is a paired bootstrap over questions
(:mod:`mgll.mllm_eval.paired`), which needs each result's per-question outcomes (``questions``,
written by :func:`summarise`; rebuilt from ``answers.jsonl`` for results written before that).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mgll.data import FUNDUS_DISEASES
from mgll.io import atomic_path, atomic_write_json, atomic_write_text
from mgll.mllm_eval.paired import paired_accuracy
from mgll.verdict import excludes_zero, verdict

__all__ = ["SHORT_NAMES", "MGLL_SUFFIX", "summarise", "write_results", "load_results", "compare_table", "compare",
           "mcq_verdict"]

SHORT_NAMES = {
    "age-related macular degeneration": "AMD",
    "cataract": "Cataract",
    "central serous retinopathy": "CSR",
    "diabetic retinopathy": "DR",
    "glaucoma": "Glaucoma",
    "media haze": "Media Haze",
    "myopia": "Myopia",
    "retinitis pigmentosa": "Retinitis",
    "diabetic macular edema": "DME",
    "tessellation": "Tessellation",
}
MGLL_SUFFIX = " + MGLL"


def summarise(bank, answers: dict[tuple[str, int], dict], label: str) -> dict[str, Any]:
    """Accuracy per disease from answered variants; a circular question is right only if every rotation is."""
    per = {d: {"n": 0, "correct": 0} for d in FUNDUS_DISEASES}
    failures, unanswered, questions = [], [], []
    n_variants = n_variants_right = 0
    for q in bank.questions:
        rows = [answers.get((v.qid, v.rotation)) for v in q.variants(bank.circular)]
        if any(r is None for r in rows):
            unanswered.append(q.qid)
            continue
        n_variants += len(rows)
        n_variants_right += sum(bool(r["correct"]) for r in rows)
        failures += [{"qid": r["qid"], "rotation": r["rotation"], "text": r.get("text", ""), "method": r["method"]}
                     for r in rows if r.get("pred_index") is None]
        per.setdefault(q.answer, {"n": 0, "correct": 0})
        per[q.answer]["n"] += 1
        right = all(bool(r["correct"]) for r in rows)
        per[q.answer]["correct"] += right
        questions.append({"qid": q.qid, "disease": q.answer, "correct": right})  # what a paired bootstrap resamples
    for d in per.values():
        d["accuracy"] = 100.0 * d["correct"] / d["n"] if d["n"] else None
    return _with_averages({
        "label": label,
        "circular": bank.circular,
        "k": bank.k,
        "per_disease": per,
        "failures": failures,
        "unanswered": unanswered,
        "variant_accuracy": 100.0 * n_variants_right / n_variants if n_variants else None,
        "questions": questions,
    })


def _with_averages(result: dict[str, Any]) -> dict[str, Any]:
    per = result["per_disease"]
    accs = [d["accuracy"] for d in per.values() if d["n"]]
    n = sum(d["n"] for d in per.values())
    result["average"] = sum(accs) / len(accs) if accs else None
    result["overall"] = 100.0 * sum(d["correct"] for d in per.values()) / n if n else None
    result["n_questions"] = n
    return result


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _fmt_delta(x: float | None) -> str:
    return "-" if x is None else f"{x:+.2f}"


def _diseases(results: list[dict]) -> list[str]:
    """The ten in the paper's order, then any other answer disease a bank held."""
    extra = sorted({d for r in results for d in r["per_disease"]} - set(FUNDUS_DISEASES))
    return [*FUNDUS_DISEASES, *extra]


def write_results(out: str | os.PathLike, result: dict[str, Any]) -> None:
    out = Path(out)
    atomic_write_json(out / "results.json", result)
    atomic_write_text(out / "results.md", compare_table([result]))


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no results.json (write one with `mgll mcq run`)")
    import json

    with open(p, encoding="utf-8") as f:
        res = json.load(f)
    for key in ("label", "per_disease"):
        if key not in res:
            raise ValueError(f"{p}: field {key!r} missing")
    res["source"] = str(p.parent)
    if "questions" not in res:
        res["questions"] = _questions_from_answers(p.parent, res)
    return _with_averages(res)


def _questions_from_answers(folder: Path, res: dict) -> list[dict] | None:
    """Per-question outcomes of a results.json written before they were stored: re-summarise the run's
    cached answers against its bank (named in ``run``), or None when either is gone."""
    bank_path = (res.get("run") or {}).get("bank")
    if not bank_path or not Path(bank_path).is_file() or not (folder / "answers.jsonl").is_file():
        return None
    from mgll.data.question_bank import load_bank
    from mgll.mllm_eval.answers import read_answers

    return summarise(load_bank(bank_path), read_answers(folder), res["label"])["questions"]


def _pairs(results: list[dict]) -> dict[str, dict]:
    """``"X + MGLL"`` label -> the ``"X"`` result."""
    by_label = {r["label"]: r for r in results}
    return {lab: by_label[lab[: -len(MGLL_SUFFIX)]] for lab in by_label
            if lab.endswith(MGLL_SUFFIX) and lab[: -len(MGLL_SUFFIX)] in by_label}


def _ci_cell(stat: dict | None) -> str:
    if not stat or stat.get("lo") is None:
        return "-"
    return f"[{_fmt_delta(stat['lo'])}, {_fmt_delta(stat['hi'])}]"


def _star(stat: dict | None) -> str:
    return "*" if stat and excludes_zero(stat.get("lo"), stat.get("hi")) else ""


def compare_table(results: list[dict], paired: dict[str, dict | None] | None = None) -> str:
    """Markdown in Table 2's layout: one row per model, ten disease columns and Average, deltas under each + MGLL.

    ``paired``: ``"X + MGLL"`` label -> :func:`~mgll.mllm_eval.paired.paired_accuracy` of it against
    ``"X"``; its CIs go in a row under the delta row, and a delta whose CI excludes 0 gets ``*``.
    """
    diseases = _diseases(results)
    pairs = _pairs(results)
    head = ["Model", *(SHORT_NAMES.get(d, d) for d in diseases), "Average"]
    counts: dict[str, int] = {}
    for r in results:
        for d in diseases:
            counts[d] = max(counts.get(d, 0), r["per_disease"].get(d, {}).get("n", 0))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| *questions (n)* | " + " | ".join(str(counts[d]) for d in diseases) + f" | {sum(counts.values())} |")
    for r in results:
        cells = [_fmt(r["per_disease"].get(d, {}).get("accuracy")) for d in diseases]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {_fmt(r['average'])} |")
        base = pairs.get(r["label"])
        if base is not None:
            p = (paired or {}).get(r["label"]) or {}
            pd = p.get("per_disease", {})
            deltas = [_fmt_delta(_delta(r, base, d)) + _star(pd.get(d)) for d in diseases]
            avg = None if r["average"] is None or base["average"] is None else r["average"] - base["average"]
            lines.append("| *Δ vs " + base["label"] + "* | " + " | ".join(deltas) + f" | {_fmt_delta(avg)}{_star(p.get('average'))} |")
            if p.get("bootstrap"):
                cis = [_ci_cell(pd.get(d)) for d in diseases]
                lines.append("| *95% CI (paired)* | " + " | ".join(cis) + f" | {_ci_cell(p.get('average'))} |")
    note = "Accuracy (%) per disease; Average = unweighted mean over diseases with questions."
    used = [p for p in (paired or {}).values() if p and p.get("bootstrap")]
    if used:
        note += (f" Δ 95% CI: paired bootstrap over the same questions, redrawn within each disease ({used[0]['bootstrap']} "
                 f"replicates, seed {used[0]['seed']}); * = the CI excludes 0.")
    circ = sorted({bool(r.get("circular")) for r in results})
    if circ == [True]:
        note += " Circular evaluation: a question counts only if every rotation of its options is answered right."
    return "\n".join(lines) + "\n\n" + note + "\n"


def _delta(r: dict, base: dict, d: str) -> float | None:
    a = r["per_disease"].get(d, {}).get("accuracy")
    b = base["per_disease"].get(d, {}).get("accuracy")
    return None if a is None or b is None else a - b


def _bar_chart(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    diseases = _diseases(results)
    cols = [SHORT_NAMES.get(d, d) for d in diseases] + ["Average"]
    x = np.arange(len(cols))
    width = 0.8 / max(len(results), 1)
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(cols)), 4))
    for i, r in enumerate(results):
        vals = [r["per_disease"].get(d, {}).get("accuracy") for d in diseases] + [r["average"]]
        ax.bar(x - 0.4 + width * (i + 0.5), [np.nan if v is None else v for v in vals], width, label=r["label"])
    ax.set_xticks(x, cols, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Ten-disease multiple-choice fundus QA")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def mcq_verdict(summary: dict, label: str | None = None, disease: str = "average", digits: int = 2) -> str:
    """One line on a ``"X + MGLL"`` run against ``"X"``, e.g.
    ``"LLaVA-Med + MGLL − LLaVA-Med = +4.20 [−1.10, +9.50]: no difference at this size"`` (points).

    ``summary`` is what :func:`compare` returns (or its ``comparison.json``); ``label`` the
    ``+ MGLL`` run (default: the first pair); ``disease`` a disease name or ``"average"``.
    """
    if not summary.get("deltas"):
        raise ValueError("no 'X + MGLL' / 'X' pair in this comparison")
    label = label or next(iter(summary["deltas"]))
    d = summary["deltas"][label]
    p = d.get("paired")
    if p:
        stat = p["average"] if disease == "average" else p["per_disease"].get(disease, {"delta": None})
    else:
        stat = {"delta": d["average"] if disease == "average" else d["per_disease"].get(disease)}
    return verdict(stat or {"delta": None}, d["base"], label, digits)


def compare(results: list[dict], out: str | os.PathLike, bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """``comparison.json``, ``comparison.md`` and ``comparison.png`` under ``out``.

    ``bootstrap``/``seed``: the paired bootstrap of each ``+ MGLL`` delta (0 = no CIs).
    """
    if not results:
        raise ValueError("compare needs at least one results.json")
    labels = [r["label"] for r in results]
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        raise ValueError(f"duplicate run labels {dup}; give each run its own label (LABEL=DIR)")
    out = Path(out)
    pairs = _pairs(results)
    summary = {
        "diseases": _diseases(results),
        "runs": [{"label": r["label"], "average": r["average"], "overall": r.get("overall"),
                  "per_disease": r["per_disease"]} for r in results],
        "deltas": {lab: {"base": b["label"], "average": None if results[labels.index(lab)]["average"] is None
                         or b["average"] is None else results[labels.index(lab)]["average"] - b["average"],
                         "per_disease": {d: _delta(results[labels.index(lab)], b, d) for d in _diseases(results)}}
                   for lab, b in pairs.items()},
    }
    paired = {}
    for lab, b in pairs.items():
        paired[lab] = paired_accuracy(b, results[labels.index(lab)], summary["diseases"], bootstrap, seed)
        summary["deltas"][lab]["paired"] = paired[lab]
        summary["deltas"][lab]["paired_note"] = None if paired[lab] is not None else (
            "no per-question outcomes in one of the runs (results.json from an older version, answers.jsonl or bank gone)")
    table = compare_table(results, paired)
    lines = [f"- {mcq_verdict(summary, lab)} (Average, points)" for lab in pairs]
    if lines:
        table += "\n" + "\n".join(lines) + "\n"
    atomic_write_json(out / "comparison.json", summary)
    atomic_write_text(out / "comparison.md", table)
    _bar_chart(results, out / "comparison.png")
    summary["table"] = table
    return summary
