"""Zero-shot: well-formed per-level scores, prompt ensembling, hierarchical bounds, clear errors."""

import argparse
import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mgll.data.records import Record, RecordError
from mgll.encoder.factory import create_encoder
from mgll.encoder.text_encoding import encode_texts
from mgll.evaluate.zeroshot import (
    bound_by_parents,
    build_classifier,
    class_scores,
    learn_parents,
    zeroshot,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, _, preprocess, tokenizer, _ = create_encoder("mgll-tiny-vit")
    return model.eval(), preprocess, tokenizer


def test_zeroshot_returns_well_formed_scores_per_level(fundus_dataset, tiny):
    results, summary = zeroshot("mgll-tiny-vit", fundus_dataset, bootstrap=20, progress=False, model_bundle=tiny)
    test = fundus_dataset.split("test")
    assert list(results) == list(fundus_dataset.card.level_names) == ["status", "disease", "explanation"]
    kinds = {lv: r.task.kind for lv, r in results.items()}
    assert kinds == {"status": "binary", "disease": "multilabel", "explanation": "multilabel"}
    for lv, r in results.items():
        vocab = fundus_dataset.label_vocab(lv)
        assert r.task.classes == vocab
        assert r.scores.shape == (len(test), len(vocab))
        assert r.images == [rec.image for rec in test]
        assert np.isfinite(r.scores).all() and r.scores.min() >= 0 and r.scores.max() <= 1
        if r.task.kind != "multilabel":
            np.testing.assert_allclose(r.scores.sum(1), 1.0, atol=1e-9)
        # the card's template is in every prompt ensemble
        assert r.prompts[vocab[0]] == [fundus_dataset.card.level(lv).template.format(vocab[0])]
        m = r.metrics
        assert m["level"] == lv and m["n"] == len(test)
        assert {"macro_auc", "accuracy", "map", "per_class", "ci"} <= set(m)
        assert set(m["per_class"]) == set(vocab)
        assert summary["results"][lv] is m
    json.dumps(summary)  # the report must be serialisable as it stands


def test_scores_follow_the_image_text_similarity(fundus_dataset, tiny):
    """Scores are softmax(logit_scale * cos(image, prompt)) for each image, recomputed here by hand."""
    model, preprocess, tokenizer = tiny
    results, _ = zeroshot("x", fundus_dataset, levels=["disease"], bootstrap=0, progress=False, model_bundle=tiny)
    r = results["disease"]
    rec = fundus_dataset.split("test")[0]
    from PIL import Image

    with torch.no_grad(), Image.open(fundus_dataset.image_path(rec)) as im:
        img = model.encode_image(preprocess(im.convert("RGB"))[None], normalize=True)
        txt = encode_texts(model, tokenizer, [p[0] for p in r.prompts.values()], "cpu")
    expected = torch.softmax(model.logit_scale.exp() * img @ txt.T, 1)[0].detach().numpy()
    np.testing.assert_allclose(r.scores[0], expected, rtol=1e-4, atol=1e-6)


def test_prompt_ensemble_is_the_renormalised_mean(tiny):
    model, _, tokenizer = tiny
    classes = ["glaucoma", "myopia", "cataract"]
    a, b = "a fundus photograph showing {}", "a retinal image with {}"
    one = build_classifier(model, tokenizer, classes, [a])
    twice = build_classifier(model, tokenizer, classes, [a, a])
    torch.testing.assert_close(one, twice)
    ea = encode_texts(model, tokenizer, [a.format(c) for c in classes], "cpu", trim=False)
    eb = encode_texts(model, tokenizer, [b.format(c) for c in classes], "cpu", trim=False)
    expected = F.normalize(ea + eb, dim=-1).T
    both = build_classifier(model, tokenizer, classes, [a, b])
    torch.testing.assert_close(both, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(both, one, atol=1e-3)  # the second template does change the classifier
    torch.testing.assert_close(both.norm(dim=0), torch.ones(3))


def test_user_templates_join_the_card_template(fundus_dataset, tiny):
    extra = "a retinal image with {}"
    results, summary = zeroshot("x", fundus_dataset, levels=["status"], templates=[extra], bootstrap=0,
                                progress=False, model_bundle=tiny)
    assert results["status"].prompts["normal"] == ["a fundus photograph of a normal eye", "a retinal image with normal"]
    assert summary["templates"] == [extra]


def test_scores_softmax_and_sigmoid():
    img = F.normalize(torch.randn(5, 8), dim=-1)
    cls = F.normalize(torch.randn(8, 3), dim=0)
    s = class_scores(img, cls, 10.0, multilabel=True, score="softmax")
    np.testing.assert_allclose(s.sum(1), 1.0)
    sig = class_scores(img, cls, 10.0, multilabel=True, score="sigmoid", logit_bias=-2.0)
    np.testing.assert_allclose(sig, torch.sigmoid(10.0 * img @ cls - 2.0).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="logit_bias"):
        class_scores(img, cls, 10.0, multilabel=True, score="sigmoid")


def test_learn_parents_takes_the_most_frequent_coarse_label():
    def rec(coarse, fine):
        return Record(image=f"{coarse}-{fine}-{id(coarse)}.png", labels={"c": tuple(coarse), "f": tuple(fine)})

    recs = [rec(["A"], ["x"]), rec(["A"], ["x", "y"]), rec(["B"], ["y"]), rec(["B"], ["y"]), rec(["A", "B"], ["z"])]
    parents = learn_parents(recs, "c", "f")
    assert parents["x"] == {"parent": "A", "support": 1.0, "n": 2}
    assert parents["y"] == {"parent": "B", "support": 2 / 3, "n": 3}
    assert parents["z"]["parent"] == "A"  # tie broken by name, deterministically


def test_bound_by_parents_holds_and_is_neutral_when_parents_are_certain():
    rng = np.random.default_rng(0)
    fine, coarse = rng.random((20, 4)), rng.random((20, 2))
    parents = {"f0": {"parent": "c0"}, "f1": {"parent": "c1"}, "f2": {"parent": "c1"}}  # f3 has none
    out = bound_by_parents(fine, ["f0", "f1", "f2", "f3"], coarse, ["c0", "c1"], parents)
    assert (out[:, 0] <= coarse[:, 0]).all() and (out[:, 1] <= coarse[:, 1]).all() and (out[:, 2] <= coarse[:, 1]).all()
    assert (out <= fine).all()
    assert (out[:, :3] < fine[:, :3]).any()  # the bound did bind somewhere
    np.testing.assert_array_equal(out[:, 3], fine[:, 3])
    np.testing.assert_array_equal(bound_by_parents(fine, ["f0", "f1", "f2", "f3"], np.ones((20, 2)), ["c0", "c1"], parents), fine)


def test_hierarchical_zeroshot_bounds_every_fine_label_by_its_parent(fundus_dataset, tiny):
    results, summary = zeroshot("x", fundus_dataset, levels=["disease", "explanation"], hierarchical=True,
                                bootstrap=0, progress=False, model_bundle=tiny)
    assert list(results) == ["disease", "explanation"]
    dis, exp = results["disease"], results["explanation"]
    assert dis.parents["normal fundus"]["parent"] == "normal"
    assert dis.parents["glaucoma"] == {"parent": "abnormal", "support": 1.0, "n": dis.parents["glaucoma"]["n"]}
    assert exp.parents["a healthy retina with a clear optic disc and normal vessels"]["parent"] == "normal fundus"
    # the status level was scored internally to bound disease
    for level, up in ((dis, None), (exp, dis)):
        assert (level.scores <= level.raw + 1e-12).all()
        if up is not None:
            col = {c: i for i, c in enumerate(up.task.classes)}
            for j, c in enumerate(level.task.classes):
                if c in level.parents:
                    assert (level.scores[:, j] <= up.scores[:, col[level.parents[c]["parent"]]] + 1e-12).all()
    assert summary["hierarchical"] and summary["parents_from"] == "train split"
    # bounded and unbounded scores are both evaluated, and bounding can only lower the scores
    assert set(summary["results"]) == {"disease", "disease (unbounded)", "explanation", "explanation (unbounded)"}


def test_unknown_level_lists_the_levels(fundus_dataset, tiny):
    with pytest.raises(RecordError, match=r"unknown level 'diagnosis'.*status.*disease.*explanation"):
        zeroshot("x", fundus_dataset, levels=["diagnosis"], progress=False, model_bundle=tiny)


def test_bad_template_and_bad_split_are_clear_errors(fundus_dataset, tiny):
    with pytest.raises(ValueError, match=r"'a retinal image' must contain '\{\}'"):
        zeroshot("x", fundus_dataset, templates=["a retinal image"], progress=False, model_bundle=tiny)
    with pytest.raises(ValueError, match=r"no records in split 'holdout'.*train"):
        zeroshot("x", fundus_dataset, split="holdout", progress=False, model_bundle=tiny)


def test_cli_writes_metrics_markdown_and_scores(fundus_dataset, tmp_path, capsys):
    pytest.importorskip("mgll.evaluate.reports")
    from mgll.evaluate.zeroshot_finetune_cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "zs"
    args = parser.parse_args(["zeroshot", "--encoder", "mgll-tiny-vit", "--data", str(fundus_dataset.root), "--level", "disease",
                              "--template", "a retinal image with {}", "--bootstrap", "20", "--out", str(out), "--no-progress"])
    assert args.func(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["command"] == "zeroshot" and list(metrics["levels"]) == ["disease"]
    assert metrics["results"]["disease"]["ci"]["macro_auc"] is not None
    assert metrics["levels"]["disease"]["prompts"]["glaucoma"] == ["a fundus photograph showing glaucoma", "a retinal image with glaucoma"]
    md = (out / "metrics.md").read_text()
    assert "| disease |" in md and "glaucoma" in md
    rows = list(csv.reader((out / "scores-disease.csv").open()))
    assert rows[0] == ["image", *fundus_dataset.label_vocab("disease")]
    assert len(rows) == 1 + len(fundus_dataset.split("test"))
    assert "macro AUC" in capsys.readouterr().out


def test_saved_encoder_uses_the_feature_cache_and_matches_the_in_memory_model(fundus_dataset, tiny, tmp_path):
    from mgll.data import load_dataset
    from mgll.encoder.factory import save_encoder

    model, _, _ = tiny
    enc = save_encoder(model, tmp_path / "run" / "encoder", "mgll-tiny-vit")
    ds = load_dataset(fundus_dataset.root)
    cache = tmp_path / "cache"  # keeps the shared dataset folder free of cache files
    first, rep1 = zeroshot(str(tmp_path / "run"), ds, levels=["disease"], bootstrap=0, progress=False, cache_dir=cache)
    second, rep2 = zeroshot(str(enc), ds, levels=["disease"], bootstrap=0, progress=False, cache_dir=cache)
    assert len(list(cache.glob("*.safetensors"))) == 1
    assert rep1["features"]["cache"] is False and rep2["features"]["cache"] is True
    assert rep1["label"] == "run"
    direct, _ = zeroshot("x", ds, levels=["disease"], bootstrap=0, progress=False, model_bundle=tiny)
    np.testing.assert_allclose(second["disease"].scores, direct["disease"].scores, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(first["disease"].scores, second["disease"].scores)
