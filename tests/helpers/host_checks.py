"""Checks every host swap test makes, written once and parameterised by what differs between hosts.

Each host test file keeps its own named tests and host-specific assertions; these functions carry the contract
shared by all hosts (the CLI swap, stage-1 training only the projector, QLoRA quantising only the LM, LoRA
staying off the tower, save->load identity, width and shape mismatches naming both sizes) so a fix to that
contract lands in one place.
"""

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mgll.adapters.align import AlignConfig, align, load_aligned, record_caption
from mgll.adapters.cli import register
from mgll.adapters.hosts import ShapeMismatch, get_host
from mgll.adapters.swap import load_projector, load_swapped, save_projector, swap_model
from mgll.data import make_synthetic
from mgll.encoder.factory import create_encoder, save_encoder

LEVELS = ["status", "disease"]  # caption levels the stage-1/2 runs train on
MEAN, STD = (0.4, 0.4, 0.4), (0.2, 0.2, 0.2)  # not the hosts' own, so a processor left on those fails image_mean checks


def random_images(sizes):
    """Seeded noise images of the given (height, width) sizes; the same sizes always give the same pixels."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def synthetic_captions(root: Path, levels=LEVELS):
    """A 16-record synthetic fundus set under root/data (the stage-1/2 training data) and its captions."""
    ds = make_synthetic(root / "data", kind="fundus", n=16, size=64, seed=1)
    return [record_caption(ds.card, r.labels, levels) for r in ds.records]


def swap_with_cli(root: Path, host: str, source: Path, mean=MEAN, std=STD):
    """Swap a seeded tiny MGLL ViT (64 px, patch 8, width 64) into `source` through `mgll swap`, as a user would.

    Returns (root, encoder, swapped model, processor), the tuple the host tests' `built` fixtures share.
    """
    torch.manual_seed(0)
    enc, _, _, _, name = create_encoder("mgll-tiny-vit", image_mean=mean, image_std=std)
    save_encoder(enc, root / "enc", name)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["swap", "--host", host, "--mllm", str(source), "--encoder", str(root / "enc"),
                              "--out", str(root / "swapped"), "--seed", "7"])
    assert args.func(args) == 0
    enc, *_ = create_encoder(str(root / "enc"))
    model, processor = load_swapped(root / "swapped")
    return root, enc.eval(), model.eval(), processor


def read_spec(root: Path) -> dict:
    return json.loads((root / "swapped" / "mgll_swap.json").read_text())


def check_logits_and_generate(model, inputs, vocab_size: int, batch: int = 2, **generate_kwargs):
    """Forward gives a logit row per prompt token and greedy generate appends exactly 3 tokens to each prompt."""
    with torch.no_grad():
        logits = model(**inputs).logits
        assert logits.shape == (*inputs["input_ids"].shape, vocab_size)
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False, **generate_kwargs)
    assert gen.shape == (batch, inputs["input_ids"].shape[1] + 3)


def assert_mean_embedding(model, feats):
    """A zero-initialised projector outputs only its bias, which swap sets to the mean input embedding."""
    mean = model.get_input_embeddings().weight.mean(0)
    torch.testing.assert_close(feats, mean.expand_as(feats), atol=1e-6, rtol=0)


def check_save_load_identical(host: str, fresh, loaded, enc, inputs, **swap_kwargs):
    """Swapping in memory with the CLI's seed gives bit-identical logits to the saved-and-reloaded model."""
    torch.manual_seed(7)
    swap_model(host, fresh, enc, **swap_kwargs)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, loaded(**inputs).logits)


def check_keep_rejects_the_stock_width(host: str, source, expects: int = 32, gives: int = 64):
    """Keeping the stock projector for a wider MGLL tower names both widths."""
    with pytest.raises(ShapeMismatch, match=rf"expects {expects}-wide vision features but the tower gives {gives}"):
        swap_model(host, source, create_encoder("mgll-tiny-vit")[0], projector_init="keep")


def check_wide_projector_rejected(host: str, model, wide, tmp_path: Path, saved: int = 128, gives: int = 64):
    """A projector file from a wider tower does not load into this model, and the error names both widths."""
    save_projector(wide, host, tmp_path / "wide.safetensors")
    with pytest.raises(ShapeMismatch, match=rf"{saved}-wide .* gives {gives}"):
        load_projector(model, host, tmp_path / "wide.safetensors")


