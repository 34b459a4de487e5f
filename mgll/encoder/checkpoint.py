"""Training checkpoints: weights as safetensors, optimizer/scheduler/RNG/step as a tensor-only file.

A checkpoint is a folder ``checkpoints/step-000050`` written under a temporary name and renamed
into place, then ``checkpoints/latest`` (a one-line text file) is replaced atomically, so a run
killed at any moment leaves the previous checkpoint intact and pointed to. Nothing is unpickled
on load: ``torch.load(weights_only=True)`` and RNG states stored as tensors and plain lists.

Under DeepSpeed ZeRO the same folder also holds ``zero/``: DeepSpeed's own checkpoint (each
rank's optimizer partition), which resumes the run as it is, next to ``model.safetensors``
consolidated from the fp32 masters, which is what everything else reads. All ranks write into
one temporary folder that rank 0 renames once every rank is done.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mgll.io import atomic_path, atomic_write_text

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "rng_state",
    "set_rng_state",
    "save_zero_checkpoint",
    "load_zero_checkpoint",
    "checkpoint_rng",
]

WEIGHTS = "model.safetensors"
STATE = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2] if random.getstate()[2] is not None else -1,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"]["key"].numpy().astype(np.uint32), state["numpy"]["pos"], 0, 0.0))
    pos = state["python_pos"]
    random.setstate((3, tuple(int(x) for x in state["python"]), None if pos == -1 else pos))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    keep: int = 2,
) -> Path:
    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / f"step-{step:06d}"
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        save_file(weights, str(tmp / WEIGHTS))
        torch.save(state, tmp / STATE)
    atomic_write_text(ckpt_root / "latest", final.name + "\n")
    _prune(ckpt_root, keep, final)
    return final


def _prune(ckpt_root: Path, keep: int, newest: Path) -> None:
    for stale in ckpt_root.glob(".*.tmp"):  # left by a run killed while it wrote a checkpoint
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    done = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep] if keep > 0 else []:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpt_root = Path(run_dir) / "checkpoints"
    pointer = ckpt_root / "latest"
    if not pointer.is_file():
        return None
    path = ckpt_root / pointer.read_text(encoding="utf-8").strip()
    if not (path / WEIGHTS).is_file() or not (path / STATE).is_file():
        raise FileNotFoundError(f"{pointer} points to {path}, which is missing {WEIGHTS} or {STATE}")
    return path


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
) -> int:
    """Load into the given objects and return the step the checkpoint was taken after."""
    path = Path(path)
    missing, unexpected = model.load_state_dict(load_file(str(path / WEIGHTS)), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{path / WEIGHTS} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    if optimizer is not None and "optimizer" not in state:
        raise ValueError(f"{path}: written under DeepSpeed (optimizer state in zero/); resume with the same deepspeed config")
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return int(state["step"])


def save_zero_checkpoint(run_dir: str | Path, step: int, engine: Any, scheduler: Any, keep: int = 2) -> Path:
    """Collective (every rank calls it): DeepSpeed's checkpoint + consolidated safetensors, atomically."""
    import torch.distributed as dist

    from mgll.encoder.zero import ZERO_TAG, full_state_dict

    main = dist.get_rank() == 0
    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f".{final.name}.tmp"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag=ZERO_TAG, save_latest=False)
    torch.save(rng_state(), tmp / f"rng_rank{dist.get_rank()}.pt")  # each rank's own random stream
    weights = full_state_dict(engine.module)
    if main:
        save_file(weights, str(tmp / WEIGHTS))
        state = {"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state(), "zero": True}
        torch.save(state, tmp / STATE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(ckpt_root / "latest", final.name + "\n")
        _prune(ckpt_root, keep, final)
    dist.barrier()
    return final


def load_zero_checkpoint(path: str | Path, engine: Any, scheduler: Any = None, restore_rng: bool = True) -> int:
    """Resume a DeepSpeed engine (after ``prepare``) from a step folder; returns its step.

    DeepSpeed reads its own files with ``torch.load`` (its format, written by this run); our
    trainer state is read with ``weights_only=True`` as always.
    """
    from mgll.encoder.zero import ZERO_TAG

    path = Path(path)
    if not (path / ZERO_TAG).is_dir():
        raise ValueError(f"{path}: not a DeepSpeed checkpoint (no {ZERO_TAG}/); resume it without --deepspeed")
    load_path, _ = engine.load_checkpoint(str(path), tag=ZERO_TAG, load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"{path / ZERO_TAG}: DeepSpeed could not load this checkpoint")
    state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(checkpoint_rng(path))
    return int(state["step"])


def checkpoint_rng(path: str | Path) -> dict[str, Any]:
    """This rank's RNG state at the checkpoint (its own file under ZeRO, else rank 0's).

    Set it only after the DataLoader iterator exists: creating one draws a seed from the
    global generator, which the uninterrupted run did once, before step 1.
    """
    import torch.distributed as dist

    path = Path(path)
    own = path / f"rng_rank{dist.get_rank() if dist.is_initialized() else 0}.pt"
    if own.is_file():
        return torch.load(own, map_location="cpu", weights_only=True)
    return torch.load(path / STATE, map_location="cpu", weights_only=True)["rng"]
