"""``mgll probe`` and ``mgll compare``; :func:`register` adds them to the ``mgll`` parser."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def _cmd_probe(args: argparse.Namespace) -> int:
    from mgll.evaluate.probe import run_probe

    report = run_probe(
        args.encoder,
        args.data,
        args.level,
        classes=args.classes,
        fractions=args.fraction,
        head=args.head,
        bootstrap=args.bootstrap,
        seed=args.seed,
        out=args.out,
        pretrained=args.pretrained,
        cache_dir=args.cache_dir,
        device=args.device,
        batch_size=args.batch_size,
        splits=(args.train_split, args.val_split, args.test_split),
        progress=not args.no_progress,
    )
    for w in report["warnings"]:
        print(f"warning: {w}")
    print(open(report["paths"]["md"], encoding="utf-8").read())
    print(f"wrote {report['paths']['json']} and {report['paths']['md']}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    if args.seed_runs or args.vs:
        if args.runs:
            raise ValueError("give runs either positionally or as --runs A1 A2 ... --vs B1 B2 ..., not both")
        if not (args.seed_runs and args.vs):
            raise ValueError("--runs and --vs go together (one B run per A run, same seed)")
        from mgll.evaluate.compare_seeds import compare_seeds

        res = compare_seeds(args.seed_runs, args.vs, args.out, labels=args.labels, title=args.title,
                            bootstrap=args.bootstrap, seed=args.seed)
    else:
        if not args.runs:
            raise ValueError("no runs given")
        from mgll.evaluate.compare import compare_runs

        res = compare_runs(args.runs, args.out, labels=args.labels, title=args.title, bootstrap=args.bootstrap, seed=args.seed)
    print(res["markdown"])
    print(f"wrote {res['json']}, {res['md']} and {res['png']}")
    return 0


def _cmd_export_clip_benchmark(args: argparse.Namespace) -> int:
    from mgll.evaluate.clip_benchmark import export_clip_benchmark

    spec = export_clip_benchmark(args.data, args.level, args.out, classes=args.classes, templates=args.template or (),
                                 splits=args.split, overwrite=args.overwrite)
    counts = ", ".join(f"{k} {v['images']}" for k, v in spec["splits"].items())
    print(f"wrote {args.out}: level {args.level!r} ({spec['kind']}, {len(spec['classes'])} classes), {counts}"
          + (f"; skipped {len(spec['skipped'])} unreadable image(s)" if spec["skipped"] else ""))
    print(f"run: clip_benchmark eval --dataset wds/{spec['dataset_name']} --dataset_root {args.out} --model local-dir:ENCODER "
          "--pretrained mgll --task zeroshot_classification (or linear_probe --train_split train --val_split val)")
    return 0


def _fraction(s: str) -> float:
    v = float(s)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"fraction must be in (0, 1], got {s}")
    return v


def register(subparsers) -> None:
    p = subparsers.add_parser("probe", help="linear probe of a frozen encoder on one level of a dataset")
    p.add_argument("--encoder", required=True, help="run folder, saved encoder folder or open_clip architecture")
    p.add_argument("--pretrained", help="open_clip pretrained tag or weights file, for an architecture name")
    p.add_argument("--data", required=True, help="dataset folder (records + card)")
    p.add_argument("--level", required=True, help="label level to classify (binary / multi-class / multi-label is detected)")
    p.add_argument("--classes", nargs="+", help="restrict the task to these classes")
    p.add_argument("--fraction", nargs="+", type=_fraction, default=[1.0], help="training fractions, e.g. 0.01 0.1 1.0")
    p.add_argument("--head", choices=["logreg", "linear"], default="logreg")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for the 95%% CIs (0 = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder for metrics.json / metrics.md")
    p.add_argument("--cache-dir", help="feature cache folder (default <data>/.mgll_cache)")
    p.add_argument("--device", help="torch device (default cuda if available)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument("--test-split", default="test")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_probe)

    p = subparsers.add_parser("export-clip-benchmark",
                              help="one single-label level of a dataset as a CLIP_benchmark WebDataset folder (wds/NAME)")
    p.add_argument("data", help="dataset folder (records + card)")
    p.add_argument("--level", required=True, help="a binary or multi-class level")
    p.add_argument("--classes", nargs="+", help="restrict the task to these classes (records with none are left out)")
    p.add_argument("--template", action="append", metavar="TEXT",
                   help="extra zero-shot template with {} for the class, after the card's (repeatable)")
    p.add_argument("--split", nargs="+", default=["train", "val", "test"], help="splits to write (default: train val test)")
    p.add_argument("--out", required=True, help="output folder (pass it as clip_benchmark's --dataset_root)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.set_defaults(func=_cmd_export_clip_benchmark)

    p = subparsers.add_parser(
        "compare", help="put evaluation runs side by side (table + bar chart) with paired bootstrap CIs of the differences"
    )
    p.add_argument("runs", nargs="*", help="evaluation folders (or their metrics.json); Δ is against the first")
    p.add_argument("--runs", dest="seed_runs", nargs="+", metavar="A", help="several seeds of recipe A (use with --vs)")
    p.add_argument("--vs", nargs="+", metavar="B", help="the same seeds of recipe B, in the same order as --runs")
    p.add_argument("--out", required=True, help="output folder for metrics.json / metrics.md / compare.png")
    p.add_argument("--labels", nargs="+", help="column names, one per run, or one per arm with --runs/--vs "
                                               "(default: each run's encoder label; A and B)")
    p.add_argument("--title", default="Encoder comparison")
    p.add_argument("--bootstrap", type=int, default=None,
                   help="paired bootstrap replicates (default: the first run's own; 0 = no CIs)")
    p.add_argument("--seed", type=int, default=None, help="paired bootstrap seed (default: the first run's own)")
    p.set_defaults(func=_cmd_compare)
