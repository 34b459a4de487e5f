"""Every folder mgll writes holds a README.md model card that the Hub's parser (``huggingface_hub.ModelCard``) reads.

One chain, run through the CLI as a user would: ``mgll train`` (run + encoder folders) -> ``export-hf``
(vision-only and ``--full``) -> ``swap`` into a stock tiny LLaVA -> ``align`` (stage 2, LoRA) ->
``export-aligned``. Each card must parse, carry the metadata the Hub uses (library_name, pipeline_tag,
tags, base_model, datasets), record the exact command that wrote it and what produced it, and inherit
facts from its source's card (the swap names the encoder's loss and dataset, the alignment the base
MLLM). ``mgll card`` then adds probe and MCQ figures to a card, in the body and as model-index results.
"""

import json
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from mgll.cli import main
from mgll.data import make_synthetic
from mgll.model_card import _open_clip_base, hub_id

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from stock_models import build_stock  # noqa: E402

BASE_LLAVA = "llava-hf/llava-1.5-7b-hf"


def _card(folder):
    path = Path(folder) / "README.md"
    assert path.is_file(), f"no model card in {folder}"
    card = ModelCard.load(path)
    meta = card.data.to_dict()
    assert "mgll" in meta["tags"] and meta["mgll"]["command"].startswith("mgll "), meta
    for section in ("## How it was produced", "## Data card", "## Command", "## Evaluation"):
        assert section in card.text, (folder, section)
    assert meta["mgll"]["command"] in card.text  # the exact command, in the body too
    return card, meta


