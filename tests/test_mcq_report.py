"""Per-disease accuracy, unweighted average and the + MGLL delta on a hand-made result set."""

import json

import pytest
import torch

from mgll.mllm_eval.question_bank import Question, QuestionBank
from mgll.mllm_eval.report import compare, compare_table, load_results, summarise, write_results

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
