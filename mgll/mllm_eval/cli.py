"""``mgll mcq build|run|merge|compare|export|import``; wired into ``mgll/cli.py`` with ``register(sub)``."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register"]


def _cmd_build(args: argparse.Namespace) -> int:
    from mgll.data import load_dataset
    from mgll.data.question_bank import build_bank, write_bank
    from mgll.mllm_eval.report import SHORT_NAMES

    bank = build_bank(load_dataset(args.dataset), k=args.k, seed=args.seed, split=args.split, level=args.level,
                      circular=args.circular)
    out = write_bank(bank, args.out)
    counts = ", ".join(f"{SHORT_NAMES.get(d, d)} {n}" for d, n in bank.counts().items())
    print(f"wrote {len(bank.questions)} questions ({args.k} options{', circular' if args.circular else ''}) to {out}")
    print(f"per disease: {counts}")
    if bank.skipped:
        print(f"skipped {len(bank.skipped)} records: " + "; ".join(bank.skipped[:5]) + (" ..." if len(bank.skipped) > 5 else ""))
    return 0


def _print_run(res: dict, out: str) -> None:
    from mgll.mllm_eval.report import compare_table

    print(compare_table([res]), end="")
    run = res["run"]
    shards = f" by {run['shards']} processes" if run.get("shards") else ""
    print(f"scored {run['scored_now']} prompts now{shards}, {run['cached']} from the cache; "
          f"{len(res['failures'])} extraction failures, {len(res['skipped_images'])} unreadable images")
    print(f"results: {Path(out) / 'results.json'}, {Path(out) / 'results.md'}")


def _cmd_run(args: argparse.Namespace) -> int:
    from mgll.mllm_eval.scoring import launch_env, run_mcq

    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: expected a whole number >= 1")
    res = run_mcq(
        args.host, args.model, args.bank, args.out, mode=args.mode, align_dir=args.align, data_root=args.data,
        max_new_tokens=args.max_new_tokens, device=args.device, label=args.label or Path(args.model).name,
        progress=not args.no_progress, batch_size=args.batch_size,
    )
    if launch_env()[0] == 0:  # under a launcher every process returns the merged results; one prints them
        _print_run(res, args.out)
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from mgll.data.question_bank import load_bank
    from mgll.mllm_eval.scoring import merge_run

    if not Path(args.out).is_dir():
        raise FileNotFoundError(f"{args.out}: no such run folder")
    res = merge_run(args.out, load_bank(args.bank) if args.bank else None, label=args.label)
    _print_run(res, args.out)
    return 0


def _parse_run(spec: str) -> tuple[str | None, str]:
    """``LABEL=DIR`` or ``DIR`` (a folder path may itself hold '=', so only an existing path wins)."""
    if "=" in spec and not Path(spec).exists():
        label, path = spec.split("=", 1)
        return label, path
    return None, spec


def _cmd_compare(args: argparse.Namespace) -> int:
    from mgll.mllm_eval.report import compare, load_results

    results = []
    for spec in args.runs:
        label, path = _parse_run(spec)
        res = load_results(path)
        if label:
            res["label"] = label
        results.append(res)
    summary = compare(results, args.out, bootstrap=args.bootstrap, seed=args.seed)
    print(summary["table"], end="")
    print(f"wrote {Path(args.out) / 'comparison.md'}, comparison.json, comparison.png")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    if args.format == "lmms-eval":
        from mgll.mllm_eval.lmms_eval_export import export_lmms_eval

        if args.name:
            raise ValueError("--name is the VLMEvalKit dataset name; for lmms-eval use --task-name")
        info = export_lmms_eval(args.bank, args.out, data_root=args.data, task=args.task_name,
                                max_new_tokens=args.max_new_tokens, overwrite=args.overwrite)
        print(f"wrote lmms-eval task {info['task']!r} ({info['n_questions']} questions, {info['n_docs']} prompts) to {info['out']}")
        print(f"run: lmms-eval --include_path {info['out']} --tasks {info['task']} --model llava_hf "
              "--model_args pretrained=MODEL_DIR --log_samples --output_path logs")
    else:
        from mgll.mllm_eval.vlmevalkit_export import export_vlmevalkit

        if args.task_name != DEFAULT_TASK:
            raise ValueError("--task-name is the lmms-eval task name; for VLMEvalKit use --name")
        info = export_vlmevalkit(args.bank, args.out, data_root=args.data, name=args.name, overwrite=args.overwrite)
        print(f"wrote VLMEvalKit dataset {info['dataset']!r} ({info['n_questions']} questions, {info['n_rows']} rows) "
              f"to {info['tsv']}")
        print(f"run: LMUData={Path(info['tsv']).parent} python run.py --data {info['dataset']} --model MODEL")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from mgll.mllm_eval.import_predictions import import_predictions
    from mgll.mllm_eval.report import compare_table

    res = import_predictions(args.predictions, args.bank, args.out, fmt=args.format, label=args.label,
                             overwrite=args.overwrite)
    print(compare_table([res]), end="")
    print(f"imported {res['run']['imported']} answers ({res['run']['host']}); {len(res['failures'])} extraction "
          f"failures, {len(res['unanswered'])} questions unanswered")
    print(f"results: {Path(args.out) / 'results.json'}, {Path(args.out) / 'results.md'}")
    return 0


DEFAULT_TASK = "mgll_fundus_mcq"  # mgll.mllm_eval.lmms_eval_export.DEFAULT_TASK, without importing it here


def register(sub) -> None:
    from mgll.mllm_eval.scoring import MODES

    p = sub.add_parser("mcq", help="ten-disease multiple-choice fundus QA benchmark for MLLMs (Table 2)")
    mcq = p.add_subparsers(dest="mcq_command", required=True)

    b = mcq.add_parser("build", help="write a question bank (JSONL) from a records dataset")
    b.add_argument("dataset", help="records dataset folder")
    b.add_argument("out", help="question bank file (.jsonl)")
    b.add_argument("--k", type=int, default=4, help="options per question")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--split", default=None, help="only this split (e.g. test); all records by default")
    b.add_argument("--level", default="disease", help="the dataset level holding disease names")
    b.add_argument("--circular", action="store_true", help="score every rotation of the options (right only if all are)")
    b.set_defaults(func=_cmd_build)

    r = mcq.add_parser("run", help="score a question bank on an MLLM (base or swapped); resumes an interrupted run")
    from mgll.adapters.hosts import list_hosts

    r.add_argument("--host", required=True, help=f"host family: {', '.join(list_hosts())}")
    r.add_argument("--model", required=True, help="model folder: a host checkpoint or a folder written by `mgll swap`")
    r.add_argument("--align", default=None, help="alignment run folder (`mgll align --out`) to attach to a swap folder")
    r.add_argument("--bank", required=True, help="question bank written by `mgll mcq build`")
    r.add_argument("--mode", choices=MODES, default="loglik")
    r.add_argument("--out", required=True, help="run folder: answers.jsonl, results.json, results.md")
    r.add_argument("--data", default=None, help="dataset folder, if it moved since the bank was built")
    r.add_argument("--label", default=None, help="row label in tables (default: the model folder name); "
                                                  "name a swapped run 'X + MGLL' to pair it with run 'X'")
    r.add_argument("--max-new-tokens", type=int, default=16, help="generate mode only")
    r.add_argument("--batch-size", type=int, default=1,
                   help="prompts per forward (left-padded, one image each); answers equal batch size 1's")
    r.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available; cuda:LOCAL_RANK under a launcher)")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=_cmd_run)

    m = mcq.add_parser("merge", help="merge a stopped sharded run's answers.part-*.jsonl into answers.jsonl and write "
                                     "its results (rank 0 does this itself at the end of `accelerate launch` / `torchrun`)")
    m.add_argument("out", help="run folder of `mgll mcq run`")
    m.add_argument("--bank", default=None, help="question bank (default: the one in run.json)")
    m.add_argument("--label", default=None, help="row label in tables (default: the run's current label)")
    m.set_defaults(func=_cmd_merge)

    c = mcq.add_parser("compare", help="Table 2 layout: per-disease accuracy, average and + MGLL deltas with paired "
                                     "bootstrap CIs, and a bar chart")
    c.add_argument("runs", nargs="+", metavar="[LABEL=]RUN", help="run folders (or results.json files)")
    c.add_argument("--out", required=True, help="folder for comparison.md/.json/.png")
    c.add_argument("--bootstrap", type=int, default=1000,
                   help="replicates of the paired bootstrap over questions behind each delta's 95%% CI (0 = none)")
    c.add_argument("--seed", type=int, default=0, help="seed of that bootstrap")
    c.set_defaults(func=_cmd_compare)

    e = mcq.add_parser("export", help="the bank as an lmms-eval task folder or a VLMEvalKit MCQ TSV")
    e.add_argument("bank", help="question bank written by `mgll mcq build`")
    e.add_argument("--format", required=True, choices=["lmms-eval", "vlmevalkit"])
    e.add_argument("out", help="lmms-eval: task folder (for --include_path); vlmevalkit: NAME.tsv, or a folder "
                               "($LMUData) to hold it")
    e.add_argument("--data", default=None, help="dataset folder, if it moved since the bank was built")
    e.add_argument("--task-name", default=DEFAULT_TASK, help="lmms-eval task name (--tasks)")
    e.add_argument("--name", default=None, help="VLMEvalKit dataset name (--data) when OUT is a folder "
                                                "(default MGLL_FundusMCQ, + _circular for a circular bank)")
    e.add_argument("--max-new-tokens", type=int, default=16, help="lmms-eval generation length (as `mcq run`)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    e.set_defaults(func=_cmd_export)

    i = mcq.add_parser("import", help="lmms-eval samples (.jsonl) or VLMEvalKit predictions (.xlsx/.tsv) as a run "
                                      "folder for `mgll mcq compare`")
    i.add_argument("predictions", help="lmms-eval *_samples_TASK.jsonl (--log_samples) or VLMEvalKit MODEL_NAME.xlsx/.tsv")
    i.add_argument("--bank", required=True, help="the question bank the task/TSV was exported from")
    i.add_argument("--out", required=True, help="run folder: answers.jsonl, results.json, results.md")
    i.add_argument("--format", choices=["auto", "lmms-eval", "vlmevalkit"], default="auto",
                   help="auto: .jsonl is lmms-eval, .xlsx/.tsv/.csv VLMEvalKit")
    i.add_argument("--label", default=None, help="row label in tables (default: the --out folder name)")
    i.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    i.set_defaults(func=_cmd_import)
