"""Swapping an MGLL tower into a tiny random-init LLaVA gives a stock transformers LLaVA that runs and reloads."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from mgll.adapters.hosts import get_host, list_hosts
from mgll.adapters.swap import swap_model
from mgll.encoder.factory import create_encoder
from mgll.testing.tiny import make_tiny_llava

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
import host_checks as hc  # noqa: E402
from open_clip_tower import OpenClipVisionTower  # noqa: E402  (open_clip's own layer outputs: the reference)

WORDS = ["status: abnormal. disease: drusen, cataract, glaucoma. status: normal. describe the image"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("swap")
    make_tiny_llava(root / "llava", WORDS, vision_width=32, image_size=32, patch_size=8)
    return hc.swap_with_cli(root, "llava", root / "llava")


def _inputs(processor, n=2):
    return processor(text=["<image>describe the image"] * n, images=hc.random_images([(80, 96)] * n), return_tensors="pt")


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
    hc.check_logits_and_generate(model, inputs, model.config.text_config.vocab_size)
    # the processor normalises with the MGLL encoder's statistics
    assert processor.image_processor.image_mean == pytest.approx(hc.MEAN)
    spec = hc.read_spec(root)
    assert spec["host"] == "llava" and spec["tower"]["num_image_tokens"] == 64


def test_save_load_gives_identical_logits(built):
    root, enc, loaded, processor = built
    fresh = LlavaForConditionalGeneration.from_pretrained(root / "llava").eval()
    hc.check_save_load_identical("llava", fresh, loaded, enc, _inputs(processor), projector_init="default")


def test_zero_init_projector_outputs_the_mean_embedding(built):
    root, enc, _, processor = built
    model = LlavaForConditionalGeneration.from_pretrained(root / "llava").eval()
    swap_model("llava", model, enc, projector_init="zero")
    pix = _inputs(processor, 1)["pixel_values"]
    with torch.no_grad():
        feats = model.model.get_image_features(pix, vision_feature_layer=-2, vision_feature_select_strategy="default").pooler_output[0]
        hc.assert_mean_embedding(model, feats)


def test_width_and_grid_mismatch_name_both_sizes(built, tmp_path):
    root, _, model, _ = built
    wide = LlavaForConditionalGeneration.from_pretrained(root / "llava")
    small, *_ = create_encoder("mgll-small-vit")  # width 128, 96 px, patch 12 -> 8x8 grid
    swap_model("llava", wide, small)
    hc.check_wide_projector_rejected("llava", model, wide, tmp_path)
    hc.check_keep_rejects_the_stock_width("llava", LlavaForConditionalGeneration.from_pretrained(root / "llava"))
    hc.check_edited_folder_rejected(root, "config.json", ["image_seq_length"], 50,
                                 r"image_seq_length=50 .* tower gives 64 \(8x8 patches")


def test_lora_targets_and_unquantised_modules_stay_off_the_tower(built):
    _, _, model, _ = built
    hc.check_lora_targets(model, "llava", r"model\.language_model\.", "model.vision_tower.",
                       unquantised=["model.vision_tower", "model.multi_modal_projector", "lm_head"])
