"""Stage 1 moves only the projector and lowers the caption loss; resume is exact; QLoRA stage 2 runs on CPU."""

import argparse
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mgll.adapters.align import AlignConfig, align, load_aligned, record_caption
from mgll.adapters.cli import register
from mgll.adapters.swap import load_swapped, swap
from mgll.data import make_synthetic
from mgll.encoder.factory import create_encoder, save_encoder
from mgll.testing.tiny import make_tiny_llava

LEVELS = ["status", "disease"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    ds = make_synthetic(root / "data", kind="fundus", n=24, size=64, seed=1)
    captions = [record_caption(ds.card, r.labels, LEVELS) for r in ds.records]
    make_tiny_llava(root / "llava", captions)
    torch.manual_seed(0)
    enc, _, _, _, name = create_encoder("mgll-tiny-vit")
    save_encoder(enc, root / "enc", name)
    swap("llava", root / "llava", root / "enc", root / "swapped")
    return root, ds


def test_captions_come_from_the_levels(setup):
    _, ds = setup
    rec = ds.records[0]
    cap = record_caption(ds.card, rec.labels, LEVELS)
    assert cap == f"status: {', '.join(rec.labels['status'])}. disease: {', '.join(rec.labels['disease'])}."
    with pytest.raises(ValueError, match=r"caption levels \['grade'\] not in the dataset card"):
        record_caption(ds.card, rec.labels, ["grade"])


def test_stage1_trains_only_the_projector_and_lowers_the_loss(setup):
    root, _ = setup
    out = root / "stage1"
    align(AlignConfig(model=str(root / "swapped"), data=str(root / "data"), out=str(out), split=None, levels=LEVELS,
                      steps=20, batch_size=4, lr=3e-2), progress=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["pairs"] == 24
    assert summary["loss_last"] < summary["loss_first"] - 0.05, summary
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 20
    assert "| 1 | frozen | 20 |" in (out / "summary.md").read_text()
    before, _ = load_swapped(root / "swapped", with_processor=False)
    after, _ = load_aligned(root / "swapped", out, with_processor=False)
    changed = []
    for (name, a), (_, b) in zip(before.state_dict().items(), after.state_dict().items()):
        if name.startswith("model.multi_modal_projector."):
            changed.append(not torch.equal(a, b))
        else:
            assert torch.equal(a, b), f"{name} changed in stage 1"
    assert changed and all(changed)


def test_resume_reproduces_the_uninterrupted_run(setup):
    root, _ = setup
    out = root / "resume"
    cfg = AlignConfig(model=str(root / "swapped"), data=str(root / "data"), out=str(out), split=None, levels=LEVELS,
                      steps=4, batch_size=4, lr=1e-2, save_every=2)
    align(cfg, progress=False)
    full = load_file(str(out / "projector.safetensors"))
    with pytest.raises(FileExistsError, match="already holds a finished"):
        align(cfg, progress=False)
    # simulate a crash after step 2: only the step-2 checkpoint survives
    shutil.rmtree(out / "checkpoints" / "step-0000004")
    for f in ("summary.json", "summary.md", "projector.safetensors"):
        (out / f).unlink()
    align(cfg, resume=True, progress=False)
    resumed = load_file(str(out / "projector.safetensors"))
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_qlora_stage2_runs_on_cpu_and_the_adapter_reloads(setup):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    root, _ = setup
    out = root / "qlora"
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["align", "--model", str(root / "swapped"), "--data", str(root / "data"), "--out", str(out),
                              "--stage", "2", "--qlora", "--split", "all", "--levels", "status,disease", "--steps", "2",
                              "--batch-size", "2", "--lr", "1e-2", "--no-progress"])
    assert args.func(args) == 0
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert saved and all("language_model" in k and "lora_" in k for k in saved)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # LoRA B starts at zero: it trained
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert "language_model" in config["target_modules"]
    assert (out / "projector.safetensors").is_file()
    model, _ = load_aligned(root / "swapped", out, with_processor=False)
    state = model.state_dict()
    for k, v in saved.items():
        match = [s for s in state if s.endswith(k.replace(".weight", ".default.weight"))]
        assert len(match) == 1 and torch.equal(state[match[0]], v), k


def test_diverging_alignment_stops_and_writes_no_checkpoint(setup):
    """Issue 13: a NaN loss used to raise a bare FloatingPointError; now it is skipped, and 3 in a row stop the run."""
    from mgll.encoder.finite import NonFiniteError

    root, _ = setup
    out = root / "diverge"
    cfg = AlignConfig(model=str(root / "swapped"), data=str(root / "data"), out=str(out), split=None, levels=LEVELS,
                      steps=10, batch_size=4, lr=1e30, save_every=5, grad_clip=0.0)
    with pytest.raises(NonFiniteError, match=r"non-finite loss=nan; 3 steps in a row"):
        align(cfg, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] is None and rows[-1]["skipped"] == ["loss=nan"]
    assert not (out / "projector.safetensors").exists() and not (out / "summary.json").exists()
    for ckpt in (out / "checkpoints").glob("step-*"):  # any save before the NaN holds finite weights
        assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "projector.safetensors")).values())


def test_alignment_resume_passes_over_a_corrupt_checkpoint(setup, capsys):
    root, _ = setup
    out = root / "corrupt"
    kw = dict(model=str(root / "swapped"), data=str(root / "data"), out=str(out), split=None, levels=LEVELS,
              batch_size=4, lr=3e-2, save_every=3, keep_checkpoints=3)
    align(AlignConfig(steps=6, **kw), progress=False)
    (out / "summary.json").unlink()
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    proj = newest / "projector.safetensors"
    proj.write_bytes(proj.read_bytes()[:-8])
    align(AlignConfig(steps=9, **kw), resume=True, progress=False)
    assert f"passed over checkpoint {newest.name}" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["steps"] == 9
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 10))
