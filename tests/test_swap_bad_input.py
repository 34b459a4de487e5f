"""`mgll swap` on the wrong input: one line naming the file and what was expected, exit code 2, nothing deleted.

Each case was found trying the swap as a user would: a wrong --host used to write a fully random model and
exit 0, an existing --out folder was deleted, a missing path became a hub lookup and a traceback.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mgll.cli import main
from mgll.encoder.factory import create_encoder, save_encoder
from mgll.testing import tiny

TEXTS = ["describe the image"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    enc, _, _, _, name = create_encoder("mgll-tiny-vit")
    save_encoder(enc, root / "enc", name)
    tiny.make_tiny_llava(root / "llava", TEXTS)
    tiny.make_tiny_llava_next(root / "llava_next", TEXTS)
    tiny.make_tiny_qwen2_vl(root / "qwen2_vl", TEXTS)
    return root


def run_swap(capsys, sources, host, mllm, out, *extra):
    code = main(["swap", "--host", host, "--mllm", str(mllm), "--encoder", str(sources / "enc"), "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    return code, err


def one_error_line(err: str) -> str:
    """The one error line (progress bars of a model load may precede it), and no traceback."""
    lines = [ln for ln in err.splitlines() if ln.startswith("mgll swap: error: ")]
    assert len(lines) == 1 and err.endswith(lines[0]), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(("host", "source", "other"), [
    ("qwen2_vl", "llava", "llava"),  # used to write a fully random Qwen2-VL and exit 0
    ("llava", "llava_next", "llava_next"),  # used to drop anyres and image_newline silently
    ("llava", "qwen2_vl", "qwen2_vl"),  # used to be an AttributeError traceback
])
def test_a_host_that_does_not_match_the_checkpoint_is_refused(capsys, sources, tmp_path, host, source, other):
    code, err = run_swap(capsys, sources, host, sources / source, tmp_path / "out")
    line = one_error_line(err)
    assert code == 2
    assert f"{sources / source / 'config.json'}: model_type {other!r} does not match --host {host}" in line
    assert f"(use --host {other})" in line
    assert not (tmp_path / "out").exists()


def test_an_existing_out_folder_is_kept_unless_overwrite(capsys, sources, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("a user's file")
    code, err = run_swap(capsys, sources, "llava", sources / "llava", out)
    assert code == 2 and f"--out {out}: already exists and is not empty; pass --overwrite" in one_error_line(err)
    assert (out / "notes.txt").read_text() == "a user's file" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    code, _ = run_swap(capsys, sources, "llava", sources / "llava", out, "--overwrite")
    assert code == 0
    assert not (out / "notes.txt").exists() and (out / "mgll_swap.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or moved-aside folder left behind


def test_an_empty_out_folder_is_used(capsys, sources, tmp_path):
    (tmp_path / "out").mkdir()
    code, _ = run_swap(capsys, sources, "llava", sources / "llava", tmp_path / "out")
    assert code == 0 and (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize("mllm", ["does/not/exist/here", "./missing-llava", "/nonexistent/llava"])
def test_a_missing_path_is_a_clear_error_not_a_hub_lookup(capsys, sources, tmp_path, mllm):
    code, err = run_swap(capsys, sources, "llava", mllm, tmp_path / "out")
    assert code == 2 and one_error_line(err).endswith(f"--mllm {mllm}: no such folder")


def test_a_hub_id_that_cannot_be_fetched_is_one_line(capsys, sources, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = run_swap(capsys, sources, "llava", "nobody-here/no-such-model", tmp_path / "out")
    assert code == 2 and "--mllm nobody-here/no-such-model: not a local folder and the hub lookup failed" in one_error_line(err)


def test_a_folder_without_config_is_named(capsys, sources, tmp_path):
    (tmp_path / "empty").mkdir()
    code, err = run_swap(capsys, sources, "llava", tmp_path / "empty", tmp_path / "out")
    assert code == 2 and f"--mllm {tmp_path / 'empty'}: no config.json in this folder" in one_error_line(err)


def test_an_already_swapped_remote_code_folder_points_to_its_source(capsys, sources, tmp_path):
    code, _ = run_swap(capsys, sources, "qwen2_vl", sources / "qwen2_vl", tmp_path / "swapped")
    assert code == 0
    assert json.loads((tmp_path / "swapped" / "config.json").read_text())["model_type"] == "mgll_qwen2_vl"
    code, err = run_swap(capsys, sources, "qwen2_vl", tmp_path / "swapped", tmp_path / "again")
    assert code == 2 and "model_type 'mgll_qwen2_vl' is a folder `mgll swap` already wrote" in one_error_line(err)


@pytest.mark.parametrize(("model_type", "arch"), [("llava", "LlavaLlamaForCausalLM"), ("llava_mistral", "LlavaMistralForCausalLM")])
def test_original_format_llava_is_sent_to_convert_llava(capsys, sources, tmp_path, model_type, arch):
    """LLaVA-1.5 (haotian-liu) and LLaVA-Med (microsoft) as released: original format, convert first."""
    src = tmp_path / "orig"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": [arch]}))
    code, err = run_swap(capsys, sources, "llava", src, tmp_path / "out")
    assert code == 2 and "run `mgll convert-llava` first" in one_error_line(err)


def test_a_projector_of_another_host_is_refused_by_name(capsys, sources, tmp_path):
    proj = tmp_path / "qwen_projector.safetensors"
    save_file({"ln_q.weight": torch.ones(64)}, str(proj), metadata={"host": "qwen2_vl", "in_features": "64"})
    code, err = run_swap(capsys, sources, "llava", sources / "llava", tmp_path / "out", "--projector", str(proj))
    line = one_error_line(err)
    assert code == 2 and f"host mismatch: {proj} is a projector trained for host 'qwen2_vl' but this model is host 'llava'" in line
    assert not (tmp_path / "out").exists()


def test_a_projector_with_other_keys_is_named_not_a_state_dict_error(capsys, sources, tmp_path):
    proj = tmp_path / "odd.safetensors"
    save_file({"weird.weight": torch.ones(2)}, str(proj))  # no metadata: an older or foreign file
    code, err = run_swap(capsys, sources, "llava", sources / "llava", tmp_path / "out", "--projector", str(proj))
    line = one_error_line(err)
    assert code == 2 and f"{proj}: not a llava projector for this model (missing linear_1.bias" in line
    assert "unexpected weird.weight" in line


def test_the_cli_stays_free_of_model_imports():
    """`mgll swap --help` must stay instant: the new checks import transformers only when they run."""
    import subprocess

    code = "import sys, mgll.cli, mgll.adapters.source_check; sys.exit(int(any(m in sys.modules for m in ('torch', 'transformers'))))"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0


@pytest.fixture(scope="module")
def swapped_llava(sources):
    out = sources / "llava-swapped"
    assert main(["swap", "--host", "llava", "--mllm", str(sources / "llava"), "--encoder", str(sources / "enc"), "--out", str(out)]) == 0
    return out


def test_an_alignment_run_of_another_host_is_refused_before_loading(sources, swapped_llava, tmp_path):
    from mgll.adapters.align import load_aligned
    from mgll.adapters.hosts import ShapeMismatch

    (tmp_path / "summary.json").write_text(json.dumps({"host": "qwen2_vl", "stage": 1}))
    with pytest.raises(ShapeMismatch, match=rf"host mismatch: {tmp_path} aligned a 'qwen2_vl' model but {swapped_llava} is host 'llava'"):
        load_aligned(swapped_llava, tmp_path)


def test_a_lora_adapter_of_another_width_names_both_shapes(sources, swapped_llava, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    from mgll.adapters.align import load_aligned
    from mgll.adapters.hosts import ShapeMismatch, get_host
    from mgll.adapters.swap import load_swapped, save_projector

    model, _ = load_swapped(swapped_llava, with_processor=False)
    save_projector(model, "llava", tmp_path / "projector.safetensors")  # the projector fits; the adapter does not
    narrow = LlavaForConditionalGeneration.from_pretrained(tiny.make_tiny_llava(tmp_path / "narrow", TEXTS, text_width=32))
    lora = get_peft_model(narrow, LoraConfig(r=4, target_modules=get_host("llava").lora_target_modules()))
    lora.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ShapeMismatch, match=r"adapter: LoRA adapter does not fit this model \(size mismatch .*torch.Size\(\[4, 32\]\).*torch.Size\(\[4, 64\]\)"):
        load_aligned(swapped_llava, tmp_path)
