"""Question bank: one right option, no distractor the image has, seeded order, rotations, JSONL round trip."""

import json

import pytest
import torch

from mgll.data import FUNDUS_DISEASES, make_synthetic
from mgll.data.question_bank import BANK_VERSION, build_bank, canonical_disease, load_bank, write_bank

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("mcqbank") / "fundus", n=80, size=16, seed=3)


def test_every_question_has_exactly_one_right_option_and_no_distractor_the_image_has(ds):
    bank = build_bank(ds, k=4, seed=0)
    by_image = {r.image: r for r in ds.records}
    multi = 0
    for q in bank.questions:
        rec = by_image[q.image]
        has = {canonical_disease(d) for d in rec.labels["disease"]} - {None}
        assert len(q.options) == 4 and len(set(q.options)) == 4
        assert set(q.options) <= set(FUNDUS_DISEASES)
        assert [o in has for o in q.options].count(True) == 1  # exactly one correct option
        assert q.options[q.answer_index] == q.answer and q.answer in has
        multi += len(has & set(FUNDUS_DISEASES)) > 1
    assert multi > 0  # the synthetic set has images with several of the ten: the rule was exercised
    # one question per image with one of the ten; normal fundus images are not questions
    n_with = sum(bool(set(r.labels["disease"]) & set(FUNDUS_DISEASES)) for r in ds.records)
    assert len(bank.questions) == n_with < len(ds.records)
    assert sum(bank.counts().values()) == len(bank.questions) and list(bank.counts()) == list(FUNDUS_DISEASES)


def test_seeded_order_same_seed_same_bank_different_seed_different(ds, tmp_path):
    a, b, c = build_bank(ds, seed=0), build_bank(ds, seed=0), build_bank(ds, seed=1)
    write_bank(a, tmp_path / "a.jsonl")
    write_bank(b, tmp_path / "b.jsonl")
    write_bank(c, tmp_path / "c.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert [q.options for q in a.questions] != [q.options for q in c.questions]
    # the right answer's position is spread over the slots, not always first
    assert len({q.answer_index for q in a.questions}) == 4
    # a question depends only on (seed, image): a split's bank agrees with the full bank
    test = build_bank(ds, seed=0, split="test")
    full = {q.image: q.options for q in a.questions}
    assert all(full[q.image] == q.options for q in test.questions)


def test_rotations_cover_every_slot_and_keep_the_answer(ds):
    q = build_bank(ds, k=4, seed=0, circular=True).questions[0]
    vs = q.variants(circular=True)
    assert [v.rotation for v in vs] == [0, 1, 2, 3]
    assert sorted(v.answer_index for v in vs) == [0, 1, 2, 3]
    for v in vs:
        assert v.options[v.answer_index] == q.answer and sorted(v.options) == sorted(q.options)
    assert vs[1].options == q.options[1:] + q.options[:1]
    assert q.variants(circular=False) == vs[:1]


def test_jsonl_round_trip_has_version_and_counts(ds, tmp_path):
    bank = build_bank(ds, k=3, seed=5, circular=True, split="train")
    path = write_bank(bank, tmp_path / "bank.jsonl")
    head = json.loads(path.read_text().splitlines()[0])
    assert head["version"] == BANK_VERSION and head["k"] == 3 and head["circular"] is True
    assert head["counts"] == bank.counts() and head["n_questions"] == len(bank.questions)
    back = load_bank(path)
    assert back.questions == bank.questions and back.fingerprint() == bank.fingerprint()
    lines = path.read_text().splitlines()
    bad = json.loads(lines[1])
    bad["answer_index"] = (bad["answer_index"] + 1) % 3
    (tmp_path / "bad.jsonl").write_text("\n".join([lines[0], json.dumps(bad)]) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: answer_index"):
        load_bank(tmp_path / "bad.jsonl")
    (tmp_path / "old.jsonl").write_text(json.dumps({**head, "version": 99}) + "\n")
    with pytest.raises(ValueError, match=r"old.jsonl:1: version: expected 1, got 99"):
        load_bank(tmp_path / "old.jsonl")


def test_synonyms_resolve_and_bad_settings_are_refused(ds):
    assert canonical_disease("AMD") == "age-related macular degeneration"
    assert canonical_disease("tesselated fundus") == "tessellation"
    assert canonical_disease("normal fundus") is None
    with pytest.raises(ValueError, match=r"k=11"):
        build_bank(ds, k=11)
    with pytest.raises(ValueError, match=r"level 'nope' not in the dataset card"):
        build_bank(ds, level="nope")


def test_max_per_disease_caps_each_disease_and_keeps_the_rest(ds, tmp_path):
    full = build_bank(ds, seed=0)
    counts = full.counts()
    cap = 3
    assert max(counts.values()) > cap  # the cap bites on this bank
    capped = build_bank(ds, seed=0, max_per_disease=cap)
    assert capped.counts() == {d: min(n, cap) for d, n in counts.items()}
    assert set(capped.questions) <= set(full.questions)  # the same questions, not redrawn ones
    order = [q.qid for q in full.questions]
    assert [q.qid for q in capped.questions] == [q for q in order if q in {c.qid for c in capped.questions}]
    write_bank(capped, tmp_path / "bank.jsonl")
    back = load_bank(tmp_path / "bank.jsonl")
    assert back.max_per_disease == cap and back.questions == capped.questions
    assert json.loads((tmp_path / "bank.jsonl").read_text().splitlines()[0])["max_per_disease"] == cap
    assert build_bank(ds, seed=0, max_per_disease=10**6).questions == full.questions
    with pytest.raises(ValueError, match="max_per_disease=0"):
        build_bank(ds, max_per_disease=0)
