"""What every MLLM host tells the swap and alignment code: where the parts live and how they train.

Where the host's stock class can hold an MGLL ViT (LLaVA, LLaVA-NeXT: a ``CLIPVisionModel`` tower
built from ``vision_config``), the swapped model is that class with a different vision config
and loads with no custom code. Where it cannot (Qwen2-VL, InternVL, Janus, InstructBLIP), the
model becomes the thin subclass from :mod:`mgll.adapters.remote` (:func:`become_swapped`) and its
folder carries that code (``auto_map``, ``trust_remote_code=True``). Module locations are dotted paths from the top-level model, the form bitsandbytes'
skip list and peft's ``modules_to_save`` need.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch
from torch import nn

# ShapeMismatch and ClipTower are defined with the remote code that swapped folders carry
from mgll.adapters.remote.mgll_clip_tower import ClipTower, ShapeMismatch

__all__ = ["Host", "get_module", "ShapeMismatch", "PROJECTOR_INITS", "ClipTower", "become_swapped", "remote_module"]

PROJECTOR_INITS = ("default", "zero", "keep")


def get_module(model: nn.Module, path: str) -> nn.Module:
    mod = model
    for part in path.split("."):
        if not hasattr(mod, part):
            raise AttributeError(f"{type(model).__name__} has no module {path!r} (stopped at {part!r})")
        mod = getattr(mod, part)
    return mod


def mgll_part(model: nn.Module, path: str, cls: type) -> nn.Module:
    """The MGLL part at ``path``; anything else there means the model was never swapped."""
    part = get_module(model, path)
    if not isinstance(part, cls):
        raise TypeError(f"{type(model).__name__}.{path} is a {type(part).__name__}, not an MGLL tower: swap it first")
    return part


def zero_init_last(linear: nn.Linear, embeddings: torch.Tensor) -> None:
    """Last projector layer zero, bias = mean input embedding: image tokens start as an 'average word'.

    The LM then sees in-distribution inputs at step 0 and the gradient to the earlier layers
    flows once the last one moves off zero (LLaVA-Med's projector warm start).
    """
    with torch.no_grad():
        linear.weight.zero_()
        if linear.bias is not None:
            linear.bias.copy_(embeddings.float().mean(0).to(linear.bias.dtype))


def check_layer_index(name: str, layer: int, blocks: int) -> None:
    """``layer`` must index ``output_hidden_states`` of a ``blocks``-block ViT (embeddings + one per block)."""
    n = blocks + 1
    if not -n <= layer < n:
        raise ShapeMismatch(f"{name}={layer} does not exist in a {blocks}-block tower (hidden-state indices {-n}..{n - 1})")


def feature_layers(config) -> list[int]:
    """``config.vision_feature_layer`` as a list: LLaVA-family configs take one index or several (concatenated)."""
    layer = config.vision_feature_layer
    return [layer] if isinstance(layer, int) else list(layer)


def vit_spec(vc, select_layer: Any) -> dict[str, Any]:
    """The ``mgll_swap.json`` facts every CLIP-shaped tower shares, from its ``CLIPVisionConfig``."""
    return {
        "hidden_size": int(vc.hidden_size),
        "image_size": int(vc.image_size),
        "patch_size": int(vc.patch_size),
        "grid": int(vc.image_size) // int(vc.patch_size),
        "num_layers": int(vc.num_hidden_layers),
        "hidden_act": vc.hidden_act,
        "select_layer": select_layer,
    }


NO_TOKENIZER = "the MLLM folder has neither a processor nor a tokenizer; cannot build the image prompt"


def resolve_tokenizer(processor: Any, tokenizer: Any, error: str = NO_TOKENIZER) -> Any:
    """The tokenizer given, else the source processor's; ``error`` says what the folder lacked."""
    if tokenizer is None and processor is not None:
        tokenizer = processor.tokenizer
    if tokenizer is None:
        raise ValueError(error)
    return tokenizer


def chat_template_of(processor: Any) -> str | None:
    return getattr(processor, "chat_template", None) if processor is not None else None


@functools.cache
def remote_module(name: str, model_class: str):
    """``mgll.adapters.remote.<name>``, with its config and ``model_class`` registered with transformers' Auto classes here.

    Registered, this process knows the ``mgll_*`` model type, so ``AutoProcessor`` /
    ``AutoTokenizer`` on a swapped folder use mgll's own copy of the code instead of asking
    whether to trust the folder's (an interactive y/N prompt); a process without mgll still
    needs ``trust_remote_code=True``.
    """
    import importlib

    from transformers import AutoConfig, AutoModelForImageTextToText

    module = importlib.import_module(f"mgll.adapters.remote.{name}")
    cls = getattr(module, model_class)
    AutoConfig.register(cls.config_class.model_type, cls.config_class, exist_ok=True)
    AutoModelForImageTextToText.register(cls.config_class, cls, exist_ok=True)
    return module


def become_swapped(model: nn.Module, swapped_cls: type) -> None:
    """The loaded stock ``model`` becomes ``swapped_cls`` and its config ``swapped_cls.config_class``, in place.

    Both subclasses (:mod:`mgll.adapters.remote`) add no fields and no parameters, so re-classing
    is exact, and every submodule keeps sharing the one config object. ``save_pretrained`` then
    writes the remote-code layout: the subclass's model type, ``auto_map`` and its files.
    """
    model.config.__class__ = swapped_cls.config_class
    model.__class__ = swapped_cls
    model.config.architectures = [swapped_cls.__name__]


class Host:
    """Base class; subclasses set the paths and implement the tower swap for their architecture."""

    name: str = ""
    model_class_name: str = ""
    source_class_name: str = ""  # the class of the MLLM before the swap, when it differs from model_class_name
    tower_path: str = ""
    source_tower_path: str = ""  # where the stock tower sits before the swap, when it differs from tower_path
    remote_name: str = ""  # module of mgll.adapters.remote holding the swapped class (remote-code layout), if any
    default_select_layer: int = -2  # hidden-state index the MGLL tower hands on, where the host does not configure it
    projector_inits: tuple[str, ...] = PROJECTOR_INITS
    projector_path: str = ""
    language_model_path: str = ""
    lm_head_path: str = "lm_head"
    lora_leaf_names: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # prompts that share their first tokens (a circular question's rotations) may share those tokens' KV cache
    # (mgll.mllm_eval.shared_prefix): true where the image features and positions of a prefix do not depend on
    # what follows it and ``generate`` continues a given cache
    shares_prompt_prefix: bool = True

    # -- where things are ----------------------------------------------------------------------
    def remote(self):
        """The :mod:`mgll.adapters.remote` module whose class the swapped folder saves (imported on first use,
        so that ``mgll --help`` does not import model code)."""
        if not self.remote_name:
            raise TypeError(f"host {self.name!r} saves its stock class; it has no remote-code module")
        return remote_module(self.remote_name, self.model_class_name)

    def model_class(self):
        """The class of the swapped model: the remote-code subclass where the host has one, else the stock class."""
        if self.remote_name:
            return getattr(self.remote(), self.model_class_name)
        import transformers

        return getattr(transformers, self.model_class_name)

    def source_class(self):
        """The class that loads the original MLLM (``mgll swap --mllm``)."""
        import transformers

        return getattr(transformers, self.source_class_name or self.model_class_name)

    def source_model_types(self) -> tuple[str, ...]:
        """The ``model_type`` values of a ``config.json`` this host swaps (:mod:`mgll.adapters.source_check`)."""
        return (self.source_class().config_class.model_type,)

    def check_parts(self, model: nn.Module, where: str) -> None:
        """The source model has the tower the swap replaces and the LM it trains; else one error naming the path."""
        for role, path in (("vision tower", self.source_tower_path or self.tower_path), ("language model", self.language_model_path)):
            try:
                get_module(model, path)
            except AttributeError:
                raise ValueError(f"{where}: {type(model).__name__} has no {role} at {path!r}; not a {self.name} model") from None

    def source_view(self, processor: Any) -> str | None:
        """The image view the source MLLM's own processor uses when it is one of ours (``pad``), else None."""
        return None

    def tower(self, model: nn.Module) -> nn.Module:
        return get_module(model, self.tower_path)

    def projector(self, model: nn.Module) -> nn.Module:
        return get_module(model, self.projector_path)

    def language_model(self, model: nn.Module) -> nn.Module:
        return get_module(model, self.language_model_path)

    def lm_head(self, model: nn.Module) -> nn.Module:
        return get_module(model, self.lm_head_path)

    # -- training recipe -----------------------------------------------------------------------
    def trainable_paths(self, stage: int, train_tower: bool = False) -> list[str]:
        """Stage 1 aligns the projector only; stage 2 adds LoRA on the LM (peft adds those itself)."""
        if stage not in (1, 2):
            raise ValueError(f"stage={stage}: expected 1 (projector) or 2 (projector + LoRA)")
        paths = [self.projector_path]
        if train_tower:
            paths.append(self.tower_path)
        return paths

    def set_trainable(self, model: nn.Module, stage: int, train_tower: bool = False) -> list[str]:
        paths = self.trainable_paths(stage, train_tower)
        for name, p in model.named_parameters():
            if "lora_" not in name:
                p.requires_grad_(False)
        for path in paths:
            get_module(model, path).requires_grad_(True)
        return paths

    def lora_target_modules(self) -> str:
        """A peft regex matching the LM's attention/MLP linears only (the CLIP tower has q_proj too)."""
        leaves = "|".join(self.lora_leaf_names)
        lm = re.escape(self.language_model_path)
        return rf".*{lm}\..*\.({leaves})"

    def unquantised_modules(self) -> list[str]:
        """Full module paths for ``BitsAndBytesConfig(llm_int8_skip_modules=...)``.

        transformers 5 matches these against full names, so the short ``"vision_tower"`` of
        older recipes quantises the tower; the full path keeps it in float.
        """
        return [self.tower_path, self.projector_path, self.lm_head_path]

    # -- host specific -------------------------------------------------------------------------
    def num_image_tokens(self, model: nn.Module) -> int:
        raise NotImplementedError

    def tower_spec(self, model: nn.Module) -> dict[str, Any]:
        raise NotImplementedError

    def check_fit(self, model: nn.Module) -> None:
        raise NotImplementedError

    def replace_tower(self, model: nn.Module, encoder: nn.Module, projector_init: str = "default",
                      select_layer: int | None = None) -> nn.Module:
        """The one tower-replacement path: check, export the ViT, put it and the projector in, re-class, check the fit.

        ``put_tower`` is the host's part (where the tower goes, which config fields describe it, the
        projector at its width). Hosts with a remote-code class then become that class in place.
        """
        from mgll.adapters.clip_vision import to_hf_clip_vision

        if projector_init not in self.projector_inits:
            if len(self.projector_inits) == 1:
                raise ValueError(f"projector_init={projector_init!r}: the {self.name} host supports {self.projector_inits[0]!r} only")
            raise ValueError(f"projector_init={projector_init!r}: expected one of {', '.join(self.projector_inits)}")
        stock = self.source_class()
        if not isinstance(model, stock):
            raise TypeError(f"{self.name} host needs a {stock.__name__}, got {type(model).__name__}")
        ref = model.get_input_embeddings().weight
        hf_vit = to_hf_clip_vision(encoder, with_projection=False)
        layer = self.default_select_layer if select_layer is None else int(select_layer)
        self.put_tower(model, hf_vit, layer, projector_init, ref)
        if self.remote_name:
            become_swapped(model, self.model_class())
        self.after_swap(model)
        self.check_fit(model)
        return model

    def put_tower(self, model: nn.Module, hf_vit: nn.Module, select_layer: int, projector_init: str, ref: torch.Tensor) -> None:
        """Host part of :meth:`replace_tower`: ``hf_vit`` (the MGLL ViT as a ``CLIPVisionModel``) and the projector in place;
        new modules take ``ref``'s device and dtype (the input embeddings), ``zero`` projectors its mean."""
        raise NotImplementedError

    def after_swap(self, model: nn.Module) -> None:
        """Counts that follow from the new tower (``image_seq_length``); called after re-classing."""

    def remote_tower(self, model: nn.Module, hf_vit: nn.Module, spec: dict[str, Any], ref: torch.Tensor) -> nn.Module:
        """The MGLL tower the saved remote class rebuilds from ``config.mgll_tower`` (= ``spec``), holding ``hf_vit``'s weights."""
        model.config.mgll_tower = spec
        tower = self.remote().build_tower(model.config, spec)
        tower.vit.load_state_dict(hf_vit.state_dict())
        return tower.to(device=ref.device, dtype=ref.dtype)

    def make_processor(self, model: nn.Module, processor: Any, tokenizer: Any, encoder: nn.Module, view: str = "crop") -> Any:
        """The host's processor for the swapped model: the MGLL grid, and the encoder's pixels (``view``:
        :data:`mgll.adapters.vision_tower.IMAGE_VIEWS`) through the remote image processors where the stock one differs."""
        raise NotImplementedError

    def target_end_ids(self, model: nn.Module, tokenizer: Any) -> list[int]:
        """What closes a caption the model learns to write: the tokenizer's end-of-sequence token."""
        return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def build_batch(
        self, model: nn.Module, processor: Any, images: list, prompts: list[str], targets: list[str]
    ) -> dict[str, torch.Tensor]:
        """Alignment rows laid out exactly as inference prompts (:func:`mgll.adapters.prompts.alignment_batch`):
        the chat-templated ``prompts`` with the image, through the processor's own call, then ``targets``."""
        from mgll.adapters.prompts import alignment_batch

        return alignment_batch(self.name, processor, images, prompts, targets, self.target_end_ids(model, processor.tokenizer))
