"""LLaVA-1.5 and LLaVA-Med (same architecture) on transformers' ``LlavaForConditionalGeneration``.

The MGLL tower goes in as a plain ``CLIPVisionModel`` (see :mod:`mgll.adapters.export_hf`), so
the saved model is a stock LLaVA checkpoint with a different ``vision_config``. LLaVA feeds the
projector ``hidden_states[vision_feature_layer]`` of the tower, minus the class token under the
``default`` strategy: ``grid**2`` image tokens per image.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mgll.adapters.export_hf import clip_vision_config, to_hf_clip_vision
from mgll.adapters.hosts import register_host
from mgll.adapters.hosts.base import Host, ShapeMismatch, pad_batch
from mgll.adapters.vision_tower import build_image_processor, preprocess_cfg_of

__all__ = ["LlavaHost", "PROJECTOR_INITS"]

PROJECTOR_INITS = ("default", "zero", "keep")


def _layers(config) -> list[int]:
    layer = config.vision_feature_layer
    return [layer] if isinstance(layer, int) else list(layer)


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
        return int(model.config.vision_config.hidden_size) * len(_layers(model.config))

    def check_fit(self, model: nn.Module) -> None:
        width, expects = self.tower_feature_width(model), self.projector_in_features(model)
        if width != expects:
            raise ShapeMismatch(
                f"width mismatch: the projector expects {expects}-wide vision features but the tower gives {width} "
                f"(hidden_size {model.config.vision_config.hidden_size} x {len(_layers(model.config))} selected layers)"
            )
        tokens, seq = self.num_image_tokens(model), int(model.config.image_seq_length)
        if tokens != seq:
            g = self.tower_grid(model)
            raise ShapeMismatch(
                f"grid mismatch: the LM expects image_seq_length={seq} image tokens but the tower gives {tokens} "
                f"({g}x{g} patches of {model.config.vision_config.patch_size}px at {model.config.vision_config.image_size}px)"
            )
        n = int(model.config.vision_config.num_hidden_layers) + 1
        for layer in _layers(model.config):
            if not -n <= layer < n:
                raise ShapeMismatch(
                    f"vision_feature_layer={layer} does not exist in a {n - 1}-block tower (hidden-state indices {-n}..{n - 1})"
                )

    def tower_spec(self, model: nn.Module) -> dict[str, Any]:
        vc = model.config.vision_config
        return {
            "hidden_size": int(vc.hidden_size),
            "image_size": int(vc.image_size),
            "patch_size": int(vc.patch_size),
            "grid": self.tower_grid(model),
            "num_layers": int(vc.num_hidden_layers),
            "hidden_act": vc.hidden_act,
            "select_layer": model.config.vision_feature_layer,
            "select_strategy": model.config.vision_feature_select_strategy,
            "num_image_tokens": self.num_image_tokens(model),
            "projector_in_features": self.projector_in_features(model),
        }

    # -- swap ----------------------------------------------------------------------------------
    def replace_tower(self, model: nn.Module, encoder: nn.Module, projector_init: str = "default") -> nn.Module:
        """Put ``encoder``'s ViT in as the tower, rebuild the projector at the new width, fix the token count."""
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        if projector_init not in PROJECTOR_INITS:
            raise ValueError(f"projector_init={projector_init!r}: expected one of {', '.join(PROJECTOR_INITS)}")
        old_projector = self.projector(model)
        dtype = old_projector.linear_1.weight.dtype
        device = old_projector.linear_1.weight.device
        new_vc = clip_vision_config(encoder)
        tower = to_hf_clip_vision(encoder, with_projection=False).to(device=device, dtype=dtype)
        model.config.vision_config = new_vc
        model.model.config.vision_config = new_vc
        model.model.vision_tower = tower
        if projector_init != "keep":
            projector = LlavaMultiModalProjector(model.config).to(device=device, dtype=dtype)
            if projector_init == "zero":
                self._zero_init(model, projector)
            model.model.multi_modal_projector = projector
        model.config.image_seq_length = self.num_image_tokens(model)
        self.check_fit(model)
        return model

    def _zero_init(self, model: nn.Module, projector: nn.Module) -> None:
        """Last layer zero, bias = mean input embedding: image tokens start as an 'average word'.

        The LM then sees in-distribution inputs at step 0 and the gradient to ``linear_1``
        flows once ``linear_2`` moves off zero (LLaVA-Med's projector warm start).
        """
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            projector.linear_2.weight.zero_()
            if projector.linear_2.bias is not None:
                projector.linear_2.bias.copy_(emb.float().mean(0).to(projector.linear_2.bias.dtype))

    def make_processor(self, model: nn.Module, processor: Any, tokenizer: Any, encoder: nn.Module) -> Any:
        """A ``LlavaProcessor`` with the MGLL encoder's resize/normalisation and the new patch size."""
        from transformers import LlavaProcessor

        if tokenizer is None and processor is not None:
            tokenizer = processor.tokenizer
        if tokenizer is None:
            raise ValueError("the MLLM folder has neither a processor nor a tokenizer; cannot build the image prompt")
        chat_template = getattr(processor, "chat_template", None) if processor is not None else None
        return LlavaProcessor(
            image_processor=build_image_processor(preprocess_cfg_of(encoder)),
            tokenizer=tokenizer,
            patch_size=int(model.config.vision_config.patch_size),
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            num_additional_image_tokens=1,  # the class token, dropped again under "default"
            chat_template=chat_template,
            image_token=getattr(processor, "image_token", "<image>") if processor is not None else "<image>",
        )

    # -- alignment batches ---------------------------------------------------------------------
    def build_batch(
        self, model: nn.Module, processor: Any, images: list, prompts: list[str], targets: list[str]
    ) -> dict[str, torch.Tensor]:
        """``[bos] <image>*N prompt target [eos]``, loss on ``target [eos]`` only, right-padded."""
        tok = processor.tokenizer
        image_id = int(model.config.image_token_id)
        n = self.num_image_tokens(model)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        rows, labels = [], []
        for prompt, target in zip(prompts, targets):
            head = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + [image_id] * n
            head += tok(prompt, add_special_tokens=False)["input_ids"]
            tail = tok(target, add_special_tokens=False)["input_ids"]
            if tok.eos_token_id is not None:
                tail = tail + [tok.eos_token_id]
            rows.append(head + tail)
            labels.append([-100] * len(head) + tail)
        input_ids, mask, label_t = pad_batch(rows, labels, pad)
        pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        return {"input_ids": input_ids, "attention_mask": mask, "labels": label_t, "pixel_values": pixel_values}
