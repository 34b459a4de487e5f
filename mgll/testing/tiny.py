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

__all__ = [
    "build_word_tokenizer",
    "make_tiny_llava",
    "make_tiny_qwen2_vl",
    "make_tiny_instructblip",
    "make_tiny_llava_next",
    "make_tiny_internvl",
    "make_tiny_janus",
    "make_tiny_flamingo",
    "SPECIAL_TOKENS",
]

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")


def build_word_tokenizer(texts: Iterable[str], extra_special: dict[str, str] | None = None, image_token_attr: bool = True):
    """A word-level fast tokenizer over ``texts`` (words and punctuation), with LLaVA's special tokens.

    ``extra_special`` adds named special tokens (``{"video_token": "<video>"}`` for Qwen2-VL).
    ``image_token_attr=False`` leaves ``<image>`` in the vocabulary but not as ``tokenizer.image_token``:
    transformers 5's ``InstructBlipProcessor`` breaks on a string-valued ``image_token``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words: dict[str, None] = {}
    for t in texts:
        for w in re.findall(r"\w+|[^\w\s]", t.lower()):
            words.setdefault(w, None)
    extra = dict(extra_special or {})
    vocab = {w: i for i, w in enumerate([*SPECIAL_TOKENS, *extra.values(), *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()  # the vocabulary is lower-case: "USER", "A." must not become <unk>
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


def _tiny_vision_config(config_class, width: int, layers: int, image_size: int, patch_size: int):
    """A 2-head ViT config of the host's own tower class (CLIP, InstructBLIP, InternViT share these fields)."""
    return config_class(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
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


def _init_model(model_class, cfg, tok, seed: int):
    """Seeded random init in eval mode, generating with the word tokenizer's pad/eos."""
    torch.manual_seed(seed)
    model = model_class(cfg).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


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
        vision_config=_tiny_vision_config(CLIPVisionConfig, vision_width, layers, image_size, patch_size),
        text_config=_tiny_llama_config(tok, text_width, layers),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=grid * grid,
        pad_token_id=tok.pad_token_id,
    )
    model = _init_model(LlavaForConditionalGeneration, cfg, tok, seed)
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
    model = _init_model(Qwen2VLForConditionalGeneration, cfg, tok, seed)
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
        vision_config=_tiny_vision_config(InstructBlipVisionConfig, vision_width, layers, image_size, patch_size).to_dict(),
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
    model = _init_model(InstructBlipForConditionalGeneration, cfg, tok, seed)
    processor = InstructBlipProcessor(
        image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tok,
        qformer_tokenizer=qtok,
        num_query_tokens=num_query_tokens,
    )
    return _save(model, processor, out)


def make_tiny_llava_next(
    out: str | os.PathLike,
    texts: Iterable[str],
    vision_width: int = 32,
    image_size: int = 32,
    patch_size: int = 8,
    text_width: int = 64,
    layers: int = 2,
    seed: int = 0,
) -> Path:
    """Save a random-init ``LlavaNextForConditionalGeneration`` + ``LlavaNextProcessor`` (anyres tiles of ``image_size``).

    The pinpoints are LLaVA-1.6's 1x2, 2x1 and 2x2 tile layouts at this tower's image size.
    """
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tok = build_word_tokenizer(texts)
    s = image_size
    pinpoints = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
    cfg = LlavaNextConfig(
        vision_config=_tiny_vision_config(CLIPVisionConfig, vision_width, layers, image_size, patch_size),
        text_config=_tiny_llama_config(tok, text_width, layers),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        pad_token_id=tok.pad_token_id,
    )
    model = _init_model(LlavaNextForConditionalGeneration, cfg, tok, seed)
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": s}, crop_size={"height": s, "width": s}, image_grid_pinpoints=pinpoints
        ),
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return _save(model, processor, out)


INTERNVL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}


def make_tiny_internvl(
    out: str | os.PathLike,
    texts: Iterable[str],
    vision_width: int = 32,
    image_size: int = 32,
    patch_size: int = 8,
    text_width: int = 64,
    layers: int = 2,
    max_patches: int = 2,
    seed: int = 0,
) -> Path:
    """Save a random-init ``InternVLForConditionalGeneration`` (stock InternViT, Llama LM) + ``InternVLProcessor``.

    Image tokens per tile: ``(image_size / patch_size / 2)**2`` after the 0.5 pixel shuffle.
    """
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
        InternVLVisionConfig,
    )

    tok = build_word_tokenizer(texts, dict(INTERNVL_TOKENS))
    seq = (image_size // patch_size // 2) ** 2
    cfg = InternVLConfig(
        vision_config=_tiny_vision_config(InternVLVisionConfig, vision_width, layers, image_size, patch_size),
        text_config=_tiny_llama_config(tok, text_width, layers),
        image_token_id=tok.convert_tokens_to_ids(INTERNVL_TOKENS["context_image_token"]),
        image_seq_length=seq,
    )
    model = _init_model(InternVLForConditionalGeneration, cfg, tok, seed)
    size = {"height": image_size, "width": image_size}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1, max_patches=max_patches),
        tokenizer=tok,
        video_processor=InternVLVideoProcessor(size=size),
        image_seq_length=seq,
    )
    return _save(model, processor, out)


JANUS_TOKENS = {"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"}


