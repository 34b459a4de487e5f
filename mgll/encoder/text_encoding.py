"""Encode label texts cheaply: each distinct text once, token sequences trimmed to the longest.

Label texts are short ("a fundus photograph showing drusen" is ~8 tokens) but open_clip pads
them to 77, so most of the text tower's work is on padding. With a causal mask and
argmax (end-of-text) pooling, positions after the end-of-text token never influence the
pooled feature, so cutting the sequence after the longest text's end-of-text token gives the
same features. open_clip 3.3's ``encode_text`` adds the full 77-position embedding and mask,
so the forward below slices both to the trimmed length. Towers where padding is visible
(pad masks, class tokens, HF text models, non-causal masks) fall back to the full forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool

__all__ = ["trimmed_length", "encode_text_trimmed", "encode_texts", "supports_trimming"]


def _text_tower(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module that owns token_embedding/positional_embedding/transformer, or None."""
    for tower in (model, getattr(model, "text", None)):
        if tower is not None and all(
            hasattr(tower, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")
        ):
            return tower
    return None


def supports_trimming(model: torch.nn.Module) -> bool:
    tower = _text_tower(model)
    if tower is None:
        return False
    if getattr(tower, "cls_emb", None) is not None or getattr(tower, "use_pad_mask", False):
        return False
    pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
    return pool == "argmax" and getattr(tower, "attn_mask", None) is not None


def trimmed_length(tokens: torch.Tensor) -> int:
    """Length up to and including the latest end-of-text token (the row-wise argmax)."""
    return int(tokens.argmax(dim=-1).max().item()) + 1


def encode_text_trimmed(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Unnormalised text features of ``tokens`` (N, 77) with the sequence cut after the last EOT."""
    if not supports_trimming(model):
        return model.encode_text(tokens)
    tower = _text_tower(model)
    length = trimmed_length(tokens)
    tokens = tokens[:, :length]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(tokens).to(cast_dtype)
    x = x + tower.positional_embedding[:length].to(cast_dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
    x = tower.ln_final(x)
    x = text_global_pool(x, tokens, "argmax")
    proj = tower.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x


def encode_texts(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    device: torch.device | str,
    normalize: bool = True,
    trim: bool = True,
) -> torch.Tensor:
    """Tokenise and encode ``texts`` (callers pass distinct texts), trimmed when the tower allows."""
    if len(texts) == 0:
        raise ValueError("encode_texts needs at least one text")
    tokens = tokenizer(list(texts)).to(device)
    feats = encode_text_trimmed(model, tokens) if trim else model.encode_text(tokens)
    return F.normalize(feats, dim=-1) if normalize else feats
