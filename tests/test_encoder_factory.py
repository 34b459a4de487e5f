"""Encoders come from open_clip by name, from local files and from saved runs; text trimming is exact."""

import copy
import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from mgll.encoder.factory import create_encoder, list_encoders, save_encoder
from mgll.encoder.text_encoding import encode_text_trimmed, encode_texts, supports_trimming, trimmed_length

TEXTS = [
    "a fundus photograph showing drusen",
    "abnormal",
    "severe diabetic retinopathy with many retinal haemorrhages, hard exudates and venous beading in all quadrants",
    "a fundus photograph of a normal eye",
]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, _, preprocess, tok, name = create_encoder("mgll-tiny-vit")
    return model.eval(), preprocess, tok


def test_tiny_config_is_registered_and_unknown_names_fail():
    assert "mgll-tiny-vit" in list_encoders()
    with pytest.raises(ValueError, match="unknown encoder 'ViT-Q-99'"):
        create_encoder("ViT-Q-99")
    with pytest.raises(FileNotFoundError, match="no open_clip_config.json"):
        create_encoder("/nonexistent/run")
    with pytest.raises(ValueError, match="neither an existing file nor a tag"):
        create_encoder("mgll-tiny-vit", pretrained="/nope/weights.safetensors")


@pytest.mark.parametrize("name", ["mgll-tiny-vit", "ViT-B-32"])
def test_trimmed_text_forward_equals_full_forward(name):
    torch.manual_seed(0)
    model, _, _, tok, _ = create_encoder(name)
    model.eval()
    tokens = tok(TEXTS)
    assert supports_trimming(model)
    assert trimmed_length(tokens) < 40  # most of the 77 positions are padding
    with torch.no_grad():
        full = model.encode_text(tokens)
        trimmed = encode_text_trimmed(model, tokens)
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=0)


def test_trimmed_gradients_equal_full_gradients(tiny):
    """In float64, so the comparison sees the maths and not float32 summation order."""
    model, _, tok = tiny
    model = copy.deepcopy(model).double()
    tokens = tok(TEXTS)
    grads = []
    for fn in (model.encode_text, lambda t: encode_text_trimmed(model, t)):
        model.zero_grad()
        fn(tokens).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-10, rtol=1e-8)


def test_encode_texts_is_normalised(tiny):
    model, _, tok = tiny
    feats = encode_texts(model, tok, TEXTS, "cpu")
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(len(TEXTS)))
    with pytest.raises(ValueError, match="at least one text"):
        encode_texts(model, tok, [], "cpu")


def test_saved_encoder_loads_in_plain_open_clip_and_from_a_checkpoint_file(tiny, tmp_path):
    model, _, tok = tiny
    out = save_encoder(model, tmp_path / "enc", "mgll-tiny-vit", extra={"loss": "mgll"})
    assert json.loads((out / "mgll_config.json").read_text())["loss"] == "mgll"
    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded.eval().encode_image(x), model.encode_image(x))
    assert preprocess.transforms[0].size in (64, (64, 64))
    # a local checkpoint file as `pretrained`, the path real users take for downloaded weights
    ckpt = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    again, _, _, _, _ = create_encoder("mgll-tiny-vit", pretrained=str(ckpt))
    torch.testing.assert_close(again.eval().encode_image(x), model.encode_image(x))
