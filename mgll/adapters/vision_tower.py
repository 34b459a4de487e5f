"""An MGLL / open_clip ViT as a LLaVA-style vision tower: per-patch hidden states of one chosen layer.

LLaVA does not use the pooled CLIP embedding; it feeds the projector the hidden states of the
penultimate block (``select_layer=-2``), without the class token (``select_feature="patch"``),
before the final LayerNorm. Layer indices follow transformers' ``output_hidden_states`` list:
index 0 is the embedding output (after ``ln_pre``), index ``i`` the output of block ``i``, so
``select_layer=-2`` here is ``hidden_states[-2]`` of the exported ``CLIPVisionModel``.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import get_model_preprocess_cfg
from open_clip.transformer import VisionTransformer
from torch import nn

__all__ = ["OpenClipVisionTower", "SELECT_FEATURES", "IMAGE_VIEWS", "build_image_processor", "preprocess_cfg_of", "norm_kwargs",
           "view_spec", "mgll_image_processor"]

SELECT_FEATURES = ("patch", "cls_patch")
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


def _visual_of(model: nn.Module) -> VisionTransformer:
    visual = getattr(model, "visual", model)
    if not isinstance(visual, VisionTransformer):
        raise TypeError(
            f"vision tower must be an open_clip VisionTransformer (ViT); got {type(visual).__name__} "
            "(timm / ModifiedResNet towers have no per-layer token grid to select from)"
        )
    if visual.attn_pool is not None:
        raise TypeError("open_clip ViTs with attentional pooling (CoCa) are not supported as LLaVA towers")
    return visual


class OpenClipVisionTower(nn.Module):
    """Hidden states ``(B, N, D)`` of one layer of an open_clip ViT, the contract LLaVA's projector expects."""

    def __init__(
        self,
        model: nn.Module,
        preprocess_cfg: dict[str, Any] | None = None,
        select_layer: int = -2,
        select_feature: str = "patch",
        name: str | None = None,
    ):
        super().__init__()
        self.visual = _visual_of(model)
        self.preprocess_cfg = dict(preprocess_cfg) if preprocess_cfg is not None else preprocess_cfg_of(model)
        self.name = name
        n = self.num_layers + 1
        if not -n <= int(select_layer) < n:
            raise ValueError(
                f"select_layer={select_layer} out of range for a {self.num_layers}-block ViT "
                f"(hidden-state indices {-n}..{n - 1}; -2 is the penultimate block as in LLaVA)"
            )
        if select_feature not in SELECT_FEATURES:
            raise ValueError(f"select_feature={select_feature!r}: expected one of {', '.join(SELECT_FEATURES)}")
        self.select_layer = int(select_layer)
        self.select_feature = select_feature
        self._image_processor = None

    @classmethod
    def from_encoder(
        cls,
        run_or_name: str | os.PathLike,
        pretrained: str | None = None,
        select_layer: int = -2,
        select_feature: str = "patch",
        **model_kwargs: Any,
    ) -> OpenClipVisionTower:
        """Build from a run folder, saved encoder or open_clip name; the text tower is dropped."""
        from mgll.encoder.factory import create_encoder

        model, _, _, _, name = create_encoder(str(run_or_name), pretrained=pretrained, **model_kwargs)
        cfg = preprocess_cfg_of(model)
        return cls(model.visual, cfg, select_layer=select_layer, select_feature=select_feature, name=name)

    # -- shape facts the hosts need -------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self.visual.transformer.width)

    @property
    def num_layers(self) -> int:
        return len(self.visual.transformer.resblocks)

    @property
    def image_size(self) -> int:
        h, w = self.visual.image_size
        if h != w:
            raise ValueError(f"non-square image size {h}x{w}: LLaVA-family hosts expect square inputs")
        return int(h)

    @property
    def patch_size(self) -> int:
        ph, pw = self.visual.patch_size
        if ph != pw:
            raise ValueError(f"non-square patch {ph}x{pw}")
        return int(ph)

    @property
    def grid(self) -> int:
        """Patches per side."""
        gh, gw = self.visual.grid_size
        if gh != gw:
            raise ValueError(f"non-square patch grid {gh}x{gw}")
        return int(gh)

    @property
    def num_prefix_tokens(self) -> int:
        return 1  # open_clip ViTs always prepend one class token

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_tokens(self) -> int:
        """Tokens per image that ``forward`` returns for the current ``select_feature``."""
        return self.num_patches + (self.num_prefix_tokens if self.select_feature == "cls_patch" else 0)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    @property
    def image_processor(self):
        if self._image_processor is None:
            self._image_processor = build_image_processor(self.preprocess_cfg)
        return self._image_processor

    # -- training state ------------------------------------------------------------------------
    def freeze(self) -> OpenClipVisionTower:
        self.visual.requires_grad_(False)
        return self

    def unfreeze(self) -> OpenClipVisionTower:
        self.visual.requires_grad_(True)
        return self

    @property
    def is_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.visual.parameters())

    # -- forward -------------------------------------------------------------------------------
    def hidden_state(self, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
        """Hidden states ``(B, 1 + grid**2, D)`` at hidden-state index ``layer`` (0 = embeddings)."""
        n = self.num_layers + 1
        j = layer % n
        x = pixel_values.to(self.dtype)
        if j == 0:
            return self.visual._embeds(x)
        out = self.visual.forward_intermediates(
            x,
            indices=[j - 1],
            stop_early=True,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        return torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values: expected (B, 3, H, W), got {tuple(pixel_values.shape)}")
        hs = self.hidden_state(pixel_values, self.select_layer)
        if self.select_feature == "patch":
            hs = hs[:, self.num_prefix_tokens :]
        return hs

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, hidden_size={self.hidden_size}, image_size={self.image_size}, "
            f"patch_size={self.patch_size}, select_layer={self.select_layer}, select_feature={self.select_feature!r}"
        )
