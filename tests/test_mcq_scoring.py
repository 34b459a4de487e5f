"""loglik with a reused prefix cache equals one full forward per option; runs resume; generate extracts."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import mgll.mllm_eval.scoring as scoring
from mgll.data import FUNDUS_DISEASES, make_synthetic
from mgll.data.question_bank import QUESTION, build_bank
from mgll.mllm_eval.extract import extract_answer
from mgll.mllm_eval.scoring import (
    build_prompt,
    encode_prefix,
    format_question,
    load_model,
    naive_option_logliks,
    option_logliks,
    option_text,
    read_answers,
    run_bank,
)
from mgll.testing.tiny import (
    make_tiny_instructblip,
    make_tiny_internvl,
    make_tiny_janus,
    make_tiny_llava,
    make_tiny_llava_next,
    make_tiny_qwen2_vl,
)

torch.set_num_threads(1)

WORDS = [QUESTION, " ".join(FUNDUS_DISEASES), "a b c d . answer with the option's letter from the given choices directly user assistant :"]
MAKERS = {
    "llava": make_tiny_llava, "qwen2_vl": make_tiny_qwen2_vl, "instructblip": make_tiny_instructblip,
    "llava_next": make_tiny_llava_next, "internvl": make_tiny_internvl, "janus": make_tiny_janus,
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("mcqscore")


@pytest.fixture(scope="module")
def bank(root):
    ds = make_synthetic(root / "fundus", n=40, size=16, seed=1)
    return build_bank(ds, k=4, seed=0, split="train", circular=True)


@pytest.fixture(scope="module")
def llava(root):
    make_tiny_llava(root / "llava", WORDS, seed=2)
    return load_model("llava", root / "llava")


def _prefix_and_options(host, processor, options, seed=0):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    prompt = build_prompt(host, processor, format_question(QUESTION, options))
    prefix = encode_prefix(processor, prompt, image, "cpu", torch.float32)
    ids = [processor.tokenizer(option_text(i, o), add_special_tokens=False)["input_ids"] for i, o in enumerate(options)]
    return prefix, ids


@pytest.mark.parametrize("host", ["llava", "qwen2_vl", "instructblip", "llava_next", "internvl", "janus"])
def test_cached_batched_loglik_equals_one_forward_per_option(host, root, llava):
    if host == "llava":
        model, processor = llava
    else:
        MAKERS[host](root / host, WORDS, seed=2)
        model, processor = load_model(host, root / host)
    for seed, options in enumerate([FUNDUS_DISEASES[:4], FUNDUS_DISEASES[3:7], FUNDUS_DISEASES[6:10]]):
        prefix, ids = _prefix_and_options(host, processor, list(options), seed)
        assert len({len(i) for i in ids}) > 1  # options of different lengths: padding is exercised
        fast = option_logliks(host, model, prefix, ids, pad_id=processor.tokenizer.pad_token_id)
        slow = naive_option_logliks(model, prefix, ids)
        assert fast.shape == (len(options),)
        torch.testing.assert_close(fast, slow, atol=1e-4, rtol=0)
        assert int(fast.argmax()) == int(slow.argmax())
        assert len(set(fast.tolist())) == len(options)  # real scores, not a constant


def test_interrupted_run_resumes_and_skips_answered_questions(bank, llava, root, monkeypatch):
    model, processor = llava
    n_variants = sum(len(q.variants(True)) for q in bank.questions)
    full = run_bank(bank, "llava", model, processor, root / "full", progress=False)
    assert full["n_questions"] == len(bank.questions) and full["run"]["scored_now"] == n_variants

    real = scoring.score_variant
    calls = {"n": 0}

    def dies_after_six(*a, **kw):
        if calls["n"] == 6:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(scoring, "score_variant", dies_after_six)
    out = root / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_bank(bank, "llava", model, processor, out, progress=False)
    assert len(read_answers(out)) == 6  # one whole question (4 rotations) + 2 rotations of the next
    with open(out / "answers.jsonl", "a") as f:
        f.write('{"qid": "q9999", "rot')  # a torn last line from a kill mid-write
    monkeypatch.setattr(scoring, "score_variant", real)
    calls_before = len(read_answers(out))
    seen = []
    monkeypatch.setattr(scoring, "score_variant", lambda *a, **kw: seen.append(a[4].qid) or real(*a, **kw))
    res = run_bank(bank, "llava", model, processor, out, progress=False)
    assert res["run"]["cached"] == calls_before == 6 and res["run"]["scored_now"] == n_variants - 6
    assert bank.questions[0].qid not in seen  # the answered question was skipped
    assert seen[:2] == [bank.questions[1].qid] * 2  # only its two missing rotations were scored
    assert res["per_disease"] == full["per_disease"] and res["average"] == full["average"]
    a, b = read_answers(root / "full"), read_answers(out)
    assert {k: v["scores"] for k, v in a.items()} == {k: v["scores"] for k, v in b.items()}  # deterministic
    # a finished run is not rescored
    again = run_bank(bank, "llava", model, processor, out, progress=False)
    assert again["run"]["scored_now"] == 0
    with pytest.raises(ValueError, match=r"run.json: mode is 'loglik' but this run has 'generate'"):
        run_bank(bank, "llava", model, processor, out, mode="generate", progress=False)


def test_generate_mode_extracts_and_lists_failures(bank, llava, root):
    model, processor = llava
    res = run_bank(bank, "llava", model, processor, root / "gen", mode="generate", max_new_tokens=4, progress=False)
    rows = read_answers(root / "gen")
    assert len(rows) == sum(len(q.variants(True)) for q in bank.questions)
    by_qid = {q.qid: q for q in bank.questions}
    for row in rows.values():
        q = by_qid[row["qid"]]
        v = q.variants(True)[row["rotation"]]
        assert extract_answer(row["text"], v.options).index == row["pred_index"]
        assert row["correct"] == (row["pred_index"] == v.answer_index)
    n_fail = sum(r["pred_index"] is None for r in rows.values())
    assert len(res["failures"]) == n_fail
    saved = json.loads((root / "gen" / "results.json").read_text())
    assert saved["failures"] == res["failures"] and (root / "gen" / "results.md").is_file()


def test_prompt_uses_the_processors_chat_template_when_it_has_one(llava):
    _, processor = llava
    plain = build_prompt("llava", processor, "Q?")
    assert plain == "USER: <image>\nQ?\nASSISTANT:"
    assert build_prompt("instructblip", processor, "Q?") == "Q?\nAnswer:"  # its processor inserts the query tokens
    template = ("{% for m in messages %}<s>[{{ m['role'] }}] {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                "<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
                "{% if add_generation_prompt %} [assistant]{% endif %}")
    old = processor.chat_template
    try:
        processor.chat_template = template
        assert build_prompt("llava", processor, "Q?") == "<s>[user] <image> Q? [assistant]"
    finally:
        processor.chat_template = old


def test_medflamingo_loglik_equals_one_forward_per_option_and_runs_a_bank(bank, root):
    pytest.importorskip("open_flamingo", reason="run scripts/install_open_flamingo.sh")
    from mgll.adapters.swap import swap
    from mgll.encoder.factory import create_encoder, save_encoder
    from mgll.testing.tiny import make_tiny_flamingo

    make_tiny_flamingo(root / "flamingo-src", WORDS, vision_width=32, image_size=32, patch_size=8, num_latents=8)
    torch.manual_seed(0)
    enc, _, _, _, name = create_encoder("mgll-tiny-vit")
    save_encoder(enc, root / "flamingo-enc", name)
    swap("medflamingo", root / "flamingo-src", root / "flamingo-enc", root / "flamingo", seed=0)
    model, processor = load_model("medflamingo", root / "flamingo")
    for seed, options in enumerate([FUNDUS_DISEASES[:4], FUNDUS_DISEASES[6:10]]):
        prefix, ids = _prefix_and_options("medflamingo", processor, list(options), seed)
        fast = option_logliks("medflamingo", model, prefix, ids, pad_id=processor.tokenizer.pad_token_id)
        slow = naive_option_logliks(model, prefix, ids)
        torch.testing.assert_close(fast, slow, atol=1e-4, rtol=0)
        assert len(set(fast.tolist())) == len(options)
    small = dataclasses.replace(bank, questions=bank.questions[:3])
    res = run_bank(small, "medflamingo", model, processor, root / "flamingo-run", progress=False)
    n_variants = sum(len(q.variants(True)) for q in small.questions)
    assert res["run"]["scored_now"] == n_variants == len(read_answers(root / "flamingo-run"))
