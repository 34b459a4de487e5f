"""Training checkpoints: weights as safetensors, optimizer/scheduler/RNG/step as a tensor-only file.

A checkpoint is a folder ``checkpoints/step-000050`` written under a temporary name and renamed
into place, then ``checkpoints/latest`` (a one-line text file) is replaced atomically, so a run
killed at any moment leaves the previous checkpoint intact and pointed to. Nothing is unpickled
on load: ``torch.load(weights_only=True)`` and RNG states stored as tensors and plain lists.

Each checkpoint carries ``manifest.json`` (size and SHA-256 of every file in it, written last,
inside the temporary folder). ``resume_candidates`` checks it, newest step first, so a corrupted
or truncated latest checkpoint is reported and the newest intact one is used instead; a complete
``step-N/`` is found even when ``latest`` was never updated. Weights are refused at save and load
when they hold NaN or inf.

Under DeepSpeed ZeRO the same folder also holds ``zero/``: DeepSpeed's own checkpoint (each
rank's optimizer partition), which resumes the run as it is, next to ``model.safetensors``
consolidated from the fp32 masters, which is what everything else reads. All ranks write into
one temporary folder that rank 0 renames once every rank is done.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mgll.encoder.finite import NonFiniteError, assert_finite_tensors
from mgll.io import atomic_path, atomic_write_json, atomic_write_text, file_sha256

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "resume_candidates",
    "load_newest_intact",
    "read_weights",
    "read_state",
    "read_or_corrupt",
    "read_checkpoint",
    "CheckpointCorrupt",
    "write_manifest",
    "verify_manifest",
    "rng_state",
    "set_rng_state",
    "save_zero_checkpoint",
    "load_zero_checkpoint",
    "checkpoint_rng",
]

WEIGHTS = "model.safetensors"
STATE = "trainer_state.pt"
MANIFEST = "manifest.json"


class CheckpointCorrupt(ValueError):
    """A checkpoint folder whose files are missing, truncated, altered or non-finite."""


def write_manifest(folder: str | Path) -> Path:
    """Size and SHA-256 of every file under ``folder``; call it last, before the folder is renamed into place."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
    return atomic_write_json(folder / MANIFEST, {"format": 1, "files": entries})


def verify_manifest(folder: str | Path, required: tuple[str, ...] = (WEIGHTS, STATE)) -> str | None:
    """None if ``folder`` is intact, else the reason it is not (for the user: which file, what is wrong).

    A folder without a manifest (written before mgll had them) passes when its required files exist;
    reading it is then the only check, and a failure there still falls back (see ``read_checkpoint``).
    """
    folder = Path(folder)
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, UnicodeDecodeError) as e:
        return f"{MANIFEST} unreadable ({type(e).__name__})"
    for rel, entry in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} missing"
        size = path.stat().st_size
        if size != entry["bytes"]:
            return f"{rel} is {size} bytes, the manifest says {entry['bytes']} (truncated or replaced)"
        if file_sha256(path) != entry["sha256"]:
            return f"{rel} does not match its SHA-256 in {MANIFEST} (corrupted)"
    return None


