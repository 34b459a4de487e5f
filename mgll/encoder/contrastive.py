"""The module a trainer wraps: an open_clip encoder plus its objective over the global batch.

Keeping gathering and the loss inside ``forward`` means DDP and DeepSpeed see one module
whose forward returns the loss, and the same code runs on one process or many.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mgll.encoder.batch_texts import BatchTexts, build_batch_texts
from mgll.encoder.distributed import gather_objects, gather_rows_with_grad, rank_and_world
from mgll.encoder.losses import DEFAULT_WEIGHTS, MGLLLoss, MGLLOptions, clip_loss, siglip_loss
from mgll.encoder.text_encoding import encode_texts

__all__ = ["LOSS_NAMES", "ContrastiveModel"]

LOSS_NAMES = ("clip", "siglip", "mgll")


class ContrastiveModel(nn.Module):
    """``forward(images, label_sets)`` -> dict of loss terms, ``"loss"`` the one to minimise.

    ``label_sets``: one ``{level: labels}`` mapping per local image. ``levels``: the dataset
    card's Level objects (name + template), coarse to fine.
    """

    def __init__(
        self,
        encoder: nn.Module,
        tokenizer,
        levels: Sequence,
        loss: str = "mgll",
        loss_weights: Mapping[str, float] | None = None,
        trim_text: bool = True,
        loss_options: MGLLOptions | None = None,
    ):
        super().__init__()
        if loss not in LOSS_NAMES:
            raise ValueError(f"unknown loss {loss!r}; known: {', '.join(LOSS_NAMES)}")
        if not levels:
            raise ValueError("ContrastiveModel needs at least one level")
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.levels = tuple(levels)
        self.loss_name = loss
        self.trim_text = trim_text
        weights = dict(loss_weights or {})
        unknown = set(weights) - {"soft_clip", "pointwise", "smooth_kl"}
        if unknown:
            raise ValueError(f"unknown loss weight(s) {sorted(unknown)}; known: soft_clip, pointwise, smooth_kl")
        weights = {**DEFAULT_WEIGHTS, **weights}
        self.mgll = (
            MGLLLoss(
                soft_clip_weight=weights["soft_clip"],
                pointwise_weight=weights["pointwise"],
                smooth_kl_weight=weights["smooth_kl"],
                options=loss_options,
            )
            if loss == "mgll"
            else None
        )
        if loss == "siglip" and getattr(encoder, "logit_bias", None) is None:
            raise ValueError("the siglip loss needs an encoder created with init_logit_bias (e.g. -10)")

    def set_progress(self, progress: float) -> None:
        """Training progress (step / steps) for the loss's schedules; a no-op for CLIP and SigLIP."""
        if self.mgll is not None:
            self.mgll.progress = float(progress)

    def logit_scale(self) -> torch.Tensor:
        return self.encoder.logit_scale.exp()

    def log_scale_parameters(self) -> list[nn.Parameter]:
        """The learnable log temperatures: open_clip's logit scale and, for MGLL, the point-wise one."""
        params = [self.encoder.logit_scale]
        if self.mgll is not None and self.mgll.pointwise is not None:
            params.append(self.mgll.pointwise.pointwise_logit_scale)
        return params

    def clamp_logit_scale(self, max_scale: float = 100.0) -> None:
        """Called after each optimizer step, as open_clip does: no scale exceeds 100 (log in [0, log 100])."""
        with torch.no_grad():
            for p in self.log_scale_parameters():
                p.clamp_(0, math.log(max_scale))

    def text_share(self, texts: list[str]) -> tuple[list[str], list[int]]:
        """This rank's contiguous chunk of the distinct texts and every rank's chunk size."""
        rank, world = rank_and_world()
        chunk = math.ceil(len(texts) / world)
        sizes = [max(0, min(chunk, len(texts) - r * chunk)) for r in range(world)]
        return texts[rank * chunk : rank * chunk + sizes[rank]], sizes

    def encode_distinct_texts(self, texts: list[str], device: torch.device) -> torch.Tensor:
        """Features of the global batch's distinct texts, each encoded by exactly one rank.

        Rank r encodes the r-th contiguous chunk; a rank whose chunk is empty encodes the
        first text and discards it, so every rank runs the text tower (DDP needs every
        parameter used on every rank).
        """
        _, world = rank_and_world()
        if world == 1:
            return encode_texts(self.encoder, self.tokenizer, texts, device, trim=self.trim_text)
        mine, sizes = self.text_share(texts)
        feats = encode_texts(self.encoder, self.tokenizer, mine or texts[:1], device, trim=self.trim_text)
        if not mine:
            feats = feats[:0] + 0.0 * feats.sum()  # keeps the tower in the graph, contributes nothing
        return gather_rows_with_grad(feats, sizes)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder.encode_image(images), dim=-1)

    def batch_texts(self, global_labels: Sequence[Mapping[str, Sequence[str]]]) -> BatchTexts:
        """The distinct texts and targets of the global batch, as the loss needs them."""
        return build_batch_texts(
            global_labels, self.levels, captions=self.loss_name != "mgll", per_level=self.loss_name == "mgll"
        )

    def forward(self, images: torch.Tensor, label_sets: Sequence[Mapping[str, Sequence[str]]]) -> dict:
        if images.shape[0] != len(label_sets):
            raise ValueError(f"{images.shape[0]} images but {len(label_sets)} label sets")
        image_features = self.image_features(images)
        all_label_sets = gather_objects([dict(x) for x in label_sets])
        sizes = [len(x) for x in all_label_sets]
        global_labels = [x for part in all_label_sets for x in part]
        image_features = gather_rows_with_grad(image_features, sizes)

        batch = self.batch_texts(global_labels)
        text_features = self.encode_distinct_texts(batch.texts, images.device)
        return self.objective(image_features, text_features, batch)

    def objective(self, image_features: torch.Tensor, text_features: torch.Tensor, batch: BatchTexts) -> dict:
        """The loss terms from the global batch's features (rows in global order, texts as ``batch.texts``)."""
        scale = self.logit_scale()
        if self.loss_name == "clip":
            loss = clip_loss(image_features, text_features[batch.caption_index], scale)
            return {"loss": loss, "clip": loss.detach()}
        if self.loss_name == "siglip":
            loss = siglip_loss(image_features, text_features[batch.caption_index], scale, self.encoder.logit_bias)
            return {"loss": loss, "siglip": loss.detach()}
        level_text = [text_features[cols] for cols in batch.level_columns]
        targets = [y.to(image_features.device) for y in batch.level_targets]
        return self.mgll(image_features, level_text, targets, scale)
