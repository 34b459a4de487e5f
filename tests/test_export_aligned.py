"""`mgll export-aligned`: an alignment run becomes a model folder that loads without mgll, with `load_aligned`'s logits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mgll.adapters.align import AlignConfig, align, load_aligned
from mgll.adapters.prompts import build_prompt, encode_prefix
from mgll.adapters.swap import load_swapped
from mgll.cli import main
from mgll.data import make_synthetic
from mgll.encoder.factory import create_encoder, save_encoder

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
from stock_models import build_stock  # noqa: E402
from test_pixel_parity import photo  # noqa: E402


@pytest.mark.parametrize("host", ["llava", "qwen2_vl"])  # a stock-class folder and a remote-code one
def test_exported_run_loads_with_auto_classes_and_gives_load_aligneds_logits(host, tmp_path):
    torch.manual_seed(0)
    enc, _, _, _, name = create_encoder("mgll-tiny-vit")
    save_encoder(enc, tmp_path / "enc", name)
    build_stock(host, tmp_path / "src")
    swapped = tmp_path / "swapped"
    assert main(["swap", "--host", host, "--mllm", str(tmp_path / "src"), "--encoder", str(tmp_path / "enc"), "--out", str(swapped)]) == 0
    make_synthetic(tmp_path / "data", kind="fundus", n=8, size=48, seed=2)
    run = tmp_path / "s2"
    align(AlignConfig(model=str(swapped), data=str(tmp_path / "data"), out=str(run), stage=2, split=None, steps=3,
                      batch_size=2, lr=5e-2), progress=False)
    out = tmp_path / "merged"
    assert main(["export-aligned", "--model", str(swapped), "--align", str(run), "--out", str(out)]) == 0
    spec = json.loads((out / "mgll_swap.json").read_text())
    assert spec["lora_merged"] is True and spec["aligned_from"] == str(run)

    model, processor = load_aligned(swapped, run)
    model.eval()
    inputs = encode_prefix(processor, build_prompt(host, processor, "what disease?"), photo(60, 80), "cpu", torch.float32)
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(tmp_path / "inputs.safetensors"))
    with torch.no_grad():
        want = model(**inputs).logits
        untrained = load_swapped(swapped, with_processor=False)[0].eval()(**inputs).logits
    assert (want - untrained).abs().max() > 1e-3  # the run changed the model, so equality below means something
    remote = "1" if host == "qwen2_vl" else "0"
    proc = subprocess.run([sys.executable, str(HELPERS / "auto_load.py"), str(out), str(tmp_path / "inputs.safetensors"),
                           str(tmp_path / "got.safetensors"), remote], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.loads((tmp_path / "got.safetensors.json").read_text())
    assert facts["mgll_imported"] is False
    torch.testing.assert_close(load_file(str(tmp_path / "got.safetensors"))["logits"], want.float(), atol=1e-5, rtol=0)


def test_export_of_a_missing_run_is_one_line(tmp_path, capsys):
    (tmp_path / "swapped").mkdir()
    (tmp_path / "swapped" / "mgll_swap.json").write_text(json.dumps({"host": "llava", "tower": {}}))
    assert main(["export-aligned", "--model", str(tmp_path / "swapped"), "--align", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().endswith("no summary.json; not a finished `mgll align` run")
