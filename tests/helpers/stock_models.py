"""Tiny random-init MLLMs built the way the released checkpoints are, independent of `mgll.testing.tiny`.

`mgll.testing.tiny` builds its test models with the project's own helpers, and those have hidden bugs before
(its Qwen2-VL used BOS as `vision_start_token_id`, so batches missing `<|vision_start|>` looked right). The
builders here use only transformers' config, model, processor and image-processor classes, and mirror each
released checkpoint's conventions: the real special-token strings as distinct added tokens with their own ids
(appended after the vocabulary, as the releases add theirs), config token ids pointing at them, the tokenizer's
own BOS/EOS/pad, and a simplified but faithful copy of the checkpoint's chat template (role markers, where the
image token goes, generation prompt). Only the sizes are tiny; the tokenizer is a byte-level BPE trained on
fundus words plus the rendered chat template, so any text encodes and the ids are the same on every run.

    build_stock(host, out) -> out      host in HOSTS
"""

from __future__ import annotations

import re
from pathlib import Path

import jinja2
import torch
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

__all__ = ["HOSTS", "TEMPLATES", "build_stock"]

SEED = 0
WORDS = (
    "fundus photograph colour retina retinal image of the left right eye shows a an no with and or is are "
    "optic disc cup cupping ratio macula macular fovea vessels artery vein haemorrhage haemorrhages exudates "
    "hard soft cotton wool spots drusen microaneurysms neovascularisation oedema scar laser photocoagulation "
    "diabetic retinopathy mild moderate severe proliferative non glaucoma glaucomatous suspect age related "
    "degeneration cataract myopia myopic hypertensive occlusion detachment normal abnormal healthy disease "
    "diagnosis grade stage status finding findings present absent yes what which describe answer question "
    "the image picture this photo is there any sign signs of"
)
OPENAI_MEAN, OPENAI_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

# -- chat templates (simplified copies of each release's chat_template) --------------------------------------------
_IMAGES_THEN_TEXT = (  # LLaVA-hf templates render a turn's images first, then its text
    "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] }}{% endfor %}"
)
LLAVA_TEMPLATE = (  # llava-hf/llava-1.5-7b-hf: "USER: <image>\n... ASSISTANT:"
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    + _IMAGES_THEN_TEXT + "{{ ' ' }}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
MISTRAL_TEMPLATE = (  # llava-hf/llava-v1.6-mistral-7b-hf: "[INST] <image>\n... [/INST]" (no separate generation prompt)
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}" + _IMAGES_THEN_TEXT
    + "{{ ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s>' }}"
    "{% endif %}{% endfor %}"
)


def _chatml(system: str, image: str) -> str:
    """Qwen's ChatML turns (Qwen2-VL, InternVL3): a default system turn, `image` where each image goes."""
    return (
        "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
        "{{ '<|im_start|>system\\n" + system + "<|im_end|>\\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '" + image + "' }}"
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


QWEN2_VL_TEMPLATE = _chatml("You are a helpful assistant.", "<|vision_start|><|image_pad|><|vision_end|>")
INTERNVL_TEMPLATE = _chatml(  # InternVL3's system prompt; the processor expands <IMG_CONTEXT> to <img>...</img>
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。", "<IMG_CONTEXT>\\n")
JANUS_TEMPLATE = (  # deepseek-community/Janus-Pro-1B: "<|User|>: <image_placeholder>\n...\n\n<|Assistant|>:"
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '<|User|>: ' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|Assistant|>: ' }}{% else %}{{ message['role'].capitalize() + ': ' }}"
    "{% endif %}{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image_placeholder>' }}"
    "{% if not loop.last %}{{ '\\n' }}{% endif %}{% elif c['type'] == 'text' %}{{ c['text'].strip() }}{% endif %}"
    "{% endfor %}{% if message['role'] == 'assistant' %}{{ '<｜end▁of▁sentence｜>' }}{% else %}{{ '\\n\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|Assistant|>:' }}{% endif %}"
)
# Salesforce/instructblip-vicuna-7b ships no chat template: the prompt is the bare question and the processor
# puts the query tokens in front of it.
TEMPLATES = {"llava": LLAVA_TEMPLATE, "llava_next": MISTRAL_TEMPLATE, "qwen2_vl": QWEN2_VL_TEMPLATE,
             "internvl": INTERNVL_TEMPLATE, "janus": JANUS_TEMPLATE, "instructblip": None}

LLAMA_LEAD = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 in Llama / Mistral / Vicuna
QWEN_TAIL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
             "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
             "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]  # Qwen2's 151643.. in order
QWEN_IDS = {"pad": "<|endoftext|>", "eos": "<|im_end|>", "bos": None}
INTERNVL_NAMED = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                  "video_token": "<video>"}
JANUS_NAMED = {"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"}
DS_BOS, DS_EOS, DS_PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"


def _corpus(template: str | None, specials: list[str]) -> list[str]:
    """Fundus words plus the template rendered for a user/assistant exchange, its special tokens removed."""
    text = [WORDS]
    if template:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what disease?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "glaucoma"}]}]
        chat = jinja2.Environment().from_string(template).render(messages=msgs, add_generation_prompt=True)
        text.append(re.sub("|".join(map(re.escape, specials)), " ", chat) if specials else chat)
    return text