def _step_of(folder: Path) -> int | None:
    try:
        return int(folder.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return None


def resume_candidates(ckpt_root: str | Path, required: tuple[str, ...] = (WEIGHTS, STATE)) -> list[tuple[Path, str | None]]:
    """Every finished ``step-N/`` folder, newest first, each with the reason it is unusable (None: intact).

    The ``latest`` pointer is not trusted on its own: a run killed between renaming ``step-N/`` into
    place and rewriting the pointer leaves a complete, newer checkpoint that the pointer misses.
    """
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    folders = [p for p in ckpt_root.glob("step-*") if p.is_dir() and _step_of(p) is not None]
    folders.sort(key=_step_of, reverse=True)
    return [(p, verify_manifest(p, required)) for p in folders]


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
    assert_finite_tensors(weights, f"checkpoint step {step}")
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        save_file(weights, str(tmp / WEIGHTS))
        torch.save(state, tmp / STATE)
        write_manifest(tmp)
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
    """The newest checkpoint folder that passes ``verify_manifest`` (None when there is none)."""
    for path, problem in resume_candidates(Path(run_dir) / "checkpoints"):
        if problem is None:
            return path
    return None


def load_newest_intact(
    run_dir: str | Path, load: Callable[[Path], int], required: tuple[str, ...] = (WEIGHTS, STATE)
) -> tuple[Path | None, int, list[str]]:
    """Resume from the newest checkpoint that verifies and loads; ``(path, step, notes)``.

    ``load(path)`` restores one folder and returns its step; it raises :class:`CheckpointCorrupt`
    for a folder whose files cannot be read, which moves on to the next older one. ``notes`` say
    which folders were passed over and why. A run folder that has checkpoints but none intact is
    an error (starting over silently would throw the run away); one with none at all gives
    ``(None, 0, [])``.
    """
    notes = []
    for path, problem in resume_candidates(Path(run_dir) / "checkpoints", required):
        if problem is None:
            try:
                return path, load(path), notes
            except CheckpointCorrupt as e:
                problem = str(e)
        notes.append(f"{path.name}: {problem}")
    if notes:
        raise CheckpointCorrupt(
            f"{Path(run_dir) / 'checkpoints'}: no intact checkpoint to resume from ({'; '.join(notes)}); "
            "start the run again without --resume, in a new folder"
        )
    return None, 0, notes


def read_or_corrupt(path: Path, reader: Callable[[], Any]) -> Any:
    """Run ``reader``; any failure to read the file (truncated, garbled) becomes :class:`CheckpointCorrupt`."""
    try:
        return reader()
    except CheckpointCorrupt:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors, zipfile and torch raise many types for a damaged file
        raise CheckpointCorrupt(f"{path.name} cannot be read ({type(e).__name__}: {str(e)[:160]})") from None


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's weights, refused when unreadable or non-finite."""
    file = Path(path) / WEIGHTS
    weights = read_or_corrupt(file, lambda: load_file(str(file)))
    try:
        assert_finite_tensors(weights, WEIGHTS)
    except NonFiniteError as e:
        raise CheckpointCorrupt(str(e)) from None
    return weights


def read_state(path: str | Path) -> dict[str, Any]:
    file = Path(path) / STATE
    state = read_or_corrupt(file, lambda: torch.load(file, map_location="cpu", weights_only=True))
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointCorrupt(f"{STATE} holds no step")
    return state


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, trainer state) of one folder, both read before anything is applied to a model."""
    return read_weights(path), read_state(path)


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
) -> int:
    """Load into the given objects and return the step the checkpoint was taken after.

    Damaged files raise :class:`CheckpointCorrupt` before any object is touched; a checkpoint of
    another model or optimizer (a changed config) raises a plain ``ValueError`` naming the mismatch.
    """
    path = Path(path)
    weights, state = read_checkpoint(path)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path / WEIGHTS} does not match the model (was the loss or model changed?): "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if optimizer is not None and "optimizer" not in state:
        raise ValueError(f"{path}: written under DeepSpeed (optimizer state in zero/); resume with the same deepspeed config")
    if optimizer is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise ValueError(f"{path / STATE}: the optimizer state does not match this model ({e})") from None
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
    weights = full_state_dict(engine.module)  # the same full state on every rank, so all ranks refuse together
    assert_finite_tensors(weights, f"checkpoint step {step}")
    dist.barrier()  # every rank's partition and RNG file is on disk before rank 0 hashes the folder
    if main:
        save_file(weights, str(tmp / WEIGHTS))
        state = {"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state(), "zero": True}
        torch.save(state, tmp / STATE)
        write_manifest(tmp)
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
    read_weights(path)  # the consolidated copy: refuses a non-finite checkpoint before the engine reads its own
    state = read_state(path)
    load_path, _ = engine.load_checkpoint(str(path), tag=ZERO_TAG, load_lr_scheduler_states=False)
    if load_path is None:
        raise CheckpointCorrupt(f"{ZERO_TAG}/: DeepSpeed could not load this checkpoint")
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
