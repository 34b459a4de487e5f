"""DeepSpeed configs: the shipped JSONs load, "auto" values are filled from our config, and
bad input is an error naming the file or key."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("deepspeed")

from accelerate.utils import DeepSpeedPlugin  # noqa: E402

from mgll.encoder.config import load_config  # noqa: E402
from mgll.encoder.zero import fill_auto, load_ds_config, model_width  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"


def _accelerator(cfg: dict, world: int = 2):
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg)), num_processes=world)


@pytest.mark.parametrize("name,stage", [("zero2.json", 2), ("zero3.json", 3), ("zero3_offload.json", 3)])
def test_shipped_configs_fill_from_the_run_config(name, stage):
    cfg = load_ds_config(CONFIGS / name)
    assert cfg["zero_optimization"]["stage"] == stage and cfg["zero_allow_untested_optimizer"] is True
    filled = fill_auto(_accelerator(cfg), micro_batch=8, grad_clip=0.5, width=64)
    assert filled["train_micro_batch_size_per_gpu"] == 8 and filled["train_batch_size"] == 16
    assert filled["gradient_accumulation_steps"] == 1 and filled["gradient_clipping"] == 0.5
    assert filled["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    if stage == 3:
        assert filled["zero_optimization"]["stage3_param_persistence_threshold"] == 640
    assert "auto" not in json.dumps({k: v for k, v in filled.items() if k not in ("bf16", "fp16")})


def test_explicit_values_that_disagree_with_the_run_are_errors():
    cfg = load_ds_config(CONFIGS / "zero2.json")
    cfg["train_micro_batch_size_per_gpu"] = 4
    with pytest.raises(ValueError, match=r"train_micro_batch_size_per_gpu=4 vs arg train_micro_batch_size_per_gpu=8"):
        fill_auto(_accelerator(cfg), micro_batch=8, grad_clip=1.0, width=64)


def test_bad_config_files_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json: no such file"):
        load_ds_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{stage: 2")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_ds_config(bad)
    bad.write_text(json.dumps({"zero_optimization": {"stage": 5}}))
    with pytest.raises(ValueError, match=r"bad.json: zero_optimization.stage must be 0, 1, 2 or 3, got 5"):
        load_ds_config(bad)
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}))
    with pytest.raises(ValueError, match="remove 'optimizer'"):
        load_ds_config(bad)
    with pytest.raises(ValueError, match=r"config: deepspeed: .*missing.json is not a file"):
        load_config(overrides=[f"deepspeed={tmp_path / 'missing.json'}"])
    assert load_config(overrides=[f"deepspeed={CONFIGS / 'zero2.json'}"]).deepspeed.endswith("zero2.json")


def test_bucket_width_is_the_lm_width_or_the_widest_tower():
    from transformers import LlamaConfig

    from mgll.encoder.factory import create_encoder

    encoder, *_ = create_encoder("mgll-tiny-vit")
    widths = {m.width for m in encoder.modules() if isinstance(getattr(m, "width", None), int)}
    assert model_width(encoder) == max(widths)
    lm = torch.nn.Linear(2, 2)
    lm.config = LlamaConfig(hidden_size=96, num_attention_heads=4)
    assert model_width(lm) == 96


def test_align_cli_takes_a_deepspeed_config():
    import argparse

    from mgll.adapters.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["align", "--model", "m", "--data", "d", "--out", "o", "--deepspeed", "configs/deepspeed/zero3.json"])
    assert args.deepspeed == "configs/deepspeed/zero3.json"
    assert parser.parse_args(["align", "--model", "m", "--data", "d", "--out", "o"]).deepspeed is None
