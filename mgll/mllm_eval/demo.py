"""Offline Table-2 demonstration: one tiny LLaVA, a CLIP-trained and an MGLL-trained tower, same training budget.

Both copies start from the same random-init LLaVA (tiny Llama LM, word tokenizer built from the
dataset's own texts) and get their tower swapped in with the same projector seed. Each is then
trained with the same steps, batches and seed on the training split, tower frozen: captions
(``record_caption``) mixed with MCQ-style instructions (the training split's own question bank,
answered ``"B. cataract"`` in the exact prompt format scoring uses). The LM is random-init, so
it trains with the projector; only the frozen tower differs between the two copies, so the
delta row is the encoder's contribution, as in the paper's "+ MGLL" rows. Both then answer the
test split's bank in ``loglik`` mode. Meant for ``mgll quickstart``'s last stage; the numbers
are a smoke signal on synthetic data, not the paper's.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from mgll.data import FUNDUS_DISEASES, load_dataset
from mgll.data.pixel_budget import load_rgb
from mgll.io import atomic_path, atomic_write_json
from mgll.mllm_eval.question_bank import QUESTION, build_bank, write_bank
from mgll.mllm_eval.report import compare
from mgll.mllm_eval.scoring import INSTRUCTION, build_prompt, format_question, option_text, run_bank
from mgll.optim import adamw

__all__ = ["run_mcq_demo", "instruction_pairs", "train_pairs"]

CAPTION_PROMPT = "describe the fundus image."


def _vocabulary(ds) -> list[str]:
    from mgll.adapters.align import record_caption

    texts = [QUESTION, INSTRUCTION, CAPTION_PROMPT, " ".join(FUNDUS_DISEASES), "user assistant answer : . a b c d e"]
    texts += sorted({record_caption(ds.card, r.labels) for r in ds.records})
    return texts


def instruction_pairs(ds, processor, split: str = "train", k: int = 4, seed: int = 0) -> list[tuple[Path, str, str]]:
    """(image, prompt, target): one caption pair per record and one MCQ pair per question of the split's bank."""
    from mgll.adapters.align import record_caption

    recs = ds.split(split)
    pairs = [(Path(ds.image_path(r)), build_prompt("llava", processor, CAPTION_PROMPT), record_caption(ds.card, r.labels))
             for r in recs]
    bank = build_bank(ds, k=k, seed=seed + 1, split=split)  # another seed than the test bank: other distractors
    for q in bank.questions:
        prompt = build_prompt("llava", processor, format_question(bank.question, q.options))
        pairs.append((bank.image_path(q), prompt, option_text(q.answer_index, q.answer)))
    return pairs


def _batch(model, processor, images, prompts, targets) -> dict[str, torch.Tensor]:
    """Prompt ids exactly as scoring encodes them, then target + eos; loss on the target only."""
    tok = processor.tokenizer
    rows, labels, pixels = [], [], []
    for image, prompt, target in zip(images, prompts, targets):
        enc = processor(text=[prompt], images=[image], return_tensors="pt")
        head = enc["input_ids"][0].tolist()
        tail = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(head + tail)
        labels.append([-100] * len(head) + tail)
        pixels.append(enc["pixel_values"])
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, la) in enumerate(zip(rows, labels)):
        ids[i, : len(r)], lab[i, : len(la)], mask[i, : len(r)] = torch.tensor(r), torch.tensor(la), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab, "pixel_values": torch.cat(pixels)}


def train_pairs(model, processor, pairs, steps: int, batch_size: int = 8, lr: float = 1e-3, seed: int = 0,
                progress: bool = True) -> list[float]:
    """Train everything but the tower on (image, prompt, target) pairs; seeded epoch permutations."""
    from mgll.adapters.hosts import get_host

    host = get_host("llava")
    model.requires_grad_(True)
    host.tower(model).requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    images: dict[Path, Image.Image] = {}
    order: list[int] = []
    epoch, losses = 0, []
    model.train()
    host.tower(model).eval()
    for _ in tqdm(range(steps), disable=not progress, desc="mcq demo training"):
        while len(order) < batch_size:
            order += torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
            epoch += 1
        idx, order = order[:batch_size], order[batch_size:]
        for i in idx:
            if pairs[i][0] not in images:
                images[pairs[i][0]] = load_rgb(pairs[i][0])
        batch = _batch(model, processor, [images[pairs[i][0]] for i in idx], [pairs[i][1] for i in idx],
                       [pairs[i][2] for i in idx])
        loss = model(**batch).loss
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"step {len(losses)}: loss is {loss.item()}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.item()))
    model.eval()
    return losses


def run_mcq_demo(
    out: str | os.PathLike,
    data: str | os.PathLike,
    clip_encoder: str | os.PathLike,
    mgll_encoder: str | os.PathLike,
    steps: int = 1500,
    batch_size: int = 8,
    lr: float = 1e-3,
    k: int = 4,
    split: str = "test",
    label: str = "tiny LLaVA",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``out/comparison/{comparison.md,.json,.png}`` (+ bank, swaps, trained models, MCQ runs); return the summary.

    Finished stages are reused, so a rerun after an interruption continues. 1500 steps: about
    a minute per tower on 2 CPU cores with the quickstart's 600 images; at 300 steps the tiny LM
    still answers from its priors (the image has not taken hold yet).
    """
    from mgll.adapters.swap import SWAP_SPEC, load_swapped, swap
    from mgll.testing.tiny import make_tiny_llava

    out = Path(out)
    ds = load_dataset(data)
    bank = build_bank(ds, k=k, seed=seed, split=split)
    write_bank(bank, out / "bank.jsonl")
    base = out / "llava-random-init"
    if not (base / "config.json").is_file():
        make_tiny_llava(base, _vocabulary(ds), seed=seed)
    results = []
    for name, encoder, row in (("clip", clip_encoder, label), ("mgll", mgll_encoder, f"{label} + MGLL")):
        swapped = out / f"swap-{name}"
        if not (swapped / SWAP_SPEC).is_file():
            swap("llava", base, encoder, swapped, seed=seed)
        trained = out / f"trained-{name}"
        if not (trained / "training.json").is_file():
            model, processor = load_swapped(swapped)
            torch.manual_seed(seed)
            pairs = instruction_pairs(ds, processor, "train", k=k, seed=seed)
            losses = train_pairs(model, processor, pairs, steps, batch_size, lr, seed, progress)
            with atomic_path(trained) as tmp:
                model.save_pretrained(tmp)
                processor.save_pretrained(tmp)
                shutil.copyfile(swapped / SWAP_SPEC, tmp / SWAP_SPEC)
                n = max(1, min(10, len(losses) // 4))
                atomic_write_json(tmp / "training.json", {
                    "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "pairs": len(pairs),
                    "trainable": "projector + LM (tower frozen)", "encoder": str(encoder),
                    "loss_first": sum(losses[:n]) / n, "loss_last": sum(losses[-n:]) / n,
                })
        model, processor = load_swapped(trained)
        results.append(run_bank(bank, "llava", model.eval(), processor, out / f"mcq-{name}",
                                spec={"model": str(trained)}, label=row, progress=progress))
    summary = compare(results, out / "comparison")
    summary["training"] = {name: json.loads((out / f"trained-{name}" / "training.json").read_text()) for name in ("clip", "mgll")}
    return summary
