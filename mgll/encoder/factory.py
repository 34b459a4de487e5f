"""Create, save and load encoders through open_clip, so a saved MGLL encoder is an open_clip model.

A saved encoder is a folder in open_clip's ``local-dir:`` layout (``open_clip_config.json`` with
``model_cfg`` and ``preprocess_cfg``, weights in ``open_clip_model.safetensors``), so users load it
with plain ``open_clip.create_model_and_transforms("local-dir:PATH")`` as well as with
:func:`create_encoder`. ``mgll_config.json`` beside it records what produced it (model name,
loss, levels).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import get_model_preprocess_cfg
from safetensors.torch import save_file

from mgll.encoder.finite import assert_finite_tensors
from mgll.io import atomic_path, atomic_write_json

__all__ = [
    "MODEL_CONFIG_DIR",
    "list_encoders",
    "create_encoder",
    "save_encoder",
    "resolve_encoder_dir",
    "ENCODER_WEIGHTS",
    "ENCODER_CONFIG",
]

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
ENCODER_WEIGHTS = "open_clip_model.safetensors"
ENCODER_CONFIG = "open_clip_config.json"
MGLL_CONFIG = "mgll_config.json"
_registered = False


def _register_configs() -> None:
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def list_encoders() -> list[str]:
    """Every architecture name create_encoder accepts (open_clip's plus mgll's tiny configs)."""
    _register_configs()
    return open_clip.list_models()


def resolve_encoder_dir(path: str | os.PathLike) -> Path | None:
    """The encoder folder inside ``path`` (a run folder or the encoder folder itself), or None."""
    p = Path(path)
    for candidate in (p, p / "encoder"):
        if (candidate / ENCODER_CONFIG).is_file():
            return candidate
    return None


def create_encoder(
    name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    **model_kwargs: Any,
):
    """Return ``(model, preprocess_train, preprocess_val, tokenizer, model_name)``.

    ``name`` is an open_clip architecture (``ViT-B-16``), an mgll config (``mgll-tiny-vit``),
    ``hf-hub:org/repo``, ``local-dir:PATH``, or a path to a saved encoder / run folder.
    ``pretrained`` is an open_clip tag (``openai``, ``laion2b_s34b_b79k``) or a local
    checkpoint file (``.safetensors``, ``.pt``), loaded with ``weights_only=True``.
    """
    _register_configs()
    local = None if name.startswith(("hf-hub:", "local-dir:")) else resolve_encoder_dir(name)
    if local is None and not name.startswith(("hf-hub:", "local-dir:")) and (os.sep in name or Path(name).exists()):
        raise FileNotFoundError(f"{name}: no {ENCODER_CONFIG} here or in {name}/encoder; expected a saved encoder folder")
    if local is not None:
        name = f"local-dir:{local}"
        pretrained = None
    elif name not in open_clip.list_models() and not name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"unknown encoder {name!r}; known: {', '.join(list_encoders())}")
    if pretrained and not Path(pretrained).is_file():
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise ValueError(
                f"pretrained={pretrained!r} is neither an existing file nor a tag of {name}; "
                f"tags: {', '.join(tags) or 'none'}"
            )
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, device=device, precision=precision, **model_kwargs
    )
    tokenizer = open_clip.get_tokenizer(name)
    return model, preprocess_train, preprocess_val, tokenizer, name


def save_encoder(
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    model_name: str,
    extra: dict[str, Any] | None = None,
    card: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``model`` as an open_clip local-dir folder, atomically (temp folder, then rename).

    ``card(folder)``, if given, writes the model card into the temporary folder, so the encoder
    and its README.md appear together (mgll.model_card).
    """
    out = Path(out_dir)
    model_cfg = dict(_model_cfg_for(model_name))
    if getattr(model, "logit_bias", None) is not None:
        # open_clip creates the bias parameter only when the config asks for one (SigLIP)
        model_cfg["init_logit_bias"] = float(model.logit_bias.detach().reshape(-1)[0])
    preprocess_cfg = get_model_preprocess_cfg(model)
    if hasattr(preprocess_cfg, "__dataclass_fields__"):
        preprocess_cfg = asdict(preprocess_cfg)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    assert_finite_tensors(state, f"encoder {out}")
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        save_file(state, str(tmp / ENCODER_WEIGHTS))
        atomic_write_json(tmp / ENCODER_CONFIG, {"model_cfg": model_cfg, "preprocess_cfg": dict(preprocess_cfg)})
        atomic_write_json(tmp / MGLL_CONFIG, {"model_name": model_name, **(extra or {})})
        if card is not None:
            card(tmp)
    return out


def _model_cfg_for(model_name: str) -> dict[str, Any]:
    _register_configs()
    if model_name.startswith("local-dir:"):
        with open(Path(model_name[len("local-dir:"):]) / ENCODER_CONFIG, encoding="utf-8") as f:
            return json.load(f)["model_cfg"]
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"no model config for {model_name!r}")
    return cfg
