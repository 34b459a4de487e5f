"""``mgll zeroshot`` and ``mgll finetune`` sub-commands (wired into ``mgll.cli`` by ``register``)."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register"]


def _cmd_zeroshot(args: argparse.Namespace) -> int:
    from mgll.evaluate.reports import write_report
    from mgll.evaluate.zeroshot import write_scores_csv, zeroshot

    results, report = zeroshot(
        args.encoder,
        args.data,
        levels=args.level,
        classes=args.classes,
        templates=args.template or (),
        split=args.split,
        hierarchical=args.hierarchical,
        multilabel_score=args.multilabel_score,
        pretrained=args.pretrained,
        batch_size=args.batch_size,
        bootstrap=args.bootstrap,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
    )
    out = Path(args.out)
    for lv, res in results.items():
        report["levels"][lv]["scores_csv"] = str(write_scores_csv(out / f"scores-{lv}.csv", res))
    title = f"Zero-shot: {report['label']} on {report['dataset_name']}" + (" (hierarchical)" if args.hierarchical else "")
    json_path, md_path = write_report(out, report, title)
    for lv, res in results.items():
        m = res.metrics
        auc = "undefined" if m["macro_auc"] is None else f"{m['macro_auc']:.4f}"
        print(f"{lv:>14s} ({res.task.kind}, {len(res.task.classes)} classes): macro AUC {auc}  accuracy {m['accuracy']:.4f}")
    if report["skipped"]:
        print(f"skipped {len(report['skipped'])} unreadable image(s); listed in {json_path}")
    print(f"wrote {json_path} and {md_path}")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from mgll.evaluate.finetune import finetune

    m = finetune(
        args.encoder,
        args.data,
        args.level,
        args.out,
        classes=args.classes,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        device=args.device,
        pretrained=args.pretrained,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        head_init=args.head_init,
        patience=args.patience,
        seed=args.seed,
        bootstrap=args.bootstrap,
        num_workers=args.num_workers,
        precision=args.precision,
    )
    t = m["results"]["finetune"]
    auc = "undefined" if t["macro_auc"] is None else f"{t['macro_auc']:.4f}"
    print(f"best epoch {m['best_epoch']} of {m['epochs_run']} ({m['monitor']}); test macro AUC {auc}, accuracy {t['accuracy']:.4f}")
    print(f"wrote {Path(args.out) / 'metrics.json'}, metrics.md and history.png")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("zeroshot", help="classify each level of a dataset from text prompts (no training)")
    p.add_argument("--encoder", required=True, help="run folder, saved encoder folder or open_clip architecture")
    p.add_argument("--pretrained", help="open_clip pretrained tag or weights file (open_clip architectures only)")
    p.add_argument("--data", required=True, help="dataset folder (card + records.jsonl)")
    p.add_argument("--level", action="append", help="level to evaluate (repeatable; default: every level of the card)")
    p.add_argument("--classes", nargs="+", help="restrict the (single) --level to these classes")
    p.add_argument("--template", action="append", metavar="TEXT",
                   help="extra prompt template with {} for the class, ensembled with the card's (repeatable)")
    p.add_argument("--split", default="test")
    p.add_argument("--hierarchical", action="store_true", help="bound each fine label's score by its coarse parent's")
    p.add_argument("--multilabel-score", choices=["auto", "softmax", "sigmoid"], default="auto",
                   help="per-class score for multi-label levels (auto: sigmoid if the encoder has a logit bias)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for 95%% CIs (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--out", required=True, help="report folder (metrics.json, metrics.md, scores-LEVEL.csv)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_zeroshot)

    p = subparsers.add_parser("finetune", help="fine-tune the visual tower + a linear head on one level, early-stopped")
    p.add_argument("--encoder", required=True, help="run folder, saved encoder folder or open_clip architecture")
    p.add_argument("--pretrained", help="open_clip pretrained tag or weights file (open_clip architectures only)")
    p.add_argument("--data", required=True, help="dataset folder with train/val/test splits")
    p.add_argument("--level", required=True, help="the level that defines the task")
    p.add_argument("--classes", nargs="+", help="restrict the task to these classes")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--head-init", choices=["probe", "random"], default="probe",
                   help="probe: fit the head on frozen features before fine-tuning (LP-FT); random: plain FT")
    p.add_argument("--patience", type=int, default=3, help="epochs without a better validation macro AUC before stopping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for the test CIs (0: none)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 autocast on GPUs that have it")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--out", required=True, help="fine-tune folder (checkpoints/, best/, history.jsonl, metrics.json)")
    p.add_argument("--resume", action="store_true", help="continue from the folder's latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="discard a previous fine-tune in --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_finetune)