def _tokenizer(template, lead, tail, *, bos, eos, pad, unk=None, named=None, add_bos=False, cls_sep=None,
               lowercase=False, **roles) -> PreTrainedTokenizerFast:
    """Byte-level BPE (`lead` specials take ids 0.., `tail` specials are appended after the vocabulary).

    add_bos: prepend `bos` as Llama-family tokenizers do; cls_sep: BERT's `[CLS] $A [SEP]`; roles: more
    named tokens (cls_token=...).
    """
    tok = Tokenizer(models.BPE())
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=lead, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(template, [*lead, *tail]), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tail])
    ids = tok.token_to_id
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, ids(bos))])
    if cls_sep:
        c, s = cls_sep
        tok.post_processor = processors.TemplateProcessing(single=f"{c} $A {s}", pair=f"{c} $A {s} $B {s}",
                                                           special_tokens=[(c, ids(c)), (s, ids(s))])
    kw = {k: v for k, v in {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk, **roles}.items() if v}
    return PreTrainedTokenizerFast(tokenizer_object=tok, extra_special_tokens=dict(named or {}), **kw)


def _llama_tokenizer(template, tail=("<image>", "<pad>"), pad="<pad>", named=None):
    """Llama / Mistral / Vicuna: <unk> <s> </s> first, BOS prepended, the MLLM's added tokens after the vocabulary."""
    return _tokenizer(template, LLAMA_LEAD, list(tail), bos="<s>", eos="</s>", pad=pad, unk="<unk>", named=named,
                      add_bos=True)


def _ids(tok) -> dict:
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def _lm(kind: str, tok, width: int = 64, **extra) -> dict:
    """A 2-layer, 4-head (2 KV) text config of the release's LM family, sized to `tok`."""
    return {"model_type": kind, "hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": len(tok),
            "max_position_embeddings": 1024, **_ids(tok), **extra}


def _vit(width: int = 32, image: int = 56, patch: int = 14, **extra) -> dict:
    return {"hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": image, "patch_size": patch, **extra}


