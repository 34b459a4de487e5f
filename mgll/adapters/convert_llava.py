"""Original-format LLaVA / LLaVA-Med checkpoints -> a transformers ``LlavaForConditionalGeneration`` folder.

haotian-liu/LLaVA and microsoft/LLaVA-Med release the LM with the projector folded in
(``LlavaLlamaForCausalLM`` / ``LlavaMistralForCausalLM``): weights named ``model.layers.*``,
``model.embed_tokens``, ``model.norm``, ``lm_head`` and ``model.mm_projector.{0,2}.*``, a
``config.json`` whose ``mm_*`` fields describe the projector and the CLIP tower, and no tower
weights (``mm_vision_tower`` names a CLIP checkpoint). The transformers layout nests the LM
under ``model.language_model``, calls the projector ``model.multi_modal_projector.linear_{1,2}``,
carries the tower under ``model.vision_tower`` and marks images with an ``<image>`` token in
the vocabulary (original LLaVA splices features in at the sentinel id -200 instead).

The conversion renames tensors shard by shard (one input file in memory at a time), copies the
CLIP tower from ``--vision-tower`` (or ``mm_vision_tower`` when that loads), adds ``<image>`` to
the tokenizer when it lacks one (its embedding row = the mean row; the LM never reads it, the
image features replace it), and checks every key and shape against the target architecture
built on the meta device. ``.bin`` shards load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from mgll.io import atomic_path, atomic_write_json

__all__ = ["convert_llava", "read_original_config", "rename_key", "original_name", "LlavaConversionError"]

TEXT_MODEL_TYPES = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral", "llava_qwen": "qwen2"}
SELECT_FEATURES = {"patch": "default", "cls_patch": "full"}
# buffers some original checkpoints carry that transformers recomputes
IGNORED = (re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),)
_RENAMES = (
    (re.compile(r"^model\.mm_projector\.0\.(weight|bias)$"), r"model.multi_modal_projector.linear_1.\1"),
    (re.compile(r"^model\.mm_projector\.2\.(weight|bias)$"), r"model.multi_modal_projector.linear_2.\1"),
    (re.compile(r"^model\.vision_tower\.vision_tower\.vision_model\.(.+)$"), r"model.vision_tower.\1"),
    (re.compile(r"^model\.(embed_tokens|layers|norm)\.(.+)$"), r"model.language_model.\1.\2"),
    (re.compile(r"^lm_head\.(.+)$"), r"lm_head.\1"),
)
EMBEDDING_KEYS = ("model.language_model.embed_tokens.weight", "lm_head.weight")


class LlavaConversionError(ValueError):
    """The source folder is not an original-format LLaVA checkpoint this converter can map; names the file and field."""


def rename_key(key: str) -> str | None:
    """Original LLaVA name -> transformers name; ``None`` for buffers transformers recomputes."""
    if any(p.match(key) for p in IGNORED):
        return None
    for pattern, repl in _RENAMES:
        if pattern.match(key):
            return pattern.sub(repl, key)
    raise KeyError(key)


def original_name(new: str) -> str:
    """transformers name -> the original LLaVA name it comes from (for error messages)."""
    for prefix, orig in (("model.language_model.", "model."), ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
                         ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
                         ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model.")):
        if new.startswith(prefix):
            return orig + new[len(prefix):]
    return new


def read_original_config(src: Path) -> dict[str, Any]:
    path = src / "config.json"
    if not path.is_file():
        raise LlavaConversionError(f"{path}: missing; {src} is not a LLaVA checkpoint folder")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    for key in ("mm_hidden_size", "mm_vision_tower", "hidden_size", "vocab_size", "num_hidden_layers"):
        if key not in cfg:
            raise LlavaConversionError(f"{path}: field {key!r} missing (an original-format LLaVA config has mm_* fields)")
    ptype = cfg.get("mm_projector_type", "linear")
    if ptype != "mlp2x_gelu":
        raise LlavaConversionError(
            f"{path}: mm_projector_type={ptype!r}; only 'mlp2x_gelu' (LLaVA-1.5, LLaVA-Med v1.5) maps to "
            "transformers' LlavaMultiModalProjector (linear -> GELU -> linear)"
        )
    feature = cfg.get("mm_vision_select_feature", "patch")
    if feature not in SELECT_FEATURES:
        raise LlavaConversionError(f"{path}: mm_vision_select_feature={feature!r}; expected one of {', '.join(SELECT_FEATURES)}")
    mtype = cfg.get("model_type", "llava")
    if mtype not in TEXT_MODEL_TYPES:
        raise LlavaConversionError(f"{path}: model_type={mtype!r}; supported: {', '.join(TEXT_MODEL_TYPES)}")
    if cfg.get("mm_patch_merge_type", "flat") != "flat" or cfg.get("image_aspect_ratio") == "anyres":
        raise LlavaConversionError(
            f"{path}: anyres / spatial_unpad checkpoints are LLaVA-NeXT; this converter writes LLaVA-1.5 (flat) models"
        )
    return cfg


def _weight_files(src: Path) -> list[Path]:
    """The shards in index order (``*.index.json``), else the single weights file."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = src / index_name
        if index.is_file():
            with open(index, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data.get("weight_map"), dict):
                raise LlavaConversionError(f"{index}: field 'weight_map' missing or not an object")
            files = list(dict.fromkeys(data["weight_map"].values()))
            missing = [name for name in files if not (src / name).is_file()]
            if missing:
                raise LlavaConversionError(f"{index}: lists {missing[0]} but {src / missing[0]} does not exist")
            return [src / name for name in files]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (src / name).is_file():
            return [src / name]
    raise LlavaConversionError(
        f"{src}: no weights (model.safetensors[.index.json] or pytorch_model[-*].bin with pytorch_model.bin.index.json)"
    )


