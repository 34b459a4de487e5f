"""What a large contrastive batch costs with feature-cached accumulation (``train.accum_steps``).

Rows, each in a fresh subprocess (so each peak is its own): open_clip ViT-B-32, random init, 224 px,
the ``mgll`` loss (all three terms), fp32 on CPU, one process, trainer's step (forward, backward,
gradient clipping, fused AdamW, zero_grad, logit-scale clamp):

  plain16   a plain step on a batch of 16
  accum256  one step on a batch of 256 as 16 micro-batches of 16 (``GradCache``, accum_steps=16)
  plain256  a plain step on the batch of 256, where it fits in free memory (estimated from plain16)

Memory as ``loss_overhead.py`` measures it: VmHWM (peak RSS) of the child over its life, and the
warm step's peak above the RSS just before it (high-water mark reset through /proc/self/clear_refs);
glibc set to hand freed buffers back (the same MALLOC_* variables) so RSS follows live memory.
Time: CPU seconds of the process per sample (on a shared machine these move far less with other load
than wall time; one thread), median over the warm steps; wall seconds are recorded beside them.
The step-1 losses of accum256 and plain256 must agree (same initial weights, same batch).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/large_batch.py --out benchmarks/results
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/large_batch.py --quick --out /tmp/lb   # tiny model, seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from loss_overhead import TUNED_MALLOC, _reset_hwm, _status_kb, _trim, fixed_batches, machine_info  # noqa: E402

from mgll.data import load_dataset, make_synthetic  # noqa: E402
from mgll.encoder.accumulate import GradCache  # noqa: E402
from mgll.encoder.config import load_config  # noqa: E402
from mgll.encoder.contrastive import ContrastiveModel  # noqa: E402
from mgll.encoder.factory import create_encoder  # noqa: E402
from mgll.encoder.trainer import build_optimizer  # noqa: E402

MEMORY_TARGET, TIME_TARGET = 1.25, 1.4
FULL = {"model": "ViT-B-32", "size": 224, "micro": 16, "batch": 256, "steps": {"plain16": 5, "accum256": 3, "plain256": 2}}
QUICK = {"model": "mgll-tiny-vit", "size": 64, "micro": 4, "batch": 16, "steps": {"plain16": 3, "accum256": 3, "plain256": 2}}


class _Fp32:
    """What GradCache uses of an accelerate ``Accelerator`` on one fp32 process."""

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()


def step_fn(model: ContrastiveModel, optimizer, images, label_sets, accum_steps: int, grad_clip: float = 1.0):
    """One trainer step; ``accum_steps`` > 1 through the feature cache. Returns a callable giving the loss."""
    cache = GradCache(model, _Fp32(), accum_steps) if accum_steps > 1 else None

    def step() -> float:
        if cache is None:
            out = model(images, label_sets)
            out["loss"].backward()
        else:
            out = cache.forward(images, label_sets)
            cache.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.clamp_logit_scale()
        return float(out["loss"].detach())

    return step


def child(args) -> None:
    torch.set_num_threads(1)
    mb = 1024.0
    torch.manual_seed(0)
    encoder, _, preprocess_val, tokenizer, _ = create_encoder(args.model)
    model = ContrastiveModel(encoder, tokenizer, load_dataset(args.data).card.levels, loss="mgll").train()
    optimizer = build_optimizer(model, load_config())
    images, label_sets = fixed_batches(Path(args.data), preprocess_val, args.batch, 1)[0]
    step = step_fn(model, optimizer, images, label_sets, args.accum)
    res: dict = {"row": args.row, "batch": args.batch, "accum_steps": args.accum, "micro_batch": args.batch // args.accum}
    _trim()
    res["hwm_setup_mb"] = _status_kb("VmHWM") / mb
    res["rss_before_step1_mb"] = _status_kb("VmRSS") / mb
    _reset_hwm()
    cpu, wall, losses = [], [], []
    for i in range(args.steps):
        if i == 1:  # warm step: parameters, gradients and AdamW state exist already
            _trim()
            res["rss_before_step2_mb"] = _status_kb("VmRSS") / mb
            res["hwm_step1_mb"] = _status_kb("VmHWM") / mb
            _reset_hwm()
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step())
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - t0)
        if i == 1:
            res["hwm_step2_mb"] = _status_kb("VmHWM") / mb
    res["peak_rss_mb"] = max(res["hwm_setup_mb"], res["hwm_step1_mb"], res["hwm_step2_mb"])  # the process's life
    res["step2_above_pre_mb"] = res["hwm_step2_mb"] - res["rss_before_step2_mb"]
    warm = slice(1, None) if args.steps > 1 else slice(None)
    res.update(cpu_s=cpu, wall_s=wall, losses=losses, cpu_s_per_step=statistics.median(cpu[warm]),
               wall_s_per_step=statistics.median(wall[warm]))
    res["cpu_ms_per_sample"] = 1000 * res["cpu_s_per_step"] / args.batch
    res["wall_ms_per_sample"] = 1000 * res["wall_s_per_step"] / args.batch
    print("ROWJSON " + json.dumps(res), flush=True)


def run_row(row: str, spec: dict, data: Path) -> dict:
    batch, accum = {"plain16": (spec["micro"], 1), "accum256": (spec["batch"], spec["batch"] // spec["micro"]),
                    "plain256": (spec["batch"], 1)}[row]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", "--row", row, "--model", spec["model"],
           "--data", str(data), "--batch", str(batch), "--accum", str(accum), "--steps", str(spec["steps"][row])]
    print(f"[row] {row}: batch {batch}, accum_steps {accum}, {spec['steps'][row]} steps", flush=True)
    env = {**os.environ, **TUNED_MALLOC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{row} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    res = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("ROWJSON "))[len("ROWJSON "):])
    print(f"[row]   peak {res['peak_rss_mb']:.0f} MB, {res['cpu_ms_per_sample']:.1f} CPU ms/sample", flush=True)
    return res


def _available_mb() -> float:
    with open("/proc/meminfo", encoding="ascii") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("MemAvailable:")) / 1024.0


def write_markdown(path: Path, r: dict) -> None:
    rows = r["rows"]
    spec = r["spec"]
    lines = [
        f"memory ratio: {r['memory_ratio']:.2f}",
        f"time ratio: {r['time_ratio']:.2f}",
        "",
        "# Large batches by feature-cached accumulation (`train.accum_steps`)",
        "",
        f"Accumulated / plain batch-{spec['micro']}, both on {spec['model']} ({spec['size']} px, random init, mgll loss, "
        f"fp32, CPU, one thread). Memory ratio: peak RSS (VmHWM) of the process; time ratio: CPU seconds per sample, "
        f"median of warm steps. Targets: memory <= {MEMORY_TARGET}, time <= {TIME_TARGET}: "
        f"memory {'met' if r['memory_ratio'] <= MEMORY_TARGET else 'MISSED'}, time {'met' if r['time_ratio'] <= TIME_TARGET else 'MISSED'}.",
        "",
        "| row | global batch | micro-batch | steps (1 cold + warm) | peak RSS MB | warm step above pre-step MB | CPU ms/sample | wall ms/sample | loss step 1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, x in rows.items():
        if "skipped" in x:
            lines.append(f"| {name} | {spec['batch']} | - | - | - | - | - | - | skipped: {x['skipped']} |")
            continue
        lines.append(
            f"| {name} | {x['batch']} | {x['micro_batch']} | {len(x['cpu_s'])} | {x['peak_rss_mb']:.0f} | "
            f"{x['step2_above_pre_mb']:.0f} | {x['cpu_ms_per_sample']:.1f} | {x['wall_ms_per_sample']:.1f} | {x['losses'][0]:.6f} |"
        )
    wall = rows["accum256"]["wall_ms_per_sample"] / rows["plain16"]["wall_ms_per_sample"]
    lines += ["", f"Wall-clock time ratio {wall:.2f} (wall time also counts waiting for the CPU, which other work shared).",
              "", "Ratios (each / plain16): " + "; ".join(
        f"{name}: peak {v['peak']:.2f}x, warm-step increment {v['increment']:.2f}x, time/sample {v['time']:.2f}x"
        for name, v in r["ratios"].items()), ""]
    if "accum_over_plain_large" in r:
        v = r["accum_over_plain_large"]
        lines += [f"accum{spec['batch']} / plain{spec['batch']}: peak {v['peak']:.2f}x, time/sample {v['time']:.2f}x "
                  "(the extra forward's cost at equal batch; against plain16 part of it is paid back by one AdamW "
                  f"step per {spec['batch']} samples instead of per {spec['micro']}).", ""]
    if "loss_agreement" in r:
        lines += [f"Step-1 loss of accum{spec['batch']} vs plain{spec['batch']} (same weights, same batch): "
                  f"difference {r['loss_agreement']:.2e}.", ""]
    m = r["machine"]
    lines += [
        "What was measured: each row is a fresh subprocess that builds the model and AdamW, loads one fixed batch of "
        "synthetic fundus images (no augmentation) and takes the listed steps as `mgll train` takes them; the first step "
        "is cold (AdamW state allocated), the others warm. The accumulated step pays one extra forward of every "
        "micro-batch without a graph (pass 1) before the forward + backward of pass 2; its memory is one micro-batch's "
        "activations plus the cached features, the whole batch's images and the B x B loss terms.",
        "",
        f"Machine: {m.get('cpu_model', '?')}, {m.get('cpus_usable', '?')} CPUs usable, torch {m.get('torch', torch.__version__)}; "
        f"load average {r['loadavg_start']:.2f} at start, {r['loadavg_end']:.2f} at end; total {r['wall_s'] / 60:.1f} min. "
        f"Command: `{r['command']}` ({r['date']}).",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--quick", action="store_true", help="tiny model and batch: checks the script, not the figures")
    ap.add_argument("--_child", dest="child", action="store_true", help=argparse.SUPPRESS)
    for name in ("row", "model", "data"):
        ap.add_argument(f"--{name}", help=argparse.SUPPRESS)
    for name in ("batch", "accum", "steps"):
        ap.add_argument(f"--{name}", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0
    spec = QUICK if args.quick else FULL
    t_all = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                     "command": " ".join([".venv/bin/python", os.path.relpath(sys.argv[0], HERE.parent), *sys.argv[1:]]),
                     "spec": spec, "machine": machine_info(torch.device("cpu")), "loadavg_start": os.getloadavg()[0], "rows": {}}
    with tempfile.TemporaryDirectory(prefix="mgll-large-batch-") as tmp:
        data = Path(tmp) / "fundus"
        make_synthetic(data, kind="fundus", n=spec["batch"], size=spec["size"], seed=0)
        rows = results["rows"]
        rows["plain16"] = run_row("plain16", spec, data)
        rows["accum256"] = run_row("accum256", spec, data)
        p16 = rows["plain16"]
        need = p16["rss_before_step2_mb"] + 1.3 * p16["step2_above_pre_mb"] * spec["batch"] / spec["micro"]
        if need < 0.8 * _available_mb():
            rows["plain256"] = run_row("plain256", spec, data)
        else:
            rows["plain256"] = {"skipped": f"needs ~{need:.0f} MB, {_available_mb():.0f} MB available"}
    base = rows["plain16"]
    results["ratios"] = {
        name: {"peak": x["peak_rss_mb"] / base["peak_rss_mb"], "increment": x["step2_above_pre_mb"] / base["step2_above_pre_mb"],
               "time": x["cpu_ms_per_sample"] / base["cpu_ms_per_sample"]}
        for name, x in rows.items() if name != "plain16" and "skipped" not in x
    }
    results["memory_ratio"] = results["ratios"]["accum256"]["peak"]
    results["time_ratio"] = results["ratios"]["accum256"]["time"]
    if "losses" in rows["plain256"]:
        big = rows["plain256"]
        results["accum_over_plain_large"] = {"peak": rows["accum256"]["peak_rss_mb"] / big["peak_rss_mb"],
                                             "time": rows["accum256"]["cpu_ms_per_sample"] / big["cpu_ms_per_sample"]}
        results["loss_agreement"] = abs(rows["plain256"]["losses"][0] - rows["accum256"]["losses"][0])
    results["wall_s"] = time.perf_counter() - t_all
    results["loadavg_end"] = os.getloadavg()[0]
    (out / "large_batch.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    write_markdown(out / "large_batch.md", results)
    print(f"memory ratio: {results['memory_ratio']:.2f}\ntime ratio: {results['time_ratio']:.2f}\nwrote {out / 'large_batch.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
