"""The offline Table-2 demo: two towers into copies of one tiny LLaVA, same training budget, compared."""

import json

import torch

from mgll.adapters.hosts import get_host
from mgll.adapters.swap import load_swapped
from mgll.data import load_dataset, make_synthetic
from mgll.encoder.factory import create_encoder, save_encoder
from mgll.mllm_eval.demo import instruction_pairs, run_mcq_demo

torch.set_num_threads(1)


def test_demo_swaps_trains_scores_and_compares_both_towers(tmp_path):
    make_synthetic(tmp_path / "data", n=40, size=16, seed=0)
    for i, name in enumerate(("clip", "mgll")):
        torch.manual_seed(i)
        enc, _, _, _, arch = create_encoder("mgll-tiny-vit")
        save_encoder(enc, tmp_path / f"enc-{name}", arch)
    summary = run_mcq_demo(tmp_path / "out", tmp_path / "data", tmp_path / "enc-clip", tmp_path / "enc-mgll",
                           steps=3, batch_size=4, progress=False)
    out = tmp_path / "out"
    assert [r["label"] for r in summary["runs"]] == ["tiny LLaVA", "tiny LLaVA + MGLL"]
    assert set(summary["deltas"]) == {"tiny LLaVA + MGLL"}
    assert summary["training"]["clip"]["steps"] == summary["training"]["mgll"]["steps"] == 3
    towers = []
    for name in ("clip", "mgll"):
        res = json.loads((out / f"mcq-{name}" / "results.json").read_text())
        assert res["n_questions"] > 0 and res["run"]["model"].endswith(f"trained-{name}")
        model, _ = load_swapped(out / f"trained-{name}", with_processor=False)
        swapped, _ = load_swapped(out / f"swap-{name}", with_processor=False)
        host = get_host("llava")
        # the tower stayed frozen, the projector trained
        for (a, p), (_, q) in zip(host.tower(model).named_parameters(), host.tower(swapped).named_parameters()):
            assert torch.equal(p, q), a
        assert not torch.equal(host.projector(model).linear_1.weight, host.projector(swapped).linear_1.weight)
        towers.append(next(host.tower(model).parameters()))
    assert not torch.equal(*towers)  # the two copies differ in their tower
    a = (out / "mcq-clip" / "answers.jsonl").read_text().splitlines()
    b = (out / "mcq-mgll" / "answers.jsonl").read_text().splitlines()
    assert len(a) == len(b) and a != b
    assert "| *Δ vs tiny LLaVA* |" in (out / "comparison" / "comparison.md").read_text()
    # training pairs: captions for every train record plus MCQ instructions answered as scoring scores them
    _, processor = load_swapped(out / "swap-clip")
    ds = load_dataset(tmp_path / "data")
    pairs = instruction_pairs(ds, processor, "train")
    assert sum(p[2].startswith("status:") for p in pairs) == len(ds.split("train"))
    mcq = [p for p in pairs if "Which of the following" in p[1]]
    assert mcq and all(p[2][0] in "ABCD" and p[2][1:3] == ". " for p in mcq)
