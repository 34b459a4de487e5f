"""Fine-tuning learns, stops on the best validation epoch, writes its report and resumes exactly."""

import argparse
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mgll.evaluate.finetune import (
    FinetuneModel,
    _Labelled,
    _loss,
    _scores,
    best_epoch,
    finetune,
    fit_head_on_frozen_features,
)
from mgll.evaluate.tasks import Task

pytestmark = pytest.mark.usefixtures("one_thread")


FAST = dict(lr=1e-3, batch_size=16, warmup_epochs=0.5, bootstrap=50, seed=0)


def _history(out):
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def status_run(fundus_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "status"
    return out, finetune("mgll-tiny-vit", fundus_dataset, "status", out, epochs=5, patience=2, progress=False, **FAST)


def test_finetune_learns_and_reports_test_metrics_at_the_best_epoch(status_run, fundus_dataset):
    out, m = status_run
    hist = _history(out)
    assert m["history"] == hist
    assert [r["epoch"] for r in hist] == list(range(1, len(hist) + 1))
    # early stopping: the reported best epoch is the argmax of the logged validation macro AUC
    aucs = [r["val_macro_auc"] for r in hist]
    assert m["monitor"] == "val_macro_auc"
    assert m["best_epoch"] == hist[int(np.argmax(aucs))]["epoch"]
    assert m["epochs_run"] == len(hist)
    assert m["stopped_early"] == (len(hist) < 5)
    if m["stopped_early"]:
        assert len(hist) - m["best_epoch"] == 2  # patience
    # it learned: training loss fell clearly and validation beats chance
    assert hist[-1]["train_loss"] < 0.85 * hist[0]["train_loss"]
    assert max(aucs) > 0.6
    test = m["results"]["finetune"]
    assert test["kind"] == "binary" and test["n"] == len(fundus_dataset.split("test"))
    assert test["macro_auc"] is not None and 0 <= test["macro_auc"] <= 1
    assert test["ci"]["macro_auc"] is not None and test["bootstrap"]["n"] == 50
    # the best weights are the best epoch's and were the ones tested
    with safe_open(str(out / "best" / "model.safetensors"), "pt") as f:
        assert int(f.metadata()["epoch"]) == m["best_epoch"]
    on_disk = json.loads((out / "metrics.json").read_text())
    assert {"encoder", "dataset", "task", "best_epoch", "monitor", "history", "results", "val_at_best", "settings"} <= set(on_disk)
    assert on_disk["results"]["finetune"]["macro_auc"] == test["macro_auc"]
    assert on_disk["task"] == {"level": "status", "classes": ["abnormal", "normal"], "kind": "binary"}
    md = (out / "metrics.md").read_text()
    assert f"best epoch {m['best_epoch']}" in md and "| finetune |" in md
    assert (out / "history.png").stat().st_size > 1000
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{len(hist):06d}"


def test_best_epoch_is_the_first_maximum():
    rows = [{"epoch": i + 1, "val_macro_auc": v, "val_loss": 1.0} for i, v in enumerate([0.6, 0.8, 0.7, 0.8])]
    assert best_epoch(rows, "val_macro_auc") == 2
    rows = [{"epoch": i + 1, "val_macro_auc": None, "val_loss": v} for i, v in enumerate([0.9, 0.5, 0.7])]
    assert best_epoch(rows, "val_loss") == 2  # the loss is minimised


def test_loss_and_scores_follow_the_task_kind():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.3, -2.0]])
    ml = Task("disease", ["a", "b", "c"], "multilabel")
    mc = Task("grade", ["a", "b", "c"], "multiclass")
    y_ml = torch.tensor([[1, 0, 1], [0, 1, 0]])
    torch.testing.assert_close(_loss(ml, logits, y_ml), torch.nn.functional.binary_cross_entropy_with_logits(logits, y_ml.float()))
    torch.testing.assert_close(_loss(mc, logits, torch.tensor([0, 1])), torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])))
    np.testing.assert_allclose(_scores(ml, logits), torch.sigmoid(logits.double()).numpy())
    np.testing.assert_allclose(_scores(mc, logits).sum(1), 1.0)


