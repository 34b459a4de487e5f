"""Janus / Janus-Pro with an MGLL ViT on the understanding path (remote code of swapped ``janus`` folders).

SigLIP has no class token and no ``ln_pre``, so the MGLL ViT cannot be written as
``JanusVisionModel``; it goes in as a ``CLIPVisionModel`` (the exact conversion) inside
:class:`MgllJanusVisionTower`. Janus takes SigLIP's last block after its final LayerNorm, so the
tower hands the aligner the MGLL ViT's last block after ``ln_post``, class token dropped: the
``tokens`` open_clip's own forward returns. The image-generation path (VQ-VAE and its heads) is
the stock one.

Load a swapped folder with ``AutoModelForImageTextToText.from_pretrained(folder,
trust_remote_code=True)``; the stock ``JanusForConditionalGeneration`` cannot hold this tower.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import CLIPVisionConfig, JanusConfig, JanusForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.janus import modeling_janus

from .mgll_clip_tower import ClipTower, inherit_checkpoint_renames, init_swapped

__all__ = ["MgllJanusConfig", "MgllJanusVisionTower", "MgllJanusForConditionalGeneration", "build_tower", "DEFAULT_SELECT_LAYER"]

DEFAULT_SELECT_LAYER = -1


class MgllJanusConfig(JanusConfig):
    """``JanusConfig`` under a model type of its own, so that only this code builds the model."""

    model_type = "mgll_janus"


class MgllJanusVisionTower(ClipTower):
    """Janus' ``vision_model`` interface over an MGLL ViT: ``pixel_values -> last_hidden_state (B, grid**2, D)``.

    ``config`` is the host's ``JanusVisionConfig``: the image-generation loop reads
    ``vision_model.config.num_image_tokens`` from it.
    """

    def __init__(self, clip_config, janus_vision_config, select_layer: int = DEFAULT_SELECT_LAYER, post_norm: bool = True):
        super().__init__(clip_config)
        self.config = janus_vision_config
        self.select_layer = int(select_layer)
        self.post_norm = bool(post_norm)

    def forward(self, pixel_values: torch.Tensor, return_dict: bool = True, **kwargs: Any):
        self.check_pixels(pixel_values)
        hs = self.vit(pixel_values.to(self.dtype), output_hidden_states=True).hidden_states[self.select_layer]
        if self.post_norm:
            hs = self.vit.post_layernorm(hs)
        return BaseModelOutputWithPooling(last_hidden_state=hs[:, 1:], pooler_output=hs[:, 0])


def build_tower(config, spec: dict) -> MgllJanusVisionTower:
    return MgllJanusVisionTower(
        CLIPVisionConfig(**spec["clip_vision_config"]),
        config.vision_config,
        select_layer=int(spec.get("select_layer", DEFAULT_SELECT_LAYER)),
        post_norm=bool(spec.get("post_norm", True)),
    )


class MgllJanusForConditionalGeneration(JanusForConditionalGeneration):
    """``JanusForConditionalGeneration`` whose ``model.vision_model`` is built from ``config.mgll_tower`` (never SigLIP)."""

    config_class = MgllJanusConfig

    def __init__(self, config):
        init_swapped(self, JanusForConditionalGeneration, config, modeling_janus,
                     "JanusVisionModel", "model.vision_model", build_tower)


MgllJanusConfig.register_for_auto_class()
MgllJanusForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
inherit_checkpoint_renames(MgllJanusForConditionalGeneration, JanusForConditionalGeneration)
