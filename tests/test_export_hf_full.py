"""``mgll export-hf --full``: transformers' zero-shot pipeline on the exported CLIPModel gives ``mgll zeroshot``'s probabilities.

The encoder is a random tiny MGLL ViT whose logit scale is set above open_clip's clamp (exp = 200),
so the probabilities are far from uniform (an error at the 1e-4 tolerance would show) and the
export must store the clamped scale (100) that ``mgll zeroshot`` applies. The dataset images are
64 x 64, the encoder's input size: no resize and a zero crop offset, so either transformers image
backend sees open_clip's exact pixels. Resized and cropped images are checked separately against
open_clip's own transform: integral crop offsets match on the default (torchvision) backend
without a resize and on the PIL backend with one; a half-pixel offset is the documented
one-column shift (transformers floors, torchvision rounds).
"""

import copy
import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mgll.cli import main
from mgll.encoder.factory import create_encoder, save_encoder

TOL = 1e-4


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory):
    torch.manual_seed(0)
    model, _, _, _, name = create_encoder("mgll-tiny-vit")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(200.0))  # above the clamp: the export must store log(100)
    run = tmp_path_factory.mktemp("full") / "run"
    save_encoder(model, run / "encoder", name, {"loss": "clip", "levels": []})
    return run


@pytest.fixture(scope="module")
def exported(encoder_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "clip"
    assert main(["export-hf", str(encoder_run), str(out), "--full"]) == 0
    return out


def _pipe(folder, **kw):
    from transformers import pipeline

    return pipeline("zero-shot-image-classification", model=str(folder), **kw)


def _probs(outputs, classes):
    return np.array([[{o["label"]: o["score"] for o in row}[c] for c in classes] for row in outputs])


def test_pipeline_equals_mgll_zeroshot(encoder_run, exported, fundus_dataset, tmp_path):
    out = tmp_path / "zs"
    levels = ["status", "disease"]  # binary and multi-label (softmax scores: the encoder has no logit_bias)
    argv = ["zeroshot", "--encoder", str(encoder_run), "--data", str(fundus_dataset.root), "--bootstrap", "0",
            "--out", str(out), "--no-progress"]
    assert main(argv + [a for lv in levels for a in ("--level", lv)]) == 0
    spec = json.loads((exported / "mgll_export.json").read_text())
    assert spec["class"] == "CLIPModel" and spec["logit_scale"] == pytest.approx(100.0) and spec["logit_scale_clamped"]
    pipe = _pipe(exported)
    for lv in levels:
        with open(out / f"scores-{lv}.csv", newline="") as f:
            rows = list(csv.reader(f))
        classes, images = rows[0][1:], [r[0] for r in rows[1:]]
        ours = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
        template = fundus_dataset.card.level(lv).template
        theirs = _probs(pipe([str(fundus_dataset.root / im) for im in images], candidate_labels=classes,
                             hypothesis_template=template), classes)
        diff = np.abs(theirs - ours).max()
        print(f"{lv}: {len(images)} images x {len(classes)} classes, max |pipeline - mgll zeroshot| = {diff:.2e}")
        assert diff <= TOL, lv
        assert np.ptp(ours, axis=0).max() > 0.1  # far from uniform: a wrong tower, scale or token would show


def test_resized_and_cropped_images_match_open_clip_transform(encoder_run, exported):
    from transformers import AutoImageProcessor

    model, _, preprocess, tokenizer, _ = create_encoder(str(encoder_run))
    model.eval()
    labels, template = ["drusen", "a normal optic disc", "haemorrhages"], "a fundus photograph showing {}"
    with torch.no_grad():
        text = model.encode_text(tokenizer([template.format(c) for c in labels]), normalize=True)
    rng = np.random.default_rng(1)
    default, pil = _pipe(exported), _pipe(exported, image_processor=AutoImageProcessor.from_pretrained(exported, backend="pil"))

    def reference(im):
        with torch.no_grad():
            return torch.softmax(100.0 * model.encode_image(preprocess(im)[None], normalize=True) @ text.T, -1)[0].numpy()

    def diff(pipe, im):
        return np.abs(_probs([pipe(im, candidate_labels=labels, hypothesis_template=template)], labels)[0] - reference(im)).max()

    # (width, height): no resize + integral crop offset (both backends exact); a resize (PIL backend exact)
    for size in [(80, 64), (64, 96)]:
        im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        assert diff(default, im) <= TOL and diff(pil, im) <= TOL, size
    im = Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
    assert diff(pil, im) <= TOL
    # 130 x 100 -> 83 x 64: offset 9.5, torchvision rounds to 10, transformers floors to 9: one column apart
    im = Image.fromarray(rng.integers(0, 256, (100, 130, 3), dtype=np.uint8))
    ours = preprocess(im)
    theirs = pil.image_processor(im, return_tensors="pt")["pixel_values"][0]
    assert not torch.allclose(ours, theirs)
    torch.testing.assert_close(theirs[:, :, 1:], ours[:, :, :-1], atol=1e-5, rtol=0)


def test_tokenizer_ids_equal_open_clip():
    from open_clip import get_tokenizer

    from mgll.adapters.export_clip import clip_tokenizer

    ours, theirs = get_tokenizer("mgll-tiny-vit"), clip_tokenizer()
    same = ["a fundus photograph of a normal eye", "A Fundus   photograph, showing AMD-like drusen (grade 2)!",
            "Sjögren's syndrome; x-ray of the knee", "it's 3.5 mm at 10:30", "naïve café résumé", "  leading spaces",
            "über-ÉCHO 中文 テスト", "tab\tand\nnewline", "retinal " * 100]
    for text in same:
        a = ours([text])[0]
        a = a[: int(a.argmax()) + 1].tolist()  # up to and including <end_of_text>
        assert theirs(text, truncation=True, max_length=77)["input_ids"] == a, text
    # documented difference: open_clip runs ftfy + html.unescape first, transformers does not
    for text in ["drusen &amp; exudates", "don’t"]:
        a = ours([text])[0]
        assert theirs(text)["input_ids"] != a[: int(a.argmax()) + 1].tolist(), text


def test_unrepresentable_encoders_are_refused_with_one_line(tmp_path, capsys):
    import open_clip

    from mgll.adapters.export_clip import check_full_exportable
    from mgll.encoder.factory import list_encoders

    list_encoders()  # registers mgll's configs
    cfg = copy.deepcopy(open_clip.get_model_config("mgll-tiny-vit"))
    variants = {
        "logit_bias": {**cfg, "init_logit_bias": -10.0},
        "pool_type='avg'": {**cfg, "vision_cfg": {**cfg["vision_cfg"], "pool_type": "avg"}},
        "layer scale": {**cfg, "text_cfg": {**cfg["text_cfg"], "ls_init_value": 0.1}},
        "text pool_type='last'": {**cfg, "text_cfg": {**cfg["text_cfg"], "pool_type": "last"}},
        "not causal": {**cfg, "text_cfg": {**cfg["text_cfg"], "no_causal_mask": True}},
    }
    for i, (why, c) in enumerate(variants.items()):
        (tmp_path / f"cfg{i}").mkdir()
        (tmp_path / f"cfg{i}" / f"tiny-odd-{i}.json").write_text(json.dumps(c))
        open_clip.add_model_config(tmp_path / f"cfg{i}")
        model, *_ = create_encoder(f"tiny-odd-{i}")
        with pytest.raises(ValueError, match=why.replace("(", r"\(").replace(")", r"\)")):
            check_full_exportable(model)
    save_encoder(model, tmp_path / "odd" / "encoder", f"tiny-odd-{i}")
    capsys.readouterr()
    assert main(["export-hf", str(tmp_path / "odd"), str(tmp_path / "hf"), "--full"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not causal" in err and not (tmp_path / "hf").exists()
    assert main(["export-hf", str(tmp_path / "odd"), str(tmp_path / "hf"), "--full", "--no-projection"]) == 2
