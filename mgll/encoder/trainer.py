"""``mgll train``: contrastive training of an open_clip encoder with accelerate.

Built on ``accelerate.Accelerator`` so ``accelerate launch`` (multi-GPU, multi-node, DeepSpeed
configs) drives it unchanged. Data are sharded here, not by accelerate: the sampler cuts each
global batch into per-rank slices, so the global batch, and therefore the loss, is the same on
any number of processes and after any resume.

``deepspeed: configs/deepspeed/zero2.json`` (or ``accelerate launch`` with a DeepSpeed config)
trains under ZeRO: the loss still sees the global batch (gathered in ``ContrastiveModel``),
checkpoints hold DeepSpeed's own state for resuming plus consolidated safetensors, and the
final ``encoder/`` is the same open_clip folder as without DeepSpeed (see ``zero.py``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mgll.data import RecordImageDataset, collate_records, load_dataset
from mgll.encoder.checkpoint import (
    checkpoint_rng,
    latest_checkpoint,
    load_checkpoint,
    load_zero_checkpoint,
    save_checkpoint,
    save_zero_checkpoint,
    set_rng_state,
)
from mgll.encoder.config import RunConfig
from mgll.encoder.contrastive import ContrastiveModel
from mgll.encoder.factory import create_encoder, save_encoder
from mgll.encoder.sampler import GlobalBatchSampler, SeededItems
from mgll.encoder.zero import (
    clamp_parameter_,
    deepspeed_in_env,
    fill_auto,
    full_state_dict,
    logit_scale_bounds,
    make_ds_accelerator,
    model_width,
    scalar_safe_broadcast,
    zero_stage,
)
from mgll.io import atomic_write_json, atomic_write_text
from mgll.optim import adamw

__all__ = ["train", "make_accelerator", "build_model", "build_optimizer", "build_scheduler", "mixed_precision"]


def mixed_precision(precision: str) -> str:
    """accelerate's mixed_precision for our setting: bf16 where the device has it, never on CPU by default."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def make_accelerator(precision: str = "auto", deepspeed: str | None = None) -> Accelerator:
    """accelerate's Accelerator; under torchrun on a machine with no GPU it must be told to use
    CPU processes (gloo), or each process silently trains alone on its slice of the batch.
    With a DeepSpeed config (argument or ``accelerate launch`` environment) it runs on DeepSpeed."""
    if not torch.cuda.is_available():  # accelerate imports DeepSpeed when installed, which warns it "fell back" to CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if deepspeed or deepspeed_in_env():
        return make_ds_accelerator(mixed_precision(precision), deepspeed)
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision=mixed_precision(precision), cpu=multi_process and not torch.cuda.is_available())


def _encoder_kwargs(cfg: RunConfig) -> dict[str, Any]:
    return {"init_logit_scale": math.log(10), "init_logit_bias": -10.0} if cfg.loss.name == "siglip" else {}


def build_model(cfg: RunConfig, levels) -> tuple[ContrastiveModel, Any, Any, str]:
    encoder, preprocess_train, preprocess_val, tokenizer, name = create_encoder(
        cfg.model.name, pretrained=cfg.model.pretrained, **_encoder_kwargs(cfg)
    )
    if cfg.model.grad_checkpointing:
        encoder.set_grad_checkpointing(True)
    weights = {"soft_clip": cfg.loss.soft_clip, "pointwise": cfg.loss.pointwise, "smooth_kl": cfg.loss.smooth_kl}
    model = ContrastiveModel(encoder, tokenizer, levels, loss=cfg.loss.name, loss_weights=weights, trim_text=cfg.model.trim_text)
    return model, preprocess_train, preprocess_val, name