def _save(model_cls, cfg, processor, out: Path, gen: dict | None = None) -> Path:
    torch.manual_seed(SEED)
    model = model_cls(cfg).eval()
    tok = processor.tokenizer
    for k, v in {**_ids(tok), **(gen or {})}.items():
        setattr(model.generation_config, k, v)
    model.generation_config._from_model_config = False  # keep the entries above on reload
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _llava(out: Path, next_: bool) -> Path:
    """llava-1.5-7b-hf / llava-v1.6-mistral-7b-hf: CLIP ViT-L/14 (here 56 px / 14), <image> 32000, <pad> 32001."""
    import transformers as tf

    tok = _llama_tokenizer(MISTRAL_TEMPLATE if next_ else LLAVA_TEMPLATE)
    common = {"vision_config": {"model_type": "clip_vision_model", **_vit(projection_dim=64)},
              "image_token_index": tok.convert_tokens_to_ids("<image>"), "vision_feature_layer": -2,
              "vision_feature_select_strategy": "default", "pad_token_id": tok.pad_token_id}
    proc_kw = {"patch_size": 14, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    size, crop = {"shortest_edge": 56}, {"height": 56, "width": 56}
    if not next_:
        cfg = tf.LlavaConfig(text_config=_lm("llama", tok), image_seq_length=16, **common)
        ip = tf.CLIPImageProcessor(size=size, crop_size=crop, image_mean=OPENAI_MEAN, image_std=OPENAI_STD)
        return _save(tf.LlavaForConditionalGeneration, cfg, tf.LlavaProcessor(
            image_processor=ip, tokenizer=tok, chat_template=LLAVA_TEMPLATE, **proc_kw), out)
    pinpoints = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]  # the release's 336-px grid, scaled to 56
    cfg = tf.LlavaNextConfig(text_config=_lm("mistral", tok, sliding_window=None), image_grid_pinpoints=pinpoints,
                             image_seq_length=16, **common)
    ip = tf.LlavaNextImageProcessor(size=size, crop_size=crop, image_grid_pinpoints=pinpoints, image_mean=OPENAI_MEAN,
                                    image_std=OPENAI_STD)
    return _save(tf.LlavaNextForConditionalGeneration, cfg, tf.LlavaNextProcessor(
        image_processor=ip, tokenizer=tok, chat_template=MISTRAL_TEMPLATE, **proc_kw), out)


def _qwen2_vl(out: Path) -> Path:
    """Qwen2-VL-2B-Instruct: ChatML, <|vision_start|><|image_pad|><|vision_end|>, M-RoPE, 14-px patches merged 2x2."""
    import transformers as tf

    tok = _tokenizer(QWEN2_VL_TEMPLATE, [], QWEN_TAIL, **QWEN_IDS)
    t = tok.convert_tokens_to_ids
    cfg = tf.Qwen2VLConfig(
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 64, "mlp_ratio": 4, "num_heads": 2, "patch_size": 14,
                       "spatial_merge_size": 2, "temporal_patch_size": 2},
        text_config=_lm("qwen2_vl_text", tok, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                        bos_token_id=t("<|endoftext|>"), tie_word_embeddings=True),
        image_token_id=t("<|image_pad|>"), video_token_id=t("<|video_pad|>"),
        vision_start_token_id=t("<|vision_start|>"), vision_end_token_id=t("<|vision_end|>"),
        vision_token_id=t("<|vision_pad|>"), tie_word_embeddings=True,
    )
    kw = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2,
          "size": {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}}  # release: 56*56 .. 28*28*1280 pixels
    proc = tf.Qwen2VLProcessor(image_processor=tf.Qwen2VLImageProcessor(**kw), tokenizer=tok,
                               video_processor=tf.Qwen2VLVideoProcessor(**kw), chat_template=QWEN2_VL_TEMPLATE)
    gen = {"bos_token_id": t("<|endoftext|>"), "eos_token_id": [t("<|im_end|>"), t("<|endoftext|>")]}
    return _save(tf.Qwen2VLForConditionalGeneration, cfg, proc, out, gen)


