"""GPU check, one phase per process (accelerate keeps one state per process, and the DeepSpeed
phases need their own). Called by ``benchmarks/gpu_check.sh``; each phase writes a JSON that
``report`` turns into ``gpu.md``.

Phases:
  speed   bf16 ViT-B/16 training steps (forward, backward, AdamW) on a fixed batch, once with the
          ``clip`` loss and once with ``mgll``: img/s each and their ratio, peak memory.
          A fixed in-memory batch, so the figure is the GPU's and the loss's, not the JPEG decoder's.
  zero2   ``mgll train`` end to end under ZeRO-2 (configs/deepspeed/zero2.json) on synthetic data:
          img/s from the run's own per-step times, peak memory, checkpoint and consolidated encoder.
  align   ``mgll swap`` of the ZeRO-2 run's encoder into a LLaVA-shaped model at real widths
          (Llama-7B-shaped LM: 4096 wide, 11008 MLP, 32 heads, 32000 vocabulary; ``--lm-layers`` of
          its 32 layers, random weights, nothing downloaded), then ``mgll align`` stage 2 (LoRA) under
          ZeRO-3 (configs/deepspeed/zero3.json): s/step, peak memory.
  large_batch  bf16 ViT-B/16, mgll loss: an effective batch of 4096 on one GPU as 16 micro-batches of 256
          (feature-cached accumulation, ``train.accum_steps=16``) against a plain step on 256: peak memory
          and time per sample, and their ratios (the GPU row of ``benchmarks/large_batch.py``).
  report  gpu.md from the JSONs.

``--cpu-smoke`` runs every phase at tiny sizes on CPU (fp32), to check the script, not the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def _write(path: Path, obj: dict) -> None:
    from mgll.io import atomic_write_json

    atomic_write_json(path, obj)
    print(json.dumps(obj, indent=2))


def _data(work: Path, smoke: bool) -> Path:
    from mgll.data.synthetic import make_synthetic

    root = work / ("data64" if smoke else "data224")
    if not (root / "records.jsonl").is_file():
        make_synthetic(root, kind="fundus", n=64 if smoke else 1024, size=64 if smoke else 224, seed=0,
                       workers=1 if smoke else 8, overwrite=True)
    return root


def _median_step(step, warmup: int, steps: int) -> tuple[float, dict]:
    """Median seconds of ``step()`` (one optimizer step) over ``steps`` timed calls after ``warmup`` untimed ones,
    synchronised on CUDA; also the last call's output."""
    times, out = [], None
    for i in range(warmup + steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out


# -- speed ---------------------------------------------------------------------------------------
def phase_speed(args) -> None:
    from accelerate import Accelerator

    from mgll.data import RecordImageDataset, load_dataset
    from mgll.encoder.config import load_config
    from mgll.encoder.trainer import build_model, build_optimizer, mixed_precision

    smoke = args.cpu_smoke
    data = load_dataset(_data(args.work, smoke))
    batch = 8 if smoke else args.batch
    steps, warmup = (3, 1) if smoke else (args.steps, 5)
    acc = Accelerator(mixed_precision="no" if smoke else mixed_precision("bf16"), cpu=smoke)
    results = {}
    for loss in ("clip", "mgll"):
        cfg = load_config(overrides=[f"model.name={'mgll-tiny-vit' if smoke else 'ViT-B-16'}", f"loss.name={loss}",
                                     f"train.batch_size={batch}"])
        torch.manual_seed(0)
        model, _, preprocess_val, _ = build_model(cfg, data.card.levels)
        images_ds = RecordImageDataset(data, split="train", transform=preprocess_val)
        items = [images_ds[i % len(images_ds)] for i in range(batch)]
        images = torch.stack([x[0] for x in items]).to(acc.device)
        labels = [x[1] for x in items]
        model.to(acc.device)
        opt = build_optimizer(model, cfg)
        model, opt = acc.prepare(model, opt)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

        def step(model=model, opt=opt, images=images, labels=labels):
            with acc.autocast():
                out = model(images, labels)
            acc.backward(out["loss"])
            opt.step()
            opt.zero_grad(set_to_none=True)
            return out

        sec, out = _median_step(step, warmup, steps)
        results[loss] = {"img_per_s": round(batch / sec, 1), "sec_per_step": round(sec, 4), "peak_gib": _peak_gib(),
                         "final_loss": float(out["loss"].detach())}
        del step, model, opt, out
        acc.free_memory()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    results["mgll_over_clip_time"] = round(results["mgll"]["sec_per_step"] / results["clip"]["sec_per_step"], 3)
    _write(args.work / "speed.json", {"model": "mgll-tiny-vit" if smoke else "ViT-B-16", "batch": batch,
                                      "steps_timed": steps, "precision": "fp32" if smoke else "bf16", **results})


# -- zero2 ---------------------------------------------------------------------------------------
def phase_zero2(args) -> None:
    from mgll.encoder.config import load_config
    from mgll.encoder.trainer import train

    smoke = args.cpu_smoke
    run = args.work / "zero2-run"
    batch, steps = (8, 4) if smoke else (args.batch, args.zero2_steps)
    cfg = load_config(overrides=[
        f"output_dir={run}", f"data.path={_data(args.work, smoke)}", f"model.name={'mgll-tiny-vit' if smoke else 'ViT-B-16'}",
        "loss.name=mgll", f"train.batch_size={batch}", f"train.steps={steps}", "train.warmup_steps=2",
        f"train.save_every={steps}", f"train.precision={'fp32' if smoke else 'bf16'}",
        f"data.num_workers={0 if smoke else 8}", f"deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero2.json'}",
    ])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train(cfg, progress=False)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    sec = statistics.median(r["sec"] for r in rows[min(3, len(rows) - 1):])
    ckpt = run / "checkpoints" / f"step-{steps:06d}"
    _write(args.work / "zero2.json", {
        "model": cfg.model.name, "batch": batch, "steps": steps, "img_per_s": round(batch / sec, 1),
        "sec_per_step": round(sec, 4), "wall_s": round(wall, 1), "peak_gib": _peak_gib(),
        "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
        "zero_files": sorted(p.name for p in (ckpt / "zero").iterdir()),
        "encoder_written": (run / "encoder" / "open_clip_model.safetensors").is_file(),
    })


# -- align ---------------------------------------------------------------------------------------
def _llava_7b_shaped(out: Path, lm_layers: int, smoke: bool) -> Path:
    """A random LLaVA-1.5-shaped model: CLIP ViT-L/14-336 tower, Llama-7B widths, ``lm_layers`` layers."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from mgll.testing.tiny import build_word_tokenizer

    if (out / "config.json").is_file():
        return out
    tok = build_word_tokenizer(["status: normal abnormal. disease: drusen, cataract, myopia, glaucoma, tessellation."])
    if smoke:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=8)
        text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=len(tok))
    else:
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                  image_size=336, patch_size=14, projection_dim=768)
        text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=lm_layers, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    text.pad_token_id, text.bos_token_id, text.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    grid = vision.image_size // vision.patch_size
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      image_seq_length=grid * grid, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    dtype = torch.float32 if smoke else torch.bfloat16
    with torch.device(_device()):
        model = LlavaForConditionalGeneration(cfg).to(dtype)
    size = {"height": vision.image_size, "width": vision.image_size}
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": vision.image_size}, crop_size=size),
                               tokenizer=tok, patch_size=vision.patch_size, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def phase_align(args) -> None:
    from mgll.adapters.align import AlignConfig, align
    from mgll.adapters.swap import swap

    smoke = args.cpu_smoke
    t0 = time.perf_counter()
    llava = _llava_7b_shaped(args.work / "llava-7b-shaped", args.lm_layers, smoke)
    swapped = args.work / "llava-swapped"
    if not (swapped / "config.json").is_file():
        swap("llava", llava, args.work / "zero2-run", swapped, dtype=torch.float32 if smoke else torch.bfloat16)
    build_s = time.perf_counter() - t0
    n_params = None
    with open(swapped / "config.json", encoding="utf-8") as f:
        text_cfg = json.load(f)["text_config"]
    out = args.work / "align-zero3"
    batch, steps = (2, 2) if smoke else (args.align_batch, 3)
    cfg = AlignConfig(model=str(swapped), data=str(_data(args.work, smoke)), out=str(out), stage=2, split=None,
                      levels=["status", "disease"], steps=steps, batch_size=batch, lr=1e-4,
                      precision="fp32" if smoke else "bf16", deepspeed=str(ROOT / "configs" / "deepspeed" / "zero3.json"))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    def after_training(model, batch_tensors):
        nonlocal n_params
        n_params = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.module.parameters())

    t1 = time.perf_counter()
    align(cfg, progress=False, after_training=after_training)
    wall = time.perf_counter() - t1
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    _write(args.work / "align.json", {
        "lm": {k: text_cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")},
        "params_total": n_params, "batch": batch, "steps": steps, "build_and_swap_s": round(build_s, 1),
        "align_wall_s": round(wall, 1), "s_per_step_incl_load_and_save": round(wall / steps, 2), "peak_gib": _peak_gib(),
        "loss": [r["loss"] for r in rows], "zero_files": sorted(p.name for p in (out / "checkpoints" / f"step-{steps:07d}" / "zero").iterdir()),
        "outputs": sorted(p.name for p in out.iterdir()),
    })


# -- large_batch ---------------------------------------------------------------------------------
def phase_large_batch(args) -> None:
    from accelerate import Accelerator

    from mgll.data import RecordImageDataset, load_dataset
    from mgll.encoder.accumulate import GradCache
    from mgll.encoder.config import load_config
    from mgll.encoder.trainer import build_model, build_optimizer, mixed_precision

    smoke = args.cpu_smoke
    data = load_dataset(_data(args.work, smoke))
    micro, batch = (4, 16) if smoke else (args.micro_batch, args.large_batch)
    acc = Accelerator(mixed_precision="no" if smoke else mixed_precision("bf16"), cpu=smoke)
    cfg = load_config(overrides=[f"model.name={'mgll-tiny-vit' if smoke else 'ViT-B-16'}", "loss.name=mgll",
                                 f"train.batch_size={batch}", f"train.accum_steps={batch // micro}"])
    torch.manual_seed(0)
    model, _, preprocess_val, _ = build_model(cfg, data.card.levels)
    del model
    images_ds = RecordImageDataset(data, split=None, transform=preprocess_val)
    items = [images_ds[i] for i in range(min(len(images_ds), batch))]
    reps = -(-batch // len(items))  # the synthetic set is smaller than 4096: its images repeat, labels with them
    all_images = torch.stack([x[0] for x in items]).repeat(reps, 1, 1, 1)[:batch]  # on the device per row only
    all_labels = ([x[1] for x in items] * reps)[:batch]
    rows = {}
    for name, n, k, steps, warmup in (("plain", micro, 1, 3 if smoke else 10, 1 if smoke else 3),
                                      ("accum", batch, batch // micro, 2 if smoke else 3, 1)):
        torch.manual_seed(0)
        model, *_ = build_model(cfg, data.card.levels)
        model.to(acc.device)
        opt = build_optimizer(model, cfg)
        model, opt = acc.prepare(model, opt)
        core = acc.unwrap_model(model)
        cache = GradCache(core, acc, k) if k > 1 else None
        images, labels = all_images[:n].to(acc.device), all_labels[:n]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

        def step(model=model, opt=opt, cache=cache, images=images, labels=labels):
            if cache is None:
                with acc.autocast():
                    out = model(images, labels)
                acc.backward(out["loss"])
            else:
                out = cache.forward(images, labels)
                cache.backward()
            acc.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return out

        sec, out = _median_step(step, warmup, steps)
        rows[name] = {"batch": n, "accum_steps": k, "micro_batch": n // k, "steps_timed": steps, "sec_per_step": round(sec, 4),
                      "ms_per_sample": round(1000 * sec / n, 4), "img_per_s": round(n / sec, 1), "peak_gib": _peak_gib(),
                      "final_loss": float(out["loss"].detach())}
        del step, model, opt, core, cache, out, images
        acc.free_memory()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    ratios = {"time_ratio": round(rows["accum"]["ms_per_sample"] / rows["plain"]["ms_per_sample"], 3)}
    if rows["plain"]["peak_gib"]:
        ratios["memory_ratio"] = round(rows["accum"]["peak_gib"] / rows["plain"]["peak_gib"], 3)
    _write(args.work / "large_batch.json", {"model": cfg.model.name, "precision": "fp32" if smoke else "bf16",
                                            "loss": "mgll", **rows, **ratios})


# -- report --------------------------------------------------------------------------------------
def phase_report(args) -> None:
    from mgll.io import atomic_write_text

    speed = json.loads((args.work / "speed.json").read_text())
    zero2 = json.loads((args.work / "zero2.json").read_text())
    al = json.loads((args.work / "align.json").read_text())
    lb = json.loads((args.work / "large_batch.json").read_text())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except ImportError:
        ds_version = "absent"
    lines = [
        "# GPU check" + (" (CPU smoke run: tiny sizes, not GPU figures)" if args.cpu_smoke else ""),
        "",
        f"Device: {gpu}; torch {torch.__version__}; DeepSpeed {ds_version}. Written by `bash benchmarks/gpu_check.sh`.",
        "",
        f"## Encoder training, {speed['precision']} {speed['model']}, batch {speed['batch']} (fixed in-memory batch, median of {speed['steps_timed']} steps)",
        "",
        "| loss | img/s | s/step | peak GiB |",
        "|---|---|---|---|",
    ]
    for loss in ("clip", "mgll"):
        r = speed[loss]
        lines.append(f"| {loss} | {r['img_per_s']} | {r['sec_per_step']} | {r['peak_gib']} |")
    lines += [
        "",
        f"MGLL / CLIP step time: **{speed['mgll_over_clip_time']}x**.",
        "",
        f"## ZeRO-2 encoder run (`mgll train`, configs/deepspeed/zero2.json, {zero2['model']}, mgll loss, batch {zero2['batch']}, {zero2['steps']} steps, data loading included)",
        "",
        f"{zero2['img_per_s']} img/s (median step {zero2['sec_per_step']} s), peak {zero2['peak_gib']} GiB, wall {zero2['wall_s']} s; "
        f"loss {zero2['loss_first']:.4f} -> {zero2['loss_last']:.4f}; checkpoint `zero/`: {', '.join(zero2['zero_files'])}; "
        f"consolidated open_clip encoder written: {zero2['encoder_written']}.",
        "",
        "## ZeRO-3 stage-2 (LoRA) alignment of a LLaVA-shaped model (configs/deepspeed/zero3.json, random weights)",
        "",
        f"LM: {al['lm']} (Llama-7B widths; {al['lm']['num_hidden_layers']} of 32 layers), tower: the ZeRO-2 run's encoder swapped in; "
        f"{al['params_total']} parameters in all.",
        "",
        f"Batch {al['batch']}, {al['steps']} steps: wall {al['align_wall_s']} s including load under zero.Init and the "
        f"consolidated checkpoints ({al['s_per_step_incl_load_and_save']} s/step), peak {al['peak_gib']} GiB; "
        f"build + swap {al['build_and_swap_s']} s; losses {[round(x, 4) for x in al['loss']]}; outputs: {', '.join(al['outputs'])}.",
        "",
        f"## Large batch on one GPU: feature-cached accumulation ({lb['precision']} {lb['model']}, mgll loss, fixed in-memory batch)",
        "",
        "| row | global batch | micro-batch | s/step | ms/sample | img/s | peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("plain", "accum"):
        r = lb[name]
        lines.append(f"| {name} | {r['batch']} | {r['micro_batch']} | {r['sec_per_step']} | {r['ms_per_sample']} | "
                     f"{r['img_per_s']} | {r['peak_gib']} |")
    lines += [
        "",
        f"memory ratio: {lb.get('memory_ratio', 'n/a (CPU)')}; time ratio: {lb['time_ratio']} (accumulated / plain, per sample; "
        "targets 1.25 and 1.4, as benchmarks/results/large_batch.md on CPU).",
        "",
    ]
    atomic_write_text(args.out, "\n".join(lines))
    print(f"wrote {args.out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["speed", "zero2", "align", "large_batch", "report"])
    p.add_argument("--work", type=Path, required=True, help="scratch folder shared by the phases")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu.md")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: checks the script, not the GPU")
    p.add_argument("--batch", type=int, default=256, help="encoder global batch (speed and zero2)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per loss (speed)")
    p.add_argument("--zero2-steps", type=int, default=30)
    p.add_argument("--lm-layers", type=int, default=int(os.environ.get("LM_LAYERS", "16")),
                   help="decoder layers of the 32 of Llama-7B (default 16, to fit the 8-minute budget)")
    p.add_argument("--align-batch", type=int, default=8)
    p.add_argument("--large-batch", type=int, default=4096, help="effective batch of the large_batch phase")
    p.add_argument("--micro-batch", type=int, default=256, help="its micro-batch, and the plain row's batch")
    args = p.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; use --cpu-smoke to check the script on CPU")
    args.work.mkdir(parents=True, exist_ok=True)
    phases = {"speed": phase_speed, "zero2": phase_zero2, "align": phase_align, "large_batch": phase_large_batch,
              "report": phase_report}
    phases[args.phase](args)


if __name__ == "__main__":
    main()
