"""LLaVA-NeXT (LLaVA-1.6) on transformers' ``LlavaNextForConditionalGeneration``: anyres tiles through the MGLL tower.

LLaVA-NeXT cuts an image into tiles of the tower's image size laid out on one of the
``image_grid_pinpoints`` resolutions, plus a base tile of the whole image; the tower runs on
every tile as one batch, the projector maps each tile's patch features, and the tiles are
stitched back into one feature map, unpadded to the image's aspect ratio, with the learnt
``image_newline`` embedding after each row. The MGLL ViT goes in as a plain ``CLIPVisionModel``
(the same exact conversion as the ``llava`` host), so the saved model is a stock LLaVA-NeXT
checkpoint; what changes is the tile size: each pinpoint is rescaled from the old tower's
image size to the MGLL image size (``[[336, 672], ...]`` -> ``[[224, 448], ...]`` for a
224-px MGLL ViT), so the tile layouts stay the same. ``image_newline`` lives in the LM's
embedding space, not the tower's, so it is kept (and stays frozen in stage 1, as in LLaVA).

The image-token count depends on the image's size: ``grid**2`` for the base tile plus the
unpadded tile grid and one newline per row (:meth:`LlavaNextHost.image_tokens`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mgll.adapters.hosts.base import ShapeMismatch
from mgll.adapters.hosts.llava import LlavaHost
from mgll.adapters.hosts.registry import register_host

__all__ = ["LlavaNextHost", "rescale_pinpoints", "anyres_token_count"]


def rescale_pinpoints(pinpoints: list, old_size: int, new_size: int) -> list[list[int]]:
    """The same tile layouts at a new tile size; a pinpoint that is not a whole number of tiles is refused."""
    out = []
    for hw in pinpoints:
        h, w = int(hw[0]), int(hw[1])
        if h % old_size or w % old_size:
            raise ShapeMismatch(
                f"grid mismatch: image_grid_pinpoints entry [{h}, {w}] is not a whole number of "
                f"{old_size}px tiles (the MLLM's tower image size)"
            )
        out.append([h // old_size * new_size, w // old_size * new_size])
    return out


def anyres_token_count(height: int, width: int, pinpoints: list, tile: int, grid: int, newline: bool = True) -> int:
    """Image tokens LLaVA-NeXT builds for one ``height x width`` image (``default`` strategy: no class token).

    Mirrors the model's packing: the best pinpoint resolution gives ``rows x cols`` tiles of
    ``grid x grid`` features; that map is unpadded back to the image's aspect ratio, gets one
    newline per row, and follows the base tile's ``grid**2`` features.
    """
    from transformers.image_processing_utils import select_best_resolution

    best_h, best_w = select_best_resolution((height, width), [list(p) for p in pinpoints])
    cur_h, cur_w = best_h // tile * grid, best_w // tile * grid
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        cur_h -= 2 * ((cur_h - new_h) // 2)
    else:
        new_w = int(round(width * (cur_h / height), 7))
        cur_w -= 2 * ((cur_w - new_w) // 2)
    return grid * grid + cur_h * cur_w + (cur_h if newline else 0)


@register_host("llava_next")
class LlavaNextHost(LlavaHost):
    model_class_name = "LlavaNextForConditionalGeneration"
    tower_path = "model.vision_tower"
    projector_path = "model.multi_modal_projector"
    language_model_path = "model.language_model"
    lm_head_path = "lm_head"

    # -- token grid ----------------------------------------------------------------------------
    def image_tokens(self, model: nn.Module, height: int, width: int) -> int:
        """Tokens the LM gets for one ``height x width`` image (before the processor's resize)."""
        vc = model.config.vision_config
        n = anyres_token_count(int(height), int(width), model.config.image_grid_pinpoints, int(vc.image_size), self.tower_grid(model))
        return n + (1 if model.config.vision_feature_select_strategy == "full" else 0)

    def num_image_tokens(self, model: nn.Module) -> int:
        """Tokens for a square image of the tower's own size (the reference count in ``mgll_swap.json``)."""
        s = int(model.config.vision_config.image_size)
        return self.image_tokens(model, s, s)

    def check_fit(self, model: nn.Module) -> None:
        self._check_width(model)
        newline, lm = int(model.model.image_newline.shape[0]), int(model.config.text_config.hidden_size)
        if newline != lm:
            raise ShapeMismatch(f"width mismatch: image_newline is {newline}-wide but the LM takes {lm}")
        size = int(model.config.vision_config.image_size)
        rescale_pinpoints(model.config.image_grid_pinpoints, size, size)  # each pinpoint a whole number of tiles
        self._check_layers(model)

    def tower_spec(self, model: nn.Module) -> dict[str, Any]:
        spec = super().tower_spec(model)
        spec["image_grid_pinpoints"] = [list(p) for p in model.config.image_grid_pinpoints]
        spec["tokens_per_tile"] = self.tower_grid(model) ** 2
        return spec

    # -- swap ----------------------------------------------------------------------------------
    def _projector_class(self) -> type[nn.Module]:
        from transformers.models.llava_next.modeling_llava_next import LlavaNextMultiModalProjector

        return LlavaNextMultiModalProjector

    def put_tower(self, model: nn.Module, hf_vit: nn.Module, select_layer: int, projector_init: str, ref: torch.Tensor) -> None:
        """LLaVA's tower and projector, anyres pinpoints rescaled to the MGLL tile size; ``image_newline`` kept."""
        new_size = int(hf_vit.config.image_size)
        pinpoints = rescale_pinpoints(model.config.image_grid_pinpoints, int(model.config.vision_config.image_size), new_size)
        super().put_tower(model, hf_vit, select_layer, projector_init, ref)
        model.config.image_grid_pinpoints = pinpoints
        model.model.config.image_grid_pinpoints = pinpoints

    def after_swap(self, model: nn.Module) -> None:
        """The token count varies per image (anyres): no single ``image_seq_length`` to set."""

    def _processor_class(self) -> type:
        from transformers import LlavaNextProcessor

        return LlavaNextProcessor

    def _image_processor(self, model: nn.Module, encoder: nn.Module, view: str) -> Any:
        """anyres tiles as LLaVA-NeXT makes them, at the MGLL image size; the base view is the encoder's (not a squash)."""
        from mgll.adapters.preprocess import mgll_image_processor, preprocess_cfg_of

        s = int(model.config.vision_config.image_size)
        return mgll_image_processor(
            "MgllLlavaNextImageProcessor", preprocess_cfg_of(encoder), view,
            size={"shortest_edge": s},
            crop_size={"height": s, "width": s},
            image_grid_pinpoints=[list(p) for p in model.config.image_grid_pinpoints],
        )
