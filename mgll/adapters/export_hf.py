"""Convert an open_clip ViT (an MGLL run's vision tower) into a transformers ``CLIPVisionModel`` folder.

Every LLaVA-family checkpoint on the Hub describes its vision tower as a ``CLIPVisionConfig``;
writing the MGLL tower in that format lets those models use it with no custom code. The weights
map one to one (open_clip's fused ``in_proj`` is split into q/k/v); architectures with no
CLIPVisionModel equivalent (layer scale, attention pooling, no ``ln_pre``, SwiGLU, QK-norm) are
refused with the reason instead of being exported wrongly.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from mgll.adapters.clip_vision import EXPORT_SPEC, to_hf_clip_vision
from mgll.adapters.preprocess import build_image_processor, preprocess_cfg_of
from mgll.io import atomic_path, atomic_write_json

__all__ = ["export_hf", "save_hf_clip_vision"]

def export_hf(
    run_or_name: str | os.PathLike,
    out: str | os.PathLike,
    pretrained: str | None = None,
    with_projection: bool = True,
    overwrite: bool = False,
    full: bool = False,
) -> Path:
    """Write ``out`` (config.json, model.safetensors, preprocessor_config.json, mgll_export.json) atomically.

    An existing non-empty ``out`` is replaced only with ``overwrite``.

    Saved as ``CLIPVisionModelWithProjection`` when the ViT has a projection; ``CLIPVisionModel``
    and ``AutoModel`` load the same folder and ignore ``visual_projection``. ``full`` writes the
    whole model instead, text tower, tokenizer and logit scale included, as a ``CLIPModel``
    (:mod:`mgll.adapters.export_clip`), for ``pipeline("zero-shot-image-classification")``.
    """
    from mgll.encoder.factory import create_encoder
    from mgll.io import check_out_free

    check_out_free(out, overwrite)
    if full and not with_projection:
        raise ValueError("--full exports both projection heads (CLIPModel needs them); drop --no-projection")

    model, _, _, tokenizer, name = create_encoder(str(run_or_name), pretrained=pretrained)
    card = _card_writer(run_or_name, name, pretrained, full)
    if full:
        from mgll.adapters.export_clip import save_hf_clip_model

        return save_hf_clip_model(model, tokenizer, out, source=name, card=card)
    return save_hf_clip_vision(model, out, source=name, with_projection=with_projection, card=card)


def _card_writer(run_or_name, name: str, pretrained: str | None, full: bool):
    """``card(folder)``: writes the export's model card into the temporary folder before it is renamed."""
    from mgll.model_card import export_hf_card, write_card

    def card(folder: Path) -> None:
        write_card(folder, export_hf_card(folder, source=str(run_or_name), model_name=name, pretrained=pretrained, full=full))

    return card


def save_hf_clip_vision(model: nn.Module, out: str | os.PathLike, source: str = "", with_projection: bool = True,
                        card=None) -> Path:
    hf = to_hf_clip_vision(model, with_projection=with_projection)
    cfg = preprocess_cfg_of(model)
    processor = build_image_processor(cfg)
    out = Path(out)
    with atomic_path(out) as tmp:
        hf.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        atomic_write_json(
            tmp / EXPORT_SPEC,
            {
                "source": str(source),
                "class": type(hf).__name__,
                "hidden_act": hf.config.hidden_act,
                "preprocess_cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
                "note": "hidden_states[i] of this model equal open_clip's block-i output (0 = after ln_pre)",
            },
        )
        if card is not None:
            card(tmp)
    return out
