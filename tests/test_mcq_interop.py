"""``mgll mcq export --format lmms-eval|vlmevalkit`` and ``mgll mcq import``, without a model.

The lmms-eval task is read the way lmms-eval reads it (``!function utils.NAME`` resolved by loading
``utils.py`` from the YAML's folder by path) and its hooks are called as lmms-eval calls them; the
VLMEvalKit TSV is read the way VLMEvalKit's ``load`` / ``ImageBaseDataset`` read it (pandas,
tab-separated, short ``image`` values resolved to the referenced row). Hand-written answers then go
through both harnesses' paths and mgll's, and must give the same Table 2 numbers. The real
lmms-eval run on a model is tests/test_mcq_lmms_eval.py.
"""

import base64
import importlib.util
import io
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from mgll.cli import main
from mgll.data import make_synthetic
from mgll.data.pixel_budget import load_rgb
from mgll.data.question_bank import LETTERS, build_bank, format_question, load_bank, write_bank
from mgll.mllm_eval.export_common import metric_key
from mgll.mllm_eval.extract import extract_answer
from mgll.mllm_eval.report import load_results, summarise

N_MAIN = 1_000_000


@pytest.fixture(scope="module")
def banks(tmp_path_factory):
    """A plain and a circular bank over one small synthetic set whose first two question images are
    re-saved as a JPEG and a 16-bit grayscale PNG (the two byte paths of the export)."""
    root = tmp_path_factory.mktemp("interop")
    ds = make_synthetic(root / "fundus", n=20, size=16, seed=4)
    plain = build_bank(ds, seed=3)
    first, second = (plain.image_path(q) for q in plain.questions[:2])
    Image.open(first).convert("RGB").save(first, format="JPEG", quality=90)
    gray = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 250).astype(np.uint16)
    Image.fromarray(gray).save(second, format="PNG")
    write_bank(plain, root / "plain.jsonl")
    write_bank(build_bank(ds, seed=3, circular=True), root / "circ.jsonl")
    return root


def _answer_texts(bank):
    """Per-variant answer texts: question i%3==0 right in every rotation (by letter or by name),
    i%3==1 right except rotation 1 (wrong only in a circular bank), i%3==2 unreadable."""
    texts = {}
    for i, q in enumerate(bank.questions):
        for v in q.variants(bank.circular):
            if i % 3 == 0:
                texts[(v.qid, v.rotation)] = f"The answer is {LETTERS[v.answer_index]}." if i % 2 else q.answer.upper()
            elif i % 3 == 1:
                wrong = LETTERS[(v.answer_index + 1) % bank.k]
                texts[(v.qid, v.rotation)] = wrong if v.rotation == 1 else f"({LETTERS[v.answer_index]})"
            else:
                texts[(v.qid, v.rotation)] = "I cannot tell from this image"
    return texts


def _mgll_result(bank, texts):
    rows = {}
    for q in bank.questions:
        for v in q.variants(bank.circular):
            ext = extract_answer(texts[(v.qid, v.rotation)], v.options)
            rows[(v.qid, v.rotation)] = {"qid": v.qid, "rotation": v.rotation, "pred_index": ext.index,
                                         "method": ext.method, "correct": ext.index == v.answer_index}
    return summarise(bank, rows, label="mgll")


