"""``mgll build-xray``, ``build-fundus``, ``merge`` and ``check-data``; ``register(subparsers)`` wires them into mgll.cli."""

from __future__ import annotations

import argparse
from pathlib import Path

from .check_data import register as register_check_data

__all__ = ["register"]


def _print_summary(summary: dict, out) -> None:
    print(
        f"{out}: {summary['records']} records, {summary['patients']} patients, splits {summary['splits']}, "
        f"rejected {summary['rejected_total']} {summary['rejected'] or ''}"
    )
    print(f"summary: {out}/summary.md, {out}/summary.json, {out}/label_frequencies.png")


def _cmd_build_xray(args: argparse.Namespace) -> int:
    from .build_xray import build_xray, locate_rejected

    if args.show_rejected:
        for path, reason, detail in locate_rejected(args.src, args.out, salt_file=args.salt_file):
            print(f"{path}\t{reason}\t{detail}")
        return 0
    summary = build_xray(
        args.src, args.out, size=args.size, bits=args.bits, modalities=args.modalities.split(","),
        missing=args.missing, split=args.split, seed=args.seed, workers=args.workers, salt_file=args.salt_file,
        retry_rejected=args.retry_rejected, restart=args.restart, progress=not args.no_progress, name=args.name,
        max_pixels=args.max_pixels,
    )
    _print_summary(summary, args.out)
    return 0


def _cmd_build_fundus(args: argparse.Namespace) -> int:
    from .build_fundus import build_fundus

    summary = build_fundus(
        args.src, args.out, fmt=args.format, size=args.size, crop=not args.no_crop, split=args.split,
        seed=args.seed, workers=args.workers, retry_rejected=args.retry_rejected, restart=args.restart,
        strict_vocab=args.strict_vocab, progress=not args.no_progress, name=args.name, max_pixels=args.max_pixels,
    )
    _print_summary(summary, args.out)
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .merge import merge_datasets

    summary = merge_datasets(args.inputs, args.out, resplit=args.split, seed=args.seed, name=args.name,
                             overwrite=args.overwrite)
    _print_summary(summary, args.out)
    print(f"duplicates dropped: {summary['duplicates_dropped']}, patients reconciled: {summary['patients_resplit']}")
    return 0


def _cmd_shard(args: argparse.Namespace) -> int:
    from .shards import write_shards

    m = write_shards(args.dataset, args.out, shard_size=args.shard_size, seed=args.seed, overwrite=args.overwrite,
                     progress=not args.no_progress)
    pattern = Path(args.out) / ("{000000.." + f"{m['n_shards'] - 1:06d}" + "}.tar")
    print(f"wrote {m['n_samples']} samples in {m['n_shards']} shards to {args.out} (splits {m['splits']}); "
          f"train from data.path={pattern}")
    return 0


def _common(p: argparse.ArgumentParser, size_help: str) -> None:
    p.add_argument("--size", type=int, default=512, help=size_help)
    p.add_argument("--split", default=None, help="patient-level split fractions, default train=0.8,val=0.1,test=0.1")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--retry-rejected", action="store_true", help="on resume, try previously rejected files again")
    p.add_argument("--restart", action="store_true", help="discard earlier progress in OUT and rebuild")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--max-pixels", default=None,
                   help="pixel budget per image, checked before decoding; larger files are rejected as too_large "
                        "(default: MGLL_MAX_PIXELS, else 40M)")


def register(subparsers) -> None:
    p = subparsers.add_parser("build-xray", help="build MGLL-Xray records from a folder of DICOM files")
    p.add_argument("src", help="folder searched recursively for DICOM files (any extension)")
    p.add_argument("out", help="output dataset folder (re-running resumes)")
    _common(p, "longest image side in pixels (aspect kept)")
    p.add_argument("--bits", type=int, choices=[8, 16], default=8, help="PNG bit depth")
    p.add_argument("--modalities", default="CR,DX", help="comma-separated modality codes to keep")
    p.add_argument("--missing", choices=["unknown", "skip"], default="unknown",
                   help="empty Study/SeriesDescription: label it 'unknown' or reject the file")
    p.add_argument("--salt-file", default=None,
                   help="secret salt for patient hashes, kept outside OUT (default ~/.config/mgll/deid_salt)")
    p.add_argument("--name", default="mgll-xray", help="dataset name in the card")
    p.add_argument("--show-rejected", action="store_true",
                   help="print the source paths of rejected files (terminal only; OUT never stores paths)")
    p.set_defaults(func=_cmd_build_xray)

    p = subparsers.add_parser("build-fundus", help="build MGLL-Fundus records from a public fundus release")
    p.add_argument("src", help="the release folder as downloaded")
    p.add_argument("out", help="output dataset folder (re-running resumes)")
    p.add_argument("--format", default="auto",
                   choices=["auto", "rfmid", "odir", "adam", "refuge", "idrid", "folder", "csv"])
    _common(p, "longest image side in pixels after the border crop (0 keeps the size)")
    p.add_argument("--no-crop", action="store_true", help="keep the black border around the fundus")
    p.add_argument("--strict-vocab", action="store_true", help="reject images with a label the vocabulary lacks")
    p.add_argument("--name", default=None, help="dataset name in the card (default mgll-fundus-FORMAT)")
    p.set_defaults(func=_cmd_build_fundus)

    p = subparsers.add_parser("merge", help="merge built datasets: source tags, duplicates dropped, leak-free splits")
    p.add_argument("inputs", nargs="+", help="dataset folders, optionally NAME=FOLDER to set the source tag")
    p.add_argument("out", help="output dataset folder")
    p.add_argument("--split", default=None, help="re-split every patient with these fractions (default: keep)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="mgll-merged")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=_cmd_merge)

    p = subparsers.add_parser("shard", help="write a dataset folder as WebDataset tar shards (+ card, manifest); resumable")
    p.add_argument("dataset", help="dataset folder (card + records.jsonl)")
    p.add_argument("out", help="output folder for {000000..}.tar, dataset.json and manifest.json (re-running resumes)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0, help="seed of the one shuffle of the records before they are cut")
    p.add_argument("--overwrite", action="store_true", help="replace the shards in OUT")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_shard)

    register_check_data(subparsers)
