"""Resume guard: a resumed run must be the run that was started, unless the user says otherwise.

``--resume`` with another loss, model, data set, batch size, length, schedule or loss weights
would continue the saved weights and optimizer under a different experiment, and the run folder
would then describe neither. So those keys are compared with the run's saved ``config.yaml``; a
difference is an error listing each key with both values. ``--allow-config-change`` accepts it and
appends what changed, at which step, to ``config_changes.jsonl`` in the run folder, so the record of
the run stays true. Keys that do not change what is learned (logging, checkpoint cadence, workers,
the output folder) may differ freely.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from mgll.io import atomic_write_text

__all__ = ["GUARDED_KEYS", "ConfigChangedError", "config_changes", "check_resume_config", "record_changes"]

GUARDED_KEYS = (
    "data.path",
    "data.split",
    "data.augment",
    "model.name",
    "model.pretrained",
    "loss.name",
    "loss.soft_clip",
    "loss.pointwise",
    "loss.smooth_kl",
    "train.batch_size",
    "train.steps",
    "train.lr",
    "train.weight_decay",
    "train.beta1",
    "train.beta2",
    "train.eps",
    "train.warmup_steps",
    "train.grad_clip",
    "train.seed",
)
CHANGES_FILE = "config_changes.jsonl"


class ConfigChangedError(ValueError):
    """``--resume`` with settings that differ from the run's saved config."""


def _get(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _normal_path(value: Any) -> Any:
    """Runs record data.path absolute; an older run's relative one is read from the working directory."""
    if not isinstance(value, str) or not value or "://" in value:
        return value
    return str(Path(value).expanduser().resolve())


def config_changes(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for every guarded key that differs."""
    out = []
    for key in GUARDED_KEYS:
        old, cur = _get(saved, key), _get(new, key)
        if key == "data.path":
            old, cur = _normal_path(old), _normal_path(cur)
        if isinstance(old, (int, float)) and isinstance(cur, (int, float)) and not isinstance(old, bool):
            same = float(old) == float(cur)
        else:
            same = old == cur
        if not same:
            out.append((key, old, cur))
    return out


def check_resume_config(run_dir: str | Path, new: Mapping[str, Any], allow: bool) -> list[tuple[str, Any, Any]]:
    """Compare ``new`` with ``run_dir/config.yaml``; raise unless ``allow``. Returns the changes."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return []
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigChangedError(f"{path}: unreadable ({type(e).__name__}); cannot check what --resume continues") from None
    changes = config_changes(saved, new)
    if changes and not allow:
        listed = "; ".join(f"{k}: {old!r} in the run, {cur!r} now" for k, old, cur in changes)
        raise ConfigChangedError(
            f"{path}: --resume with settings that change the run: {listed}. Resume with the saved settings, "
            "start a new run folder, or pass --allow-config-change to continue anyway (recorded in the run folder)"
        )
    return changes


def record_changes(run_dir: str | Path, step: int, changes: list[tuple[str, Any, Any]]) -> Path:
    """Append one JSON line: the step the changed settings take effect from, and each change."""
    path = Path(run_dir) / CHANGES_FILE
    row = {
        "resumed_at_step": step,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "changes": [{"key": k, "from": old, "to": cur} for k, old, cur in changes],
    }
    before = path.read_text(encoding="utf-8") if path.is_file() else ""
    return atomic_write_text(path, before + json.dumps(row) + "\n")
