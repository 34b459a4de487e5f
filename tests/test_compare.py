"""Reports and `mgll compare`: side-by-side table, bar chart with CIs, undefined cells, mismatched tasks."""

import argparse
import json

import numpy as np
import pytest

from mgll.evaluate.compare import compare_runs
from mgll.evaluate.metrics import evaluate_scores
from mgll.evaluate.probe_compare_cli import register
from mgll.evaluate.reports import markdown_table, read_metrics, write_report
from mgll.evaluate.tasks import Task

CLASSES = ["cataract", "glaucoma", "myopia", "absent"]


def _run(tmp_path, name, strength, seed, classes=CLASSES):
    rng = np.random.default_rng(seed)
    Y = (rng.random((80, len(classes))) < 0.3).astype(int)
    if "absent" in classes:
        Y[:, classes.index("absent")] = 0  # undefined AUC in every run
    S = np.clip(strength * Y + (1 - strength) * rng.random(Y.shape), 0, 1)
    m = evaluate_scores(Task("disease", classes, "multilabel"), Y, S, bootstrap=50, seed=0)
    report = {"label": name, "encoder": f"/runs/{name}", "task": {"level": "disease", "kind": "multilabel", "classes": classes},
              "results": {"fraction 1": m}}
    write_report(tmp_path / name, report, f"probe {name}")
    return tmp_path / name, m


def test_write_report_json_and_markdown(tmp_path):
    run, m = _run(tmp_path, "enc-a", 0.3, 0)
    saved = read_metrics(run)
    assert saved["results"]["fraction 1"]["macro_auc"] == pytest.approx(m["macro_auc"])
    md = (run / "metrics.md").read_text()
    assert md.startswith("# probe enc-a")
    assert "undefined: only negatives in test split (n_pos=0)" in md
    assert "3/4 (excluded: absent)" in md  # the macro AUC says what it left out
    assert f"{m['macro_auc']:.3f} [{m['ci']['macro_auc'][0]:.3f}, {m['ci']['macro_auc'][1]:.3f}]" in md
    assert not list(run.glob(".*tmp"))  # no temporaries left behind
    assert markdown_table(["a", "b"], [[1, 0.5], ["x|y", None]]) == "| a | b |\n|---|---|\n| 1 | 0.500 |\n| x\\|y | n/a |\n"
    with pytest.raises(ValueError, match="2 cells"):
        markdown_table(["a", "b", "c"], [[1, 2]])
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        read_metrics(tmp_path / "nowhere")


def test_compare_table_and_figure(tmp_path):
    a, ma = _run(tmp_path, "clip", 0.2, 1)
    b, mb = _run(tmp_path, "mgll", 0.5, 1)
    res = compare_runs([a, b], tmp_path / "cmp")
    md = (tmp_path / "cmp" / "metrics.md").read_text()
    assert md == res["markdown"]
    header = next(line for line in md.splitlines() if line.startswith("| metric"))
    assert header == "| metric / class AUC | clip | mgll | Δ mgll − clip |"
    macro_row = next(line for line in md.splitlines() if line.startswith("| **macro AUC**"))
    assert f"{ma['macro_auc']:.3f}" in macro_row and f"{mb['macro_auc']:.3f}" in macro_row
    assert macro_row.rstrip(" |").endswith(f"{mb['macro_auc'] - ma['macro_auc']:.3f}")
    absent_row = next(line for line in md.splitlines() if line.startswith("| absent"))
    assert absent_row.count("undefined") == 2 and absent_row.rstrip(" |").endswith("n/a")
    assert "clip: macro AUC excludes absent" in md
    png = (tmp_path / "cmp" / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    saved = json.loads((tmp_path / "cmp" / "metrics.json").read_text())
    cells = saved["evaluations"]["fraction 1"]["per_class_auc"]["glaucoma"]
    assert [c["value"] for c in cells] == [ma["per_class"]["glaucoma"]["auc"], mb["per_class"]["glaucoma"]["auc"]]
    assert cells[1]["ci"] == mb["per_class"]["glaucoma"]["ci"]["auc"]


def test_compare_refuses_different_tasks(tmp_path):
    a, _ = _run(tmp_path, "one", 0.3, 0)
    b, _ = _run(tmp_path, "two", 0.3, 0, classes=["cataract", "glaucoma", "myopia", "tessellation"])
    with pytest.raises(ValueError, match="different classes"):
        compare_runs([a, b], tmp_path / "cmp")
    assert not (tmp_path / "cmp" / "metrics.json").exists()


def test_compare_cli_with_labels(tmp_path, capsys):
    a, _ = _run(tmp_path, "x", 0.3, 0)
    b, _ = _run(tmp_path, "y", 0.4, 0)
    parser = argparse.ArgumentParser(prog="mgll")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["compare", str(a), str(b / "metrics.json"), "--out", str(tmp_path / "o"), "--labels", "CLIP", "MGLL"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "| metric / class AUC | CLIP | MGLL | Δ MGLL − CLIP |" in out and str(tmp_path / "o" / "compare.png") in out
