"""Training checkpoints: weights as safetensors, optimizer/scheduler/RNG/step as a tensor-only file.

A checkpoint is a folder ``checkpoints/step-000050`` written under a temporary name and renamed
into place, then ``checkpoints/latest`` (a one-line text file) is replaced atomically, so a run
killed at any moment leaves the previous checkpoint intact and pointed to. Nothing is unpickled
on load: ``torch.load(weights_only=True)`` and RNG states stored as tensors and plain lists.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mgll.io import atomic_path, atomic_write_text

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "rng_state", "set_rng_state"]

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
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return int(state["step"])
