"""An MGLL tower in LLaVA-NeXT: anyres tiles at the MGLL size, per-tile tower, newline kept; runs, aligns, reloads."""

import argparse
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaNextForConditionalGeneration

from mgll.adapters.align import AlignConfig, align, load_aligned, record_caption
from mgll.adapters.cli import register
from mgll.adapters.hosts import ShapeMismatch, get_host, list_hosts
from mgll.adapters.hosts.llava_next import rescale_pinpoints
from mgll.adapters.swap import load_projector, load_swapped, save_projector, swap_model
from mgll.adapters.tiny import make_tiny_llava_next
from mgll.adapters.vision_tower import OpenClipVisionTower
from mgll.data import make_synthetic
from mgll.encoder.factory import create_encoder, save_encoder

torch.set_num_threads(1)

LEVELS = ["status", "disease"]
MEAN, STD = (0.4, 0.4, 0.4), (0.2, 0.2, 0.2)
PROMPT = "<image>describe the image"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("next")
    ds = make_synthetic(root / "data", kind="fundus", n=16, size=64, seed=1)
    captions = [record_caption(ds.card, r.labels, LEVELS) for r in ds.records]
    make_tiny_llava_next(root / "next", [*captions, "describe the image"], vision_width=32, image_size=32, patch_size=8)
    torch.manual_seed(0)
    enc, _, _, _, name = create_encoder("mgll-tiny-vit", image_mean=MEAN, image_std=STD)  # 64 px, patch 8, width 64
    save_encoder(enc, root / "enc", name)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["swap", "--host", "llava_next", "--mllm", str(root / "next"), "--encoder", str(root / "enc"),
                              "--out", str(root / "swapped"), "--seed", "7"])
    assert args.func(args) == 0
    enc, *_ = create_encoder(str(root / "enc"))
    model, processor = load_swapped(root / "swapped")
    return root, enc.eval(), model.eval(), processor


def _images(sizes=((80, 96), (50, 120))):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def test_pinpoints_are_rescaled_to_the_mgll_tile(built):
    root, _, model, processor = built
    assert "llava_next" in list_hosts()
    assert model.config.image_grid_pinpoints == [[64, 128], [128, 64], [128, 128]]  # was 32-px tiles
    assert processor.image_processor.image_grid_pinpoints == [[64, 128], [128, 64], [128, 128]]
    assert processor.image_processor.image_mean == pytest.approx(MEAN)
    assert rescale_pinpoints([[336, 672], [1008, 336]], 336, 224) == [[224, 448], [672, 224]]
    spec = json.loads((root / "swapped" / "mgll_swap.json").read_text())
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
        logits = model(**inputs).logits
        assert logits.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)
        gen = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert gen.shape == (2, inputs["input_ids"].shape[1] + 3)


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
    torch.manual_seed(7)
    swap_model("llava_next", fresh, enc)
    inputs = processor(text=[PROMPT] * 2, images=_images(), return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, loaded(**inputs).logits)


def test_grid_and_width_mismatch_name_both_sizes(built, tmp_path):
    root, _, model, _ = built
    with pytest.raises(ShapeMismatch, match=r"expects 32-wide vision features but the tower gives 64"):
        swap_model("llava_next", LlavaNextForConditionalGeneration.from_pretrained(root / "next"),
                   create_encoder("mgll-tiny-vit")[0], projector_init="keep")
    wide = swap_model("llava_next", LlavaNextForConditionalGeneration.from_pretrained(root / "next"),
                      create_encoder("mgll-small-vit")[0])  # width 128, 96 px
    assert wide.config.image_grid_pinpoints == [[96, 192], [192, 96], [192, 192]]
    save_projector(wide, "llava_next", tmp_path / "wide.safetensors")
    with pytest.raises(ShapeMismatch, match=r"128-wide .* gives 64"):
        load_projector(model, "llava_next", tmp_path / "wide.safetensors")
    source = LlavaNextForConditionalGeneration.from_pretrained(root / "next")
    source.config.image_grid_pinpoints = [[48, 64]]
    with pytest.raises(ShapeMismatch, match=r"\[48, 64\] is not a whole number of 32px tiles"):
        swap_model("llava_next", source, create_encoder("mgll-tiny-vit")[0])
    cfg_path = root / "swapped" / "config.json"
    original = cfg_path.read_text()
    cfg = json.loads(original)
    cfg["image_grid_pinpoints"] = [[96, 128]]
    try:
        cfg_path.write_text(json.dumps(cfg))
        with pytest.raises(ShapeMismatch, match=r"\[96, 128\] is not a whole number of 64px tiles"):
            load_swapped(root / "swapped", with_processor=False)
    finally:
        cfg_path.write_text(original)


def test_stage1_moves_only_the_projector_and_lowers_the_loss(built):
    root, *_ = built
    out = root / "stage1"
    align(AlignConfig(model=str(root / "swapped"), data=str(root / "data"), out=str(out), split=None, levels=LEVELS,
                      steps=20, batch_size=4, lr=3e-2), progress=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["host"] == "llava_next" and summary["steps"] == 20
    assert summary["loss_last"] < summary["loss_first"] - 0.05, summary
    before, _ = load_swapped(root / "swapped", with_processor=False)
    after, _ = load_aligned(root / "swapped", out, with_processor=False)
    changed = []
    for (name, a), (_, b) in zip(before.state_dict().items(), after.state_dict().items()):
        if name.startswith("model.multi_modal_projector."):
            changed.append(not torch.equal(a, b))
        else:
            assert torch.equal(a, b), f"{name} changed in stage 1"  # tower, LM and image_newline
    assert changed and all(changed)


def test_lora_targets_and_unquantised_modules_stay_off_the_tower(built):
    _, _, model, _ = built
    host = get_host("llava_next")
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
    model = _load_model(cfg, get_host("llava_next"), torch.device("cpu"))
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert any(k is bnb.nn.Linear4bit for n, k in kinds.items() if n.startswith("model.language_model."))
    assert all(k is torch.nn.Linear for n, k in kinds.items() if not n.startswith("model.language_model."))
    align(cfg, progress=False)
    saved = load_file(str(root / "qlora" / "adapter" / "adapter_model.safetensors"))
    assert saved and all("language_model" in k and "lora_" in k for k in saved)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
