"""`mgll mcq run --batch-size N` gives batch size 1's answers on every host; sharded runs merge to a one-process run.

Models: the stock tiny folders of `tests/helpers/stock_models.py` (transformers' own classes and processors)
and a swapped tiny Med-Flamingo. Their random init is too flat to test greedy decoding (tied embeddings echo
the prompt's last token, so every answer would be the same newline), so every 2-D weight is redrawn larger
with a fixed seed: the answers then differ from question to question and some rows stop early.

Images get five aspect ratios, so LLaVA-NeXT picks different anyres grids, Qwen2-VL different patch grids and
the rows of one batch have different lengths (the left padding is exercised, which the test checks).
Log-likelihoods may differ from batch size 1 by float rounding only: the batch runs the same tokens at the same
positions through matmuls of another shape (another summation order). Observed <= 1e-5 on sums of 3-6 token
log-probs of magnitude ~10-40 (float32, ~1e-6 relative per op); the bound used is 1e-4, and the argmax must be
equal.
"""

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import mgll.mllm_eval.scoring as scoring
from mgll.adapters.hosts import get_host
from mgll.cli import main as mgll_main
from mgll.data import FUNDUS_DISEASES, make_synthetic
from mgll.data.question_bank import QUESTION, build_bank, write_bank
from mgll.mllm_eval.scoring import load_model, read_answers, run_bank, run_mcq

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
from ds_env import ds_env  # noqa: E402
from stock_models import HOSTS, build_stock  # noqa: E402

torch.set_num_threads(1)

WORDS = [QUESTION, " ".join(FUNDUS_DISEASES), "a b c d . answer with the option's letter from the given choices directly user assistant :"]
SIZES = [(48, 48), (48, 96), (96, 48), (40, 120), (120, 40)]  # (h, w)
N_QUESTIONS = 7  # x 4 rotations = 28 prompts: three full batches of 8 and one of 4


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("mcqbatch")


@pytest.fixture(scope="module")
def bank(root):
    ds = make_synthetic(root / "fundus", n=30, size=32, seed=1)
    full = build_bank(ds, k=4, seed=0, circular=True)
    small = dataclasses.replace(full, questions=full.questions[:N_QUESTIONS])
    for i, q in enumerate(small.questions):
        path = small.image_path(q)
        with Image.open(path) as im:
            im.convert("RGB").resize(SIZES[i % len(SIZES)][::-1]).save(path)
    write_bank(small, root / "bank.jsonl")
    return small