def _internvl(out: Path) -> Path:
    """InternVL3-1B-hf: InternViT (56 px / 14, pixel shuffle 0.5: 4 tokens), Qwen2 LM, <img><IMG_CONTEXT>*N</img>."""
    import transformers as tf

    tail = [*QWEN_TAIL, "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
            "<video>"]
    tok = _tokenizer(INTERNVL_TEMPLATE, [], tail, named=INTERNVL_NAMED, **QWEN_IDS)
    cfg = tf.InternVLConfig(
        vision_config={"model_type": "internvl_vision", **_vit(layer_scale_init_value=0.1, use_mean_pooling=True)},
        text_config=_lm("qwen2", tok, bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), tie_word_embeddings=True),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=4, downsample_ratio=0.5,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    size = {"height": 56, "width": 56}
    ip = tf.GotOcr2ImageProcessor(size=size, crop_to_patches=False, min_patches=1, max_patches=12,
                                  image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    proc = tf.InternVLProcessor(image_processor=ip, tokenizer=tok, video_processor=tf.InternVLVideoProcessor(size=size),
                                image_seq_length=4, chat_template=INTERNVL_TEMPLATE)
    return _save(tf.InternVLForConditionalGeneration, cfg, proc, out)


def _janus(out: Path) -> Path:
    """Janus-Pro-1B: SigLIP tower (64 px / 16: 16 tokens), VQ-VAE head, DeepSeek-LLM tokens, <begin_of_image>...<end_of_image>."""
    import transformers as tf

    tail = [DS_BOS, DS_EOS, DS_PAD, "<begin_of_image>", "<image_placeholder>", "<end_of_image>"]
    tok = _tokenizer(JANUS_TEMPLATE, [], tail, bos=DS_BOS, eos=DS_EOS, pad=DS_PAD, named=JANUS_NAMED, add_bos=True)
    cfg = tf.JanusConfig(
        vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 64,
                       "patch_size": 16, "mlp_ratio": 4, "projection_dim": 64, "depth": 2, "num_image_tokens": 16},
        vq_config={"embed_dim": 8, "num_embeddings": 32, "latent_channels": 32, "base_channels": 32,
                   "channel_multiplier": [1, 1], "num_res_blocks": 1, "projection_dim": 64, "image_token_embed_dim": 64},
        text_config=_lm("llama", tok),
        image_token_id=tok.convert_tokens_to_ids("<image_placeholder>"),
    )
    ip = tf.JanusImageProcessor(size={"height": 64, "width": 64}, min_size=14, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc = tf.JanusProcessor(image_processor=ip, tokenizer=tok, chat_template=JANUS_TEMPLATE, num_image_tokens=16)
    gen = {"generation_kwargs": {"boi_token_id": tok.convert_tokens_to_ids("<begin_of_image>")}}  # as the release
    return _save(tf.JanusForConditionalGeneration, cfg, proc, out, gen)


def _instructblip(out: Path) -> Path:
    """instructblip-vicuna-7b: EVA ViT (56 px / 14), Q-Former with a BERT tokenizer, Vicuna LM, <image> * 8 queries first."""
    import transformers as tf

    tok = _llama_tokenizer(None, tail=("[PAD]", "<image>"), pad="[PAD]")  # LAVIS's [PAD], then the added <image>
    qtok = _tokenizer(None, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], ["[DEC]"], bos="[DEC]", eos=None,
                      pad="[PAD]", unk="[UNK]", cls_sep=("[CLS]", "[SEP]"), lowercase=True, cls_token="[CLS]",
                      sep_token="[SEP]", mask_token="[MASK]")  # bert-base-uncased + LAVIS's [DEC]
    cfg = tf.InstructBlipConfig(
        vision_config=_vit(),
        qformer_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "cross_attention_frequency": 2, "encoder_hidden_size": 32, "vocab_size": len(qtok),
                        "pad_token_id": qtok.pad_token_id, "max_position_embeddings": 128},
        text_config=_lm("llama", tok),
        num_query_tokens=8, image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    ip = tf.BlipImageProcessor(size={"height": 56, "width": 56}, image_mean=OPENAI_MEAN, image_std=OPENAI_STD)
    proc = tf.InstructBlipProcessor(image_processor=ip, tokenizer=tok, qformer_tokenizer=qtok, num_query_tokens=8)
    return _save(tf.InstructBlipForConditionalGeneration, cfg, proc, out)


BUILDERS = {"llava": lambda o: _llava(o, False), "llava_next": lambda o: _llava(o, True), "qwen2_vl": _qwen2_vl,
            "internvl": _internvl, "janus": _janus, "instructblip": _instructblip}
HOSTS = tuple(BUILDERS)


def build_stock(host: str, out: Path) -> Path:
    """Save host's tiny stock model + processor (save_pretrained) under `out` and return `out`."""
    if host not in BUILDERS:
        raise ValueError(f"no stock builder for host {host!r}; expected one of {', '.join(HOSTS)}")
    return BUILDERS[host](Path(out))
