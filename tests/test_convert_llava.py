"""``mgll convert-llava``: an original-format LLaVA checkpoint becomes a transformers LLaVA with the same logits."""

import argparse
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoProcessor, CLIPImageProcessor, LlavaForConditionalGeneration

from mgll.adapters.cli import register
from mgll.adapters.convert_llava import LlavaConversionError, convert_llava, rename_key
from mgll.testing.tiny import make_tiny_llava

torch.set_num_threads(1)

WORDS = ["status: abnormal. disease: drusen, cataract, glaucoma. status: normal. describe the image"]
ORIGINAL = {  # transformers prefix -> original LLaVA prefix
    "model.language_model.": "model.",
    "model.multi_modal_projector.linear_1.": "model.mm_projector.0.",
    "model.multi_modal_projector.linear_2.": "model.mm_projector.2.",
}


def _to_original(key):
    for new, old in ORIGINAL.items():
        if key.startswith(new):
            return old + key[len(new):]
    return key


def _write_original(hf, src, fmt, tower_name="openai/clip-vit-large-patch14-336"):
    """The tiny HF LLaVA as haotian-liu/LLaVA would have released it: flat Llama config + mm_* fields, no tower."""
    src.mkdir(parents=True)
    tc = hf.config.text_config.to_dict()
    cfg = {k: tc[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                              "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                              "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")}
    cfg.update({"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "rope_theta": 10000.0,
                "mm_hidden_size": hf.config.vision_config.hidden_size, "mm_projector_type": "mlp2x_gelu",
                "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_vision_tower": tower_name,
                "image_aspect_ratio": "pad", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
                "tune_mm_mlp_adapter": False, "torch_dtype": "float32"})
    (src / "config.json").write_text(json.dumps(cfg))
    state = {_to_original(k): v.clone() for k, v in hf.state_dict().items() if not k.startswith("model.vision_tower.")}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # old checkpoints carry it
    keys = sorted(state)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin" if fmt == "bin" else f"model-0000{i + 1}-of-00002.safetensors"
        shard = {k: state[k] for k in part}
        torch.save(shard, src / name) if fmt == "bin" else save_file(shard, str(src / name))
        weight_map.update({k: name for k in part})
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (src / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return src / index


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    make_tiny_llava(root / "hf", WORDS, vision_width=32, image_size=32, patch_size=8)
    hf = LlavaForConditionalGeneration.from_pretrained(root / "hf").eval()
    hf.model.vision_tower.save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    return root, hf


def _inputs(hf):
    torch.manual_seed(0)
    ids = torch.tensor([[1] + [hf.config.image_token_id] * 16 + [5, 6, 7, 8]] * 2)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(2, 3, 32, 32)}


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_converted_model_gives_the_original_logits(tiny, fmt):
    root, hf = tiny
    src = root / f"orig-{fmt}"
    _write_original(hf, src, fmt)
    shutil.copy(root / "hf" / "tokenizer.json", src)
    shutil.copy(root / "hf" / "tokenizer_config.json", src)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    out = root / f"conv-{fmt}"
    args = parser.parse_args(["convert-llava", str(src), str(out), "--vision-tower", str(root / "clip")])
    assert args.func(args) == 0
    conv = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert conv.config.vision_feature_layer == -2 and conv.config.image_seq_length == 16
    assert conv.config.image_token_id == hf.config.image_token_id  # <image> already in this tokenizer
    with torch.no_grad():
        assert torch.equal(conv(**_inputs(hf)).logits, hf(**_inputs(hf)).logits)
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == "LlavaProcessor" and processor.image_processor.do_pad
    from PIL import Image

    x = processor(text=["<image>describe the image"], images=[Image.new("RGB", (40, 30))], return_tensors="pt")
    assert int((x["input_ids"] == conv.config.image_token_id).sum()) == 16
    report = json.loads((out / "mgll_convert.json").read_text())
    assert report["added_rows"] == 0 and report["processor"] == "written"


def test_without_tokenizer_the_image_token_is_a_new_row(tiny):
    root, hf = tiny
    src = root / "orig-notok"
    _write_original(hf, src, "safetensors", tower_name=str(root / "clip"))  # mm_vision_tower loads as given
    report = convert_llava(src, root / "conv-notok")
    conv = LlavaForConditionalGeneration.from_pretrained(root / "conv-notok").eval()
    v = hf.config.text_config.vocab_size
    assert report["image_token_index"] == v and conv.config.text_config.vocab_size == v + 1
    assert report["processor"].startswith("not written: no tokenizer")
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(conv(input_ids=ids).logits[..., :v], hf(input_ids=ids).logits)
    emb = conv.get_input_embeddings().weight
    torch.testing.assert_close(emb[v], emb[:v].mean(0))


def test_missing_and_ill_formed_keys_name_the_file_and_key(tiny, tmp_path):
    root, hf = tiny
    src = tmp_path / "bad"
    index = _write_original(hf, src, "bin")
    weight_map = json.loads(index.read_text())["weight_map"]
    shard = src / weight_map["model.norm.weight"]
    state = torch.load(shard, weights_only=True)
    del state["model.norm.weight"]
    torch.save(state, shard)
    with pytest.raises(LlavaConversionError, match=r"the weights lack 'model.norm.weight'"):
        convert_llava(src, tmp_path / "out", vision_tower=root / "clip")
    state["model.norm.weight"] = torch.ones(64)
    state["model.mm_projector.0.weight"] = torch.zeros(64, 48)
    torch.save(state, shard)
    proj = src / weight_map["model.mm_projector.0.weight"]
    if proj != shard:
        st = torch.load(proj, weights_only=True)
        st["model.mm_projector.0.weight"] = torch.zeros(64, 48)
        torch.save(st, proj)
    with pytest.raises(LlavaConversionError, match=r"pytorch_model-0000\d-of-00002.bin: key 'model.mm_projector.0.weight' "
                                                   r"has shape \(64, 48\) but config.json implies \(64, 32\)"):
        convert_llava(src, tmp_path / "out", vision_tower=root / "clip")
    state["model.mm_projector.0.weight"] = torch.zeros(64, 32)
    state["model.foo.weight"] = torch.zeros(2)
    torch.save(state, shard)
    with pytest.raises(LlavaConversionError, match=r"\.bin: unexpected key 'model.foo.weight'"):
        convert_llava(src, tmp_path / "out", vision_tower=root / "clip")
    assert not (tmp_path / "out").exists()  # nothing half-written
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "mm_projector_type": "linear"}))
    with pytest.raises(LlavaConversionError, match=r"config.json: mm_projector_type='linear'"):
        convert_llava(src, tmp_path / "out", vision_tower=root / "clip")
    del cfg["mm_hidden_size"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LlavaConversionError, match=r"config.json: field 'mm_hidden_size' missing"):
        convert_llava(src, tmp_path / "out", vision_tower=root / "clip")
    (src / "config.json").write_text(json.dumps({**cfg, "mm_hidden_size": 32}))
    with pytest.raises(LlavaConversionError, match=r"mm_vision_tower='openai/clip-vit-large-patch14-336': cannot load"):
        convert_llava(src, tmp_path / "out")  # offline, no --vision-tower


def test_rename_key_covers_the_original_names():
    assert rename_key("model.layers.3.mlp.up_proj.weight") == "model.language_model.layers.3.mlp.up_proj.weight"
    assert rename_key("model.mm_projector.2.bias") == "model.multi_modal_projector.linear_2.bias"
    assert rename_key("model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight") == \
        "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert rename_key("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    with pytest.raises(KeyError):
        rename_key("model.mm_projector.1.weight")
