"""Swapped folders load with transformers' Auto classes in a process that never imports mgll, and give load_swapped's logits.

The source MLLMs are the tiny random-init folders of `mgll.adapters.tiny` (stock transformers classes saved
with save_pretrained), swapped through `mgll swap` as a user would. Hosts whose stock class hard-codes its tower load through the
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

from mgll.mllm_eval.scoring import build_prompt, encode_prefix

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
import host_checks as hc  # noqa: E402

from mgll.adapters import tiny  # noqa: E402

BUILDERS = {"llava": tiny.make_tiny_llava, "llava_next": tiny.make_tiny_llava_next, "qwen2_vl": tiny.make_tiny_qwen2_vl,
            "internvl": tiny.make_tiny_internvl, "janus": tiny.make_tiny_janus, "instructblip": tiny.make_tiny_instructblip}


def build_stock(host: str, out: Path) -> Path:
    return BUILDERS[host](out, ["describe the image"])

STOCK_CLASS = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}
REMOTE = {"qwen2_vl", "internvl", "janus", "instructblip"}
HOSTS = sorted([*STOCK_CLASS, *REMOTE])


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
    if host in REMOTE:
        assert facts["model_class"] == type(model).__name__ and facts["model_module"].startswith("transformers_modules.")
        assert "trust_remote_code=True" in facts["without_flag"]  # refused, not a random stock tower
    else:
        assert facts["model_class"] == STOCK_CLASS[host] and facts["model_module"].startswith("transformers.models.")
    got = load_file(str(tmp_path / "out.safetensors"))
    torch.testing.assert_close(got["logits"], want_logits.float(), atol=1e-5, rtol=0)
    assert torch.equal(got["generated"], want_gen)
