"""The MGLL encoder on its own: zero-shot probabilities per level of the dataset card, and patch heat maps.

Probabilities follow ``mgll zeroshot``: per level, the card's template is filled with each label
and ``softmax(logit_scale * cos)`` over the level's labels is reported. Single-label levels
(binary / multi-class) therefore sum to one. Multi-label levels use the same softmax when the
encoder has no ``logit_bias`` (MGLL's soft CLIP trains exactly that: ``1/k`` for each of an
image's ``k`` labels) and independent sigmoids when it has one (SigLIP-trained); which one
applies is reported per level.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mgll.demo.inputs import DemoInputError

__all__ = ["AUTO_LABEL", "EncoderView", "LevelProbs", "patch_text_similarity"]

AUTO_LABEL = "auto"
DISPLAY_SIZE = 448  # longest side of the heat map shown in the page


@dataclass
class LevelProbs:
    level: str
    kind: str  # binary | multiclass | multilabel
    score: str  # softmax | sigmoid
    probs: dict[str, float]

    @property
    def single_label(self) -> bool:
        return self.kind != "multilabel"

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level, "kind": self.kind, "score": self.score, "probs": self.probs}


def _trained_on(encoder: str | os.PathLike) -> Path | None:
    """The dataset folder a run was trained on (``config.yaml``'s data.path), when ``encoder`` is a run folder.

    Runs record an absolute path; an older run may hold one relative to wherever training was
    started (usually a folder above the run), so a relative path is looked up from the run folder
    and each folder above it, not from the demo's working directory.
    """
    import yaml

    for cfg in (Path(encoder) / "config.yaml", Path(encoder).parent / "config.yaml"):
        if cfg.is_file():
            data = (yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}).get("data") or {}
            if data.get("path"):
                recorded = Path(data["path"]).expanduser()
                if recorded.is_absolute():
                    return recorded
                run = cfg.resolve().parent
                for base in (run, *run.parents):
                    if (base / recorded).is_dir():
                        return base / recorded
                return recorded
    return None


@torch.no_grad()
def patch_text_similarity(visual: torch.nn.Module, pixels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(B, gh, gw) cosine similarity of each patch token, projected into the joint space, to ``text`` (D,).

    The patch tokens are taken where open_clip takes the pooled token (after ``ln_post``) and
    multiplied by the same projection, so they live in the space the text embedding does.
    """
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
        raise TypeError(f"patch similarity needs an open_clip ViT without attention pooling, got {type(visual).__name__}")
    before = visual.output_tokens
    visual.output_tokens = True
    try:
        _, tokens = visual(pixels)
    finally:
        visual.output_tokens = before
    if visual.final_ln_after_pool:
        tokens = visual.ln_post(tokens)
    if visual.proj is not None:
        tokens = tokens @ visual.proj
    gh, gw = visual.grid_size
    if tokens.shape[1] != gh * gw:
        raise ValueError(f"expected {gh * gw} patch tokens, got {tokens.shape[1]}")
    sim = torch.nn.functional.normalize(tokens.float(), dim=-1) @ torch.nn.functional.normalize(text.float(), dim=0)
    return sim.reshape(-1, gh, gw)


class EncoderView:
    """The MGLL encoder alone: zero-shot probabilities per level of the dataset card and patch heat maps."""

    def __init__(self, encoder: str | os.PathLike, data: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        from mgll.data import load_dataset
        from mgll.encoder.factory import create_encoder, resolve_encoder_dir
        from mgll.evaluate.tasks import make_task
        from mgll.evaluate.zeroshot import build_classifier

        if resolve_encoder_dir(encoder) is None:
            raise FileNotFoundError(f"{encoder}: no open_clip_config.json here or in {encoder}/encoder; expected an MGLL run or encoder folder")
        data = Path(data) if data else _trained_on(encoder)
        if data is None:
            raise FileNotFoundError(f"{encoder}: no config.yaml naming the dataset it was trained on; pass --data DATASET (a records folder with its card)")
        if not data.is_dir():
            raise FileNotFoundError(f"{data}: dataset folder not found (needed for the label names of each level); pass --data DATASET")
        self.encoder = Path(encoder)
        self.device = torch.device(device)
        self.model, _, self.preprocess, self.tokenizer, self.name = create_encoder(str(encoder), device=self.device)
        self.model.eval()
        self.dataset = load_dataset(data)
        ls = getattr(self.model, "logit_scale", None)
        self.scale = 100.0 if ls is None else float(ls.detach().float().exp().clamp(max=100.0).reshape(-1)[0])
        b = getattr(self.model, "logit_bias", None)
        self.bias = None if b is None else float(b.detach().float().reshape(-1)[0])
        self.tasks, self.classifiers, self.notes = {}, {}, []
        for lv in self.dataset.card.level_names:
            try:
                task = make_task(self.dataset, lv)
            except ValueError as e:  # a level with a single label has nothing to choose between
                self.notes.append(f"level {lv!r} skipped: {e}")
                continue
            self.tasks[lv] = task
            template = self.dataset.card.level(lv).template
            self.classifiers[lv] = build_classifier(self.model, self.tokenizer, task.classes, [template], self.device).cpu()
        if not self.tasks:
            raise ValueError(f"{data}: no level of the dataset card has two or more labels to score")
        self.heat_level = list(self.tasks)[min(1, len(self.tasks) - 1)]  # fundus: disease; x-ray: study

    @property
    def levels(self) -> list[str]:
        return list(self.tasks)

    def label_choices(self) -> list[str]:
        return [f"{lv}: {c}" for lv, task in self.tasks.items() for c in task.classes]

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        return self.preprocess(image).unsqueeze(0).to(self.device)

    @torch.no_grad()
    def level_probs(self, image: Image.Image) -> list[LevelProbs]:
        from mgll.evaluate.zeroshot import class_scores

        feats = self.model.encode_image(self._pixels(image), normalize=True).float().cpu()
        out = []
        for lv, task in self.tasks.items():
            multilabel = task.kind == "multilabel"
            score = "sigmoid" if multilabel and self.bias is not None else "softmax"
            row = class_scores(feats, self.classifiers[lv], self.scale, multilabel, score, self.bias)[0]
            out.append(LevelProbs(lv, task.kind, score, {c: float(v) for c, v in zip(task.classes, row)}))
        return out

    def resolve_label(self, choice: str | None, levels: list[LevelProbs]) -> tuple[str, str]:
        """``(level, label)`` for a dropdown choice; ``auto`` is the top label of :attr:`heat_level`."""
        if not choice or choice == AUTO_LABEL or choice.startswith(AUTO_LABEL + " "):
            probs = next(lp.probs for lp in levels if lp.level == self.heat_level)
            return self.heat_level, max(probs, key=probs.get)
        level, _, label = choice.partition(": ")
        if level not in self.tasks or label not in self.tasks[level].classes:
            raise DemoInputError(f"unknown heat-map label {choice!r}; pick one from the list")
        return level, label

    def _crop_box(self, w: int, h: int) -> tuple[int, int, int, int]:
        """The region the encoder sees: open_clip resizes the shortest side and centre-crops (unless it squashes)."""
        from mgll.adapters.preprocess import preprocess_cfg_of

        cfg = preprocess_cfg_of(self.model)
        if cfg.get("resize_mode", "shortest") == "squash":
            return 0, 0, w, h
        size = cfg.get("size", 224)
        th, tw = (size, size) if isinstance(size, int) else tuple(size)
        scale = max(th / h, tw / w)
        cw, ch = min(w, round(tw / scale)), min(h, round(th / scale))
        left, top = (w - cw) // 2, (h - ch) // 2
        return left, top, left + cw, top + ch

    @torch.no_grad()
    def heatmap(self, image: Image.Image, level: str, label: str) -> tuple[Image.Image, dict[str, float]]:
        """The label's patch similarity over the region the encoder sees, blended on the image; returns stats too."""
        from matplotlib import colormaps

        col = self.tasks[level].classes.index(label)
        sim = patch_text_similarity(self.model.visual, self._pixels(image), self.classifiers[level][:, col].to(self.device))[0]
        sim = sim.cpu().numpy()
        lo, hi = float(sim.min()), float(sim.max())
        norm = (sim - lo) / (hi - lo) if hi > lo else np.zeros_like(sim)
        view = image.crop(self._crop_box(*image.size))
        scale = DISPLAY_SIZE / max(view.size)
        view = view.resize((max(1, round(view.width * scale)), max(1, round(view.height * scale))), Image.Resampling.BICUBIC)
        heat = Image.fromarray(np.round(norm * 255).astype(np.uint8)).resize(view.size, Image.Resampling.BICUBIC)
        rgb = colormaps["inferno"](np.asarray(heat, dtype=np.float64) / 255.0)[..., :3]
        overlay = Image.fromarray(np.round(rgb * 255).astype(np.uint8))
        return Image.blend(view.convert("RGB"), overlay, 0.5), {"min": lo, "max": hi}
