"""`mgll quickstart` end to end at a reduced size: data, two encoders, both loadable."""

import json
import re

import open_clip

from mgll.cli import main
from mgll.quickstart import run_quickstart


def test_quickstart_writes_data_and_both_encoders(tmp_path, capsys):
    out = tmp_path / "qs"
    # a reduced configuration: the default (420/600/2000 images, 300 steps, 600 + 800 MCQ steps) takes ~5 min
    assert main(["quickstart", "--out", str(out), "--n", "160", "--splits", "0.6", "0.15", "0.25", "--steps", "4",
                 "--mcq-steps", "3", "--lm-steps", "3", "--mcq-per-disease", "4", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "encoder-mgll" / "encoder") in printed and str(out / "encoder-clip" / "encoder") in printed
    # the verdicts come from the paired bootstrap: "MGLL − CLIP = +x [lo, hi]: ..."
    assert re.search(r"probe verdict .*: MGLL − CLIP = [+−]\d\.\d{3} \[[+−]\d\.\d{3}, [+−]\d\.\d{3}\]: ", printed), printed
    assert re.search(r"MCQ verdict .*: tiny LLaVA \+ MGLL − tiny LLaVA = ", printed), printed
    assert re.search(r"paired CI half-width 0\.\d{3} on \d+ test images", printed), printed
    assert re.search(r"questions per disease: min \d+, max [1-4]\b", printed), printed  # the bank's cap
    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["splits"] == [0.6, 0.15, 0.25] and summary["probe_verdict"].startswith("MGLL − CLIP = ")
    assert max(summary["mcq"]["bank_counts"].values()) <= 4 and summary["mcq"]["timing"]["text_lm_reused"] is False
    assert any((out / "text-lm-cache").glob("*/text_lm.json"))  # the shared LM, kept outside mcq/ for the next run
    assert (out / "data" / "synthetic-fundus" / "records.jsonl").is_file()
    # stage 4: both encoders probed on the disease level (multi-label) and compared, CLIP first
    assert "| metric / class AUC | CLIP | MGLL | Δ MGLL − CLIP |" in printed
    assert "| **macro AUC** |" in printed and "| normal fundus (n_pos" in printed
    cmp = json.loads((out / "compare" / "metrics.json").read_text())
    assert cmp["labels"] == ["CLIP", "MGLL"]
    assert len(cmp["evaluations"]["fraction 1"]["per_class_auc"]) == 11  # 10 diseases + normal fundus
    for loss in ("clip", "mgll"):
        probe = json.loads((out / f"probe-{loss}" / "metrics.json").read_text())
        assert probe["task"]["kind"] == "multilabel" and probe["task"]["level"] == "disease"
    png = out / "compare" / "compare.png"
    assert str(png) in printed and png.read_bytes()[:4] == b"\x89PNG"
    for loss in ("mgll", "clip"):
        enc = out / f"encoder-{loss}" / "encoder"
        assert json.loads((enc / "mgll_config.json").read_text())["loss"] == loss
        open_clip.create_model_and_transforms(f"local-dir:{enc}")
    # stage 5: the Table-2-style MCQ comparison of a tiny LLaVA with each tower
    mcq = out / "mcq" / "comparison" / "comparison.md"
    assert str(mcq) in printed and "+ MGLL" in mcq.read_text()
    # rerunning into the same folder replaces the runs instead of failing or mixing them
    # (library call: the CLI has no flag to skip the probe's bootstrap, which only costs time here)
    run_quickstart(out, n_images=160, splits=(0.6, 0.15, 0.25), steps=3, progress=False, probe_bootstrap=0, mcq_steps=0)
    assert not (out / "mcq").exists()  # no stale MCQ results of the previous encoders
    rows = (out / "encoder-mgll" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3]


def test_synth_cli(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "x"), "--kind", "xray", "--n", "24", "--size", "48"]) == 0
    assert "wrote 24 xray records" in capsys.readouterr().out


def test_quickstart_without_peft_is_one_line_naming_the_fix(tmp_path, capsys, monkeypatch):
    """A fresh `pip install mgll` has no peft: the MCQ stage's LoRA would fail after minutes of training."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "peft" in err[0] and "mgll[mllm]" in err[0] and "--mcq-steps 0" in err[0]
    assert not out.exists()  # refused before anything was written
