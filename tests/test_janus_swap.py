"""An MGLL tower on Janus' understanding path: runs, counts tokens, leaves image generation intact, aligns, reloads."""

import argparse
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, JanusForConditionalGeneration

from mgll.adapters.align import AlignConfig, align, load_aligned, record_caption
from mgll.adapters.cli import register
from mgll.adapters.hosts import ShapeMismatch, get_host, list_hosts
from mgll.adapters.hosts.janus import GENERATION_PATHS
from mgll.adapters.swap import load_projector, load_swapped, save_projector, swap_model
from mgll.adapters.tiny import make_tiny_janus
from mgll.data import make_synthetic
from mgll.encoder.factory import create_encoder, save_encoder

torch.set_num_threads(1)

LEVELS = ["status", "disease"]
MEAN, STD = (0.4, 0.4, 0.4), (0.2, 0.2, 0.2)
PROMPT = "<image_placeholder>describe the image"
GEN_PREFIXES = tuple(p + "." for p in GENERATION_PATHS)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("janus")
    ds = make_synthetic(root / "data", kind="fundus", n=16, size=64, seed=1)
    captions = [record_caption(ds.card, r.labels, LEVELS) for r in ds.records]
    make_tiny_janus(root / "janus", [*captions, "describe the image"], vision_width=32, image_size=32, patch_size=8)
    torch.manual_seed(0)
    enc, _, _, _, name = create_encoder("mgll-tiny-vit", image_mean=MEAN, image_std=STD)  # 64 px, patch 8, width 64
    save_encoder(enc, root / "enc", name)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["swap", "--host", "janus", "--mllm", str(root / "janus"), "--encoder", str(root / "enc"),
                              "--out", str(root / "swapped"), "--seed", "7"])
    assert args.func(args) == 0
    enc, *_ = create_encoder(str(root / "enc"))
    model, processor = load_swapped(root / "swapped")
    return root, enc.eval(), model.eval(), processor


def _images(n=2, size=(80, 96)):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)) for _ in range(n)]


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
        logits = model(**inputs).logits
        assert logits.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)
        gen = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert gen.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert processor.image_processor.image_mean == pytest.approx(MEAN)
    spec = json.loads((root / "swapped" / "mgll_swap.json").read_text())
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
    torch.manual_seed(7)
    swap_model("janus", fresh, enc)
    inputs = processor(text=[PROMPT] * 2, images=_images(), return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, loaded(**inputs).logits)


def test_zero_init_aligner_outputs_the_mean_embedding(built):
    root, enc, _, processor = built
    model = swap_model("janus", JanusForConditionalGeneration.from_pretrained(root / "janus").eval(), enc, projector_init="zero")
    pix = processor(text=[PROMPT], images=_images(1), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = model.model.get_image_features(pix).pooler_output[0]
        mean = model.get_input_embeddings().weight.mean(0)
    torch.testing.assert_close(feats, mean.expand_as(feats), atol=1e-6, rtol=0)


def test_grid_and_width_mismatch_name_both_sizes(built, tmp_path):
    root, _, model, _ = built
    stock = AutoProcessor.from_pretrained(root / "janus")  # 32 px for the SigLIP tower
    with pytest.raises(ShapeMismatch, match=r"32x32 px \(4x4 patches\) but the MGLL tower takes 64x64 px \(8x8 patches"):
        model(**stock(text=[PROMPT], images=_images(1), return_tensors="pt"))
    with pytest.raises(ShapeMismatch, match=r"expects 32-wide vision features but the tower gives 64"):
        swap_model("janus", JanusForConditionalGeneration.from_pretrained(root / "janus"), create_encoder("mgll-tiny-vit")[0],
                   projector_init="keep")
    wide = swap_model("janus", JanusForConditionalGeneration.from_pretrained(root / "janus"), create_encoder("mgll-small-vit")[0])
    save_projector(wide, "janus", tmp_path / "wide.safetensors")
    with pytest.raises(ShapeMismatch, match=r"128-wide .* gives 64"):
        load_projector(model, "janus", tmp_path / "wide.safetensors")
    spec_path = root / "swapped" / "mgll_swap.json"
    original = spec_path.read_text()
    spec = json.loads(original)
    spec["tower"]["num_image_tokens"] = 50
    try:
        spec_path.write_text(json.dumps(spec))
        with pytest.raises(ShapeMismatch, match=r"num_image_tokens=50 but the model config gives 64"):
            load_swapped(root / "swapped", with_processor=False)
    finally:
        spec_path.write_text(original)


def test_stage1_moves_only_the_aligner_and_lowers_the_loss(built):
    root, *_ = built
    out = root / "stage1"
    align(AlignConfig(model=str(root / "swapped"), data=str(root / "data"), out=str(out), split=None, levels=LEVELS,
                      steps=20, batch_size=4, lr=3e-2), progress=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["host"] == "janus" and summary["steps"] == 20
    # Janus hands the aligner LayerNorm-ed features, so the fresh aligner starts the LM near the caption floor:
    # compare with the first step rather than the first five
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["loss_last"] < summary["loss_first"] and summary["loss_last"] < losses[0] - 0.1, losses
    before, _ = load_swapped(root / "swapped", with_processor=False)
    after, _ = load_aligned(root / "swapped", out, with_processor=False)
    changed = []
    for (name, a), (_, b) in zip(before.state_dict().items(), after.state_dict().items()):
        if name.startswith("model.aligner."):
            changed.append(not torch.equal(a, b))
        else:
            assert torch.equal(a, b), f"{name} changed in stage 1"  # tower, LM and the generation path
    assert changed and all(changed)


def test_lora_targets_and_unquantised_modules(built):
    _, _, model, _ = built
    host = get_host("janus")
    names = [n for n, _ in model.named_modules()]
    targets = [n for n in names if re.fullmatch(host.lora_target_modules(), n)]
    assert len(targets) == 2 * 7 and all(n.startswith("model.language_model.") for n in targets)
    assert any(n.startswith("model.vision_model.vit.") and n.endswith("q_proj") for n in names)
    assert all(p in names for p in host.unquantised_modules())
    assert "model.generation_head" in host.unquantised_modules()


def test_qlora_stage2_quantises_only_the_lm(built):
    bnb = pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from mgll.adapters.align import _load_model

    root, *_ = built
    cfg = AlignConfig(model=str(root / "swapped"), data=str(root / "data"), out=str(root / "qlora"), stage=2, qlora=True,
                      split=None, levels=LEVELS, steps=2, batch_size=2, lr=1e-2)
    model = _load_model(cfg, get_host("janus"), torch.device("cpu"))
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert any(k is bnb.nn.Linear4bit for n, k in kinds.items() if n.startswith("model.language_model."))
    assert all(k is torch.nn.Linear for n, k in kinds.items() if not n.startswith("model.language_model."))
    align(cfg, progress=False)
    saved = load_file(str(root / "qlora" / "adapter" / "adapter_model.safetensors"))
    assert saved and all("language_model" in k and "lora_" in k for k in saved)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
