"""Issue 13: training never ends in silent NaN, survives a damaged checkpoint, and resumes only the run it started.

Each test first builds the situation the issue reported (a corrupted checkpoint, a diverging run,
a kill before the first save, a changed config on resume) and then checks what the user sees:
the exit code, the message, and what is (and is not) in the run folder.
"""

import json
import math
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mgll.cli import main
from mgll.encoder.checkpoint import MANIFEST, WEIGHTS, resume_candidates, verify_manifest, write_manifest
from mgll.encoder.config import load_config
from mgll.encoder.finite import FiniteGuard, NonFiniteError
from mgll.encoder.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(data, out, steps=12, *extra):
    return ["train", "--data", str(data), "--out", str(out), "--no-progress", "--set", "train.batch_size=16",
            "--set", f"train.steps={steps}", "--set", "train.warmup_steps=3", "--set", "train.save_every=4",
            "--set", "train.lr=1e-3", *extra]


def _cfg(data, out, steps=12, **extra):
    overrides = [f"output_dir={out}", f"data.path={data}", "train.batch_size=16", f"train.steps={steps}",
                 "train.warmup_steps=3", "train.save_every=4", "train.lr=1e-3"]
    return load_config(overrides=overrides + [f"{k}={v}" for k, v in extra.items()])


def _steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _poison(weights_file, nan=True):
    """Overwrite the first 4 data bytes of the first float tensor: NaN (0x7fc00000) or a bit flip."""
    with safe_open(str(weights_file), "pt") as f:
        name = next(k for k in f.keys() if f.get_slice(k).get_dtype() == "F32")
    raw = bytearray(weights_file.read_bytes())
    header = struct.unpack("<Q", raw[:8])[0]
    begin = json.loads(raw[8 : 8 + header])[name]["data_offsets"][0] + 8 + header
    raw[begin : begin + 4] = struct.pack("<f", math.nan) if nan else bytes(b ^ 0xFF for b in raw[begin : begin + 4])
    weights_file.write_bytes(bytes(raw))
    return name


def _all_finite(folder):
    return all(torch.isfinite(t).all() for t in load_file(str(folder / "open_clip_model.safetensors")).values())


@pytest.fixture
def half_run(fundus_dataset, tmp_path):
    """A 12-step run stopped after step 8: checkpoints step-4 and step-8, each with a manifest."""
    run = train(_cfg(fundus_dataset.root, tmp_path / "run"), max_steps_this_run=8, progress=False)
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000004", "step-000008"]
    assert all((p / MANIFEST).is_file() for p in (run / "checkpoints").glob("step-*"))
    return run


def test_nan_bytes_in_the_latest_checkpoint_resume_from_the_previous_one(half_run, fundus_dataset, capsys):
    """Reported: a few corrupted bytes resumed, trained at loss NaN, exited 0 with an all-NaN encoder."""
    _poison(half_run / "checkpoints" / "step-000008" / WEIGHTS)
    assert main(_args(fundus_dataset.root, half_run, 12, "--resume")) == 0
    out = capsys.readouterr().out
    assert "passed over checkpoint step-000008" in out and "SHA-256" in out
    assert "resumed from" in out and "step-000004 (step 4)" in out
    assert _all_finite(half_run / "encoder")
    assert _steps(half_run) == list(range(1, 13))  # steps 5-8 logged once, by the resumed run
    summary = json.loads((half_run / "summary.json").read_text())
    assert summary["steps"] == 12 and math.isfinite(summary["final"]["loss"])


def test_nan_weights_behind_a_valid_manifest_are_refused_on_load(half_run, fundus_dataset, capsys):
    """A checkpoint that was NaN before it was hashed (an older mgll wrote no checks) still falls back."""
    ckpt = half_run / "checkpoints" / "step-000008"
    name = _poison(ckpt / WEIGHTS)
    write_manifest(ckpt)
    assert verify_manifest(ckpt) is None
    assert main(_args(fundus_dataset.root, half_run, 12, "--resume")) == 0
    out = capsys.readouterr().out
    assert f"step-000008: model.safetensors: tensor {name!r}" in out and "NaN" in out
    assert _all_finite(half_run / "encoder")


