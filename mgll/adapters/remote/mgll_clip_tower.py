"""What every swapped MGLL class shares: the tower base, the config check, and building without the stock tower.

This file is copied into every swapped folder that uses remote code; it imports only torch and
transformers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["ShapeMismatch", "ClipTower", "mgll_tower_spec", "stock_tower_skipped", "init_swapped"]


class ShapeMismatch(ValueError):
    """The tower and the MLLM disagree on a width or a token grid; the message names both sizes."""


class ClipTower(nn.Module):
    """An MGLL ViT as an exact ``CLIPVisionModel`` conversion plus its fixed grid.

    Hosts whose stock tower cannot hold the MGLL weights wrap this in their own tower contract;
    an MGLL ViT has learnt positions for one grid, so only that image size is accepted.
    """

    def __init__(self, vision_config):
        super().__init__()
        from transformers import CLIPVisionModel

        self.vit = CLIPVisionModel(vision_config)
        self.image_size = int(vision_config.image_size)
        self.patch_size = int(vision_config.patch_size)
        self.grid = self.image_size // self.patch_size

    @property
    def dtype(self) -> torch.dtype:
        return self.vit.dtype

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        h, w = pixel_values.shape[-2:]
        if (h, w) != (self.image_size, self.image_size):
            raise ShapeMismatch(
                f"grid mismatch: pixel_values are {h}x{w} px ({h // self.patch_size}x{w // self.patch_size} patches) but the "
                f"MGLL tower takes {self.image_size}x{self.image_size} px ({self.grid}x{self.grid} patches of {self.patch_size} px)"
            )


def mgll_tower_spec(config, stock_name: str) -> dict[str, Any]:
    """``config.mgll_tower``, checked before anything is built: a config without it was never written by ``mgll swap``."""
    spec = getattr(config, "mgll_tower", None)
    if not spec:
        raise ValueError(f"config has no 'mgll_tower' entry: this is not a {stock_name} folder written by `mgll swap`")
    return spec


class _NoTower(nn.Module):
    """Stands in for the stock tower while the stock ``__init__`` runs: no parameters, no allocation.

    It keeps the config it was given, because some stock ``__init__`` s read ``tower.config``
    (Janus sizes its aligner from it).
    """

    def __init__(self, config=None, *args: Any, **kwargs: Any):
        super().__init__()
        self.config = config

    @classmethod
    def _from_config(cls, config, **kwargs: Any) -> _NoTower:
        return cls(config)


@contextlib.contextmanager
def stock_tower_skipped(modeling_module, class_name: str) -> Iterator[None]:
    """While active, the stock modelling module builds :class:`_NoTower` where it would build ``class_name``.

    The stock ``__init__`` looks its tower class up in its own module, so replacing that one
    name is enough; under a 7B config or ZeRO-3's ``zero.Init`` the discarded tower would
    otherwise be allocated (and partitioned) for nothing. Not thread-safe: build models from
    one thread, as transformers does.
    """
    original = getattr(modeling_module, class_name)
    setattr(modeling_module, class_name, _NoTower)
    try:
        yield
    finally:
        setattr(modeling_module, class_name, original)


def init_swapped(
    model: nn.Module,
    stock: type,
    config,
    modeling_module,
    stock_tower_class: str,
    attr_path: str,
    build_tower: Callable[[Any, dict], nn.Module],
) -> None:
    """The one ``__init__`` of every swapped class: check the spec, run ``stock.__init__`` without its tower, put the MGLL tower at ``attr_path``."""
    spec = mgll_tower_spec(config, stock.__name__)
    with stock_tower_skipped(modeling_module, stock_tower_class):
        stock.__init__(model, config)
    parent_path, _, leaf = attr_path.rpartition(".")
    parent = model
    for part in parent_path.split(".") if parent_path else ():
        parent = getattr(parent, part)
    if not isinstance(getattr(parent, leaf), _NoTower):
        raise TypeError(f"{type(model).__name__}.{attr_path} was not the stock tower {stock_tower_class}; the stock class changed")
    setattr(parent, leaf, build_tower(config, spec))
    model.post_init()


def inherit_checkpoint_renames(swapped: type, stock: type) -> None:
    """Give ``swapped`` the stock class's checkpoint key renames.

    transformers looks these up by class name, then by model type, and applies them in reverse
    on save: a model loaded as the stock class saves its keys in the stock checkpoint layout
    (Qwen2-VL's ``model.layers.*``), so the swapped class must rename them back on load.
    """
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    mapping = get_checkpoint_conversion_mapping(stock.__name__)
    if mapping is None:
        mapping = get_checkpoint_conversion_mapping(stock.config_class.model_type)
    if mapping is not None:
        register_checkpoint_conversion_mapping(swapped.__name__, mapping, overwrite=True)
