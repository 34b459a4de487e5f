"""LLaVA-1.5 and LLaVA-Med (same architecture) on transformers' ``LlavaForConditionalGeneration``.

The MGLL tower goes in as a plain ``CLIPVisionModel`` (see :mod:`mgll.adapters.clip_vision`), so
the saved model is a stock LLaVA checkpoint with a different ``vision_config``. LLaVA feeds the
projector ``hidden_states[vision_feature_layer]`` of the tower, minus the class token under the
``default`` strategy: ``grid**2`` image tokens per image.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mgll.adapters.hosts.base import (
    PROJECTOR_INITS,
    Host,
    ShapeMismatch,
    chat_template_of,
    check_layer_index,
    feature_layers,
    resolve_tokenizer,
    vit_spec,
    zero_init_last,
)
from mgll.adapters.hosts.registry import register_host
from mgll.adapters.preprocess import (
    mgll_image_processor,
    preprocess_cfg_of,
)

__all__ = ["LlavaHost", "PROJECTOR_INITS"]


@register_host("llava")
class LlavaHost(Host):
    model_class_name = "LlavaForConditionalGeneration"
    tower_path = "model.vision_tower"
    projector_path = "model.multi_modal_projector"
    language_model_path = "model.language_model"
    lm_head_path = "lm_head"

    # -- token grid ----------------------------------------------------------------------------
    def tower_grid(self, model: nn.Module) -> int:
        vc = model.config.vision_config
        return int(vc.image_size) // int(vc.patch_size)

    def num_image_tokens(self, model: nn.Module) -> int:
        """Tokens the tower hands the LM per image: grid**2, plus the class token under ``full``."""
        extra = 1 if model.config.vision_feature_select_strategy == "full" else 0
        return self.tower_grid(model) ** 2 + extra

    def projector_in_features(self, model: nn.Module) -> int:
        return int(self.projector(model).linear_1.in_features)

    def tower_feature_width(self, model: nn.Module) -> int:
        return int(model.config.vision_config.hidden_size) * len(feature_layers(model.config))

    def _check_width(self, model: nn.Module) -> None:
        width, expects = self.tower_feature_width(model), self.projector_in_features(model)
        if width != expects:
            raise ShapeMismatch(
                f"width mismatch: the projector expects {expects}-wide vision features but the tower gives {width} "
                f"(hidden_size {model.config.vision_config.hidden_size} x {len(feature_layers(model.config))} selected layers)"
            )

    def _check_layers(self, model: nn.Module) -> None:
        for layer in feature_layers(model.config):
            check_layer_index("vision_feature_layer", layer, int(model.config.vision_config.num_hidden_layers))

    def check_fit(self, model: nn.Module) -> None:
        self._check_width(model)
        tokens, seq = self.num_image_tokens(model), int(model.config.image_seq_length)
        if tokens != seq:
            g = self.tower_grid(model)
            raise ShapeMismatch(
                f"grid mismatch: the LM expects image_seq_length={seq} image tokens but the tower gives {tokens} "
                f"({g}x{g} patches of {model.config.vision_config.patch_size}px at {model.config.vision_config.image_size}px)"
            )
        self._check_layers(model)

    def tower_spec(self, model: nn.Module) -> dict[str, Any]:
        return {
            **vit_spec(model.config.vision_config, model.config.vision_feature_layer),
            "select_strategy": model.config.vision_feature_select_strategy,
            "num_image_tokens": self.num_image_tokens(model),
            "projector_in_features": self.projector_in_features(model),
        }

    # -- swap ----------------------------------------------------------------------------------
    def _projector_class(self) -> type[nn.Module]:
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        return LlavaMultiModalProjector

    def put_tower(self, model: nn.Module, hf_vit: nn.Module, select_layer: int, projector_init: str, ref: torch.Tensor) -> None:
        """The MGLL ViT as a ``CLIPVisionModel`` tower (LLaVA selects by ``vision_feature_layer``) and, unless ``keep``,
        a fresh projector at its width."""
        model.config.vision_config = hf_vit.config
        model.model.config.vision_config = hf_vit.config
        model.model.vision_tower = hf_vit.to(device=ref.device, dtype=ref.dtype)
        if projector_init != "keep":
            projector = self._projector_class()(model.config).to(device=ref.device, dtype=ref.dtype)
            if projector_init == "zero":
                zero_init_last(projector.linear_2, ref)
            model.model.multi_modal_projector = projector

    def after_swap(self, model: nn.Module) -> None:
        model.config.image_seq_length = self.num_image_tokens(model)



    def _processor_class(self) -> type:
        from transformers import LlavaProcessor

        return LlavaProcessor

    def source_view(self, processor: Any) -> str | None:
        """``pad`` when the source processor pads to a square (LLaVA-1.5 / LLaVA-Med as ``convert-llava`` writes them)."""
        ip = getattr(processor, "image_processor", None)
        return "pad" if type(ip).__name__ == "LlavaImageProcessor" and getattr(ip, "do_pad", False) else None

    def _image_processor(self, model: nn.Module, encoder: nn.Module, view: str) -> Any:
        """The remote ``MgllCLIPImageProcessor``: the stock CLIP processor floors the centre-crop offset where
        open_clip rounds it, a one-pixel shift for half-pixel offsets; ``pad`` is LLaVA-1.5's convention."""
        s = int(model.config.vision_config.image_size)
        return mgll_image_processor("MgllCLIPImageProcessor", preprocess_cfg_of(encoder), view, size={"shortest_edge": s},
                                    crop_size={"height": s, "width": s})

    def make_processor(self, model: nn.Module, processor: Any, tokenizer: Any, encoder: nn.Module, view: str = "crop") -> Any:
        """The host's processor with the MGLL encoder's view, normalisation and patch size."""
        tokenizer = resolve_tokenizer(processor, tokenizer)
        return self._processor_class()(
            image_processor=self._image_processor(model, encoder, view),
            tokenizer=tokenizer,
            patch_size=int(model.config.vision_config.patch_size),
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            num_additional_image_tokens=1,  # the class token, dropped again under "default"
            chat_template=chat_template_of(processor),
            image_token=getattr(processor, "image_token", "<image>") if processor is not None else "<image>",
        )