def _liven(model, seed=0):
    """Redraw every 2-D weight N(0, (2/sqrt(fan_in))^2): greedy answers that depend on the image and question.

    Flamingo's tanh gates start at 0 (the images would not reach the LM at all); they are opened to 1.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 2 / p.shape[1] ** 0.5)
            elif name.endswith("_gate"):
                p.fill_(1.0)
    return model


def _model(host, root):
    if host == "medflamingo":
        pytest.importorskip("open_flamingo", reason="run scripts/install_open_flamingo.sh")
        from mgll.adapters.swap import swap
        from mgll.encoder.factory import create_encoder, save_encoder
        from mgll.testing.tiny import make_tiny_flamingo

        if not (root / "medflamingo").exists():
            make_tiny_flamingo(root / "flamingo-src", WORDS, vision_width=32, image_size=32, patch_size=8, num_latents=8)
            torch.manual_seed(0)
            enc, _, _, _, name = create_encoder("mgll-tiny-vit")
            save_encoder(enc, root / "flamingo-enc", name)
            swap("medflamingo", root / "flamingo-src", root / "flamingo-enc", root / "medflamingo", seed=0)
        model, processor = load_model("medflamingo", root / "medflamingo")
        return _liven(model), processor
    if not (root / host).exists():
        build_stock(host, root / host)
    model, processor = load_model(host, root / host)
    return _liven(model), processor


def _rows(out):
    return [json.loads(line) for line in (Path(out) / "answers.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("host", [*HOSTS, "medflamingo"])
def test_batch_of_8_answers_as_batch_of_1(host, root, bank, monkeypatch):
    model, processor = _model(host, root)
    widths = []
    real = scoring.encode_prefixes

    def spy(*a, **kw):
        enc = real(*a, **kw)
        widths.append(enc["attention_mask"].sum(1).tolist())
        return enc

    monkeypatch.setattr(scoring, "encode_prefixes", spy)
    shared_masks = []  # generate inputs whose rotations ran their common prefix once (mgll.mllm_eval.shared_prefix)
    real_shared = scoring.shared_prefix_inputs

    def shared_spy(*a, **kw):
        got = real_shared(*a, **kw)
        shared_masks.append(None if got is None else got["attention_mask"])
        return got

    monkeypatch.setattr(scoring, "shared_prefix_inputs", shared_spy)
    n_prompts = N_QUESTIONS * 4
    for mode in ("loglik", "generate"):
        runs = {}
        for bs in (1, 8):
            out = root / f"{host}-{mode}-{bs}"
            res = run_bank(bank, host, model, processor, out, mode=mode, max_new_tokens=6, batch_size=bs, progress=False)
            assert res["run"]["scored_now"] == n_prompts
            runs[bs] = (res, _rows(out))
        (res1, one), (res8, eight) = runs[1], runs[8]
        assert [(r["qid"], r["rotation"]) for r in one] == [(r["qid"], r["rotation"]) for r in eight]  # same order
        for a, b in zip(one, eight):
            assert a["pred_index"] == b["pred_index"] and a["method"] == b["method"] and a["correct"] == b["correct"], (a, b)
            if mode == "loglik":
                torch.testing.assert_close(torch.tensor(b["scores"]), torch.tensor(a["scores"]), atol=1e-4, rtol=0)
            else:
                assert a["text"] == b["text"], (a, b)
        if mode == "loglik":
            assert len({tuple(r["scores"]) for r in one}) > n_prompts // 2  # real scores, not constants
        else:
            assert len({r["text"] for r in one}) > 3  # answers depend on the question
        assert res1["per_disease"] == res8["per_disease"] and res1["average"] == res8["average"]
    batches = [w for w in widths if len(w) > 1]
    assert [len(w) for w in batches] == [8, 8, 8, 4] * 2  # both modes ran in batches across questions
    assert any(len(set(w)) > 1 for w in batches)  # rows of different lengths: left padding exercised
    assert len(shared_masks) == 8  # the batches of both modes
    if get_host(host).shares_prompt_prefix:
        assert all(m is not None for m in shared_masks)
        # a masked gap between a group's prefix and a row's own tokens (rows of another length in the batch)
        assert any(bool(((m[:, 1:] - m[:, :-1]) < 0).any()) for m in shared_masks[:4])
        assert any(bool(((m[:, 1:] - m[:, :-1]) < 0).any()) for m in shared_masks[4:])
    else:
        assert shared_masks == [None] * 8


def test_interrupted_batched_run_resumes(root, bank, monkeypatch):
    """A kill after two batches (and a torn line) leaves 16 answers; the rerun scores only the other 12."""
    model, processor = _model("llava", root)
    full = run_bank(bank, "llava", model, processor, root / "resume-full", batch_size=8, progress=False)
    real = scoring.score_variants
    calls = {"n": 0}

    def dies_on_third(*a, **kw):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(scoring, "score_variants", dies_on_third)
    out = root / "resume"
    with pytest.raises(KeyboardInterrupt):
        run_bank(bank, "llava", model, processor, out, batch_size=8, progress=False)
    assert len(read_answers(out)) == 16
    with open(out / "answers.jsonl", "a") as f:
        f.write('{"qid": "q9999", "rot')
    seen = []
    monkeypatch.setattr(scoring, "score_variants", lambda *a, **kw: seen.append(len(a[4])) or real(*a, **kw))
    res = run_bank(bank, "llava", model, processor, out, batch_size=8, progress=False)
    assert seen == [8, 4] and res["run"]["cached"] == 16 and res["run"]["scored_now"] == 12
    assert _rows(out) == _rows(root / "resume-full")  # same rows, same order, same scores
    assert res["per_disease"] == full["per_disease"]


def test_shards_merge_into_the_one_process_run(root, bank, capsys):
    """Two shards (library level) with a torn part: a one-process rerun rescores one prompt; `mcq merge` of intact parts."""
    model, processor = _model("llava", root)
    ref = run_bank(bank, "llava", model, processor, root / "one", progress=False)
    spec = json.loads((root / "one" / "run.json").read_text())
    for name in ("shards-a", "shards-b"):
        out = root / name
        out.mkdir()
        (out / "run.json").write_text(json.dumps(spec))
        parts = [run_bank(bank, "llava", model, processor, out, batch_size=3, shard=(r, 2), progress=False, spec=spec)
                 for r in (0, 1)]
        assert [p["scored_now"] for p in parts] == [16, 12]  # questions 0,2,4,6 and 1,3,5, rotations together
        assert sorted(p.name for p in out.glob("answers.part-*")) == ["answers.part-0-of-2.jsonl", "answers.part-1-of-2.jsonl"]
        assert not (out / "answers.jsonl").exists() and not (out / "results.json").exists()
    # a: the process writing part 1 died mid-line; one process finishes the run
    part = root / "shards-a" / "answers.part-1-of-2.jsonl"
    lines = part.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:-1]) + lines[-1][:20])
    res = run_bank(bank, "llava", model, processor, root / "shards-a", progress=False, spec=spec)
    assert res["run"]["scored_now"] == 1 and res["run"]["cached"] == 27
    assert not list((root / "shards-a").glob("answers.part-*"))
    # b: the parts are complete; `mgll mcq merge` writes answers.jsonl and the results
    assert mgll_main(["mcq", "merge", str(root / "shards-b"), "--bank", str(root / "bank.jsonl")]) == 0
    assert "scored 0 prompts now, 28 from the cache" in capsys.readouterr().out
    # merged parts are in bank order; the rescored prompt of (a) is appended after them, as any resumed run appends
    assert [(r["qid"], r["rotation"]) for r in _rows(root / "shards-b")] == [(r["qid"], r["rotation"]) for r in _rows(root / "one")]
    for name in ("shards-a", "shards-b"):
        got, want = (sorted(_rows(root / d), key=lambda r: (r["qid"], r["rotation"])) for d in (name, "one"))
        assert [(r["qid"], r["rotation"], r["pred_index"]) for r in got] == [(r["qid"], r["rotation"], r["pred_index"]) for r in want]
        torch.testing.assert_close(torch.tensor([r["scores"] for r in got]), torch.tensor([r["scores"] for r in want]),
                                   atol=1e-4, rtol=0)
        res = json.loads((root / name / "results.json").read_text())
        assert res["per_disease"] == ref["per_disease"] and res["average"] == ref["average"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_accelerate_launch_two_processes_equals_one(root, bank, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo), batch size 3: rank 0 merges to the answers and results of one
    unbatched process; a relaunch of the finished run scores nothing."""
    if not (root / "llava").exists():
        build_stock("llava", root / "llava")
    one = run_mcq("llava", root / "llava", root / "bank.jsonl", tmp_path / "one", mode="generate", max_new_tokens=6,
                  device="cpu", progress=False)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "mgll.cli", "mcq", "run", "--host", "llava", "--model", str(root / "llava"), "--bank",
           str(root / "bank.jsonl"), "--out", str(tmp_path / "two"), "--mode", "generate", "--max-new-tokens", "6",
           "--batch-size", "3", "--device", "cpu", "--no-progress"]
    env = ds_env(HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    for attempt in range(2):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        n_now = 0 if attempt else 28
        assert proc.stdout.count(f"scored {n_now} prompts now by 2 processes") == 1, proc.stdout  # rank 0 prints
    assert not list((tmp_path / "two").glob("answers.part-*"))
    assert _rows(tmp_path / "two") == _rows(tmp_path / "one")  # byte-level rows: texts, letters, order
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    for key in ("per_disease", "average", "n_questions", "failures"):
        assert two[key] == one[key], key
    assert two["run"]["shards"] == 2


def test_bad_batch_size_is_one_line_and_exit_2(root, bank, capsys):
    argv = ["mcq", "run", "--host", "llava", "--model", str(root), "--bank", str(root / "bank.jsonl"), "--out",
            str(root / "bad"), "--batch-size", "0"]
    assert mgll_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mgll mcq: error: --batch-size 0: expected a whole number >= 1"]
    assert mgll_main(["mcq", "merge", str(root / "nowhere")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    os.makedirs(root / "empty-run", exist_ok=True)
    assert mgll_main(["mcq", "merge", str(root / "empty-run")]) == 2
    assert "no run.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="batch size 0"):
        run_bank(bank, "llava", None, None, root / "bad2", batch_size=0)


def test_rows_that_stop_early_carry_no_pad_text(root, bank):
    """A row that ends before the others is filled with the pad id; with a pad token that decodes to text (some
    checkpoints pad with a plain token) the batch must still answer what the row generated alone."""
    model, processor = _model("janus", root)
    plain = processor.tokenizer("the", add_special_tokens=False)["input_ids"][0]
    model.generation_config.pad_token_id = plain
    # make some rows stop early by design: a token that some row generates second (and no row first) becomes a
    # stop token too, whatever the random model and the synthetic bank happen to produce
    run_bank(bank, "janus", model, processor, root / "janus-pad-probe", mode="generate", max_new_tokens=6,
             progress=False)
    gen = [processor.tokenizer(r["text"], add_special_tokens=False)["input_ids"] for r in _rows(root / "janus-pad-probe")]
    firsts = {g[0] for g in gen if g}
    second = next(g[1] for g in gen if len(g) > 2 and g[1] not in firsts and g[1] != plain)
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [*(eos if isinstance(eos, (list, tuple)) else [eos]), second]
    stops = scoring._stop_ids("janus", model)
    one, eight = (run_bank(bank, "janus", model, processor, root / f"janus-pad-{bs}", mode="generate", max_new_tokens=6,
                           batch_size=bs, progress=False) for bs in (1, 8))
    a, b = _rows(root / "janus-pad-1"), _rows(root / "janus-pad-8")
    assert [r["text"] for r in a] == [r["text"] for r in b]
    assert one["per_disease"] == eight["per_disease"]
    assert stops and plain not in stops
    ended = [r["text"] for r in a if len(processor.tokenizer(r["text"], add_special_tokens=False)["input_ids"]) < 5]
    assert ended  # some rows did stop early, so pads were written after them in the batch


def test_a_tokenizer_without_pad_token_still_batches(root, bank):
    """Some checkpoints ship no pad token: the batch pads with EOS under the mask, and the tokenizer is left as it was."""
    model, processor = _model("llava", root)
    tok = processor.tokenizer
    old, side = tok.pad_token, tok.padding_side
    tok.pad_token = None
    try:
        small = dataclasses.replace(bank, questions=bank.questions[:3])
        out = run_bank(small, "llava", model, processor, root / "nopad-8", batch_size=8, progress=False)
        assert tok.pad_token is None and tok.padding_side == side
    finally:
        tok.pad_token = old
    ref = run_bank(small, "llava", model, processor, root / "nopad-1", progress=False)
    assert [r["pred_index"] for r in _rows(root / "nopad-8")] == [r["pred_index"] for r in _rows(root / "nopad-1")]
    assert out["per_disease"] == ref["per_disease"]
