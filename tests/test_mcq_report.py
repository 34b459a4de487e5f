"""Per-disease accuracy, unweighted average, the + MGLL delta and its paired CI on hand-made result sets."""

import json

import pytest
import torch

from mgll.data.question_bank import Question, QuestionBank, write_bank
from mgll.mllm_eval.paired import paired_accuracy
from mgll.mllm_eval.report import compare, compare_table, load_results, mcq_verdict, summarise, write_results

torch.set_num_threads(1)

AMD, CAT, GLA = "age-related macular degeneration", "cataract", "glaucoma"
OPTS = (AMD, CAT, GLA, "myopia")


def _bank(answers, circular=False):
    qs = [Question(f"q{i}", f"images/{i}.png", "test", a, OPTS, OPTS.index(a)) for i, a in enumerate(answers)]
    return QuestionBank(questions=qs, k=4, circular=circular)


def _answers(bank, right):
    """``right[i]``: per-rotation correctness of question i (a bool or a list of bools)."""
    rows = {}
    for q, r in zip(bank.questions, right):
        for v in q.variants(bank.circular):
            ok = r[v.rotation] if isinstance(r, list) else r
            pred = v.answer_index if ok else (v.answer_index + 1) % 4
            rows[(v.qid, v.rotation)] = {"qid": v.qid, "rotation": v.rotation, "pred_index": pred,
                                         "correct": ok, "method": "loglik"}
    return rows


def test_per_disease_and_unweighted_average():
    bank = _bank([AMD, AMD, CAT, CAT, CAT, CAT, GLA])
    res = summarise(bank, _answers(bank, [True, False, True, True, True, False, False]), label="base")
    per = res["per_disease"]
    assert (per[AMD]["n"], per[AMD]["correct"], per[AMD]["accuracy"]) == (2, 1, 50.0)
    assert (per[CAT]["n"], per[CAT]["accuracy"]) == (4, 75.0)
    assert (per[GLA]["n"], per[GLA]["accuracy"]) == (1, 0.0)
    assert per["myopia"] == {"n": 0, "correct": 0, "accuracy": None}  # absent: not in the average
    assert res["average"] == pytest.approx((50 + 75 + 0) / 3)  # 41.67, unweighted
    assert res["overall"] == pytest.approx(100 * 4 / 7)  # 57.14, question-weighted, for contrast
    assert res["n_questions"] == 7


def test_circular_question_counts_only_if_every_rotation_is_right():
    bank = _bank([AMD, CAT], circular=True)
    res = summarise(bank, _answers(bank, [[True, True, True, False], [True] * 4]), label="c")
    assert res["per_disease"][AMD]["accuracy"] == 0.0 and res["per_disease"][CAT]["accuracy"] == 100.0
    assert res["variant_accuracy"] == pytest.approx(100 * 7 / 8)
    missing = _answers(bank, [True, True])
    del missing[("q1", 2)]
    part = summarise(bank, missing, label="c")
    assert part["unanswered"] == ["q1"] and part["n_questions"] == 1


