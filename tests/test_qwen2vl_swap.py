"""An MGLL tower behind Qwen2-VL's grid_thw / 2x2-merger contract: runs, counts tokens right, aligns, reloads."""

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

from mgll.adapters.cli import register
from mgll.adapters.hosts import ShapeMismatch, get_host, list_hosts
from mgll.adapters.swap import swap_model
from mgll.encoder.factory import create_encoder
from mgll.testing.tiny import make_tiny_qwen2_vl

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
import host_checks as hc  # noqa: E402
from open_clip_tower import OpenClipVisionTower  # noqa: E402  (open_clip's own layer outputs: the reference)

torch.set_num_threads(1)

PROMPT = "<image>describe the image"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    captions = hc.synthetic_captions(root)
    make_tiny_qwen2_vl(root / "qwen", [*captions, "describe the image"], vision_width=32, patch_size=14)
    return hc.swap_with_cli(root, "qwen2_vl", root / "qwen")  # MGLL: 64 px, patch 8, width 64


def _images(n=2, size=(64, 64)):
    return hc.random_images([size] * n)


def test_registry_and_cli_know_the_host():
    assert "qwen2_vl" in list_hosts()
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    with pytest.raises(SystemExit):
        parser.parse_args(["swap", "--host", "qwen3", "--mllm", "a", "--encoder", "b", "--out", "c"])
    assert parser.parse_args(["swap", "--host", "qwen2_vl", "--mllm", "a", "--encoder", "b", "--out", "c"]).host == "qwen2_vl"


def test_forward_generate_and_token_count_follow_the_mgll_grid(built):
    root, enc, model, processor = built
    host = get_host("qwen2_vl")
    inputs = processor(text=[PROMPT] * 2, images=_images(), return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 8]]  # the MGLL grid: 64 px / patch 8
    n_img = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert n_img == [16, 16] == [host.num_image_tokens(model)] * 2  # 8*8 / 2**2
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        assert [f.shape for f in feats] == [(16, model.config.text_config.hidden_size)] * 2
    hc.check_logits_and_generate(model, inputs, model.config.text_config.vocab_size, min_new_tokens=3)
    assert processor.image_processor.image_mean == pytest.approx(hc.MEAN)
    spec = hc.read_spec(root)
    assert spec["host"] == "qwen2_vl" and spec["tower"]["num_image_tokens"] == 16 and spec["tower"]["grid"] == 8


