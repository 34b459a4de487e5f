"""``mgll export-hf --full``: a whole open_clip CLIP (both towers, projections, logit scale) as a transformers ``CLIPModel``.

Why: the Hugging Face ecosystem (``pipeline("zero-shot-image-classification")``, the Hub's widget,
``CLIPModel.get_text_features``) only knows transformers classes. An MGLL encoder is an open_clip
model, so without this folder it cannot be used there at all.

What maps one to one (and is checked, not assumed):

* the vision tower, as in :mod:`mgll.adapters.export_hf` (class token, ``ln_pre``, plain blocks,
  token pooling through ``ln_post``) plus its projection;
* the text tower: token and position embeddings, causal blocks (fused ``in_proj`` split into
  q/k/v), ``ln_final``, argmax (end-of-text) pooling and ``text_projection``. transformers pools
  the first end-of-text token; open_clip pools the argmax id, which is the same position
  because ``<|endoftext|>`` (49407) is the largest id and open_clip pads with 0;
* ``logit_scale``, stored as the value mgll uses (``exp`` clamped at 100, as open_clip trains it),
  so the pipeline's softmax is ``mgll zeroshot``'s;
* the tokenizer: built from the BPE merges file shipped inside open_clip, so the ids are open_clip's
  ``SimpleTokenizer`` ids (``<start_of_text>``/``<end_of_text>`` are renamed to the HF spellings,
  same ids 49406/49407). Known difference: open_clip runs ``ftfy.fix_text`` and ``html.unescape``
  before BPE and transformers does not, so text with HTML entities (``&amp;``) or characters ftfy
  repairs (curly quotes, mojibake, full-width forms) tokenises differently; plain text does not;
* the image processor: open_clip's eval transform (shortest-edge resize, centre crop, the
  encoder's mean/std). Both transformers backends floor the crop offset where torchvision rounds
  it, a difference of one pixel row/column when ``(resized - crop) / 2`` is an odd multiple of 0.5;
  the default torchvision backend's bicubic also differs from PIL's (the one open_clip uses) by
  about one 8-bit level when an image is actually resized. Images already at the crop size with
  integral offsets are pixel-identical on either backend; ``backend="pil"`` also matches open_clip's resize
  (not the half-pixel crop).

Everything else (SigLIP's sigmoid head and timm towers, Hugging Face text towers, custom
tokenizers, CoCa's attention pooling, average pooling, layer scale, ...) is refused with the
reason, because a ``CLIPModel`` would load it silently and compute something else.
"""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path
from typing import Any

import torch
from open_clip.transformer import QuickGELU, ResidualAttentionBlock
from torch import nn

from mgll.adapters.clip_vision import EXPORT_SPEC, clip_vision_config, convert_state_dict
from mgll.adapters.preprocess import build_image_processor, preprocess_cfg_of, view_spec
from mgll.io import atomic_path, atomic_write_json

__all__ = [
    "MAX_LOGIT_SCALE",
    "check_full_exportable",
    "clip_tokenizer",
    "clip_image_processor",
    "to_hf_clip_model",
    "save_hf_clip_model",
]

MAX_LOGIT_SCALE = 100.0  # open_clip clamps exp(logit_scale) here in training; mgll zeroshot clamps the same
BOS, EOS = "<|startoftext|>", "<|endoftext|>"  # transformers' spellings of open_clip's <start_of_text>/<end_of_text>
_OPEN_CLIP_SPECIAL = {"<start_of_text>": BOS, "<end_of_text>": EOS}