def test_compare_table_delta_json_and_png(tmp_path):
    bank = _bank([AMD, AMD, CAT, CAT, CAT, CAT, GLA])
    base = summarise(bank, _answers(bank, [True, False, True, True, True, False, False]), label="LLaVA-Med")
    mgll = summarise(bank, _answers(bank, [True, True, True, True, True, True, False]), label="LLaVA-Med + MGLL")
    write_results(tmp_path / "a", base)
    write_results(tmp_path / "b", mgll)
    runs = [load_results(tmp_path / "a"), load_results(tmp_path / "b" / "results.json")]
    summary = compare(runs, tmp_path / "cmp")
    d = summary["deltas"]["LLaVA-Med + MGLL"]
    assert d["base"] == "LLaVA-Med"
    assert d["per_disease"][AMD] == pytest.approx(50.0) and d["per_disease"][CAT] == pytest.approx(25.0)
    assert d["per_disease"][GLA] == 0.0 and d["per_disease"]["myopia"] is None
    assert d["average"] == pytest.approx((100 + 100 + 0) / 3 - (50 + 75 + 0) / 3)  # +25.00
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    lines = md.splitlines()
    assert lines[0].startswith("| Model | AMD | Cataract | CSR | DR | Glaucoma | Media Haze | Myopia |")
    assert lines[0].endswith("| Average |")
    assert lines[2] == "| *questions (n)* | 2 | 4 | 0 | 0 | 1 | 0 | 0 | 0 | 0 | 0 | 7 |"
    assert lines[3] == "| LLaVA-Med | 50.00 | 75.00 | - | - | 0.00 | - | - | - | - | - | 41.67 |"
    assert lines[4] == "| LLaVA-Med + MGLL | 100.00 | 100.00 | - | - | 0.00 | - | - | - | - | - | 66.67 |"
    assert lines[5] == "| *Δ vs LLaVA-Med* | +50.00 | +25.00 | - | - | +0.00 | - | - | - | - | - | +25.00 |"
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["deltas"] == summary["deltas"]
    assert (tmp_path / "cmp" / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Δ" not in compare_table([base])  # no pair, no delta row
    with pytest.raises(ValueError, match=r"duplicate run labels \['LLaVA-Med'\]"):
        compare([base, base], tmp_path / "dup")


# ----------------------------------------------------------------------------- paired bootstrap over questions

BASE_RIGHT = [True, False, True, True, True, False, False]  # AMD 1/2, CAT 3/4, GLA 0/1
MGLL_RIGHT = [True, True, True, True, True, True, False]  # AMD 2/2, CAT 4/4, GLA 0/1


def test_paired_delta_per_disease_and_average_on_known_answers(tmp_path):
    bank = _bank([AMD, AMD, CAT, CAT, CAT, CAT, GLA])
    base = summarise(bank, _answers(bank, BASE_RIGHT), label="LLaVA-Med")
    mgll = summarise(bank, _answers(bank, MGLL_RIGHT), label="LLaVA-Med + MGLL")
    assert base["questions"][1] == {"qid": "q1", "disease": AMD, "correct": False}
    summary = compare([base, mgll], tmp_path / "cmp", bootstrap=1000, seed=0)
    p = summary["deltas"]["LLaVA-Med + MGLL"]["paired"]
    amd, cat, gla = (p["per_disease"][d] for d in (AMD, CAT, GLA))
    # AMD: one of two questions flips, so a redraw of 2 gives 0, 50 or 100 (p = 1/4, 1/2, 1/4)
    assert (amd["delta"], amd["lo"], amd["hi"], amd["n"]) == (50.0, 0.0, 100.0, 2)
    # CAT: one of four flips; P(Δ >= 75) = 5.1% but P(Δ = 100) = 0.4%, so the 97.5th percentile is 75
    assert (cat["delta"], cat["lo"], cat["hi"], cat["n"]) == (25.0, 0.0, 75.0, 4)
    assert (gla["delta"], gla["lo"], gla["hi"]) == (0.0, 0.0, 0.0)  # both wrong: no doubt about Δ = 0
    assert set(p["per_disease"]) == {AMD, CAT, GLA}  # diseases without questions are not in the average
    avg = p["average"]
    assert avg["delta"] == pytest.approx(25.0) and avg["lo"] == 0.0 and avg["delta"] <= avg["hi"] <= (100 + 75 + 0) / 3
    assert (avg["n"], avg["bootstrap"], avg["replicates"], avg["seed"], avg["excludes_zero"]) == (7, 1000, 1000, 0, False)
    lines = summary["table"].splitlines()
    assert lines[5] == "| *Δ vs LLaVA-Med* | +50.00 | +25.00 | - | - | +0.00 | - | - | - | - | - | +25.00 |"  # no *
    assert lines[6].startswith("| *95% CI (paired)* | [+0.00, +100.00] | [+0.00, +75.00] | - | - | [+0.00, +0.00] | - |")
    assert "paired bootstrap over the same questions, redrawn within each disease (1000 replicates, seed 0)" in summary["table"]
    assert mcq_verdict(summary) == (f"LLaVA-Med + MGLL − LLaVA-Med = +25.00 [+0.00, {avg['hi']:+.2f}]: "
                                    "no difference at this size")
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert saved["deltas"]["LLaVA-Med + MGLL"]["paired"] == p
    same = paired_accuracy(base, summarise(bank, _answers(bank, BASE_RIGHT), label="copy"), summary["diseases"], 200, 0)
    assert all((s["delta"], s["lo"], s["hi"]) == (0.0, 0.0, 0.0) for s in [*same["per_disease"].values(), same["average"]])


def test_paired_delta_excludes_zero_when_many_questions_flip(tmp_path):
    bank = _bank([CAT] * 12 + [AMD] * 4)
    base = summarise(bank, _answers(bank, [False] * 12 + [True] * 4), label="X")
    mgll = summarise(bank, _answers(bank, [True] * 11 + [False] + [True] * 4), label="X + MGLL")
    summary = compare([base, mgll], tmp_path / "cmp", bootstrap=500, seed=1)
    p = summary["deltas"]["X + MGLL"]["paired"]
    cat = p["per_disease"][CAT]
    assert cat["delta"] == pytest.approx(100 * 11 / 12) and cat["lo"] > 50 and cat["hi"] == 100.0 and cat["excludes_zero"]
    assert p["average"]["delta"] == pytest.approx(100 * 11 / 12 / 2) and p["average"]["excludes_zero"]
    delta_row = summary["table"].splitlines()[5]
    assert delta_row.startswith("| *Δ vs X* | +0.00 | +91.67* |") and delta_row.endswith(f"| {100 * 11 / 24:+.2f}* |")
    assert mcq_verdict(summary).endswith(": X + MGLL higher") and mcq_verdict(summary, disease=AMD).endswith("+0.00]: no difference at this size")


def test_paired_circular_bank_resamples_questions_not_rotations(tmp_path):
    bank = _bank([AMD, AMD, CAT], circular=True)
    base = summarise(bank, _answers(bank, [[True, True, True, False], True, True]), label="X")  # q0 fails one rotation
    mgll = summarise(bank, _answers(bank, [True, True, True]), label="X + MGLL")
    p = compare([base, mgll], tmp_path / "cmp", bootstrap=300)["deltas"]["X + MGLL"]["paired"]
    amd = p["per_disease"][AMD]
    assert amd["n"] == 2 and amd["delta"] == 50.0 and (amd["lo"], amd["hi"]) == (0.0, 100.0)  # 2 questions, not 8 prompts
    assert p["n"] == 3


def test_paired_refuses_different_questions_and_rebuilds_old_results(tmp_path):
    bank = _bank([AMD, AMD, CAT, CAT, CAT, CAT, GLA])
    small = QuestionBank(questions=bank.questions[:-1], k=4)
    base = summarise(bank, _answers(bank, BASE_RIGHT), label="X")
    other = summarise(small, _answers(small, MGLL_RIGHT[:-1]), label="X + MGLL")
    with pytest.raises(ValueError, match=r"'X \+ MGLL' vs 'X': not scored on the same questions \(1 only in 'X': q6; 0 only"):
        compare([base, other], tmp_path / "cmp")
    # a results.json from before per-question outcomes were stored: rebuilt from answers.jsonl + the bank
    write_bank(bank, tmp_path / "bank.jsonl")
    rows = _answers(bank, BASE_RIGHT)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
    old = {k: v for k, v in base.items() if k != "questions"}
    old["run"] = {"bank": str(tmp_path / "bank.jsonl")}
    write_results(tmp_path / "run", old)
    assert load_results(tmp_path / "run")["questions"] == base["questions"]
    (tmp_path / "run" / "answers.jsonl").unlink()
    gone = load_results(tmp_path / "run")
    assert gone["questions"] is None
    summary = compare([gone, summarise(bank, _answers(bank, MGLL_RIGHT), label="X + MGLL")], tmp_path / "cmp2")
    assert summary["deltas"]["X + MGLL"]["paired"] is None and "95% CI" not in summary["table"]
    assert mcq_verdict(summary) == "X + MGLL − X = +25.00: no CI"
