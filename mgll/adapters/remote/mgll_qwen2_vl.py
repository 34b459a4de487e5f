"""Qwen2-VL with an MGLL ViT behind the merger contract (remote code of swapped ``qwen2_vl`` folders).

Qwen2-VL's own tower takes flattened patches plus ``image_grid_thw`` and uses 2-D rotary
positions, so any grid works; an MGLL ViT has learnt absolute positions for one grid and a class
token, so its weights cannot be written as a stock Qwen2-VL tower. :class:`MgllQwen2VisionTower`
keeps the *contract* instead of the class: it takes the processor's flattened patches and
``grid_thw``, rebuilds the images, runs the MGLL ViT (an exact ``CLIPVisionModel`` conversion)
and merges each 2x2 window of patch features into one LM-width token with a Qwen2-VL
``PatchMerger`` at the MGLL width.

Load a swapped folder with ``AutoModelForImageTextToText.from_pretrained(folder,
trust_remote_code=True)``. The stock ``Qwen2VLForConditionalGeneration`` class ignores
``auto_map`` and would build a random Qwen2-VL tower: do not load these folders with it.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import CLIPVisionConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_vl import modeling_qwen2_vl
from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger

from .mgll_clip_tower import ClipTower, ShapeMismatch, inherit_checkpoint_renames, init_swapped

__all__ = ["MgllQwen2VLConfig", "MgllQwen2VisionTower", "MgllQwen2VLForConditionalGeneration", "build_tower", "DEFAULT_SELECT_LAYER"]

DEFAULT_SELECT_LAYER = -1  # Qwen2-VL merges its last block's output; the merger brings its own LayerNorm


class MgllQwen2VLConfig(Qwen2VLConfig):
    """``Qwen2VLConfig`` under a model type of its own, so that only this code builds the model."""

    model_type = "mgll_qwen2_vl"


class MgllQwen2VisionTower(ClipTower):
    """Qwen2-VL's visual interface (``(patches, grid_thw) -> merged tokens``) over an MGLL ViT.

    ``vit`` is a ``CLIPVisionModel`` (the exact conversion of the MGLL ViT), ``merger`` a Qwen2-VL
    ``PatchMerger`` from the MGLL width to the LM width. Videos work too: the two frames of each
    temporal patch are averaged (identical for images) and every temporal slice is one ViT pass.
    """

    def __init__(self, vision_config, out_hidden_size: int, spatial_merge_size: int = 2,
                 temporal_patch_size: int = 2, select_layer: int = DEFAULT_SELECT_LAYER):
        super().__init__(vision_config)
        self.merger = PatchMerger(dim=out_hidden_size, context_dim=vision_config.hidden_size,
                                  spatial_merge_size=spatial_merge_size)
        self.spatial_merge_size = int(spatial_merge_size)
        self.temporal_patch_size = int(temporal_patch_size)
        self.select_layer = int(select_layer)
        self.channels = int(vision_config.num_channels)

    @property
    def device(self) -> torch.device:
        return self.vit.device

    def _frames(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Undo the processor's patch flattening: ``(N, C*T*P*P)`` -> ``(frames, C, H, W)``."""
        c, tp, p, m, g = self.channels, self.temporal_patch_size, self.patch_size, self.spatial_merge_size, self.grid
        width = c * tp * p * p
        if patches.ndim != 2 or patches.shape[1] != width:
            raise ShapeMismatch(
                f"patch mismatch: pixel_values rows are {patches.shape[-1]} wide but the MGLL tower takes "
                f"{width} ({c} channels x {tp} frames x {p}x{p} px patches); configure the processor with patch_size={p}"
            )
        for i, (_t, h, w) in enumerate(grid_thw.tolist()):
            if (h, w) != (g, g):
                raise ShapeMismatch(
                    f"grid mismatch: image {i} has a {h}x{w} patch grid but the MGLL tower takes {g}x{g} "
                    f"({self.image_size}px / {p}px patches); use the processor saved with the swapped model"
                )
        n = int(grid_thw.prod(-1).sum())
        if n != patches.shape[0]:
            raise ShapeMismatch(f"pixel_values has {patches.shape[0]} patches but grid_thw describes {n}")
        t_total = int(grid_thw[:, 0].sum())
        x = patches.view(t_total, g // m, g // m, m, m, c, tp, p, p)
        x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(t_total, tp, c, g * p, g * p)
        return x.mean(1)

    def forward(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs: Any):
        frames = self._frames(hidden_states, grid_thw).to(self.dtype)
        hs = self.vit(frames, output_hidden_states=True).hidden_states[self.select_layer][:, 1:]  # drop the class token
        f, g, m = hs.shape[0], self.grid, self.spatial_merge_size
        # raster order -> Qwen2-VL's window order (the m x m patches of one merged token are adjacent)
        hs = hs.reshape(f, g // m, m, g // m, m, -1).permute(0, 1, 3, 2, 4, 5).reshape(f * g * g, -1)
        return BaseModelOutputWithPooling(last_hidden_state=hs, pooler_output=self.merger(hs))


def build_tower(config, spec: dict) -> MgllQwen2VisionTower:
    vc = config.vision_config
    return MgllQwen2VisionTower(
        CLIPVisionConfig(**spec["clip_vision_config"]),
        out_hidden_size=int(config.text_config.hidden_size),
        spatial_merge_size=int(vc.spatial_merge_size),
        temporal_patch_size=int(vc.temporal_patch_size),
        select_layer=int(spec.get("select_layer", DEFAULT_SELECT_LAYER)),
    )


class MgllQwen2VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """``Qwen2VLForConditionalGeneration`` whose ``model.visual`` is built from ``config.mgll_tower`` (never the stock tower)."""

    config_class = MgllQwen2VLConfig

    def __init__(self, config):
        init_swapped(self, Qwen2VLForConditionalGeneration, config, modeling_qwen2_vl,
                     "Qwen2VisionTransformerPretrainedModel", "model.visual", build_tower)


MgllQwen2VLConfig.register_for_auto_class()
MgllQwen2VLForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
inherit_checkpoint_renames(MgllQwen2VLForConditionalGeneration, Qwen2VLForConditionalGeneration)
