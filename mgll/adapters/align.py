"""Projector alignment (stage 1) and LoRA / QLoRA tuning (stage 2) of a swapped MLLM on caption pairs.

A freshly swapped tower speaks a language the LM has never seen; stage 1 (LLaVA's "feature
alignment") trains only the projector to map MGLL patch features into the LM's embedding space,
on captions written from the dataset's label levels. Stage 2 adds LoRA adapters on the LM only,
optionally over a 4-bit (nf4) LM (QLoRA) with the tower and projector kept in float.

Checkpoints keep the projector (safetensors) and the LoRA adapter (peft folder) apart, so either
can be attached to the swapped model alone; every checkpoint folder is written atomically and
a resumed run sees exactly the batches the interrupted one would have.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from mgll.adapters.hosts import ShapeMismatch, get_host
from mgll.adapters.swap import load_processor, load_projector, read_swap_spec, save_projector
from mgll.data.pixel_budget import load_rgb
from mgll.encoder.checkpoint import (
    CheckpointCorrupt,
    load_newest_intact,
    read_or_corrupt,
    resume_candidates,
    write_manifest,
)
from mgll.encoder.finite import FiniteGuard, NonFiniteError, all_ranks_agree, finite_or_none
from mgll.io import atomic_path, atomic_write_json, atomic_write_text
from mgll.model_card import align_card, write_card
from mgll.optim import adamw

__all__ = ["AlignConfig", "align", "record_caption", "CaptionPairs", "load_aligned", "latest_align_checkpoint"]

PROJECTOR_FILE = "projector.safetensors"
ADAPTER_DIR = "adapter"
STATE_FILE = "trainer_state.pt"


@dataclass
class AlignConfig:
    model: str  # a folder written by `mgll swap`
    data: str  # a records dataset
    out: str
    stage: int = 1
    split: str | None = "train"
    levels: list[str] | None = None  # caption levels, all by default
    # the user turn of each example, wrapped in the folder's chat template exactly as inference wraps a question
    instruction: str = "Describe the findings in this fundus photograph."
    chat_template: str | None = None  # a Jinja file replacing the folder's chat template (saved with the run, used on load)
    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    qlora: bool = False
    train_tower: bool = False
    # > 0: also one multiple-choice instruction per question of the split's ten-disease bank (k options),
    # asked exactly as `mgll mcq` asks it and answered "B. cataract" (LLaVA's stage-2 instruction data)
    mcq_k: int = 0
    mcq_seed: int = 1  # the bank's seed: not the test bank's 0, so the distractors differ
    projector: str | None = None  # stage-1 projector.safetensors to start from
    deepspeed: str | None = None  # DeepSpeed JSON (configs/deepspeed/zero3.json); "auto" values come from here
    precision: str = "fp32"
    num_workers: int = 0
    seed: int = 0
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    max_nonfinite_steps: int = 3  # a NaN/inf loss or gradient skips the step; this many in a row stop the run
    extra: dict[str, Any] = field(default_factory=dict)


CHAT_TEMPLATE_FILE = "chat_template.jinja"


def read_chat_template(path: str | os.PathLike) -> str:
    """A Jinja chat template file (``--chat-template``); it must place the image and the text of a user turn."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--chat-template {p}: no such file")
    text = p.read_text(encoding="utf-8")
    if "message" not in text or "content" not in text:
        raise ValueError(f"--chat-template {p}: not a chat template (no loop over messages and their content)")
    return text


def record_caption(card, labels: dict[str, tuple[str, ...]], levels: list[str] | None = None) -> str:
    """``"status: abnormal. disease: drusen, cataract."``: one clause per level, coarse to fine."""
    names = list(levels) if levels else list(card.level_names)
    unknown = [n for n in names if n not in card.level_names]
    if unknown:
        raise ValueError(f"caption levels {unknown} not in the dataset card (levels: {', '.join(card.level_names)})")
    parts = [f"{n}: {', '.join(labels[n])}." for n in names if labels.get(n)]
    return " ".join(parts)


