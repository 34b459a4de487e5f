"""Linear probe: separable features are solved, fractions are stratified by patient, features are cached."""

import argparse
import json
import shutil

import numpy as np
import pytest
import torch
from helpers.dataset_copy import copy_records

import mgll.evaluate.features as features_mod
from mgll.data.records import load_dataset
from mgll.encoder.factory import save_encoder
from mgll.evaluate.metrics import evaluate_scores
from mgll.evaluate.probe import fit_head, fraction_indices, indicator, run_probe
from mgll.evaluate.probe_compare_cli import register
from mgll.evaluate.tasks import Task, make_task, task_targets

# ----------------------------------------------------------------------------- heads on separable features


def _separable(kind, centres, n, seed):
    """Points around class centres (a sum of centres for multi-label) with noise far below their spacing."""
    rng = np.random.default_rng(seed)
    c, d = centres.shape
    if kind == "multilabel":
        y = (rng.random((n, c)) < 0.4).astype(int)
        return y @ centres + rng.normal(size=(n, d)) * 0.3, y
    y = rng.integers(0, c, n)
    return centres[y] + rng.normal(size=(n, d)) * 0.3, y


@pytest.mark.parametrize("head", ["logreg", "linear"])
@pytest.mark.parametrize("kind,c", [("binary", 2), ("multiclass", 4), ("multilabel", 3)])
def test_probe_on_linearly_separable_features_reaches_auc_above_099(head, kind, c):
    task = Task("l", [f"k{i}" for i in range(c)], kind)
    centres = np.random.default_rng(0).normal(size=(c, 16)) * 4
    X, y = _separable(kind, centres, 240, seed=1)
    Xte, yte = _separable(kind, centres, 200, seed=2)
    predict, info = fit_head(task, X[:160], y[:160], X[160:], y[160:], head=head, seed=0)
    P = predict(Xte)
    assert P.shape == (len(yte), c) and np.all((P >= 0) & (P <= 1))
    if kind != "multilabel":
        np.testing.assert_allclose(P.sum(1), 1, atol=1e-6)
    m = evaluate_scores(task, yte, P, bootstrap=0)
    assert m["macro_auc"] > 0.99, m
    if head == "logreg":
        assert info["C"] in (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    else:
        assert 0 <= info["best_epoch"] < info["epochs"]


def test_probe_on_random_features_is_near_chance():
    """The AUC > 0.99 above must come from the features, not from the head or the metric."""
    rng = np.random.default_rng(0)
    task = Task("l", ["a", "b"], "binary")
    X, y = rng.normal(size=(400, 16)), rng.integers(0, 2, 400)
    predict, _ = fit_head(task, X[:200], y[:200], X[200:300], y[200:300], seed=0)
    assert evaluate_scores(task, y[300:], predict(X[300:]), bootstrap=0)["macro_auc"] < 0.7


# ----------------------------------------------------------------------------- fractions


def _cohort(n_patients=600, seed=0):
    """Two images per patient, five classes with prevalence from common to rare, eyes sharing labels often."""
    rng = np.random.default_rng(seed)
    prev = np.array([0.4, 0.2, 0.1, 0.05, 0.02])
    patients, rows = [], []
    for p in range(n_patients):
        first = (rng.random(5) < prev).astype(int)
        for eye in range(2):
            rows.append(first if eye == 0 or rng.random() < 0.6 else (rng.random(5) < prev).astype(int))
            patients.append(f"p{p}")
    return patients, np.array(rows)


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5])
def test_fractions_are_patient_disjoint_stratified_and_seeded(fraction):
    patients, Y = _cohort()
    idx = fraction_indices(patients, Y, fraction, seed=0)
    chosen = {patients[i] for i in idx}
    rest = {patients[i] for i in set(range(len(patients))) - set(idx.tolist())}
    assert not chosen & rest  # no patient on both sides
    assert abs(len(idx) - fraction * len(patients)) <= 2 + 2 * Y.shape[1]  # target plus at most a top-up patient per class
    assert Y[idx].sum(0).min() >= 1  # every class keeps a positive
    if fraction >= 0.1:  # stratified: prevalence of every class close to the whole split's
        np.testing.assert_allclose(Y[idx].mean(0), Y.mean(0), rtol=0.35)
        naive = np.random.default_rng(0)  # a sanity check that the tolerance is not vacuous
        assert np.abs(Y[idx].mean(0) - Y.mean(0)).max() < 0.05
        del naive
    np.testing.assert_array_equal(idx, fraction_indices(patients, Y, fraction, seed=0))
    assert not np.array_equal(idx, fraction_indices(patients, Y, fraction, seed=1))
    np.testing.assert_array_equal(fraction_indices(patients, Y, 1.0, seed=0), np.arange(len(patients)))


def test_fraction_keeps_rare_class_and_rejects_bad_fraction():
    patients, Y = _cohort(200)
    Y[:, 4] = 0
    Y[7, 4] = 1  # one positive image in the whole split
    idx = fraction_indices(patients, Y, 0.01, seed=3)
    assert 7 in idx and patients[7] == patients[6] and 6 in idx  # the whole patient comes along
    with pytest.raises(ValueError, match="fraction"):
        fraction_indices(patients, Y, 0.0, seed=0)


