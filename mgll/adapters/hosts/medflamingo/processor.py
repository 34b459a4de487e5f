"""Images + interleaved ``<image> ... <|endofchunk|>`` text into OpenFlamingo inputs, as a transformers processor.

Flamingo has no processor of its own (OpenFlamingo hands out an open_clip transform and a
tokenizer); a ``ProcessorMixin`` subclass lets a swapped folder save and reload both with
``AutoProcessor`` like every other host. It is registered with ``AutoProcessor`` on first use
(:func:`register_auto_processor`, called by the ``medflamingo`` host) under its own config class.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = ["MEDIA_TOKEN", "EOC_TOKEN", "processor_class", "register_auto_processor"]

from mgll.adapters.hosts.medflamingo.model import EOC_TOKEN, MEDIA_TOKEN  # the model's token contract


@functools.cache
def processor_class():
    """``MgllFlamingoProcessor``: a ``CLIPImageProcessor`` (the MGLL encoder's transform) + the LM's tokenizer."""
    from transformers import BatchFeature, ProcessorMixin

    class MgllFlamingoProcessor(ProcessorMixin):
        """``processor(text=[...], images=[[img, ...], ...])`` -> ``input_ids``, ``attention_mask``, ``pixel_values`` (B, T, C, H, W).

        Every ``<image>`` in a text takes the next image of that text's list, as OpenFlamingo's
        few-shot prompts do; texts are left-padded by default, which ``generate`` needs.
        """

        def __init__(self, image_processor=None, tokenizer=None, **kwargs):
            super().__init__(image_processor, tokenizer)

        def __call__(self, text=None, images=None, padding_side: str = "left", return_tensors: str = "pt", **kwargs: Any):
            if text is None:
                raise ValueError("MgllFlamingoProcessor needs text: Flamingo reads images only at <image> tokens in the text")
            texts = [text] if isinstance(text, str) else list(text)
            out: dict[str, Any] = dict(
                self.tokenizer(texts, padding=True, padding_side=padding_side, return_tensors="pt", add_special_tokens=True)
            )
            if images is not None:
                out["pixel_values"] = self.images_to_tensor(texts, images)
            return BatchFeature(out, tensor_type=return_tensors)

        def images_to_tensor(self, texts: list[str], images) -> torch.Tensor:
            per_text = [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
            if len(per_text) != len(texts):
                raise ValueError(f"{len(texts)} texts but {len(per_text)} image lists: give one list of images per text")
            counts = [t.count(MEDIA_TOKEN) for t in texts]
            for i, (n, ims) in enumerate(zip(counts, per_text)):
                if n != len(ims):
                    raise ValueError(f"text {i} has {n} {MEDIA_TOKEN} tokens but {len(ims)} images")
            if len(set(counts)) != 1:
                raise ValueError(f"every text needs the same number of images (got {counts}): Flamingo stacks them as (B, T, ...)")
            flat = [im for ims in per_text for im in ims]
            pix = self.image_processor(flat, return_tensors="pt")["pixel_values"]
            return pix.reshape(len(texts), counts[0], *pix.shape[1:])

    MgllFlamingoProcessor.__module__ = __name__
    MgllFlamingoProcessor.__qualname__ = "MgllFlamingoProcessor"
    return MgllFlamingoProcessor


@functools.cache
def register_auto_processor() -> None:
    """Map ``processor_class: MgllFlamingoProcessor`` in a saved folder to this class for ``AutoProcessor``."""
    from transformers import AutoProcessor

    from mgll.adapters.hosts.medflamingo.model import config_class

    AutoProcessor.register(config_class(), processor_class(), exist_ok=True)


def __getattr__(name: str):
    if name == "MgllFlamingoProcessor":
        return processor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
