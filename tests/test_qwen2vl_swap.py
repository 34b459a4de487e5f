"""An MGLL tower behind Qwen2-VL's grid_thw / 2x2-merger contract: runs, counts tokens right, aligns, reloads."""

import argparse
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

from mgll.adapters.align import AlignConfig, align, load_aligned, record_caption
from mgll.adapters.cli import register
from mgll.adapters.hosts import ShapeMismatch, get_host, list_hosts
from mgll.adapters.hosts.qwen2_vl import square_images
from mgll.adapters.swap import load_projector, load_swapped, save_projector, swap_model
from mgll.adapters.tiny import make_tiny_qwen2_vl
from mgll.adapters.vision_tower import OpenClipVisionTower
from mgll.data import make_synthetic
from mgll.encoder.factory import create_encoder, save_encoder

torch.set_num_threads(1)

LEVELS = ["status", "disease"]
MEAN, STD = (0.4, 0.4, 0.4), (0.2, 0.2, 0.2)
PROMPT = "<image>describe the image"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    ds = make_synthetic(root / "data", kind="fundus", n=16, size=64, seed=1)
    captions = [record_caption(ds.card, r.labels, LEVELS) for r in ds.records]
    make_tiny_qwen2_vl(root / "qwen", [*captions, "describe the image"], vision_width=32, patch_size=14)
    torch.manual_seed(0)
    enc, _, _, _, name = create_encoder("mgll-tiny-vit", image_mean=MEAN, image_std=STD)  # 64 px, patch 8, width 64
    save_encoder(enc, root / "enc", name)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["swap", "--host", "qwen2_vl", "--mllm", str(root / "qwen"), "--encoder", str(root / "enc"),
                              "--out", str(root / "swapped"), "--seed", "7"])
    assert args.func(args) == 0
    enc, *_ = create_encoder(str(root / "enc"))
    model, processor = load_swapped(root / "swapped")
    return root, enc.eval(), model.eval(), processor


def _images(n=2, size=(64, 64)):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)) for _ in range(n)]


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
        logits = model(**inputs).logits
        assert logits.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)
        gen = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert gen.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert processor.image_processor.image_mean == pytest.approx(MEAN)
    spec = json.loads((root / "swapped" / "mgll_swap.json").read_text())
    assert spec["host"] == "qwen2_vl" and spec["tower"]["num_image_tokens"] == 16 and spec["tower"]["grid"] == 8


def test_tower_sees_the_image_and_merges_2x2_windows(built):
    _, enc, model, processor = built
    imgs = _images(1)
    inputs = processor(text=[PROMPT], images=imgs, return_tensors="pt")
    visual = model.model.visual
    # the processor's flattened patches rebuild the normalised image exactly (64 px in: no resize)
    x = torch.from_numpy(np.asarray(imgs[0], dtype=np.float32) / 255).permute(2, 0, 1)
    x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
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
    torch.manual_seed(7)
    swap_model("qwen2_vl", fresh, enc)
    inputs = processor(text=[PROMPT] * 2, images=_images(), return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, loaded(**inputs).logits)


