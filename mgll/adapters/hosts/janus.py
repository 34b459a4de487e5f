"""Janus / Janus-Pro on transformers' ``JanusForConditionalGeneration``: the MGLL ViT on the understanding path only.

Janus has two visual paths. Understanding: a SigLIP ViT whose final, LayerNorm-ed patch tokens
go through the ``aligner`` MLP into the LM (``grid**2`` tokens, 576 for 384 px / patch 16).
Generation: a VQ-VAE tokeniser with its own embeddings, aligner and head, which the LM drives
to *draw* images. The swap replaces the understanding tower and aligner and leaves the whole
generation path (``vqmodel``, ``generation_embeddings``, ``generation_aligner``,
``generation_head``) bit-equal; QLoRA keeps it in float too.

SigLIP has no class token and no ``ln_pre``, so the MGLL ViT cannot be written as
``JanusVisionModel``; it goes in as a ``CLIPVisionModel`` (the exact conversion) inside
:class:`~mgll.adapters.remote.mgll_janus.MgllJanusVisionTower`, and the saved model is the thin
subclass ``MgllJanusForConditionalGeneration`` that rebuilds it from ``config.mgll_tower``; the
folder carries that code (:mod:`mgll.adapters.remote.mgll_janus`) and loads with
``AutoModelForImageTextToText`` and ``trust_remote_code=True``. As Janus takes
SigLIP's last block after its final LayerNorm, the tower hands the aligner the MGLL ViT's last
block after ``ln_post`` (open_clip applies ``ln_post`` to every token too), class token dropped:
exactly the ``tokens`` open_clip's own forward returns.

``vision_config.image_size``, ``patch_size`` and ``num_image_tokens`` keep describing the
**generation** grid (the VQ decoder's patch count and the number of tokens image generation
draws are read from them); only ``hidden_size`` (the aligner's input width) and
``num_attention_heads`` follow the MGLL tower. The understanding grid is in ``mgll_tower`` and
in the processor (``num_image_tokens``, image size, MGLL mean/std). Generated images are
un-normalised by the processor's ``postprocess`` with its mean/std: pass Janus's own
(``image_mean=image_std=[0.5]*3``) there, since the processor now carries the MGLL statistics.
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

__all__ = ["JanusHost"]

DEFAULT_SELECT_LAYER = -1
GENERATION_PATHS = ("model.vqmodel", "model.generation_embeddings", "model.generation_aligner", "model.generation_head")


def __getattr__(name: str):
    if name in ("MgllJanusForConditionalGeneration", "MgllJanusVisionTower"):  # old import paths
        return getattr(JanusHost().remote(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@register_host("janus")
class JanusHost(Host):
    model_class_name = "MgllJanusForConditionalGeneration"
    source_class_name = "JanusForConditionalGeneration"
    remote_name = "mgll_janus"
    tower_path = "model.vision_model.vit"
    source_tower_path = "model.vision_model"
    projector_path = "model.aligner"
    language_model_path = "model.language_model"
    lm_head_path = "lm_head"

    def _visual(self, model: nn.Module):
        return mgll_part(model, "model.vision_model", self.remote().MgllJanusVisionTower)

    def unquantised_modules(self) -> list[str]:
        """Tower, aligner, ``lm_head`` and the whole image-generation path stay in float."""
        return [self.tower_path, self.projector_path, *GENERATION_PATHS, self.lm_head_path]

    # -- token grid ----------------------------------------------------------------------------
    def num_image_tokens(self, model: nn.Module) -> int:
        """Understanding tokens per image: the MGLL patch grid (class token dropped)."""
        return self._visual(model).grid ** 2

    def projector_in_features(self, model: nn.Module) -> int:
        return int(self.projector(model).fc1.in_features)

    def check_fit(self, model: nn.Module) -> None:
        v = self._visual(model)
        width, expects = int(v.vit.config.hidden_size), self.projector_in_features(model)
        if width != expects:
            raise ShapeMismatch(f"width mismatch: the aligner expects {expects}-wide vision features but the tower gives {width}")
        aligner = self.projector(model)
        last = aligner.hidden_layers[-1] if len(aligner.hidden_layers) else aligner.fc1
        out, lm = int(last.out_features), int(model.config.text_config.hidden_size)
        if out != lm:
            raise ShapeMismatch(f"width mismatch: the aligner gives {out}-wide tokens but the LM takes {lm}")
        check_layer_index("select_layer", v.select_layer, int(v.vit.config.num_hidden_layers))

    def tower_spec(self, model: nn.Module) -> dict[str, Any]:
        v = self._visual(model)
        return {
            **vit_spec(v.vit.config, v.select_layer),
            "post_norm": v.post_norm,
            "num_image_tokens": self.num_image_tokens(model),
            "generation_image_tokens": int(model.config.vision_config.num_image_tokens),
            "projector_in_features": self.projector_in_features(model),
        }

    # -- swap ----------------------------------------------------------------------------------
    default_select_layer = DEFAULT_SELECT_LAYER

    def put_tower(self, model: nn.Module, hf_vit: nn.Module, select_layer: int, projector_init: str, ref: torch.Tensor) -> None:
        """MGLL ViT in place of the SigLIP tower, fresh aligner at the MGLL width; the generation path is not touched."""
        from transformers.models.janus.modeling_janus import JanusVisionAlignerMLP

        old_aligner = model.model.aligner
        if projector_init == "keep" and int(old_aligner.fc1.in_features) != int(hf_vit.config.hidden_size):
            raise ShapeMismatch(
                f"width mismatch: the aligner expects {old_aligner.fc1.in_features}-wide vision features "
                f"but the tower gives {hf_vit.config.hidden_size}"
            )
        vc = model.config.vision_config  # the aligner's input width follows the MGLL tower; the generation grid stays
        vc.hidden_size = int(hf_vit.config.hidden_size)
        vc.num_attention_heads = int(hf_vit.config.num_attention_heads)
        spec = {"clip_vision_config": hf_vit.config.to_dict(), "select_layer": select_layer, "post_norm": True}
        model.model.vision_model = self.remote_tower(model, hf_vit, spec, ref)
        if projector_init != "keep":
            aligner = JanusVisionAlignerMLP(vc).to(device=ref.device, dtype=ref.dtype)
            if projector_init == "zero":
                zero_init_last(aligner.hidden_layers[-1] if len(aligner.hidden_layers) else aligner.fc1, ref)
            model.model.aligner = aligner

    def make_processor(self, model: nn.Module, processor: Any, tokenizer: Any, encoder: nn.Module, view: str = "crop") -> Any:
        """A ``JanusProcessor`` whose images become the encoder's square view (not padded), with the MGLL grid's token count."""
        from transformers import JanusProcessor

        from mgll.adapters.preprocess import mgll_image_processor, preprocess_cfg_of

        tokenizer = resolve_tokenizer(processor, tokenizer)
        v = self._visual(model)
        image_processor = mgll_image_processor("MgllJanusImageProcessor", preprocess_cfg_of(encoder), view,
                                               size={"height": v.image_size, "width": v.image_size}, min_size=v.patch_size)
        return JanusProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=chat_template_of(processor),
            use_default_system_prompt=bool(getattr(processor, "use_default_system_prompt", False)),
            num_image_tokens=self.num_image_tokens(model),
        )
