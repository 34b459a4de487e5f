"""Tasks detected from labels, and metrics that equal scikit-learn's, with undefined AUC reported."""

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score

from mgll.data.records import DatasetCard, Level, MultiGranularDataset, Record, RecordError
from mgll.evaluate.metrics import evaluate_scores
from mgll.evaluate.tasks import Task, make_task, task_records, task_targets


def _ds(label_sets):
    card = DatasetCard("toy", (Level("coarse", "{}"), Level("fine", "{}")))
    recs = [
        Record(image=f"{i}.png", labels={"coarse": ("x",), "fine": tuple(labs)}, split="test", patient=f"p{i}", line=i + 1)
        for i, labs in enumerate(label_sets)
    ]
    return MultiGranularDataset(Path("."), card, recs)


# ----------------------------------------------------------------------------- tasks


def test_kind_is_detected_from_labels_and_classes_restrict():
    single = _ds([["a"], ["b"], ["c"], ["a"]])
    assert make_task(single, "fine").kind == "multiclass"
    t = make_task(single, "fine", classes=["b", "a"])
    assert (t.kind, t.classes) == ("binary", ["b", "a"])
    kept = task_records(t, single.records)
    assert [r.image for r in kept] == ["0.png", "1.png", "3.png"]  # the 'c' record has no target: dropped
    np.testing.assert_array_equal(task_targets(t, kept), [1, 0, 1])  # 1 = classes[1] = 'a'
    with pytest.raises(RecordError, match=r"2\.png.*line 3.*labels\.fine"):
        task_targets(t, single.records)
    with pytest.raises(ValueError, match="at least 2 classes"):
        make_task(single, "fine", classes=["a"])

    multi = _ds([["a", "b"], ["c"], ["b"]])
    t = make_task(multi, "fine", classes=["a", "c"])
    assert t.kind == "multilabel"  # the level is multi-label whatever subset is looked at
    assert len(task_records(t, multi.records)) == 3  # kept as all-zero rows, not dropped
    np.testing.assert_array_equal(task_targets(t, multi.records), [[1, 0], [0, 1], [0, 0]])
    with pytest.raises(RecordError, match=r"unknown classes \['zzz'\]"):
        make_task(multi, "fine", classes=["a", "zzz"])
    with pytest.raises(RecordError, match="unknown level"):
        make_task(multi, "nope")


# ----------------------------------------------------------------------------- metrics == sklearn


