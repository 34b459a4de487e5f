"""OpenFlamingo (Med-Flamingo) around an MGLL tower: build, load, save, forward and greedy ``generate`` on transformers 5.

OpenFlamingo is not a transformers class: its model is an open_clip ViT, a ``PerceiverResampler``
and gated cross-attention layers spliced into a Hugging Face causal LM by a mixin. A Flamingo
folder (the ``--mllm`` source and the ``mgll swap`` output alike) is therefore

* ``flamingo_config.json``: where the LM is (``lang_encoder``, a folder relative to this one or
  absolute), the vision encoder (``vision_encoder``: ``{"open_clip": "ViT-L-14", "pretrained":
  "openai"}`` or ``{"model_cfg": {...}}``; a swapped folder has ``mgll_tower`` instead), the
  Flamingo weights file (``checkpoint``: ``.safetensors``, or OpenFlamingo's ``.pt`` read with
  ``weights_only=True``), ``cross_attn_every_n_layers``, ``vis_dim``, the media / end-of-chunk
  token ids and optional ``perceiver`` sizes;
* the LM folder in its stock transformers layout (loaded with ``from_pretrained``, so 4-bit
  loading works unchanged), the Flamingo-only weights beside it.

``Flamingo.generate`` hands the patched LM to transformers' ``generate``, whose transformers-5
prefill calls the LM without ``attention_mask`` (which the OpenFlamingo mixin requires); the
greedy loop here conditions once and calls the LM with the mask, positions and KV cache itself.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from mgll.adapters.hosts.base import ClipTower, ShapeMismatch
from mgll.io import atomic_path, atomic_write_json

__all__ = [
    "MEDIA_TOKEN",
    "EOC_TOKEN",
    "FLAMINGO_CONFIG",
    "FLAMINGO_WEIGHTS",
    "LM_DIR",
    "MgllFlamingoTower",
    "flamingo_class",
    "config_class",
    "read_flamingo_config",
    "load_flamingo",
    "as_vision_x",
]

FLAMINGO_CONFIG = "flamingo_config.json"
FLAMINGO_WEIGHTS = "flamingo.safetensors"
LM_DIR = "lm"
# module paths (from the Flamingo) that are Flamingo's own, not the LM's: saved in FLAMINGO_WEIGHTS
MEDIA_TOKEN = "<image>"  # where an image enters the text (OpenFlamingo's media token)
EOC_TOKEN = "<|endofchunk|>"  # closes each image-text chunk
OWN_PREFIXES = ("vision_encoder.", "bridge.", "perceiver.", "lang_encoder.gated_cross_attn_layers.")


class MgllFlamingoTower(ClipTower):
    """open_clip's ``VisionTransformer(output_tokens=True)`` contract over an MGLL ViT as ``CLIPVisionModel``.

    Returns ``(class token, patch tokens)`` after the final LayerNorm, which is what Flamingo
    reads from its open_clip ViT (``vision_encoder(x)[1]``).
    """

    def forward(self, pixel_values: torch.Tensor):
        self.check_pixels(pixel_values)
        x = self.vit.post_layernorm(self.vit(pixel_values).last_hidden_state)
        return x[:, 0], x[:, 1:]


def make_bridge(in_width: int, out_width: int) -> nn.Sequential:
    """MGLL features -> the Perceiver's input width; the LayerNorm stands in for the stock tower's ``ln_post``."""
    return nn.Sequential(nn.Linear(in_width, out_width), nn.LayerNorm(out_width))


def as_vision_x(x: torch.Tensor | None) -> torch.Tensor | None:
    """Flamingo wants ``(B, T_img, F, C, H, W)``; accept ``(B, C, H, W)`` (one image) and ``(B, T, C, H, W)`` too."""
    if x is None:
        return None
    if x.ndim == 4:
        return x[:, None, None]
    if x.ndim == 5:
        return x[:, :, None]
    if x.ndim == 6:
        return x
    raise ValueError(f"pixel_values has shape {tuple(x.shape)}: expected (B, C, H, W), (B, T, C, H, W) or (B, T, F, C, H, W)")


def _cache_kwarg(lm: nn.Module) -> str:
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` in ``forward``; use whichever the LM takes."""
    for klass in type(lm).__mro__:
        if klass.__module__.startswith("transformers.") and "forward" in klass.__dict__:
            return "cache" if "cache" in inspect.signature(klass.forward).parameters else "past_key_values"
    return "past_key_values"


