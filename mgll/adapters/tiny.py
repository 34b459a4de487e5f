"""Tiny random-init MLLMs built from configs, for offline tests and smoke runs (no download).

The tokenizer is built with the ``tokenizers`` library: transformers 5 loads only such
tokenizers reliably (a bare vocab file silently yields a 2-token tokenizer).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from mgll.io import atomic_path

__all__ = ["build_word_tokenizer", "make_tiny_llava", "SPECIAL_TOKENS"]

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")


def build_word_tokenizer(texts: Iterable[str]):
    """A word-level fast tokenizer over ``texts`` (words and punctuation), with LLaVA's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words: dict[str, None] = {}
    for t in texts:
        for w in re.findall(r"\w+|[^\w\s]", t.lower()):
            words.setdefault(w, None)
    vocab = {w: i for i, w in enumerate([*SPECIAL_TOKENS, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )


def make_tiny_llava(
    out: str | os.PathLike,
    texts: Iterable[str],
    vision_width: int = 32,
    image_size: int = 32,
    patch_size: int = 8,
    text_width: int = 64,
    layers: int = 2,
    seed: int = 0,
) -> Path:
    """Save a random-init ``LlavaForConditionalGeneration`` + ``LlavaProcessor`` with a CLIP-shaped tower."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = build_word_tokenizer(texts)
    grid = image_size // patch_size
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=vision_width,
            intermediate_size=2 * vision_width,
            num_hidden_layers=layers,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch_size,
        ),
        text_config=LlamaConfig(
            hidden_size=text_width,
            intermediate_size=2 * text_width,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tok),
            max_position_embeddings=512,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=grid * grid,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    size = {"height": image_size, "width": image_size}
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=size),
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    out = Path(out)
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out
