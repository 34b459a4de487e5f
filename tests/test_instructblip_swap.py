"""An MGLL tower bridged into InstructBLIP's pretrained Q-Former: runs, keeps the Q-Former, aligns, reloads."""

import argparse
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, InstructBlipForConditionalGeneration

from mgll.adapters.align import AlignConfig, align, load_aligned, record_caption
from mgll.adapters.cli import register
from mgll.adapters.hosts import ShapeMismatch, get_host, list_hosts
from mgll.adapters.swap import load_projector, load_swapped, save_projector, swap_model
from mgll.adapters.tiny import make_tiny_instructblip
from mgll.adapters.vision_tower import OpenClipVisionTower
from mgll.data import make_synthetic
from mgll.encoder.factory import create_encoder, save_encoder

torch.set_num_threads(1)

LEVELS = ["status", "disease"]
MEAN, STD = (0.4, 0.4, 0.4), (0.2, 0.2, 0.2)
PROMPT = "describe the image"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("blip")
    ds = make_synthetic(root / "data", kind="fundus", n=16, size=64, seed=1)
    captions = [record_caption(ds.card, r.labels, LEVELS) for r in ds.records]
    make_tiny_instructblip(root / "blip", [*captions, PROMPT], vision_width=32, image_size=32, patch_size=8)
    torch.manual_seed(0)
    enc, _, _, _, name = create_encoder("mgll-tiny-vit", image_mean=MEAN, image_std=STD)  # 64 px, patch 8, width 64
    save_encoder(enc, root / "enc", name)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["swap", "--host", "instructblip", "--mllm", str(root / "blip"), "--encoder", str(root / "enc"),
                              "--out", str(root / "swapped"), "--seed", "7"])
    assert args.func(args) == 0
    enc, *_ = create_encoder(str(root / "enc"))
    model, processor = load_swapped(root / "swapped")
    return root, enc.eval(), model.eval(), processor


def _inputs(processor, n=2):
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)) for _ in range(n)]
    return processor(text=[PROMPT] * n, images=imgs, return_tensors="pt")


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
    assert processor.image_processor.image_mean == pytest.approx(MEAN)
    spec = json.loads((root / "swapped" / "mgll_swap.json").read_text())
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
    torch.manual_seed(7)
    swap_model("instructblip", fresh, enc)
    inputs = _inputs(processor)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, loaded(**inputs).logits)


def test_grid_and_width_mismatch_name_both_sizes(built, tmp_path):
    root, _, model, _ = built
    stock = AutoProcessor.from_pretrained(root / "blip")  # resizes to the stock tower's 32 px
    with pytest.raises(ShapeMismatch, match=r"32x32 px \(4x4 patches\) but the MGLL tower takes 64x64 px \(8x8 patches"):
        model(**_inputs(stock, 1))
    wide = swap_model("instructblip", InstructBlipForConditionalGeneration.from_pretrained(root / "blip"),
                      create_encoder("mgll-small-vit")[0])  # width 128
    save_projector(wide, "instructblip", tmp_path / "wide.safetensors")
    with pytest.raises(ShapeMismatch, match=r"128-wide .* gives 64"):
        load_projector(model, "instructblip", tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match=r"supports 'default' only"):
        swap_model("instructblip", InstructBlipForConditionalGeneration.from_pretrained(root / "blip"),
                   create_encoder("mgll-tiny-vit")[0], projector_init="zero")
    spec_path = root / "swapped" / "mgll_swap.json"
    original = spec_path.read_text()
    spec = json.loads(original)
    spec["tower"]["hidden_size"] = 96
    try:
        spec_path.write_text(json.dumps(spec))
        with pytest.raises(ShapeMismatch, match=r"tower.hidden_size=96 but the model config gives 64"):
            load_swapped(root / "swapped", with_processor=False)
    finally:
        spec_path.write_text(original)


def test_stage1_moves_only_the_bridge_and_projection_and_lowers_the_loss(built):
    root, *_ = built
    out = root / "stage1"
    align(AlignConfig(model=str(root / "swapped"), data=str(root / "data"), out=str(out), split=None, levels=LEVELS,
                      steps=20, batch_size=4, lr=3e-2), progress=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["host"] == "instructblip" and summary["steps"] == 20
    assert summary["loss_last"] < summary["loss_first"] - 0.05, summary
    before, _ = load_swapped(root / "swapped", with_processor=False)
    after, _ = load_aligned(root / "swapped", out, with_processor=False)
    changed = []
    for (name, a), (_, b) in zip(before.state_dict().items(), after.state_dict().items()):
        if name.startswith(("vision_model.bridge.", "language_projection.")):
            changed.append(not torch.equal(a, b))
        else:
            assert torch.equal(a, b), f"{name} changed in stage 1"
    assert changed and all(changed)


def test_lora_targets_and_unquantised_modules(built):
    _, _, model, _ = built
    host = get_host("instructblip")
    names = [n for n, _ in model.named_modules()]
    targets = [n for n in names if re.fullmatch(host.lora_target_modules(), n)]
    assert len(targets) == 2 * 7 and all(n.startswith("language_model.model.layers.") for n in targets)
    assert any(n.startswith("vision_model.vit.") and n.endswith("q_proj") for n in names)
    assert all(p in names for p in host.unquantised_modules())
    assert "qformer" in host.unquantised_modules()


def test_qlora_stage2_quantises_only_the_lm(built):
    bnb = pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from mgll.adapters.align import _load_model

    root, *_ = built
    cfg = AlignConfig(model=str(root / "swapped"), data=str(root / "data"), out=str(root / "qlora"), stage=2, qlora=True,
                      split=None, levels=LEVELS, steps=2, batch_size=2, lr=1e-2)
    model = _load_model(cfg, get_host("instructblip"), torch.device("cpu"))
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert any(k is bnb.nn.Linear4bit for n, k in kinds.items() if n.startswith("language_model.model."))
    keep = ("vision_model.", "qformer.", "language_projection", "language_model.lm_head")
    assert all(k is torch.nn.Linear for n, k in kinds.items() if n.startswith(keep))
    align(cfg, progress=False)
    saved = load_file(str(root / "qlora" / "adapter" / "adapter_model.safetensors"))
    assert saved and all("language_model" in k and "lora_" in k for k in saved)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
