"""``mgll mcq build|run|compare`` end to end on synthetic fundus data, a tiny LLaVA and its MGLL swap."""

import argparse
import json

import pytest
import torch

from mgll.adapters.cli import register as register_adapters
from mgll.data import FUNDUS_DISEASES, make_synthetic
from mgll.data.question_bank import QUESTION, load_bank
from mgll.encoder.factory import create_encoder, save_encoder
from mgll.mllm_eval.cli import register
from mgll.testing.tiny import make_tiny_llava

torch.set_num_threads(1)

WORDS = [QUESTION, " ".join(FUNDUS_DISEASES), "a b c d . answer with the option's letter from the given choices directly user assistant :"]


def _parser():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    register_adapters(sub)
    return parser


def _run(argv):
    args = _parser().parse_args(argv)
    return args.func(args)


def test_build_run_resume_and_compare(tmp_path, capsys):
    make_synthetic(tmp_path / "fundus", n=24, size=16, seed=4)
    assert _run(["mcq", "build", str(tmp_path / "fundus"), str(tmp_path / "bank.jsonl"), "--split", "train", "--seed", "3"]) == 0
    bank = load_bank(tmp_path / "bank.jsonl")
    assert bank.seed == 3 and bank.split == "train" and all(q.split == "train" for q in bank.questions)
    assert "per disease: AMD" in capsys.readouterr().out

    make_tiny_llava(tmp_path / "llava", WORDS, seed=1)
    torch.manual_seed(0)
    enc, _, _, _, name = create_encoder("mgll-tiny-vit")
    save_encoder(enc, tmp_path / "enc", name)
    assert _run(["swap", "--host", "llava", "--mllm", str(tmp_path / "llava"), "--encoder", str(tmp_path / "enc"),
                 "--out", str(tmp_path / "swapped")]) == 0

    common = ["--bank", str(tmp_path / "bank.jsonl"), "--host", "llava", "--no-progress"]
    assert _run(["mcq", "run", "--model", str(tmp_path / "llava"), "--out", str(tmp_path / "r_base"), "--label", "tiny", *common]) == 0
    assert _run(["mcq", "run", "--model", str(tmp_path / "swapped"), "--out", str(tmp_path / "r_mgll"), *common]) == 0
    out = capsys.readouterr().out
    assert f"scored {len(bank.questions)} prompts now, 0 from the cache" in out
    # rerunning the same command is a no-op resume
    assert _run(["mcq", "run", "--model", str(tmp_path / "swapped"), "--out", str(tmp_path / "r_mgll"), *common]) == 0
    assert f"scored 0 prompts now, {len(bank.questions)} from the cache" in capsys.readouterr().out
    res = json.loads((tmp_path / "r_mgll" / "results.json").read_text())
    assert res["label"] == "swapped" and res["n_questions"] == len(bank.questions)
    assert res["run"]["model"].endswith("swapped") and res["run"]["mode"] == "loglik"

    assert _run(["mcq", "compare", str(tmp_path / "r_base"), f"tiny + MGLL={tmp_path / 'r_mgll'}", "--out", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out
    assert "| tiny + MGLL |" in table and "| *Δ vs tiny* |" in table
    cmp = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    base, mgll = cmp["runs"]
    assert cmp["deltas"]["tiny + MGLL"]["average"] == pytest.approx(mgll["average"] - base["average"])
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 1000


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.jsonl: question bank not found"):
        _run(["mcq", "run", "--host", "llava", "--model", str(tmp_path), "--bank", str(tmp_path / "nope.jsonl"),
              "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match=r"unknown host 'gpt'"):
        _run(["mcq", "run", "--host", "gpt", "--model", str(tmp_path), "--bank", "b.jsonl", "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match=r"no results.json"):
        _run(["mcq", "compare", str(tmp_path), "--out", str(tmp_path / "c")])
    with pytest.raises(SystemExit):
        _run(["mcq", "run", "--host", "llava", "--model", "m", "--bank", "b", "--out", "o", "--mode", "guess"])
