"""A reference for tests: the hidden states of one layer of an open_clip ViT, computed by open_clip itself.

The hosts select tower layers from the exported ``CLIPVisionModel``'s ``hidden_states``; this class gets the same
tokens through open_clip's own ``forward_intermediates``, an independent path, so the host tests can check that the
swapped towers hand their projectors the right layer. (Until 2026-12 it lived in ``mgll.adapters.vision_tower``.)
Layer indices follow transformers' ``output_hidden_states`` list: 0 is the embedding output (after ``ln_pre``),
``i`` the output of block ``i``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from mgll.adapters.clip_vision import _visual_of
from mgll.adapters.preprocess import build_image_processor, preprocess_cfg_of

SELECT_FEATURES = ("patch", "cls_patch")


class OpenClipVisionTower(nn.Module):
    """Hidden states ``(B, N, D)`` of one layer of an open_clip ViT, the contract LLaVA's projector expects."""

    def __init__(
        self,
        model: nn.Module,
        preprocess_cfg: dict[str, Any] | None = None,
        select_layer: int = -2,
        select_feature: str = "patch",
        name: str | None = None,
    ):
        super().__init__()
        self.visual = _visual_of(model)
        self.preprocess_cfg = dict(preprocess_cfg) if preprocess_cfg is not None else preprocess_cfg_of(model)
        self.name = name
        n = self.num_layers + 1
        if not -n <= int(select_layer) < n:
            raise ValueError(
                f"select_layer={select_layer} out of range for a {self.num_layers}-block ViT "
                f"(hidden-state indices {-n}..{n - 1}; -2 is the penultimate block as in LLaVA)"
            )
        if select_feature not in SELECT_FEATURES:
            raise ValueError(f"select_feature={select_feature!r}: expected one of {', '.join(SELECT_FEATURES)}")
        self.select_layer = int(select_layer)
        self.select_feature = select_feature
        self._image_processor = None

    @classmethod
    def from_encoder(
        cls,
        run_or_name: str | os.PathLike,
        pretrained: str | None = None,
        select_layer: int = -2,
        select_feature: str = "patch",
        **model_kwargs: Any,
    ) -> OpenClipVisionTower:
        """Build from a run folder, saved encoder or open_clip name; the text tower is dropped."""
        from mgll.encoder.factory import create_encoder

        model, _, _, _, name = create_encoder(str(run_or_name), pretrained=pretrained, **model_kwargs)
        cfg = preprocess_cfg_of(model)
        return cls(model.visual, cfg, select_layer=select_layer, select_feature=select_feature, name=name)

    # -- shape facts the hosts need -------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self.visual.transformer.width)

    @property
    def num_layers(self) -> int:
        return len(self.visual.transformer.resblocks)

    @property
    def image_size(self) -> int:
        h, w = self.visual.image_size
        if h != w:
            raise ValueError(f"non-square image size {h}x{w}: LLaVA-family hosts expect square inputs")
        return int(h)

    @property
    def patch_size(self) -> int:
        ph, pw = self.visual.patch_size
        if ph != pw:
            raise ValueError(f"non-square patch {ph}x{pw}")
        return int(ph)

    @property
    def grid(self) -> int:
        """Patches per side."""
        gh, gw = self.visual.grid_size
        if gh != gw:
            raise ValueError(f"non-square patch grid {gh}x{gw}")
        return int(gh)

    @property
    def num_prefix_tokens(self) -> int:
        return 1  # open_clip ViTs always prepend one class token

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_tokens(self) -> int:
        """Tokens per image that ``forward`` returns for the current ``select_feature``."""
        return self.num_patches + (self.num_prefix_tokens if self.select_feature == "cls_patch" else 0)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    @property
    def image_processor(self):
        if self._image_processor is None:
            self._image_processor = build_image_processor(self.preprocess_cfg)
        return self._image_processor

    # -- training state ------------------------------------------------------------------------
    def freeze(self) -> OpenClipVisionTower:
        self.visual.requires_grad_(False)
        return self

    def unfreeze(self) -> OpenClipVisionTower:
        self.visual.requires_grad_(True)
        return self

    @property
    def is_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.visual.parameters())

    # -- forward -------------------------------------------------------------------------------
    def hidden_state(self, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
        """Hidden states ``(B, 1 + grid**2, D)`` at hidden-state index ``layer`` (0 = embeddings)."""
        n = self.num_layers + 1
        j = layer % n
        x = pixel_values.to(self.dtype)
        if j == 0:
            return self.visual._embeds(x)
        out = self.visual.forward_intermediates(
            x,
            indices=[j - 1],
            stop_early=True,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        return torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values: expected (B, 3, H, W), got {tuple(pixel_values.shape)}")
        hs = self.hidden_state(pixel_values, self.select_layer)
        if self.select_feature == "patch":
            hs = hs[:, self.num_prefix_tokens :]
        return hs

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, hidden_size={self.hidden_size}, image_size={self.image_size}, "
            f"patch_size={self.patch_size}, select_layer={self.select_layer}, select_feature={self.select_feature!r}"
        )
