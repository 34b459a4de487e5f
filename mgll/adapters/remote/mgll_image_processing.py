"""Image processors that give an MGLL tower the pixels its encoder was trained on (remote code of swapped folders).

An MGLL encoder was trained and evaluated with open_clip's eval transform: resize the shortest
edge to the tower's size and centre-crop (or squash, if its ``preprocess_cfg`` says so), with
its interpolation, mean and std. Most hosts' own processors do something else with a
non-square image: BLIP and InternVL squash it, Janus pads it to a square, LLaVA-NeXT squashes
its base view, Qwen2-VL keeps its aspect and so changes the patch grid. The tower then sees
images it was never trained on, and the gain the swap exists for quietly goes away.

Each class here is the host's stock image processor with one step replaced: the *view* of the
whole image (the only view for single-view hosts, the base view of LLaVA-NeXT, the thumbnail or
single tile of InternVL) is made by :func:`mgll_view`, which reproduces open_clip's eval
transform on the processor's uint8 tensors (torchvision's resize and its round-half-even centre
crop, as open_clip's ``Resize`` + ``CenterCrop``; within one 8-bit level of it). Tiles of a
multi-tile host keep the host's tiling and get the encoder's interpolation and normalisation.

``mgll_view`` (saved in the processor config) holds ``size``, ``resize_mode`` (``shortest`` or
``squash``), ``interpolation`` and ``view``: ``crop`` (the encoder's transform, the default) or
``pad`` (LLaVA-1.5 / LLaVA-Med's convention: pad to a square with the mean colour first), an
explicit choice recorded in the folder so that alignment, generation, the MCQ harness and the
demo all use the same one. This file imports only torch, torchvision and transformers.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as tvF
from transformers import (
    BlipImageProcessor,
    CLIPImageProcessor,
    GotOcr2ImageProcessor,
    JanusImageProcessor,
    LlavaNextImageProcessor,
    Qwen2VLImageProcessor,
)

__all__ = [
    "VIEWS",
    "mgll_view",
    "MgllCLIPImageProcessor",
    "MgllBlipImageProcessor",
    "MgllJanusImageProcessor",
    "MgllQwen2VLImageProcessor",
    "MgllLlavaNextImageProcessor",
    "MgllGotOcr2ImageProcessor",
]

VIEWS = ("crop", "pad")
_INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                  "nearest": InterpolationMode.NEAREST}


def mgll_view(image: torch.Tensor, spec: dict[str, Any], image_mean) -> torch.Tensor:
    """``(..., C, H, W)`` uint8 -> ``(..., C, S, S)``: open_clip's eval transform, before rescale and normalise."""
    size = int(spec["size"])
    mode = _INTERPOLATION[spec.get("interpolation", "bicubic")]
    if spec.get("view", "crop") == "pad":
        h, w = image.shape[-2:]
        side = max(h, w)
        fill = [int(round(float(m) * 255)) for m in image_mean]
        left, top = (side - w) // 2, (side - h) // 2
        image = tvF.pad(image, [left, top, side - w - left, side - h - top], fill=fill)
    if spec.get("resize_mode", "shortest") == "squash":
        return tvF.resize(image, [size, size], interpolation=mode, antialias=True)
    image = tvF.resize(image, size, interpolation=mode, antialias=True)  # shortest edge -> size, as torchvision's Resize(int)
    return tvF.center_crop(image, [size, size])


class _ViewMixin:
    """Keeps ``mgll_view`` through ``save_pretrained`` / ``from_pretrained`` and makes the view of a whole image."""

    def __init__(self, *args: Any, mgll_view: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not mgll_view or int(mgll_view.get("size", 0)) <= 0:
            raise ValueError(f"{type(self).__name__}: mgll_view with a positive 'size' is required (written by `mgll swap`)")
        if mgll_view.get("view", "crop") not in VIEWS:
            raise ValueError(f"mgll_view.view={mgll_view.get('view')!r}: expected one of {', '.join(VIEWS)}")
        if mgll_view.get("resize_mode", "shortest") not in ("shortest", "squash"):
            raise ValueError(f"mgll_view.resize_mode={mgll_view.get('resize_mode')!r}: expected 'shortest' or 'squash'")
        self.mgll_view = dict(mgll_view)

    def _view(self, image: torch.Tensor) -> torch.Tensor:
        return mgll_view(image, self.mgll_view, self.image_mean)


class _SingleViewMixin(_ViewMixin):
    """Hosts that show the tower one view per image: every image becomes its view before the stock steps."""

    def _preprocess(self, images: list[torch.Tensor], *args: Any, **kwargs: Any):
        return super()._preprocess([self._view(im) for im in images], *args, **kwargs)


class MgllCLIPImageProcessor(_SingleViewMixin, CLIPImageProcessor):
    """LLaVA / LLaVA-1.5 / LLaVA-Med: needed only for ``view="pad"`` (the stock CLIP processor already crops)."""


class MgllBlipImageProcessor(_SingleViewMixin, BlipImageProcessor):
    """InstructBLIP: the stock processor squashes every image to the square."""


class MgllJanusImageProcessor(_SingleViewMixin, JanusImageProcessor):
    """Janus: the stock processor pads every image to a square with its background colour."""


class MgllQwen2VLImageProcessor(_SingleViewMixin, Qwen2VLImageProcessor):
    """Qwen2-VL: the stock processor keeps the aspect ratio, which changes the patch grid the MGLL tower cannot take."""


class MgllLlavaNextImageProcessor(_ViewMixin, LlavaNextImageProcessor):
    """LLaVA-NeXT: anyres tiles as the stock processor makes them; the base view is the encoder's, not a squash."""

    def _get_image_patches(self, image: torch.Tensor, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        patches = super()._get_image_patches(image, *args, **kwargs)
        return [self._view(image), *patches[1:]]


class MgllGotOcr2ImageProcessor(_ViewMixin, GotOcr2ImageProcessor):
    """InternVL: dynamic tiles as the stock processor makes them; the thumbnail (or the single tile) is the encoder's view.

    Without tiling (``crop_to_patches=False``) the stock processor squashes the whole image: it becomes the view.
    """

    def _preprocess(self, images: list[torch.Tensor], *args: Any, **kwargs: Any):
        if not kwargs.get("crop_to_patches", False):
            images = [self._view(im) for im in images]
        return super()._preprocess(images, *args, **kwargs)

    def crop_image_to_patches(self, images: torch.Tensor, min_patches: int, max_patches: int, use_thumbnail: bool = True,
                              **kwargs: Any) -> torch.Tensor:
        tiles = super().crop_image_to_patches(images, min_patches, max_patches, use_thumbnail, **kwargs)
        if tiles.shape[1] > 1 and not use_thumbnail:
            return tiles  # tiles only: no whole-image view to replace
        view = self._view(images)  # (B, n, C, S, S): the thumbnail is last when n > 1, else the one tile
        if view.shape[-2:] != tiles.shape[-2:]:
            raise ValueError(f"mgll_view.size={self.mgll_view['size']} but the tiles are {tuple(tiles.shape[-2:])}")
        tiles = tiles.clone()
        tiles[:, -1] = view
        return tiles


for _cls in (MgllCLIPImageProcessor, MgllBlipImageProcessor, MgllJanusImageProcessor, MgllQwen2VLImageProcessor,
             MgllLlavaNextImageProcessor, MgllGotOcr2ImageProcessor):
    _cls.register_for_auto_class("AutoImageProcessor")
