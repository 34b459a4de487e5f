"""An exported CLIPVisionModel reproduces open_clip's hidden states at every layer LLaVA can select."""

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch
from open_clip.transformer import VisionTransformer
from transformers import CLIPImageProcessor, CLIPVisionModel, CLIPVisionModelWithProjection

from mgll.adapters.cli import register
from mgll.adapters.clip_vision import clip_vision_config, to_hf_clip_vision
from mgll.encoder.factory import create_encoder, save_encoder

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from open_clip_tower import OpenClipVisionTower  # noqa: E402  (open_clip's own layer outputs: the reference)


def _parse(argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def _assert_every_layer_equal(hf, model, x):
    tower = OpenClipVisionTower(model, select_feature="cls_patch")
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
        assert len(out.hidden_states) == tower.num_layers + 1
        for j in range(-len(out.hidden_states), 0):  # -2 is LLaVA's choice; check all of them
            ref = tower.hidden_state(x, j)
            assert (out.hidden_states[j] - ref).abs().max().item() <= 1e-5, f"hidden_states[{j}]"
    return out


def test_cli_export_of_a_run_loads_as_clip_vision_model(tmp_path):
    torch.manual_seed(0)
    mean, std = (0.3, 0.3, 0.3), (0.2, 0.2, 0.2)
    model, _, _, _, name = create_encoder("mgll-tiny-vit", image_mean=mean, image_std=std)
    run = tmp_path / "run"
    save_encoder(model, run / "encoder", name)
    args = _parse(["export-hf", str(run), str(tmp_path / "hf")])
    assert args.func(args) == 0
    model, *_ = create_encoder(str(run))  # what was saved, not what is in memory
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    plain = CLIPVisionModel.from_pretrained(tmp_path / "hf").eval()
    with_proj = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "hf").eval()
    assert plain.config.hidden_act == "gelu" and plain.config.image_size == 64 and plain.config.patch_size == 8
    _assert_every_layer_equal(plain, model, x)
    out = _assert_every_layer_equal(with_proj, model, x)
    with torch.no_grad():
        torch.testing.assert_close(out.image_embeds, model.encode_image(x), atol=1e-5, rtol=0)
    proc = CLIPImageProcessor.from_pretrained(tmp_path / "hf")
    assert proc.image_mean == pytest.approx(mean) and proc.image_std == pytest.approx(std)
    assert proc.crop_size["height"] == 64
    spec = json.loads((tmp_path / "hf" / "mgll_export.json").read_text())
    assert spec["class"] == "CLIPVisionModelWithProjection"


def test_vit_b_32_shape_with_quick_gelu_matches_open_clip():
    torch.manual_seed(0)
    model, *_ = create_encoder("ViT-B-32-quickgelu")
    model.eval()
    hf = to_hf_clip_vision(model)
    assert hf.config.hidden_act == "quick_gelu"
    assert (hf.config.hidden_size, hf.config.num_hidden_layers, hf.config.num_attention_heads) == (768, 12, 12)
    x = torch.randn(1, 3, 224, 224)
    out = _assert_every_layer_equal(hf, model, x)
    with torch.no_grad():
        torch.testing.assert_close(out.image_embeds, model.encode_image(x), atol=1e-5, rtol=0)


def test_architectures_without_a_clip_equivalent_are_refused():
    scaled = VisionTransformer(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_ratio=2, ls_init_value=0.1, output_dim=16)
    with pytest.raises(ValueError, match="layer scale"):
        clip_vision_config(scaled)
    no_ln_pre = VisionTransformer(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_ratio=2, no_ln_pre=True, output_dim=16)
    with pytest.raises(ValueError, match="no ln_pre"):
        clip_vision_config(no_ln_pre)
