"""What every MLLM host tells the swap and alignment code: where the parts live and how they train.

A host never changes an MLLM's architecture class: the swapped model is the host's own
transformers class with a different vision config, so it loads with ``from_pretrained`` and no
custom code. Module locations are dotted paths from the top-level model, the form bitsandbytes'
skip list and peft's ``modules_to_save`` need.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

__all__ = ["Host", "get_module", "ShapeMismatch"]


class ShapeMismatch(ValueError):
    """The tower and the MLLM disagree on a width or a token grid; the message names both sizes."""


def get_module(model: nn.Module, path: str) -> nn.Module:
    mod = model
    for part in path.split("."):
        if not hasattr(mod, part):
            raise AttributeError(f"{type(model).__name__} has no module {path!r} (stopped at {part!r})")
        mod = getattr(mod, part)
    return mod


def pad_batch(rows: list[list[int]], labels: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad token rows into ``(input_ids, attention_mask, labels)``; padded label positions are -100."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    label_t = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labels)):
        input_ids[i, : len(r)] = torch.tensor(r)
        label_t[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(r)] = 1
    return input_ids, mask, label_t


def inherit_checkpoint_renames(subclass: type, stock: type) -> None:
    """transformers applies a class's checkpoint key renames by class name, so a subclass gets none:
    register the stock class's (or its model type's) mapping under the subclass's name."""
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    mapping = get_checkpoint_conversion_mapping(stock.__name__)
    if mapping is None:
        mapping = get_checkpoint_conversion_mapping(stock.config_class.model_type)
    if mapping is not None:
        register_checkpoint_conversion_mapping(subclass.__name__, mapping, overwrite=True)


class Host:
    """Base class; subclasses set the paths and implement the tower swap for their architecture."""

    name: str = ""
    model_class_name: str = ""
    source_class_name: str = ""  # the class of the MLLM before the swap, when it differs from model_class_name
    tower_path: str = ""
    projector_path: str = ""
    language_model_path: str = ""
    lm_head_path: str = "lm_head"
    lora_leaf_names: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    # -- where things are ----------------------------------------------------------------------
    def model_class(self):
        import transformers

        return getattr(transformers, self.model_class_name)

    def source_class(self):
        """The class that loads the original MLLM (``mgll swap --mllm``)."""
        import transformers

        return getattr(transformers, self.source_class_name or self.model_class_name)

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

    def replace_tower(self, model: nn.Module, encoder: nn.Module, projector_init: str = "default") -> nn.Module:
        raise NotImplementedError

    def make_processor(self, model: nn.Module, processor: Any, tokenizer: Any, encoder: nn.Module) -> Any:
        raise NotImplementedError

    def build_batch(
        self, model: nn.Module, processor: Any, images: list, prompts: list[str], targets: list[str]
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError
