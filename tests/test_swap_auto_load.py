"""Swapped folders load with transformers' Auto classes in a process that never imports mgll, and give load_swapped's logits.

The source MLLMs are the tiny random-init folders of `tests/helpers/stock_models.py` (stock transformers classes,
processors and image processors with the released checkpoints' special tokens and chat templates, saved with
save_pretrained; nothing from mgll), swapped through `mgll swap` as a user would. Hosts whose stock class hard-codes its tower load through the
folder's remote code (`trust_remote_code=True`); without the flag the load must fail, never build a random tower.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from mgll.mllm_eval.scoring import build_prompt, encode_prefix

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
import host_checks as hc  # noqa: E402
from stock_models import TEMPLATES, build_stock  # noqa: E402

STOCK_CLASS = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}
REMOTE = {"qwen2_vl", "internvl", "janus", "instructblip"}
HOSTS = sorted([*STOCK_CLASS, *REMOTE])


SOURCE_CLASS = {**STOCK_CLASS, "qwen2_vl": "Qwen2VLForConditionalGeneration", "internvl": "InternVLForConditionalGeneration",
                "janus": "JanusForConditionalGeneration", "instructblip": "InstructBlipForConditionalGeneration"}
# config field -> the special token it must name (its own id: never BOS, EOS, pad or unk)
TOKEN_FIELDS = {
    "llava": {"image_token_id": "<image>"},
    "llava_next": {"image_token_id": "<image>"},
    "qwen2_vl": {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                 "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"},
    "internvl": {"image_token_id": "<IMG_CONTEXT>"},
    "janus": {"image_token_id": "<image_placeholder>"},
    "instructblip": {"image_token_index": "<image>"},
}
PLACEHOLDER = {"llava": "<image>\n", "llava_next": "[INST] <image>\n", "internvl": "<IMG_CONTEXT>",
               "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>", "janus": "<|User|>: <image_placeholder>"}
WRAPS = {"qwen2_vl": ("<|vision_start|>", "<|vision_end|>"), "internvl": ("<img>", "</img>"),
         "janus": ("<begin_of_image>", "<end_of_image>")}  # the processor's image run sits between these
FIRST = {"llava": "<s>", "llava_next": "<s>", "janus": "<｜begin▁of▁sentence｜>", "qwen2_vl": "<|im_start|>",
         "internvl": "<|im_start|>", "instructblip": "<image>"}  # BOS where the LM family adds one; InstructBLIP's queries lead


@pytest.mark.parametrize("host", HOSTS)
def test_stock_builders_load_and_generate(host, tmp_path):
    """Each stock builder's folder loads with the Auto classes, templates an image prompt and generates."""
    folder = build_stock(host, tmp_path / host)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    assert type(model).__name__ == SOURCE_CLASS[host]
    tok = processor.tokenizer
    roles = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id} - {None}
    ids = {}
    for field, token in TOKEN_FIELDS[host].items():
        ids[token] = getattr(model.config, field)
        assert tok.encode(token, add_special_tokens=False) == [ids[token]], (field, token)
        assert ids[token] not in roles and token in tok.all_special_tokens + list(tok.added_tokens_encoder), (field, token)
    assert len(set(ids.values())) == len(ids)

    if TEMPLATES[host] is None:  # InstructBLIP's release has no chat template; the processor prepends the queries
        assert processor.chat_template is None
        prompt = "what disease?"
    else:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what disease?"}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        assert PLACEHOLDER[host] in prompt and prompt.rstrip().endswith(("ASSISTANT:", "[/INST]", "assistant", "<|Assistant|>:"))
    image = hc.random_images([(40, 50)])[0]  # 50 x 40 px
    inputs = processor(text=prompt, images=image, return_tensors="pt")
    row = inputs["input_ids"][0].tolist()
    image_id = ids[next(iter(TOKEN_FIELDS[host].values()))]
    at = [i for i, t in enumerate(row) if t == image_id]
    assert at and at == list(range(at[0], at[-1] + 1))  # one run of image tokens (InternVL: all tiles in one run)
    assert tok.convert_ids_to_tokens(row[0]) == FIRST[host]
    if host in WRAPS:
        before, after = (tok.convert_tokens_to_ids(t) for t in WRAPS[host])
        assert row[at[0] - 1] == before and row[at[-1] + 1] == after
    with torch.no_grad():
        assert model(**inputs).logits.shape == (1, len(row), model.config.get_text_config().vocab_size)
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert len(row) < gen.shape[1] <= len(row) + 3 and gen[0, : len(row)].tolist() == row


@pytest.mark.parametrize("host", HOSTS)
def test_auto_classes_load_the_swapped_folder(host, tmp_path):
    build_stock(host, tmp_path / "src")
    root, _, model, processor = hc.swap_with_cli(tmp_path, host, tmp_path / "src")
    folder = root / "swapped"
    config = json.loads((folder / "config.json").read_text())
    if host in REMOTE:
        assert config["model_type"] == f"mgll_{host}"
        assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForImageTextToText"}
        assert (folder / f"mgll_{host}.py").is_file() and (folder / "mgll_clip_tower.py").is_file()
        for name in (f"mgll_{host}.py", "mgll_clip_tower.py"):  # self-contained: nothing from mgll
            assert "mgll." not in (folder / name).read_text().replace("mgll.adapters.remote", "")
    else:
        assert "auto_map" not in config and config["architectures"] == [STOCK_CLASS[host]]

    image = hc.random_images([(64, 64)])[0]
    prompt = build_prompt(host, processor, "describe the image")
    inputs = {k: v.contiguous() for k, v in encode_prefix(processor, prompt, image, "cpu", torch.float32).items()}
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    with torch.no_grad():
        want_logits = model(**inputs).logits
        want_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)

    run = subprocess.run(
        [sys.executable, str(HELPERS / "auto_load.py"), str(folder), str(tmp_path / "inputs.safetensors"),
         str(tmp_path / "out.safetensors"), "1" if host in REMOTE else "0"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    facts = json.loads((tmp_path / "out.safetensors.json").read_text())
    assert facts["mgll_imported"] is False
    assert facts["processor_class"] == type(processor).__name__
    # the image processor (the encoder's view) is the folder's own code: loaded with the flag, refused without it
    assert facts["image_processor_class"].startswith("Mgll") and facts["image_processor_module"].startswith("transformers_modules.")
    assert "trust_remote_code=True" in facts["processor_without_flag"], facts["processor_without_flag"]
    if host in REMOTE:
        assert facts["model_class"] == type(model).__name__ and facts["model_module"].startswith("transformers_modules.")
        assert "trust_remote_code=True" in facts["without_flag"]  # refused, not a random stock tower
    else:
        assert facts["model_class"] == STOCK_CLASS[host] and facts["model_module"].startswith("transformers.models.")
    got = load_file(str(tmp_path / "out.safetensors"))
    torch.testing.assert_close(got["logits"], want_logits.float(), atol=1e-5, rtol=0)
    assert torch.equal(got["generated"], want_gen)
