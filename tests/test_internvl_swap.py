"""An MGLL tower in InternVL: per-tile MGLL ViT, 2x2 pixel shuffle at the MGLL width; runs, aligns, reloads."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, InternVLForConditionalGeneration

from mgll.adapters.hosts import ShapeMismatch, get_host, list_hosts
from mgll.adapters.swap import swap_model
from mgll.encoder.factory import create_encoder
from mgll.testing.tiny import make_tiny_internvl

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
import host_checks as hc  # noqa: E402
from open_clip_tower import OpenClipVisionTower  # noqa: E402  (open_clip's own layer outputs: the reference)

torch.set_num_threads(1)

PROMPT = "<IMG_CONTEXT>describe the image"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("internvl")
    captions = hc.synthetic_captions(root)
    make_tiny_internvl(root / "ivl", [*captions, "describe the image"], vision_width=32, image_size=32, patch_size=8)
    return hc.swap_with_cli(root, "internvl", root / "ivl")  # MGLL: 64 px, patch 8, width 64


def _images(sizes=((64, 64), (64, 128))):
    return hc.random_images(sizes)


def test_forward_generate_and_token_count_per_tile(built):
    root, _, model, processor = built
    host = get_host("internvl")
    assert "internvl" in list_hosts() and type(model).__name__ == "MgllInternVLForConditionalGeneration"
    assert model.config.image_seq_length == 16 == host.num_image_tokens(model)  # 8x8 grid / 2x2 shuffle
    assert host.projector(model).linear_1.in_features == 4 * 64
    inputs = processor(text=[PROMPT] * 2, images=_images(), return_tensors="pt", padding=True)
    assert inputs["pixel_values"].shape == (1 + 3, 3, 64, 64)  # 64x64: 1 tile; 64x128: 2 tiles + thumbnail
    n_img = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert n_img == [16, 3 * 16]
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"]).pooler_output
        assert feats.shape == (4, 16, model.config.text_config.hidden_size)
    hc.check_logits_and_generate(model, inputs, model.config.text_config.vocab_size, min_new_tokens=3)
    assert processor.image_processor.image_mean == pytest.approx(hc.MEAN)
    spec = hc.read_spec(root)
    assert spec["host"] == "internvl" and spec["tower"]["num_image_tokens"] == 16 and spec["tower"]["hidden_size"] == 64


def test_tower_is_the_mgll_vit_and_tokens_are_2x2_windows(built):
    _, enc, model, processor = built
    pix = processor(text=[PROMPT], images=_images(((64, 64),)), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        raster = OpenClipVisionTower(enc, select_layer=-1)(pix)[0].reshape(8, 8, -1)  # InternVL takes the last block
        inside = model.model.vision_tower(pix, output_hidden_states=True).hidden_states[-1][0, 1:]
        torch.testing.assert_close(inside.reshape(8, 8, -1), raster, atol=1e-5, rtol=0)
        feats = model.model.get_image_features(pix).pooler_output[0]
        r, c = 1, 2  # token 1*4 + 2 folds patch rows 2..3, cols 4..5
        window = torch.cat([raster[2 * r, 2 * c], raster[2 * r, 2 * c + 1], raster[2 * r + 1, 2 * c], raster[2 * r + 1, 2 * c + 1]])
        expected = model.model.multi_modal_projector(window[None])[0]
    torch.testing.assert_close(feats[r * 4 + c], expected, atol=1e-5, rtol=1e-5)


def test_save_load_gives_identical_logits(built):
    root, enc, loaded, processor = built
    fresh = InternVLForConditionalGeneration.from_pretrained(root / "ivl").eval()
    inputs = processor(text=[PROMPT] * 2, images=_images(), return_tensors="pt", padding=True)
    hc.check_save_load_identical("internvl", fresh, loaded, enc, inputs)


def test_zero_init_projector_outputs_the_mean_embedding(built):
    root, enc, _, processor = built
    model = swap_model("internvl", InternVLForConditionalGeneration.from_pretrained(root / "ivl").eval(), enc, projector_init="zero")
    pix = processor(text=[PROMPT], images=_images(((64, 64),)), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = model.model.get_image_features(pix).pooler_output[0]
        hc.assert_mean_embedding(model, feats)


def test_grid_and_width_mismatch_name_both_sizes(built, tmp_path):
    root, _, model, _ = built
    odd, *_ = create_encoder("mgll-tiny-vit", force_image_size=56)  # 7x7 grid
    with pytest.raises(ShapeMismatch, match=r"7x7 patch grid does not split into 2x2 pixel-shuffle windows"):
        swap_model("internvl", InternVLForConditionalGeneration.from_pretrained(root / "ivl"), odd)
    # stock 32 x 4 vs MGLL 64 x 4
    hc.check_keep_rejects_the_stock_width("internvl", InternVLForConditionalGeneration.from_pretrained(root / "ivl"),
                                       expects=128, gives=256)
    wide = swap_model("internvl", InternVLForConditionalGeneration.from_pretrained(root / "ivl"),
                      create_encoder("mgll-small-vit")[0])  # width 128 -> 512 after the shuffle
    hc.check_wide_projector_rejected("internvl", model, wide, tmp_path, saved=512, gives=256)
    stock = AutoProcessor.from_pretrained(root / "ivl")  # 32-px tiles, 4 tokens each
    with pytest.raises(ValueError, match=r"Input image size \(32\*32\) doesn't match model \(64\*64\)"):
        model(**stock(text=[PROMPT], images=_images(((64, 64),)), return_tensors="pt"))
    hc.check_edited_folder_rejected(root, "config.json", ["image_seq_length"], 50,
                                 r"image_seq_length=50 image tokens per tile but the tower gives 16 \(8x8")


def test_stage1_moves_only_the_projector_and_lowers_the_loss(built):
    root, *_ = built
    hc.check_stage1(root, "internvl", "model.multi_modal_projector.")


def test_lora_targets_and_unquantised_modules_stay_off_the_tower(built):
    _, _, model, _ = built
    hc.check_lora_targets(model, "internvl", r"model\.language_model\.", "model.vision_tower.",
                       unquantised=["model.vision_tower", "model.multi_modal_projector", "lm_head"])


def test_qlora_stage2_quantises_only_the_lm(built):
    root, *_ = built
    hc.check_qlora_stage2(root, "internvl", "model.language_model.")