@pytest.fixture(scope="module")
def chain(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("cards")
    data = root / "data"
    make_synthetic(data, kind="fundus", n=24, size=48, seed=2)
    run = root / "run"
    argv = {
        "train": ["train", "--data", str(data), "--out", str(run), "--loss", "mgll", "--set", "train.steps=2",
                  "--set", "train.batch_size=8", "--set", "loss.pointwise=0.25", "--no-progress"],
        "export-hf": ["export-hf", str(run), str(root / "vision")],
        "export-hf-full": ["export-hf", str(run), str(root / "clip"), "--full"],
    }
    for key in ("train", "export-hf", "export-hf-full"):
        assert main(argv[key]) == 0, key
    src = build_stock("llava", root / "src")
    # a downloaded Hub snapshot carries the Hub's card: its base_model must reach the swapped model's card
    (src / "README.md").write_text(f"---\nbase_model: {BASE_LLAVA}\nlibrary_name: transformers\n---\n# tiny llava\n")
    argv["swap"] = ["swap", "--host", "llava", "--mllm", str(src), "--encoder", str(run), "--out", str(root / "swapped")]
    argv["align"] = ["align", "--model", str(root / "swapped"), "--data", str(data), "--out", str(root / "align"),
                     "--stage", "2", "--split", "all", "--steps", "2", "--batch-size", "2", "--no-progress"]
    argv["export-aligned"] = ["export-aligned", "--model", str(root / "swapped"), "--align", str(root / "align"),
                              "--out", str(root / "aligned")]
    for key in ("swap", "align", "export-aligned"):
        assert main(argv[key]) == 0, key
    return root, argv


def test_train_writes_cards_in_encoder_and_run_folders(chain):
    root, argv = chain
    for folder, library in ((root / "run" / "encoder", "open_clip"), (root / "run", "mgll")):
        card, meta = _card(folder)
        assert meta["library_name"] == library and meta["pipeline_tag"] == "zero-shot-image-classification"
        assert meta["datasets"] == ["synthetic-fundus"] and "base_model" not in meta  # random init: no base
        m = meta["mgll"]
        assert m["command"] == "mgll " + " ".join(argv["train"])
        assert m["loss"] == "mgll" and m["steps"] == 2 and m["loss_weights"]["pointwise"] == 0.25
        assert [lv["name"] for lv in m["dataset_card"]["levels"]] == ["status", "disease", "explanation"]
        assert "pointwise 0.25" in card.text and "a fundus photograph showing {}" in card.text and "| steps | 2 |" in card.text


def test_export_cards_inherit_the_encoders_facts(chain):
    root, argv = chain
    for name, tag, cls in (("vision", "image-feature-extraction", "CLIPVisionModelWithProjection"),
                           ("clip", "zero-shot-image-classification", "CLIPModel")):
        card, meta = _card(root / name)
        assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == tag
        assert meta["mgll"]["class"] == cls and meta["mgll"]["loss"] == "mgll" and meta["mgll"]["steps"] == 2
        assert meta["datasets"] == ["synthetic-fundus"]
        assert "pointwise 0.25" in card.text  # the encoder's loss weights, read from its card


def test_swap_align_and_export_aligned_cards(chain):
    root, argv = chain
    card, meta = _card(root / "swapped")
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-text-to-text"
    assert meta["base_model"] == BASE_LLAVA and meta["datasets"] == ["synthetic-fundus"] and "llava" in meta["tags"]
    assert meta["mgll"]["command"] == "mgll " + " ".join(argv["swap"]) and meta["mgll"]["loss"] == "mgll"

    card, meta = _card(root / "align")
    summary = json.loads((root / "align" / "summary.json").read_text())
    assert meta["library_name"] == "peft" and meta["base_model"] == BASE_LLAVA and "lora" in meta["tags"]
    assert meta["mgll"]["stage"] == 2 and meta["mgll"]["steps"] == 2
    assert meta["mgll"]["loss_last"] == pytest.approx(summary["loss_last"])
    assert f"{summary['loss_first']:.4f} -> {summary['loss_last']:.4f}" in card.text

    card, meta = _card(root / "aligned")
    assert meta["library_name"] == "transformers" and meta["base_model"] == BASE_LLAVA
    assert meta["mgll"]["lora_merged"] is True and meta["mgll"]["command"] == "mgll " + " ".join(argv["export-aligned"])
    assert "synthetic-fundus" in meta["datasets"]


def test_mgll_card_adds_probe_and_mcq_figures(chain, capsys):
    root, _ = chain
    probe = root / "probe"
    assert main(["probe", "--encoder", str(root / "run"), "--data", str(root / "data"), "--level", "status",
                 "--bootstrap", "0", "--out", str(probe), "--no-progress"]) == 0
    report = json.loads((probe / "metrics.json").read_text())["results"]["fraction 1"]
    mcq = root / "mcq"
    mcq.mkdir()
    (mcq / "results.json").write_text(json.dumps({"label": "LLaVA + MGLL", "per_disease": {"cataract": {"n": 4, "correct": 3}},
                                                  "average": 75.0, "overall": 75.0, "n_questions": 4, "circular": True}))
    folder = root / "run" / "encoder"
    assert main(["card", str(folder), "--results", str(probe), str(mcq)]) == 0
    card, meta = _card(folder)
    results = {(res["task"]["name"], m["name"]): m["value"] for res in meta["model-index"][0]["results"] for m in res["metrics"]}
    assert results[("linear probe (logreg, fraction 1)", "accuracy")] == pytest.approx(report["accuracy"])
    assert results[("MCQ (LLaVA + MGLL)", "average accuracy (%)")] == pytest.approx(75.0)
    assert f"{report['accuracy']:.4f}" in card.text and "No evaluation recorded yet" not in card.text
    assert meta["library_name"] == "open_clip" and meta["mgll"]["loss"] == "mgll"  # the rest is kept
    capsys.readouterr()
    assert main(["card", str(root / "data"), "--results", str(probe)]) == 2  # not a folder with a card
    assert main(["card", str(folder), "--results", str(root / "data")]) == 2  # not a report
    assert capsys.readouterr().err.count("\n") == 2


def test_hub_ids_only_for_hub_repositories(tmp_path):
    assert hub_id(BASE_LLAVA) == BASE_LLAVA and hub_id("hf-hub:timm/vit_base") == "timm/vit_base"
    assert hub_id(tmp_path) is None and hub_id("mgll-tiny-vit") is None and hub_id("a/b/c") is None
    assert _open_clip_base("ViT-B-32", "openai") == ["timm/vit_base_patch32_clip_224.openai"]
    assert _open_clip_base("mgll-tiny-vit", None) == []