def _text_tower(model: nn.Module) -> nn.Module:
    """The module holding token_embedding / transformer / ln_final: the CLIP itself, or CustomTextCLIP's ``text``."""
    text = getattr(model, "text", None)
    if text is not None and not hasattr(model, "token_embedding"):
        if not all(hasattr(text, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")):
            raise ValueError(f"text tower is {type(text).__name__} (a Hugging Face or custom text model); "
                             "CLIPModel's text tower is open_clip's causal TextTransformer only")
        return text
    if not all(hasattr(model, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")):
        raise ValueError(f"{type(model).__name__} has no open_clip text tower; CLIPModel needs both towers")
    return model


def _block_checks(blocks, tower: str) -> None:
    for i, blk in enumerate(blocks):
        if not isinstance(blk, ResidualAttentionBlock):
            raise ValueError(f"{tower} block {i} is {type(blk).__name__} (scaled-cosine / QK-norm attention): no CLIP equivalent")
        if not (isinstance(blk.ls_1, nn.Identity) and isinstance(blk.ls_2, nn.Identity)):
            raise ValueError(f"{tower} block {i} uses layer scale (ls_init_value); CLIPEncoderLayer has none")
        if not (hasattr(blk.mlp, "c_fc") and hasattr(blk.mlp, "c_proj")):
            raise ValueError(f"{tower} block {i} MLP is not c_fc -> act -> c_proj (SwiGLU?); CLIPMLP cannot express it")
        if not isinstance(blk.attn, nn.MultiheadAttention) or blk.attn.in_proj_weight is None:
            raise ValueError(f"{tower} block {i} attention has no fused in_proj; cannot split into q/k/v")


def _act_name(act: nn.Module, tower: str) -> str:
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        return "gelu_pytorch_tanh" if act.approximate == "tanh" else "gelu"
    raise ValueError(f"{tower} MLP activation {type(act).__name__} has no transformers CLIP equivalent")


def check_full_exportable(model: nn.Module, tokenizer: Any = None) -> None:
    """Raise ``ValueError`` naming the first thing a ``CLIPModel`` cannot represent; return if it can."""
    from open_clip.tokenizer import SimpleTokenizer
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"vision tower is {type(visual).__name__} (timm / ResNet / SigLIP-style); CLIPModel needs open_clip's "
                         "VisionTransformer")
    if visual.attn_pool is not None:
        raise ValueError("vision tower pools with attention (CoCa / attn_pooler); CLIPVisionModel pools the class token")
    if visual.pool_type != "tok":
        raise ValueError(f"vision pool_type={visual.pool_type!r}; CLIPVisionModel pools the class token ('tok')")
    if visual.proj is None:
        raise ValueError("vision tower has no projection (output_dim == width); CLIPModel needs visual_projection")
    if getattr(model, "logit_bias", None) is not None:
        raise ValueError("encoder has a logit_bias (SigLIP / sigmoid-trained); CLIPModel has no bias and its pipeline "
                         "uses a softmax, so sigmoid scores would be lost")
    try:
        clip_vision_config(model)  # ln_pre, class token, block structure, square image and patch
    except TypeError as e:
        raise ValueError(str(e)) from None
    text = _text_tower(model)
    if getattr(text, "cls_emb", None) is not None:
        raise ValueError("text tower has a class-token embedding (embed_cls, CoCa); CLIPTextModel pools end-of-text")
    if getattr(text, "attn_mask", None) is None:
        raise ValueError("text tower is not causal (no_causal_mask=True); CLIPTextModel is always causal")
    pool = getattr(text, "text_pool_type", getattr(text, "pool_type", "argmax"))
    if pool != "argmax":
        raise ValueError(f"text pool_type={pool!r}; CLIPTextModel pools the end-of-text token ('argmax')")
    proj = getattr(text, "text_projection", None)
    if proj is None:
        raise ValueError("text tower has no projection; CLIPModel needs text_projection")
    if isinstance(proj, nn.Linear) and proj.bias is not None:
        raise ValueError("text projection has a bias (proj_bias=True); CLIPModel's text_projection has none")
    _block_checks(text.transformer.resblocks, "text")
    width = int(text.transformer.width)
    out_dim = int(proj.weight.shape[0] if isinstance(proj, nn.Linear) else proj.shape[1])
    if out_dim != int(visual.proj.shape[1]):
        raise ValueError(f"text projection gives {out_dim} features but the vision projection {int(visual.proj.shape[1])}")
    if not isinstance(text.ln_final, nn.LayerNorm) or text.ln_final.normalized_shape != (width,):
        raise ValueError("text tower's final norm is not a LayerNorm over the width")
    if tokenizer is not None:
        if not isinstance(tokenizer, SimpleTokenizer):
            raise ValueError(f"tokenizer is {type(tokenizer).__name__}; the exported CLIPTokenizer reproduces open_clip's "
                             "SimpleTokenizer (CLIP BPE) only")
        if tokenizer.reduction_fn is not None:
            raise ValueError("tokenizer uses a reduction mask (random/shuffle/syntax); CLIPTokenizer truncates")
        if tokenizer.clean_fn.__name__ != "_clean_lower":
            raise ValueError(f"tokenizer cleans text with {tokenizer.clean_fn.__name__}; CLIPTokenizer lower-cases only")
        if len(tokenizer.encoder) != int(text.token_embedding.num_embeddings):
            raise ValueError(f"tokenizer has {len(tokenizer.encoder)} ids but the text tower embeds "
                             f"{int(text.token_embedding.num_embeddings)}")


def _text_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    text = _text_tower(model)
    p = "text_model."
    sd: dict[str, torch.Tensor] = {
        p + "embeddings.token_embedding.weight": text.token_embedding.weight,
        p + "embeddings.position_embedding.weight": text.positional_embedding,
        p + "final_layer_norm.weight": text.ln_final.weight,
        p + "final_layer_norm.bias": text.ln_final.bias,
    }
    for i, blk in enumerate(text.transformer.resblocks):
        q = f"{p}encoder.layers.{i}."
        qw, kw, vw = blk.attn.in_proj_weight.chunk(3, dim=0)
        qb, kb, vb = blk.attn.in_proj_bias.chunk(3, dim=0)
        sd.update({
            q + "self_attn.q_proj.weight": qw, q + "self_attn.q_proj.bias": qb,
            q + "self_attn.k_proj.weight": kw, q + "self_attn.k_proj.bias": kb,
            q + "self_attn.v_proj.weight": vw, q + "self_attn.v_proj.bias": vb,
            q + "self_attn.out_proj.weight": blk.attn.out_proj.weight, q + "self_attn.out_proj.bias": blk.attn.out_proj.bias,
            q + "layer_norm1.weight": blk.ln_1.weight, q + "layer_norm1.bias": blk.ln_1.bias,
            q + "layer_norm2.weight": blk.ln_2.weight, q + "layer_norm2.bias": blk.ln_2.bias,
            q + "mlp.fc1.weight": blk.mlp.c_fc.weight, q + "mlp.fc1.bias": blk.mlp.c_fc.bias,
            q + "mlp.fc2.weight": blk.mlp.c_proj.weight, q + "mlp.fc2.bias": blk.mlp.c_proj.bias,
        })
    proj = text.text_projection
    sd["text_projection.weight"] = proj.weight if isinstance(proj, nn.Linear) else proj.t()
    return {k: v.detach().to("cpu", torch.float32).clone().contiguous() for k, v in sd.items()}


def _logit_scale(model: nn.Module) -> tuple[float, bool]:
    """(log scale to store, whether it was clamped): the scale mgll zeroshot applies, as a log."""
    raw = float(torch.as_tensor(model.logit_scale).detach().float().reshape(-1)[0])
    limit = math.log(MAX_LOGIT_SCALE)
    return (min(raw, limit), raw > limit)


def clip_config(model: nn.Module):
    """The ``CLIPConfig`` whose ``CLIPModel`` has this open_clip model's shapes."""
    from transformers import CLIPConfig, CLIPTextConfig

    check_full_exportable(model)
    vision = clip_vision_config(model)
    text = _text_tower(model)
    blk = text.transformer.resblocks[0]
    embed_dim = int(model.visual.proj.shape[1])
    vision.projection_dim = embed_dim
    text_cfg = CLIPTextConfig(
        vocab_size=int(text.token_embedding.num_embeddings),
        hidden_size=int(text.transformer.width),
        intermediate_size=int(blk.mlp.c_fc.out_features),
        projection_dim=embed_dim,
        num_hidden_layers=len(text.transformer.resblocks),
        num_attention_heads=int(blk.attn.num_heads),
        max_position_embeddings=int(text.positional_embedding.shape[0]),
        hidden_act=_act_name(blk.mlp.gelu, "text"),
        layer_norm_eps=float(blk.ln_1.eps),
        attention_dropout=0.0,
        bos_token_id=49406,
        eos_token_id=49407,  # first end-of-text = open_clip's argmax position (pads are 0 there, 49407 here)
        pad_token_id=49407,
    )
    scale, _ = _logit_scale(model)
    return CLIPConfig(text_config=text_cfg.to_dict(), vision_config=vision.to_dict(), projection_dim=embed_dim,
                      logit_scale_init_value=scale)


def to_hf_clip_model(model: nn.Module):
    """An in-memory ``CLIPModel`` carrying this open_clip model's weights (eval mode)."""
    from transformers import CLIPModel

    config = clip_config(model)
    hf = CLIPModel(config)
    sd = convert_state_dict(model, with_projection=True)
    sd.update(_text_state_dict(model))
    sd["logit_scale"] = torch.tensor(_logit_scale(model)[0])
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def _bpe_vocab_and_merges(bpe_path: str | os.PathLike | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """open_clip's vocabulary and merges, read from the same gzip file and in the same order SimpleTokenizer uses."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(bpe_path or default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_vocab = list(bytes_to_unicode().values())
    vocab = byte_vocab + [v + "</w>" for v in byte_vocab] + ["".join(m) for m in merges]
    vocab += [_OPEN_CLIP_SPECIAL["<start_of_text>"], _OPEN_CLIP_SPECIAL["<end_of_text>"]]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def clip_tokenizer(context_length: int = 77):
    """A transformers ``CLIPTokenizer`` whose ids are open_clip ``SimpleTokenizer``'s (see the module docstring)."""
    from transformers import CLIPTokenizer

    vocab, merges = _bpe_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=int(context_length))


def clip_image_processor(preprocess_cfg: dict[str, Any]):
    """A ``CLIPImageProcessor`` (saved form; loads on either backend) doing open_clip's eval transform.

    ``CLIPModel`` takes square images; :func:`~mgll.adapters.preprocess.view_spec` refuses anything else,
    and :func:`~mgll.adapters.preprocess.build_image_processor` is the one place that writes the processor.
    """
    view_spec(preprocess_cfg)  # square size, shortest or squash, a known interpolation: else one clear error
    return build_image_processor(preprocess_cfg)


def save_hf_clip_model(model: nn.Module, tokenizer: Any, out: str | os.PathLike, source: str = "",
                       card: Any = None) -> Path:
    """Write ``out`` atomically: config.json, model.safetensors, tokenizer, processor, mgll_export.json (+ README.md card)."""
    from transformers import CLIPProcessor

    check_full_exportable(model, tokenizer)
    hf = to_hf_clip_model(model)
    cfg = preprocess_cfg_of(model)
    processor = CLIPProcessor(image_processor=clip_image_processor(cfg), tokenizer=clip_tokenizer(tokenizer.context_length))
    _, clamped = _logit_scale(model)
    out = Path(out)
    with atomic_path(out) as tmp:
        hf.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        atomic_write_json(
            tmp / EXPORT_SPEC,
            {
                "source": str(source),
                "class": type(hf).__name__,
                "full": True,
                "logit_scale": float(hf.logit_scale.detach().exp()),
                "logit_scale_clamped": clamped,
                "preprocess_cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
                "note": "pipeline('zero-shot-image-classification') gives mgll zeroshot's single-template softmax; "
                        "pass image_processor=AutoImageProcessor.from_pretrained(folder, backend='pil') for PIL's resize",
            },
        )
        if card is not None:
            card(tmp)
    return out