def make_tiny_janus(
    out: str | os.PathLike,
    texts: Iterable[str],
    vision_width: int = 32,
    image_size: int = 32,
    patch_size: int = 8,
    text_width: int = 64,
    layers: int = 2,
    seed: int = 0,
) -> Path:
    """Save a random-init ``JanusForConditionalGeneration`` (SigLIP tower, tiny VQ-VAE, Llama LM) + ``JanusProcessor``."""
    from transformers import (
        JanusConfig,
        JanusForConditionalGeneration,
        JanusImageProcessor,
        JanusProcessor,
        JanusVisionConfig,
        JanusVQVAEConfig,
    )

    tok = build_word_tokenizer(texts, dict(JANUS_TOKENS), image_token_attr=False)
    grid = image_size // patch_size
    cfg = JanusConfig(
        vision_config=JanusVisionConfig(
            hidden_size=vision_width,
            num_hidden_layers=layers,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch_size,
            mlp_ratio=2,
            projection_dim=text_width,
            num_image_tokens=grid * grid,
        ),
        vq_config=JanusVQVAEConfig(
            embed_dim=8,
            num_embeddings=32,
            latent_channels=32,
            base_channels=32,
            channel_multiplier=[1, 1],
            num_res_blocks=1,
            projection_dim=text_width,
            image_token_embed_dim=text_width,
        ),
        text_config=_tiny_llama_config(tok, text_width, layers),
        image_token_id=tok.convert_tokens_to_ids(JANUS_TOKENS["image_token"]),
    )
    model = _init_model(JanusForConditionalGeneration, cfg, tok, seed)
    model.generation_config.bos_token_id = tok.bos_token_id
    # image generation masks the unconditional prompt down to bos + begin-of-image (as the released config)
    # (a config marked as derived from the model config drops such custom entries on load)
    model.generation_config.generation_kwargs = {"boi_token_id": tok.convert_tokens_to_ids(JANUS_TOKENS["boi_token"])}
    model.generation_config._from_model_config = False
    processor = JanusProcessor(
        image_processor=JanusImageProcessor(size={"height": image_size, "width": image_size}, min_size=patch_size),
        tokenizer=tok,
        num_image_tokens=grid * grid,
    )
    return _save(model, processor, out)


def make_tiny_flamingo(
    out: str | os.PathLike,
    texts: Iterable[str],
    vision_width: int = 32,
    image_size: int = 32,
    patch_size: int = 8,
    text_width: int = 64,
    layers: int = 2,
    cross_attn_every_n_layers: int = 1,
    num_latents: int = 8,
    perceiver_depth: int = 2,
    gate: float = 0.5,
    weights: str = "pt",
    seed: int = 0,
) -> Path:
    """Save a random-init OpenFlamingo source folder laid out like an assembled Med-Flamingo download.

    ``lm/`` is a stock Llama folder whose tokenizer already knows ``<image>`` / ``<|endofchunk|>``;
    ``flamingo_config.json`` names the open_clip ViT by ``model_cfg`` and the checkpoint holds the
    tower, Perceiver and gated cross-attention under OpenFlamingo's own key names (``weights="pt"``:
    ``checkpoint.pt`` as OpenFlamingo saves it, ``"safetensors"``: ``flamingo.safetensors``). The
    gates are set to ``tanh(gate)``-open values: a fresh OpenFlamingo's gates are 0 (images have no
    effect) while a trained one's are not.
    """
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from mgll.adapters.hosts.medflamingo.model import FLAMINGO_CONFIG, LM_DIR, OWN_PREFIXES, load_flamingo
    from mgll.adapters.hosts.medflamingo.processor import EOC_TOKEN
    from mgll.io import atomic_write_json

    if weights not in ("pt", "safetensors"):
        raise ValueError(f"weights={weights!r}: expected 'pt' or 'safetensors'")
    tok = build_word_tokenizer(texts, {"eoc_token": EOC_TOKEN}, image_token_attr=False)
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(_tiny_llama_config(tok, text_width, layers)).eval()
    cfg = {
        "lang_encoder": LM_DIR,
        "vision_encoder": {"model_cfg": {"embed_dim": 16, "vision_cfg": {
            "width": vision_width, "layers": layers, "head_width": vision_width // 2,
            "image_size": image_size, "patch_size": patch_size}}},
        "cross_attn_every_n_layers": cross_attn_every_n_layers,
        "perceiver": {"depth": perceiver_depth, "num_latents": num_latents, "dim_head": 16, "heads": 2},
    }
    out = Path(out)
    with atomic_path(out) as tmp:
        lm.save_pretrained(tmp / LM_DIR)
        tok.save_pretrained(tmp / LM_DIR)
        atomic_write_json(tmp / FLAMINGO_CONFIG, cfg)  # no checkpoint yet: every Flamingo part random-init
        torch.manual_seed(seed + 1)
        model, _ = load_flamingo(tmp)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("attn_gate", "ff_gate")):
                    p.fill_(gate)
        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if k.startswith(OWN_PREFIXES) or ".gated_cross_attn_layer." in k}  # both of OpenFlamingo's names
        for k, v in model.lang_encoder.model.layers[0].decoder_layer.state_dict().items():  # its third name for LM blocks
            state[f"lang_encoder.old_decoder_blocks.0.{k}"] = v.contiguous()
        if weights == "pt":
            torch.save(state, tmp / "checkpoint.pt")
            cfg["checkpoint"] = "checkpoint.pt"
        else:
            save_file({k: v for k, v in state.items() if k.startswith(OWN_PREFIXES)}, str(tmp / "flamingo.safetensors"))
            cfg["checkpoint"] = "flamingo.safetensors"
        atomic_write_json(tmp / FLAMINGO_CONFIG, cfg)
    return out
