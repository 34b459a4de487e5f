"""An MGLL tower in LLaVA-NeXT: anyres tiles at the MGLL size, per-tile tower, newline kept; runs, aligns, reloads."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import LlavaNextForConditionalGeneration

from mgll.adapters.hosts import ShapeMismatch, get_host, list_hosts
from mgll.adapters.hosts.llava_next import rescale_pinpoints
from mgll.adapters.swap import swap_model
from mgll.encoder.factory import create_encoder
from mgll.testing.tiny import make_tiny_llava_next

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
import host_checks as hc  # noqa: E402
from open_clip_tower import OpenClipVisionTower  # noqa: E402  (open_clip's own layer outputs: the reference)

torch.set_num_threads(1)

PROMPT = "<image>describe the image"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("next")
    captions = hc.synthetic_captions(root)
    make_tiny_llava_next(root / "next", [*captions, "describe the image"], vision_width=32, image_size=32, patch_size=8)
    return hc.swap_with_cli(root, "llava_next", root / "next")  # MGLL: 64 px, patch 8, width 64


def _images(sizes=((80, 96), (50, 120))):
    return hc.random_images(sizes)


def test_pinpoints_are_rescaled_to_the_mgll_tile(built):
    root, _, model, processor = built
    assert "llava_next" in list_hosts()
    assert model.config.image_grid_pinpoints == [[64, 128], [128, 64], [128, 128]]  # was 32-px tiles
    assert processor.image_processor.image_grid_pinpoints == [[64, 128], [128, 64], [128, 128]]
    assert processor.image_processor.image_mean == pytest.approx(hc.MEAN)
    assert rescale_pinpoints([[336, 672], [1008, 336]], 336, 224) == [[224, 448], [672, 224]]
    spec = hc.read_spec(root)
    assert spec["host"] == "llava_next" and spec["tower"]["tokens_per_tile"] == 64 and spec["tower"]["hidden_size"] == 64


def test_forward_generate_and_per_image_token_counts(built):
    _, _, model, processor = built
    host = get_host("llava_next")
    imgs = _images()
    inputs = processor(text=[PROMPT] * 2, images=imgs, return_tensors="pt", padding=True)
    assert inputs["pixel_values"].shape[-2:] == (64, 64)  # every tile is one MGLL image
    n_img = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert n_img == [host.image_tokens(model, 80, 96), host.image_tokens(model, 50, 120)]
    assert n_img[0] != n_img[1]  # anyres: the count follows the aspect ratio
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
        assert [f.shape[0] for f in feats] == n_img
    hc.check_logits_and_generate(model, inputs, model.config.text_config.vocab_size, min_new_tokens=3)


def test_the_tower_runs_per_tile_and_the_base_tile_comes_first(built):
    root, enc, model, processor = built
    inputs = processor(text=[PROMPT], images=_images(((40, 96),)), return_tensors="pt")
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    n_tiles = image_size_to_num_patches((40, 96), model.config.image_grid_pinpoints, 64)
    assert n_tiles == 1 + 2  # 40x96 -> the 1x2 pinpoint (64x128): two tiles + the base
    tiles = inputs["pixel_values"][0][:n_tiles]  # the processor pads every image to the largest layout
    with torch.no_grad():
        mgll = OpenClipVisionTower(enc)(tiles)  # select_layer -2, patch tokens, one MGLL pass per tile
        inside = model.model.vision_tower(tiles, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(inside, mgll, atol=1e-5, rtol=0)
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]
        torch.testing.assert_close(feats[:64], model.model.multi_modal_projector(mgll[0]), atol=1e-5, rtol=1e-5)
    source = LlavaNextForConditionalGeneration.from_pretrained(root / "next")
    assert torch.equal(source.model.image_newline, model.model.image_newline)  # LM-space newline kept
    newline_rows = (feats == model.model.image_newline).all(-1).sum().item()
    # the 2-tile map is 8x16 features; unpadded to 40:96 it keeps 6 rows, each with a newline
    assert newline_rows == 6 and feats.shape[0] == 64 + 6 * 16 + 6 == get_host("llava_next").image_tokens(model, 40, 96)


def test_save_load_gives_identical_logits(built):
    root, enc, loaded, processor = built
    fresh = LlavaNextForConditionalGeneration.from_pretrained(root / "next").eval()
    inputs = processor(text=[PROMPT] * 2, images=_images(), return_tensors="pt", padding=True)
    hc.check_save_load_identical("llava_next", fresh, loaded, enc, inputs)


def test_grid_and_width_mismatch_name_both_sizes(built, tmp_path):
    root, _, model, _ = built
    hc.check_keep_rejects_the_stock_width("llava_next", LlavaNextForConditionalGeneration.from_pretrained(root / "next"))
    wide = swap_model("llava_next", LlavaNextForConditionalGeneration.from_pretrained(root / "next"),
                      create_encoder("mgll-small-vit")[0])  # width 128, 96 px
    assert wide.config.image_grid_pinpoints == [[96, 192], [192, 96], [192, 192]]
    hc.check_wide_projector_rejected("llava_next", model, wide, tmp_path)
    source = LlavaNextForConditionalGeneration.from_pretrained(root / "next")
    source.config.image_grid_pinpoints = [[48, 64]]
    with pytest.raises(ShapeMismatch, match=r"\[48, 64\] is not a whole number of 32px tiles"):
        swap_model("llava_next", source, create_encoder("mgll-tiny-vit")[0])
    hc.check_edited_folder_rejected(root, "config.json", ["image_grid_pinpoints"], [[96, 128]],
                                 r"\[96, 128\] is not a whole number of 64px tiles")


def test_stage1_moves_only_the_projector_and_lowers_the_loss(built):
    root, *_ = built
    # everything else (tower, LM and image_newline) stays bit-equal
    hc.check_stage1(root, "llava_next", "model.multi_modal_projector.")


def test_lora_targets_and_unquantised_modules_stay_off_the_tower(built):
    _, _, model, _ = built
    hc.check_lora_targets(model, "llava_next", r"model\.language_model\.", "model.vision_tower.",
                       unquantised=["model.vision_tower", "model.multi_modal_projector", "lm_head"])


def test_qlora_stage2_quantises_only_the_lm(built):
    root, *_ = built
    hc.check_qlora_stage2(root, "llava_next", "model.language_model.")
