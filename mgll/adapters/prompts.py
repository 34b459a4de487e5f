"""One prompt layout for alignment and inference: what a swapped MLLM is trained on is what it is asked.

A projector trained on one token layout and evaluated on another is a silent mismatch: the
alignment batches used to put the caption after a bare ``"\\n"`` with no chat template, left out
Qwen2-VL's ``<|vision_start|>``/``<|vision_end|>`` and gave InstructBLIP's Q-Former an empty
instruction, while generation and ``mgll mcq`` used the chat template. Here both paths build the
prompt with :func:`build_prompt` and encode it with the processor's own full call (image tokens,
vision markers, Q-Former text, per-token type ids); an alignment row is that prompt followed by
the target and the host's end token, with the loss on the target only.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

__all__ = ["build_prompt", "encode_prefix", "encode_prefixes", "alignment_batch"]


def build_prompt(host: str, processor: Any, text: str) -> str:
    """The processor's chat template (image + text user turn, generation prompt) when it has one.

    Without one, a plain template per family: LLaVA's ``USER: <image>\\n... ASSISTANT:``,
    Qwen2-VL's vision markers, and InstructBLIP's bare text (its processor adds the query tokens).
    """
    template = getattr(processor, "chat_template", None)
    if template:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image_token = getattr(processor, "image_token", None) or "<image>"
    if host == "instructblip":
        return f"{text}\nAnswer:"
    if host == "medflamingo":  # OpenFlamingo's few-shot VQA format
        return f"{image_token}Question: {text} Answer:"
    if host == "qwen2_vl":
        return f"{image_token}\n{text}\nAnswer:"
    return f"USER: {image_token}\n{text}\nASSISTANT:"


def encode_prefix(processor: Any, prompt: str, image: Image.Image, device: torch.device | str, dtype: torch.dtype) -> dict:
    """The model inputs for one prompt and image, as inference builds them (floating tensors in ``dtype``)."""
    return _on_device(processor(text=[prompt], images=[image], return_tensors="pt"), device, dtype)


def _on_device(inputs: Any, device: torch.device | str, dtype: torch.dtype) -> dict:
    """The processor output's tensors on ``device``; floating ones (pixels) in ``dtype``, ids and masks as they are."""
    out = {}
    for k, v in inputs.items():
        if not torch.is_tensor(v):
            continue
        v = v.to(device)
        out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


def encode_prefixes(processor: Any, prompts: list[str], images: list[Image.Image], device: torch.device | str,
                    dtype: torch.dtype) -> dict:
    """The model inputs for several prompts, one image each, in one processor call, left-padded.

    Left padding puts every row's last real token in the last column, where ``generate`` and a
    one-logit prefix forward read. Each row is tokenised and each image preprocessed as
    :func:`encode_prefix` does alone; per-image vision inputs (LLaVA-NeXT tiles + ``image_sizes``,
    Qwen2-VL patches + ``image_grid_thw``, InternVL tiles) come out of the same call. InstructBLIP's
    Q-Former ids are moved back to right padding: its BERT embeds *absolute* positions counted from
    column 0, so a left-padded instruction would shift every real token's position, whereas a
    right-padded one leaves them as unpadded and the mask hides the pads.
    """
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images: give one image per prompt")
    tok = getattr(processor, "tokenizer", processor)
    side, pad = tok.padding_side, tok.pad_token
    tok.padding_side = "left"  # some processors read the tokenizer's attribute rather than the call's keyword
    if pad is None:  # a checkpoint without a pad token: any id will do under the mask
        tok.pad_token = tok.eos_token
    try:
        enc = processor(text=list(prompts), images=list(images), return_tensors="pt", padding=True, padding_side="left")
    finally:
        tok.padding_side = side
        if pad is None:
            tok.pad_token = None
    mask = enc.get("attention_mask")
    if mask is not None and not bool(mask[:, -1].all()):
        raise ValueError(f"{type(processor).__name__} did not left-pad the prompts; cannot batch them")
    if "qformer_input_ids" in enc:
        qtok = processor.qformer_tokenizer
        ids, qmask = _right_align(enc["qformer_input_ids"], enc["qformer_attention_mask"], qtok.pad_token_id)
        enc["qformer_input_ids"], enc["qformer_attention_mask"] = ids, qmask
    return _on_device(enc, device, dtype)


def _right_align(ids: torch.Tensor, mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows' real tokens (mask 1) moved to the start, pads after them, order kept."""
    new_ids, new_mask = torch.full_like(ids, pad_id), torch.zeros_like(mask)
    for i in range(ids.shape[0]):
        real = ids[i][mask[i].bool()]
        new_ids[i, : real.numel()] = real
        new_mask[i, : real.numel()] = 1
    return new_ids, new_mask


def alignment_batch(host: str, processor: Any, images: list, instructions: list[str], targets: list[str],
                    end_ids: list[int]) -> dict[str, torch.Tensor]:
    """Rows ``prompt target end``: ``prompt`` exactly as :func:`encode_prefix` builds it for inference, loss on ``target end``.

    The processor is called once on the whole batch (right-padded), so its image tokens, vision
    markers and vision tensors are the inference ones; each row's prompt ids are its unpadded
    prefix. Per-token inputs the processor returns (``mm_token_type_ids``) are extended with 0
    over the target, as for any text token.
    """
    tok = processor.tokenizer
    side = tok.padding_side
    tok.padding_side = "right"
    try:
        enc = processor(text=[build_prompt(host, processor, t) for t in instructions], images=list(images),
                        return_tensors="pt", padding=True, padding_side="right")
    finally:
        tok.padding_side = side
    ids, mask = enc["input_ids"], enc["attention_mask"]
    per_token = [k for k, v in enc.items() if torch.is_tensor(v) and v.shape == ids.shape and k not in ("input_ids", "attention_mask")]
    heads, tails, extra = [], [], {k: [] for k in per_token}
    for i, target in enumerate(targets):
        n = int(mask[i].sum())
        if not bool(mask[i, :n].all()):
            raise ValueError(f"{type(processor).__name__} did not right-pad row {i}; cannot find where its prompt ends")
        heads.append(ids[i, :n].tolist())
        tails.append(tok(target, add_special_tokens=False)["input_ids"] + list(end_ids))
        for k in per_token:
            extra[k].append(enc[k][i, :n].tolist())
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask", *per_token)}
    out.update(supervised_rows(heads, tails, pad, extra))
    return out


def supervised_rows(heads: list[list[int]], tails: list[list[int]], pad: int,
                    extra: dict[str, list[list[int]]] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded rows ``head + tail`` with the loss on ``tail`` only (labels -100 over heads and pads).

    ``extra`` holds per-token inputs over the heads (e.g. ``mm_token_type_ids``); they take 0 over the
    tail, as for any text token, and over the pads.
    """
    rows = [h + t for h, t in zip(heads, tails)]
    width = max(len(r) for r in rows)

    def padded(seqs: list[list[int]], value: int) -> torch.Tensor:
        return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)

    return {
        "input_ids": padded(rows, pad),
        "attention_mask": padded([[1] * len(r) for r in rows], 0),
        "labels": padded([[-100] * len(h) + t for h, t in zip(heads, tails)], -100),
        **{k: padded(v, 0) for k, v in (extra or {}).items()},  # 0 past the head: tail and pads alike
    }