def build_optimizer(model: torch.nn.Module, cfg: RunConfig, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW; gains, biases, embeddings of position and the logit scales get no weight decay (as open_clip).

    `fused=None` takes torch's fused kernel where the parameters allow it (`mgll.optim.adamw`).
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    t = cfg.train
    return adamw(
        [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": t.weight_decay}],
        lr=t.lr,
        betas=(t.beta1, t.beta2),
        eps=t.eps,
        **({} if fused is None else {"fused": fused}),
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig) -> torch.optim.lr_scheduler.LambdaLR:
    warmup, total = cfg.train.warmup_steps, cfg.train.steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _append_metrics(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop rows logged after the checkpoint so the file has each step once."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def train(cfg: RunConfig, resume: bool = False, max_steps_this_run: int | None = None, progress: bool = True) -> Path:
    """Train and return the run folder; ``RUN/encoder`` holds the final encoder.

    ``max_steps_this_run`` stops early after that many steps (for tests of resumption); the
    schedule is still the one of ``train.steps``.
    """
    run_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg.train.precision, cfg.deepspeed)
    rank, world = accelerator.process_index, accelerator.num_processes
    stage = zero_stage(accelerator)  # None without DeepSpeed
    if cfg.train.batch_size % world:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by {world} processes")
    set_seed(cfg.train.seed)
    if accelerator.device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)

    if not cfg.data.path:
        raise ValueError("data.path is empty: point it at a dataset folder (card + records.jsonl)")
    dataset = load_dataset(cfg.data.path)
    model, preprocess_train, preprocess_val, model_name = build_model(cfg, dataset.card.levels)
    images = RecordImageDataset(dataset, split=cfg.data.split, transform=preprocess_train if cfg.data.augment else preprocess_val)
    if len(images) == 0:
        raise ValueError(f"{cfg.data.path}: no records in split {cfg.data.split!r}; splits: {dataset.splits()}")

    model.to(accelerator.device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    start_step = 0
    metrics_path = run_dir / "metrics.jsonl"
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None and stage is None:
        start_step = load_checkpoint(ckpt, model, optimizer, scheduler, restore_rng=False)
    if stage == 3 and any(p.dim() == 0 for p in model.parameters()):
        raise ValueError(
            f"{cfg.deepspeed or 'the accelerate DeepSpeed config'}: ZeRO-3 cannot partition open_clip's 0-dim logit_scale "
            "(DeepSpeed views every parameter as bytes); use ZeRO-2 (configs/deepspeed/zero2.json) for encoders"
        )
    if stage is not None:
        fill_auto(accelerator, micro_batch=cfg.train.batch_size // world, grad_clip=cfg.train.grad_clip, width=model_width(model))
    with scalar_safe_broadcast(model) if stage is not None else contextlib.nullcontext():
        model, optimizer = accelerator.prepare(model, optimizer)
    core: ContrastiveModel = accelerator.unwrap_model(model)
    if ckpt is not None and stage is not None:
        start_step = load_zero_checkpoint(ckpt, model, scheduler, restore_rng=False)  # the engine: weights and optimizer partitions

    if accelerator.is_main_process:
        if ckpt is not None:
            _truncate_metrics(metrics_path, start_step)
            print(f"resumed from {ckpt} (step {start_step})")
        elif resume:
            print(f"--resume: no checkpoint in {run_dir / 'checkpoints'}, starting from step 0")
        elif metrics_path.exists():
            metrics_path.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    # DeepSpeed casts the model itself under bf16/fp16 (accelerate's autocast is off there): match its inputs
    input_dtype = next(core.parameters()).dtype if stage is not None else None

    sampler = GlobalBatchSampler(
        len(images), cfg.train.batch_size, cfg.train.steps, seed=cfg.train.seed, rank=rank, world_size=world, start_step=start_step
    )
    loader = DataLoader(
        SeededItems(images, seed=cfg.train.seed),
        batch_sampler=sampler,
        collate_fn=collate_records,
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
    )
    end_step = cfg.train.steps if max_steps_this_run is None else min(cfg.train.steps, start_step + max_steps_this_run)
    bar = tqdm(total=end_step - start_step, desc=f"train {cfg.loss.name}", disable=not (progress and accelerator.is_main_process), dynamic_ncols=True)
    step = start_step
    terms: dict[str, float] = {}  # stays empty when a resumed run has no step left
    model.train()
    t_last = time.perf_counter()
    batches = iter(loader)
    if ckpt is not None:  # after iter(): creating the iterator draws from the global generator
        set_rng_state(checkpoint_rng(ckpt))
    for batch_images, label_sets in batches:
        if step >= end_step:
            break
        batch_images = batch_images.to(accelerator.device, dtype=input_dtype, non_blocking=True)
        with accelerator.autocast():
            out = model(batch_images, label_sets)
        accelerator.backward(out["loss"])  # under DeepSpeed this also clips and steps the optimizer
        if cfg.train.grad_clip > 0 and stage is None:
            accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if stage is None:
            core.clamp_logit_scale()
        else:
            clamp_parameter_(core.encoder.logit_scale, *logit_scale_bounds())
        step += 1

        terms = {k: float(v.detach()) for k, v in out.items()}
        if accelerator.is_main_process and (step % cfg.train.log_every == 0 or step == end_step):
            now = time.perf_counter()
            row = {"step": step, **terms, "lr": scheduler.get_last_lr()[0], "logit_scale": float(core.logit_scale().detach()), "sec": now - t_last}
            t_last = now
            _append_metrics(metrics_path, row)
        bar.set_postfix({k: f"{v:.3f}" for k, v in terms.items()})
        bar.update(1)
        if step % cfg.train.save_every == 0 or step == end_step:
            accelerator.wait_for_everyone()
            if stage is not None:
                save_zero_checkpoint(run_dir, step, model, scheduler, keep=cfg.train.keep_checkpoints)
            elif accelerator.is_main_process:
                save_checkpoint(run_dir, step, core, optimizer, scheduler, keep=cfg.train.keep_checkpoints)
    bar.close()
    accelerator.wait_for_everyone()
    encoder = core.encoder
    if stage is not None and step == cfg.train.steps:
        encoder = _consolidated_encoder(cfg, core)  # collective; fp32 masters in a plain module
    if accelerator.is_main_process and step == cfg.train.steps:
        save_encoder(
            encoder,
            run_dir / "encoder",
            model_name,
            extra={"loss": cfg.loss.name, "levels": [{"name": lv.name, "template": lv.template} for lv in dataset.card.levels], "steps": step},
        )
        atomic_write_json(run_dir / "summary.json", {"steps": step, "loss": cfg.loss.name, "final": terms, "encoder": str(run_dir / "encoder")})
    return run_dir


def _consolidated_encoder(cfg: RunConfig, core: ContrastiveModel) -> torch.nn.Module:
    """A plain open_clip module holding the fp32 masters of a ZeRO run (every rank must call this)."""
    state = full_state_dict(core)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        encoder, *_ = create_encoder(cfg.model.name, **_encoder_kwargs(cfg))
        prefix = "encoder."
        encoder.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
        return encoder
    return core.encoder
