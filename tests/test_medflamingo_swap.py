"""An MGLL tower bridged into an OpenFlamingo (Med-Flamingo) model: runs, generates, keeps the Perceiver, aligns, reloads."""

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("open_flamingo", reason="run scripts/install_open_flamingo.sh")

from mgll.adapters.align import load_aligned  # noqa: E402
from mgll.adapters.hosts import ShapeMismatch, get_host, list_hosts  # noqa: E402
from mgll.adapters.hosts.medflamingo.model import load_flamingo, make_bridge  # noqa: E402
from mgll.adapters.swap import swap_model  # noqa: E402
from mgll.encoder.factory import create_encoder  # noqa: E402
from mgll.testing.tiny import make_tiny_flamingo  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
import host_checks as hc  # noqa: E402

torch.set_num_threads(1)

PROMPT = "describe the image"
KEPT = ("perceiver.", "lang_encoder.")  # everything but the tower and the bridge


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("flamingo")
    captions = hc.synthetic_captions(root)
    make_tiny_flamingo(root / "flamingo", [*captions, PROMPT], vision_width=32, image_size=32, patch_size=8, num_latents=8)
    (root / "texts.json").write_text(json.dumps([*captions, PROMPT]))
    return hc.swap_with_cli(root, "medflamingo", root / "flamingo")  # MGLL: 64 px, patch 8, width 64


def _images(n=2, size=(80, 96)):
    return hc.random_images([size] * n)


def _inputs(processor, texts=(f"<image>{PROMPT}", "<image>status: normal.")):
    return processor(text=list(texts), images=_images(len(texts)))