@functools.cache
def config_class():
    """``MgllFlamingoConfig``: only a key for ``AutoProcessor.register`` (the Flamingo config itself is plain JSON)."""
    from transformers import PretrainedConfig

    class MgllFlamingoConfig(PretrainedConfig):
        model_type = "mgll_flamingo"

    MgllFlamingoConfig.__module__ = __name__
    MgllFlamingoConfig.__qualname__ = "MgllFlamingoConfig"
    return MgllFlamingoConfig


@functools.cache
def flamingo_class():
    """``MgllFlamingo``: OpenFlamingo's ``Flamingo`` with a bridge, HF-style inputs, save/load and a transformers-5 ``generate``.

    Built on first use: ``open_flamingo`` is an optional install (``scripts/install_open_flamingo.sh``).
    """
    from open_flamingo import Flamingo
    from open_flamingo.src.helpers import PerceiverResampler

    class MgllFlamingo(Flamingo):
        def __init__(self, vision_encoder: nn.Module, lang_encoder: nn.Module, config: dict[str, Any], bridge: nn.Module | None = None):
            super().__init__(
                SimpleNamespace(visual=vision_encoder),
                lang_encoder,
                eoc_token_id=int(config["eoc_token_id"]),
                media_token_id=int(config["media_token_id"]),
                vis_dim=int(config["vis_dim"]),
                cross_attn_every_n_layers=int(config["cross_attn_every_n_layers"]),
            )
            if config.get("perceiver"):  # non-default sizes (tiny test models); Med-Flamingo uses the defaults
                self.perceiver = PerceiverResampler(dim=int(config["vis_dim"]), **config["perceiver"])
            self.bridge = bridge if bridge is not None else nn.Identity()
            self.flamingo_config = dict(config)
            # ``old_decoder_blocks`` is a second name for every LM block (``model.layers.N.decoder_layer``);
            # kept as a plain attribute so state dicts and peft see each block once
            lm = self.lang_encoder
            lm.__dict__["old_decoder_blocks"] = lm._modules.pop("old_decoder_blocks")

        # -- vision ----------------------------------------------------------------------------
        def _encode_vision_x(self, vision_x: torch.Tensor) -> None:
            """Tower -> bridge -> Perceiver, then condition every Flamingo layer.

            OpenFlamingo runs the tower under ``no_grad``; here gradients reach the tower only when
            some of its parameters train (``--train-tower``), and always reach the bridge.
            """
            b, t, f = vision_x.shape[:3]
            if f != 1:
                raise ValueError(f"vision_x has {f} frames per image: OpenFlamingo supports one")
            x = vision_x.reshape(b * t * f, *vision_x.shape[3:])
            tower = self.vision_encoder
            ref = next(tower.parameters())
            train_tower = torch.is_grad_enabled() and any(p.requires_grad for p in tower.parameters())
            with torch.set_grad_enabled(train_tower):
                tokens = tower(x.to(device=ref.device, dtype=ref.dtype))[1]
            first = next(self.perceiver.parameters())
            tokens = self.bridge(tokens.to(next(iter(self.bridge.parameters()), first).dtype))
            tokens = tokens.reshape(b, t, f, *tokens.shape[1:]).to(first.dtype)
            vis = self.perceiver(tokens)
            for layer in self.lang_encoder._get_decoder_layers():
                layer.condition_vis_x(vis)

        def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
            """Perceiver latents per image, ``(B, T_img, num_latents, vis_dim)``: what the cross-attention reads."""
            vision_x = as_vision_x(pixel_values)
            self._encode_vision_x(vision_x)
            vis = self.lang_encoder._get_decoder_layers()[0].vis_x
            self.lang_encoder.clear_conditioned_layers()
            return vis

        # -- language --------------------------------------------------------------------------
        def forward(
            self,
            vision_x: torch.Tensor | None = None,
            lang_x: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None,
            labels: torch.Tensor | None = None,
            clear_conditioned_layers: bool = True,
            use_cache: bool = False,
            *,
            pixel_values: torch.Tensor | None = None,
            input_ids: torch.Tensor | None = None,
            **lm_kwargs: Any,
        ):
            """Flamingo's positional ``(vision_x, lang_x, ...)`` or the HF names ``pixel_values`` / ``input_ids``."""
            vision_x = as_vision_x(vision_x if vision_x is not None else pixel_values)
            lang_x = lang_x if lang_x is not None else input_ids
            if lang_x is None:
                raise ValueError("MgllFlamingo.forward needs input_ids (lang_x)")
            if attention_mask is None:
                attention_mask = torch.ones_like(lang_x)
            lm = self.lang_encoder
            if vision_x is not None:
                if lm._use_cached_vision_x:
                    raise ValueError("media are cached (cache_media); pass no pixel_values or call uncache_media() first")
                self._encode_vision_x(vision_x)
                self._condition_media_locations(lang_x)
            elif not (lm._use_cached_vision_x and lm.is_conditioned()):
                raise ValueError("no pixel_values given and no media cached: Flamingo needs the images of the <image> tokens")
            try:
                return lm(input_ids=lang_x, attention_mask=attention_mask, labels=labels, use_cache=use_cache, **lm_kwargs)
            finally:
                if clear_conditioned_layers:
                    lm.clear_conditioned_layers()

        @torch.no_grad()
        def generate(
            self,
            vision_x: torch.Tensor | None = None,
            lang_x: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None,
            max_new_tokens: int = 20,
            min_new_tokens: int = 0,
            eos_token_id: int | list[int] | None = None,
            pad_token_id: int | None = None,
            use_cache: bool = True,
            *,
            pixel_values: torch.Tensor | None = None,
            input_ids: torch.Tensor | None = None,
            **kwargs: Any,
        ) -> torch.Tensor:
            """Greedy decoding; returns prompt + new tokens, like ``transformers`` ``generate``.

            The images are encoded once; the prompt (left-padded for batches) is prefilled with its
            ``<image>`` locations and every later token attends to the last image, as in
            OpenFlamingo's own generation. ``eos_token_id`` defaults to ``<|endofchunk|>``; ``<image>``
            is never emitted (there would be no image for it to condition on).
            """
            if kwargs.get("num_beams", 1) != 1 or kwargs.get("do_sample", False):
                raise ValueError("MgllFlamingo.generate decodes greedily only (num_beams=1, do_sample=False)")
            unknown = sorted(set(kwargs) - {"num_beams", "do_sample"})
            if unknown:
                raise TypeError(f"MgllFlamingo.generate got unsupported arguments {unknown}")
            vision_x = as_vision_x(vision_x if vision_x is not None else pixel_values)
            seq = lang_x if lang_x is not None else input_ids
            if vision_x is None or seq is None:
                raise ValueError("generate needs pixel_values (vision_x) and input_ids (lang_x)")
            mask = torch.ones_like(seq) if attention_mask is None else attention_mask.to(seq.dtype)
            if bool((mask[:, -1] == 0).any()):
                raise ValueError("attention_mask shows right-padded prompts: pad them on the left for generate")
            eos = [self.eoc_token_id] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
            eos_t = torch.tensor(eos, device=seq.device)
            lm = self.lang_encoder
            pad = pad_token_id if pad_token_id is not None else getattr(lm.config, "pad_token_id", None)
            pad = eos[0] if pad is None else int(pad)
            cache_kw = _cache_kwarg(lm)
            done = torch.zeros(seq.shape[0], dtype=torch.bool, device=seq.device)
            lm._use_cached_vision_x = True
            try:
                self._encode_vision_x(vision_x)
                cache = None
                for step in range(max_new_tokens):
                    positions = (mask.cumsum(-1) - 1).clamp(min=0)
                    feed, pos = (seq[:, -1:], positions[:, -1:]) if cache is not None else (seq, positions)
                    extra = {cache_kw: cache} if cache is not None else {}
                    out = lm(input_ids=feed, attention_mask=mask, position_ids=pos, use_cache=use_cache, **extra)
                    if use_cache:
                        cache = out["cache"] if "cache" in out else out.get("past_key_values")
                    logits = out.logits[:, -1].float()
                    logits[:, self.media_token_id] = float("-inf")  # an <image> with no image behind it
                    if step < min_new_tokens:
                        logits[:, eos_t] = float("-inf")
                    nxt = torch.where(done, torch.full_like(done, pad, dtype=seq.dtype), logits.argmax(-1).to(seq.dtype))
                    seq = torch.cat([seq, nxt[:, None]], dim=1)
                    mask = torch.cat([mask, torch.ones_like(nxt[:, None])], dim=1)
                    done |= torch.isin(nxt, eos_t)
                    if bool(done.all()):
                        break
            finally:
                lm.clear_conditioned_layers()
                lm._use_cached_vision_x = False
            return seq

        @torch.no_grad()
        def option_logliks(self, prefix: dict, option_ids: list[list[int]], pad_id: int = 0) -> torch.Tensor:
            """``mgll mcq``'s ``loglik`` for Flamingo: the prompt (image included) runs once, its KV cache
            and image conditioning are repeated for the options, which then run as one right-padded batch.

            The gated cross-attention of an option token attends to the last image of the prompt, as
            every token after it does in a full forward, so the scores equal one forward per option.
            """
            vision_x = as_vision_x(prefix.get("pixel_values"))
            seq = prefix["input_ids"]
            if vision_x is None or seq.shape[0] != 1:
                raise ValueError("option_logliks needs one prompt with its pixel_values")
            k, width = len(option_ids), max(len(o) for o in option_ids)
            lm = self.lang_encoder
            lm._use_cached_vision_x = True
            try:
                self._encode_vision_x(vision_x)
                out = lm(input_ids=seq, attention_mask=prefix.get("attention_mask"), use_cache=True)
                first = out.logits[:, -1:].float()
                cache = out["cache"] if "cache" in out else out.get("past_key_values")
                cache.batch_repeat_interleave(k)
                for layer in lm._get_decoder_layers():
                    layer.condition_vis_x(layer.vis_x.repeat_interleave(k, 0))
                    layer.condition_media_locations(layer.media_locations.repeat_interleave(k, 0))
                ids = torch.full((k, width), pad_id, dtype=torch.long, device=seq.device)
                mask = torch.zeros((k, width), dtype=torch.bool, device=seq.device)
                for i, o in enumerate(option_ids):
                    ids[i, : len(o)] = torch.tensor(o, device=seq.device)
                    mask[i, : len(o)] = True
                logits = first.expand(k, 1, -1)
                if width > 1:
                    # the mixin needs a mask; all ones: the pads sit after every real token (causal)
                    full = torch.ones((k, seq.shape[1] + width - 1), dtype=torch.long, device=seq.device)
                    rest = lm(input_ids=ids[:, :-1], attention_mask=full, use_cache=True,
                              **{_cache_kwarg(lm): cache}).logits.float()
                    logits = torch.cat([logits, rest], dim=1)
            finally:
                lm.clear_conditioned_layers()
                lm._use_cached_vision_x = False
            logp = torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
            return (logp * mask).sum(dim=1).cpu()

        @torch.no_grad()
        def batch_option_logliks(self, prefix: dict, option_ids: list[list[list[int]]], pad_id: int = 0) -> list[torch.Tensor]:
            """:meth:`option_logliks` for B left-padded prompts, ``option_ids[b]`` being prompt b's options.

            The prompts run once with positions counted along their masks (the pads before a row's
            ``<image>`` see no image and are hidden from the real tokens); KV cache, Perceiver latents
            and media locations are then indexed so that each option continues its own prompt.
            """
            vision_x = as_vision_x(prefix.get("pixel_values"))
            seq = prefix["input_ids"]
            b = seq.shape[0]
            if vision_x is None or len(option_ids) != b:
                raise ValueError(f"batch_option_logliks needs pixel_values and one option list per prompt ({b})")
            mask = prefix.get("attention_mask")
            mask = torch.ones_like(seq) if mask is None else mask
            pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
            counts = [len(o) for o in option_ids]
            rows = torch.repeat_interleave(torch.arange(b, device=seq.device), torch.tensor(counts, device=seq.device))
            flat = [o for opts in option_ids for o in opts]
            width = max(len(o) for o in flat)
            lm = self.lang_encoder
            lm._use_cached_vision_x = True
            try:
                self._encode_vision_x(vision_x)
                out = lm(input_ids=seq, attention_mask=mask, position_ids=pos, use_cache=True)
                first = out.logits[:, -1:].float()
                cache = out["cache"] if "cache" in out else out.get("past_key_values")
                cache.batch_select_indices(rows)
                for layer in lm._get_decoder_layers():
                    layer.condition_vis_x(layer.vis_x[rows])
                    layer.condition_media_locations(layer.media_locations[rows])
                ids = torch.full((len(flat), width), pad_id, dtype=torch.long, device=seq.device)
                keep = torch.zeros((len(flat), width), dtype=torch.bool, device=seq.device)
                for i, o in enumerate(flat):
                    ids[i, : len(o)] = torch.tensor(o, device=seq.device)
                    keep[i, : len(o)] = True
                logits = first[rows]
                if width > 1:
                    full = torch.cat([mask[rows], torch.ones((len(flat), width - 1), dtype=mask.dtype, device=seq.device)], 1)
                    cont = pos.amax(-1)[rows, None] + 1 + torch.arange(width - 1, device=seq.device)
                    rest = lm(input_ids=ids[:, :-1], attention_mask=full, position_ids=cont, use_cache=True,
                              **{_cache_kwarg(lm): cache}).logits.float()
                    logits = torch.cat([logits, rest], dim=1)
            finally:
                lm.clear_conditioned_layers()
                lm._use_cached_vision_x = False
            logp = torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
            return list((logp * keep).sum(dim=1).cpu().split(counts))

        # -- save ------------------------------------------------------------------------------
        def own_state_dict(self) -> dict[str, torch.Tensor]:
            """Tower, bridge, Perceiver and gated cross-attention (one name each); the LM is saved on its own."""
            return {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items() if k.startswith(OWN_PREFIXES)}

        def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
            """``lm/`` (stock ``save_pretrained``), ``flamingo.safetensors`` and ``flamingo_config.json``."""
            from safetensors.torch import save_file

            out = Path(save_directory)
            out.mkdir(parents=True, exist_ok=True)
            with stock_lm(self.lang_encoder) as lm:
                with atomic_path(out / LM_DIR) as tmp:
                    lm.save_pretrained(tmp)
            with atomic_path(out / FLAMINGO_WEIGHTS) as tmp:
                save_file(self.own_state_dict(), str(tmp), metadata={"format": "pt"})
            cfg = {**self.flamingo_config, "lang_encoder": LM_DIR, "checkpoint": FLAMINGO_WEIGHTS}
            atomic_write_json(out / FLAMINGO_CONFIG, cfg)
            return out

        @classmethod
        def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any):
            return load_flamingo(path, **kwargs)[0]

    MgllFlamingo.__module__ = __name__
    MgllFlamingo.__qualname__ = "MgllFlamingo"
    return MgllFlamingo


