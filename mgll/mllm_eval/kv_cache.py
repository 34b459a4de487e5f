"""What the scorers need to run a prefix once and continue it: the model under peft, the KV cache's
argument name and place in an output, the one-logit flag, and the positions a padded row needs.

Kept apart from ``scoring`` so that the shared-prefix generator (``shared_prefix``, which ``scoring``
imports) and the scorers use one copy of each without an import circle.
"""

from __future__ import annotations

import inspect

import torch

__all__ = [
    "TOKEN_ALIGNED", "base_model", "cache_kwarg", "cache_of", "keep_last_logit_kw", "keep_rope_offsets",
    "positions_and_rope_offsets", "prefix_positions",
]

# per-token inputs beyond input_ids, and the value an appended text token takes in each
TOKEN_ALIGNED = {"attention_mask": 1, "token_type_ids": 0, "mm_token_type_ids": 0}


def base_model(model):
    """The transformers model under a peft wrapper (LoRA layers sit inside it, so it scores the same)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def cache_kwarg(model) -> str:
    """transformers 5.2x calls the KV cache argument ``cache``; earlier releases ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(base_model(model).forward).parameters else "past_key_values"


def cache_of(out):
    """The KV cache in a forward's output (InstructBLIP nests its LM's output)."""
    for o in (out, out.get("language_model_outputs")):
        if o is None:
            continue
        for key in ("cache", "past_key_values"):
            if o.get(key) is not None:
                return o.get(key)
    raise ValueError(f"{type(out).__name__} holds no KV cache; the model was not run with use_cache=True")


def keep_last_logit_kw(model) -> dict:
    """Only the last prefix position's logits are needed; skip a (tokens x vocab) tensor where allowed."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base_model(model).forward).parameters else {}


def _rope_owner(model):
    """The module holding Qwen2-VL's ``get_rope_index`` and its ``rope_deltas`` (the model or its inner ``model``)."""
    for m in (model, getattr(model, "model", None)):
        if m is not None and hasattr(m, "get_rope_index"):
            return m
    return None


def prefix_positions(host: str, model, prefix: dict) -> torch.Tensor:
    """Position ids a padded prefix batch needs so that every row is positioned as it is alone.

    A plain forward numbers tokens by column, which shifts a left-padded row by its pad count
    (RoPE is shift-invariant only up to rounding; absolute embeddings are not at all): here the
    real tokens count from 0 along the attention mask, pads anywhere in the row (InstructBLIP puts
    its query tokens before the pads) included. Qwen2-VL's M-RoPE gives image patches 3-D
    positions; its own ``get_rope_index`` computes them over each row's unmasked tokens, as
    ``generate`` does. Returns ``(B, n)``, or ``(3, B, n)`` for M-RoPE.
    """
    return positions_and_rope_offsets(model, prefix)[0]


def positions_and_rope_offsets(model, prefix: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`prefix_positions` and, on an M-RoPE model, each row's offset ``(B, 1)`` (else None), from one call.

    Qwen2-VL numbers the text after an image from the image grid's extent, not from the token
    count: the offset is what a continuation adds to positions counted along the attention mask.
    """
    mask = prefix["attention_mask"]
    owner = _rope_owner(base_model(model))
    if owner is not None and "image_grid_thw" in prefix:
        kw = {k: prefix[k] for k in ("mm_token_type_ids", "image_grid_thw") if k in prefix}
        return owner.get_rope_index(prefix["input_ids"], attention_mask=mask, **kw)
    return (mask.long().cumsum(-1) - 1).clamp(min=0), None


def keep_rope_offsets(model, offsets: torch.Tensor | None) -> None:
    """Leave ``offsets`` (one per row, from :func:`positions_and_rope_offsets`) on an M-RoPE model.

    ``generate`` continuing a given cache adds the offset the model kept from its last prompt
    (``rope_deltas``) to positions counted along the attention mask; a prefix run with explicit
    positions keeps none, so the caller sets them for the rows it continues. No-op without offsets.
    """
    if offsets is not None:
        _rope_owner(base_model(model)).rope_deltas = offsets