class CaptionPairs(Dataset):
    """(PIL image, instruction, target) per record's caption, plus per MCQ question with ``mcq_k``.

    Captions take ``instruction``; multiple-choice rows take the bank's own question text (options
    and answer instruction included) and answer with the option text, so stage 2 trains on the
    exact prompts ``mgll mcq`` scores. Unreadable images are skipped and listed in ``skipped``.
    """

    def __init__(self, ds, split: str | None, levels: list[str] | None, instruction: str = "",
                 mcq_k: int = 0, mcq_seed: int = 1):
        recs = ds.records if split is None else ds.split(split)
        self.items: list[tuple[Path, str, str]] = []
        self.skipped: list[str] = []
        for rec in recs:
            path = Path(ds.image_path(rec))
            caption = record_caption(ds.card, rec.labels, levels)
            if not path.is_file():
                self.skipped.append(f"{rec.image} (line {rec.line}): image file missing")
            elif not caption:
                self.skipped.append(f"{rec.image} (line {rec.line}): no labels at the caption levels")
            else:
                self.items.append((path, instruction, caption))
        self.n_mcq = 0
        if mcq_k and self.items:
            from mgll.data.question_bank import build_bank, format_question, option_text

            bank = build_bank(ds, k=mcq_k, seed=mcq_seed, split=split)
            for q in bank.questions:
                path = bank.image_path(q)
                if path.is_file():
                    self.items.append((path, format_question(bank.question, q.options), option_text(q.answer_index, q.answer)))
                    self.n_mcq += 1
        if not self.items:
            raise ValueError(f"{ds.root}: no usable records in split {split!r} ({len(self.skipped)} skipped)")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, instruction, target = self.items[i]
        return load_rgb(path), instruction, target


class StepSampler(Sampler[int]):
    """Indices for steps ``start..steps``: epoch ``e`` is a fixed permutation seeded by ``seed + e``.

    The order depends only on (seed, step), so a resumed run draws the same batches.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, steps: int):
        self.n, self.bs, self.seed, self.start, self.steps = n, batch_size, seed, start, steps

    def __len__(self) -> int:
        return max(0, self.steps - self.start) * self.bs

    def __iter__(self):
        perms: dict[int, list[int]] = {}
        for pos in range(self.start * self.bs, self.steps * self.bs):
            e, k = divmod(pos, self.n)
            if e not in perms:
                perms = {e: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + e)).tolist()}
            yield perms[e][k]


def _collate(batch):
    return [b[0] for b in batch], [b[1] for b in batch], [b[2] for b in batch]


def latest_align_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest checkpoint folder whose manifest verifies (see ``mgll.encoder.checkpoint``)."""
    for path, problem in resume_candidates(Path(out, "checkpoints"), required=(STATE_FILE,)):
        if problem is None:
            return path
    return None


def _assert_trainable_finite(model) -> None:
    """Refuse to checkpoint NaN/inf trained weights; under ZeRO each rank checks its partition, all agree."""
    local = {n: getattr(p, "ds_tensor", p).detach() for n, p in model.named_parameters() if p.requires_grad}
    bad = next((n for n, t in local.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    device = next(iter(local.values())).device if local else torch.device("cpu")
    if not all_ranks_agree(bad is None, device):
        raise NonFiniteError(f"trained parameter {bad or '(on another process)'!r} holds NaN or inf; refusing to write a checkpoint")


def _load_model(cfg: AlignConfig, host, device):
    kw: dict[str, Any] = {}
    if cfg.qlora:
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=host.unquantised_modules(),
        )
        kw["device_map"] = {"": device}
    model = host.model_class().from_pretrained(cfg.model, **kw)
    host.check_fit(model)
    return model


def _wrap_lora(cfg: AlignConfig, host, model):
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=host.lora_target_modules(),
        bias="none",
    )
    return get_peft_model(model, lcfg)


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _save_checkpoint(path: Path, cfg: AlignConfig, host, model, optimizer, scheduler, step: int, losses: list[float]) -> None:
    with atomic_path(path) as tmp:
        tmp.mkdir(parents=True)
        _write_weights(tmp, cfg, host, model)
        _write_state(tmp, cfg, step, losses, scheduler, optimizer)
        write_manifest(tmp)


def _write_weights(folder: Path, cfg: AlignConfig, host, model) -> None:
    """The trained parts as their own files: projector (safetensors), LoRA adapter (peft), tower."""
    save_projector(_base(model), cfg_host(cfg), folder / PROJECTOR_FILE)
    if cfg.stage == 2:
        model.save_pretrained(folder / ADAPTER_DIR)
    if cfg.train_tower:
        from safetensors.torch import save_file

        tower = host.tower(_base(model))
        save_file({k: v.detach().cpu().contiguous() for k, v in tower.state_dict().items()}, str(folder / "tower.safetensors"))