def test_tower_sees_the_image_and_merges_2x2_windows(built):
    _, enc, model, processor = built
    imgs = _images(1)
    inputs = processor(text=[PROMPT], images=imgs, return_tensors="pt")
    visual = model.model.visual
    # the processor's flattened patches rebuild the normalised image exactly (64 px in: no resize)
    x = torch.from_numpy(np.asarray(imgs[0], dtype=np.float32) / 255).permute(2, 0, 1)
    x = (x - torch.tensor(hc.MEAN)[:, None, None]) / torch.tensor(hc.STD)[:, None, None]
    frames = visual._frames(inputs["pixel_values"], inputs["image_grid_thw"])
    torch.testing.assert_close(frames[0], x, atol=1e-5, rtol=0)
    with torch.no_grad():
        raster = OpenClipVisionTower(enc, select_layer=-1)(x[None])[0].reshape(8, 8, -1)  # the MGLL ViT itself
        merged = visual(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        m = visual.merger
        r, c = 1, 2  # merged token 1*4 + 2 covers patch rows 2..3, cols 4..5
        window = torch.stack([raster[2 * r, 2 * c], raster[2 * r, 2 * c + 1], raster[2 * r + 1, 2 * c], raster[2 * r + 1, 2 * c + 1]])
        expected = m.mlp(m.ln_q(window).reshape(1, -1))[0]
    torch.testing.assert_close(merged[r * 4 + c], expected, atol=1e-5, rtol=1e-5)


def test_a_still_video_gives_the_image_tokens_once_per_temporal_patch(built):
    _, _, model, processor = built
    img = _images(1)[0]
    video = np.stack([np.asarray(img)] * 4)  # 4 frames -> grid_t = 2 temporal patches
    inputs = processor(text=["<video>describe the image"], videos=[video], return_tensors="pt", do_sample_frames=False)
    assert inputs["video_grid_thw"].tolist() == [[2, 8, 8]]
    assert int((inputs["input_ids"] == model.config.video_token_id).sum()) == 2 * 16
    image = processor(text=[PROMPT], images=[img], return_tensors="pt")
    with torch.no_grad():
        vid = model.model.visual(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output
        still = model.model.visual(image["pixel_values"], image["image_grid_thw"]).pooler_output
        assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]
    torch.testing.assert_close(vid, torch.cat([still, still]), atol=1e-5, rtol=1e-5)


def test_save_load_gives_identical_logits(built):
    root, enc, loaded, processor = built
    fresh = Qwen2VLForConditionalGeneration.from_pretrained(root / "qwen").eval()
    inputs = processor(text=[PROMPT] * 2, images=_images(), return_tensors="pt")
    hc.check_save_load_identical("qwen2_vl", fresh, loaded, enc, inputs)


def test_zero_init_merger_outputs_the_mean_embedding(built):
    root, enc, _, processor = built
    model = swap_model("qwen2_vl", Qwen2VLForConditionalGeneration.from_pretrained(root / "qwen").eval(), enc, projector_init="zero")
    inputs = processor(text=[PROMPT], images=_images(1), return_tensors="pt")
    with torch.no_grad():
        feats = model.model.visual(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        hc.assert_mean_embedding(model, feats)


def test_grid_and_width_mismatch_name_both_sizes(built, tmp_path):
    root, _, model, processor = built
    # the swapped processor gives a non-square image the encoder's square view: one 8x8 MGLL grid
    ok = processor(text=[PROMPT], images=_images(1, (80, 96)), return_tensors="pt")
    assert ok["image_grid_thw"].tolist() == [[1, 8, 8]]
    # Qwen2-VL's own resize keeps the aspect: a 6x8 grid, which the MGLL tower refuses with both grids named
    from transformers import Qwen2VLImageProcessor

    keep_aspect = Qwen2VLImageProcessor(patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=64 * 64, max_pixels=64 * 64)
    bad = {**ok, **keep_aspect(_images(1, (80, 96)), return_tensors="pt")}
    with pytest.raises(ShapeMismatch, match=r"6x8 patch grid but the MGLL tower takes 8x8"):
        model(**{k: bad[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")})
    # the stock processor cuts 14-px patches; the tower takes 8-px ones
    stock = AutoProcessor.from_pretrained(root / "qwen")
    with pytest.raises(ShapeMismatch, match=r"rows are 1176 wide but the MGLL tower takes 384"):
        model(**stock(text=[PROMPT], images=_images(1), return_tensors="pt"))
    # an odd grid cannot be merged 2x2
    odd, *_ = create_encoder("mgll-tiny-vit", force_image_size=56)  # 7x7
    with pytest.raises(ShapeMismatch, match=r"7x7 patch grid does not split into 2x2"):
        swap_model("qwen2_vl", Qwen2VLForConditionalGeneration.from_pretrained(root / "qwen"), odd)
    # widths: keeping the 32-wide stock merger, and a 128-wide projector file
    hc.check_keep_rejects_the_stock_width("qwen2_vl", Qwen2VLForConditionalGeneration.from_pretrained(root / "qwen"))
    wide = swap_model("qwen2_vl", Qwen2VLForConditionalGeneration.from_pretrained(root / "qwen"), create_encoder("mgll-small-vit")[0])
    hc.check_wide_projector_rejected("qwen2_vl", model, wide, tmp_path)
    hc.check_edited_folder_rejected(root, "mgll_swap.json", ["tower", "num_image_tokens"], 50,
                                 r"num_image_tokens=50 but the model config gives 16")


def test_stage1_moves_only_the_merger_and_lowers_the_loss(built):
    root, *_ = built
    hc.check_stage1(root, "qwen2_vl", "model.visual.merger.")


def test_lora_targets_and_unquantised_modules_stay_off_the_tower(built):
    _, _, model, _ = built
    hc.check_lora_targets(model, "qwen2_vl", r"model\.language_model\.", "model.visual.vit.",
                       unquantised=["model.visual.vit", "model.visual.merger", "lm_head"])


def test_qlora_stage2_quantises_only_the_lm(built):
    root, *_ = built
    hc.check_qlora_stage2(root, "qwen2_vl", "model.language_model.", keep=("model.visual.", "lm_head"))
