"""DeepSpeed ZeRO through accelerate, for ``mgll train`` and ``mgll align``.

Why this module exists rather than ``Accelerator(deepspeed_plugin=...)`` alone:

- Our loops shard data themselves (no prepared DataLoader), so accelerate cannot infer the
  micro-batch; the ``"auto"`` values of a DeepSpeed JSON are filled here from our config
  (micro-batch, global batch, clipping, bucket sizes), and an explicit value that disagrees
  with the config is an error rather than a silently different run.
- accelerate only takes its DeepSpeed path for non-CPU processes; on a machine with no GPU
  (``DS_ACCELERATOR=cpu``, tests) the process group must be gloo, and a single process
  started without a launcher needs the rendezvous variables a launcher would have set.
- Under ZeRO the model's parameters are not the optimizer's fp32 masters (and under ZeRO-3
  are not even whole): clamping a parameter, or reading the weights to save them as plain
  safetensors, must go through DeepSpeed's own accessors on every rank.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ZERO_TAG",
    "deepspeed_in_env",
    "load_ds_config",
    "make_ds_accelerator",
    "fill_auto",
    "zero_stage",
    "model_width",
    "gathered",
    "full_state_dict",
    "clamp_parameter_",
    "scalar_safe_broadcast",
    "cast_unpartitioned_",
]

ZERO_TAG = "zero"  # the folder DeepSpeed writes its own checkpoint into, inside our step-N folder


def deepspeed_in_env() -> bool:
    """True when ``accelerate launch`` was given a DeepSpeed config (it exports these variables)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def load_ds_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a DeepSpeed JSON; errors name the file and what is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"deepspeed config {path}: no such file (see configs/deepspeed/)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"deepspeed config {path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"deepspeed config {path}: expected a JSON object, got {type(cfg).__name__}")
    stage = cfg.get("zero_optimization", {}).get("stage") if isinstance(cfg.get("zero_optimization"), dict) else None
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed config {path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if "optimizer" in cfg or "scheduler" in cfg:
        raise ValueError(
            f"deepspeed config {path}: remove 'optimizer'/'scheduler'; mgll builds AdamW and its schedule from the run config"
        )
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    """What torchrun would export for one process, so ``mgll train --deepspeed`` runs without a launcher."""
    if "LOCAL_RANK" in os.environ:
        return
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def make_ds_accelerator(mixed_precision: str, config_path: str | os.PathLike | None):
    """An ``Accelerator`` on DeepSpeed: from ``config_path`` if given, else from accelerate's environment."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    handlers = []
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        handlers.append(InitProcessGroupKwargs(backend="gloo"))  # oneCCL is not a dependency
    plugin = DeepSpeedPlugin(hf_ds_config=load_ds_config(config_path)) if config_path else None
    _single_process_env()
    return Accelerator(mixed_precision=mixed_precision, deepspeed_plugin=plugin, kwargs_handlers=handlers)


def zero_stage(accelerator) -> int | None:
    """The ZeRO stage of an accelerator on DeepSpeed, else None."""
    plugin = accelerator.state.deepspeed_plugin
    return None if plugin is None else int(plugin.deepspeed_config["zero_optimization"]["stage"])


def model_width(model: torch.nn.Module) -> int:
    """The hidden width DeepSpeed sizes its buckets by: the LM's for HF models, the widest tower's for open_clip."""
    config = getattr(model, "config", None)
    if config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(text, "hidden_size", None):
            return int(text.hidden_size)
    widths = [int(m.width) for m in model.modules() if isinstance(getattr(m, "width", None), int)]
    return max(widths) if widths else 1024


def cast_unpartitioned_(model: torch.nn.Module, mixed_precision: str) -> int:
    """Cast the floating parameters that ZeRO-3's ``zero.Init`` never saw to the engine's dtype; returns how many.

    Under ZeRO-3 DeepSpeed does not cast the module (it was built partitioned, in bf16/fp16);
    parameters added after loading, such as peft's LoRA matrices (created in fp32 and upcast by
    peft on purpose), stay fp32, and DeepSpeed's stage-3 optimizer then stops on an assertion
    when it flattens trainable parameters of two dtypes. Partitioned parameters (``ds_id``) are
    left alone: they already hold the engine's dtype.
    """
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    if dtype is None:
        return 0
    n = 0
    for p in model.parameters():
        if not hasattr(p, "ds_id") and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += 1
    return n


def fill_auto(accelerator, *, micro_batch: int, grad_clip: float, width: int) -> dict[str, Any]:
    """Replace the config's ``"auto"`` values with ours before ``prepare`` and return the config.

    Batch sizes and accumulation must match ours (the loop does no accumulation and the sampler
    fixes the per-rank batch), so an explicit value that differs is an error naming both.
    """
    plugin = accelerator.state.deepspeed_plugin
    world = accelerator.num_processes
    exact = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "train_batch_size": micro_batch * world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(grad_clip),
    }
    sized = {
        "zero_optimization.reduce_bucket_size": width * width,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * width * width),
        "zero_optimization.stage3_param_persistence_threshold": 10 * width,
    }
    mismatches: list[str] = []
    for key, value in exact.items():
        plugin.fill_match(key, mismatches, must_match=True, **{key: value})
    if mismatches:
        raise ValueError(
            "deepspeed config disagrees with the run config (set these to \"auto\" or match them):\n" + "\n".join(mismatches)
        )
    for key, value in sized.items():
        plugin.fill_match(key, must_match=False, **{key: value})
    return plugin.deepspeed_config


@contextlib.contextmanager
def scalar_safe_broadcast(module: torch.nn.Module):
    """Around ``accelerator.prepare``: rank 0's weights on every rank, without DeepSpeed's broadcast.

    DeepSpeed (0.19) broadcasts each parameter as ``p.data.view(torch.uint8)``, which raises for
    0-dim parameters such as open_clip's ``logit_scale``. Modules without one are left to
    DeepSpeed; for the others the same broadcast is done here and DeepSpeed's is skipped.
    """
    import torch.distributed as dist

    if not any(p.dim() == 0 for p in module.parameters()):
        yield
        return
    from deepspeed.runtime.engine import DeepSpeedEngine

    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)
    original = DeepSpeedEngine._broadcast_model
    DeepSpeedEngine._broadcast_model = lambda self: None
    try:
        yield
    finally:
        DeepSpeedEngine._broadcast_model = original


def gathered(params, modifier_rank: int | None = None):
    """ZeRO-3: the whole parameters inside the block (a no-op for unpartitioned ones)."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's whole state on CPU, trained parameters from the optimizer's fp32 masters.

    Collective: every rank must call it. Frozen parameters (no master) are gathered as they are.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    full: dict[int, torch.Tensor] = {}
    for p in module.parameters():
        if id(p) in full:
            continue
        value = safe_get_full_fp32_param(p) if p.requires_grad else None
        if value is None:
            with gathered([p]):
                value = p.detach().clone()
        full[id(p)] = value.detach().to("cpu").reshape(getattr(p, "ds_shape", p.shape)).contiguous()
    out = {}
    for name, t in module.state_dict(keep_vars=True).items():
        out[name] = full[id(t)] if id(t) in full else t.detach().to("cpu").contiguous()
    return out


def clamp_parameter_(param: torch.nn.Parameter, low: float, high: float) -> None:
    """Clamp a parameter in the model and in its fp32 master, as a plain ``clamp_`` does without ZeRO.

    Collective under ZeRO (the master is read with an all-reduce); every rank must call it.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    with torch.no_grad(), gathered([param], modifier_rank=0):
        param.data.clamp_(low, high)
    master = safe_get_full_fp32_param(param)
    if master is not None and bool(((master < low) | (master > high)).any()):
        safe_set_full_fp32_param(param, master.clamp(low, high))


def logit_scale_bounds(max_scale: float = 100.0) -> tuple[float, float]:
    return 0.0, math.log(max_scale)
