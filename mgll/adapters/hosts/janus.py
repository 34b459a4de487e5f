"""Janus / Janus-Pro on transformers' ``JanusForConditionalGeneration``: the MGLL ViT on the understanding path only.

Janus has two visual paths. Understanding: a SigLIP ViT whose final, LayerNorm-ed patch tokens
go through the ``aligner`` MLP into the LM (``grid**2`` tokens, 576 for 384 px / patch 16).
Generation: a VQ-VAE tokeniser with its own embeddings, aligner and head, which the LM drives
to *draw* images. The swap replaces the understanding tower and aligner and leaves the whole
generation path (``vqmodel``, ``generation_embeddings``, ``generation_aligner``,
``generation_head``) bit-equal; QLoRA keeps it in float too.

SigLIP has no class token and no ``ln_pre``, so the MGLL ViT cannot be written as
``JanusVisionModel``; it goes in as a ``CLIPVisionModel`` (the exact conversion) inside
:class:`MgllJanusVisionTower`, and the saved model is the thin subclass
``MgllJanusForConditionalGeneration`` that rebuilds it from ``config.mgll_tower``. As Janus takes
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

import functools
from typing import Any

import torch
from torch import nn

from mgll.adapters.hosts import register_host
from mgll.adapters.hosts.base import Host, ShapeMismatch, inherit_checkpoint_renames, pad_batch

__all__ = ["JanusHost", "MgllJanusVisionTower", "swapped_class"]

PROJECTOR_INITS = ("default", "zero", "keep")
DEFAULT_SELECT_LAYER = -1
GENERATION_PATHS = ("model.vqmodel", "model.generation_embeddings", "model.generation_aligner", "model.generation_head")


class MgllJanusVisionTower(nn.Module):
    """Janus' ``vision_model`` interface over an MGLL ViT: ``pixel_values -> last_hidden_state (B, grid**2, D)``.

    ``config`` is the host's ``JanusVisionConfig``: the image-generation loop reads
    ``vision_model.config.num_image_tokens`` from it.
    """

    def __init__(self, clip_config, janus_vision_config, select_layer: int = DEFAULT_SELECT_LAYER, post_norm: bool = True):
        super().__init__()
        from transformers import CLIPVisionModel

        self.vit = CLIPVisionModel(clip_config)
        self.config = janus_vision_config
        self.select_layer = int(select_layer)
        self.post_norm = bool(post_norm)
        self.image_size = int(clip_config.image_size)
        self.patch_size = int(clip_config.patch_size)
        self.grid = self.image_size // self.patch_size

    @property
    def dtype(self) -> torch.dtype:
        return self.vit.dtype

    def forward(self, pixel_values: torch.Tensor, return_dict: bool = True, **kwargs: Any):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        h, w = pixel_values.shape[-2:]
        if (h, w) != (self.image_size, self.image_size):
            raise ShapeMismatch(
                f"grid mismatch: pixel_values are {h}x{w} px ({h // self.patch_size}x{w // self.patch_size} patches) but the "
                f"MGLL tower takes {self.image_size}x{self.image_size} px ({self.grid}x{self.grid} patches of {self.patch_size} px)"
            )
        hs = self.vit(pixel_values.to(self.dtype), output_hidden_states=True).hidden_states[self.select_layer]
        if self.post_norm:
            hs = self.vit.post_layernorm(hs)
        return BaseModelOutputWithPooling(last_hidden_state=hs[:, 1:], pooler_output=hs[:, 0])


def _build_tower(config) -> MgllJanusVisionTower:
    from transformers import CLIPVisionConfig

    spec = getattr(config, "mgll_tower", None)
    if not spec:
        raise ValueError("config has no 'mgll_tower' entry: this is not a Janus folder written by `mgll swap`")
    return MgllJanusVisionTower(
        CLIPVisionConfig(**spec["clip_vision_config"]),
        config.vision_config,
        select_layer=int(spec.get("select_layer", DEFAULT_SELECT_LAYER)),
        post_norm=bool(spec.get("post_norm", True)),
    )


@functools.cache
def swapped_class():
    """``MgllJanusForConditionalGeneration``: ``JanusForConditionalGeneration`` whose ``model.vision_model`` is rebuilt from ``config.mgll_tower``."""
    from transformers import JanusForConditionalGeneration

    class MgllJanusForConditionalGeneration(JanusForConditionalGeneration):
        __doc__ = "``JanusForConditionalGeneration`` whose understanding tower is rebuilt from ``config.mgll_tower``."

        def __init__(self, config):
            super().__init__(config)
            self.model.vision_model = _build_tower(config)
            self.post_init()

    MgllJanusForConditionalGeneration.__module__ = __name__
    MgllJanusForConditionalGeneration.__qualname__ = "MgllJanusForConditionalGeneration"
    inherit_checkpoint_renames(MgllJanusForConditionalGeneration, JanusForConditionalGeneration)
    return MgllJanusForConditionalGeneration


def __getattr__(name: str):
    if name == "MgllJanusForConditionalGeneration":
        return swapped_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@register_host("janus")
class JanusHost(Host):
    model_class_name = "MgllJanusForConditionalGeneration"
    source_class_name = "JanusForConditionalGeneration"
    tower_path = "model.vision_model.vit"
    projector_path = "model.aligner"
    language_model_path = "model.language_model"
    lm_head_path = "lm_head"

    def model_class(self):
        return swapped_class()

    def _visual(self, model: nn.Module) -> MgllJanusVisionTower:
        visual = model.model.vision_model
        if not isinstance(visual, MgllJanusVisionTower):
            raise TypeError(f"model.model.vision_model is a {type(visual).__name__}, not an MGLL tower: swap it first")
        return visual

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
        n = int(v.vit.config.num_hidden_layers) + 1
        if not -n <= v.select_layer < n:
            raise ShapeMismatch(f"select_layer={v.select_layer} does not exist in a {n - 1}-block tower")

    def tower_spec(self, model: nn.Module) -> dict[str, Any]:
        v = self._visual(model)
        vc = v.vit.config
        return {
            "hidden_size": int(vc.hidden_size),
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "grid": v.grid,
            "num_layers": int(vc.num_hidden_layers),
            "hidden_act": vc.hidden_act,
            "select_layer": v.select_layer,
            "post_norm": v.post_norm,
            "num_image_tokens": self.num_image_tokens(model),
            "generation_image_tokens": int(model.config.vision_config.num_image_tokens),
            "projector_in_features": self.projector_in_features(model),
        }

    # -- swap ----------------------------------------------------------------------------------
    def replace_tower(self, model: nn.Module, encoder: nn.Module, projector_init: str = "default",
                      select_layer: int = DEFAULT_SELECT_LAYER) -> nn.Module:
        """MGLL ViT in place of the SigLIP tower, fresh aligner at the MGLL width; the generation path is not touched."""
        from transformers import JanusForConditionalGeneration
        from transformers.models.janus.modeling_janus import JanusVisionAlignerMLP

        from mgll.adapters.export_hf import to_hf_clip_vision

        if projector_init not in PROJECTOR_INITS:
            raise ValueError(f"projector_init={projector_init!r}: expected one of {', '.join(PROJECTOR_INITS)}")
        if not isinstance(model, JanusForConditionalGeneration):
            raise TypeError(f"janus host needs a JanusForConditionalGeneration, got {type(model).__name__}")
        ref = model.get_input_embeddings().weight
        dtype, device = ref.dtype, ref.device
        hf_vit = to_hf_clip_vision(encoder, with_projection=False)
        old_aligner = model.model.aligner
        if projector_init == "keep" and int(old_aligner.fc1.in_features) != int(hf_vit.config.hidden_size):
            raise ShapeMismatch(
                f"width mismatch: the aligner expects {old_aligner.fc1.in_features}-wide vision features "
                f"but the tower gives {hf_vit.config.hidden_size}"
            )
        model.config.mgll_tower = {"clip_vision_config": hf_vit.config.to_dict(), "select_layer": int(select_layer), "post_norm": True}
        vc = model.config.vision_config  # the aligner's input width follows the MGLL tower; the generation grid stays
        vc.hidden_size = int(hf_vit.config.hidden_size)
        vc.num_attention_heads = int(hf_vit.config.num_attention_heads)
        visual = _build_tower(model.config)
        visual.vit.load_state_dict(hf_vit.state_dict())
        model.model.vision_model = visual.to(device=device, dtype=dtype)
        if projector_init != "keep":
            aligner = JanusVisionAlignerMLP(vc).to(device=device, dtype=dtype)
            if projector_init == "zero":
                last = aligner.hidden_layers[-1] if len(aligner.hidden_layers) else aligner.fc1
                with torch.no_grad():
                    last.weight.zero_()
                    last.bias.copy_(ref.float().mean(0).to(last.bias.dtype))
            model.model.aligner = aligner
        model.__class__ = swapped_class()
        model.config.architectures = [model.__class__.__name__]
        self.check_fit(model)
        return model

    def make_processor(self, model: nn.Module, processor: Any, tokenizer: Any, encoder: nn.Module) -> Any:
        """A ``JanusProcessor`` at the MGLL image size and statistics, with the MGLL grid's token count."""
        from transformers import JanusImageProcessor, JanusProcessor

        from mgll.adapters.vision_tower import preprocess_cfg_of

        if tokenizer is None and processor is not None:
            tokenizer = processor.tokenizer
        if tokenizer is None:
            raise ValueError("the MLLM folder has neither a processor nor a tokenizer; cannot build the image prompt")
        v = self._visual(model)
        pre = preprocess_cfg_of(encoder)
        image_processor = JanusImageProcessor(
            size={"height": v.image_size, "width": v.image_size},
            min_size=v.patch_size,
            resample={"bicubic": 3, "bilinear": 2, "nearest": 0}.get(pre.get("interpolation", "bicubic"), 3),
            image_mean=list(pre.get("mean", (0.48145466, 0.4578275, 0.40821073))),
            image_std=list(pre.get("std", (0.26862954, 0.26130258, 0.27577711))),
        )
        return JanusProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=getattr(processor, "chat_template", None) if processor is not None else None,
            use_default_system_prompt=bool(getattr(processor, "use_default_system_prompt", False)),
            num_image_tokens=self.num_image_tokens(model),
        )

    # -- alignment batches ---------------------------------------------------------------------
    def build_batch(
        self, model: nn.Module, processor: Any, images: list, prompts: list[str], targets: list[str]
    ) -> dict[str, torch.Tensor]:
        """``[bos] <begin_of_image> <image>*N <end_of_image> prompt target [eos]``; loss on the target."""
        tok = processor.tokenizer
        image_id = int(model.config.image_token_id)
        boi, eoi = tok.convert_tokens_to_ids(processor.image_start_token), tok.convert_tokens_to_ids(processor.image_end_token)
        n = self.num_image_tokens(model)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        rows, labels = [], []
        for prompt, target in zip(prompts, targets):
            head = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + [boi] + [image_id] * n + [eoi]
            head += tok(prompt, add_special_tokens=False)["input_ids"]
            tail = tok(target, add_special_tokens=False)["input_ids"]
            if tok.eos_token_id is not None:
                tail = tail + [tok.eos_token_id]
            rows.append(head + tail)
            labels.append([-100] * len(head) + tail)
        input_ids, mask, label_t = pad_batch(rows, labels, pad)
        pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        return {"input_ids": input_ids, "attention_mask": mask, "labels": label_t, "pixel_values": pixel_values}
