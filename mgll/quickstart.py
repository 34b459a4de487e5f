"""``mgll quickstart``: the whole encoder pipeline offline on CPU in a few minutes.

Synthetic fundus data, then a tiny MGLL encoder and a tiny CLIP encoder trained with the same
budget, seed and data order, so the two checkpoints differ only by the objective; finally both are
linear-probed on the test split's disease level (multi-label) and compared side by side.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from mgll.encoder.config import load_config

__all__ = ["run_quickstart", "quickstart_config"]


def quickstart_config(data: Path, out: Path, loss: str, steps: int, seed: int):
    return load_config(
        overrides=[
            f"output_dir={out}",
            f"data.path={data}",
            "model.name=mgll-tiny-vit",
            f"loss.name={loss}",
            "train.batch_size=32",
            f"train.steps={steps}",
            "train.lr=1e-3",
            f"train.warmup_steps={max(1, steps // 10)}",
            f"train.save_every={max(1, steps // 3)}",
            f"train.seed={seed}",
        ]
    )


def run_quickstart(
    out: str | Path = "runs/quickstart",
    n_images: int = 600,
    steps: int = 300,
    seed: int = 0,
    progress: bool = True,
    probe_bootstrap: int = 200,
    mcq_steps: int = 1500,
) -> dict:
    from mgll.data.synthetic import make_synthetic
    from mgll.encoder.trainer import train
    from mgll.evaluate.compare import compare_runs, compare_verdict
    from mgll.evaluate.probe import run_probe
    from mgll.mllm_eval.report import mcq_verdict
    from mgll.model_card import add_results

    out = Path(out)
    t0 = time.perf_counter()
    if not progress:  # transformers draws its own bars for every model load and save
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    data_dir = out / "data" / "synthetic-fundus"
    print(f"[1/5] synthetic fundus data: {n_images} images -> {data_dir}")
    ds = make_synthetic(data_dir, kind="fundus", n=n_images, size=64, seed=seed, overwrite=True)
    print(f"      splits {ds.splits()}, levels {list(ds.card.level_names)}")
    runs = {}
    for i, loss in enumerate(("mgll", "clip"), start=2):
        run_dir = out / f"encoder-{loss}"
        print(f"[{i}/5] training a tiny {loss.upper()} encoder ({steps} steps, batch 32) -> {run_dir}")
        train(quickstart_config(data_dir, run_dir, loss, steps, seed), progress=progress)
        runs[loss] = run_dir
    print(f"[4/5] linear probe of both encoders: disease level (multi-label), test split, {probe_bootstrap} bootstrap replicates")
    probes = {}
    for loss in ("clip", "mgll"):  # CLIP first: the comparison's deltas read "MGLL minus CLIP"
        probes[loss] = out / f"probe-{loss}"
        run_probe(
            runs[loss], ds, "disease", bootstrap=probe_bootstrap, seed=seed, out=probes[loss],
            cache_dir=out / "feature-cache", progress=progress,
        )
    for loss in probes:  # the figures go into each encoder's model card (README.md) too
        add_results(runs[loss] / "encoder", [probes[loss]])
    cmp = compare_runs(
        [probes["clip"], probes["mgll"]], out / "compare", labels=["CLIP", "MGLL"],
        title="Linear probe, synthetic fundus disease (multi-label)",
    )
    print()
    print(cmp["markdown"])
    probe_verdict = compare_verdict(cmp["comparison"])
    print(f"probe verdict (macro AUC, paired bootstrap over the test images): {probe_verdict}")
    mcq = None
    shutil.rmtree(out / "mcq", ignore_errors=True)  # from earlier encoders: the demo would reuse its finished stages
    if mcq_steps > 0:
        from mgll.mllm_eval.demo import run_mcq_demo

        print(f"[5/5] ten-disease MCQ: a tiny LLaVA with the CLIP tower and one with the MGLL tower, {mcq_steps} steps each")
        mcq = run_mcq_demo(
            out / "mcq", data_dir, runs["clip"], runs["mgll"], steps=mcq_steps, seed=seed, progress=progress
        )
        for loss in probes:  # the card of the encoder the swapped LLaVA used gets that LLaVA's MCQ figures
            if (out / "mcq" / f"mcq-{loss}" / "results.json").is_file():
                add_results(runs[loss] / "encoder", [probes[loss], out / "mcq" / f"mcq-{loss}"])
        print()
        print(mcq["table"])
        print(f"MCQ verdict (average accuracy, points; paired bootstrap over questions): {mcq_verdict(mcq)}")
    minutes = (time.perf_counter() - t0) / 60
    print(f"\nquickstart done in {minutes:.1f} min")
    print(f"  data:           {data_dir}")
    for loss, run_dir in runs.items():
        print(f"  {loss.upper():5s} encoder:  {run_dir / 'encoder'}   (metrics: {run_dir / 'metrics.jsonl'})")
    print(f"  probe reports:  {probes['clip'] / 'metrics.md'}, {probes['mgll'] / 'metrics.md'}")
    print(f"  comparison:     {cmp['md']}")
    print(f"  figure:         {cmp['png']}")
    if mcq is not None:
        print(f"  MCQ comparison: {out / 'mcq' / 'comparison' / 'comparison.md'}")
    print("  load one with open_clip:  open_clip.create_model_and_transforms('local-dir:" + str(runs["mgll"] / "encoder") + "')")
    return {
        "data": data_dir,
        **{f"encoder_{k}": v / "encoder" for k, v in runs.items()},
        **{f"probe_{k}": v for k, v in probes.items()},
        "comparison": cmp["md"],
        "figure": cmp["png"],
        "mcq": mcq,
    }
