"""An alignment run as a stand-alone model folder: what a user hands to lmms-eval, vLLM or a pipeline.

``mgll align`` writes the trained parts (``projector.safetensors``, a LoRA ``adapter/``, an optional
``tower.safetensors`` and chat template) beside the swapped folder they belong to, which only mgll's
``load_aligned`` puts together. ``export_aligned`` puts them together once and saves the result like a
swap folder: the host's class (remote code where the swap used it) with the projector in and the LoRA
merged into the LM weights, the processor with the run's chat template, and ``mgll_swap.json``; so it
loads with ``AutoModelForImageTextToText`` / ``AutoProcessor`` in a process without mgll, and with
``load_swapped`` (and ``mgll mcq run --model``) in one with it.
"""

from __future__ import annotations

import os
from pathlib import Path

from mgll.adapters.align import ADAPTER_DIR, load_aligned
from mgll.adapters.swap import SWAP_SPEC, read_swap_spec
from mgll.io import atomic_path, atomic_write_json, check_out_free
from mgll.model_card import aligned_card, write_card

__all__ = ["export_aligned"]


def export_aligned(swap_dir: str | os.PathLike, align_dir: str | os.PathLike, out: str | os.PathLike,
                   overwrite: bool = False) -> Path:
    """Write ``out``: ``swap_dir`` + the run in ``align_dir`` (LoRA merged), loadable like a swap folder."""
    check_out_free(out, overwrite)
    spec = read_swap_spec(swap_dir)
    if spec["host"] == "medflamingo":
        raise ValueError(f"{swap_dir}: medflamingo folders use OpenFlamingo's layout, not a transformers one; "
                         "load the run with mgll.adapters.align.load_aligned")
    if not (Path(align_dir) / "summary.json").is_file():
        raise FileNotFoundError(f"{align_dir}: no summary.json; not a finished `mgll align` run")
    model, processor = load_aligned(swap_dir, align_dir)
    merged = (Path(align_dir) / ADAPTER_DIR).is_dir()
    if merged:
        model = model.merge_and_unload()  # W + BA into the LM weights: a plain model again
    out = Path(out)
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        atomic_write_json(tmp / SWAP_SPEC, {**spec, "aligned_from": str(align_dir), "lora_merged": merged})
        write_card(tmp, aligned_card(spec, swap_dir, align_dir, merged))
    return out
