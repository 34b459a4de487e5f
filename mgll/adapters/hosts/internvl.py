"""InternVL (2.5 / 3, ``-hf`` layout) on transformers' ``InternVLForConditionalGeneration``: MGLL ViT + pixel shuffle.

InternVL feeds the projector the tower's patch features after a pixel shuffle that folds each
``s x s`` window (``s = 1 / downsample_ratio``, 2 for every released model) into one token of
``s**2`` times the width: ``(grid / s)**2`` tokens per tile, ``image_seq_length`` in the config.
So the MGLL patch grid must be square and divisible by ``s`` (a 224-px / patch-16 ViT: 14x14 ->
49 tokens; a 7x7 grid is refused with both sizes named), and the projector
(``multi_modal_projector``: LayerNorm + two linears) is rebuilt at ``s**2 x`` the MGLL width.

InternViT cannot hold an MGLL ViT exactly (it has no ``ln_pre`` and uses layer scale), so the
MGLL ViT goes in as a ``CLIPVisionModel`` (the exact conversion) and ``vision_config`` becomes its
``CLIPVisionConfig``: the stock ``InternVLModel`` builds exactly that tower from it. Only the stock
config class would turn it back into an InternViT config, so the saved model is
``MgllInternVLForConditionalGeneration`` over ``MgllInternVLConfig``
(:mod:`mgll.adapters.remote.mgll_internvl`, carried in the folder as remote code).
InternVL's dynamic tiling is kept: the image processor cuts tiles of the MGLL image size (plus a
thumbnail) and the tower runs once per tile; each tile gets ``image_seq_length`` tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mgll.adapters.hosts.base import (
    Host,
    ShapeMismatch,
    chat_template_of,
    check_layer_index,
    feature_layers,
    mgll_part,
    resolve_tokenizer,
    vit_spec,
    zero_init_last,
)
from mgll.adapters.hosts.registry import register_host

__all__ = ["InternVLHost"]


def _shuffle_scale(config) -> int:
    ratio = float(config.downsample_ratio)
    scale = round(1 / ratio)
    if abs(scale * ratio - 1) > 1e-6:
        raise ShapeMismatch(f"downsample_ratio={ratio}: the pixel shuffle needs 1/ratio to be a whole number")
    return scale


def __getattr__(name: str):
    if name == "MgllInternVLForConditionalGeneration":  # old import path
        return InternVLHost().model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@register_host("internvl")
class InternVLHost(Host):
    model_class_name = "MgllInternVLForConditionalGeneration"
    source_class_name = "InternVLForConditionalGeneration"
    remote_name = "mgll_internvl"
    tower_path = "model.vision_tower"
    projector_path = "model.multi_modal_projector"
    language_model_path = "model.language_model"
    lm_head_path = "lm_head"

    def _tower(self, model: nn.Module):
        from transformers import CLIPVisionModel

        return mgll_part(model, self.tower_path, CLIPVisionModel)

    # -- token grid ----------------------------------------------------------------------------
    def tower_grid(self, model: nn.Module) -> int:
        vc = self._tower(model).config
        return int(vc.image_size) // int(vc.patch_size)

    def num_image_tokens(self, model: nn.Module) -> int:
        """Tokens per tile after the pixel shuffle: ``(grid / s)**2``."""
        return (self.tower_grid(model) // _shuffle_scale(model.config)) ** 2

    def projector_in_features(self, model: nn.Module) -> int:
        return int(self.projector(model).linear_1.in_features)

    def tower_feature_width(self, model: nn.Module) -> int:
        """The pixel-shuffled width the projector sees: ``s**2 x`` the tower width."""
        return int(self._tower(model).config.hidden_size) * _shuffle_scale(model.config) ** 2

    def check_fit(self, model: nn.Module) -> None:
        vc = self._tower(model).config
        s, g = _shuffle_scale(model.config), self.tower_grid(model)
        if g % s:
            raise ShapeMismatch(
                f"grid mismatch: the tower's {g}x{g} patch grid does not split into {s}x{s} pixel-shuffle windows "
                f"(image {vc.image_size}px / patch {vc.patch_size}px, downsample_ratio {model.config.downsample_ratio}); "
                "InternVL needs a grid divisible by 1/downsample_ratio"
            )
        if len(feature_layers(model.config)) != 1:
            raise ShapeMismatch(f"vision_feature_layer={model.config.vision_feature_layer}: InternVL takes one layer")
        width, expects = self.tower_feature_width(model), self.projector_in_features(model)
        if width != expects:
            raise ShapeMismatch(
                f"width mismatch: the projector expects {expects}-wide vision features but the tower gives {width} "
                f"(hidden_size {vc.hidden_size} x {s}x{s} pixel shuffle)"
            )
        norm = int(self.projector(model).layer_norm.normalized_shape[0])
        if norm != width:
            raise ShapeMismatch(f"width mismatch: the projector's LayerNorm takes {norm} but the tower gives {width}")
        out, lm = int(self.projector(model).linear_2.out_features), int(model.config.text_config.hidden_size)
        if out != lm:
            raise ShapeMismatch(f"width mismatch: the projector gives {out}-wide tokens but the LM takes {lm}")
        tokens, seq = self.num_image_tokens(model), int(model.config.image_seq_length)
        if tokens != seq:
            raise ShapeMismatch(
                f"grid mismatch: the LM expects image_seq_length={seq} image tokens per tile but the tower gives {tokens} "
                f"({g}x{g} patches / {s}x{s} pixel shuffle)"
            )
        check_layer_index("vision_feature_layer", feature_layers(model.config)[0], int(vc.num_hidden_layers))

    def tower_spec(self, model: nn.Module) -> dict[str, Any]:
        return {
            **vit_spec(self._tower(model).config, model.config.vision_feature_layer),
            "select_strategy": model.config.vision_feature_select_strategy,
            "downsample_ratio": float(model.config.downsample_ratio),
            "num_image_tokens": self.num_image_tokens(model),
            "projector_in_features": self.projector_in_features(model),
        }

    # -- swap ----------------------------------------------------------------------------------
    def put_tower(self, model: nn.Module, hf_vit: nn.Module, select_layer: int, projector_init: str, ref: torch.Tensor) -> None:
        """MGLL ViT as ``model.vision_tower`` (InternVL selects by ``vision_feature_layer``), projector at the pixel-shuffled width."""
        from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

        # the stock InternVLModel builds AutoModel.from_config(vision_config): a CLIPVisionConfig gives this tower
        model.config.vision_config = hf_vit.config
        model.model.vision_tower = hf_vit.to(device=ref.device, dtype=ref.dtype)
        if projector_init != "keep":
            projector = InternVLMultiModalProjector(model.config).to(device=ref.device, dtype=ref.dtype)
            if projector_init == "zero":
                zero_init_last(projector.linear_2, ref)
            model.model.multi_modal_projector = projector

    def after_swap(self, model: nn.Module) -> None:
        g, s = self.tower_grid(model), _shuffle_scale(model.config)
        if g % s == 0:
            model.config.image_seq_length = (g // s) ** 2

    def make_processor(self, model: nn.Module, processor: Any, tokenizer: Any, encoder: nn.Module, view: str = "crop") -> Any:
        """An ``InternVLProcessor`` tiling at the MGLL image size; the thumbnail (or single tile) is the encoder's view."""
        from transformers import InternVLProcessor, InternVLVideoProcessor

        from mgll.adapters.preprocess import mgll_image_processor, norm_kwargs, preprocess_cfg_of

        tokenizer = resolve_tokenizer(processor, tokenizer)
        old = getattr(processor, "image_processor", None)
        s = int(self._tower(model).config.image_size)
        cfg = preprocess_cfg_of(encoder)
        norm = {"size": {"height": s, "width": s}, **norm_kwargs(cfg)}
        image_processor = mgll_image_processor(
            "MgllGotOcr2ImageProcessor", cfg, view,
            size={"height": s, "width": s},
            crop_to_patches=bool(getattr(old, "crop_to_patches", True)),
            min_patches=int(getattr(old, "min_patches", 1)),
            max_patches=int(getattr(old, "max_patches", 12)),
        )
        return InternVLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=InternVLVideoProcessor(**norm),
            image_seq_length=self.num_image_tokens(model),
            chat_template=chat_template_of(processor),
        )
