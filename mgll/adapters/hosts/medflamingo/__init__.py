"""Med-Flamingo (OpenFlamingo) host: the MGLL ViT reaches the pretrained Perceiver through a bridge.

Flamingo reads its open_clip ViT's final patch tokens (after ``ln_post``) into a
``PerceiverResampler(dim=vis_dim)``, whose latents feed the gated cross-attention layers spliced
into the LM (``to_kv`` takes ``vis_dim``-wide inputs). Med-Flamingo's trained parts are exactly
that Perceiver and those cross-attention layers. This host keeps both and **bridges**
(``Linear(mgll_width, vis_dim)`` + ``LayerNorm``) instead of re-initialising the Perceiver at the
MGLL width, because:

* re-initialising throws away everything Med-Flamingo learnt about reading images (Perceiver and
  the ``to_kv`` of every cross-attention layer would be new) and needs OpenFlamingo's interleaved
  pretraining again; the bridge is one new matrix;
* the bridge is used at every width, also when an MGLL ViT-L/14 is 1024 wide like the stock tower:
  the MGLL features are not OpenAI CLIP's features, so an identity would be a wrong start too.

Stage 1 trains the bridge alone: the Perceiver, cross-attention, LM and tower stay bit-equal, so
the alignment only learns to map MGLL features into the space the frozen Perceiver already reads.
Stage 2 adds LoRA on the LM's own attention/MLP linears (``q_proj`` ... ``down_proj``); the gated
cross-attention (``to_q``/``to_kv``/``to_out``/``ff``) is Med-Flamingo's trained image path and
stays frozen, as in stage 1. The LM sees one ``<image>`` token per image; the cross-attention
reads the Perceiver's ``num_latents`` latents per image (64 for Med-Flamingo), which is this
host's image-token count.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from mgll.adapters.hosts.base import Host, ShapeMismatch, mgll_part, resolve_tokenizer
from mgll.adapters.hosts.registry import register_host

__all__ = ["MedFlamingoHost", "require_open_flamingo"]


def require_open_flamingo() -> None:
    try:
        import open_flamingo  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "the medflamingo host needs open_flamingo (OpenFlamingo 2.0.1): run scripts/install_open_flamingo.sh"
        ) from e


@register_host("medflamingo")
class MedFlamingoHost(Host):
    shares_prompt_prefix = False  # its own greedy loop takes no cache
    model_class_name = "MgllFlamingo"
    tower_path = "vision_encoder"
    projector_path = "bridge"
    language_model_path = "lang_encoder"
    lm_head_path = "lang_encoder.lm_head"

    def __init__(self) -> None:
        # swapped folders carry a MgllFlamingoProcessor; make AutoProcessor (align, load_swapped) find it
        from mgll.adapters.hosts.medflamingo.processor import register_auto_processor

        register_auto_processor()

    def model_class(self):
        require_open_flamingo()
        from mgll.adapters.hosts.medflamingo.model import flamingo_class

        return flamingo_class()

    def source_class(self):
        return self.model_class()

    def source_model_types(self) -> tuple[str, ...]:
        return ()  # an OpenFlamingo folder (flamingo_config.json), not a transformers config.json

    def load_source(self, mllm: str | os.PathLike, dtype: torch.dtype | None = None):
        """``(model, processor, tokenizer)`` from a Flamingo folder (``flamingo_config.json``, LM folder, checkpoint)."""
        require_open_flamingo()
        from mgll.adapters.hosts.medflamingo.model import load_flamingo

        model, tokenizer = load_flamingo(mllm, dtype=dtype)
        return model, None, tokenizer

    def _model(self, model: nn.Module):
        from mgll.adapters.hosts.medflamingo.model import MgllFlamingoTower, flamingo_class

        if not isinstance(model, flamingo_class()):
            raise TypeError(f"medflamingo host needs an MgllFlamingo (mgll.adapters.hosts.medflamingo.model), got {type(model).__name__}")
        mgll_part(model, "vision_encoder", MgllFlamingoTower)
        return model

    def unquantised_modules(self) -> list[str]:
        """Everything Flamingo adds to the LM stays in float: tower, bridge, Perceiver, gated cross-attention, lm_head."""
        return [self.tower_path, self.projector_path, "perceiver", "lang_encoder.gated_cross_attn_layers", self.lm_head_path]

    # -- token grid ----------------------------------------------------------------------------
    def num_image_tokens(self, model: nn.Module) -> int:
        """Perceiver latents per image: what each cross-attention layer reads, whatever the MGLL grid."""
        return int(model.perceiver.latents.shape[0])

    def projector_in_features(self, model: nn.Module) -> int:
        return int(self._model(model).bridge[0].in_features)

    def check_fit(self, model: nn.Module) -> None:
        m = self._model(model)
        width, expects = int(m.vision_encoder.vit.config.hidden_size), self.projector_in_features(m)
        if width != expects:
            raise ShapeMismatch(f"width mismatch: the bridge expects {expects}-wide vision features but the tower gives {width}")
        out, perceiver = int(m.bridge[0].out_features), int(m.perceiver.latents.shape[1])
        if out != perceiver:
            raise ShapeMismatch(f"width mismatch: the Perceiver takes {perceiver}-wide features but the bridge gives {out}")
        for i, layer in enumerate(m.lang_encoder.gated_cross_attn_layers):
            if layer is not None and int(layer.attn.to_kv.in_features) != perceiver:
                raise ShapeMismatch(
                    f"width mismatch: gated cross-attention layer {i} reads {layer.attn.to_kv.in_features}-wide media "
                    f"but the Perceiver gives {perceiver}"
                )

    def tower_spec(self, model: nn.Module) -> dict[str, Any]:
        m = self._model(model)
        vc, t = m.vision_encoder.vit.config, m.vision_encoder
        vis_dim = int(m.perceiver.latents.shape[1])
        return {
            "hidden_size": int(vc.hidden_size),
            "image_size": t.image_size,
            "patch_size": t.patch_size,
            "grid": t.grid,
            "num_layers": int(vc.num_hidden_layers),
            "features": "last block, after ln_post, patch tokens (OpenFlamingo's output_tokens)",
            "bridge": f"Linear({vc.hidden_size}, {vis_dim}) + LayerNorm",
            "vis_dim": vis_dim,
            "cross_attn_every_n_layers": int(m.flamingo_config["cross_attn_every_n_layers"]),
            "num_image_tokens": self.num_image_tokens(m),
            "projector_in_features": self.projector_in_features(m),
        }

    # -- swap ----------------------------------------------------------------------------------
    def replace_tower(self, model: nn.Module, encoder: nn.Module, projector_init: str = "default") -> nn.Module:
        """MGLL ViT + fresh bridge in place of the open_clip ViT; Perceiver, cross-attention and LM are kept."""
        from mgll.adapters.clip_vision import to_hf_clip_vision
        from mgll.adapters.hosts.medflamingo.model import MgllFlamingoTower, flamingo_class, make_bridge

        if projector_init != "default":
            raise ValueError(
                f"projector_init={projector_init!r}: the medflamingo host supports 'default' only "
                "(its new module is the bridge into the pretrained Perceiver)"
            )
        if not isinstance(model, flamingo_class()):
            raise TypeError(f"medflamingo host needs an MgllFlamingo (load it with mgll.adapters.hosts.medflamingo.model), got {type(model).__name__}")
        ref = next(model.perceiver.parameters())
        hf_vit = to_hf_clip_vision(encoder, with_projection=False)
        tower = MgllFlamingoTower(hf_vit.config)
        tower.vit.load_state_dict(hf_vit.state_dict())
        bridge = make_bridge(int(hf_vit.config.hidden_size), int(model.perceiver.latents.shape[1]))
        model.vision_encoder = tower.to(device=ref.device, dtype=ref.dtype).eval()
        model.bridge = bridge.to(device=ref.device, dtype=ref.dtype)
        model.flamingo_config.pop("vision_encoder", None)
        model.flamingo_config["mgll_tower"] = {"clip_vision_config": hf_vit.config.to_dict()}
        self.check_fit(model)
        return model

    def source_processor(self, model: nn.Module, tokenizer: Any) -> Any:
        """The unswapped model's processor (``mgll mcq`` / ``mgll demo`` base): its own open_clip ViT's preprocessing."""
        from mgll.adapters.hosts.medflamingo.processor import processor_class
        from mgll.adapters.preprocess import build_image_processor, preprocess_cfg_of

        return processor_class()(image_processor=build_image_processor(preprocess_cfg_of(model.vision_encoder)), tokenizer=tokenizer)

    def make_processor(self, model: nn.Module, processor: Any, tokenizer: Any, encoder: nn.Module, view: str = "crop") -> Any:
        """An ``MgllFlamingoProcessor``: the MGLL encoder's resize/normalisation + the LM tokenizer (with ``<image>``, ``<|endofchunk|>``)."""
        if view != "crop":
            raise ValueError(f"image view {view!r}: the medflamingo host uses the encoder's own open_clip transform (crop) only")
        from mgll.adapters.hosts.medflamingo.processor import EOC_TOKEN, MEDIA_TOKEN, processor_class
        from mgll.adapters.preprocess import build_image_processor, preprocess_cfg_of

        tokenizer = resolve_tokenizer(processor, tokenizer, "the Flamingo folder has no tokenizer; cannot build the prompts")
        m = self._model(model)
        for token, want in ((MEDIA_TOKEN, m.media_token_id), (EOC_TOKEN, m.eoc_token_id)):
            got = tokenizer.convert_tokens_to_ids(token)
            if got != want:
                raise ValueError(f"tokenizer maps {token} to {got} but the Flamingo config says {want}")
        return processor_class()(image_processor=build_image_processor(preprocess_cfg_of(encoder)), tokenizer=tokenizer)

    # -- alignment batches ---------------------------------------------------------------------
    def target_end_ids(self, model: nn.Module, tokenizer: Any) -> list[int]:
        """OpenFlamingo closes each image-text chunk with ``<|endofchunk|>``, not the LM's end-of-sequence."""
        m = model.get_base_model() if hasattr(model, "get_base_model") else model
        return [int(m.eoc_token_id)]
