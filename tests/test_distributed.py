"""Two gloo processes see the global batch: same loss and gradients as one process (<= 1e-5)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
from dist_common import build, global_batch  # noqa: E402


def _single_process(loss_name):
    model = build(loss_name)
    images, labels = global_batch()
    out = model(images, labels)
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("loss_name", ["mgll", "clip", "siglip"])
def test_two_processes_match_one(tmp_path, loss_name):
    out = tmp_path / "grads.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(HELPERS / "dist_step.py"), loss_name, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = load_file(str(out))
    loss, grads = _single_process(loss_name)
    assert abs(got["loss"].item() - loss.item()) <= 1e-5
    assert set(grads) == {k[len("grad."):] for k in got if k.startswith("grad.")}
    worst = max((got[f"grad.{n}"] - g).abs().max().item() for n, g in grads.items())
    assert worst <= 1e-5, f"largest gradient difference {worst}"
    assert any(g.abs().max() > 0 for g in grads.values())


@pytest.mark.slow
def test_two_process_training_follows_the_one_process_trajectory(fundus_dataset, tmp_path):
    """The trainer under torchrun (gloo) sees the same global batches and losses as one process."""
    common = ["--data", str(fundus_dataset.root), "--no-progress", "--set", "train.batch_size=16",
              "--set", "train.steps=5", "--set", "train.save_every=5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"p{nproc}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "mgll.cli", "train", "--out", str(out), *common]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[nproc] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in runs[2]] == [1, 2, 3, 4, 5]  # one writer, each step once
    for a, b in zip(runs[1], runs[2]):
        assert abs(a["loss"] - b["loss"]) <= 1e-4, (a, b)


_EXIT_SCRIPT = """
import atexit, sys
import torch.distributed as dist
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
atexit.register(lambda: print("group alive at exit:", dist.is_initialized(), flush=True))
sys.argv = ["mgll", *sys.argv[2:]]
from mgll.cli import entry
entry()
"""


@pytest.mark.parametrize("ok", [True, False])
def test_the_program_closes_its_process_group_before_exit_only_after_success(tmp_path, ok):
    """A rank leaving with its gloo group alive can abort at interpreter shutdown (SIGABRT), which failed a
    resumed ZeRO-2 run under torchrun in CI after its outputs were written; `mgll` closes the group when a
    command succeeds, and leaves it alone after an error (a peer may still be in a collective)."""
    args = ["synth", "--n", "4", "--size", "32", str(tmp_path / "data")] if ok else ["check-data", str(tmp_path / "nowhere")]
    proc = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, str(tmp_path / "store"), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == (0 if ok else 2), proc.stderr[-2000:]
    assert f"group alive at exit: {not ok}" in proc.stdout