def test_forward_generate_and_token_count(built):
    root, enc, model, processor = built
    host = get_host("medflamingo")
    assert "medflamingo" in list_hosts()
    inputs = _inputs(processor)
    assert inputs["pixel_values"].shape == (2, 1, 3, 64, 64)  # resized to the MGLL image size, one image per text
    assert processor.image_processor.image_mean == pytest.approx(hc.MEAN)
    assert (inputs["input_ids"] == model.media_token_id).sum(1).tolist() == [1, 1]
    with torch.no_grad():
        latents = model.image_features(inputs["pixel_values"])
        assert latents.shape == (2, 1, 8, 32)  # Perceiver latents per image x vis_dim, whatever the 8x8 MGLL grid
        assert host.num_image_tokens(model) == 8
        logits = model(**inputs).logits
        assert logits.shape == (*inputs["input_ids"].shape, model.lang_encoder.config.vocab_size)
        gen = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3)
    assert gen.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert torch.equal(gen[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    spec = hc.read_spec(root)
    assert spec["tower"]["hidden_size"] == 64 and spec["tower"]["vis_dim"] == 32 and spec["tower"]["num_image_tokens"] == 8
    assert spec["tower"]["bridge"] == "Linear(64, 32) + LayerNorm"


def test_generate_equals_greedy_steps_of_forward(built):
    """The KV-cached loop, the uncached loop and N argmax steps of a plain forward pick the same tokens."""
    _, _, model, processor = built
    inputs = _inputs(processor)  # left-padded: the two prompts differ in length
    assert inputs["attention_mask"][:, 0].tolist() != [1, 1]
    n = 6
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=n, eos_token_id=[-1])
        uncached = model.generate(**inputs, max_new_tokens=n, eos_token_id=[-1], use_cache=False)
        seq, mask = inputs["input_ids"], inputs["attention_mask"]
        for _ in range(n):
            logits = model(pixel_values=inputs["pixel_values"], input_ids=seq, attention_mask=mask,
                           position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
            logits[:, model.media_token_id] = float("-inf")
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        alone = model.generate(**_inputs(processor, [f"<image>{PROMPT}"]), max_new_tokens=n, eos_token_id=[-1])
    assert torch.equal(cached, seq) and torch.equal(uncached, seq)
    pad = int((inputs["attention_mask"][0] == 0).sum())
    assert torch.equal(cached[0, pad:], alone[0])  # left padding does not change a prompt's continuation
    with pytest.raises(ValueError, match="right-padded"):
        right = processor(text=[f"<image>{PROMPT}", "<image>status"], images=_images(2), padding_side="right")
        model.generate(**right, max_new_tokens=1)


def test_tower_is_the_mgll_vit_and_flamingo_parts_are_kept(built):
    root, enc, model, processor = built
    pix = _inputs(processor)["pixel_values"][:, 0]
    enc.visual.output_tokens = True
    try:
        with torch.no_grad():
            torch.testing.assert_close(model.vision_encoder(pix)[1], enc.visual(pix)[1], atol=1e-5, rtol=0)
    finally:
        enc.visual.output_tokens = False
    source, _ = load_flamingo(root / "flamingo")
    src, now = source.state_dict(), model.state_dict()
    kept = [k for k in src if k.startswith(KEPT)]
    assert any(".gated_cross_attn_layer." in k for k in kept) and any(k.startswith("perceiver.") for k in kept)
    assert all(torch.equal(src[k], now[k]) for k in kept)  # bridged: Perceiver, cross-attention, LM untouched
    assert source.lang_encoder.gated_cross_attn_layers[0].attn_gate.item() == pytest.approx(0.5)


def test_save_load_gives_identical_logits_and_both_source_formats_load(built, tmp_path):
    root, enc, loaded, processor = built
    fresh, _ = load_flamingo(root / "flamingo")
    hc.check_save_load_identical("medflamingo", fresh, loaded, enc, _inputs(processor))
    make_tiny_flamingo(tmp_path / "st", json.loads((root / "texts.json").read_text()), num_latents=8, weights="safetensors")
    a, _ = load_flamingo(root / "flamingo")
    b, _ = load_flamingo(tmp_path / "st")
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_bad_folders_and_mismatches_name_the_problem(built, tmp_path):
    root, enc, model, _ = built
    with pytest.raises(ShapeMismatch, match=r"32x32 px \(4x4 patches\) but the MGLL tower takes 64x64 px \(8x8 patches"):
        model(pixel_values=torch.zeros(1, 3, 32, 32), input_ids=torch.tensor([[model.media_token_id]]))
    wide = swap_model("medflamingo", load_flamingo(root / "flamingo")[0], create_encoder("mgll-small-vit")[0])  # width 128
    hc.check_wide_projector_rejected("medflamingo", model, wide, tmp_path)
    wide.bridge = make_bridge(128, 48)
    with pytest.raises(ShapeMismatch, match=r"Perceiver takes 32-wide features but the bridge gives 48"):
        get_host("medflamingo").check_fit(wide)
    with pytest.raises(ValueError, match=r"supports 'default' only"):
        swap_model("medflamingo", load_flamingo(root / "flamingo")[0], enc, projector_init="zero")
    with pytest.raises(TypeError, match="swap it first"):
        get_host("medflamingo").check_fit(load_flamingo(root / "flamingo")[0])
    hc.check_edited_folder_rejected(root, "mgll_swap.json", ["tower", "hidden_size"], 96,
                                 r"tower.hidden_size=96 but the model config gives 64")
    with pytest.raises(FileNotFoundError, match="flamingo_config.json: missing"):
        load_flamingo(tmp_path)
    state = torch.load(root / "flamingo" / "checkpoint.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if "perceiver.layers.0." not in k}, tmp_path / "partial.pt")
    cfg = json.loads((root / "flamingo" / "flamingo_config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "flamingo_config.json").write_text(json.dumps({**cfg, "lang_encoder": str(root / "flamingo" / "lm"),
                                                          "checkpoint": str(tmp_path / "partial.pt")}))
    with pytest.raises(ValueError, match=r"partial.pt: \d+ Flamingo weights missing, e.g. \['perceiver.layers.0."):
        load_flamingo(bad)


def test_stage1_moves_only_the_bridge_and_lowers_the_loss(built):
    root, *_ = built
    hc.check_stage1(root, "medflamingo", "bridge.")


def test_lora_targets_and_unquantised_modules(built):
    _, _, model, _ = built
    _, targets = hc.check_lora_targets(model, "medflamingo", r"lang_encoder\.model\.layers\.\d\.decoder_layer\.",
                                    "vision_encoder.vit.")
    assert not any("gated_cross_attn" in n for n in targets)


def test_qlora_stage2_quantises_only_the_lm(built):
    root, *_ = built
    keep = ("vision_encoder.", "bridge.", "perceiver.", "lang_encoder.gated_cross_attn_layers.", "lang_encoder.lm_head")
    saved = hc.check_qlora_stage2(root, "medflamingo", "lang_encoder.model.layers.", keep=keep,
                               adapter_key="lang_encoder")
    assert all("gated_cross_attn" not in k for k in saved)
    aligned, _ = load_aligned(root / "swapped", root / "qlora", with_processor=False)
    assert type(aligned).__name__ == "PeftModel"
    now = {k.replace(".default", ""): v for k, v in aligned.state_dict().items() if "lora_" in k}
    assert now.keys() == saved.keys() and all(torch.equal(now[k], v) for k, v in saved.items())  # each LoRA once, reloaded
