"""InstructBLIP on transformers' ``InstructBlipForConditionalGeneration``; the MGLL ViT reaches the Q-Former through a bridge.

The Q-Former cross-attends to the vision features with key/value projections whose input width
is the vision width (``qformer_config.encoder_hidden_size``, tied to ``vision_config.hidden_size``
in the config). Two ways to fit a different-width MGLL ViT: re-initialise those key/value
projections at the new width, or **bridge** the MGLL features to the old width. This host
bridges (``Linear(mgll_width, encoder_hidden_size)`` + ``LayerNorm``), because:

* the pretrained Q-Former stays intact: its cross-attention keys/values (two linears in each of
  its cross-attention layers) keep what they learnt, and the bridge only has to map MGLL
  features into the space they already read; re-initialising them throws that away and leaves
  ``2 x n_cross_layers`` freshly initialised matrices to learn instead of one;
* the bridge is the single new module; stage 1 trains it together with the language projection
  (the two ends of the frozen Q-Former: MGLL -> Q-Former and Q-Former -> LM, which is what the
  host calls its "projector") while the Q-Former, its query tokens, the tower and the LM stay
  frozen and bit-equal; the ``LayerNorm`` hands the keys/values normalised inputs, as the stock
  tower's ``post_layernorm`` did;
* the Q-Former config (and its tie to the vision width) is unchanged.

The MGLL ViT itself is an exact ``CLIPVisionModel`` conversion; the Q-Former gets all of its
tokens (class + patches) from hidden-state index ``select_layer`` (default -2, the second-last
block, as BLIP-2 takes from its EVA ViT). The LM still sees ``num_query_tokens`` image tokens
whatever the MGLL grid is: the Q-Former resamples. The saved folder is ``save_pretrained`` output
whose config carries the tower spec (``mgll_tower``) and whose files carry the code
(:mod:`mgll.adapters.remote.mgll_instructblip`): it loads with ``AutoModelForImageTextToText`` and
``trust_remote_code=True``, or with :func:`mgll.adapters.swap.load_swapped`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mgll.adapters.hosts.base import (
    Host,
    ShapeMismatch,
    check_layer_index,
    mgll_part,
    vit_spec,
)
from mgll.adapters.hosts.registry import register_host

__all__ = ["InstructBlipHost"]

DEFAULT_SELECT_LAYER = -2


def __getattr__(name: str):
    if name in ("MgllInstructBlipForConditionalGeneration", "MgllBlipVisionTower"):  # old import paths
        return getattr(InstructBlipHost().remote(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@register_host("instructblip")
class InstructBlipHost(Host):
    shares_prompt_prefix = False  # the Q-Former reads the whole instruction, options included
    model_class_name = "MgllInstructBlipForConditionalGeneration"
    source_class_name = "InstructBlipForConditionalGeneration"
    remote_name = "mgll_instructblip"
    tower_path = "vision_model.vit"
    source_tower_path = "vision_model"
    projector_path = "vision_model.bridge"
    language_model_path = "language_model"
    lm_head_path = "language_model.lm_head"

    def projector(self, model: nn.Module) -> nn.Module:
        """Bridge + language projection as one module (a view: saving/loading it writes through to both)."""
        return nn.ModuleDict({"bridge": self._visual(model).bridge, "language_projection": model.language_projection})

    def trainable_paths(self, stage: int, train_tower: bool = False) -> list[str]:
        return [*super().trainable_paths(stage, train_tower), "language_projection"]

    def _visual(self, model: nn.Module):
        return mgll_part(model, "vision_model", self.remote().MgllBlipVisionTower)

    def unquantised_modules(self) -> list[str]:
        """The Q-Former and the language projection are not the LM: they stay in float too."""
        return [self.tower_path, self.projector_path, "qformer", "language_projection", self.lm_head_path]

    # -- token grid ----------------------------------------------------------------------------
    def num_image_tokens(self, model: nn.Module) -> int:
        """The Q-Former's query count: independent of the MGLL grid."""
        return int(model.config.num_query_tokens)

    def projector_in_features(self, model: nn.Module) -> int:
        return int(self._visual(model).bridge[0].in_features)

    def check_fit(self, model: nn.Module) -> None:
        v = self._visual(model)
        width, expects = int(v.vit.config.hidden_size), self.projector_in_features(model)
        if width != expects:
            raise ShapeMismatch(f"width mismatch: the bridge expects {expects}-wide vision features but the tower gives {width}")
        out, cross = int(v.bridge[0].out_features), int(model.config.qformer_config.encoder_hidden_size)
        if out != cross:
            raise ShapeMismatch(
                f"width mismatch: the Q-Former cross-attention takes {cross}-wide features but the bridge gives {out}"
            )
        check_layer_index("select_layer", v.select_layer, int(v.vit.config.num_hidden_layers))

    def tower_spec(self, model: nn.Module) -> dict[str, Any]:
        v = self._visual(model)
        vc = v.vit.config
        return {
            **vit_spec(vc, v.select_layer),
            "bridge": f"Linear({vc.hidden_size}, {model.config.qformer_config.encoder_hidden_size}) + LayerNorm",
            "encoder_hidden_size": int(model.config.qformer_config.encoder_hidden_size),
            "num_image_tokens": self.num_image_tokens(model),
            "projector_in_features": self.projector_in_features(model),
        }

    # -- swap ----------------------------------------------------------------------------------
    default_select_layer = DEFAULT_SELECT_LAYER
    projector_inits = ("default",)  # the new module is the bridge into the pretrained Q-Former; the LM-side projection is kept

    def put_tower(self, model: nn.Module, hf_vit: nn.Module, select_layer: int, projector_init: str, ref: torch.Tensor) -> None:
        """MGLL ViT + fresh bridge in place of ``vision_model``; the Q-Former and everything after it are kept."""
        model.vision_model = self.remote_tower(model, hf_vit, {"clip_vision_config": hf_vit.config.to_dict(), "select_layer": select_layer}, ref)

    def make_processor(self, model: nn.Module, processor: Any, tokenizer: Any, encoder: nn.Module, view: str = "crop") -> Any:
        """An ``InstructBlipProcessor`` whose images become the encoder's square view at its normalisation."""
        from transformers import InstructBlipProcessor

        from mgll.adapters.preprocess import mgll_image_processor, preprocess_cfg_of

        if processor is None or getattr(processor, "qformer_tokenizer", None) is None:
            raise ValueError("the InstructBLIP folder has no processor with a qformer_tokenizer; cannot build the prompts")
        v = self._visual(model)
        image_processor = mgll_image_processor("MgllBlipImageProcessor", preprocess_cfg_of(encoder), view,
                                               size={"height": v.image_size, "width": v.image_size}, do_convert_rgb=True)
        return InstructBlipProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer if tokenizer is not None else processor.tokenizer,
            qformer_tokenizer=processor.qformer_tokenizer,
            num_query_tokens=int(model.config.num_query_tokens),
        )
