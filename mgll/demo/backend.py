"""Model-side logic of the comparison demo, importable and testable without gradio.

Three things answer for one image: the base MLLM, its MGLL-swapped twin (same prompt, same
scoring) and the MGLL encoder on its own (:mod:`mgll.demo.encoder_view`). Everything the UI shows
comes from :meth:`DemoBackend.compare`, so the gradio layer only formats; bad input raises
:class:`~mgll.demo.inputs.DemoInputError`, whose message the UI shows verbatim.

Multiple choice. A question whose lines include ``A. ...``, ``B. ...`` (consecutive letters from A)
is multiple choice: each option is scored by its log-likelihood after the prompt, exactly as
``mgll mcq`` scores a bank (:func:`mgll.mllm_eval.scoring.option_logliks`), and the softmax of those
log-likelihoods over the listed options is shown as the option probabilities. Anything else is
free text and answered by greedy generation.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mgll.data.pixel_budget import resolve_max_pixels
from mgll.demo import MAX_IMAGE_MB
from mgll.demo.encoder_view import AUTO_LABEL, EncoderView, LevelProbs, patch_text_similarity
from mgll.demo.inputs import DICOM_SUFFIXES, DemoInputError, is_dicom, load_image, mcq_preset, parse_question

__all__ = [
    "AUTO_LABEL",
    "DICOM_SUFFIXES",
    "Answer",
    "CompareResult",
    "DemoBackend",
    "DemoInputError",
    "EncoderView",
    "LevelProbs",
    "MllmSide",
    "is_dicom",
    "load_image",
    "mcq_preset",
    "parse_question",
    "patch_text_similarity",
    "resolve_host",
]


def resolve_host(model_dir: str | os.PathLike, host: str | None = None) -> str:
    """The host family of a checkpoint: its ``mgll_swap.json``, else ``host``, else config.json's model_type."""
    from mgll.adapters.hosts import get_host, list_hosts
    from mgll.adapters.hosts.medflamingo.model import FLAMINGO_CONFIG

    d = Path(model_dir)
    spec = d / "mgll_swap.json"
    if spec.is_file():
        swapped_host = json.loads(spec.read_text(encoding="utf-8"))["host"]
        if host and host != swapped_host:
            raise ValueError(f"{d}: --host {host} but its mgll_swap.json says host {swapped_host!r}")
        return swapped_host
    if (d / FLAMINGO_CONFIG).is_file():  # an OpenFlamingo folder (Med-Flamingo), not a transformers one
        if host and host != "medflamingo":
            raise ValueError(f"{d}: --host {host} but it is an OpenFlamingo folder ({FLAMINGO_CONFIG}): host medflamingo")
        return "medflamingo"
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d}: no config.json; expected a transformers MLLM checkpoint folder or an `mgll swap` output")
    if host:
        get_host(host)
        return host
    model_type = json.loads((d / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type in list_hosts():
        return model_type
    raise ValueError(f"{d}: cannot tell its host from model_type {model_type!r}; pass --host (one of {', '.join(list_hosts())})")


@dataclass
class Answer:
    text: str  # the answer as shown: the chosen option or the generated text
    options: list[str] | None = None  # "A. cataract", ... (multiple choice only)
    probs: dict[str, float] | None = None  # option -> probability, softmax over the options' log-likelihoods
    logliks: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "options": self.options, "probs": self.probs, "logliks": self.logliks}


class MllmSide:
    """One MLLM (a plain host checkpoint or a swap folder) answering an image + question."""

    def __init__(self, model_dir: str | os.PathLike, host: str | None = None, device: str | torch.device = "cpu",
                 max_new_tokens: int = 32, align_dir: str | os.PathLike | None = None, dtype: torch.dtype | None = None):
        from mgll.mllm_eval.scoring import load_model

        self.dir = Path(model_dir)
        self.host = resolve_host(self.dir, host)
        self.device = torch.device(device)
        self.max_new_tokens = max_new_tokens
        self.align_dir = Path(align_dir) if align_dir else None
        if self.align_dir is not None and not self.align_dir.is_dir():
            raise FileNotFoundError(f"{self.align_dir}: alignment run folder not found (expected `mgll align --out` output)")
        self.model, self.processor = load_model(self.host, self.dir, self.align_dir, device=self.device, dtype=dtype)
        self.swapped = (self.dir / "mgll_swap.json").is_file()

    @torch.inference_mode()
    def answer(self, image: Image.Image, question: str, options: list[str] | None) -> Answer:
        from mgll.mllm_eval.scoring import (
            build_prompt,
            encode_prefix,
            generate_answer,
            option_logliks,
            option_text,
        )

        dtype = next(self.model.parameters()).dtype
        prompt = build_prompt(self.host, self.processor, question)
        prefix = encode_prefix(self.processor, prompt, image, self.device, dtype)
        tok = getattr(self.processor, "tokenizer", self.processor)
        if options is None:
            text = generate_answer(self.model, self.processor, prefix, self.max_new_tokens)
            return Answer(text=text or "(the model generated no text)")
        shown = [option_text(i, o) for i, o in enumerate(options)]
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in shown]
        if any(not i for i in ids):
            raise DemoInputError(f"an option tokenises to nothing for {self.dir.name}; reword the options")
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ll = option_logliks(self.host, self.model, prefix, ids, pad_id=pad).double()
        p = torch.softmax(ll, dim=0).tolist()
        best = int(torch.argmax(ll))
        return Answer(text=shown[best], options=shown, probs=dict(zip(shown, p)), logliks=[float(x) for x in ll])


