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

import copy
import json
import math
import os
import re
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
from mgll.data.image_checks import preflight_images
from mgll.data.records import RecordError
from mgll.data.shard_stream import ShardStream
from mgll.data.shards import is_shard_pattern, open_shards
from mgll.encoder.accumulate import GradCache, check_accum_steps
from mgll.encoder.backends import make_backend
from mgll.encoder.checkpoint import (
    checkpoint_rng,
    set_rng_state,
)
from mgll.encoder.config import RunConfig
from mgll.encoder.contrastive import ContrastiveModel
from mgll.encoder.factory import create_encoder, save_encoder
from mgll.encoder.finite import FiniteGuard, all_ranks_agree, finite_or_none
from mgll.encoder.resume_guard import CHANGES_FILE, check_resume_config, record_changes
from mgll.encoder.sampler import GlobalBatchSampler, SeededItems
from mgll.encoder.zero import (
    deepspeed_in_env,
    make_ds_accelerator,
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
    model = ContrastiveModel(encoder, tokenizer, levels, loss=cfg.loss.name, loss_weights=weights,
                             trim_text=cfg.model.trim_text, loss_options=cfg.loss.options())
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


def _metric_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``; a line cut short by a kill mid-write is dropped, not fatal."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
    return rows


def _truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, keep the rows up to the step the run continues from, so the file has each step once."""
    if not path.is_file():
        return
    kept = [row for row in _metric_rows(path) if row["step"] <= last_step]
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in kept))


def _apply_hyperparameters(optimizer: torch.optim.Optimizer, scheduler, cfg: RunConfig) -> None:
    """After a resume with ``--allow-config-change``: the checkpoint restored the old lr, betas and
    weight decay into the optimizer and the old base lr into the scheduler; put the new ones in, so
    the run follows the schedule its config now says (the step count stays the checkpoint's)."""
    t = cfg.train
    scheduler.base_lrs = [t.lr for _ in optimizer.param_groups]
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for i, group in enumerate(optimizer.param_groups):
        group["initial_lr"] = t.lr
        group["lr"] = t.lr * factor
        group["betas"], group["eps"] = (t.beta1, t.beta2), t.eps
        if i > 0:  # group 0 holds the parameters that never decay (build_optimizer)
            group["weight_decay"] = t.weight_decay
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


_URL_LIKE = re.compile(r"^[a-z][a-z0-9+.-]*://|^pipe:", re.IGNORECASE)
STREAM_LAYOUT = "data_stream.json"


def check_stream_layout(run_dir: Path, resume: bool, world: int, streams: int) -> None:
    """A shard run's sample order depends on (processes, streams): a resume with others would repeat and skip samples.

    The first run records them in the run folder; a resume must match (one line naming both, else)."""
    path = run_dir / STREAM_LAYOUT
    now = {"world_size": world, "streams": streams}
    if resume and path.is_file():
        was = json.loads(path.read_text(encoding="utf-8"))
        if was != now:
            raise ValueError(
                f"{path}: this run read its shards with {was['world_size']} processes x {was['streams']} streams "
                f"(data.num_workers); resuming with {world} x {streams} would repeat and skip samples: resume with the same"
            )
    elif int(os.environ.get("RANK", "0")) == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, now)


def _preflight(cfg: RunConfig, dataset, accelerator: Accelerator) -> None:
    """Check every training image before step 1 (``data.check_images``), so a truncated or oversized
    file fails the run in seconds, naming the file, instead of hours in when the sampler reaches it.
    The main process checks; all processes stop together."""
    if cfg.data.check_images == "off":
        return
    problems = []
    if accelerator.is_main_process:
        problems = preflight_images(
            dataset, split=cfg.data.split, max_pixels=cfg.data.max_pixels,
            decode=cfg.data.check_images == "decode", workers=max(1, cfg.data.num_workers),
        )
    if not all_ranks_agree(not problems, accelerator.device):
        shown = "; ".join(f"{p['image']}: {p['reason']} ({p['detail']})" for p in problems[:5])
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise RecordError(
            f"{cfg.data.path}: {len(problems) or 'some'} image(s) of split {cfg.data.split!r} cannot be used: "
            f"{shown or 'see the main process'}{more}. `mgll check-data {cfg.data.path}` lists them all; fix or "
            "remove them (or set data.check_images=off to find them during training instead)"
        )


def train(
    cfg: RunConfig,
    resume: bool = False,
    max_steps_this_run: int | None = None,
    progress: bool = True,
    allow_config_change: bool = False,
) -> Path:
    """Train and return the run folder; ``RUN/encoder`` holds the final encoder.

    ``max_steps_this_run`` stops early after that many steps (for tests of resumption); the
    schedule is still the one of ``train.steps``. With ``resume``, settings that change the run
    must match its saved ``config.yaml`` unless ``allow_config_change`` (see ``resume_guard``).
    A step whose loss or gradient is not finite is skipped; ``train.max_nonfinite_steps`` of them
    in a row raise :class:`NonFiniteError` (see ``finite.py``).
    """
    cfg = copy.deepcopy(cfg)
    run_dir = Path(cfg.output_dir)
    if not cfg.data.path:
        raise ValueError("data.path is empty: point it at a dataset folder (card + records.jsonl)")
    if not _URL_LIKE.match(cfg.data.path):  # a local folder or shard pattern; URLs stay as they are
        cfg.data.path = str(Path(cfg.data.path).expanduser().resolve())  # the run folder is read from anywhere later
    changes = check_resume_config(run_dir, cfg.to_dict(), allow_config_change) if resume else []
    accelerator = make_accelerator(cfg.train.precision, cfg.deepspeed)
    rank, world = accelerator.process_index, accelerator.num_processes
    backend = make_backend(accelerator, cfg)  # plain accelerate or a ZeRO engine: the one place that differs
    if cfg.train.batch_size % world:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by {world} processes")
    check_accum_steps(cfg.train.batch_size, cfg.train.accum_steps, world)
    set_seed(cfg.train.seed)
    if accelerator.device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)

    shards = open_shards(cfg.data.path) if is_shard_pattern(cfg.data.path) else None
    dataset = None if shards is not None else load_dataset(cfg.data.path)
    data_card = shards.card if shards is not None else dataset.card
    if dataset is not None:
        _preflight(cfg, dataset, accelerator)  # shards: each image is checked (budget, decode) as it streams
    model, preprocess_train, preprocess_val, model_name = build_model(cfg, data_card.levels)
    transform = preprocess_train if cfg.data.augment else preprocess_val
    images = None if dataset is None else RecordImageDataset(dataset, split=cfg.data.split, transform=transform, max_pixels=cfg.data.max_pixels)
    n_items = sum(shards.counts(cfg.data.split)) if shards is not None else len(images)
    if n_items == 0:
        splits = shards.manifest["splits"] if shards is not None else dataset.splits()
        raise ValueError(f"{cfg.data.path}: no records in split {cfg.data.split!r}; splits: {splits}")
    if shards is not None:
        check_stream_layout(run_dir, resume, world, max(1, cfg.data.num_workers))

    model.to(accelerator.device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    model, optimizer, core, ckpt, start_step, notes = backend.prepare(model, optimizer, scheduler, run_dir, resume)
    metrics_path = run_dir / "metrics.jsonl"
    if ckpt is not None and changes:
        _apply_hyperparameters(scheduler.optimizer, scheduler, cfg)

    if accelerator.is_main_process:
        for note in notes:
            print(f"--resume: passed over checkpoint {note}")
        if ckpt is not None:
            print(f"resumed from {ckpt} (step {start_step})")
        elif resume:
            print(f"--resume: no checkpoint in {run_dir / 'checkpoints'}, starting from step 0")
        if resume:
            _truncate_metrics(metrics_path, start_step)
        elif metrics_path.exists():
            metrics_path.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
        if changes:
            record_changes(run_dir, start_step, changes)
            for key, old, new in changes:
                print(f"--allow-config-change: {key} {old!r} -> {new!r} from step {start_step} (recorded in {run_dir / CHANGES_FILE})")
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    accum = None  # train.accum_steps > 1: one step over micro-batches with cached features (accumulate.py)
    if cfg.train.accum_steps > 1:
        accum = GradCache(core, accelerator, cfg.train.accum_steps, engine=backend.engine)
    input_dtype = backend.input_dtype(core)

    if shards is None:
        sampler = GlobalBatchSampler(
            len(images), cfg.train.batch_size, cfg.train.steps, seed=cfg.train.seed, rank=rank, world_size=world, start_step=start_step
        )
        loader = DataLoader(SeededItems(images, seed=cfg.train.seed), batch_sampler=sampler, collate_fn=collate_records,
                            num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0)
    else:  # batches come whole from the shard streams (mgll.data.shard_stream), one stream per worker
        stream = ShardStream(shards, cfg.data.split, transform, cfg.train.batch_size, cfg.train.steps, seed=cfg.train.seed,
                             rank=rank, world_size=world, streams=max(1, cfg.data.num_workers), start_step=start_step,
                             max_pixels=cfg.data.max_pixels)
        loader = DataLoader(stream, batch_size=None, num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0)
    end_step = cfg.train.steps if max_steps_this_run is None else min(cfg.train.steps, start_step + max_steps_this_run)
    bar = tqdm(total=end_step - start_step, desc=f"train {cfg.loss.name}", disable=not (progress and accelerator.is_main_process), dynamic_ncols=True)
    guard = FiniteGuard(cfg.train.max_nonfinite_steps, what="mgll train")
    step = start_step
    terms: dict[str, float] = {}  # stays empty when a resumed run has no step left
    model.train()
    t_last = time.perf_counter()
    batches = iter(loader)
    if ckpt is not None:  # after iter(): creating the iterator draws from the global generator
        set_rng_state(checkpoint_rng(ckpt))
    for batch in batches:
        if step >= end_step:
            break
        batch_images, label_sets = batch[0], batch[1]  # shard batches also carry their record indices
        batch_images = batch_images.to(accelerator.device, dtype=input_dtype, non_blocking=True)
        core.set_progress(step / max(cfg.train.steps, 1))  # smooth_kl_schedule: a function of the step, so resume-safe
        with accelerator.autocast():
            out = model(batch_images, label_sets) if accum is None else accum.forward(batch_images, label_sets)
        terms = {k: float(v.detach()) for k, v in out.items()}
        bad = FiniteGuard.bad_terms(terms)
        ok = all_ranks_agree(not bad, accelerator.device)
        if ok:
            if accum is None:
                accelerator.backward(out["loss"])  # under DeepSpeed this also clips and steps the optimizer
            else:
                accum.backward()  # pass 2 of the feature cache; the same under DeepSpeed
            bad = FiniteGuard.bad_terms({}, backend.grad_norm())
            ok = all_ranks_agree(not bad, accelerator.device)
            backend.step(ok)
        del out
        scheduler.step()  # a skipped step still uses up its batch and its place in the schedule
        optimizer.zero_grad(set_to_none=True)
        backend.clamp(core)
        step += 1

        if accelerator.is_main_process and (step % cfg.train.log_every == 0 or step == end_step or not ok):
            now = time.perf_counter()
            row = {"step": step, **{k: finite_or_none(v) for k, v in terms.items()}, "lr": scheduler.get_last_lr()[0],
                   "logit_scale": float(core.logit_scale().detach()), "sec": now - t_last}
            if not ok:
                row["skipped"] = bad or ["non-finite on another process"]
            t_last = now
            _append_metrics(metrics_path, row)
        guard.step_ok(step, bad, ok)  # raises after max_nonfinite_steps in a row
        bar.set_postfix({k: f"{v:.3f}" for k, v in terms.items()})
        bar.update(1)
        if step % cfg.train.save_every == 0 or step == end_step:
            backend.save(run_dir, step, core, scheduler)
    bar.close()
    accelerator.wait_for_everyone()
    encoder = core.encoder
    if step == cfg.train.steps:  # under ZeRO a collective: the fp32 masters in a plain module
        encoder = backend.final_encoder(core, lambda: create_encoder(cfg.model.name, **_encoder_kwargs(cfg))[0])
    if accelerator.is_main_process and step == cfg.train.steps:
        rows = _metric_rows(metrics_path)
        last = rows[-1] if rows and rows[-1]["step"] == step else {}  # a resume with no step left: its last row
        final = terms or {k: v for k, v in last.items() if k not in ("step", "lr", "logit_scale", "sec", "skipped")}
        final = {k: v if v is None else finite_or_none(v) for k, v in final.items()}
        splits = shards.manifest["splits"] if shards is not None else dataset.splits()
        card = _card_writer(cfg, data_card, splits, model_name, step, final)
        save_encoder(
            encoder,
            run_dir / "encoder",
            model_name,
            extra={"loss": cfg.loss.name, "levels": [{"name": lv.name, "template": lv.template} for lv in data_card.levels], "steps": step},
            card=lambda folder: card(folder, "encoder"),
        )
        atomic_write_json(run_dir / "summary.json", {
            "steps": step, "loss": cfg.loss.name, "final": final,
            "skipped_nonfinite_steps": [r["step"] for r in rows if r.get("skipped")], "encoder": str(run_dir / "encoder"),
        })
        card(run_dir, "run")
    return run_dir


def _card_writer(cfg: RunConfig, data_card, splits: dict[str, int], model_name: str, steps: int, final: dict[str, Any]):
    """``card(folder, kind)``: the model card of the run's encoder folder or of the run folder (mgll.model_card)."""
    from mgll.encoder.factory import resolve_encoder_dir
    from mgll.model_card import encoder_card, write_card

    data = {"name": data_card.name, "description": data_card.description, "path": cfg.data.path,
            "splits": splits, "split_used": cfg.data.split,
            "levels": [{"name": lv.name, "template": lv.template} for lv in data_card.levels]}
    weights = {"soft_clip": cfg.loss.soft_clip, "pointwise": cfg.loss.pointwise, "smooth_kl": cfg.loss.smooth_kl}
    t = cfg.train
    train_info = {"global batch": t.batch_size, "accumulation micro-batches": t.accum_steps, "learning rate / warmup": f"{t.lr:g} / {t.warmup_steps} steps",
                  "weight decay": t.weight_decay, "precision": t.precision, "seed": t.seed,
                  "augmentation": "open_clip train transform" if cfg.data.augment else "eval transform"}
    start = cfg.model.name if resolve_encoder_dir(cfg.model.name) is not None else None

    def card(folder: Path, kind: str) -> None:
        write_card(folder, encoder_card(
            folder_kind=kind, model_name=cfg.model.name if start else model_name, pretrained=cfg.model.pretrained,
            loss=cfg.loss.name, loss_weights=weights if cfg.loss.name == "mgll" else {}, steps=steps, data=data,
            train=train_info, final=final, start_encoder=start,
        ))

    return card