def _write_state(folder: Path, cfg: AlignConfig, step: int, losses: list[float], scheduler, optimizer=None) -> None:
    """Step, schedule, losses and RNG; the optimizer too unless DeepSpeed holds it (in ``zero/``)."""
    state = {"step": step, "scheduler": scheduler.state_dict(), "losses": losses, "torch_rng": torch.get_rng_state()}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    torch.save(state, folder / STATE_FILE)
    atomic_write_json(folder / "state.json", {"step": step, "stage": cfg.stage, "last_loss": losses[-1] if losses else None})


def _save_zero_checkpoint(path: Path, cfg: AlignConfig, host, engine, scheduler, step: int, losses: list[float]) -> None:
    """Collective: DeepSpeed's own checkpoint of the trained parameters (``zero/``, for resuming)
    plus the projector / adapter consolidated from the ZeRO partitions, in one folder renamed into
    place by rank 0 once every rank has written its part."""
    import torch.distributed as dist

    from mgll.encoder.zero import ZERO_TAG, gathered

    main = dist.get_rank() == 0
    tmp = path.with_name(f".{path.name}.tmp")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag=ZERO_TAG, save_latest=False, exclude_frozen_parameters=True)
    torch.save(torch.get_rng_state(), tmp / f"rng_rank{dist.get_rank()}.pt")  # LoRA dropout draws differ per rank
    with gathered([p for p in engine.module.parameters() if p.requires_grad]):
        if main:
            _write_weights(tmp, cfg, host, engine.module)
    dist.barrier()  # every rank's files are written before rank 0 hashes the folder
    if main:
        _write_state(tmp, cfg, step, losses, scheduler)
        write_manifest(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    dist.barrier()


def cfg_host(cfg: AlignConfig) -> str:
    return read_swap_spec(cfg.model)["host"]


def _read_state(path: Path) -> dict[str, Any]:
    file = path / STATE_FILE
    return read_or_corrupt(file, lambda: torch.load(file, map_location="cpu", weights_only=True))


def _restore(path: Path, cfg: AlignConfig, host, model, optimizer, scheduler) -> tuple[int, list[float], torch.Tensor]:
    state = _read_state(path)
    if "optimizer" not in state:
        raise ValueError(f"{path}: written under DeepSpeed (optimizer state in zero/); resume with the same deepspeed config")
    read_or_corrupt(path / PROJECTOR_FILE, lambda: load_projector(_base(model), cfg_host(cfg), path / PROJECTOR_FILE))
    if cfg.stage == 2:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        adapter = path / ADAPTER_DIR / "adapter_model.safetensors"
        if not adapter.is_file():
            raise FileNotFoundError(f"{adapter}: missing; cannot resume stage 2 from {path}")
        set_peft_model_state_dict(model, read_or_corrupt(adapter, lambda: load_file(str(adapter))))
    if cfg.train_tower and (path / "tower.safetensors").is_file():
        from safetensors.torch import load_file

        tower = path / "tower.safetensors"
        host.tower(_base(model)).load_state_dict(read_or_corrupt(tower, lambda: load_file(str(tower))))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"]), list(state["losses"]), state["torch_rng"]


def _restore_zero(path: Path, engine, scheduler) -> tuple[int, list[float], torch.Tensor]:
    """Resume a DeepSpeed engine (after ``prepare``) from its ``zero/`` checkpoint."""
    import torch.distributed as dist

    from mgll.encoder.zero import ZERO_TAG

    if not (path / ZERO_TAG).is_dir():
        raise ValueError(f"{path}: not a DeepSpeed checkpoint (no {ZERO_TAG}/); resume it without deepspeed")
    loaded, _ = engine.load_checkpoint(str(path), tag=ZERO_TAG, load_module_strict=False, load_lr_scheduler_states=False)
    if loaded is None:
        raise CheckpointCorrupt(f"{path / ZERO_TAG}: DeepSpeed could not load this checkpoint")
    state = _read_state(path)
    scheduler.load_state_dict(state["scheduler"])
    own = path / f"rng_rank{dist.get_rank()}.pt"  # LoRA dropout: each rank's own stream
    rng = torch.load(own, weights_only=True) if own.is_file() else state["torch_rng"]
    return int(state["step"]), list(state["losses"]), rng


class _RankSlices(Sampler[list[int]]):
    """This rank's contiguous slice of each global batch drawn by ``StepSampler``."""

    def __init__(self, steps: StepSampler, rank: int, world: int):
        if steps.bs % world:
            raise ValueError(f"batch_size={steps.bs} is not divisible by {world} processes")
        self.steps, self.rank, self.local = steps, rank, steps.bs // world

    def __len__(self) -> int:
        return len(self.steps) // self.steps.bs

    def __iter__(self):
        batch: list[int] = []
        for i in self.steps:
            batch.append(i)
            if len(batch) == self.steps.bs:
                yield batch[self.rank * self.local : (self.rank + 1) * self.local]
                batch = []


def align(
    cfg: AlignConfig,
    resume: bool = False,
    progress: bool = True,
    after_training: Callable[[Any, dict[str, torch.Tensor]], None] | None = None,
) -> Path:
    """Run stage ``cfg.stage`` and write ``out/projector.safetensors`` (+ ``out/adapter/`` in stage 2).

    Each process takes its slice of every global batch of ``batch_size``. ``deepspeed`` (a
    DeepSpeed JSON, or ``accelerate launch`` with one) trains under ZeRO; with ZeRO-3 the LM is
    loaded already partitioned. ``after_training(model, batch)``, if given, is called on every
    rank with the model as trained (a DeepSpeed engine under ZeRO) and the last batch, before
    the engine is released: tests and benchmarks read the in-memory model through it.
    """
    import torch.distributed as dist
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    from mgll.data import load_dataset
    from mgll.encoder.trainer import make_accelerator
    from mgll.encoder.zero import cast_unpartitioned_, fill_auto, gathered, model_width, zero_stage

    if cfg.stage not in (1, 2):
        raise ValueError(f"stage={cfg.stage}: expected 1 (projector) or 2 (projector + LoRA)")
    if cfg.qlora and cfg.stage != 2:
        raise ValueError("qlora=True needs stage=2 (a 4-bit LM is only tuned through LoRA)")
    out = Path(cfg.out)
    if not resume and (out / "summary.json").exists():
        raise FileExistsError(f"{out}: already holds a finished alignment run; use resume or another --out")
    spec = read_swap_spec(cfg.model)
    host = get_host(spec["host"])
    accelerator = make_accelerator(cfg.precision, cfg.deepspeed)
    zero = zero_stage(accelerator)
    if zero is not None and cfg.qlora:
        raise ValueError("qlora=True with deepspeed: a 4-bit bitsandbytes LM cannot be partitioned; use LoRA (stage 2) under ZeRO")
    rank, world = accelerator.process_index, accelerator.num_processes
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by {world} processes")
    set_seed(cfg.seed)

    ds = load_dataset(cfg.data)
    pairs = CaptionPairs(ds, cfg.split, cfg.levels, cfg.instruction, cfg.mcq_k, cfg.mcq_seed)
    processor = load_processor(cfg.model)
    if cfg.chat_template:
        processor.chat_template = read_chat_template(cfg.chat_template)
    model = _load_model(cfg, host, accelerator.device)  # under ZeRO-3: loaded partitioned (zero.Init)
    if cfg.projector:
        with gathered(host.projector(model).parameters(), modifier_rank=0):
            load_projector(model, spec["host"], cfg.projector)
    host.set_trainable(model, 1, cfg.train_tower)
    if cfg.stage == 2:
        model = _wrap_lora(cfg, host, model)
        for path in host.trainable_paths(2, cfg.train_tower):  # peft froze everything but LoRA
            mod = host.tower(_base(model)) if path == host.tower_path else host.projector(_base(model))
            mod.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, max(cfg.steps, 1))
    start, losses, rng, ckpt, notes = 0, [], None, None, []

    def restore(path: Path) -> int:
        nonlocal losses, rng
        restored = _restore(path, cfg, host, model, optimizer, scheduler) if zero is None else _restore_zero(path, model, scheduler)
        step, losses, rng = restored
        return step

    if resume and zero is None:
        ckpt, start, notes = load_newest_intact(out, restore, required=(STATE_FILE,))
    if zero is not None:
        fill_auto(accelerator, micro_batch=cfg.batch_size // world, grad_clip=cfg.grad_clip, width=model_width(_base(model)))
        if zero == 3:  # LoRA's fp32 matrices beside the bf16/fp16 partitions would stop stage 3's optimizer
            cast_unpartitioned_(model, accelerator.mixed_precision)
    model, optimizer = accelerator.prepare(model, optimizer)
    if resume and zero is not None:
        ckpt, start, notes = load_newest_intact(out, restore, required=(STATE_FILE,))
    if accelerator.is_main_process:
        for note in notes:
            print(f"--resume: passed over checkpoint {note}")
    base = _base(accelerator.unwrap_model(model))

    loader = DataLoader(
        pairs,
        batch_sampler=_RankSlices(StepSampler(len(pairs), cfg.batch_size, cfg.seed, start, cfg.steps), rank, world),
        num_workers=cfg.num_workers,
        collate_fn=_collate,
    )
    model.train()
    if not cfg.train_tower:
        host.tower(base).eval()
    metrics_path = out / "metrics.jsonl"
    metrics = metrics_path.read_text(encoding="utf-8").splitlines() if (ckpt is not None and metrics_path.is_file()) else []
    metrics = [m for m in metrics if m and json.loads(m)["step"] <= start]
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress or not accelerator.is_main_process, desc=f"align stage {cfg.stage}")
    step = start
    guard = FiniteGuard(cfg.max_nonfinite_steps, what="mgll align")
    batch: dict[str, torch.Tensor] = {}
    batches = iter(loader)
    if rng is not None:  # after iter(): creating the iterator draws from the global generator
        torch.set_rng_state(rng)
    for images, instructions, targets in batches:
        batch = host.build_batch(base, processor, images, instructions, targets)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(host.tower(base).dtype)
        with accelerator.autocast():
            loss = model(**batch).loss
        bad = FiniteGuard.bad_terms({"loss": float(loss.detach())})
        ok = all_ranks_agree(not bad, accelerator.device)  # each rank's own slice: agree before any collective
        if ok:
            accelerator.backward(loss)  # under DeepSpeed this also clips and steps the optimizer
            if zero is None:
                norm = accelerator.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip else float("inf"))
                bad = [] if accelerator.mixed_precision == "fp16" else FiniteGuard.bad_terms({}, float(norm))
                ok = all_ranks_agree(not bad, accelerator.device)
            if ok or zero is not None:  # DeepSpeed has stepped already; the checkpoint refuses non-finite weights
                optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        global_loss = accelerator.reduce(loss.detach(), reduction="mean") if world > 1 and ok else loss.detach()
        losses.append(float(global_loss))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if accelerator.is_main_process and (step % max(cfg.log_every, 1) == 0 or step == cfg.steps or not ok):
            row = {"step": step, "loss": finite_or_none(losses[-1]), "lr": scheduler.get_last_lr()[0]}
            if not ok:
                row["skipped"] = bad or ["non-finite on another process"]
            metrics.append(json.dumps(row))
            atomic_write_text(metrics_path, "\n".join(metrics) + "\n")
        guard.step_ok(step, bad, ok)  # raises after max_nonfinite_steps in a row
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            _checkpoint(out / "checkpoints" / f"step-{step:07d}", cfg, host, model, accelerator, zero, optimizer, scheduler, step, losses)
    bar.close()
    final = out / "checkpoints" / f"step-{step:07d}"
    _checkpoint(final, cfg, host, model, accelerator, zero, optimizer, scheduler, step, losses)
    if accelerator.is_main_process:
        _finish(out, cfg, spec, final, step, losses, pairs, ds)
    if after_training is not None:
        after_training(model, batch)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return out


