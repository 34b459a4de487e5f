"""InstructBLIP with an MGLL ViT bridged into the pretrained Q-Former (remote code of swapped ``instructblip`` folders).

The Q-Former cross-attends to vision features of width ``qformer_config.encoder_hidden_size``;
:class:`MgllBlipVisionTower` runs the MGLL ViT (an exact ``CLIPVisionModel`` conversion), takes
all tokens of hidden-state index ``select_layer`` and maps them with a ``bridge``
(``Linear(mgll_width, encoder_hidden_size)`` + ``LayerNorm``) into the space the Q-Former reads.

Load a swapped folder with ``AutoModelForImageTextToText.from_pretrained(folder,
trust_remote_code=True)``; the stock ``InstructBlipForConditionalGeneration`` cannot hold this tower.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import CLIPVisionConfig, InstructBlipConfig, InstructBlipForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.instructblip import modeling_instructblip

from .mgll_clip_tower import ClipTower, inherit_checkpoint_renames, init_swapped

__all__ = ["MgllInstructBlipConfig", "MgllBlipVisionTower", "MgllInstructBlipForConditionalGeneration", "build_tower",
           "DEFAULT_SELECT_LAYER"]

DEFAULT_SELECT_LAYER = -2


class MgllInstructBlipConfig(InstructBlipConfig):
    """``InstructBlipConfig`` under a model type of its own, so that only this code builds the model."""

    model_type = "mgll_instructblip"


class MgllBlipVisionTower(ClipTower):
    """InstructBLIP's ``vision_model`` interface over an MGLL ViT: ``pixel_values -> (B, 1 + grid**2, encoder_hidden_size)``."""

    def __init__(self, vision_config, encoder_hidden_size: int, select_layer: int = DEFAULT_SELECT_LAYER):
        super().__init__(vision_config)
        self.bridge = nn.Sequential(nn.Linear(vision_config.hidden_size, encoder_hidden_size), nn.LayerNorm(encoder_hidden_size))
        self.select_layer = int(select_layer)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs: Any):
        self.check_pixels(pixel_values)
        hs = self.vit(pixel_values.to(self.dtype), output_hidden_states=True).hidden_states[self.select_layer]
        out = self.bridge(hs)
        return BaseModelOutputWithPooling(last_hidden_state=out, pooler_output=out[:, 0])


def build_tower(config, spec: dict) -> MgllBlipVisionTower:
    return MgllBlipVisionTower(
        CLIPVisionConfig(**spec["clip_vision_config"]),
        encoder_hidden_size=int(config.qformer_config.encoder_hidden_size),
        select_layer=int(spec.get("select_layer", DEFAULT_SELECT_LAYER)),
    )


class MgllInstructBlipForConditionalGeneration(InstructBlipForConditionalGeneration):
    """``InstructBlipForConditionalGeneration`` whose ``vision_model`` is built from ``config.mgll_tower``."""

    config_class = MgllInstructBlipConfig

    def __init__(self, config):
        init_swapped(self, InstructBlipForConditionalGeneration, config, modeling_instructblip,
                     "InstructBlipVisionModel", "vision_model", build_tower)


MgllInstructBlipConfig.register_for_auto_class()
MgllInstructBlipForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
inherit_checkpoint_renames(MgllInstructBlipForConditionalGeneration, InstructBlipForConditionalGeneration)