@dataclass
class CompareResult:
    image: Image.Image
    question: str
    options: list[str] | None
    base: Answer
    swapped: Answer
    levels: list[LevelProbs]
    heat_level: str
    heat_label: str
    heatmap: Image.Image
    heat_range: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "multiple_choice": self.options is not None,
            "base": self.base.to_dict(),
            "swapped": self.swapped.to_dict(),
            "levels": [lp.to_dict() for lp in self.levels],
            "heatmap": {"level": self.heat_level, "label": self.heat_label, "cosine": self.heat_range},
        }


class DemoBackend:
    """Loads the three models once; :meth:`compare` serves one request (serialised: the models are shared)."""

    def __init__(self, base: str | os.PathLike, swapped: str | os.PathLike, encoder: str | os.PathLike,
                 data: str | os.PathLike | None = None, host: str | None = None, device: str | None = None,
                 max_image_mb: float = MAX_IMAGE_MB, max_new_tokens: int = 32,
                 swapped_align: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
                 max_pixels: int | None = None):
        if max_image_mb <= 0:
            raise ValueError(f"max_image_mb must be positive, got {max_image_mb}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.max_image_mb = float(max_image_mb)
        self.max_pixels = resolve_max_pixels(max_pixels)  # resolved now: a bad MGLL_MAX_PIXELS fails at start-up
        self.base = MllmSide(base, host, device, max_new_tokens, dtype=dtype)
        # --host names the base model's family; the swapped twin reads its own from mgll_swap.json
        twin_host = host if not (Path(swapped) / "mgll_swap.json").is_file() else None
        self.swapped = MllmSide(swapped, twin_host, device, max_new_tokens, align_dir=swapped_align, dtype=dtype)
        self.encoder = EncoderView(encoder, data, device)
        self._lock = threading.Lock()

    def heat_choices(self) -> list[str]:
        return [f"{AUTO_LABEL} (top {self.encoder.heat_level} label)", *self.encoder.label_choices()]

    def compare(self, path: str | os.PathLike | None, question: str | None, heat_label: str | None = AUTO_LABEL) -> CompareResult:
        text, options = parse_question(question)  # cheap checks first: no model runs for a bad request
        if heat_label and not heat_label.startswith(AUTO_LABEL) and heat_label not in self.encoder.label_choices():
            raise DemoInputError(f"unknown heat-map label {heat_label!r}; pick one from the list")
        image = load_image(path, self.max_image_mb, self.max_pixels)
        with self._lock:
            base = self.base.answer(image, text, options)
            swapped = self.swapped.answer(image, text, options)
            levels = self.encoder.level_probs(image)
            level, label = self.encoder.resolve_label(heat_label, levels)
            heat, rng = self.encoder.heatmap(image, level, label)
        return CompareResult(image, text, options, base, swapped, levels, level, label, heat, rng)
