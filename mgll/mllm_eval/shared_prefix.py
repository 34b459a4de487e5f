"""A circular question's rotations with their common prompt prefix run once (``generate`` and ``loglik``).

Why: under circular evaluation every question is asked K times, its options rotated, so the K
prompts share the image and the question text: 592 of 620 tokens on a LLaVA-1.5 prompt. Where the
prompt forward is arithmetic-bound (a CPU; a GPU at large batch) batching the K prompts saves
nothing on that forward (``benchmarks/results/mcq_throughput.md``); running the common prefix
once per question and continuing each rotation from a copy of its KV cache does.

How, for one batch of prompts (``keys`` says which rows belong to one question):

1. each group's prefix is the longest run of token ids its rows share, cut so every row keeps at
   least one token of its own; it must hold every image token (else the batch is not shared);
2. the prefixes of all groups are one left-padded forward of the groups' first rows, with the
   vision inputs the processor gives those rows and positions counted along the attention mask,
   so each prefix sits where it sits alone;
3. the cache rows are gathered so that every prompt gets its group's, and each prompt's own
   tokens follow in a left-padded block: a gap of masked pads between prefix and own tokens,
   which the model does not see (``generate`` numbers positions along the attention mask;
   ``scoring.shared_option_logliks`` does the same before it scores the options).

For ``generate`` the continued cache is a static (preallocated) one: a dynamic cache grows by
concatenation, which copies every row's whole cache at every decode step. Qwen2-VL's M-RoPE
offsets, which the model keeps between calls for a continued cache, are set for the continued
rows (:func:`~mgll.mllm_eval.kv_cache.keep_rope_offsets`).

The answers equal the unbatched ones (``tests/test_mcq_batching.py``). Hosts whose image features
depend on the text after them (InstructBLIP's Q-Former reads the options) or that run their own
loop (Med-Flamingo) opt out (``Host.shares_prompt_prefix``); :func:`shared_prefix_inputs` then
returns None and the caller batches the full prompts.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
from PIL import Image

from mgll.adapters.hosts import get_host
from mgll.adapters.prompts import encode_prefixes
from mgll.mllm_eval.kv_cache import (
    TOKEN_ALIGNED,
    base_model,
    cache_kwarg,
    cache_of,
    keep_last_logit_kw,
    keep_rope_offsets,
    positions_and_rope_offsets,
)

__all__ = ["common_prefix_length", "group_rows", "shared_prefix_inputs"]


def group_rows(keys: list[Hashable]) -> list[list[int]]:
    """Row indices grouped by key, groups in order of first appearance."""
    groups: dict[Hashable, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    return list(groups.values())


def common_prefix_length(rows: list[torch.Tensor]) -> int:
    """Tokens all rows start with, at most the shortest row's length - 1 (each row keeps one of its own)."""
    n = min(len(r) for r in rows) - 1
    first = rows[0][:n]
    for r in rows[1:]:
        differ = (r[:n] != first[:n]).nonzero()
        if len(differ):
            n = int(differ[0])
    return max(n, 0)


def _image_token_id(model) -> int | None:
    config = base_model(model).config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _left_packed(rows: list[torch.Tensor], width: int, fill: int) -> torch.Tensor:
    out = torch.full((len(rows), width), fill, dtype=rows[0].dtype, device=rows[0].device)
    for i, r in enumerate(rows):
        if len(r):
            out[i, width - len(r):] = r
    return out


