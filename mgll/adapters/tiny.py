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

__all__ = ["build_word_tokenizer", "make_tiny_llava", "make_tiny_qwen2_vl", "make_tiny_instructblip", "SPECIAL_TOKENS"]

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")


def build_word_tokenizer(texts: Iterable[str], extra_special: dict[str, str] | None = None, image_token_attr: bool = True):
    """A word-level fast tokenizer over ``texts`` (words and punctuation), with LLaVA's special tokens.

    ``extra_special`` adds named special tokens (``{"video_token": "<video>"}`` for Qwen2-VL).
    ``image_token_attr=False`` leaves ``<image>`` in the vocabulary but not as ``tokenizer.image_token``:
    transformers 5's ``InstructBlipProcessor`` breaks on a string-valued ``image_token``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words: dict[str, None] = {}
    for t in texts:
        for w in re.findall(r"\w+|[^\w\s]", t.lower()):
            words.setdefault(w, None)
    extra = dict(extra_special or {})
    vocab = {w: i for i, w in enumerate([*SPECIAL_TOKENS, *extra.values(), *words])}
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
        extra_special_tokens={**({"image_token": "<image>"} if image_token_attr else {}), **extra},
    )



def _tiny_llama_config(tok, width: int, layers: int):
    """The tiny Llama LM every tiny host model uses, sized to the word tokenizer."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


def _save(model, processor, out: str | os.PathLike) -> Path:
    out = Path(out)
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out

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
        text_config=_tiny_llama_config(tok, text_width, layers),
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
    return _save(model, processor, out)


def make_tiny_qwen2_vl(
    out: str | os.PathLike,
    texts: Iterable[str],
    vision_width: int = 32,
    patch_size: int = 14,
    text_width: int = 64,
    layers: int = 2,
    seed: int = 0,
) -> Path:
    """Save a random-init ``Qwen2VLForConditionalGeneration`` + ``Qwen2VLProcessor`` (stock Qwen2-VL tower)."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = build_word_tokenizer(texts, {"video_token": "<video>"})
    cfg = Qwen2VLConfig(
        vision_config={
            "depth": layers,
            "embed_dim": vision_width,
            "hidden_size": text_width,
            "mlp_ratio": 2,
            "num_heads": 2,
            "patch_size": patch_size,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        text_config={
            "hidden_size": text_width,
            "intermediate_size": 2 * text_width,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": len(tok),
            "max_position_embeddings": 512,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
        },
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        video_token_id=tok.convert_tokens_to_ids("<video>"),
        vision_start_token_id=tok.bos_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    kw = {"patch_size": patch_size, "merge_size": 2, "temporal_patch_size": 2}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**kw), tokenizer=tok, video_processor=Qwen2VLVideoProcessor(**kw)
    )
    return _save(model, processor, out)


def make_tiny_instructblip(
    out: str | os.PathLike,
    texts: Iterable[str],
    vision_width: int = 32,
    image_size: int = 32,
    patch_size: int = 8,
    qformer_width: int = 32,
    text_width: int = 64,
    num_query_tokens: int = 8,
    layers: int = 2,
    seed: int = 0,
) -> Path:
    """Save a random-init ``InstructBlipForConditionalGeneration`` (Llama LM) + ``InstructBlipProcessor``."""
    from transformers import (
        BlipImageProcessor,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
    )

    texts = list(texts)
    tok = build_word_tokenizer(texts, image_token_attr=False)
    qtok = build_word_tokenizer(texts, image_token_attr=False)
    cfg = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(
            hidden_size=vision_width,
            intermediate_size=2 * vision_width,
            num_hidden_layers=layers,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch_size,
        ).to_dict(),
        qformer_config=InstructBlipQFormerConfig(
            hidden_size=qformer_width,
            intermediate_size=2 * qformer_width,
            num_hidden_layers=layers,
            num_attention_heads=2,
            encoder_hidden_size=vision_width,
            cross_attention_frequency=1,
            vocab_size=len(qtok),
            pad_token_id=qtok.pad_token_id,
            max_position_embeddings=128,
        ).to_dict(),
        text_config=_tiny_llama_config(tok, text_width, layers).to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    processor = InstructBlipProcessor(
        image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tok,
        qformer_tokenizer=qtok,
        num_query_tokens=num_query_tokens,
    )
    return _save(model, processor, out)