def __getattr__(name: str):
    if name == "MgllFlamingo":
        return flamingo_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextlib.contextmanager
def stock_lm(lm: nn.Module):
    """The patched LM as its stock transformers class for the duration (for ``save_pretrained``)."""
    from open_flamingo.src.utils import setattr_recursive

    patched_cls = lm.__class__
    layers = lm._get_decoder_layers()
    xattn = lm._modules.pop("gated_cross_attn_layers")
    setattr_recursive(lm, lm.decoder_layers_attr_name, lm.__dict__["old_decoder_blocks"])
    lm.__class__ = patched_cls.__bases__[-1]
    try:
        yield lm
    finally:
        lm.__class__ = patched_cls
        setattr_recursive(lm, lm.decoder_layers_attr_name, layers)
        lm._modules["gated_cross_attn_layers"] = xattn


# -- loading -------------------------------------------------------------------------------------
def read_flamingo_config(path: str | os.PathLike) -> dict[str, Any]:
    cfg_path = Path(path) / FLAMINGO_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{cfg_path}: missing; a Flamingo folder holds {FLAMINGO_CONFIG} (lang_encoder, vision_encoder, checkpoint, "
            "cross_attn_every_n_layers), see docs/swap.md"
        )
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object")
    for key in ("lang_encoder", "cross_attn_every_n_layers"):
        if key not in cfg:
            raise ValueError(f"{cfg_path}: field {key!r} missing")
    if "mgll_tower" not in cfg and "vision_encoder" not in cfg:
        raise ValueError(f"{cfg_path}: needs 'vision_encoder' ({{'open_clip': NAME, 'pretrained': TAG}} or {{'model_cfg': ...}}) or 'mgll_tower'")
    return cfg