def _read_shard(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise LlavaConversionError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def _text_config(cfg: dict[str, Any]):
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    text_type = TEXT_MODEL_TYPES[cfg.get("model_type", "llava")]
    fields = {f.name for f in dataclasses.fields(CONFIG_MAPPING[text_type])} if dataclasses.is_dataclass(CONFIG_MAPPING[text_type]) else set()
    keep = fields | {"rope_theta", "rope_scaling", "sliding_window"}
    skip = {"architectures", "transformers_version", "dtype", "torch_dtype"}
    kw = {k: v for k, v in cfg.items() if k in keep and k not in skip}
    return AutoConfig.for_model(text_type, **kw)


def _load_tower(cfg: dict[str, Any], vision_tower: str | os.PathLike | None, config_path: Path):
    from transformers import CLIPVisionModel

    where = str(vision_tower) if vision_tower is not None else cfg["mm_vision_tower"]
    try:
        tower = CLIPVisionModel.from_pretrained(where)
    except (OSError, ValueError) as e:
        raise LlavaConversionError(
            f"{config_path}: mm_vision_tower={cfg['mm_vision_tower']!r}: cannot load the CLIP tower from {where!r} ({e}); "
            "pass --vision-tower DIR with a local copy of that CLIP checkpoint"
        ) from e
    width = int(tower.config.hidden_size)
    if width != int(cfg["mm_hidden_size"]):
        raise LlavaConversionError(
            f"{config_path}: mm_hidden_size={cfg['mm_hidden_size']} but the tower from {where!r} is {width}-wide"
        )
    return tower, where


def _tokenizer(src: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(src))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if "<image>" not in tok.get_vocab():
        tok.add_tokens(["<image>"], special_tokens=True)
    if tok.pad_token is None and tok.unk_token is not None:
        tok.pad_token = tok.unk_token  # LLaVA's own training convention
    return tok


def _grow_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] >= rows:
        return t
    mean = t.float().mean(0, keepdim=True).to(t.dtype)
    return torch.cat([t, mean.expand(rows - t.shape[0], -1)], dim=0)


def convert_llava(src: str | os.PathLike, out: str | os.PathLike, vision_tower: str | os.PathLike | None = None,
                  overwrite: bool = False) -> dict[str, Any]:
    """Write ``out`` as a ``LlavaForConditionalGeneration`` folder; returns what was written (and the processor status).

    An existing non-empty ``out`` is replaced only with ``overwrite``."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration

    from mgll.io import check_out_free

    src, out = Path(src), Path(out)
    check_out_free(out, overwrite)
    config_path = src / "config.json"
    cfg = read_original_config(src)
    files = _weight_files(src)
    tower, tower_from = _load_tower(cfg, vision_tower, config_path)
    tok = _tokenizer(src)
    text_config = _text_config(cfg)
    vocab = int(text_config.vocab_size)
    image_id = int(tok.convert_tokens_to_ids("<image>")) if tok is not None else vocab
    text_config.vocab_size = max(vocab, image_id + 1, len(tok) if tok is not None else 0)
    strategy = SELECT_FEATURES[cfg.get("mm_vision_select_feature", "patch")]
    grid = int(tower.config.image_size) // int(tower.config.patch_size)
    llava_cfg = LlavaConfig(
        vision_config=tower.config,
        text_config=text_config,
        image_token_index=image_id,
        vision_feature_layer=int(cfg.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy=strategy,
        image_seq_length=grid * grid + (1 if strategy == "full" else 0),
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        pad_token_id=tok.pad_token_id if tok is not None else cfg.get("pad_token_id"),
    )
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LlavaForConditionalGeneration(llava_cfg).state_dict().items()}

    weight_map: dict[str, str] = {}
    shard_names = [f"model-{i + 1:05d}-of-{len(files) + 1:05d}.safetensors" for i in range(len(files) + 1)]
    dtype, total = None, 0
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        from safetensors.torch import save_file

        for path, shard in zip(files, shard_names):
            renamed: dict[str, torch.Tensor] = {}
            for key, tensor in _read_shard(path).items():
                try:
                    new = rename_key(key)
                except KeyError:
                    raise LlavaConversionError(
                        f"{path}: unexpected key {key!r} (not an original LLaVA name: model.embed_tokens, model.layers.*, "
                        "model.norm, lm_head, model.mm_projector.0/2)"
                    ) from None
                if new is None:
                    continue
                if new in weight_map or new in renamed:
                    raise LlavaConversionError(f"{path}: key {key!r} appears in more than one shard")
                if new in EMBEDDING_KEYS:
                    tensor = _grow_rows(tensor, int(text_config.vocab_size))
                want = expected.get(new)
                if want is None:
                    raise LlavaConversionError(f"{path}: key {key!r} -> {new!r} has no place in the transformers LLaVA model")
                if tuple(tensor.shape) != want:
                    raise LlavaConversionError(
                        f"{path}: key {key!r} has shape {tuple(tensor.shape)} but config.json implies {want} for {new!r}"
                    )
                if new.startswith("model.language_model.") and tensor.is_floating_point():
                    dtype = dtype or tensor.dtype
                renamed[new] = tensor.contiguous()
            save_file(renamed, str(tmp / shard), metadata={"format": "pt"})
            weight_map.update({k: shard for k in renamed})
            total += sum(t.numel() * t.element_size() for t in renamed.values())
        tower_state = {k: v.to(dtype or v.dtype).contiguous() for k, v in tower.state_dict().items()}
        tower_state = {f"model.vision_tower.{k}": v for k, v in tower_state.items() if f"model.vision_tower.{k}" not in weight_map}
        save_file(tower_state, str(tmp / shard_names[-1]), metadata={"format": "pt"})
        weight_map.update({k: shard_names[-1] for k in tower_state})
        total += sum(t.numel() * t.element_size() for t in tower_state.values())
        optional = {"lm_head.weight"} if llava_cfg.tie_word_embeddings else set()
        missing = sorted(set(expected) - set(weight_map) - optional)
        if missing:
            raise LlavaConversionError(
                f"{src}: the weights lack {original_name(missing[0])!r} (-> {missing[0]!r}; {len(missing)} tensors missing "
                f"in {', '.join(p.name for p in files)})"
            )
        if dtype is not None:
            llava_cfg.dtype = dtype
        llava_cfg.architectures = ["LlavaForConditionalGeneration"]
        llava_cfg.save_pretrained(tmp)
        atomic_write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
        processor_note = _write_processor(tmp, tok, tower_from, cfg, llava_cfg, CLIPImageProcessor)
        report = {
            "source": str(src),
            "vision_tower": tower_from,
            "image_token_index": image_id,
            "vocab_size": int(text_config.vocab_size),
            "added_rows": int(text_config.vocab_size) - vocab,
            "image_seq_length": llava_cfg.image_seq_length,
            "processor": processor_note,
            "shards": len(shard_names),
        }
        atomic_write_json(tmp / "mgll_convert.json", report)
    return report


def _write_processor(tmp: Path, tok, tower_from: str, cfg: dict[str, Any], llava_cfg, image_processor_cls) -> str:
    """A ``LlavaProcessor`` when both the tokenizer and the tower's CLIP image processor load; else why not."""
    from transformers import LlavaImageProcessor, LlavaProcessor

    if tok is None:
        return "not written: no tokenizer in the source folder"
    try:
        clip = image_processor_cls.from_pretrained(tower_from)
    except (OSError, ValueError) as e:
        return f"not written: no CLIP image processor at {tower_from!r} ({type(e).__name__})"
    kw = clip.to_dict()
    image_processor = LlavaImageProcessor(
        size=kw.get("size"),
        crop_size=kw.get("crop_size"),
        resample=kw.get("resample", 3),
        image_mean=kw.get("image_mean"),
        image_std=kw.get("image_std"),
        do_pad=cfg.get("image_aspect_ratio", "pad") == "pad",  # LLaVA-1.5 pads to a square with the mean colour
    )
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=int(llava_cfg.vision_config.patch_size),
        vision_feature_select_strategy=llava_cfg.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        image_token="<image>",
    ).save_pretrained(tmp)
    return "written"