def test_fractions_on_the_synthetic_dataset(fundus_dataset):
    task = make_task(fundus_dataset, "disease")
    recs = fundus_dataset.split("train")
    Y = indicator(task, task_targets(task, recs))
    idx = fraction_indices([r.patient for r in recs], Y, 0.1, seed=0)
    inside = {recs[i].patient for i in idx}
    assert all((r.patient in inside) == (i in set(idx.tolist())) for i, r in enumerate(recs))
    assert (Y[idx].sum(0) >= 1).all()  # every disease present in train is present in the 10% subset


# ----------------------------------------------------------------------------- end to end + cache


def test_probe_run_writes_reports_and_second_run_hits_the_cache(fundus_dataset, tiny_encoder, tmp_path, monkeypatch):
    calls = {"forward": 0, "build": 0}
    real_create = features_mod.create_encoder

    def counting_create(*a, **k):
        calls["build"] += 1
        model, pt, pv, tok, name = real_create(*a, **k)
        real_encode = model.encode_image

        def encode_image(x, *aa, **kk):
            calls["forward"] += 1
            return real_encode(x, *aa, **kk)

        model.encode_image = encode_image
        return model, pt, pv, tok, name

    monkeypatch.setattr(features_mod, "create_encoder", counting_create)
    cache = tmp_path / "cache"
    kw = dict(fractions=(0.1, 1.0), bootstrap=30, cache_dir=cache, progress=False, batch_size=32)
    first = run_probe(str(tiny_encoder), fundus_dataset, "status", out=tmp_path / "p1", **kw)
    assert calls["build"] == 3 and calls["forward"] > 0  # train, val, test encoded
    assert not any(c["hit"] for c in first["features"]["cache"].values())
    assert len(list(cache.glob("features-*.safetensors"))) == 3

    def no_encoder(*a, **k):
        raise AssertionError("the encoder was built although the features are cached")

    monkeypatch.setattr(features_mod, "create_encoder", no_encoder)
    second = run_probe(str(tiny_encoder), fundus_dataset, "status", out=tmp_path / "p2", **kw)
    assert all(c["hit"] for c in second["features"]["cache"].values())
    assert second["results"] == first["results"]  # same features, same seed: identical metrics

    saved = json.loads((tmp_path / "p1" / "metrics.json").read_text())
    assert saved["task"] == {"level": "status", "classes": ["abnormal", "normal"], "kind": "binary"}
    assert set(saved["results"]) == {"fraction 0.1", "fraction 1"}
    full = saved["results"]["fraction 1"]
    assert full["n"] == len(fundus_dataset.split("test")) and full["train"]["n_images"] == len(fundus_dataset.split("train"))
    assert saved["results"]["fraction 0.1"]["train"]["n_images"] < full["train"]["n_images"]
    assert 0.0 <= full["macro_auc"] <= 1.0 and full["ci"]["macro_auc"][0] <= full["ci"]["macro_auc"][1]
    md = (tmp_path / "p1" / "metrics.md").read_text()
    assert "| fraction 1 |" in md and "abnormal" in md and "macro AUC" in md

    # other weights -> other key -> a miss (the encoder must be built again)
    other = tmp_path / "other"
    shutil.copytree(tiny_encoder, other)
    torch.manual_seed(1)
    model, _, _, _, name = real_create("mgll-tiny-vit")
    save_encoder(model, other / "encoder", name, {"loss": "clip", "levels": []})
    with pytest.raises(AssertionError, match="the encoder was built"):
        run_probe(str(other), fundus_dataset, "status", **kw)


def test_unreadable_image_is_skipped_and_reported(fundus_dataset, tiny_encoder, tmp_path):
    root = tmp_path / "ds"
    recs = copy_records(fundus_dataset, root)
    bad = next(r for r in recs if r.split == "train")
    (root / bad.image).write_bytes(b"not an image")
    out = tmp_path / "probe"
    rep = run_probe(str(tiny_encoder), load_dataset(root), "status", bootstrap=0, out=out, progress=False)
    assert [s["image"] for s in rep["features"]["skipped"]] == [bad.image]
    assert rep["n"]["train"] == sum(r.split == "train" for r in recs) - 1
    assert any(bad.image in w for w in rep["warnings"])
    assert bad.image in (out / "metrics.md").read_text()
    assert (root / ".mgll_cache").is_dir()  # default cache location: inside the dataset


def test_probe_cli(fundus_dataset, tiny_encoder, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="mgll")
    register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "cli"
    args = parser.parse_args([
        "probe", "--encoder", str(tiny_encoder), "--data", str(fundus_dataset.root), "--level", "disease",
        "--classes", "cataract", "myopia", "--head", "linear", "--bootstrap", "20", "--out", str(out),
        "--cache-dir", str(tmp_path / "c"), "--no-progress",
    ])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "cataract" in printed and str(out / "metrics.json") in printed
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["task"]["kind"] == "multilabel" and saved["task"]["classes"] == ["cataract", "myopia"]
    assert saved["head"] == "linear" and saved["results"]["fraction 1"]["head"]["name"] == "linear"
    with pytest.raises(SystemExit):
        parser.parse_args(["probe", "--encoder", "x", "--data", "y", "--level", "z", "--out", "o", "--fraction", "1.5"])
