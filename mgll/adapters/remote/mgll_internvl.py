"""InternVL (``-hf`` layout) with an MGLL ViT as a plain ``CLIPVisionModel`` tower (remote code of swapped ``internvl`` folders).

The stock ``InternVLModel`` builds its tower with ``AutoModel.from_config(config.vision_config)``
and reads only ``hidden_size`` from that config, so a ``CLIPVisionConfig`` there gives the exact
MGLL tower with the stock modelling code. Only the config must change: the stock
``InternVLConfig`` turns any saved ``vision_config`` into an ``InternVLVisionConfig`` (and so a
random InternViT); :class:`MgllInternVLConfig` resolves it by its ``model_type`` instead.

Load a swapped folder with ``AutoModelForImageTextToText.from_pretrained(folder,
trust_remote_code=True)``; the stock ``InternVLForConditionalGeneration`` would build an InternViT.
"""

from __future__ import annotations

from transformers import AutoConfig, CLIPVisionConfig, InternVLConfig, InternVLForConditionalGeneration
from transformers.configuration_utils import SubConfigSpec

from .mgll_clip_tower import inherit_checkpoint_renames

__all__ = ["MgllInternVLConfig", "MgllInternVLForConditionalGeneration"]


class MgllInternVLConfig(InternVLConfig):
    """``InternVLConfig`` whose ``vision_config`` is whatever its ``model_type`` says (a ``CLIPVisionConfig`` after a swap)."""

    model_type = "mgll_internvl"
    sub_configs_defaults = {
        **InternVLConfig.sub_configs_defaults,
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
    }


class MgllInternVLForConditionalGeneration(InternVLForConditionalGeneration):
    """The stock InternVL model over :class:`MgllInternVLConfig`: its tower is the ``CLIPVisionModel`` the config names."""

    config_class = MgllInternVLConfig

    def __init__(self, config):
        if not isinstance(config.vision_config, CLIPVisionConfig):
            raise ValueError(
                f"vision_config is a {type(config.vision_config).__name__}, not a CLIPVisionConfig: "
                "this is not an InternVL folder written by `mgll swap`"
            )
        super().__init__(config)


MgllInternVLConfig.register_for_auto_class()
MgllInternVLForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
inherit_checkpoint_renames(MgllInternVLForConditionalGeneration, InternVLForConditionalGeneration)
