"""`mgll compare` paired Δs: identical runs, a known AUC shift, image alignment, mismatches, the seeds form, verdicts."""

import argparse
import json
import shutil

import numpy as np
import pytest
from scipy import stats

from mgll.evaluate.compare import compare_runs, compare_verdict
from mgll.evaluate.compare_seeds import compare_seeds
from mgll.evaluate.metrics import evaluate_scores
from mgll.evaluate.probe_compare_cli import register
from mgll.evaluate.reports import write_report
from mgll.evaluate.scores import write_scores
from mgll.evaluate.tasks import Task
from mgll.verdict import fmt_signed, verdict

CLASSES = ["cataract", "glaucoma", "myopia", "absent"]
G = CLASSES.index("glaucoma")
N = 80


def _labels(seed=0):
    Y = (np.random.default_rng(seed).random((N, len(CLASSES))) < 0.3).astype(int)
    Y[:, CLASSES.index("absent")] = 0  # AUC undefined on the split and on every resample
    return Y


def _scores(Y, seed):
    rng = np.random.default_rng(100 + seed)
    return 0.2 * Y + 0.6 * rng.random(Y.shape)  # in [0, 0.8]: room for a +0.1 margin


def _write(tmp_path, name, Y, S, images=None, fraction="fraction 1"):
    images = images if images is not None else [f"images/{i:03d}.png" for i in range(len(Y))]
    m = evaluate_scores(Task("disease", CLASSES, "multilabel"), Y, S, bootstrap=0)
    report = {"label": name, "task": {"level": "disease", "kind": "multilabel", "classes": CLASSES}, "results": {fraction: m}}
    report["scores_file"] = write_scores(tmp_path / name, images, Y, {fraction: S})
    write_report(tmp_path / name, report, f"probe {name}")
    return tmp_path / name