@pytest.mark.parametrize("damage", ["truncate_weights", "truncate_state", "flip_bits", "no_manifest_truncated"])
def test_damaged_latest_checkpoint_falls_back(half_run, damage):
    ckpt = half_run / "checkpoints" / "step-000008"
    if damage == "truncate_weights":
        (ckpt / WEIGHTS).write_bytes((ckpt / WEIGHTS).read_bytes()[:1000])
    elif damage == "truncate_state":
        (ckpt / "trainer_state.pt").write_bytes((ckpt / "trainer_state.pt").read_bytes()[:500])
    elif damage == "flip_bits":
        _poison(ckpt / WEIGHTS, nan=False)
    else:  # a checkpoint without a manifest (older mgll) is only checked by reading it
        (ckpt / MANIFEST).unlink()
        (ckpt / "trainer_state.pt").write_bytes((ckpt / "trainer_state.pt").read_bytes()[:500])
    problem = dict((p.name, r) for p, r in resume_candidates(half_run / "checkpoints"))["step-000008"]
    assert (problem is None) == (damage == "no_manifest_truncated")
    train(load_config(half_run / "config.yaml"), resume=True, progress=False)
    assert json.loads((half_run / "summary.json").read_text())["steps"] == 12
    assert _steps(half_run) == list(range(1, 13))


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(half_run, fundus_dataset, capsys):
    for ckpt in (half_run / "checkpoints").glob("step-*"):
        _poison(ckpt / WEIGHTS)
    assert main(_args(fundus_dataset.root, half_run, 12, "--resume")) == 2
    err = capsys.readouterr().err
    assert "no intact checkpoint" in err and "step-000008" in err and "step-000004" in err
    assert "Traceback" not in err
    assert not (half_run / "encoder").exists()


def test_diverging_run_stops_naming_step_and_term_and_saves_nothing(fundus_dataset, tmp_path, capsys):
    """lr = 1e30 puts the weights at ~1e30 after one step; every later loss is NaN."""
    run = tmp_path / "div"
    rc = main(_args(fundus_dataset.root, run, 12, "--set", "train.lr=1e30", "--set", "train.warmup_steps=0"))
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "step 4: non-finite loss=nan" in err and "steps 2-4" in err and "Traceback" not in err
    assert not (run / "encoder").exists() and not (run / "summary.json").exists()
    assert not (run / "checkpoints").exists()  # the first save (step 4) is never reached with NaN
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["loss"] is None and "loss=nan" in rows[1]["skipped"]  # valid JSON: null, not NaN
    assert "skipped" not in rows[0]


def test_one_nonfinite_step_is_skipped_and_the_run_goes_on(fundus_dataset, tmp_path, monkeypatch):
    from mgll.encoder.contrastive import ContrastiveModel

    forward, calls = ContrastiveModel.forward, {"n": 0}

    def nan_at_third_call(self, images, label_sets):
        calls["n"] += 1
        out = forward(self, images, label_sets)
        if calls["n"] == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(ContrastiveModel, "forward", nan_at_third_call)
    run = train(_cfg(fundus_dataset.root, tmp_path / "run", steps=6), progress=False)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped_nonfinite_steps"] == [3]
    assert _all_finite(run / "encoder")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7)) and rows[2]["loss"] is None


def test_saving_nonfinite_weights_is_refused(tmp_path):
    from mgll.encoder.factory import create_encoder, save_encoder

    model, *_ , name = create_encoder("mgll-tiny-vit")
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="holds NaN or inf"):
        save_encoder(model, tmp_path / "enc", name)
    assert not (tmp_path / "enc").exists()


def test_finite_guard_counts_in_a_row_only():
    guard = FiniteGuard(patience=2)
    assert guard.step_ok(1, []) and not guard.step_ok(2, ["loss=nan"]) and guard.step_ok(3, [])
    assert not guard.step_ok(4, ["grad_norm=inf"])
    with pytest.raises(NonFiniteError, match=r"step 5: non-finite loss=inf; 2 steps in a row .*steps 4-5"):
        guard.step_ok(5, ["loss=inf"])
    assert guard.skipped == [2, 4, 5]
    assert FiniteGuard.bad_terms({"loss": 1.0, "smooth_kl": math.nan}, math.inf) == ["smooth_kl=nan", "grad_norm=inf"]


def test_kill_before_the_first_checkpoint_gives_one_row_per_step(fundus_dataset, tmp_path):
    run = train(_cfg(fundus_dataset.root, tmp_path / "run", steps=8), max_steps_this_run=3, progress=False)
    shutil.rmtree(run / "checkpoints")  # as if killed at step 3, before the first save at step 4
    assert _steps(run) == [1, 2, 3]
    train(_cfg(fundus_dataset.root, run, steps=8), resume=True, progress=False)
    assert _steps(run) == list(range(1, 9))