def _resolve(root: Path, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else root / p


def _open_clip_visual(spec: dict[str, Any], where: Path) -> nn.Module:
    import open_clip
    from open_clip.model import _build_vision_tower

    if "open_clip" in spec:
        visual = open_clip.create_model(spec["open_clip"], pretrained=spec.get("pretrained")).visual
    elif "model_cfg" in spec:
        mc = spec["model_cfg"]
        visual = _build_vision_tower(int(mc["embed_dim"]), mc["vision_cfg"], quick_gelu=bool(mc.get("quick_gelu", False)))
    else:
        raise ValueError(f"{where}: vision_encoder needs 'open_clip' (+ 'pretrained') or 'model_cfg'")
    visual.output_tokens = True
    return visual


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: Flamingo checkpoint missing")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model_state_dict"), dict):  # OpenFlamingo training checkpoints
            state = state["model_state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file}: expected a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):  # saved from DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _canonical_names(state: dict[str, torch.Tensor], layers_attr: str) -> dict[str, torch.Tensor]:
    """OpenFlamingo's full state dicts also name each LM block ``lang_encoder.old_decoder_blocks.N``."""
    prefix = "lang_encoder.old_decoder_blocks."
    out = {}
    for k, v in state.items():
        if k.startswith(prefix):
            i, rest = k[len(prefix):].split(".", 1)
            k = f"lang_encoder.{layers_attr}.{i}.decoder_layer.{rest}"
        out.setdefault(k, v)
    return out


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], file: Path, required: tuple[str, ...]) -> None:
    """Load by name; every tensor of the ``required`` modules must come from the file under one of its names."""
    names = model.state_dict(keep_vars=True)  # every alias of a tensor, persistent buffers only
    unexpected = [k for k in state if k not in names]
    if unexpected:
        raise ValueError(f"{file}: {len(unexpected)} keys match no module of this Flamingo, e.g. {unexpected[:5]}")
    for k, v in state.items():
        if names[k].shape != v.shape:
            raise ShapeMismatch(f"{file}: {k} has shape {tuple(v.shape)} but the model's is {tuple(names[k].shape)}")
    model.load_state_dict(state, strict=False)
    loaded = {id(names[k]) for k in state}
    missing = [k for k, t in names.items() if k.startswith(required) and id(t) not in loaded]
    if missing:
        raise ValueError(f"{file}: {len(missing)} Flamingo weights missing, e.g. {missing[:5]}")


