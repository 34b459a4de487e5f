"""The open_clip tower adapter returns the layer LLaVA selects, with the encoder's own preprocessing."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mgll.encoder.factory import create_encoder

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from open_clip_tower import OpenClipVisionTower  # noqa: E402  (open_clip's own layer outputs: the reference)

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def enc():
    torch.manual_seed(0)
    model, _, preprocess, _, _ = create_encoder("mgll-tiny-vit", image_mean=MEAN, image_std=STD)
    return model.eval(), preprocess


def test_shape_facts_and_output_shapes(enc):
    model, _ = enc
    tower = OpenClipVisionTower(model)
    assert (tower.hidden_size, tower.image_size, tower.patch_size, tower.grid, tower.num_prefix_tokens) == (64, 64, 8, 8, 1)
    assert tower.select_layer == -2 and tower.select_feature == "patch"
    x = torch.randn(2, 3, 64, 64)
    assert tower(x).shape == (2, 64, 64) and tower.num_tokens == 64
    tower.select_feature = "cls_patch"
    assert tower(x).shape == (2, 65, 64) and tower.num_tokens == 65


def test_select_layer_indexes_hidden_states_like_transformers(enc):
    model, _ = enc
    v = model.visual
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h0 = v._embeds(x)
        h1 = v.transformer.resblocks[0](h0)
        h2 = v.transformer.resblocks[1](h1)
        tower = OpenClipVisionTower(model, select_feature="cls_patch")
        got = {k: OpenClipVisionTower(model, select_layer=k, select_feature="cls_patch")(x) for k in (0, 1, 2, -1, -2, -3)}
        # -1 is the last block before ln_post: pooling it gives open_clip's image embedding
        pooled = v.ln_post(got[-1][:, 0]) @ v.proj
        torch.testing.assert_close(pooled, model.encode_image(x), atol=1e-5, rtol=0)
        assert torch.equal(tower(x), got[-2])
    for k, ref in ((0, h0), (1, h1), (2, h2), (-3, h0), (-2, h1), (-1, h2)):
        torch.testing.assert_close(got[k], ref, atol=1e-5, rtol=0)
    patch = OpenClipVisionTower(model, select_layer=-2)(x)
    torch.testing.assert_close(patch, h1[:, 1:], atol=1e-5, rtol=0)


def test_bad_arguments_fail_clearly(enc):
    model, _ = enc
    with pytest.raises(ValueError, match=r"select_layer=3 out of range for a 2-block ViT"):
        OpenClipVisionTower(model, select_layer=3)
    with pytest.raises(ValueError, match="select_feature='cls'"):
        OpenClipVisionTower(model, select_feature="cls")
    with pytest.raises(TypeError, match="open_clip VisionTransformer"):
        OpenClipVisionTower(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\)"):
        OpenClipVisionTower(model)(torch.randn(3, 64, 64))


def test_freeze_and_unfreeze(enc):
    model, _ = enc
    tower = OpenClipVisionTower(model).freeze()
    assert tower.is_frozen
    out = tower(torch.randn(1, 3, 64, 64))
    assert not out.requires_grad
    tower.unfreeze()
    assert not tower.is_frozen
    tower(torch.randn(1, 3, 64, 64)).sum().backward()
    assert model.visual.conv1.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_image_processor_uses_the_encoders_normalisation(enc):
    model, preprocess = enc
    tower = OpenClipVisionTower(model)
    proc = tower.image_processor
    np.testing.assert_allclose(proc.image_mean, MEAN)
    np.testing.assert_allclose(proc.image_std, STD)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    ours = proc(img, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(ours, preprocess(img), atol=1e-5, rtol=0)


def test_from_encoder_builds_from_a_name():
    tower = OpenClipVisionTower.from_encoder("mgll-tiny-vit", select_layer=-1, select_feature="cls_patch")
    assert tower.name == "mgll-tiny-vit" and tower(torch.randn(1, 3, 64, 64)).shape == (1, 65, 64)
