"""An MGLL tower in InternVL: per-tile MGLL ViT, 2x2 pixel shuffle at the MGLL width; runs, aligns, reloads."""

import argparse
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, InternVLForConditionalGeneration

from mgll.adapters.align import AlignConfig, align, load_aligned, record_caption
from mgll.adapters.cli import register
from mgll.adapters.hosts import ShapeMismatch, get_host, list_hosts
from mgll.adapters.swap import load_projector, load_swapped, save_projector, swap_model
from mgll.adapters.tiny import make_tiny_internvl
from mgll.adapters.vision_tower import OpenClipVisionTower
from mgll.data import make_synthetic
from mgll.encoder.factory import create_encoder, save_encoder

torch.set_num_threads(1)

LEVELS = ["status", "disease"]
MEAN, STD = (0.4, 0.4, 0.4), (0.2, 0.2, 0.2)
PROMPT = "<IMG_CONTEXT>describe the image"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("internvl")
    ds = make_synthetic(root / "data", kind="fundus", n=16, size=64, seed=1)
    captions = [record_caption(ds.card, r.labels, LEVELS) for r in ds.records]
    make_tiny_internvl(root / "ivl", [*captions, "describe the image"], vision_width=32, image_size=32, patch_size=8)
    torch.manual_seed(0)
    enc, _, _, _, name = create_encoder("mgll-tiny-vit", image_mean=MEAN, image_std=STD)  # 64 px, patch 8, width 64
    save_encoder(enc, root / "enc", name)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["swap", "--host", "internvl", "--mllm", str(root / "ivl"), "--encoder", str(root / "enc"),
                              "--out", str(root / "swapped"), "--seed", "7"])
    assert args.func(args) == 0
    enc, *_ = create_encoder(str(root / "enc"))
    model, processor = load_swapped(root / "swapped")
    return root, enc.eval(), model.eval(), processor


def _images(sizes=((64, 64), (64, 128))):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


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
        logits = model(**inputs).logits
        assert logits.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)
        gen = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert gen.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert processor.image_processor.image_mean == pytest.approx(MEAN)
    spec = json.loads((root / "swapped" / "mgll_swap.json").read_text())
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
    torch.manual_seed(7)
    swap_model("internvl", fresh, enc)
    inputs = processor(text=[PROMPT] * 2, images=_images(), return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, loaded(**inputs).logits)


def test_zero_init_projector_outputs_the_mean_embedding(built):
    root, enc, _, processor = built
    model = swap_model("internvl", InternVLForConditionalGeneration.from_pretrained(root / "ivl").eval(), enc, projector_init="zero")
    pix = processor(text=[PROMPT], images=_images(((64, 64),)), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = model.model.get_image_features(pix).pooler_output[0]
        mean = model.get_input_embeddings().weight.mean(0)
    torch.testing.assert_close(feats, mean.expand_as(feats), atol=1e-6, rtol=0)


def test_grid_and_width_mismatch_name_both_sizes(built, tmp_path):
    root, _, model, _ = built
    odd, *_ = create_encoder("mgll-tiny-vit", force_image_size=56)  # 7x7 grid
    with pytest.raises(ShapeMismatch, match=r"7x7 patch grid does not split into 2x2 pixel-shuffle windows"):
        swap_model("internvl", InternVLForConditionalGeneration.from_pretrained(root / "ivl"), odd)
    with pytest.raises(ShapeMismatch, match=r"expects 128-wide vision features but the tower gives 256"):
        swap_model("internvl", InternVLForConditionalGeneration.from_pretrained(root / "ivl"),
                   create_encoder("mgll-tiny-vit")[0], projector_init="keep")  # stock 32 x 4 vs MGLL 64 x 4
    wide = swap_model("internvl", InternVLForConditionalGeneration.from_pretrained(root / "ivl"),
                      create_encoder("mgll-small-vit")[0])  # width 128 -> 512 after the shuffle
    save_projector(wide, "internvl", tmp_path / "wide.safetensors")
    with pytest.raises(ShapeMismatch, match=r"512-wide .* gives 256"):
        load_projector(model, "internvl", tmp_path / "wide.safetensors")
    stock = AutoProcessor.from_pretrained(root / "ivl")  # 32-px tiles, 4 tokens each
    with pytest.raises(ValueError, match=r"Input image size \(32\*32\) doesn't match model \(64\*64\)"):
        model(**stock(text=[PROMPT], images=_images(((64, 64),)), return_tensors="pt"))
    cfg_path = root / "swapped" / "config.json"
    original = cfg_path.read_text()
    cfg = json.loads(original)
    cfg["image_seq_length"] = 50
    try:
        cfg_path.write_text(json.dumps(cfg))
        with pytest.raises(ShapeMismatch, match=r"image_seq_length=50 image tokens per tile but the tower gives 16 \(8x8"):
            load_swapped(root / "swapped", with_processor=False)
    finally:
        cfg_path.write_text(original)


def test_stage1_moves_only_the_projector_and_lowers_the_loss(built):
    root, *_ = built
    out = root / "stage1"
    align(AlignConfig(model=str(root / "swapped"), data=str(root / "data"), out=str(out), split=None, levels=LEVELS,
                      steps=20, batch_size=4, lr=3e-2), progress=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["host"] == "internvl" and summary["steps"] == 20
    assert summary["loss_last"] < summary["loss_first"] - 0.05, summary
    before, _ = load_swapped(root / "swapped", with_processor=False)
    after, _ = load_aligned(root / "swapped", out, with_processor=False)
    changed = []
    for (name, a), (_, b) in zip(before.state_dict().items(), after.state_dict().items()):
        if name.startswith("model.multi_modal_projector."):
            changed.append(not torch.equal(a, b))
        else:
            assert torch.equal(a, b), f"{name} changed in stage 1"
    assert changed and all(changed)


def test_lora_targets_and_unquantised_modules_stay_off_the_tower(built):
    _, _, model, _ = built
    host = get_host("internvl")
    names = [n for n, _ in model.named_modules()]
    targets = [n for n in names if re.fullmatch(host.lora_target_modules(), n)]
    assert len(targets) == 2 * 7 and all(n.startswith("model.language_model.") for n in targets)
    assert any(n.startswith("model.vision_tower.") and n.endswith("q_proj") for n in names)
    assert host.unquantised_modules() == ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
    assert all(p in names for p in host.unquantised_modules())


def test_qlora_stage2_quantises_only_the_lm(built):
    bnb = pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from mgll.adapters.align import _load_model

    root, *_ = built
    cfg = AlignConfig(model=str(root / "swapped"), data=str(root / "data"), out=str(root / "qlora"), stage=2, qlora=True,
                      split=None, levels=LEVELS, steps=2, batch_size=2, lr=1e-2)
    model = _load_model(cfg, get_host("internvl"), torch.device("cpu"))
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert any(k is bnb.nn.Linear4bit for n, k in kinds.items() if n.startswith("model.language_model."))
    assert all(k is torch.nn.Linear for n, k in kinds.items() if not n.startswith("model.language_model."))
    align(cfg, progress=False)
    saved = load_file(str(root / "qlora" / "adapter" / "adapter_model.safetensors"))
    assert saved and all("language_model" in k and "lora_" in k for k in saved)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