def test_resume_after_an_interruption_equals_an_uninterrupted_run(fundus_dataset, tmp_path):
    kw = dict(epochs=3, patience=10, progress=False, **FAST)
    full = finetune("mgll-tiny-vit", fundus_dataset, "status", tmp_path / "full", **kw)

    part = tmp_path / "part"
    first = finetune("mgll-tiny-vit", fundus_dataset, "status", part, max_epochs_this_run=2, **kw)
    assert first["interrupted"] and first["epoch"] == 2 and not (part / "metrics.json").exists()
    # killed after writing epoch 2's history row but before its checkpoint became the latest:
    (part / "checkpoints" / "latest").write_text("step-000001\n")
    assert len(_history(part)) == 2
    resumed = finetune("mgll-tiny-vit", fundus_dataset, "status", part, resume=True, **kw)

    a, b = full["history"], resumed["history"]
    assert [r["epoch"] for r in b] == [1, 2, 3] and _history(part) == b
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_loss", "val_macro_auc", "lr"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-6), (ra["epoch"], key)
    assert resumed["best_epoch"] == full["best_epoch"]
    wa, wb = load_file(str(tmp_path / "full" / "best" / "model.safetensors")), load_file(str(part / "best" / "model.safetensors"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    assert resumed["results"]["finetune"]["macro_auc"] == pytest.approx(full["results"]["finetune"]["macro_auc"], abs=1e-6)


def test_out_folder_protection_and_setting_checks(fundus_dataset, status_run):
    out, _ = status_run
    with pytest.raises(FileExistsError, match="--resume"):
        finetune("mgll-tiny-vit", fundus_dataset, "status", out, epochs=5, progress=False, **FAST)
    with pytest.raises(ValueError, match=r"different settings.*lr: 0\.001 -> 0\.01"):
        finetune("mgll-tiny-vit", fundus_dataset, "status", out, epochs=5, resume=True, progress=False,
                 **{**FAST, "lr": 1e-2})


def test_bad_level_and_classes_are_clear_errors(fundus_dataset, tmp_path):
    from mgll.data.records import RecordError

    with pytest.raises(RecordError, match=r"unknown level 'diagnosis'.*status.*disease"):
        finetune("mgll-tiny-vit", fundus_dataset, "diagnosis", tmp_path / "x", progress=False)
    with pytest.raises(RecordError, match=r"unknown classes \['glaukoma'\]"):
        finetune("mgll-tiny-vit", fundus_dataset, "disease", tmp_path / "x", classes=["glaukoma", "myopia"], progress=False)
    assert not (tmp_path / "x").exists()


def test_cli_multilabel_finetune_with_classes(fundus_dataset, tmp_path, capsys):
    from mgll.evaluate.zeroshot_finetune_cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "ml"
    args = parser.parse_args(["finetune", "--encoder", "mgll-tiny-vit", "--data", str(fundus_dataset.root), "--level", "disease",
                              "--classes", "myopia", "cataract", "normal fundus", "--epochs", "1", "--lr", "1e-3",
                              "--batch-size", "32", "--bootstrap", "10", "--head-init", "random", "--out", str(out), "--no-progress"])
    assert args.func(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == {"level": "disease", "classes": ["myopia", "cataract", "normal fundus"], "kind": "multilabel"}
    assert list(m["results"]["finetune"]["per_class"]) == ["myopia", "cataract", "normal fundus"]
    assert load_file(str(out / "best" / "model.safetensors"))["head.weight"].shape[0] == 3
    assert "best epoch 1 of 1" in capsys.readouterr().out


def test_probe_head_init_fits_the_head_and_leaves_the_tower_alone(fundus_dataset):
    from torch.utils.data import DataLoader

    from mgll.encoder.factory import create_encoder
    from mgll.evaluate.tasks import make_task, task_targets

    torch.manual_seed(0)
    clip, _, preprocess, _, _ = create_encoder("mgll-tiny-vit")
    task = make_task(fundus_dataset, "disease")
    recs = fundus_dataset.split("train")
    loader = DataLoader(_Labelled(fundus_dataset, recs, task_targets(task, recs), preprocess), batch_size=64)
    model = FinetuneModel(clip.visual, len(task.classes))
    tower = {k: v.clone() for k, v in model.visual.state_dict().items()}
    with torch.no_grad():
        x = torch.cat([model.visual(b) for b, _ in loader])
        y = torch.cat([t for _, t in loader])
        before = float(_loss(task, model.head(x), y))
    after = fit_head_on_frozen_features(model, task, loader, "cpu")
    assert after < 0.6 * before
    with torch.no_grad():
        assert after == pytest.approx(float(_loss(task, model.head(x), y)), rel=1e-5)
    assert all(torch.equal(tower[k], v) for k, v in model.visual.state_dict().items())
