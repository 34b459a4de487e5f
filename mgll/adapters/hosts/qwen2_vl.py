"""Qwen2-VL on transformers' ``Qwen2VLForConditionalGeneration``, with the MGLL ViT behind the merger contract.

Qwen2-VL's own tower takes flattened patches plus ``image_grid_thw`` and uses 2-D rotary positions,
so any grid works; an MGLL ViT has learned absolute positions for one fixed grid and a class
token, so its weights cannot be written as a stock Qwen2-VL tower. The swap therefore keeps the
*contract* instead of the class: :class:`~mgll.adapters.remote.mgll_qwen2_vl.MgllQwen2VisionTower` takes the processor's flattened
patches and ``grid_thw``, rebuilds the images, runs the MGLL ViT (as an exact ``CLIPVisionModel``
conversion) and merges each 2x2 window of patch features into one LM-width token with a fresh
Qwen2-VL ``PatchMerger`` at the MGLL width: ``grid_t * grid_h * grid_w / merge_size**2`` tokens,
the count the processor inserts. The processor is configured so that its patch grid *is* the MGLL
grid (patch size = the MGLL patch, min = max pixels = the MGLL image area); a square image of any
size is resized to exactly that grid, anything else fails with both grids named.

The tower, its merger and the swapped class live in :mod:`mgll.adapters.remote.mgll_qwen2_vl`,
which the swapped folder carries as remote code: it loads with
``AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)`` in a process
without mgll, or with :func:`mgll.adapters.swap.load_swapped`; a load without the flag is
refused (unknown model type ``mgll_qwen2_vl``), never a random stock tower.
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
    mgll_part,
    resolve_tokenizer,
    vit_spec,
    zero_init_last,
)
from mgll.adapters.hosts.registry import register_host

__all__ = ["Qwen2VLHost"]

DEFAULT_SELECT_LAYER = -1  # Qwen2-VL merges its last block's output; the merger brings its own LayerNorm


def __getattr__(name: str):
    if name in ("MgllQwen2VLForConditionalGeneration", "MgllQwen2VisionTower"):  # old import paths
        return getattr(Qwen2VLHost().remote(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@register_host("qwen2_vl")
class Qwen2VLHost(Host):
    model_class_name = "MgllQwen2VLForConditionalGeneration"
    source_class_name = "Qwen2VLForConditionalGeneration"
    remote_name = "mgll_qwen2_vl"
    tower_path = "model.visual.vit"
    source_tower_path = "model.visual"
    projector_path = "model.visual.merger"
    language_model_path = "model.language_model"
    lm_head_path = "lm_head"

    # -- token grid ----------------------------------------------------------------------------
    def _visual(self, model: nn.Module):
        return mgll_part(model, "model.visual", self.remote().MgllQwen2VisionTower)

    def tower_grid(self, model: nn.Module) -> int:
        return self._visual(model).grid

    def num_image_tokens(self, model: nn.Module) -> int:
        """Merged tokens per image: ``grid**2 / merge_size**2`` (grid_t = 1 for images)."""
        v = self._visual(model)
        return (v.grid // v.spatial_merge_size) ** 2

    def projector_in_features(self, model: nn.Module) -> int:
        return int(self.projector(model).ln_q.normalized_shape[0])

    def check_fit(self, model: nn.Module) -> None:
        v = self._visual(model)
        width, expects = int(v.vit.config.hidden_size), self.projector_in_features(model)
        if width != expects:
            raise ShapeMismatch(f"width mismatch: the merger expects {expects}-wide vision features but the tower gives {width}")
        out, lm = int(v.merger.mlp[-1].out_features), int(model.config.text_config.hidden_size)
        if out != lm:
            raise ShapeMismatch(f"width mismatch: the merger gives {out}-wide tokens but the LM takes {lm}")
        m, g = v.spatial_merge_size, v.grid
        if g % m:
            raise ShapeMismatch(
                f"grid mismatch: the tower's {g}x{g} patch grid does not split into {m}x{m} merge windows "
                f"(image {v.image_size}px / patch {v.patch_size}px); Qwen2-VL needs an even grid"
            )
        check_layer_index("select_layer", v.select_layer, int(v.vit.config.num_hidden_layers))

    def tower_spec(self, model: nn.Module) -> dict[str, Any]:
        v = self._visual(model)
        return {
            **vit_spec(v.vit.config, v.select_layer),
            "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
            "num_image_tokens": self.num_image_tokens(model),
            "projector_in_features": self.projector_in_features(model),
        }

    # -- swap ----------------------------------------------------------------------------------
    default_select_layer = DEFAULT_SELECT_LAYER

    def put_tower(self, model: nn.Module, hf_vit: nn.Module, select_layer: int, projector_init: str, ref: torch.Tensor) -> None:
        """MGLL ViT + merger at the MGLL width in place of ``model.model.visual`` (the merger is Qwen2-VL's projector)."""
        old_merger = getattr(model.model.visual, "merger", None)
        width = int(hf_vit.config.hidden_size)
        if projector_init == "keep" and (old_merger is None or int(old_merger.ln_q.normalized_shape[0]) != width):
            got = int(old_merger.ln_q.normalized_shape[0]) if old_merger is not None else None
            raise ShapeMismatch(f"width mismatch: the merger expects {got}-wide vision features but the tower gives {width}")
        # the stock fields describe the new tower where they mean the same thing (the processor reads its own copy)
        vc = model.config.vision_config
        vc.patch_size = int(hf_vit.config.patch_size)
        vc.embed_dim = width
        vc.depth = int(hf_vit.config.num_hidden_layers)
        vc.num_heads = int(hf_vit.config.num_attention_heads)
        vc.hidden_size = int(model.config.text_config.hidden_size)
        visual = self.remote_tower(model, hf_vit, {"clip_vision_config": hf_vit.config.to_dict(), "select_layer": select_layer}, ref)
        if projector_init == "keep":
            visual.merger = old_merger
        elif projector_init == "zero":
            zero_init_last(visual.merger.mlp[-1], ref)
        model.model.visual = visual

    def make_processor(self, model: nn.Module, processor: Any, tokenizer: Any, encoder: nn.Module, view: str = "crop") -> Any:
        """A ``Qwen2VLProcessor`` whose images become the encoder's square view, one MGLL grid each, at its normalisation."""
        from transformers import Qwen2VLProcessor, Qwen2VLVideoProcessor

        from mgll.adapters.preprocess import mgll_image_processor, norm_kwargs, preprocess_cfg_of

        tokenizer = resolve_tokenizer(processor, tokenizer)
        v = self._visual(model)
        cfg = preprocess_cfg_of(encoder)
        kw = {
            "patch_size": v.patch_size,
            "merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
            "min_pixels": v.image_size**2,
            "max_pixels": v.image_size**2,
        }
        return Qwen2VLProcessor(
            image_processor=mgll_image_processor("MgllQwen2VLImageProcessor", cfg, view, **kw),
            tokenizer=tokenizer,
            video_processor=Qwen2VLVideoProcessor(**kw, image_mean=norm_kwargs(cfg)["image_mean"], image_std=norm_kwargs(cfg)["image_std"]),
            chat_template=chat_template_of(processor),
        )