def test_zero_init_merger_outputs_the_mean_embedding(built):
    root, enc, _, processor = built
    model = swap_model("qwen2_vl", Qwen2VLForConditionalGeneration.from_pretrained(root / "qwen").eval(), enc, projector_init="zero")
    inputs = processor(text=[PROMPT], images=_images(1), return_tensors="pt")
    with torch.no_grad():
        feats = model.model.visual(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        mean = model.get_input_embeddings().weight.mean(0)
    torch.testing.assert_close(feats, mean.expand_as(feats), atol=1e-6, rtol=0)


def test_grid_and_width_mismatch_name_both_sizes(built, tmp_path):
    root, _, model, processor = built
    # a non-square image gets a 6x8 grid from Qwen2-VL's resize; the MGLL tower has 8x8
    bad = processor(text=[PROMPT], images=_images(1, (80, 96)), return_tensors="pt")
    with pytest.raises(ShapeMismatch, match=r"6x8 patch grid but the MGLL tower takes 8x8"):
        model(**bad)
    ok = processor(text=[PROMPT], images=square_images(_images(1, (80, 96)), 64), return_tensors="pt")
    assert ok["image_grid_thw"].tolist() == [[1, 8, 8]]
    # the stock processor cuts 14-px patches; the tower takes 8-px ones
    stock = AutoProcessor.from_pretrained(root / "qwen")
    with pytest.raises(ShapeMismatch, match=r"rows are 1176 wide but the MGLL tower takes 384"):
        model(**stock(text=[PROMPT], images=_images(1), return_tensors="pt"))
    # an odd grid cannot be merged 2x2
    odd, *_ = create_encoder("mgll-tiny-vit", force_image_size=56)  # 7x7
    with pytest.raises(ShapeMismatch, match=r"7x7 patch grid does not split into 2x2"):
        swap_model("qwen2_vl", Qwen2VLForConditionalGeneration.from_pretrained(root / "qwen"), odd)
    # widths: keeping the 32-wide stock merger, and a 128-wide projector file
    with pytest.raises(ShapeMismatch, match=r"expects 32-wide vision features but the tower gives 64"):
        swap_model("qwen2_vl", Qwen2VLForConditionalGeneration.from_pretrained(root / "qwen"),
                   create_encoder("mgll-tiny-vit")[0], projector_init="keep")
    wide = swap_model("qwen2_vl", Qwen2VLForConditionalGeneration.from_pretrained(root / "qwen"), create_encoder("mgll-small-vit")[0])
    save_projector(wide, "qwen2_vl", tmp_path / "wide.safetensors")
    with pytest.raises(ShapeMismatch, match=r"128-wide .* gives 64"):
        load_projector(model, "qwen2_vl", tmp_path / "wide.safetensors")
    spec_path = root / "swapped" / "mgll_swap.json"
    original = spec_path.read_text()
    spec = json.loads(original)
    spec["tower"]["num_image_tokens"] = 50
    try:
        spec_path.write_text(json.dumps(spec))
        with pytest.raises(ShapeMismatch, match=r"num_image_tokens=50 but the model config gives 16"):
            load_swapped(root / "swapped", with_processor=False)
    finally:
        spec_path.write_text(original)


def test_stage1_moves_only_the_merger_and_lowers_the_loss(built):
    root, *_ = built
    out = root / "stage1"
    align(AlignConfig(model=str(root / "swapped"), data=str(root / "data"), out=str(out), split=None, levels=LEVELS,
                      steps=20, batch_size=4, lr=3e-2), progress=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["host"] == "qwen2_vl" and summary["steps"] == 20
    assert summary["loss_last"] < summary["loss_first"] - 0.05, summary
    before, _ = load_swapped(root / "swapped", with_processor=False)
    after, _ = load_aligned(root / "swapped", out, with_processor=False)
    changed = []
    for (name, a), (_, b) in zip(before.state_dict().items(), after.state_dict().items()):
        if name.startswith("model.visual.merger."):
            changed.append(not torch.equal(a, b))
        else:
            assert torch.equal(a, b), f"{name} changed in stage 1"
    assert changed and all(changed)


def test_lora_targets_and_unquantised_modules_stay_off_the_tower(built):
    _, _, model, _ = built
    host = get_host("qwen2_vl")
    names = [n for n, _ in model.named_modules()]
    targets = [n for n in names if re.fullmatch(host.lora_target_modules(), n)]
    assert len(targets) == 2 * 7 and all(n.startswith("model.language_model.") for n in targets)
    assert any(n.startswith("model.visual.vit.") and n.endswith("q_proj") for n in names)
    assert all(p in names for p in host.unquantised_modules())
    assert host.unquantised_modules() == ["model.visual.vit", "model.visual.merger", "lm_head"]


def test_qlora_stage2_quantises_only_the_lm(built):
    bnb = pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from mgll.adapters.align import _load_model

    root, *_ = built
    cfg = AlignConfig(model=str(root / "swapped"), data=str(root / "data"), out=str(root / "qlora"), stage=2, qlora=True,
                      split=None, levels=LEVELS, steps=2, batch_size=2, lr=1e-2)
    model = _load_model(cfg, get_host("qwen2_vl"), torch.device("cpu"))
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert any(k is bnb.nn.Linear4bit for n, k in kinds.items() if n.startswith("model.language_model."))
    assert all(k is torch.nn.Linear for n, k in kinds.items() if n.startswith(("model.visual.", "lm_head")))
    align(cfg, progress=False)
    saved = load_file(str(root / "qlora" / "adapter" / "adapter_model.safetensors"))
    assert saved and all("language_model" in k and "lora_" in k for k in saved)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