def _lm_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    lm_kw: dict[str, Any] = {}
    if kwargs.get("dtype") is not None:
        lm_kw["dtype"] = kwargs["dtype"]
    if kwargs.get("device_map") is not None:
        lm_kw["device_map"] = kwargs["device_map"]
    q = kwargs.get("quantization_config")
    if q is not None:  # skip paths are the Flamingo's; the LM loads on its own, so keep its part of them
        import copy

        q = copy.deepcopy(q)
        skip = list(getattr(q, "llm_int8_skip_modules", None) or [])
        q.llm_int8_skip_modules = [s[len("lang_encoder."):] for s in skip if s.startswith("lang_encoder.")] or ["lm_head"]
        lm_kw["quantization_config"] = q
    return lm_kw


def load_flamingo(path: str | os.PathLike, **kwargs: Any):
    """``(model, tokenizer)`` from a Flamingo folder (source or swapped).

    A source config without token ids is handled as OpenFlamingo's ``create_model_and_transforms``
    does: ``<|endofchunk|>`` and ``<image>`` (and a pad token) are added to the tokenizer and the
    LM's embeddings resized before the checkpoint is loaded. Accepts ``dtype``,
    ``quantization_config`` (the LM only; everything Flamingo adds stays in float) and ``device_map``.
    """
    from open_flamingo.src.factory import _infer_decoder_layers_attr_name
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance
    from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionConfig


    unknown = sorted(set(kwargs) - {"dtype", "quantization_config", "device_map", "torch_dtype"})
    if unknown:
        raise TypeError(f"load_flamingo got unsupported arguments {unknown}")
    if kwargs.get("torch_dtype") is not None and kwargs.get("dtype") is None:
        kwargs["dtype"] = kwargs["torch_dtype"]
    root = Path(path)
    cfg = read_flamingo_config(root)
    where = root / FLAMINGO_CONFIG
    lm_dir = _resolve(root, cfg["lang_encoder"])
    lm = AutoModelForCausalLM.from_pretrained(str(lm_dir), **_lm_kwargs(kwargs))
    tok_dir = _resolve(root, cfg["tokenizer"]) if cfg.get("tokenizer") else (root if (root / "tokenizer_config.json").is_file() else lm_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    if "media_token_id" not in cfg or "eoc_token_id" not in cfg:
        tokenizer.add_special_tokens({"additional_special_tokens": [EOC_TOKEN, MEDIA_TOKEN]})
        if tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": "<PAD>"})
        if lm.get_input_embeddings().weight.shape[0] != len(tokenizer):
            lm.resize_token_embeddings(len(tokenizer))
        cfg["media_token_id"] = tokenizer.convert_tokens_to_ids(MEDIA_TOKEN)
        cfg["eoc_token_id"] = tokenizer.convert_tokens_to_ids(EOC_TOKEN)
    extend_instance(lm, FlamingoLMMixin)
    cfg.setdefault("decoder_layers_attr_name", _infer_decoder_layers_attr_name(lm))
    lm.set_decoder_layers_attr_name(cfg["decoder_layers_attr_name"])

    bridge = None
    if cfg.get("mgll_tower"):
        spec = cfg["mgll_tower"]
        tower: nn.Module = MgllFlamingoTower(CLIPVisionConfig(**spec["clip_vision_config"]))
        bridge = make_bridge(int(spec["clip_vision_config"]["hidden_size"]), int(cfg["vis_dim"]))
    else:
        tower = _open_clip_visual(cfg["vision_encoder"], where)
        cfg.setdefault("vis_dim", int(tower.transformer.width))
    model = flamingo_class()(tower, lm, cfg, bridge=bridge)

    emb = lm.get_input_embeddings().weight
    own_dtype = kwargs.get("dtype") or (torch.float32 if kwargs.get("quantization_config") is not None else emb.dtype)
    for mod in (model.vision_encoder, model.bridge, model.perceiver, lm.gated_cross_attn_layers):
        mod.to(device=emb.device, dtype=own_dtype)
    if cfg.get("checkpoint"):
        file = _resolve(root, cfg["checkpoint"])
        required = ("perceiver.", "lang_encoder.gated_cross_attn_layers.")
        if cfg.get("mgll_tower"):
            required += ("vision_encoder.", "bridge.")
        state = _canonical_names(_read_weights(file), cfg["decoder_layers_attr_name"])
        _load_weights(model, {k: v.to(device=emb.device) for k, v in state.items()}, file, required)
    model.eval()
    return model, tokenizer
