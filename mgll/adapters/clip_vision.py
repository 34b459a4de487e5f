"""An open_clip ViT as transformers' ``CLIPVisionModel``: the exact conversion every host and export uses.

One place converts the weights (layer by layer, activation, projection) and builds the matching
``CLIPVisionConfig``; the hosts put the result in as their tower, ``export-hf`` saves it, and the
full ``CLIPModel`` export (:mod:`mgll.adapters.export_clip`) reuses it for the vision half.
"""

from __future__ import annotations

from typing import Any

import torch
from open_clip.transformer import QuickGELU, ResidualAttentionBlock, VisionTransformer
from torch import nn

__all__ = ["EXPORT_SPEC", "clip_vision_config", "convert_state_dict", "to_hf_clip_vision"]

EXPORT_SPEC = "mgll_export.json"


def _check_exportable(visual: nn.Module) -> None:
    if isinstance(visual.ln_pre, nn.Identity):
        raise ValueError("this ViT has no ln_pre (no_ln_pre=True); CLIPVisionModel always applies pre_layrnorm")
    if getattr(visual, "class_embedding", None) is None:
        raise ValueError("this ViT has no class token; CLIPVisionModel always prepends one")
    for i, blk in enumerate(visual.transformer.resblocks):
        if not isinstance(blk, ResidualAttentionBlock):
            raise ValueError(f"block {i} is {type(blk).__name__} (scaled-cosine / QK-norm attention): no CLIP equivalent")
        if not (isinstance(blk.ls_1, nn.Identity) and isinstance(blk.ls_2, nn.Identity)):
            raise ValueError(f"block {i} uses layer scale (ls_init_value); CLIPEncoderLayer has none")
        if hasattr(blk, "ln_1_kv"):
            raise ValueError(f"block {i} is a cross-attention block")
        if not (hasattr(blk.mlp, "c_fc") and hasattr(blk.mlp, "c_proj")):
            raise ValueError(f"block {i} MLP is not c_fc -> act -> c_proj (SwiGLU?); CLIPMLP cannot express it")
        if not isinstance(blk.attn, nn.MultiheadAttention) or blk.attn.in_proj_weight is None:
            raise ValueError(f"block {i} attention has no fused in_proj; cannot split into q/k/v")


def _activation(visual: nn.Module) -> str:
    act = visual.transformer.resblocks[0].mlp.gelu
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        return "gelu_pytorch_tanh" if act.approximate == "tanh" else "gelu"
    raise ValueError(f"MLP activation {type(act).__name__} has no transformers equivalent")


def _visual_of(model: nn.Module) -> VisionTransformer:
    visual = getattr(model, "visual", model)
    if not isinstance(visual, VisionTransformer):
        raise TypeError(
            f"vision tower must be an open_clip VisionTransformer (ViT); got {type(visual).__name__} "
            "(timm / ModifiedResNet towers have no per-layer token grid to select from)"
        )
    if visual.attn_pool is not None:
        raise TypeError("open_clip ViTs with attentional pooling (CoCa) are not supported as LLaVA towers")
    return visual


def clip_vision_config(model: nn.Module):
    """The ``CLIPVisionConfig`` with the same shape as this open_clip ViT."""
    from transformers import CLIPVisionConfig

    visual = _visual_of(model)
    _check_exportable(visual)
    blk = visual.transformer.resblocks[0]
    ph, pw = visual.patch_size
    h, w = visual.image_size
    if ph != pw or h != w:
        raise ValueError(f"CLIPVisionModel needs a square image and patch; got image {h}x{w}, patch {ph}x{pw}")
    kw: dict[str, Any] = {}
    if visual.proj is not None:
        kw["projection_dim"] = int(visual.proj.shape[1])
    return CLIPVisionConfig(
        hidden_size=int(visual.transformer.width),
        intermediate_size=int(blk.mlp.c_fc.out_features),
        num_hidden_layers=len(visual.transformer.resblocks),
        num_attention_heads=int(blk.attn.num_heads),
        num_channels=int(visual.conv1.in_channels),
        image_size=int(h),
        patch_size=int(ph),
        hidden_act=_activation(visual),
        layer_norm_eps=float(blk.ln_1.eps),
        attention_dropout=0.0,
        **kw,
    )


def convert_state_dict(model: nn.Module, with_projection: bool = True) -> dict[str, torch.Tensor]:
    """open_clip ``visual.*`` weights renamed (and q/k/v split) to ``CLIPVisionModel[WithProjection]`` keys."""
    visual = _visual_of(model)
    _check_exportable(visual)
    p = "vision_model."
    sd: dict[str, torch.Tensor] = {
        p + "embeddings.class_embedding": visual.class_embedding,
        p + "embeddings.patch_embedding.weight": visual.conv1.weight,
        p + "embeddings.position_embedding.weight": visual.positional_embedding,
        p + "pre_layrnorm.weight": visual.ln_pre.weight,
        p + "pre_layrnorm.bias": visual.ln_pre.bias,
        p + "post_layernorm.weight": visual.ln_post.weight,
        p + "post_layernorm.bias": visual.ln_post.bias,
    }
    for i, blk in enumerate(visual.transformer.resblocks):
        q = f"{p}encoder.layers.{i}."
        qw, kw, vw = blk.attn.in_proj_weight.chunk(3, dim=0)
        qb, kb, vb = blk.attn.in_proj_bias.chunk(3, dim=0)
        sd.update(
            {
                q + "self_attn.q_proj.weight": qw,
                q + "self_attn.q_proj.bias": qb,
                q + "self_attn.k_proj.weight": kw,
                q + "self_attn.k_proj.bias": kb,
                q + "self_attn.v_proj.weight": vw,
                q + "self_attn.v_proj.bias": vb,
                q + "self_attn.out_proj.weight": blk.attn.out_proj.weight,
                q + "self_attn.out_proj.bias": blk.attn.out_proj.bias,
                q + "layer_norm1.weight": blk.ln_1.weight,
                q + "layer_norm1.bias": blk.ln_1.bias,
                q + "layer_norm2.weight": blk.ln_2.weight,
                q + "layer_norm2.bias": blk.ln_2.bias,
                q + "mlp.fc1.weight": blk.mlp.c_fc.weight,
                q + "mlp.fc1.bias": blk.mlp.c_fc.bias,
                q + "mlp.fc2.weight": blk.mlp.c_proj.weight,
                q + "mlp.fc2.bias": blk.mlp.c_proj.bias,
            }
        )
    if with_projection and visual.proj is not None:
        sd["visual_projection.weight"] = visual.proj.t()
    return {k: v.detach().to("cpu", torch.float32).clone().contiguous() for k, v in sd.items()}


def _match_keys(sd: dict[str, torch.Tensor], hf: nn.Module) -> dict[str, torch.Tensor]:
    """transformers 5's ``CLIPVisionModel`` has no ``vision_model`` level (``...WithProjection`` still has)."""
    target = set(hf.state_dict())
    return {k if k in target else k.removeprefix("vision_model."): v for k, v in sd.items()}


def to_hf_clip_vision(model: nn.Module, with_projection: bool = True):
    """An in-memory ``CLIPVisionModel`` (or ``...WithProjection``) carrying this ViT's weights."""
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    config = clip_vision_config(model)
    with_projection = with_projection and _visual_of(model).proj is not None
    hf = (CLIPVisionModelWithProjection if with_projection else CLIPVisionModel)(config)
    sd = _match_keys(convert_state_dict(model, with_projection=with_projection), hf)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    return hf.eval()
