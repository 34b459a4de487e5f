"""The one seam between ``train()`` and how its weights are held: plain accelerate, or a DeepSpeed ZeRO engine.

The training loop is the same either way; what differs is where the weights and the optimizer state
live and therefore how they are prepared, stepped, clamped, saved, resumed and finally read out:

- plain (one process, DDP, CPU or GPU): the checkpoint is loaded before ``prepare``; the norm is
  clipped by accelerate and the optimizer steps only when the step was finite; the logit scale is
  clamped in place; checkpoints and the final encoder are the module's own tensors.
- ZeRO: DeepSpeed clips and steps inside ``backward`` (the optimizer "step" is its no-op), its
  checkpoints are its own partitions loaded after ``prepare``, clamping and the final encoder go
  through the fp32 masters on every rank, and its ``"auto"`` config values are filled from ours.

``train()`` calls :func:`make_backend` once and then only these methods; no other place asks which.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from mgll.encoder.checkpoint import (
    load_checkpoint,
    load_newest_intact,
    load_zero_checkpoint,
    save_checkpoint,
    save_zero_checkpoint,
)
from mgll.encoder.contrastive import ContrastiveModel
from mgll.encoder.zero import (
    clamp_parameter_,
    fill_auto,
    full_state_dict,
    logit_scale_bounds,
    model_width,
    scalar_safe_broadcast,
    zero_stage,
)

__all__ = ["PlainBackend", "ZeroBackend", "make_backend"]


class PlainBackend:
    """Weights and optimizer state in the module itself (accelerate: one process or DDP)."""

    def __init__(self, accelerator: Accelerator, cfg):
        self.accelerator, self.cfg = accelerator, cfg
        self.model = self.optimizer = None

    @property
    def engine(self):
        """What runs ``backward`` when it is not plain autograd (the DeepSpeed engine); None here."""
        return None

    def prepare(self, model: torch.nn.Module, optimizer, scheduler, run_dir: Path, resume: bool):
        """``(model, optimizer, core, checkpoint, start step, notes)`` with the newest intact checkpoint restored."""
        ckpt, start, notes = None, 0, []
        if resume:
            ckpt, start, notes = load_newest_intact(run_dir, lambda p: load_checkpoint(p, model, optimizer, scheduler, restore_rng=False))
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        return self.model, self.optimizer, self.accelerator.unwrap_model(self.model), ckpt, start, notes

    def input_dtype(self, core: ContrastiveModel) -> torch.dtype | None:
        """The dtype images are sent in (None: as they come; accelerate's autocast does the rest)."""
        return None

    def grad_norm(self) -> float | None:
        """The global gradient norm, clipped to ``train.grad_clip`` on the way (None where the fp16 scaler owns infs)."""
        max_norm = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        if self.accelerator.mixed_precision == "fp16" or norm is None:
            return None
        return float(norm)

    def step(self, finite: bool) -> None:
        if finite:
            self.optimizer.step()

    def clamp(self, core: ContrastiveModel) -> None:
        core.clamp_logit_scale()

    def save(self, run_dir: Path, step: int, core: ContrastiveModel, scheduler) -> None:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            save_checkpoint(run_dir, step, core, self.optimizer, scheduler, keep=self.cfg.train.keep_checkpoints)

    def final_encoder(self, core: ContrastiveModel, build_encoder) -> torch.nn.Module:
        """The trained open_clip encoder as a plain module (``build_encoder()`` makes an empty one when needed)."""
        return core.encoder


class ZeroBackend(PlainBackend):
    """A DeepSpeed ZeRO engine holds the weights (stage 2 for encoders: ZeRO-3 cannot partition the 0-dim logit scale)."""

    def __init__(self, accelerator: Accelerator, cfg, stage: int):
        super().__init__(accelerator, cfg)
        self.stage = stage

    @property
    def engine(self):
        return self.model

    def prepare(self, model, optimizer, scheduler, run_dir: Path, resume: bool):
        cfg = self.cfg
        if self.stage == 3 and any(p.dim() == 0 for p in model.parameters()):
            raise ValueError(
                f"{cfg.deepspeed or 'the accelerate DeepSpeed config'}: ZeRO-3 cannot partition open_clip's 0-dim logit_scale "
                "(DeepSpeed views every parameter as bytes); use ZeRO-2 (configs/deepspeed/zero2.json) for encoders"
            )
        world = self.accelerator.num_processes
        fill_auto(self.accelerator, micro_batch=cfg.train.batch_size // world, grad_clip=cfg.train.grad_clip, width=model_width(model))
        with scalar_safe_broadcast(model):
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        ckpt, start, notes = None, 0, []
        if resume:  # the engine's own partitions of weights and optimizer state
            ckpt, start, notes = load_newest_intact(run_dir, lambda p: load_zero_checkpoint(p, self.model, scheduler, restore_rng=False))
        return self.model, self.optimizer, self.accelerator.unwrap_model(self.model), ckpt, start, notes

    def input_dtype(self, core: ContrastiveModel) -> torch.dtype | None:
        """DeepSpeed casts the model itself under bf16/fp16 (accelerate's autocast is off there): match its inputs."""
        return next(core.parameters()).dtype

    def grad_norm(self) -> float | None:
        """DeepSpeed clipped and stepped inside ``backward``; its norm is read afterwards."""
        norm = self.model.get_global_grad_norm() if hasattr(self.model, "get_global_grad_norm") else None
        return None if norm is None else float(norm)

    def step(self, finite: bool) -> None:
        self.optimizer.step()  # a no-op wrapper: the engine stepped already; the save refuses non-finite weights

    def clamp(self, core: ContrastiveModel) -> None:
        for p in core.log_scale_parameters():
            clamp_parameter_(p, *logit_scale_bounds())

    def save(self, run_dir: Path, step: int, core: ContrastiveModel, scheduler) -> None:
        self.accelerator.wait_for_everyone()
        save_zero_checkpoint(run_dir, step, self.model, scheduler, keep=self.cfg.train.keep_checkpoints)

    def final_encoder(self, core: ContrastiveModel, build_encoder) -> torch.nn.Module:
        """The fp32 masters gathered into a plain module (a collective: every rank calls it; rank 0 gets the module)."""
        state = full_state_dict(core)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            encoder = build_encoder()
            prefix = "encoder."
            encoder.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
            return encoder
        return core.encoder


def make_backend(accelerator: Accelerator, cfg: Any) -> PlainBackend:
    """The backend of this accelerator: ZeRO when it runs on DeepSpeed, plain otherwise."""
    stage = zero_stage(accelerator)
    return PlainBackend(accelerator, cfg) if stage is None else ZeroBackend(accelerator, cfg, stage)

