"""The ``mgll`` command: one sub-command per job, each a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import os
import sys

from mgll.quickstart import (  # constants only: the module imports torch lazily
    MCQ_PER_DISEASE,
    QUICKSTART_SPLITS,
)

__all__ = ["main", "build_parser"]


def _cmd_synth(args: argparse.Namespace) -> int:
    from mgll.data.synthetic import make_synthetic

    ds = make_synthetic(
        args.out, kind=args.kind, n=args.n, size=args.size, seed=args.seed, workers=args.workers, overwrite=args.overwrite
    )
    print(f"wrote {len(ds.records)} {args.kind} records to {ds.root} (splits: {ds.splits()})")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mgll.encoder.config import load_config
    from mgll.encoder.trainer import train

    overrides = list(args.set or [])
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.out:
        overrides.append(f"output_dir={args.out}")
    if args.loss:
        overrides.append(f"loss.name={args.loss}")
    if args.model:
        overrides.append(f"model.name={args.model}")
    if args.deepspeed:
        overrides.append(f"deepspeed={args.deepspeed}")
    cfg = load_config(args.config, overrides)
    run = train(cfg, resume=args.resume, progress=not args.no_progress, allow_config_change=args.allow_config_change)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run folder: {run}\nencoder: {run / 'encoder'}  (open_clip: create_model_and_transforms('local-dir:{run / 'encoder'}'))")
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    import importlib.util

    from mgll.quickstart import run_quickstart

    if args.mcq_steps > 0 and importlib.util.find_spec("peft") is None:  # stage 2 of the MCQ swap trains LoRA
        raise ValueError("the quickstart's MCQ stage trains LoRA with peft, which is not installed: "
                         "bash scripts/setup.sh (it installs the mllm extra) or pip install 'mgll[mllm]'; "
                         "--mcq-steps 0 skips the stage")
    run_quickstart(
        args.out, n_images=args.n, steps=args.steps, seed=args.seed, progress=not args.no_progress,
        probe_bootstrap=args.probe_bootstrap, mcq_steps=args.mcq_steps, lm_steps=args.lm_steps,
        splits=tuple(args.splits), mcq_per_disease=args.mcq_per_disease,
    )
    return 0


def _cmd_card(args: argparse.Namespace) -> int:
    from mgll.model_card import add_results, read_figures

    path = add_results(args.folder, args.results)
    print(f"wrote {path}: {len(read_figures(args.results))} figure(s) from {len(args.results)} report(s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mgll", description="Multi-Granular Language Learning for medical imaging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic multi-granular dataset (fundus-like or X-ray-like)")
    p.add_argument("out", help="output dataset folder")
    p.add_argument("--kind", choices=["fundus", "xray"], default="fundus")
    p.add_argument("--n", type=int, default=400, help="number of images")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("train", help="train a CLIP / SigLIP / MGLL encoder on a records dataset")
    p.add_argument("--config", help="YAML run config (see configs/)")
    p.add_argument("--data", help="dataset folder (overrides data.path)")
    p.add_argument("--out", help="run folder (overrides output_dir)")
    p.add_argument("--loss", choices=["clip", "siglip", "mgll"], help="overrides loss.name")
    p.add_argument("--model", help="encoder architecture, mgll config or saved encoder (overrides model.name)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. train.lr=1e-3 (repeatable)")
    p.add_argument("--deepspeed", metavar="CONFIG", help="DeepSpeed ZeRO config, e.g. configs/deepspeed/zero2.json (overrides the deepspeed key)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's newest intact checkpoint")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: accept settings that differ from the run's config.yaml (recorded in config_changes.jsonl)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("quickstart", help="offline CPU demo: synthetic data, tiny MGLL and CLIP encoders")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--n", type=int, default=sum(QUICKSTART_SPLITS), help="synthetic images (all splits)")
    p.add_argument("--splits", type=float, nargs=3, default=QUICKSTART_SPLITS, metavar=("TRAIN", "VAL", "TEST"),
                   help="split proportions (default 420 600 2000: a small training set, a test split sized for the paired CI)")
    p.add_argument("--steps", type=int, default=300, help="training steps per encoder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe-bootstrap", type=int, default=200, help="bootstrap replicates for the probe CIs")
    p.add_argument("--mcq-steps", type=int, default=600,
                   help="alignment steps per tower in the MCQ stage, a third stage 1 and the rest stage 2 (0 skips it)")
    p.add_argument("--lm-steps", type=int, default=800, help="steps of the shared text-only LM (trained once, cached)")
    p.add_argument("--mcq-per-disease", type=int, default=MCQ_PER_DISEASE, help="questions kept per disease in the test bank")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_quickstart)

    p = sub.add_parser("card", help="add probe / zero-shot / MCQ figures to the model card (README.md) of a folder mgll wrote")
    p.add_argument("folder", help="encoder, run, export-hf, swap, align or export-aligned folder")
    p.add_argument("--results", nargs="+", required=True, metavar="EVAL",
                   help="mgll probe / zeroshot report folders (metrics.json) or mgll mcq run folders (results.json)")
    p.set_defaults(func=_cmd_card)

    from mgll.data.builders_cli import register as register_builders

    register_builders(sub)

    from mgll.evaluate.probe_compare_cli import register as register_probe_compare
    from mgll.evaluate.zeroshot_finetune_cli import register as register_zeroshot_finetune

    register_probe_compare(sub)

    register_zeroshot_finetune(sub)

    from mgll.adapters.cli import register as register_adapters

    register_adapters(sub)

    from mgll.mllm_eval.cli import register as register_mcq

    register_mcq(sub)

    from mgll.demo.cli import register as register_demo

    register_demo(sub)
    return parser


def offline_defaults() -> None:
    """Offline (``HF_HUB_OFFLINE``), transformers 5.2x still asks the Hub for kernels in every ``from_pretrained`` on
    CUDA and fails (found on an H200: benchmarks/results/gpu.md); keep hub kernels off unless the user set ``USE_HUB_KERNELS``."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        os.environ.setdefault("USE_HUB_KERNELS", "0")


def main(argv: list[str] | None = None) -> int:
    from mgll.encoder.finite import NonFiniteError
    from mgll.model_card import set_command

    offline_defaults()
    args = build_parser().parse_args(argv)
    set_command(sys.argv[1:] if argv is None else argv)  # the model cards record the exact command
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"mgll {args.command}: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:  # a run that diverged: not bad input, but no traceback either
        print(f"mgll {args.command}: stopped: {e}", file=sys.stderr)
        return 3
    finally:
        set_command(None)


def close_process_group() -> None:
    """Destroy the process group this process joined (``torchrun`` / ``accelerate launch``), before it exits.

    A rank that exits with its gloo group alive can abort at interpreter shutdown (SIGABRT,
    "terminate called without an active exception": gloo's worker threads still hold work whose
    tensors are freed while the interpreter is torn down; pytorch/pytorch#179291). Under
    ``torchrun`` that one abort fails the whole run after its outputs were written; it failed CI once
    on a resumed ZeRO-2 run. Reads ``sys.modules`` so that commands that never imported torch stay
    torch-free.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def entry() -> None:
    """The ``mgll`` program and ``python -m mgll.cli``: :func:`main`, then a clean exit.

    The process group is closed only here, where the process ends (in-process callers of
    ``main`` keep theirs), and only after success: after an error a collective may still be
    pending on another rank, and the error's own exit code must stand.
    """
    rc = main()
    if not rc:
        close_process_group()
    sys.exit(rc)


if __name__ == "__main__":
    entry()
