"""Swap an MGLL encoder into an MLLM checkpoint and save a model that loads with one call.

The output folder is the host's own transformers checkpoint (``save_pretrained``) plus its
processor and ``mgll_swap.json`` (host, encoder, tower spec, projector init), so
``LlavaForConditionalGeneration.from_pretrained(out)`` works without mgll; :func:`load_swapped`
adds the shape checks. Hosts whose vision class cannot hold an MGLL ViT (``qwen2_vl``,
``instructblip``) save their class's thin subclass, which rebuilds the tower from the
``mgll_tower`` entry of ``config.json``; :func:`load_swapped` loads those in the same one call.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mgll.adapters.hosts import ShapeMismatch, get_host
from mgll.adapters.source_check import check_source
from mgll.io import atomic_path, atomic_write_json, check_out_free
from mgll.model_card import swap_card, write_card

__all__ = ["SWAP_SPEC", "check_out_free", "load_processor", "swap", "swap_model", "load_swapped", "save_projector", "load_projector", "read_swap_spec"]

SWAP_SPEC = "mgll_swap.json"


def swap_model(host: str, model: nn.Module, encoder: nn.Module, projector_init: str = "default") -> nn.Module:
    """In-memory swap: ``model`` (the host's transformers class) gets ``encoder``'s ViT as its tower."""
    return get_host(host).replace_tower(model, encoder, projector_init=projector_init)


def _load_mllm(host, mllm: str | os.PathLike, dtype: torch.dtype | None):
    if hasattr(host, "load_source"):  # MLLMs that are not transformers folders (OpenFlamingo)
        if not Path(mllm).expanduser().is_dir():
            raise FileNotFoundError(f"--mllm {mllm}: no such folder")
        return host.load_source(mllm, dtype)
    check_source(host, mllm)  # before any weight is read: a wrong host would load as random weights
    kw: dict[str, Any] = {}
    if dtype is not None:
        kw["dtype"] = dtype
    model = host.source_class().from_pretrained(str(mllm), **kw)
    host.check_parts(model, str(mllm))
    processor = tokenizer = None
    from transformers import AutoProcessor, AutoTokenizer

    try:
        processor = AutoProcessor.from_pretrained(str(mllm))
        if not hasattr(processor, "tokenizer"):  # a folder with only a tokenizer yields the tokenizer
            tokenizer, processor = processor, None
    except (OSError, ValueError, TypeError, KeyError):
        tokenizer = AutoTokenizer.from_pretrained(str(mllm))
    return model, processor, tokenizer


def swap(
    host: str,
    mllm: str | os.PathLike,
    encoder: str | os.PathLike,
    out: str | os.PathLike,
    projector_init: str = "default",
    projector_weights: str | os.PathLike | None = None,
    pretrained: str | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    overwrite: bool = False,
    image_view: str = "crop",
) -> Path:
    """Load ``mllm``, put ``encoder``'s ViT in as its tower, re-initialise the projector, save to ``out``.

    An existing ``out`` (a file or a non-empty folder) is an error unless ``overwrite``; then it is
    replaced atomically once the new folder is complete. ``image_view`` (``crop``: the encoder's own
    eval transform; ``pad``: LLaVA-1.5's pad-to-square first) is recorded in ``mgll_swap.json`` and
    in the saved processor, which every later step (align, generate, mcq, demo) loads.
    """
    from mgll.encoder.factory import create_encoder

    check_out_free(out, overwrite)
    h = get_host(host)
    if projector_weights is not None:
        check_projector_file(projector_weights, host)
    enc, _, _, _, enc_name = create_encoder(str(encoder), pretrained=pretrained)
    enc.eval()
    model, processor, tokenizer = _load_mllm(h, mllm, dtype)
    torch.manual_seed(seed)
    h.replace_tower(model, enc, projector_init=projector_init)
    if projector_weights is not None:
        load_projector(model, host, projector_weights)
    new_processor = h.make_processor(model, processor, tokenizer, enc, view=image_view)
    spec = {
        "host": host,
        "model_class": h.model_class_name,
        "source_mllm": str(mllm),
        "encoder": str(encoder),
        "encoder_model_name": enc_name,
        "projector_init": projector_init,
        "projector_weights": str(projector_weights) if projector_weights else None,
        "image_view": image_view,
        "source_image_view": h.source_view(processor),
        "tower": h.tower_spec(model),
    }
    out = Path(out)
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        new_processor.save_pretrained(tmp)
        atomic_write_json(tmp / SWAP_SPEC, spec)
        write_card(tmp, swap_card(tmp, spec))
    return out


def read_swap_spec(path: str | os.PathLike) -> dict[str, Any]:
    spec_path = Path(path) / SWAP_SPEC
    if not spec_path.is_file():
        raise FileNotFoundError(f"{spec_path}: missing; {path} is not a folder written by `mgll swap`")
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    for key in ("host", "tower"):
        if key not in spec:
            raise ValueError(f"{spec_path}: field {key!r} missing")
    return spec


def load_swapped(path: str | os.PathLike, with_processor: bool = True, **from_pretrained_kwargs: Any):
    """``(model, processor)`` from a swap folder; raises ShapeMismatch if the tower and LM disagree."""
    spec = read_swap_spec(path)
    h = get_host(spec["host"])
    model = h.model_class().from_pretrained(str(path), **from_pretrained_kwargs)
    h.check_fit(model)
    saved = spec["tower"]
    now = h.tower_spec(model)
    for key in ("hidden_size", "num_image_tokens"):
        if saved.get(key) != now.get(key):
            raise ShapeMismatch(f"{Path(path) / SWAP_SPEC}: tower.{key}={saved.get(key)} but the model config gives {now.get(key)}")
    return model, load_processor(path) if with_processor else None


def load_processor(path: str | os.PathLike):
    """The swapped folder's processor. mgll wrote the folder, so its remote image-processing code
    (the encoder's view, :mod:`mgll.adapters.remote.mgll_image_processing`) is trusted here; a
    process without mgll passes ``trust_remote_code=True`` itself."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(path), trust_remote_code=True)


def save_projector(model: nn.Module, host: str, path: str | os.PathLike) -> Path:
    """The projector alone (safetensors, atomically) with the widths it was trained for in the metadata."""
    h = get_host(host)
    state = {k: v.detach().to("cpu").contiguous() for k, v in h.projector(model).state_dict().items()}
    spec = h.tower_spec(model)
    meta = {"host": host, "in_features": str(spec["projector_in_features"]), "num_image_tokens": str(spec["num_image_tokens"])}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return Path(path)


def _check_projector_host(meta: dict[str, str], host: str, path: str | os.PathLike) -> None:
    if meta.get("host") and meta["host"] != host:
        raise ShapeMismatch(f"host mismatch: {path} is a projector trained for host {meta['host']!r} but this model is host {host!r}")


def check_projector_file(path: str | os.PathLike, host: str) -> None:
    """Before any model is loaded: the file exists and was not written for another host (its metadata)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--projector {path}: no such file")
    with safe_open(str(path), framework="pt") as f:
        _check_projector_host(f.metadata() or {}, host, path)


def load_projector(model: nn.Module, host: str, path: str | os.PathLike) -> None:
    h = get_host(host)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    _check_projector_host(meta, host, path)
    want = h.tower_spec(model)["projector_in_features"]
    got = int(meta["in_features"]) if "in_features" in meta else None
    if got is not None and got != want:
        raise ShapeMismatch(
            f"width mismatch: {path} is a projector for {got}-wide vision features but this tower gives {want}"
        )
    proj = h.projector(model)
    ref = proj.state_dict()
    if set(state) != set(ref):
        missing, extra = sorted(set(ref) - set(state)), sorted(set(state) - set(ref))
        raise ShapeMismatch(
            f"{path}: not a {host} projector for this model (missing {', '.join(missing[:4]) or 'none'}; "
            f"unexpected {', '.join(extra[:4]) or 'none'})"
        )
    for k, v in state.items():
        if k in ref and ref[k].shape != v.shape:
            raise ShapeMismatch(f"{path}: {k} has shape {tuple(v.shape)} but the model's projector has {tuple(ref[k].shape)}")
    proj.load_state_dict({k: v.to(ref[k].dtype) for k, v in state.items() if k in ref}, strict=True)
