"""An MGLL tower bridged into InstructBLIP's pretrained Q-Former: runs, keeps the Q-Former, aligns, reloads."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, InstructBlipForConditionalGeneration

from mgll.adapters.hosts import ShapeMismatch, get_host, list_hosts
from mgll.adapters.swap import swap_model
from mgll.encoder.factory import create_encoder
from mgll.testing.tiny import make_tiny_instructblip

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
import host_checks as hc  # noqa: E402
from open_clip_tower import OpenClipVisionTower  # noqa: E402  (open_clip's own layer outputs: the reference)

torch.set_num_threads(1)

PROMPT = "describe the image"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("blip")
    captions = hc.synthetic_captions(root)
    make_tiny_instructblip(root / "blip", [*captions, PROMPT], vision_width=32, image_size=32, patch_size=8)
    return hc.swap_with_cli(root, "instructblip", root / "blip")  # MGLL: 64 px, patch 8, width 64


def _inputs(processor, n=2):
    return processor(text=[PROMPT] * n, images=hc.random_images([(80, 96)] * n), return_tensors="pt")


def test_forward_generate_and_token_count(built):
    root, enc, model, processor = built
    host = get_host("instructblip")
    assert "instructblip" in list_hosts()
    inputs = _inputs(processor)
    assert inputs["pixel_values"].shape[-2:] == (64, 64)  # resized to the MGLL image size
    n_img = (inputs["input_ids"] == model.config.image_token_index).sum(1).tolist()
    assert n_img == [8, 8] == [host.num_image_tokens(model)] * 2  # num_query_tokens, whatever the grid
    with torch.no_grad():
        feats = model.get_image_features(inputs["pixel_values"], inputs["qformer_input_ids"],
                                         inputs["qformer_attention_mask"]).pooler_output
        assert feats.shape == (2, 8, model.config.text_config.hidden_size)
        logits = model(**inputs).logits
        assert logits.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)
        gen = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert gen.shape[0] == 2 and gen.shape[1] >= 3
    assert processor.image_processor.image_mean == pytest.approx(hc.MEAN)
    spec = hc.read_spec(root)
    assert spec["tower"]["encoder_hidden_size"] == 32 and spec["tower"]["hidden_size"] == 64


def test_tower_is_the_mgll_vit_and_the_qformer_is_kept(built):
    root, enc, model, processor = built
    pix = _inputs(processor, 1)["pixel_values"]
    visual = model.vision_model
    with torch.no_grad():
        mgll = OpenClipVisionTower(enc, select_layer=-2, select_feature="cls_patch")(pix)  # class + 64 patches
        torch.testing.assert_close(visual.vit(pix, output_hidden_states=True).hidden_states[-2], mgll, atol=1e-5, rtol=0)
        torch.testing.assert_close(visual(pix).last_hidden_state, visual.bridge(mgll), atol=1e-5, rtol=0)
    assert visual(pix).last_hidden_state.shape == (1, 65, model.config.qformer_config.encoder_hidden_size)
    source = InstructBlipForConditionalGeneration.from_pretrained(root / "blip")
    src, now = source.state_dict(), model.state_dict()
    kept = [k for k in src if not k.startswith("vision_model.")]
    assert any(k.startswith("qformer.") and ".crossattention." in k for k in kept)
    assert all(torch.equal(src[k], now[k]) for k in kept)  # bridged: Q-Former cross-attention K/V untouched


def test_save_load_gives_identical_logits(built):
    root, enc, loaded, processor = built
    fresh = InstructBlipForConditionalGeneration.from_pretrained(root / "blip").eval()
    hc.check_save_load_identical("instructblip", fresh, loaded, enc, _inputs(processor))


def test_grid_and_width_mismatch_name_both_sizes(built, tmp_path):
    root, _, model, _ = built
    stock = AutoProcessor.from_pretrained(root / "blip")  # resizes to the stock tower's 32 px
    with pytest.raises(ShapeMismatch, match=r"32x32 px \(4x4 patches\) but the MGLL tower takes 64x64 px \(8x8 patches"):
        model(**_inputs(stock, 1))
    wide = swap_model("instructblip", InstructBlipForConditionalGeneration.from_pretrained(root / "blip"),
                      create_encoder("mgll-small-vit")[0])  # width 128
    hc.check_wide_projector_rejected("instructblip", model, wide, tmp_path)
    with pytest.raises(ValueError, match=r"supports 'default' only"):
        swap_model("instructblip", InstructBlipForConditionalGeneration.from_pretrained(root / "blip"),
                   create_encoder("mgll-tiny-vit")[0], projector_init="zero")
    hc.check_edited_folder_rejected(root, "mgll_swap.json", ["tower", "hidden_size"], 96,
                                 r"tower.hidden_size=96 but the model config gives 64")


def test_stage1_moves_only_the_bridge_and_projection_and_lowers_the_loss(built):
    root, *_ = built
    hc.check_stage1(root, "instructblip", ("vision_model.bridge.", "language_projection."))


def test_lora_targets_and_unquantised_modules(built):
    _, _, model, _ = built
    hc.check_lora_targets(model, "instructblip", r"language_model\.model\.layers\.", "vision_model.vit.")
    assert "qformer" in get_host("instructblip").unquantised_modules()


def test_qlora_stage2_quantises_only_the_lm(built):
    root, *_ = built
    keep = ("vision_model.", "qformer.", "language_projection", "language_model.lm_head")
    hc.check_qlora_stage2(root, "instructblip", "language_model.model.", keep=keep)
