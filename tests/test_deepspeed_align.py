"""ZeRO-3 stage-2 (LoRA) alignment of a tiny LLaVA on two CPU processes: it trains, its checkpoint
consolidates to the plain projector + adapter files, which reload with the logits of the
partitioned model, and a run resumed from its ZeRO checkpoint ends where the uninterrupted one did."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed")
pytest.importorskip("peft")

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
from ds_env import ROOT, ds_env  # noqa: E402

ZERO3 = ROOT / "configs" / "deepspeed" / "zero3.json"
LEVELS = ["status", "disease"]


def _align(root, out, logits, *extra, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(HELPERS / "ds_align.py"), str(root / "swapped"), str(root / "data"), str(out), str(logits), str(ZERO3), *extra]
    proc = subprocess.run(cmd, env=ds_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    from mgll.adapters.align import record_caption
    from mgll.adapters.swap import swap
    from mgll.data import make_synthetic
    from mgll.encoder.factory import create_encoder, save_encoder
    from mgll.testing.tiny import make_tiny_llava

    root = tmp_path_factory.mktemp("ds_align")
    ds = make_synthetic(root / "data", kind="fundus", n=24, size=64, seed=1)
    make_tiny_llava(root / "llava", [record_caption(ds.card, r.labels, LEVELS) for r in ds.records])
    torch.manual_seed(0)
    enc, _, _, _, name = create_encoder("mgll-tiny-vit")
    save_encoder(enc, root / "enc", name)
    swap("llava", root / "llava", root / "enc", root / "swapped")
    _align(root, root / "out", root / "logits.safetensors")
    return root


@pytest.mark.slow
def test_zero3_alignment_consolidates_and_reloads_with_the_same_logits(zero3_run):
    from mgll.adapters.align import load_aligned
    from mgll.adapters.swap import load_swapped

    root = zero3_run
    out = root / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["stage"] == 2
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    zero = out / "checkpoints" / "step-0000003" / "zero"
    assert sorted(p.name for p in zero.iterdir()) == [  # ZeRO-3: each rank's partition of the trained weights
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    saved = load_file(str(root / "logits.safetensors"))
    inputs = {k: saved[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    model, _ = load_aligned(root / "swapped", out, with_processor=False)
    before, _ = load_swapped(root / "swapped", with_processor=False)
    with torch.no_grad():
        logits = model.eval()(**inputs).logits
        untrained = before.eval()(**inputs).logits
    torch.testing.assert_close(logits, saved["logits"], rtol=0, atol=1e-5)
    assert (untrained - saved["logits"]).abs().max() > 1e-2, "alignment did not change the model"
    projector = load_file(str(out / "projector.safetensors"))
    assert projector["linear_1.weight"].shape == before.model.multi_modal_projector.linear_1.weight.shape


@pytest.mark.slow
def test_zero3_alignment_resumes_from_its_zero_checkpoint(zero3_run, tmp_path):
    root = zero3_run
    out = tmp_path / "resumed"
    shutil.copytree(root / "out", out)
    shutil.rmtree(out / "checkpoints" / "step-0000003")  # as if killed after the step-2 checkpoint
    for f in ("summary.json", "summary.md", "projector.safetensors"):
        (out / f).unlink()
    shutil.rmtree(out / "adapter")
    _align(root, out, tmp_path / "logits.safetensors", "resume")
    for name in ("projector.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(root / "out" / name)), load_file(str(out / name))
        assert a.keys() == b.keys()
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst <= 1e-6, f"{name}: resumed run differs by {worst}"
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.slow
def test_zero3_bf16_alignment_trains_fp32_lora_beside_bf16_partitions(zero3_run, tmp_path):
    """Found on the H200 (benchmarks/results/gpu.md): under ZeRO-3 in bf16, peft's fp32 LoRA matrices
    beside the bf16 partitions stopped DeepSpeed's stage-3 optimizer on an assertion before step 1."""
    root = zero3_run
    out = tmp_path / "bf16"
    _align(root, out, tmp_path / "logits.safetensors", "bf16", nproc=1)
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(v.dtype == torch.bfloat16 for v in adapter.values())
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k), "LoRA B stayed zero: it never trained"


def test_cast_unpartitioned_leaves_zero3_partitions_alone():
    from mgll.encoder.zero import cast_unpartitioned_

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).to(torch.bfloat16), torch.nn.Linear(2, 2))
    for p in model[2].parameters():
        p.ds_id = 7  # partitioned parameters: DeepSpeed owns their storage
    assert cast_unpartitioned_(model, "bf16") == 2  # model[0]'s weight and bias
    assert [p.dtype for p in model.parameters()] == [torch.bfloat16] * 4 + [torch.float32] * 2
    assert cast_unpartitioned_(model, "no") == 0
