"""The MGLL encoder's own preprocessing, as the image processors of the hosts it is swapped into.

An MGLL encoder was trained on open_clip's eval transform (its ``preprocess_cfg``: size, resize mode,
interpolation, mean, std); whatever processor feeds the swapped tower must reproduce it, or the tower
sees images it never saw in training. These helpers read that config and build the processors.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import get_model_preprocess_cfg
from torch import nn

__all__ = ["IMAGE_VIEWS", "RESAMPLE", "build_image_processor", "preprocess_cfg_of", "norm_kwargs", "view_spec", "mgll_image_processor"]

RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0}  # PIL resampling ids, as transformers image processors take them
IMAGE_VIEWS = ("crop", "pad")  # the encoder's own eval transform; LLaVA-1.5's pad-to-square with the mean colour first


def preprocess_cfg_of(model: nn.Module) -> dict[str, Any]:
    """The encoder's own preprocessing (size, mean, std, interpolation) as a plain dict."""
    cfg = get_model_preprocess_cfg(model)
    if hasattr(cfg, "__dataclass_fields__"):
        cfg = asdict(cfg)
    return dict(cfg)


def norm_kwargs(preprocess_cfg: dict[str, Any]) -> dict[str, Any]:
    """``resample``, ``image_mean``, ``image_std`` for a host's own image processor: the encoder's, else OpenAI CLIP's.

    Lenient where :func:`build_image_processor` is strict: an unknown interpolation falls back to bicubic.
    """
    return {
        "resample": RESAMPLE.get(preprocess_cfg.get("interpolation", "bicubic"), 3),
        "image_mean": list(preprocess_cfg.get("mean", OPENAI_DATASET_MEAN)),
        "image_std": list(preprocess_cfg.get("std", OPENAI_DATASET_STD)),
    }


def view_spec(preprocess_cfg: dict[str, Any], view: str = "crop") -> dict[str, Any]:
    """The ``mgll_view`` a swapped folder's image processor carries (:mod:`mgll.adapters.remote.mgll_image_processing`).

    ``crop`` is the encoder's own eval transform (the default: the pixels it was trained on);
    ``pad`` is LLaVA-1.5 / LLaVA-Med's convention, an explicit choice recorded in the folder.
    """
    if view not in IMAGE_VIEWS:
        raise ValueError(f"image view {view!r}: expected one of {', '.join(IMAGE_VIEWS)}")
    size = preprocess_cfg.get("size", 224)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h != w:
        raise ValueError(f"preprocess_cfg.size={size}: MGLL towers take square images")
    resize_mode = preprocess_cfg.get("resize_mode", "shortest")
    if resize_mode not in ("shortest", "squash"):
        raise ValueError(f"preprocess_cfg.resize_mode={resize_mode!r}: expected 'shortest' or 'squash'")
    interpolation = preprocess_cfg.get("interpolation", "bicubic")
    if interpolation not in RESAMPLE:
        raise ValueError(f"preprocess_cfg.interpolation={interpolation!r}: expected bicubic, bilinear or nearest")
    return {"size": int(h), "resize_mode": resize_mode, "interpolation": interpolation, "view": view}


def mgll_image_processor(class_name: str, preprocess_cfg: dict[str, Any], view: str = "crop", **kwargs: Any):
    """``class_name`` from the swapped folders' remote image-processing code, at the encoder's view and statistics."""
    from mgll.adapters.remote import mgll_image_processing

    return getattr(mgll_image_processing, class_name)(
        mgll_view=view_spec(preprocess_cfg, view), **{**norm_kwargs(preprocess_cfg), **kwargs}
    )


def build_image_processor(preprocess_cfg: dict[str, Any]):
    """A transformers ``CLIPImageProcessor`` that reproduces open_clip's eval transform for this encoder.

    open_clip's default eval transform resizes the shortest edge, centre-crops and normalises with
    the encoder's mean/std; LLaVA processors expect exactly that shape of config, so the swapped
    model normalises images the way the MGLL encoder was trained, not the way OpenAI CLIP was.
    """
    from transformers import CLIPImageProcessor

    size = preprocess_cfg.get("size", 224)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    resize_mode = preprocess_cfg.get("resize_mode", "shortest")
    if resize_mode not in ("shortest", "squash"):
        raise ValueError(f"preprocess_cfg.resize_mode={resize_mode!r}: expected 'shortest' or 'squash'")
    interpolation = preprocess_cfg.get("interpolation", "bicubic")
    resample = RESAMPLE.get(interpolation)
    if resample is None:
        raise ValueError(f"preprocess_cfg.interpolation={interpolation!r}: expected bicubic, bilinear or nearest")
    kw: dict[str, Any] = {}
    if resize_mode == "squash":
        kw["size"] = {"height": h, "width": w}
    else:
        kw["size"] = {"shortest_edge": min(h, w)}
    return CLIPImageProcessor(
        do_resize=True,
        resample=resample,
        do_center_crop=True,
        crop_size={"height": h, "width": w},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(preprocess_cfg.get("mean", OPENAI_DATASET_MEAN)),
        image_std=list(preprocess_cfg.get("std", OPENAI_DATASET_STD)),
        do_convert_rgb=True,
        **kw,
    )