def _load_task(yaml_path):
    """lmms-eval's ``utils.load_yaml_config`` in full mode: ``!function M.F`` is ``F`` of ``M.py`` beside the YAML."""

    class Loader(yaml.SafeLoader):
        pass

    def function(loader, node):
        module_name, fn = loader.construct_scalar(node).split(".")
        spec = importlib.util.spec_from_file_location(module_name, yaml_path.parent / f"{module_name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return getattr(module, fn)

    Loader.add_constructor("!function", function)
    return yaml.load(yaml_path.read_text(), Loader=Loader)


def _export(*argv):
    assert main(["mcq", "export", *map(str, argv)]) == 0


@pytest.mark.parametrize("which", ["plain", "circ"])
def test_lmms_eval_task_asks_mgll_text_sees_mgll_pixels_and_scores_table2(banks, tmp_path, which):
    bank = load_bank(banks / f"{which}.jsonl")
    out = tmp_path / "task"
    _export(banks / f"{which}.jsonl", "--format", "lmms-eval", out)
    cfg = _load_task(out / "mgll_fundus_mcq.yaml")
    assert cfg["task"] == "mgll_fundus_mcq" and cfg["dataset_path"] == "json" and cfg["output_type"] == "generate_until"
    data_file = cfg["dataset_kwargs"]["data_files"]["test"]
    assert data_file == str((out / "docs.jsonl").resolve())  # datasets resolves relative paths against the cwd
    assert cfg["generation_kwargs"] == {"max_new_tokens": 16, "temperature": 0, "num_beams": 1, "do_sample": False}
    present = sorted({metric_key(q.answer) for q in bank.questions})
    assert [m["metric"] for m in cfg["metric_list"]] == ["average", *present]
    docs = [json.loads(line) for line in open(data_file)]
    variants = [v for q in bank.questions for v in q.variants(bank.circular)]
    assert len(docs) == len(variants) == len(bank.questions) * (bank.k if bank.circular else 1)

    kw = cfg["lmms_eval_specific_kwargs"]["default"]
    for doc, v in zip(docs, variants):
        q = bank.questions[int(v.qid[1:])]
        assert cfg["doc_to_text"](doc, kw) == format_question(bank.question, v.options)  # the text mgll mcq run asks
        assert doc[cfg["doc_to_target"]] == LETTERS[v.answer_index]
        assert not doc["image"].startswith("/") and (out / doc["image"]).is_file()
        (im,) = cfg["doc_to_visual"](doc)
        assert np.array_equal(np.asarray(im), np.asarray(load_rgb(bank.image_path(q))))  # the pixels mgll sees
    exts = sorted(p.suffix for p in (out / "images").iterdir())
    assert ".jpg" in exts and len(exts) == len(bank.questions)  # the JPEG travelled as it was
    assert (out / "images" / f"{bank.questions[0].qid}.jpg").read_bytes() == bank.image_path(bank.questions[0]).read_bytes()

    # what lmms-eval does per doc and per metric, against mgll's own summary of the same answers
    texts = _answer_texts(bank)
    per_metric = {}
    for doc in docs:
        for metric, record in cfg["process_results"](doc, [texts[(doc["qid"], doc["rotation"])]]).items():
            per_metric.setdefault(metric, []).append(record)
    agg = {m["metric"]: m["aggregation"] for m in cfg["metric_list"]}
    got = {metric: agg[metric](items) for metric, items in per_metric.items()}
    want = _mgll_result(bank, texts)
    assert got["average"] == pytest.approx(want["average"])
    for disease, d in want["per_disease"].items():
        if d["n"]:
            assert got[metric_key(disease)] == pytest.approx(d["accuracy"]), disease
    # and against the rule itself: right = i%3==0, plus i%3==1 when only rotation 0 is asked
    right = {q.qid: i % 3 == 0 or (i % 3 == 1 and not bank.circular) for i, q in enumerate(bank.questions)}
    by_disease = {}
    for q in bank.questions:
        by_disease.setdefault(q.answer, []).append(right[q.qid])
    accs = [100 * sum(r) / len(r) for r in by_disease.values()]
    assert got["average"] == pytest.approx(sum(accs) / len(accs)) and 0 < got["average"] < 100


def test_vlmevalkit_tsv_schema_images_and_circular_indices(banks, tmp_path):
    import pandas as pd

    bank = load_bank(banks / "circ.jsonl")
    _export(banks / "circ.jsonl", "--format", "vlmevalkit", tmp_path)  # a folder: $LMUData
    tsv = tmp_path / "MGLL_FundusMCQ_circular.tsv"
    df = pd.read_csv(tsv, sep="\t")  # vlmeval.smp.load for .tsv
    assert list(df.columns) == ["index", "image", "question", "A", "B", "C", "D", "answer", "category", "qid"]
    assert len(df) == len(bank.questions) * bank.k
    images = {str(i): str(im) for i, im in zip(df["index"], df["image"])}
    for row in df.itertuples(index=False):
        i, rot = int(row.index) % N_MAIN, int(row.index) // N_MAIN  # VLMEvalKit's g_index = index % 1e6
        q, v = bank.questions[i], bank.questions[i].variants(True)[rot]
        assert row.qid == q.qid and row.category == q.answer and row.question == bank.question
        assert [row.A, row.B, row.C, row.D] == list(v.options) and getattr(row, row.answer) == q.answer
        image = images[str(row.index)]
        if rot:  # ImageBaseDataset: a value of <= 64 chars is the index of the row holding the image
            assert image == str(i) and len(images[image]) > 64
            image = images[image]
        decoded = Image.open(io.BytesIO(base64.b64decode(image))).convert("RGB")
        assert np.array_equal(np.asarray(decoded), np.asarray(load_rgb(bank.image_path(q))))
    assert sorted(int(x) // N_MAIN for x in df["index"]) == sorted(list(range(bank.k)) * len(bank.questions))

    # VLMEvalKit picks CircularEval by dataset name: a mismatch is refused, not discovered in its report
    with pytest.raises(ValueError, match="must contain 'circular'"):
        main_raises(["mcq", "export", str(banks / "circ.jsonl"), "--format", "vlmevalkit", str(tmp_path / "X.tsv")])
    with pytest.raises(ValueError, match="must not contain 'circular'"):
        main_raises(["mcq", "export", str(banks / "plain.jsonl"), "--format", "vlmevalkit", str(tmp_path / "X_circular.tsv")])


def main_raises(argv):
    """The command's function itself, so the exception (which ``main`` turns into exit 2) is visible."""
    from mgll.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.func(args)


def _lmms_samples(task_dir, texts):
    """A ``--log_samples`` file as lmms-eval 0.7.3 writes it: doc dropped, metrics' records kept."""
    cfg = _load_task(task_dir / "mgll_fundus_mcq.yaml")
    lines = []
    for doc_id, line in enumerate(open(task_dir / "docs.jsonl")):
        doc = json.loads(line)
        text = texts[(doc["qid"], doc["rotation"])]
        sample = {"doc_id": doc_id, "target": doc["answer"], "filtered_resps": text, "input": doc["prompt"]}
        sample.update(cfg["process_results"](doc, [text]))
        lines.append(json.dumps(sample))
    return "\n".join(lines) + "\n"


def _vlmevalkit_predictions(tsv, texts, bank, path):
    """VLMEvalKit's MODEL_DATASET.xlsx: the TSV's columns minus image, plus prediction."""
    import openpyxl
    import pandas as pd

    df = pd.read_csv(tsv, sep="\t").drop(columns=["image"])
    qids = [q.qid for q in bank.questions]
    df["prediction"] = [texts[(qids[int(i) % N_MAIN], int(i) // N_MAIN)] for i in df["index"]]
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(list(df.columns))
    for row in df.itertuples(index=False):
        ws.append([int(x) if isinstance(x, np.integer) else x for x in row])
    wb.save(path)


def test_import_both_formats_gives_mgll_numbers_and_compare_renders(banks, tmp_path, capsys):
    bank = load_bank(banks / "circ.jsonl")
    texts = _answer_texts(bank)
    want = _mgll_result(bank, texts)
    _export(banks / "circ.jsonl", "--format", "lmms-eval", tmp_path / "task")
    (tmp_path / "samples.jsonl").write_text(_lmms_samples(tmp_path / "task", texts))
    _export(banks / "circ.jsonl", "--format", "vlmevalkit", tmp_path / "MGLL_circular.tsv")
    _vlmevalkit_predictions(tmp_path / "MGLL_circular.tsv", texts, bank, tmp_path / "tiny_MGLL_circular.xlsx")

    for pred, out in [("samples.jsonl", "lmms"), ("tiny_MGLL_circular.xlsx", "vlm")]:
        assert main(["mcq", "import", str(tmp_path / pred), "--bank", str(banks / "circ.jsonl"),
                     "--out", str(tmp_path / out)]) == 0
        res = load_results(tmp_path / out)
        assert res["run"]["imported"] == len(texts) and res["unanswered"] == []
        assert res["average"] == pytest.approx(want["average"])
        assert {d: v["accuracy"] for d, v in res["per_disease"].items()} == {
            d: v["accuracy"] for d, v in want["per_disease"].items()}
        rows = [json.loads(line) for line in open(tmp_path / out / "answers.jsonl")]
        assert {(r["qid"], r["rotation"]): r["text"] for r in rows} == texts
    assert f"imported {len(texts)} answers" in capsys.readouterr().out
    assert main(["mcq", "compare", f"lmms-eval={tmp_path / 'lmms'}", f"VLMEvalKit={tmp_path / 'vlm'}",
                 "--out", str(tmp_path / "cmp"), "--bootstrap", "0"]) == 0
    table = capsys.readouterr().out
    avg = f"{want['average']:.2f}"
    assert "| lmms-eval |" in table and "| VLMEvalKit |" in table and table.count(f"| {avg} |") == 2


def test_bad_input_one_line_exit_2_and_no_silent_overwrite(banks, tmp_path, capsys):
    bank_file = str(banks / "circ.jsonl")
    _export(bank_file, "--format", "lmms-eval", tmp_path / "task")
    stamp = (tmp_path / "task" / "docs.jsonl").stat().st_mtime_ns
    cases = [
        (["mcq", "export", bank_file, "--format", "lmms-eval", str(tmp_path / "task")], "already exists; pass --overwrite"),
        (["mcq", "export", str(tmp_path / "nope.jsonl"), "--format", "lmms-eval", str(tmp_path / "t2")], "nope.jsonl: question bank not found"),
        (["mcq", "export", bank_file, "--format", "lmms-eval", str(tmp_path / "t3"), "--task-name", "bad-name"], "--task-name 'bad-name'"),
        (["mcq", "export", bank_file, "--format", "lmms-eval", str(tmp_path / "t4"), "--data", str(tmp_path)], "question image not found"),
    ]
    (tmp_path / "garbage.jsonl").write_text('{"doc_id": 0, "filtered_resps": "A"}\n')
    (tmp_path / "bad.tsv").write_text("index\tanswer\n0\tA\n")
    (tmp_path / "wrong_bank.jsonl").write_text(json.dumps(
        {"doc_id": 0, "filtered_resps": "A", "average": {"qid": "q000000", "rotation": 0, "bank": "0123456789abcdef"}}) + "\n")
    cases += [
        (["mcq", "import", str(tmp_path / "garbage.jsonl"), "--bank", bank_file, "--out", str(tmp_path / "i1")], "garbage.jsonl:1: qid: missing"),
        (["mcq", "import", str(tmp_path / "bad.tsv"), "--bank", bank_file, "--out", str(tmp_path / "i2")], "column 'prediction' missing"),
        (["mcq", "import", str(tmp_path / "wrong_bank.jsonl"), "--bank", bank_file, "--out", str(tmp_path / "i3")], "wrong_bank.jsonl:1: bank: fingerprint 0123456789abcdef"),
        (["mcq", "import", str(tmp_path / "task" / "README.md"), "--bank", bank_file, "--out", str(tmp_path / "i4")], "cannot tell the format"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert (tmp_path / "task" / "docs.jsonl").stat().st_mtime_ns == stamp  # refused, untouched
    assert not any((tmp_path / d).exists() for d in ("t2", "t3", "t4", "i1", "i2", "i3", "i4"))
    _export(bank_file, "--format", "lmms-eval", tmp_path / "task", "--overwrite", "--max-new-tokens", "4")
    assert "max_new_tokens: 4" in (tmp_path / "task" / "mgll_fundus_mcq.yaml").read_text()
    from mgll.mllm_eval import cli, lmms_eval_export

    assert cli.DEFAULT_TASK == lmms_eval_export.DEFAULT_TASK  # the CLI keeps a copy to stay free of torch
