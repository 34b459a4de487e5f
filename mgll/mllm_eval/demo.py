"""Offline Table-2 demonstration, run the way users run a swap: one language model, two towers.

The paper's "+ MGLL" rows swap a vision encoder into an MLLM whose language model already
exists, then align. Here, offline and on CPU:

1. **One language model, trained once on text and shared.** A tiny random-init LLaVA's LM is
   trained on the training split's *text only* (captions, and each training question with its
   answer ``"B. cataract"``), laid out as :func:`mgll.adapters.prompts.build_prompt` lays out a
   prompt, minus the image. It learns the answer format and the label priors, never an image. It
   is cached under a hash of its texts and settings (``lm_cache``), so both arms, and later runs
   on the same data, start from the very same weights.
2. **Per tower, the swap protocol.** ``mgll swap`` puts the CLIP or the MGLL tower into a copy of
   that model (same projector seed); ``mgll align`` stage 1 trains the projector alone (tower and
   LM frozen) on captions; stage 2 trains LoRA on the LM (+ projector) on captions and the
   training split's multiple-choice instructions. Same steps, batches and seed for both arms:
   :func:`mgll.adapters.align.align` is the training loop, with its chat-template prompt layout.
3. Each run is exported as a stand-alone model folder (``trained-clip``, ``trained-mgll``: projector
   in, LoRA merged, as ``mgll export-aligned`` writes it; ``mgll demo`` serves these), and both
   answer the test split's bank in ``loglik`` mode; :func:`mgll.mllm_eval.report.compare`
   gives the per-disease table and the paired Δ per question.

Only the tower differs between the arms, and the LM did not learn to read images beside one of
them from scratch, so the Δ row measures the encoders. The numbers are a signal on synthetic
data, not the paper's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mgll.data import FUNDUS_DISEASES, load_dataset
from mgll.data.question_bank import QUESTION, build_bank, format_question, write_bank
from mgll.io import atomic_path, atomic_write_json
from mgll.mllm_eval.report import compare
from mgll.mllm_eval.scoring import INSTRUCTION, option_text, run_bank
from mgll.optim import adamw

__all__ = ["run_mcq_demo", "text_pairs", "pretrain_text_lm", "CAPTION_INSTRUCTION"]

CAPTION_INSTRUCTION = "Describe the findings in this fundus photograph."  # mgll align's default instruction


def _vocabulary(ds) -> list[str]:
    from mgll.adapters.align import record_caption

    texts = [QUESTION, INSTRUCTION, CAPTION_INSTRUCTION, " ".join(FUNDUS_DISEASES), "user assistant answer : . a b c d e"]
    texts += sorted({record_caption(ds.card, r.labels) for r in ds.records})
    return texts


def text_pairs(ds, split: str = "train", k: int = 4, seed: int = 1) -> list[tuple[str, str]]:
    """(instruction, target) of the split: one caption per record, one answer per question of its bank.

    The same rows ``mgll align --mcq-k`` trains on in stage 2, without their images.
    """
    from mgll.adapters.align import record_caption

    pairs = [(CAPTION_INSTRUCTION, record_caption(ds.card, r.labels)) for r in ds.split(split)]
    bank = build_bank(ds, k=k, seed=seed, split=split)
    pairs += [(format_question(bank.question, q.options), option_text(q.answer_index, q.answer)) for q in bank.questions]
    return pairs


def _text_prompt(processor, instruction: str) -> str:
    """The inference prompt of :func:`mgll.adapters.prompts.build_prompt` without its image token."""
    from mgll.adapters.prompts import build_prompt

    image_token = getattr(processor, "image_token", None) or "<image>"
    return build_prompt("llava", processor, instruction).replace(image_token, "")


def _text_batch(processor, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    from mgll.adapters.prompts import supervised_rows

    tok = processor.tokenizer
    heads = [tok(_text_prompt(processor, instruction), add_special_tokens=False)["input_ids"] for instruction, _ in pairs]
    tails = [tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for _, target in pairs]
    return supervised_rows(heads, tails, tok.pad_token_id)


def pretrain_text_lm(
    base: str | os.PathLike, pairs: list[tuple[str, str]], out: str | os.PathLike, steps: int,
    batch_size: int = 16, lr: float = 2e-3, seed: int = 0, progress: bool = True,
) -> Path:
    """Train the LM of the LLaVA folder ``base`` on text pairs (tower and projector untouched); save to ``out``.

    The stand-in for a released LM: it is trained once, before any tower is swapped in.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mgll.adapters.hosts import get_host

    host = get_host("llava")
    model = LlavaForConditionalGeneration.from_pretrained(str(base))
    processor = AutoProcessor.from_pretrained(str(base))
    model.requires_grad_(True)
    host.tower(model).requires_grad_(False)
    host.projector(model).requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    order: list[int] = []
    epoch, losses = 0, []
    model.train()
    for _ in tqdm(range(steps), disable=not progress, desc="text LM"):
        while len(order) < batch_size:
            order += torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
            epoch += 1
        idx, order = order[:batch_size], order[batch_size:]
        loss = model(**_text_batch(processor, [pairs[i] for i in idx])).loss
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"text LM step {len(losses)}: loss is {loss.item()}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.item()))
    model.eval()
    n = max(1, min(10, len(losses) // 4))
    out = Path(out)
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        atomic_write_json(tmp / "text_lm.json", {
            "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "pairs": len(pairs),
            "trained": "LM only, on text (no image)", "loss_first": sum(losses[:n]) / n, "loss_last": sum(losses[-n:]) / n,
        })
    return out


def _lm_key(pairs, steps, batch_size, lr, seed) -> str:
    h = hashlib.sha256(json.dumps([pairs, steps, batch_size, lr, seed, "tiny-llava-v1"]).encode())
    return h.hexdigest()[:16]


def shared_text_lm(ds, cache: str | os.PathLike, steps: int, batch_size: int = 16, lr: float = 2e-3, k: int = 4,
                   seed: int = 0, progress: bool = True) -> tuple[Path, bool]:
    """The cached text-trained LLaVA for this dataset's training text and settings; (folder, reused)."""
    from mgll.testing.tiny import make_tiny_llava

    pairs, vocabulary = text_pairs(ds, "train", k=k, seed=seed + 1), _vocabulary(ds)
    key = _lm_key([*pairs, *vocabulary], steps, batch_size, lr, seed)
    folder = Path(cache) / key
    if (folder / "text_lm.json").is_file():
        return folder, True
    base = Path(cache) / f"{key}-random-init"
    if not (base / "config.json").is_file():
        make_tiny_llava(base, vocabulary, seed=seed)
    pretrain_text_lm(base, pairs, folder, steps, batch_size, lr, seed, progress)
    return folder, False


def run_mcq_demo(
    out: str | os.PathLike,
    data: str | os.PathLike,
    clip_encoder: str | os.PathLike,
    mgll_encoder: str | os.PathLike,
    lm_steps: int = 800,
    stage1_steps: int = 200,
    stage2_steps: int = 400,
    batch_size: int = 8,
    lr: float = 3e-3,
    k: int = 4,
    split: str = "test",
    max_per_disease: int | None = 40,
    label: str = "tiny LLaVA",
    seed: int = 0,
    lm_cache: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``out/comparison/{comparison.md,.json,.png}`` (+ bank, swaps, alignment runs, MCQ runs); return the summary.

    Finished stages are reused, so a rerun after an interruption continues; the text LM is reused
    from ``lm_cache`` (default ``out/text-lm``) whenever its texts and settings match.

    Budget (measured on 2 shared CPU cores, 420 training images, 381 test questions): the text LM
    ~40 s once, each tower ~50 s (align 200 + 400 steps, export, scoring). ``lr`` 3e-3 for both
    stages: at 1e-3 the tiny LM still answered mostly from its text priors after 600 steps (33 %
    average accuracy with two CLIP towers, against 44 % at 3e-3).
    """
    from mgll.adapters.align import AlignConfig, align
    from mgll.adapters.export_aligned import export_aligned
    from mgll.adapters.swap import SWAP_SPEC, load_swapped, swap

    out = Path(out)
    ds = load_dataset(data)
    bank = build_bank(ds, k=k, seed=seed, split=split, max_per_disease=max_per_disease)
    write_bank(bank, out / "bank.jsonl")
    t0 = time.perf_counter()
    lm, reused = shared_text_lm(ds, lm_cache or out / "text-lm", lm_steps, seed=seed, k=k, progress=progress)
    timing = {"text_lm_s": round(time.perf_counter() - t0, 1), "text_lm_reused": reused}
    results, training = [], {}
    for name, encoder, row in (("clip", clip_encoder, label), ("mgll", mgll_encoder, f"{label} + MGLL")):
        t0 = time.perf_counter()
        swapped = out / f"swap-{name}"
        if not (swapped / SWAP_SPEC).is_file():
            swap("llava", lm, encoder, swapped, seed=seed, overwrite=True)
        common = dict(model=str(swapped), data=str(data), split="train", batch_size=batch_size, lr=lr, seed=seed,
                      instruction=CAPTION_INSTRUCTION)
        s1, s2 = out / f"align-{name}-stage1", out / f"align-{name}-stage2"
        if not (s1 / "summary.json").is_file():
            align(AlignConfig(out=str(s1), stage=1, steps=stage1_steps, **common), resume=s1.exists(), progress=progress)
        if not (s2 / "summary.json").is_file():
            align(AlignConfig(out=str(s2), stage=2, steps=stage2_steps, projector=str(s1 / "projector.safetensors"),
                              mcq_k=k, mcq_seed=seed + 1, **common), resume=s2.exists(), progress=progress)
        trained = out / f"trained-{name}"  # the stand-alone folder `mgll export-aligned` writes (LoRA merged)
        if not (trained / SWAP_SPEC).is_file():
            export_aligned(swapped, s2, trained, overwrite=True)
        model, processor = load_swapped(trained)
        results.append(run_bank(bank, "llava", model.eval(), processor, out / f"mcq-{name}",
                                spec={"model": str(trained), "alignment": str(s2)}, label=row, progress=progress))
        summaries = {stage: json.loads((d / "summary.json").read_text()) for stage, d in (("stage1", s1), ("stage2", s2))}
        training[name] = {st: {k2: v[k2] for k2 in ("steps", "pairs", "mcq_pairs", "loss_first", "loss_last") if k2 in v}
                          for st, v in summaries.items()}
        timing[f"{name}_s"] = round(time.perf_counter() - t0, 1)
    summary = compare(results, out / "comparison")
    summary["training"] = {"text_lm": json.loads((lm / "text_lm.json").read_text()), "text_lm_folder": str(lm), **training}
    summary["bank_counts"] = bank.counts()
    summary["timing"] = timing
    return summary