def _keeps_whole_prefix(model) -> bool:
    """False for an LM with sliding-window or chunked layers: their cache keeps only part of a long prefix."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    types = get_layer_types_and_kwargs(base_model(model).config.get_text_config(decoder=True))[0]
    return all(t in ("full_attention", "dummy") for t in types)


def _static_cache(model, max_len: int):
    """A preallocated (static) cache of ``max_len`` positions for ``generate``, or None where it takes none.

    A dynamic cache grows by concatenation: every decode step copies every row's whole cache (on a
    CPU that was 46 % of a batch of 8 continuing a 592-token prefix); a static one is written in
    place. None when the model's generation config names its own cache (``generate`` refuses a
    second one).
    """
    from transformers import StaticCache

    if getattr(getattr(base_model(model), "generation_config", None), "cache_implementation", None) is not None:
        return None
    return StaticCache(config=base_model(model).config, max_cache_len=max_len)


@torch.inference_mode()
def shared_prefix_inputs(host: str, model, processor: Any, prompts: list[str], images: list[Image.Image],
                         keys: list[Hashable], prefix: dict, device, dtype, max_new_tokens: int | None) -> dict | None:
    """Inputs continuing ``prompts`` whose groups (equal ``keys``) ran their common prefix once, or None.

    ``max_new_tokens`` sizes the static cache ``generate`` continues; None (``loglik``) gives
    instead a dynamic cache, one row per prompt, that ``scoring.shared_option_logliks`` continues
    and regathers for the options, and the M-RoPE offsets under ``"rope_deltas"`` (None for other
    models).

    ``keys`` must tell apart rows that do not share an image (the scorer uses the question id and
    the image object). ``prefix`` is the left-padded encoding of all prompts (``encode_prefixes``);
    the result holds ``input_ids`` and ``attention_mask`` of the whole sequences (cached prefix
    columns, then each row's own tokens) and the KV cache of the prefix columns under the model's
    cache argument. None, before any forward, when the host opts out, no group has two rows, the
    model names no image token, a group's prefix does not hold every image token of its rows (or
    holds none), the LM's cache keeps only part of a prefix, or ``generate`` takes no static cache
    (:func:`_static_cache`).
    """
    groups = group_rows(keys)
    if not get_host(host).shares_prompt_prefix or all(len(g) == 1 for g in groups):
        return None
    image_id = _image_token_id(model)
    if image_id is None or not _keeps_whole_prefix(model):
        return None
    ids, mask = prefix["input_ids"], prefix["attention_mask"]
    real = [ids[r][mask[r].bool()] for r in range(ids.shape[0])]
    lengths = [common_prefix_length([real[r] for r in g]) for g in groups]
    for g, n in zip(groups, lengths):
        if any(bool((real[r][n:] == image_id).any()) or not bool((real[r][:n] == image_id).any()) for r in g):
            return None
    row_group = [0] * len(prompts)
    for gi, g in enumerate(groups):
        for r in g:
            row_group[r] = gi
    tails = [real[r][lengths[row_group[r]]:] for r in range(len(prompts))]
    width, tail_width = max(lengths), max(len(t) for t in tails)
    static = None if max_new_tokens is None else _static_cache(model, width + tail_width + max_new_tokens)
    if max_new_tokens is not None and static is None:
        return None
    heads = [g[0] for g in groups]
    rep = encode_prefixes(processor, [prompts[r] for r in heads], [images[r] for r in heads], device, dtype)
    pre = {k: v for k, v in rep.items() if k != "input_ids" and k not in TOKEN_ALIGNED}  # the vision inputs
    rep_mask = rep["attention_mask"].bool()
    for key in ("input_ids", *[k for k in TOKEN_ALIGNED if k in rep]):
        own = [rep[key][i][rep_mask[i]][:n] for i, n in enumerate(lengths)]
        pre[key] = _left_packed(own, width, 0)  # pads: id 0 under a 0 in the mask
    for i, n in enumerate(lengths):  # the processor's tokens for a group's first row are that row's tokens
        if not torch.equal(pre["input_ids"][i, width - n:], real[heads[i]][:n]):
            return None
    positions, offsets = positions_and_rope_offsets(model, pre)
    out = model(**pre, position_ids=positions, use_cache=True, **keep_last_logit_kw(model))
    index = torch.tensor(row_group, device=ids.device)
    cache = cache_of(out)
    if static is None:
        cache.batch_select_indices(index)  # every row gets its group's prefix
    else:
        for i, layer in enumerate(cache.layers):
            static.update(layer.keys[index], layer.values[index], i)
        cache = static
    deltas = None if offsets is None else offsets[index]
    keep_rope_offsets(model, deltas)
    pad = getattr(getattr(processor, "tokenizer", processor), "pad_token_id", None)
    tail_ids = _left_packed(tails, tail_width, 0 if pad is None else pad)
    tail_mask = _left_packed([torch.ones(len(t), dtype=mask.dtype, device=ids.device) for t in tails], tail_width, 0)
    inputs = {
        "input_ids": torch.cat([pre["input_ids"][index], tail_ids], dim=1),
        "attention_mask": torch.cat([pre["attention_mask"][index], tail_mask], dim=1),
        cache_kwarg(model): cache,
    }
    if max_new_tokens is None:
        inputs["rope_deltas"] = deltas
    else:  # a static cache would switch on torch.compile on CUDA, recompiling for every batch's cache length
        inputs["disable_compile"] = True
    for key in TOKEN_ALIGNED:  # token types of the own tokens: text (the images are all in the prefix)
        if key != "attention_mask" and key in pre:
            inputs[key] = torch.cat([pre[key][index], torch.full_like(tail_ids, TOKEN_ALIGNED[key])], dim=1)
    return inputs
