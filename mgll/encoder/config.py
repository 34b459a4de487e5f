"""Run configuration: YAML file, then ``section.key=value`` overrides from the command line.

Dataclasses rather than free dicts so a typo in a YAML key is an error naming the key and the
section, not a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mgll.encoder.losses import DEFAULT_WEIGHTS, MGLLOptions

__all__ = ["DataConfig", "ModelConfig", "LossConfig", "TrainConfig", "RunConfig", "load_config", "apply_overrides"]


@dataclass
class DataConfig:
    path: str = ""  # dataset folder (card + records.jsonl)
    split: str = "train"
    num_workers: int = 0
    augment: bool = True  # open_clip's train transform (random resized crop) instead of the eval one
    check_images: str = "header"  # before step 1: header (size, truncation) | decode (every image) | off
    max_pixels: int | None = None  # pixel budget per image; None: MGLL_MAX_PIXELS or mgll.data.pixel_budget's default


@dataclass
class ModelConfig:
    name: str = "mgll-tiny-vit"  # open_clip architecture, mgll config, or a saved encoder folder
    pretrained: str | None = None  # open_clip tag or local checkpoint file
    grad_checkpointing: bool = False
    trim_text: bool = True


@dataclass
class LossConfig:
    name: str = "mgll"  # clip | siglip | mgll
    soft_clip: float = DEFAULT_WEIGHTS["soft_clip"]  # a1
    pointwise: float = DEFAULT_WEIGHTS["pointwise"]  # a2 (0: the term study chose it; losses.py says why)
    smooth_kl: float = DEFAULT_WEIGHTS["smooth_kl"]  # a3
    # variants of the terms (equations in losses.py; each measured by benchmarks/ablation.py); the defaults
    # are MGLLOptions' own, so they are stated once
    pointwise_reduction: str = MGLLOptions.pointwise_reduction  # sum_texts | mean_pairs | mean_positives
    pointwise_temperature: str = MGLLOptions.pointwise_temperature  # learnable | fixed
    pointwise_levels: str = MGLLOptions.pointwise_levels  # all | fine (levels 2..L)
    smooth_kl_levels: str = MGLLOptions.smooth_kl_levels  # all | min_texts (levels with >= smooth_kl_min_texts texts)
    smooth_kl_min_texts: int = MGLLOptions.smooth_kl_min_texts
    smooth_kl_direction: str = MGLLOptions.smooth_kl_direction  # image_to_text | text_to_image
    smooth_kl_schedule: str = MGLLOptions.smooth_kl_schedule  # constant | warmup | decay
    smooth_kl_ramp: float = MGLLOptions.smooth_kl_ramp  # fraction of training the warm-up / decay spans
    soft_clip_coarse: float = MGLLOptions.soft_clip_coarse  # weight of the coarsest level in the soft-CLIP mean

    def options(self) -> MGLLOptions:
        """The variant settings as the loss takes them (validated: a bad value raises ValueError naming the key)."""
        return MGLLOptions(**{k: getattr(self, k) for k in MGLLOptions.names()})


@dataclass
class TrainConfig:
    batch_size: int = 32  # global batch, split evenly over processes
    accum_steps: int = 1  # micro-batches per process per step: feature-cached accumulation (accumulate.py), same loss
    steps: int = 200
    lr: float = 5e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 20
    grad_clip: float = 1.0  # 0 disables
    precision: str = "auto"  # auto (bf16 on GPUs that have it, else fp32) | fp32 | bf16 | fp16
    seed: int = 0
    save_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1
    max_nonfinite_steps: int = 3  # a NaN/inf loss or gradient skips the step; this many in a row stop the run


@dataclass
class RunConfig:
    output_dir: str = "runs/encoder"
    deepspeed: str | None = None  # DeepSpeed JSON (configs/deepspeed/zero2.json); "auto" values come from train.*
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls, values: dict[str, Any], where: str):
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"{where}: unknown key {key!r}; known: {', '.join(fields)}")
        sub = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            kwargs[key] = _build(sub, value, f"{where}.{key}")
        else:
            kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """YAML reads ``1e-3`` as a string and ``5`` as an int where a float is meant: fix both, or say which key is wrong."""
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise ValueError(f"{where}: must not be null")
    target = next((t for t in (bool, int, float, str) if hint is t or t in typing.get_args(hint)), None)
    if target is None or isinstance(value, target) and not (target is int and isinstance(value, bool)):
        return value
    try:
        if target is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if target is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return target(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected {target.__name__}, got {value!r}") from None


def apply_overrides(cfg: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` strings; values are parsed as YAML (``1e-3``, ``true``, ``null``)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        node = cfg
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    raw: dict[str, Any] = {}
    where = "config"
    if path is not None:
        where = str(path)
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    raw = apply_overrides(raw, overrides or [])
    cfg = _build(RunConfig, raw, where)
    _validate(cfg, where)
    return cfg


def _validate(cfg: RunConfig, where: str) -> None:
    t = cfg.train
    if cfg.loss.name not in ("clip", "siglip", "mgll"):
        raise ValueError(f"{where}: loss.name must be clip, siglip or mgll, got {cfg.loss.name!r}")
    if cfg.data.check_images not in ("header", "decode", "off"):
        raise ValueError(f"{where}: data.check_images must be header, decode or off, got {cfg.data.check_images!r}")
    if t.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"{where}: train.precision must be auto, fp32, bf16 or fp16, got {t.precision!r}")
    for name in ("batch_size", "steps", "save_every", "accum_steps"):
        if int(getattr(t, name)) < 1:
            raise ValueError(f"{where}: train.{name} must be >= 1, got {getattr(t, name)!r}")
    if t.batch_size % t.accum_steps:
        raise ValueError(f"{where}: train.batch_size={t.batch_size} is not divisible by train.accum_steps={t.accum_steps}")
    if cfg.deepspeed is not None and not Path(cfg.deepspeed).is_file():
        raise ValueError(f"{where}: deepspeed: {cfg.deepspeed} is not a file (see configs/deepspeed/)")
    if t.warmup_steps < 0 or not (0 < t.lr < float("inf")):
        raise ValueError(f"{where}: train.warmup_steps must be >= 0 and train.lr a finite number > 0")
    if t.max_nonfinite_steps < 1:
        raise ValueError(f"{where}: train.max_nonfinite_steps must be >= 1, got {t.max_nonfinite_steps}")
    for name in ("soft_clip", "pointwise", "smooth_kl"):
        w = getattr(cfg.loss, name)
        if not (0 <= w < float("inf")):
            raise ValueError(f"{where}: loss.{name} must be a finite weight >= 0, got {w!r}")
    try:
        cfg.loss.options()
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