def check_edited_folder_rejected(root: Path, filename: str, keys, value, match: str):
    """Editing one field of the swapped folder's config.json / mgll_swap.json makes load_swapped refuse it.

    The file is restored afterwards because the module fixture's folder is shared by the other tests.
    """
    path = root / "swapped" / filename
    original = path.read_text()
    data = json.loads(original)
    target = data
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    try:
        path.write_text(json.dumps(data))
        with pytest.raises(ShapeMismatch, match=match):
            load_swapped(root / "swapped", with_processor=False)
    finally:
        path.write_text(original)


def check_stage1(root: Path, host: str, trained, min_drop=0.03, levels=LEVELS):
    """Stage 1 (20 steps) lowers the loss and changes every tensor under `trained` and nothing else.

    min_drop=None leaves the loss check to the caller (a host whose first steps start near the floor).
    0.03: the batches carry the host's whole inference prompt (chat template, instruction) between the image
    and the caption, so a projector steering a frozen random 2-layer LM moves the caption loss less in 20 steps
    than when the caption followed the image tokens directly (measured drops 0.038-0.06; 0.05 before).
    Returns the summary and the run folder.
    """
    out = root / "stage1"
    align(AlignConfig(model=str(root / "swapped"), data=str(root / "data"), out=str(out), split=None, levels=levels,
                      steps=20, batch_size=4, lr=3e-2), progress=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["host"] == host and summary["steps"] == 20
    if min_drop is not None:
        assert summary["loss_last"] < summary["loss_first"] - min_drop, summary
    before, _ = load_swapped(root / "swapped", with_processor=False)
    after, _ = load_aligned(root / "swapped", out, with_processor=False)
    changed = []
    for (name, a), (_, b) in zip(before.state_dict().items(), after.state_dict().items()):
        if name.startswith(trained):
            changed.append(not torch.equal(a, b))
        else:
            assert torch.equal(a, b), f"{name} changed in stage 1"
    assert changed and all(changed)
    return summary, out


def check_lora_targets(model, host: str, lm_pattern: str, tower_prefix: str, unquantised=None):
    """LoRA hits 2 LM layers x q,k,v,o,gate,up,down and no tower q_proj; the unquantised modules exist.

    lm_pattern is a regex every target must start with; tower_prefix holds a q_proj the regex must avoid.
    Returns (module names, LoRA targets) for host-specific checks.
    """
    spec = get_host(host)
    names = [n for n, _ in model.named_modules()]
    targets = [n for n in names if re.fullmatch(spec.lora_target_modules(), n)]
    assert len(targets) == 2 * 7 and all(re.match(lm_pattern, n) for n in targets)
    assert any(n.startswith(tower_prefix) and n.endswith("q_proj") for n in names)  # a trap the regex avoids
    if unquantised is not None:
        assert spec.unquantised_modules() == unquantised
    assert all(p in names for p in spec.unquantised_modules())
    return names, targets


def check_qlora_stage2(root: Path, host: str, lm_prefix: str, keep=None, adapter_key: str = "language_model",
                       levels=LEVELS):
    """QLoRA stage 2 loads 4-bit Linear layers only under lm_prefix and saves a trained (non-zero lora_B) adapter.

    keep: prefixes that must stay full-precision; None means everything outside lm_prefix.
    Returns the saved adapter tensors.
    """
    bnb = pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from mgll.adapters.align import _load_model

    cfg = AlignConfig(model=str(root / "swapped"), data=str(root / "data"), out=str(root / "qlora"), stage=2, qlora=True,
                      split=None, levels=levels, steps=2, batch_size=2, lr=1e-2)
    model = _load_model(cfg, get_host(host), torch.device("cpu"))
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert any(k is bnb.nn.Linear4bit for n, k in kinds.items() if n.startswith(lm_prefix))
    if keep is None:
        assert all(k is torch.nn.Linear for n, k in kinds.items() if not n.startswith(lm_prefix))
    else:
        assert all(k is torch.nn.Linear for n, k in kinds.items() if n.startswith(keep))
    align(cfg, progress=False)
    saved = load_file(str(root / "qlora" / "adapter" / "adapter_model.safetensors"))
    assert saved and all(adapter_key in k and "lora_" in k for k in saved)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    return saved