def test_binary_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    p = np.clip(0.35 * y + 0.65 * rng.random(80), 0, 1)
    t = Task("l", ["neg", "pos"], "binary")
    m = evaluate_scores(t, y, p, bootstrap=0)
    assert m["macro_auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p >= 0.5))
    assert m["per_class"]["pos"]["ap"] == pytest.approx(average_precision_score(y, p))
    assert m["per_class"]["neg"]["ap"] == pytest.approx(average_precision_score(1 - y, 1 - p))
    assert m["map"] == pytest.approx((m["per_class"]["pos"]["ap"] + m["per_class"]["neg"]["ap"]) / 2)
    m2 = evaluate_scores(t, y, np.stack([1 - p, p], 1), bootstrap=0)  # (N, 2) scores give the same numbers
    assert m2["macro_auc"] == m["macro_auc"] and m2["accuracy"] == m["accuracy"]


def test_multiclass_metrics_equal_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 120)
    logits = rng.normal(size=(120, 4)) + 1.2 * np.eye(4)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    t = Task("l", ["a", "b", "c", "d"], "multiclass")
    m = evaluate_scores(t, y, p, bootstrap=0)
    assert m["macro_auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-12)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p.argmax(1)))
    Y = np.eye(4)[y]
    assert m["map"] == pytest.approx(average_precision_score(Y, p, average="macro"), abs=1e-12)
    for k, c in enumerate(t.classes):
        assert m["per_class"][c]["auc"] == pytest.approx(roc_auc_score(y == k, p[:, k]))
        assert m["per_class"][c]["n_pos"] == int((y == k).sum())
    assert m["undefined"] == [] and m["macro_auc_classes"] == 4


def test_multilabel_metrics_equal_sklearn():
    rng = np.random.default_rng(2)
    Y = (rng.random((100, 5)) < 0.3).astype(int)
    S = np.clip(0.3 * Y + 0.7 * rng.random((100, 5)), 0, 1)
    t = Task("l", list("abcde"), "multilabel")
    m = evaluate_scores(t, Y, S, bootstrap=0)
    assert m["macro_auc"] == pytest.approx(roc_auc_score(Y, S, average="macro"), abs=1e-12)
    assert m["map"] == pytest.approx(average_precision_score(Y, S, average="macro"), abs=1e-12)
    assert m["accuracy"] == pytest.approx(accuracy_score(Y, (S >= 0.5).astype(int)))  # exact match
    assert m["label_accuracy"] == pytest.approx(np.mean((S >= 0.5) == Y))
    assert m["n"] == 100


# ----------------------------------------------------------------------------- undefined AUC


def test_single_value_class_is_reported_undefined_and_excluded_by_name():
    rng = np.random.default_rng(3)
    Y = (rng.random((60, 4)) < 0.4).astype(int)
    Y[:, 1] = 0  # no positives in the test split
    Y[:, 3] = 1  # no negatives
    S = np.clip(0.3 * Y + 0.7 * rng.random((60, 4)), 0, 1)
    t = Task("l", ["a", "none", "c", "all"], "multilabel")
    m = evaluate_scores(t, Y, S, bootstrap=50, seed=0)
    assert m["per_class"]["none"] == {
        "auc": None, "ap": None, "n_pos": 0, "n": 60,
        "undefined": "only negatives in test split (n_pos=0)", "ci": {"auc": None, "ap": None},
    }
    assert m["per_class"]["all"]["auc"] is None
    assert m["per_class"]["all"]["undefined"] == "only positives in test split (n_pos=60, no negatives)"
    assert m["per_class"]["all"]["ap"] == pytest.approx(1.0)  # AP is defined with all positives
    assert [u["class"] for u in m["undefined"]] == ["none", "all"]
    assert m["undefined"][0]["metrics"] == ["auc", "ap"] and m["undefined"][1]["metrics"] == ["auc"]
    assert m["macro_auc_excluded"] == ["none", "all"] and m["macro_auc_classes"] == 2
    assert m["macro_auc"] == pytest.approx(roc_auc_score(Y[:, [0, 2]], S[:, [0, 2]]))
    lo, hi = m["ci"]["macro_auc"]
    assert lo <= hi


def test_binary_split_with_one_class_does_not_crash():
    t = Task("l", ["neg", "pos"], "binary")
    m = evaluate_scores(t, np.zeros(10, int), np.linspace(0, 1, 10), bootstrap=20)
    assert m["macro_auc"] is None and m["ci"]["macro_auc"] is None
    assert m["per_class"]["pos"]["undefined"] == "only negatives in test split (n_pos=0)"
    assert m["accuracy"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- bootstrap, input checks


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.3 * y + 0.7 * rng.random(200), 0, 1)
    t = Task("l", ["neg", "pos"], "binary")
    a = evaluate_scores(t, y, p, bootstrap=200, seed=7)
    b = evaluate_scores(t, y, p, bootstrap=200, seed=7)
    c = evaluate_scores(t, y, p, bootstrap=200, seed=8)
    assert a["ci"] == b["ci"] and a["ci"] != c["ci"]
    for key in ("macro_auc", "accuracy", "map"):
        lo, hi = a["ci"][key]
        assert lo < a[key] < hi and hi - lo < 0.25
    lo, hi = a["per_class"]["pos"]["ci"]["auc"]
    assert lo < a["per_class"]["pos"]["auc"] < hi


def test_bad_scores_raise_clear_errors():
    mc = Task("l", ["a", "b", "c"], "multiclass")
    with pytest.raises(ValueError, match="rows sum to 1"):
        evaluate_scores(mc, np.array([0, 1]), np.array([[0.9, 0.9, 0.1], [0.1, 0.8, 0.1]]))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        evaluate_scores(mc, np.array([0, 1]), np.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="probabilities"):
        evaluate_scores(Task("l", ["n", "p"], "binary"), np.array([0, 1]), np.array([-2.0, 3.0]))
    with pytest.raises(ValueError, match="rows"):
        evaluate_scores(Task("l", ["n", "p"], "binary"), np.array([0, 1, 1]), np.array([0.2, 0.3]))
