"""Swapping an MGLL tower into a tiny random-init LLaVA gives a stock transformers LLaVA that runs and reloads."""

import argparse
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from mgll.adapters.cli import register
from mgll.adapters.hosts import ShapeMismatch, get_host, list_hosts
from mgll.adapters.swap import load_projector, load_swapped, save_projector, swap_model
from mgll.adapters.tiny import make_tiny_llava
from mgll.adapters.vision_tower import OpenClipVisionTower
from mgll.encoder.factory import create_encoder, save_encoder

WORDS = ["status: abnormal. disease: drusen, cataract, glaucoma. status: normal. describe the image"]
MEAN, STD = (0.4, 0.4, 0.4), (0.2, 0.2, 0.2)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("swap")
    make_tiny_llava(root / "llava", WORDS, vision_width=32, image_size=32, patch_size=8)
    torch.manual_seed(0)
    enc, _, _, _, name = create_encoder("mgll-tiny-vit", image_mean=MEAN, image_std=STD)
    save_encoder(enc, root / "enc", name)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["swap", "--host", "llava", "--mllm", str(root / "llava"), "--encoder", str(root / "enc"),
                              "--out", str(root / "swapped"), "--seed", "7"])
    assert args.func(args) == 0
    enc, *_ = create_encoder(str(root / "enc"))
    model, processor = load_swapped(root / "swapped")
    return root, enc.eval(), model.eval(), processor


def _inputs(processor, n=2):
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)) for _ in range(n)]
    return processor(text=["<image>describe the image"] * n, images=imgs, return_tensors="pt")


def test_registry_lists_known_hosts_on_unknown_name():
    assert "llava" in list_hosts()
    with pytest.raises(ValueError, match=r"unknown host 'nope'; known hosts: .*llava"):
        get_host("nope")


def test_swapped_model_runs_forward_and_generate_with_matching_token_count(built):
    root, enc, model, processor = built
    host = get_host("llava")
    assert model.config.vision_config.hidden_size == 64 and model.config.image_seq_length == 64
    assert host.projector(model).linear_1.in_features == 64
    inputs = _inputs(processor)
    n_img = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    tower = OpenClipVisionTower(enc)  # select_layer -2, patch tokens: LLaVA's defaults
    assert n_img == host.num_image_tokens(model) == tower.num_tokens == 64
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"], vision_feature_layer=-2,
                                               vision_feature_select_strategy="default").pooler_output
        assert feats[0].shape == (64, model.config.text_config.hidden_size)
        # the tower inside LLaVA computes exactly what the MGLL tower computes
        hs = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(hs, tower(inputs["pixel_values"]), atol=1e-5, rtol=0)
        logits = model(**inputs).logits
        assert logits.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert gen.shape == (2, inputs["input_ids"].shape[1] + 3)
    # the processor normalises with the MGLL encoder's statistics
    assert processor.image_processor.image_mean == pytest.approx(MEAN)
    spec = json.loads((root / "swapped" / "mgll_swap.json").read_text())
    assert spec["host"] == "llava" and spec["tower"]["num_image_tokens"] == 64


def test_save_load_gives_identical_logits(built):
    root, enc, loaded, processor = built
    fresh = LlavaForConditionalGeneration.from_pretrained(root / "llava").eval()
    torch.manual_seed(7)
    swap_model("llava", fresh, enc, projector_init="default")
    inputs = _inputs(processor)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, loaded(**inputs).logits)


def test_zero_init_projector_outputs_the_mean_embedding(built):
    root, enc, _, processor = built
    model = LlavaForConditionalGeneration.from_pretrained(root / "llava").eval()
    swap_model("llava", model, enc, projector_init="zero")
    pix = _inputs(processor, 1)["pixel_values"]
    with torch.no_grad():
        feats = model.model.get_image_features(pix, vision_feature_layer=-2, vision_feature_select_strategy="default").pooler_output[0]
        mean = model.get_input_embeddings().weight.mean(0)
    torch.testing.assert_close(feats, mean.expand_as(feats), atol=1e-6, rtol=0)


def test_width_and_grid_mismatch_name_both_sizes(built, tmp_path):
    root, _, model, _ = built
    wide = LlavaForConditionalGeneration.from_pretrained(root / "llava")
    small, *_ = create_encoder("mgll-small-vit")  # width 128, 96 px, patch 12 -> 8x8 grid
    swap_model("llava", wide, small)
    save_projector(wide, "llava", tmp_path / "wide.safetensors")
    with pytest.raises(ShapeMismatch, match=r"128-wide .* gives 64"):
        load_projector(model, "llava", tmp_path / "wide.safetensors")
    with pytest.raises(ShapeMismatch, match=r"expects 32-wide vision features but the tower gives 64"):
        swap_model("llava", LlavaForConditionalGeneration.from_pretrained(root / "llava"), create_encoder("mgll-tiny-vit")[0],
                   projector_init="keep")
    cfg_path = root / "swapped" / "config.json"
    original = cfg_path.read_text()
    cfg = json.loads(original)
    cfg["image_seq_length"] = 50
    try:
        cfg_path.write_text(json.dumps(cfg))
        with pytest.raises(ShapeMismatch, match=r"image_seq_length=50 .* tower gives 64 \(8x8 patches"):
            load_swapped(root / "swapped", with_processor=False)
    finally:
        cfg_path.write_text(original)


def test_lora_targets_and_unquantised_modules_stay_off_the_tower(built):
    _, _, model, _ = built
    host = get_host("llava")
    names = [n for n, _ in model.named_modules()]
    targets = [n for n in names if re.fullmatch(host.lora_target_modules(), n)]
    assert len(targets) == 2 * 7  # 2 LM layers x q,k,v,o,gate,up,down
    assert all(n.startswith("model.language_model.") for n in targets)
    assert any(n.startswith("model.vision_tower.") and n.endswith("q_proj") for n in names)  # a trap the regex avoids
    assert host.unquantised_modules() == ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
    assert all(p in names for p in host.unquantised_modules())
