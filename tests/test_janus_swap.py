"""An MGLL tower on Janus' understanding path: runs, counts tokens, leaves image generation intact, aligns, reloads."""

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, JanusForConditionalGeneration

from mgll.adapters.hosts import ShapeMismatch, get_host, list_hosts
from mgll.adapters.hosts.janus import GENERATION_PATHS
from mgll.adapters.swap import swap_model
from mgll.encoder.factory import create_encoder
from mgll.testing.tiny import make_tiny_janus

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
import host_checks as hc  # noqa: E402

torch.set_num_threads(1)

PROMPT = "<image_placeholder>describe the image"
GEN_PREFIXES = tuple(p + "." for p in GENERATION_PATHS)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("janus")
    captions = hc.synthetic_captions(root)
    make_tiny_janus(root / "janus", [*captions, "describe the image"], vision_width=32, image_size=32, patch_size=8)
    return hc.swap_with_cli(root, "janus", root / "janus")  # MGLL: 64 px, patch 8, width 64


def _images(n=2, size=(80, 96)):
    return hc.random_images([size] * n)


def test_forward_generate_and_token_count(built):
    root, _, model, processor = built
    host = get_host("janus")
    assert "janus" in list_hosts() and type(model).__name__ == "MgllJanusForConditionalGeneration"
    inputs = processor(text=[PROMPT] * 2, images=_images(), return_tensors="pt")
    assert inputs["pixel_values"].shape[-2:] == (64, 64)
    n_img = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert n_img == [64, 64] == [host.num_image_tokens(model)] * 2  # the MGLL 8x8 grid
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"]).pooler_output
        assert feats.shape == (2, 64, model.config.text_config.hidden_size)
    hc.check_logits_and_generate(model, inputs, model.config.text_config.vocab_size, min_new_tokens=3)
    assert processor.image_processor.image_mean == pytest.approx(hc.MEAN)
    spec = hc.read_spec(root)
    assert spec["tower"]["num_image_tokens"] == 64 and spec["tower"]["generation_image_tokens"] == 16


def test_tower_gives_open_clips_own_tokens(built):
    _, enc, model, processor = built
    pix = processor(text=[PROMPT], images=_images(1), return_tensors="pt")["pixel_values"]
    visual = enc.visual
    visual.output_tokens = True
    try:
        with torch.no_grad():
            _, tokens = visual(pix)  # last block, ln_post, class token dropped
            ours = model.model.vision_model(pix).last_hidden_state
    finally:
        visual.output_tokens = False
    torch.testing.assert_close(ours, tokens, atol=1e-5, rtol=0)


def test_generation_path_is_untouched_and_still_draws(built):
    root, _, model, processor = built
    source = JanusForConditionalGeneration.from_pretrained(root / "janus")
    src, now = source.state_dict(), model.state_dict()
    gen_keys = [k for k in src if k.startswith(GEN_PREFIXES)]
    assert gen_keys and all(torch.equal(src[k], now[k]) for k in gen_keys)
    assert all(torch.equal(src[k], now[k]) for k in src if k.startswith(("model.language_model.", "lm_head.")))
    assert model.config.vq_config.num_patches == source.config.vq_config.num_patches == 4
    assert model.model.vision_model.config.num_image_tokens == 16  # the generation grid, not the MGLL one
    inputs = processor(text=["describe the image"], return_tensors="pt", generation_mode="image")
    torch.manual_seed(0)
    with torch.no_grad():
        tokens = model.generate(**inputs, generation_mode="image", do_sample=True, guidance_scale=2.0)
        pixels = model.decode_image_tokens(tokens)
        assert torch.equal(pixels, source.decode_image_tokens(tokens))
    assert tokens.shape == (1, 16) and pixels.shape[0] == 1 and pixels.shape[-1] == 3  # 4x4 VQ codes drawn and decoded


def test_save_load_gives_identical_logits(built):
    root, enc, loaded, processor = built
    fresh = JanusForConditionalGeneration.from_pretrained(root / "janus").eval()
    inputs = processor(text=[PROMPT] * 2, images=_images(), return_tensors="pt")
    hc.check_save_load_identical("janus", fresh, loaded, enc, inputs)


def test_zero_init_aligner_outputs_the_mean_embedding(built):
    root, enc, _, processor = built
    model = swap_model("janus", JanusForConditionalGeneration.from_pretrained(root / "janus").eval(), enc, projector_init="zero")
    pix = processor(text=[PROMPT], images=_images(1), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = model.model.get_image_features(pix).pooler_output[0]
        hc.assert_mean_embedding(model, feats)


def test_grid_and_width_mismatch_name_both_sizes(built, tmp_path):
    root, _, model, _ = built
    stock = AutoProcessor.from_pretrained(root / "janus")  # 32 px for the SigLIP tower
    with pytest.raises(ShapeMismatch, match=r"32x32 px \(4x4 patches\) but the MGLL tower takes 64x64 px \(8x8 patches"):
        model(**stock(text=[PROMPT], images=_images(1), return_tensors="pt"))
    hc.check_keep_rejects_the_stock_width("janus", JanusForConditionalGeneration.from_pretrained(root / "janus"))
    wide = swap_model("janus", JanusForConditionalGeneration.from_pretrained(root / "janus"), create_encoder("mgll-small-vit")[0])
    hc.check_wide_projector_rejected("janus", model, wide, tmp_path)
    hc.check_edited_folder_rejected(root, "mgll_swap.json", ["tower", "num_image_tokens"], 50,
                                 r"num_image_tokens=50 but the model config gives 64")


def test_stage1_moves_only_the_aligner_and_lowers_the_loss(built):
    root, *_ = built
    # everything else (tower, LM and the generation path) stays bit-equal
    summary, out = hc.check_stage1(root, "janus", "model.aligner.", min_drop=None)
    # Janus hands the aligner LayerNorm-ed features, so the fresh aligner starts the LM near the caption floor:
    # compare with the first step rather than the first five
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["loss_last"] < summary["loss_first"] and summary["loss_last"] < losses[0] - 0.1, losses


def test_lora_targets_and_unquantised_modules(built):
    _, _, model, _ = built
    hc.check_lora_targets(model, "janus", r"model\.language_model\.", "model.vision_model.vit.")
    assert "model.generation_head" in get_host("janus").unquantised_modules()


def test_qlora_stage2_quantises_only_the_lm(built):
    root, *_ = built
    hc.check_qlora_stage2(root, "janus", "model.language_model.")
