"""ZeRO-2 on two CPU processes (gloo): the same loss trajectory as DDP, plain safetensors out,
and a run killed with SIGKILL after a checkpoint resumes to the uninterrupted result."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import psutil
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed")

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from ds_env import ROOT, ds_env  # noqa: E402

ZERO2 = ROOT / "configs" / "deepspeed" / "zero2.json"
STEPS = 12


def _cmd(data, out, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "mgll.cli", "train", "--data", str(data), "--out", str(out), "--no-progress",
            "--set", "train.batch_size=16", "--set", f"train.steps={STEPS}", "--set", "train.warmup_steps=3",
            "--set", "train.save_every=4", "--set", "train.lr=1e-3", *extra]


def _run(cmd, env):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_runs(fundus_dataset, tmp_path_factory):
    """DDP (torchrun, gloo) and ZeRO-2 through accelerate's environment, as `accelerate launch` sets it."""
    root = tmp_path_factory.mktemp("ds_encoder")
    _run(_cmd(fundus_dataset.root, root / "ddp"), ds_env())
    _run(_cmd(fundus_dataset.root, root / "zero2"),
         ds_env(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=str(ZERO2)))
    return root / "ddp", root / "zero2"


@pytest.mark.slow
def test_zero2_follows_the_ddp_loss_trajectory(reference_runs):
    ddp, zero2 = reference_runs
    a, b = _metrics(ddp), _metrics(zero2)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        for term in ("loss", "soft_clip", "pointwise", "smooth_kl"):
            assert abs(x[term] - y[term]) <= 1e-4, (term, x, y)
        assert abs(x["lr"] - y["lr"]) <= 1e-12
    assert b[-1]["loss"] < b[0]["loss"]


@pytest.mark.slow
def test_zero2_run_writes_plain_safetensors_for_probe_and_export(reference_runs, tmp_path):
    _, zero2 = reference_runs
    ckpt = zero2 / "checkpoints" / f"step-{STEPS:06d}"
    assert (zero2 / "checkpoints" / "latest").read_text().strip() == ckpt.name
    assert sorted(p.name for p in (ckpt / "zero").iterdir()) == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert state["step"] == STEPS and state["zero"] is True
    # the consolidated checkpoint and the final encoder hold the same fp32 weights
    consolidated = load_file(str(ckpt / "model.safetensors"))
    encoder = load_file(str(zero2 / "encoder" / "open_clip_model.safetensors"))
    assert {f"encoder.{k}" for k in encoder} <= set(consolidated)
    assert all(torch.equal(consolidated[f"encoder.{k}"], v) and v.dtype == torch.float32 for k, v in encoder.items())
    # what probe / export-hf / swap read: a plain open_clip local-dir model and a CLIPVisionModel export
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{zero2 / 'encoder'}")
    from mgll.adapters.export_hf import export_hf

    out = export_hf(str(zero2), tmp_path / "hf")
    from transformers import CLIPVisionModel

    hf = CLIPVisionModel.from_pretrained(str(out)).eval()
    model.eval()
    img = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.isfinite(hf(pixel_values=img).pooler_output).all()
        assert torch.isfinite(model.encode_image(img)).all()


@pytest.mark.slow
def test_zero2_killed_after_a_checkpoint_resumes_to_the_uninterrupted_run(fundus_dataset, reference_runs, tmp_path):
    _, zero2 = reference_runs
    killed = tmp_path / "killed"
    env = ds_env()
    cmd = _cmd(fundus_dataset.root, killed, "--set", f"deepspeed={ZERO2}")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pointer = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not pointer.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    # the launcher and both ranks (torchrun starts its workers in sessions of their own)
    ranks = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    for rank in ranks:
        rank.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(ranks, timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    assert not (killed / "summary.json").exists(), "the run finished before it was killed"
    killed_at = int(pointer.read_text().strip().split("-")[1])
    assert 0 < killed_at < STEPS

    _run(cmd + ["--resume"], env)
    a = load_file(str(zero2 / "encoder" / "open_clip_model.safetensors"))
    b = load_file(str(killed / "encoder" / "open_clip_model.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"resumed run differs by {worst}"
    rows = _metrics(killed)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(abs(x["loss"] - y["loss"]) <= 1e-6 for x, y in zip(rows, _metrics(zero2)))
    assert json.loads((killed / "summary.json").read_text())["steps"] == STEPS
    assert not list(killed.rglob("*.tmp")), "a temporary folder survived the kill and the resume"