def _checkpoint(path, cfg, host, model, accelerator, zero, optimizer, scheduler, step, losses) -> None:
    """Every rank calls this; without DeepSpeed only rank 0 writes."""
    _assert_trainable_finite(model)
    if zero is not None:
        _save_zero_checkpoint(path, cfg, host, model, scheduler, step, losses)
    elif accelerator.is_main_process:
        _save_checkpoint(path, cfg, host, accelerator.unwrap_model(model), optimizer, scheduler, step, losses)
    if accelerator.is_main_process:
        _prune(path.parent.parent, cfg.keep_checkpoints)


def _prune(out: Path, keep: int) -> None:
    ckpts = sorted(Path(out, "checkpoints").glob("step-*"))
    for old in ckpts[: max(0, len(ckpts) - max(keep, 1))]:
        shutil.rmtree(old, ignore_errors=True)


def _finish(out: Path, cfg, spec, ckpt: Path, step, losses, pairs, ds) -> None:
    """The final outputs are copies of the last checkpoint's weights (consolidated there under ZeRO), then the card."""
    with atomic_path(out / PROJECTOR_FILE) as tmp:
        shutil.copyfile(ckpt / PROJECTOR_FILE, tmp)
    if cfg.stage == 2:
        with atomic_path(out / ADAPTER_DIR) as tmp:
            shutil.copytree(ckpt / ADAPTER_DIR, tmp)
    if cfg.train_tower:
        with atomic_path(out / "tower.safetensors") as tmp:
            shutil.copyfile(ckpt / "tower.safetensors", tmp)
    if cfg.chat_template:  # inference must wrap questions the way training wrapped instructions
        atomic_write_text(out / CHAT_TEMPLATE_FILE, read_chat_template(cfg.chat_template))
    k = max(1, min(5, len(losses) // 4 or 1))
    summary = {
        "stage": cfg.stage,
        "qlora": cfg.qlora,
        "host": spec["host"],
        "steps": step,
        "pairs": len(pairs),
        "mcq_pairs": pairs.n_mcq,
        "skipped": pairs.skipped,
        "loss_first": sum(losses[:k]) / k if losses else None,
        "loss_last": sum(losses[-k:]) / k if losses else None,
        "config": asdict(cfg),
    }
    atomic_write_json(out / "summary.json", summary)
    rows = [
        "| stage | LM | steps | pairs | skipped | loss (first) | loss (last) |",
        "|---|---|---|---|---|---|---|",
        f"| {cfg.stage} | {'4-bit nf4 + LoRA' if cfg.qlora else ('LoRA' if cfg.stage == 2 else 'frozen')} | {step} | "
        f"{len(pairs)} | {len(pairs.skipped)} | {summary['loss_first']:.4f} | {summary['loss_last']:.4f} |",
    ]
    atomic_write_text(out / "summary.md", "\n".join(rows) + "\n")
    data = {"name": ds.card.name, "description": ds.card.description, "path": str(cfg.data), "splits": ds.splits(),
            "split_used": cfg.split or "all", "levels": [{"name": lv.name, "template": lv.template} for lv in ds.card.levels
                                                          if not cfg.levels or lv.name in cfg.levels]}
    write_card(out, align_card(cfg, summary, data))


def load_aligned(swap_dir: str | os.PathLike, align_dir: str | os.PathLike, **from_pretrained_kwargs: Any):
    """The swapped model with an alignment run's projector (and LoRA adapter, if stage 2) attached."""
    from mgll.adapters.swap import load_swapped

    spec = read_swap_spec(swap_dir)
    summary_path = Path(align_dir) / "summary.json"
    if summary_path.is_file():  # refuse another host's run before loading anything
        with open(summary_path, encoding="utf-8") as f:
            ran_on = json.load(f).get("host")
        if ran_on and ran_on != spec["host"]:
            raise ShapeMismatch(f"host mismatch: {align_dir} aligned a {ran_on!r} model but {swap_dir} is host {spec['host']!r}")
    model, processor = load_swapped(swap_dir, **from_pretrained_kwargs)
    load_projector(model, spec["host"], Path(align_dir) / PROJECTOR_FILE)
    tower = Path(align_dir) / "tower.safetensors"
    if tower.is_file():  # written by --train-tower runs
        from safetensors.torch import load_file

        get_host(spec["host"]).tower(model).load_state_dict(load_file(str(tower)))
    template = Path(align_dir) / CHAT_TEMPLATE_FILE
    if processor is not None and template.is_file():  # the run trained with its own template: ask with it too
        processor.chat_template = template.read_text(encoding="utf-8")
    adapter = Path(align_dir) / ADAPTER_DIR
    if adapter.is_dir():
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(adapter))
        except RuntimeError as e:  # peft's raw state-dict error: name the folder and the first mismatch
            first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
            raise ShapeMismatch(f"{adapter}: LoRA adapter does not fit this model ({first})") from None
    return model, processor