def test_complete_step_folder_without_latest_pointer_is_used(half_run, fundus_dataset, capsys):
    """Killed after step-8/ was renamed into place but before `latest` was rewritten."""
    (half_run / "checkpoints" / "latest").write_text("step-000004\n")
    with open(half_run / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 1.')  # and a row cut short by the kill
    assert main(_args(fundus_dataset.root, half_run, 12, "--resume")) == 0
    assert "step-000008 (step 8)" in capsys.readouterr().out
    assert _steps(half_run) == list(range(1, 13))


def test_changed_settings_on_resume_are_an_error_listing_each_key(half_run, fundus_dataset, capsys):
    rc = main(_args(fundus_dataset.root, half_run, 70, "--resume", "--set", "train.lr=0.5"))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "train.steps: 12 in the run, 70 now" in err and "train.lr: 0.001 in the run, 0.5 now" in err
    assert "--allow-config-change" in err
    assert main(_args(fundus_dataset.root, half_run, 12, "--resume", "--loss", "clip")) == 2
    assert "loss.name: 'mgll' in the run, 'clip' now" in capsys.readouterr().err
    saved = load_config(half_run / "config.yaml")
    assert saved.train.lr == 1e-3 and saved.train.steps == 12 and saved.loss.name == "mgll"  # untouched


def test_allowed_config_change_is_recorded_and_takes_effect(half_run, fundus_dataset):
    assert main(_args(fundus_dataset.root, half_run, 16, "--resume", "--allow-config-change", "--set", "train.lr=2e-3")) == 0
    changes = [json.loads(line) for line in (half_run / "config_changes.jsonl").read_text().splitlines()]
    assert changes[0]["resumed_at_step"] == 8
    assert {(c["key"], c["from"], c["to"]) for c in changes[0]["changes"]} == {("train.steps", 12, 16), ("train.lr", 0.001, 0.002)}
    rows = {json.loads(line)["step"]: json.loads(line) for line in (half_run / "metrics.jsonl").read_text().splitlines()}
    # the cosine of the new run: lr at step 9 = 2e-3 * 0.5 * (1 + cos(pi * (9 - 3) / (16 - 3)))
    assert rows[9]["lr"] == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi * 6 / 13)), rel=1e-6)
    assert sorted(rows) == list(range(1, 17))
    assert load_config(half_run / "config.yaml").train.lr == 2e-3


def test_summary_final_is_filled_when_the_run_died_after_its_last_checkpoint(fundus_dataset, tmp_path):
    run = train(_cfg(fundus_dataset.root, tmp_path / "run", steps=8), progress=False)
    first = json.loads((run / "summary.json").read_text())
    (run / "summary.json").unlink()
    train(_cfg(fundus_dataset.root, run, steps=8), resume=True, progress=False)
    again = json.loads((run / "summary.json").read_text())
    assert again["final"] and again["final"]["loss"] == pytest.approx(first["final"]["loss"])


def test_pointwise_scale_is_clamped_and_its_gradient_finite_past_89():
    from mgll.data.synthetic import fundus_card
    from mgll.encoder.contrastive import ContrastiveModel
    from mgll.encoder.factory import create_encoder

    encoder, _, _, tok, _ = create_encoder("mgll-tiny-vit")
    model = ContrastiveModel(encoder, tok, fundus_card().levels, loss="mgll", loss_weights={"pointwise": 0.1})
    scale = model.mgll.pointwise.pointwise_logit_scale
    with torch.no_grad():
        scale.fill_(95.0)  # exp(95) is inf in float32
    labels = [{"status": ("abnormal",), "disease": ("drusen",), "explanation": ("yellow deposits",)},
              {"status": ("normal",), "disease": ("normal",), "explanation": ("a healthy retina",)}]
    out = model(torch.rand(2, 3, 64, 64), labels)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(scale.grad)
    model.clamp_logit_scale()
    assert scale.item() == pytest.approx(math.log(100))


def test_run_records_an_absolute_data_path_and_the_demo_finds_older_relative_ones(half_run, fundus_dataset, tmp_path, monkeypatch):
    from mgll.demo.encoder_view import _trained_on

    assert load_config(half_run / "config.yaml").data.path == str(fundus_dataset.root.resolve())
    # an older run folder: data.path relative to the folder training was started from (above the run)
    project = tmp_path / "project"
    run = project / "runs" / "old"
    shutil.copytree(fundus_dataset.root, project / "runs" / "data")
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("data:\n  path: runs/data\n")
    monkeypatch.chdir(tmp_path)  # the demo started from somewhere else
    assert _trained_on(run) == project / "runs" / "data"
    assert _trained_on(run / "encoder") == project / "runs" / "data"


@pytest.mark.parametrize("damage", ["truncated", "zero_bytes", "over_budget"])
def test_a_bad_image_fails_train_before_step_1_naming_the_file(fundus_dataset, tmp_path, capsys, damage):
    """Reported: a truncated image aborted training when the sampler reached it (hours in on real data)."""
    data = tmp_path / "data"
    shutil.copytree(fundus_dataset.root, data)
    rec = fundus_dataset.split("train")[-1]  # the sampler would reach it late, if at all
    img = data / rec.image
    extra = []
    if damage == "truncated":
        img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])
    elif damage == "zero_bytes":
        img.write_bytes(b"")
    else:
        extra = ["--set", "data.max_pixels=4000"]  # 64 x 64 = 4096 pixels each: every image is over it
    rc = main(_args(data, tmp_path / "run", 12, *extra))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert (rec.image if damage != "over_budget" else "over the") in err and "mgll check-data" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # failed before step 1
