"""The probe saves per-image test scores, and `mgll compare` pairs two real probes on them."""

import json

import pytest
import torch

from mgll.encoder.factory import create_encoder, save_encoder
from mgll.evaluate.compare import compare_runs
from mgll.evaluate.probe import run_probe
from mgll.evaluate.scores import read_scores


def _encoder(root, seed):
    torch.manual_seed(seed)
    model, _, _, _, name = create_encoder("mgll-tiny-vit")
    save_encoder(model, root / f"enc-{seed}" / "encoder", name, {"loss": "clip", "levels": []})
    return root / f"enc-{seed}"


def test_probe_scores_file_and_paired_compare_of_two_probes(fundus_dataset, tmp_path, one_thread):
    kw = dict(bootstrap=20, progress=False, batch_size=32, cache_dir=tmp_path / "cache")
    probes = []
    for seed in (0, 1):
        probes.append(tmp_path / f"probe-{seed}")
        run_probe(str(_encoder(tmp_path, seed)), fundus_dataset, "disease", out=probes[-1], **kw)
    rep = json.loads((probes[0] / "metrics.json").read_text())
    sc = read_scores(probes[0], rep)
    test = [r.image for r in fundus_dataset.split("test")]
    assert sc.images == test and sc.scores["fraction 1"].shape == (len(test), len(rep["task"]["classes"]))
    assert rep["scores_file"]["path"] == "scores.npz" and len(rep["scores_file"]["sha256"]) == 64

    res = compare_runs(probes, tmp_path / "cmp", labels=["CLIP", "MGLL"])
    ev = res["comparison"]["evaluations"]["fraction 1"]
    p = ev["paired"]
    assert (p["bootstrap"], p["seed"], p["n"]) == (20, 0, len(test))  # defaults: the probes' own bootstrap
    macro = p["deltas"][0]["summary"]["macro AUC"]
    a, b = (c["value"] for c in ev["summary"]["macro AUC"])
    assert macro["delta"] == pytest.approx(b - a, abs=1e-12)  # the scores reproduce the reports' numbers
    for cls, cells in ev["per_class_auc"].items():
        d = p["deltas"][0]["per_class_auc"][cls]["delta"]
        assert (d is None) == (cells[0]["value"] is None)
        if d is not None:
            assert d == pytest.approx(cells[1]["value"] - cells[0]["value"], abs=1e-12)
    self_cmp = compare_runs([probes[0], probes[0] / "metrics.json"], tmp_path / "self", labels=["A", "B"], bootstrap=10)
    zero = self_cmp["comparison"]["evaluations"]["fraction 1"]["paired"]["deltas"][0]["summary"]["macro AUC"]
    assert (zero["delta"], zero["lo"], zero["hi"]) == (0.0, 0.0, 0.0)