def _pair_auc(y, s):
    """The AUC by its definition, P(score of a positive > score of a negative), ties counting one half."""
    pos, neg = s[y == 1][:, None], s[y == 0][None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def _shifted(S, Y, margin=0.1):
    out = S.copy()
    out[:, G] += margin * Y[:, G]  # glaucoma positives score higher in B; every other column is A's
    return out


def test_identical_and_monotone_runs_give_zero_delta_with_zero_width_ci(tmp_path):
    Y = _labels()
    S = _scores(Y, 0)
    a = _write(tmp_path, "a", Y, S)
    same = _write(tmp_path, "same", Y, S.copy())
    squared = _write(tmp_path, "squared", Y, S**2)  # same ranking: AUC and AP cannot move on any resample
    res = compare_runs([a, same, squared], tmp_path / "cmp", labels=["A", "B", "C"], bootstrap=60, seed=3)
    p = res["comparison"]["evaluations"]["fraction 1"]["paired"]
    assert (p["vs"], p["n"], p["bootstrap"], p["seed"]) == ("A", N, 60, 3)
    ident, mono = p["deltas"]
    for d in (ident["summary"]["macro AUC"], ident["summary"]["mAP"], ident["summary"]["accuracy"],
              mono["summary"]["macro AUC"], mono["summary"]["mAP"], mono["per_class_auc"]["glaucoma"]):
        assert (d["delta"], d["lo"], d["hi"], d["excludes_zero"]) == (0.0, 0.0, 0.0, False)
        assert (d["n"], d["bootstrap"], d["replicates"], d["seed"]) == (N, 60, 60, 3)
    absent = ident["per_class_auc"]["absent"]
    assert (absent["delta"], absent["lo"], absent["replicates"]) == (None, None, 0)  # undefined, as in metrics.py
    assert compare_verdict(res["comparison"]) == "B − A = +0.000 [+0.000, +0.000]: no difference at this size"
    md = res["markdown"]
    assert "paired bootstrap over the same 80 test images (60 replicates, seed 3)" in md
    macro = next(line for line in md.splitlines() if line.startswith("| **macro AUC**"))
    assert macro.endswith("| +0.000 [+0.000, +0.000] | +0.000 [+0.000, +0.000] |") and "]*" not in macro
    assert json.loads((tmp_path / "cmp" / "metrics.json").read_text())["evaluations"]["fraction 1"]["paired"] == p
    quick = compare_runs([a, squared], tmp_path / "quick", labels=["A", "C"], bootstrap=0)
    assert "difference on the same 80 test images (bootstrap 0: no CI)" in quick["markdown"]
    assert compare_verdict(quick["comparison"]) == "C − A = +0.000: no CI"


def test_margin_on_positives_shifts_auc_by_the_computed_amount(tmp_path):
    Y = _labels(1)
    SA = _scores(Y, 1)
    SB = _shifted(SA, Y)
    expected = _pair_auc(Y[:, G], SB[:, G]) - _pair_auc(Y[:, G], SA[:, G])
    assert 0.02 < expected < 0.2
    a = _write(tmp_path, "clip", Y, SA)
    perm = np.random.default_rng(7).permutation(N)  # B lists the same images in another order
    images = np.array([f"images/{i:03d}.png" for i in range(N)])
    b = _write(tmp_path, "mgll", Y[perm], SB[perm], images=list(images[perm]))
    res = compare_runs([a, b], tmp_path / "cmp", labels=["CLIP", "MGLL"], bootstrap=200, seed=0)
    d = res["comparison"]["evaluations"]["fraction 1"]["paired"]["deltas"][0]
    g = d["per_class_auc"]["glaucoma"]
    assert g["delta"] == pytest.approx(expected, abs=1e-12)
    assert 0.0 <= g["lo"] <= expected <= g["hi"]  # raising positives never lowers AUC on a resample
    assert g["excludes_zero"] and g["replicates"] == 200
    macro = d["summary"]["macro AUC"]
    assert macro["delta"] == pytest.approx(expected / 3, abs=1e-12)  # 3 defined classes; 'absent' is excluded
    assert macro["lo"] <= macro["delta"] <= macro["hi"]
    for cls in ("cataract", "myopia"):  # untouched columns: exactly zero on every resample
        assert (d["per_class_auc"][cls]["delta"], d["per_class_auc"][cls]["lo"], d["per_class_auc"][cls]["hi"]) == (0, 0, 0)
    row = next(line for line in res["markdown"].splitlines() if line.startswith("| glaucoma"))
    assert row.endswith(f"| {fmt_signed(expected)} [{fmt_signed(g['lo'])}, {fmt_signed(g['hi'])}]* |")
    assert compare_verdict(res["comparison"], "glaucoma").endswith(": MGLL higher")
    assert compare_verdict(res["comparison"]) == verdict(macro, "CLIP", "MGLL")


def test_runs_on_different_images_or_targets_are_refused(tmp_path):
    Y = _labels()
    S = _scores(Y, 0)
    a = _write(tmp_path, "a", Y, S)
    images = [f"images/{i:03d}.png" for i in range(N)]
    b = _write(tmp_path, "b", Y, S, images=images[:-1] + ["images/other.png"])
    with pytest.raises(ValueError) as err:
        compare_runs([a, b], tmp_path / "cmp")
    msg = str(err.value)
    assert str(a) in msg and str(b) in msg and "\n" not in msg
    assert "not evaluated on the same test images (1 only in" in msg and "images/079.png" in msg and "images/other.png" in msg
    assert not (tmp_path / "cmp" / "metrics.json").exists()
    Y2 = Y.copy()
    Y2[0, 0] = 1 - Y2[0, 0]
    c = _write(tmp_path, "c", Y2, S)
    with pytest.raises(ValueError, match="same test images but different targets for 1 of them"):
        compare_runs([a, c], tmp_path / "cmp")
    shutil.copy(tmp_path / "c" / "scores.npz", tmp_path / "b" / "scores.npz")  # a file that is not the report's
    with pytest.raises(ValueError, match="does not match the hash"):
        compare_runs([a, b], tmp_path / "cmp")


def test_runs_without_scores_fall_back_to_a_plain_difference(tmp_path):
    Y = _labels()
    a = _write(tmp_path, "a", Y, _scores(Y, 0))
    b = _write(tmp_path, "b", Y, _scores(Y, 1))
    meta = json.loads((b / "metrics.json").read_text())
    del meta["scores_file"]  # a zero-shot report or an older probe
    (b / "metrics.json").write_text(json.dumps(meta))
    res = compare_runs([a, b], tmp_path / "cmp")
    ev = res["comparison"]["evaluations"]["fraction 1"]
    assert ev["paired"] is None and str(b) in ev["paired_note"] and "no per-image scores" in res["markdown"]
    plain = ev["summary"]["macro AUC"][1]["value"] - ev["summary"]["macro AUC"][0]["value"]
    assert compare_verdict(res["comparison"]) == f"b − a = {fmt_signed(plain)}: no CI"


def _seed_runs(tmp_path, k=3, margins=(0.05, 0.1, 0.15)):
    Y = _labels(2)
    runs_a, runs_b, expected = [], [], []
    for i in range(k):
        SA = _scores(Y, 10 + i)
        SB = _shifted(SA, Y, margins[i])
        runs_a.append(_write(tmp_path, f"clip-{i}", Y, SA))
        runs_b.append(_write(tmp_path, f"mgll-{i}", Y, SB))
        expected.append((_pair_auc(Y[:, G], SB[:, G]) - _pair_auc(Y[:, G], SA[:, G])) / 3)
    return runs_a, runs_b, np.array(expected)


def test_seeds_form_mean_sd_per_arm_and_t_interval_over_seed_deltas(tmp_path, capsys):
    runs_a, runs_b, expected = _seed_runs(tmp_path)
    parser = argparse.ArgumentParser(prog="mgll")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["compare", "--runs", *map(str, runs_a), "--vs", *map(str, runs_b), "--out",
                              str(tmp_path / "cmp"), "--labels", "CLIP", "MGLL", "--bootstrap", "40", "--seed", "1"])
    assert args.func(args) == 0
    cmp = json.loads((tmp_path / "cmp" / "metrics.json").read_text())
    assert cmp["form"] == "seeds" and cmp["k"] == 3 and cmp["labels"] == ["CLIP", "MGLL"]
    row = cmp["evaluations"]["fraction 1"]["summary"]["macro AUC"]
    a_vals = [json.loads((r / "metrics.json").read_text())["results"]["fraction 1"]["macro_auc"] for r in runs_a]
    assert row["a"]["mean"] == pytest.approx(np.mean(a_vals)) and row["a"]["sd"] == pytest.approx(np.std(a_vals, ddof=1))
    per_seed = [p["delta"] for p in row["per_seed"]]
    assert per_seed == pytest.approx(expected, abs=1e-12)
    assert all(p["lo"] <= p["delta"] <= p["hi"] and p["bootstrap"] == 40 and p["seed"] == 1 for p in row["per_seed"])
    half = stats.t.ppf(0.975, 2) * np.std(expected, ddof=1) / np.sqrt(3)
    mean = row["mean_delta"]
    assert mean["delta"] == pytest.approx(expected.mean(), abs=1e-12)
    assert (mean["lo"], mean["hi"]) == pytest.approx((expected.mean() - half, expected.mean() + half), abs=1e-12)
    assert mean["k"] == 3 and "t-interval over 3 seed Δs (df 2)" == mean["method"]
    assert row["image_ci"]["lo"] <= mean["delta"] <= row["image_ci"]["hi"]
    out = capsys.readouterr().out
    assert "| metric / class AUC | CLIP (mean ± sd) | MGLL (mean ± sd) | Δ seed 1 | Δ seed 2 | Δ seed 3 |" in out
    assert "MGLL − CLIP = " in out and (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert compare_verdict(cmp) == verdict(mean, "CLIP", "MGLL")
    with pytest.raises(ValueError, match="not both"):
        args = parser.parse_args(["compare", str(runs_a[0]), "--runs", str(runs_a[1]), "--vs", str(runs_b[1]), "--out", "x"])
        args.func(args)


def test_seeds_form_identical_arms_and_mismatched_counts(tmp_path):
    Y = _labels()
    runs_a = [_write(tmp_path, f"a{i}", Y, _scores(Y, i)) for i in range(2)]
    runs_b = [_write(tmp_path, f"b{i}", Y, _scores(Y, i)) for i in range(2)]
    res = compare_seeds(runs_a, runs_b, tmp_path / "cmp", bootstrap=0)
    mean = res["comparison"]["evaluations"]["fraction 1"]["summary"]["macro AUC"]["mean_delta"]
    assert (mean["delta"], mean["lo"], mean["hi"], mean["excludes_zero"]) == (0.0, 0.0, 0.0, False)
    with pytest.raises(ValueError, match="same number of runs"):
        compare_seeds(runs_a, runs_b[:1], tmp_path / "cmp2")


def test_verdict_lines():
    assert verdict({"delta": 0.012, "lo": -0.004, "hi": 0.027}, "CLIP", "MGLL") == \
        "MGLL − CLIP = +0.012 [−0.004, +0.027]: no difference at this size"
    assert verdict({"delta": 0.03, "lo": 0.01, "hi": 0.05}, "CLIP", "MGLL") == "MGLL − CLIP = +0.030 [+0.010, +0.050]: MGLL higher"
    assert verdict({"delta": -0.03, "lo": -0.05, "hi": -0.001}, "CLIP", "MGLL").endswith(": MGLL lower")
    assert verdict({"delta": None}, "CLIP", "MGLL") == "MGLL − CLIP: undefined"
    assert verdict({"delta": 4.25, "lo": 0.5, "hi": 8.0}, "X", "X + MGLL", digits=2) == "X + MGLL − X = +4.25 [+0.50, +8.00]: X + MGLL higher"
