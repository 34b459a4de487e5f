"""Training-step overhead of the MGLL objective against CLIP, and the memory cut of gradient checkpointing.

Part 1, step time: for each config (``tiny``: mgll-tiny-vit, batch 32, 64 px; ``vitb32``: open_clip
ViT-B-32, random init, batch 16, 224 px) one encoder is created, copied, and wrapped in a
``ContrastiveModel`` with the ``clip`` loss and one with the ``mgll`` loss (identical weights at
the start). Both train on the same fixed batches of synthetic fundus images and label sets; a
full training step (forward, backward, gradient clipping as the trainer does, AdamW step,
zero_grad, logit-scale clamp) is timed, interleaved clip, mgll, clip, mgll, ... after warmup.
Reported: the median seconds per step of each and the ratio mgll/clip, the distinct texts each
loss encodes per step and their trimmed token length, and a per-component breakdown (label-set
handling, tokenising, text tower, loss math, image tower, optimizer) to say where any extra
time goes.

Part 2, peak memory: ViT-B-32, batch 32, 224 px, AdamW, with and without gradient
checkpointing, for each loss, each setting in a fresh subprocess. On CPU the child reports
the raw peak RSS of the process (VmHWM, what ``ru_maxrss`` reports) and, after resetting the
high-water mark through ``/proc/self/clear_refs``, the peak of a warm (second) step above the
RSS just before it, when parameters and AdamW state already exist. On CUDA it reports
``torch.cuda.max_memory_allocated`` instead. Our steps use the trainer's optimizer (torch's fused
AdamW, no per-tensor temporaries); the ``openclip`` reference row uses the plain torch AdamW that
open_clip's own training builds.

    .venv/bin/python benchmarks/loss_overhead.py --out benchmarks/results
    .venv/bin/python benchmarks/loss_overhead.py --quick --out /tmp/bench   # smoke run, ~1 min
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mgll.data import RecordImageDataset, collate_records, load_dataset, make_synthetic  # noqa: E402
from mgll.encoder.batch_texts import build_batch_texts  # noqa: E402
from mgll.encoder.config import load_config  # noqa: E402
from mgll.encoder.contrastive import ContrastiveModel  # noqa: E402
from mgll.encoder.factory import create_encoder  # noqa: E402
from mgll.encoder.losses import clip_loss  # noqa: E402
from mgll.encoder.text_encoding import encode_text_trimmed, trimmed_length  # noqa: E402
from mgll.encoder.trainer import build_optimizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_overhead_report import analyse, write_markdown  # noqa: E402  (the report half)

LOSSES = ("clip", "mgll")
TIME_CONFIGS = {
    "tiny": {"model": "mgll-tiny-vit", "batch": 32, "repeats": 30, "warmup": 3, "breakdown": 10},
    "vitb32": {"model": "ViT-B-32", "batch": 16, "repeats": 8, "warmup": 2, "breakdown": 4},
}
QUICK_TIME_CONFIGS = {
    "tiny": {"model": "mgll-tiny-vit", "batch": 32, "repeats": 4, "warmup": 1, "breakdown": 2},
    "vitb32": {"model": "ViT-B-32", "batch": 4, "repeats": 1, "warmup": 1, "breakdown": 1},
}
MEM_MODEL, MEM_BATCH, QUICK_MEM_BATCH = "ViT-B-32", 32, 4
N_BATCHES = 4  # fixed batches cycled through the timed steps


# ----------------------------------------------------------------------------------------------
# shared helpers


def num_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run_config(loss: str, grad_checkpointing: bool = False):
    return load_config(overrides=[f"loss.name={loss}", f"model.grad_checkpointing={str(grad_checkpointing).lower()}"])


def fixed_batches(data_dir: Path, preprocess, batch: int, n_batches: int):
    """``n_batches`` fixed (images, label_sets) batches: consecutive records, no augmentation."""
    ds = RecordImageDataset(load_dataset(data_dir), split=None, transform=preprocess)
    need = batch * n_batches
    if len(ds) < need:
        raise ValueError(f"{data_dir}: {len(ds)} records, need {need}")
    return [collate_records([ds[i] for i in range(b * batch, (b + 1) * batch)]) for b in range(n_batches)]


class OpenClipReference(torch.nn.Module):
    """open_clip's own training step, for the memory reference row: ``model(images, tokens)`` with
    77-token captions and ``open_clip.ClipLoss``, as open_clip's trainer runs it (no trimming, no
    per-level texts). Same interface as ``ContrastiveModel`` so ``train_step`` drives both."""

    def __init__(self, encoder, tokenizer, levels):
        super().__init__()
        import open_clip

        self.encoder, self.tokenizer, self.levels = encoder, tokenizer, levels
        self.loss = open_clip.ClipLoss()

    def forward(self, images, label_sets):
        from mgll.encoder.batch_texts import caption_for

        tokens = self.tokenizer([caption_for(labels, self.levels) for labels in label_sets]).to(images.device)
        image_features, text_features, scale = self.encoder(images, tokens)
        return {"loss": self.loss(image_features, text_features, scale)}

    def clamp_logit_scale(self, max_scale: float = 100.0) -> None:
        with torch.no_grad():
            self.encoder.logit_scale.clamp_(0, math.log(max_scale))


def train_step(model: ContrastiveModel, optimizer: torch.optim.Optimizer, images, label_sets, grad_clip: float) -> float:
    """One step as ``mgll.encoder.trainer.train`` takes it (fp32, one process)."""
    out = model(images, label_sets)
    out["loss"].backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.clamp_logit_scale()
    return float(out["loss"].detach())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# part 1: step time


def text_stats(levels, tokenizer, label_sets, loss: str) -> dict:
    batch = build_batch_texts(label_sets, levels, captions=loss != "mgll", per_level=loss == "mgll")
    tokens = tokenizer(batch.texts)
    eot = tokens.argmax(dim=-1) + 1  # per-text length up to and including end-of-text
    return {
        "distinct_texts": len(batch.texts),
        "trimmed_len": trimmed_length(tokens),
        "mean_text_tokens": float(eot.float().mean()),
        "texts_at_context_limit": int((eot >= tokens.shape[1]).sum()),  # truncated by the tokenizer
        "columns_per_level": [len(c) for c in batch.level_columns],
    }


def clock() -> float:
    """Process CPU seconds (all threads): on a shared machine it moves far less with other load than wall time."""
    return time.process_time()


def median_time(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = clock()
        fn()
        sync(device)
        times.append(clock() - t0)
    return statistics.median(times)


def breakdown(model: ContrastiveModel, optimizer, images, label_sets, device, repeats: int) -> dict:
    """Median seconds of each part of a step, each timed on its own (forward + backward where it has one)."""
    enc, tok, levels, loss = model.encoder, model.tokenizer, model.levels, model.loss_name
    is_mgll = loss == "mgll"
    out: dict[str, float] = {}
    out["label_sets_to_texts"] = median_time(
        lambda: build_batch_texts(label_sets, levels, captions=not is_mgll, per_level=is_mgll), device, repeats
    )
    batch = build_batch_texts(label_sets, levels, captions=not is_mgll, per_level=is_mgll)
    out["tokenize"] = median_time(lambda: tok(batch.texts), device, repeats)
    tokens = tok(batch.texts).to(device)

    def text_fb():
        feats = encode_text_trimmed(enc, tokens) if model.trim_text else enc.encode_text(tokens)
        torch.nn.functional.normalize(feats, dim=-1).sum().backward()
        model.zero_grad(set_to_none=True)

    out["text_tower_fwd_bwd"] = median_time(text_fb, device, repeats)

    def image_fb():
        torch.nn.functional.normalize(enc.encode_image(images), dim=-1).sum().backward()
        model.zero_grad(set_to_none=True)

    out["image_tower_fwd_bwd"] = median_time(image_fb, device, max(1, repeats // 2))

    with torch.no_grad():
        img_f = torch.nn.functional.normalize(enc.encode_image(images[:1]), dim=-1)
        dim = img_f.shape[-1]
    g = torch.Generator().manual_seed(0)
    img0 = torch.nn.functional.normalize(torch.randn(images.shape[0], dim, generator=g), dim=-1).to(device)
    txt0 = torch.nn.functional.normalize(torch.randn(len(batch.texts), dim, generator=g), dim=-1).to(device)

    def loss_fb():
        img = img0.clone().requires_grad_(True)
        txt = txt0.clone().requires_grad_(True)
        scale = model.logit_scale()
        if is_mgll:
            level_text = [txt[cols] for cols in batch.level_columns]
            targets = [y.to(device) for y in batch.level_targets]
            value = model.mgll(img, level_text, targets, scale)["loss"]
        else:
            value = clip_loss(img, txt[batch.caption_index], scale)
        value.backward()
        model.zero_grad(set_to_none=True)

    out["loss_math_fwd_bwd"] = median_time(loss_fb, device, repeats)

    # optimizer: give every parameter a gradient, then time step + zero_grad (restoring weights is not needed
    # for timing, but keep the state the timed loop uses: this runs after it)
    def opt_step():
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        sync(device)
        t0 = clock()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        return clock() - t0

    out["adamw_step"] = statistics.median(opt_step() for _ in range(max(1, repeats // 2)))
    return out


def time_config(name: str, spec: dict, data_dir: Path, device: torch.device, seed: int, breakdown_repeats: int) -> dict:
    print(f"[time] {name}: {spec['model']} batch {spec['batch']}, {spec['repeats']} timed steps per loss", flush=True)
    torch.manual_seed(seed)
    encoder, _, preprocess_val, tokenizer, _ = create_encoder(spec["model"])
    levels = load_dataset(data_dir).card.levels
    batches = fixed_batches(data_dir, preprocess_val, spec["batch"], N_BATCHES)
    batches = [(imgs.to(device), labels) for imgs, labels in batches]
    models, optims = {}, {}
    for loss in LOSSES:
        enc = encoder if loss == LOSSES[0] else copy.deepcopy(encoder)  # identical weights, own optimizer state
        models[loss] = ContrastiveModel(enc, tokenizer, levels, loss=loss).to(device).train()
        optims[loss] = build_optimizer(models[loss], run_config(loss))
    grad_clip = run_config("clip").train.grad_clip
    image_px = int(batches[0][0].shape[-1])

    times: dict[str, list[float]] = {loss: [] for loss in LOSSES}
    cpu_times: dict[str, list[float]] = {loss: [] for loss in LOSSES}
    losses_seen: dict[str, list[float]] = {loss: [] for loss in LOSSES}
    t_start = time.perf_counter()
    for i in range(spec["warmup"] + spec["repeats"]):
        images, label_sets = batches[i % N_BATCHES]
        for loss in LOSSES:  # interleaved: clip, mgll, clip, mgll, ...
            sync(device)
            t0, c0 = time.perf_counter(), clock()
            value = train_step(models[loss], optims[loss], images, label_sets, grad_clip)
            sync(device)
            dt, dc = time.perf_counter() - t0, clock() - c0
            if i >= spec["warmup"]:
                times[loss].append(dt)
                cpu_times[loss].append(dc)
                losses_seen[loss].append(value)
    loop_s = time.perf_counter() - t_start

    med = {loss: statistics.median(times[loss]) for loss in LOSSES}
    med_cpu = {loss: statistics.median(cpu_times[loss]) for loss in LOSSES}
    stats = {loss: [text_stats(levels, tokenizer, labels, loss) for _, labels in batches] for loss in LOSSES}
    texts = {
        loss: {
            "distinct_texts_per_step": [s["distinct_texts"] for s in stats[loss]],
            "trimmed_len_per_step": [s["trimmed_len"] for s in stats[loss]],
            "mean_text_tokens": round(statistics.mean(s["mean_text_tokens"] for s in stats[loss]), 1),
            "texts_at_context_limit": [s["texts_at_context_limit"] for s in stats[loss]],
            "columns_per_level": [s["columns_per_level"] for s in stats[loss]],
        }
        for loss in LOSSES
    }
    print(f"[time] {name}: breakdown", flush=True)
    parts = {
        loss: breakdown(models[loss], optims[loss], *batches[0], device, breakdown_repeats) for loss in LOSSES
    }
    result = {
        "model": spec["model"],
        "batch": spec["batch"],
        "image_px": image_px,
        "warmup_rounds": spec["warmup"],
        "repeats": spec["repeats"],
        "median_s": med,
        "min_s": {loss: min(times[loss]) for loss in LOSSES},
        "max_s": {loss: max(times[loss]) for loss in LOSSES},
        "all_s": times,
        "ratio_mgll_over_clip": med["mgll"] / med["clip"],
        "median_cpu_s": med_cpu,
        "all_cpu_s": cpu_times,
        "ratio_cpu_mgll_over_clip": med_cpu["mgll"] / med_cpu["clip"],
        "texts": texts,
        "breakdown_s": parts,
        "final_loss": {loss: losses_seen[loss][-1] for loss in LOSSES},
        "loop_wall_s": loop_s,
    }
    print(
        f"[time] {name}: clip {med['clip']:.4f}s  mgll {med['mgll']:.4f}s  ratio {result['ratio_mgll_over_clip']:.3f}"
        f"  (CPU-time ratio {result['ratio_cpu_mgll_over_clip']:.3f})",
        flush=True,
    )
    del models, optims, encoder
    gc.collect()
    return result


# ----------------------------------------------------------------------------------------------
# part 2: peak memory (child process)


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # resets the peak RSS (VmHWM), Linux >= 4.0
        return True
    except OSError:
        return False


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back so RSS is what is live
    except (OSError, AttributeError):
        pass


def mem_child(args) -> None:
    device = torch.device(args.device)
    torch.set_num_threads(num_threads())
    cpu = device.type == "cpu"
    mb = 1024.0
    res: dict = {"loss": args.loss, "grad_checkpointing": bool(args.ckpt), "device": device.type}
    if cpu:
        res["rss_after_import_mb"] = _status_kb("VmRSS") / mb
    torch.manual_seed(args.seed)
    loss = args.loss.removesuffix("-untrimmed")  # "clip-untrimmed": open_clip's 77-token text path, for comparison
    cfg = run_config("clip" if loss == "openclip" else loss, bool(args.ckpt))
    encoder, _, preprocess_val, tokenizer, _ = create_encoder(args.model)
    if args.ckpt:
        encoder.set_grad_checkpointing(True)
    levels = load_dataset(args.data).card.levels
    images, label_sets = fixed_batches(Path(args.data), preprocess_val, args.batch, 1)[0]
    if loss == "openclip":  # open_clip's own step: the reference the 30 % bar was taken from
        model = OpenClipReference(encoder, tokenizer, levels)
    else:
        model = ContrastiveModel(encoder, tokenizer, levels, loss=loss, trim_text=not args.loss.endswith("-untrimmed"))
    model = model.to(device).train()
    images = images.to(device)
    # open_clip's own training builds a plain torch AdamW (single-tensor on CPU); ours takes the fused kernel
    optimizer = build_optimizer(model, cfg, fused=False if loss == "openclip" else None)
    res["optimizer"] = "AdamW fused" if optimizer.defaults.get("fused") else "AdamW"
    n_params = sum(p.numel() for p in model.parameters())
    res["params_m"] = n_params / 1e6
    res["params_mb"] = n_params * 4 / 2**20
    res["adamw_state_mb"] = 2 * n_params * 4 / 2**20
    res["grads_mb"] = n_params * 4 / 2**20
    grad_clip = cfg.train.grad_clip

    if cpu:
        _trim()
        res["hwm_setup_mb"] = _status_kb("VmHWM") / mb
        res["rss_before_step1_mb"] = _status_kb("VmRSS") / mb  # model built, no gradients, no AdamW state yet
        res["hwm_reset_supported"] = _reset_hwm()
        t0 = time.perf_counter()
        train_step(model, optimizer, images, label_sets, grad_clip)
        res["step1_s"] = time.perf_counter() - t0
        res["hwm_step1_mb"] = _status_kb("VmHWM") / mb
        _trim()
        res["rss_before_step2_mb"] = _status_kb("VmRSS") / mb  # + AdamW state
        _reset_hwm()
        t0 = time.perf_counter()
        train_step(model, optimizer, images, label_sets, grad_clip)
        res["step2_s"] = time.perf_counter() - t0
        res["hwm_step2_mb"] = _status_kb("VmHWM") / mb
        # the process's peak RSS over its whole life (what ru_maxrss gives without the resets)
        res["peak_rss_mb"] = max(res["hwm_setup_mb"], res["hwm_step1_mb"], res["hwm_step2_mb"])
        res["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / mb  # after resets: a lower bound
        res["step1_above_pre_mb"] = res["hwm_step1_mb"] - res["rss_before_step1_mb"]
        res["step2_above_pre_mb"] = res["hwm_step2_mb"] - res["rss_before_step2_mb"]
    else:
        torch.cuda.synchronize()
        res["allocated_before_step1_mb"] = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        train_step(model, optimizer, images, label_sets, grad_clip)
        torch.cuda.synchronize()
        res["peak_step1_mb"] = torch.cuda.max_memory_allocated() / 2**20
        res["allocated_before_step2_mb"] = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        train_step(model, optimizer, images, label_sets, grad_clip)
        torch.cuda.synchronize()
        res["peak_step2_mb"] = torch.cuda.max_memory_allocated() / 2**20
        res["peak_rss_mb"] = max(res["peak_step1_mb"], res["peak_step2_mb"])  # named alike for the report
        res["step1_above_pre_mb"] = res["peak_step1_mb"] - res["allocated_before_step1_mb"]
        res["step2_above_pre_mb"] = res["peak_step2_mb"] - res["allocated_before_step2_mb"]
    print("MEMJSON " + json.dumps(res), flush=True)


# glibc's default per-thread arenas and sliding mmap threshold keep freed activation buffers resident, so
# RSS then measures the allocator's retention rather than the step's live memory. These settings make
# freed large buffers go back to the OS at once; the same variables work for any user's training run.
TUNED_MALLOC = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}


def measure_memory(data_dir: Path, batch: int, losses, device: str, seed: int, allocator: str = "tuned") -> list[dict]:
    env = {**os.environ, **(TUNED_MALLOC if allocator == "tuned" else {})}
    rows = []
    for loss in losses:
        for ckpt in (0, 1):
            print(f"[mem] {MEM_MODEL} batch {batch} loss {loss} grad_checkpointing={bool(ckpt)}", flush=True)
            cmd = [
                sys.executable, str(Path(__file__).resolve()), "--_mem-child", "--model", MEM_MODEL,
                "--batch", str(batch), "--loss", loss, "--ckpt", str(ckpt), "--data", str(data_dir),
                "--device", device, "--seed", str(seed),
            ]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"memory child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
            line = next(x for x in proc.stdout.splitlines() if x.startswith("MEMJSON "))
            row = json.loads(line[len("MEMJSON "):])
            row["child_wall_s"] = time.perf_counter() - t0
            row["allocator"] = allocator
            rows.append(row)
            print(
                f"[mem]   peak {row['peak_rss_mb']:.0f} MB, warm step above pre-step {row['step2_above_pre_mb']:.0f} MB",
                flush=True,
            )
    return rows


def memory_summary(rows: list[dict]) -> dict:
    out = {}
    for loss in {r["loss"] for r in rows}:
        off = next(r for r in rows if r["loss"] == loss and not r["grad_checkpointing"])
        on = next(r for r in rows if r["loss"] == loss and r["grad_checkpointing"])
        out[loss] = {
            key: {"off_mb": off[key], "on_mb": on[key], "cut": 1 - on[key] / off[key]}
            for key in ("peak_rss_mb", "step1_above_pre_mb", "step2_above_pre_mb")
        }
    return out


# ----------------------------------------------------------------------------------------------
# report


def machine_info(device: torch.device) -> dict:
    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu_model)
    except OSError:
        pass
    info = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": num_threads(),
        "torch_threads": torch.get_num_threads(),
        "cpu_model": cpu_model,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
    }
    try:
        import open_clip

        info["open_clip"] = open_clip.__version__
    except Exception:  # pragma: no cover - open_clip is a dependency
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke mode: few steps, small batches (numbers not meaningful)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder for loss_overhead.md/.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", default="tiny,vitb32", help="comma-separated step-time configs")
    ap.add_argument(
        "--mem-losses", default="clip,mgll,clip-untrimmed,openclip",
        help="losses for the memory part (clip-untrimmed = our clip with open_clip's 77-token text path; openclip = "
        "open_clip's own model forward + ClipLoss, the reference); empty to skip it",
    )
    ap.add_argument(
        "--mem-allocator", choices=["tuned", "default"], default="tuned",
        help="tuned: glibc set to return freed buffers (RSS follows live memory); default: glibc as is",
    )
    ap.add_argument("--data", default=None, help="existing synthetic fundus dataset folder (default: generate one)")
    # internal: one memory measurement in this (fresh) process
    ap.add_argument("--_mem-child", dest="mem_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=MEM_MODEL, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=MEM_BATCH, help=argparse.SUPPRESS)
    ap.add_argument("--loss", default="clip", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mem_child:
        mem_child(args)
        return 0

    t_all = time.perf_counter()
    device = torch.device(args.device)
    torch.set_num_threads(num_threads())
    specs = QUICK_TIME_CONFIGS if args.quick else TIME_CONFIGS
    names = [c for c in args.configs.split(",") if c]
    unknown = set(names) - set(specs)
    if unknown:
        ap.error(f"unknown config(s) {sorted(unknown)}; known: {', '.join(specs)}")
    mem_batch = QUICK_MEM_BATCH if args.quick else MEM_BATCH
    mem_losses = [x for x in args.mem_losses.split(",") if x]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="mgll-bench-") as tmp:
        data_dir = Path(args.data) if args.data else Path(tmp) / "fundus"
        if not args.data:
            n = max(N_BATCHES * max(specs[c]["batch"] for c in names) if names else 0, mem_batch)
            print(f"[data] synthetic fundus, {n} images at 224 px", flush=True)
            make_synthetic(data_dir, kind="fundus", n=n, size=224, seed=args.seed)
        results: dict = {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join([".venv/bin/python", *[os.path.relpath(sys.argv[0], REPO)], *sys.argv[1:]]),
            "quick": args.quick,
            "machine": machine_info(device),
            "time": {},
            "settings": {"losses": list(LOSSES), "n_batches": N_BATCHES},
            "loadavg_start": os.getloadavg()[0],
        }
        for name in names:
            results["time"][name] = time_config(
                name, specs[name], data_dir, device, args.seed, breakdown_repeats=specs[name]["breakdown"]
            )
        if mem_losses:
            rows = measure_memory(data_dir, mem_batch, mem_losses, args.device, args.seed, args.mem_allocator)
            results["memory"] = {
                "model": MEM_MODEL, "batch": mem_batch, "allocator": args.mem_allocator,
                "malloc_env": TUNED_MALLOC if args.mem_allocator == "tuned" else {},
                "rows": rows, "summary": memory_summary(rows),
            }
    results["wall_s"] = time.perf_counter() - t_all
    results["loadavg_end"] = os.getloadavg()[0]
    if results["time"]:
        analyse(results)
        head = results["time"].get("vitb32") or next(iter(results["time"].values()))
        results["headline_ratio_mgll_over_clip"] = head["ratio_mgll_over_clip"]
        write_markdown(out / "loss_overhead.md", results)
    (out / "loss_overhead.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"wrote {out / 'loss_overhead.md'} and .json in {results['wall_s']:.0f} s", flush=True)
    if results["time"]:
        print(f"ratio mgll/clip: {results['headline_ratio_mgll_over_clip']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
