"""Questions/s of ``mgll mcq`` scoring: the shared-prefix KV cache vs one forward per option, and batch 1 vs 8.

Model: a random-init LLaVA built by ``mgll.testing.tiny.make_tiny_llava`` whose CLIP tower sees
336 px images in 14 px patches, i.e. 24x24 = 576 image tokens as LLaVA-1.5 gives the LM; the
LM is small (width/depth set below) so the run fits a CPU. Questions: a ten-disease bank
(4 options) from synthetic fundus images.

1. ``loglik`` with a reused prefix KV cache vs one full forward per option: both score the same
   questions from the same encoded prefix (image preprocessing and prompt tokenising are timed in
   both). Headline ``speedup``. Answers must be identical and log-likelihoods equal to 1e-4.
2. Question batching (``mgll mcq run --batch-size``): ``score_variant`` one question at a time vs
   ``score_variants`` on 8 at once (left-padded, one image per row), in ``loglik`` and in
   ``generate`` (greedy, 16 new tokens as ``mcq run``'s default; the random LM never stops early,
   so every question generates all 16). Everything from the prompt text and the PIL image to the
   answer row is timed. Headline ``batch speedup`` (generate). The rows must be identical
   (letters and generated texts; log-likelihoods to 1e-4), or the script fails.
3. The same on a circular bank (every question with its 4 option rotations, as many prompts as
   above): a batch of 8 holds 2 whole questions, whose rotations run their common prefix (image +
   question) once (``mgll.mllm_eval.shared_prefix``). Headline ``batch speedup, circular bank``
   (generate); identical rows required as above.

Rounds alternate the settings (fast, naive, then loglik b1, b8, generate b1, b8), and each setting's
median round is reported, so a burst of load from other users hits all settings alike.

    .venv/bin/python benchmarks/mcq_throughput.py --out benchmarks/results
    .venv/bin/python benchmarks/mcq_throughput.py --quick --out /tmp/bench   # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mgll.data import FUNDUS_DISEASES, make_synthetic  # noqa: E402
from mgll.data.question_bank import QUESTION, build_bank  # noqa: E402
from mgll.io import atomic_write_json, atomic_write_text  # noqa: E402
from mgll.mllm_eval.scoring import (  # noqa: E402
    build_prompt,
    encode_prefix,
    format_question,
    load_model,
    naive_option_logliks,
    option_logliks,
    option_text,
    score_variant,
    score_variants,
)
from mgll.mllm_eval.shared_prefix import common_prefix_length  # noqa: E402
from mgll.testing.tiny import make_tiny_llava  # noqa: E402


def _score_all(method, model, processor, items, device):
    """(seconds, scores per question) for scoring every question with ``method``."""
    tok = processor.tokenizer
    out = []
    t0 = time.perf_counter()
    for image, options in items:
        prompt = build_prompt("llava", processor, format_question(QUESTION, options))
        prefix = encode_prefix(processor, prompt, image, device, torch.float32)
        ids = [tok(option_text(i, o), add_special_tokens=False)["input_ids"] for i, o in enumerate(options)]
        if method == "fast":
            s = option_logliks("llava", model, prefix, ids, pad_id=tok.pad_token_id)
        else:
            s = naive_option_logliks(model, prefix, ids)
        out.append(s)
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def _score_batched(mode, batch, model, processor, bank, variants, images, device, max_new_tokens):
    """(seconds, answer rows) for scoring every variant ``batch`` at a time, as ``mgll mcq run --batch-size`` does."""
    rows = []
    t0 = time.perf_counter()
    for i in range(0, len(variants), batch):
        vs, ims = variants[i : i + batch], images[i : i + batch]
        if batch == 1:
            rows.append(score_variant("llava", model, processor, bank, vs[0], ims[0], mode, max_new_tokens, device))
        else:
            rows += score_variants("llava", model, processor, bank, vs, ims, mode, max_new_tokens, device)
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, rows


def _same_rows(a, b) -> tuple[bool, float]:
    """(same letters and texts, max |log-likelihood difference|) of two runs' answer rows."""
    same = all(x["pred_index"] == y["pred_index"] and x.get("text") == y.get("text") for x, y in zip(a, b))
    diff = max((abs(p - q) for x, y in zip(a, b) for p, q in zip(x.get("scores", []), y.get("scores", []))), default=0.0)
    return same and len(a) == len(b), diff


def _batching(model, processor, bank, variants, images, args, modes=("loglik", "generate")) -> dict:
    """Batch 1 vs ``args.batch`` in ``modes`` on one model: alternating rounds, medians, answers compared."""
    settings = [(m, b) for m in modes for b in (1, args.batch)]
    for m, b in settings:  # warm-up
        _score_batched(m, b, model, processor, bank, variants[: args.batch], images[: args.batch], args.device,
                       args.max_new_tokens)
    times: dict[str, list[float]] = {f"{m}_b{b}": [] for m, b in settings}
    rows: dict[str, list] = {}
    for _ in range(args.rounds):
        for m, b in settings:
            dt, r = _score_batched(m, b, model, processor, bank, variants, images, args.device, args.max_new_tokens)
            times[f"{m}_b{b}"].append(dt)
            rows[f"{m}_b{b}"] = r
    qps = {k: len(variants) / statistics.median(t) for k, t in times.items()}
    return {
        "prompts": len(variants),
        "seconds": times,
        "questions_per_s": qps,
        "speedup": {m: qps[f"{m}_b{args.batch}"] / qps[f"{m}_b1"] for m in modes},
        "checks": {m: _same_rows(rows[f"{m}_b1"], rows[f"{m}_b{args.batch}"]) for m in modes},
    }


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--questions", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--text-width", type=int, default=512, help="LM width; the wider, the more the prefix dominates, as in LLaVA-1.5")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vision-width", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads; 1 by default: on a shared 2-core box two threads ran 10-30x slower")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8, help="questions per forward in the batching comparison")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="generate mode (mcq run's default)")
    ap.add_argument("--quick", action="store_true", help="8 questions, 1 round")
    args = ap.parse_args(argv)
    if args.quick:
        args.questions, args.rounds = 8, 1
    torch.set_num_threads(args.threads)
    started = time.time()
    load_before = _load()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ds = make_synthetic(tmp / "fundus", n=max(2 * args.questions, 40), size=64, seed=0)
        bank = build_bank(ds, k=4, seed=0)
        words = [QUESTION, " ".join(FUNDUS_DISEASES),
                 "a b c d . answer with the option's letter from the given choices directly user assistant :"]
        make_tiny_llava(tmp / "llava", words, vision_width=args.vision_width, image_size=336, patch_size=14,
                        text_width=args.text_width, layers=args.layers)
        model, processor = load_model("llava", tmp / "llava", device=args.device)
        n_img = int(model.config.image_seq_length)
        assert n_img == 576, n_img
        items = []
        for q in bank.questions[: args.questions]:
            with Image.open(bank.image_path(q)) as im:
                items.append((im.convert("RGB"), list(q.options)))
        _score_all("fast", model, processor, items[:2], args.device)  # warm-up
        _score_all("naive", model, processor, items[:2], args.device)
        times: dict[str, list[float]] = {"fast": [], "naive": []}
        scores: dict[str, list] = {}
        for _ in range(args.rounds):
            for method in ("fast", "naive"):
                dt, s = _score_all(method, model, processor, items, args.device)
                times[method].append(dt)
                scores[method] = s
        prompt_len = encode_prefix(processor, build_prompt("llava", processor, format_question(QUESTION, items[0][1])),
                                   items[0][0], "cpu", torch.float32)["input_ids"].shape[1]

        # question batching: the same questions, one at a time vs args.batch per forward, both modes
        variants = [q.variants(False)[0] for q in bank.questions[: args.questions]]
        images = [im for im, _ in items]
        batching = {"llava15": _batching(model, processor, bank, variants, images, args)}
        # a circular bank: the same number of prompts as every rotation of a quarter of the questions; a batch holds
        # whole questions, whose rotations run their common prefix (image + question) once (mcq.shared_prefix)
        circ = dataclasses.replace(bank, circular=True)
        per_q = [(v, im) for q, im in zip(circ.questions[: max(1, args.questions // 4)], images) for v in q.variants(True)]
        batching["circular"] = _batching(model, processor, circ, [v for v, _ in per_q], [im for _, im in per_q], args)
        rot = [encode_prefix(processor, build_prompt("llava", processor, format_question(QUESTION, v.options)), per_q[0][1],
                             "cpu", torch.float32)["input_ids"][0] for v, _ in per_q[:4]]
        batching["circular"]["prefix_tokens"] = common_prefix_length(rot)
        # the same on an LM whose per-call cost is overhead rather than arithmetic (16 image tokens, 64 wide)
        make_tiny_llava(tmp / "small", words, vision_width=32, image_size=56, patch_size=14, text_width=64, layers=2)
        small, small_proc = load_model("llava", tmp / "small", device=args.device)
        batching["small"] = _batching(small, small_proc, bank, variants, images, args)
        small_info = {"image_tokens": int(small.config.image_seq_length), "params": sum(p.numel() for p in small.parameters()),
                      "prompt_tokens": encode_prefix(small_proc, build_prompt("llava", small_proc, format_question(
                          QUESTION, items[0][1])), items[0][0], "cpu", torch.float32)["input_ids"].shape[1]}
    fast, naive = torch.stack(scores["fast"]), torch.stack(scores["naive"])
    max_diff = float((fast - naive).abs().max())
    same = bool(torch.equal(fast.argmax(1), naive.argmax(1)))
    if not same or max_diff > 1e-4:
        print(f"FAIL: answers identical={same}, max |loglik diff|={max_diff:.2e}", file=sys.stderr)
        return 1
    for name, bt in batching.items():
        for m, (ok, diff) in bt["checks"].items():
            if not ok or diff > 1e-4:
                print(f"FAIL: {name} {m} batch {args.batch} vs 1: identical answers={ok}, max |loglik diff|={diff:.2e}",
                      file=sys.stderr)
                return 1
    n = len(items)
    bspeed = batching["llava15"]["speedup"]
    load_after = _load()
    qps = {m: n / statistics.median(t) for m, t in times.items()}
    speedup = qps["fast"] / qps["naive"]
    n_params = sum(p.numel() for p in model.parameters())
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "benchmarks/mcq_throughput.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": args.device,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": {"image_tokens": n_img, "image_size": 336, "patch_size": 14, "vision_width": args.vision_width,
                  "text_width": args.text_width, "layers": args.layers, "params": n_params, "prompt_tokens": prompt_len},
        "questions": n,
        "options": 4,
        "rounds": args.rounds,
        "seconds": times,
        "questions_per_s": qps,
        "speedup": speedup,
        "identical_answers": same,
        "max_abs_loglik_diff": max_diff,
        "batching": {
            "batch_size": args.batch,
            "max_new_tokens": args.max_new_tokens,
            "small_model": small_info,
            **{name: {"seconds": bt["seconds"], "questions_per_s": bt["questions_per_s"], "batch_speedup": bt["speedup"],
                      "identical_answers": {m: c[0] for m, c in bt["checks"].items()},
                      "max_abs_loglik_diff": bt["checks"].get("loglik", (None, None))[1],
                      **({"prefix_tokens": bt["prefix_tokens"]} if "prefix_tokens" in bt else {})} for name, bt in batching.items()},
        },
        "load_avg_1_5_15": {"before": load_before, "after": load_after},
        "total_s": time.time() - started,
    }
    B = args.batch

    def brow(name, m, b, how):
        bt = batching[name]
        t = bt["seconds"][f"{m}_b{b}"]
        return (f"| {m} | {b} | {how} | {statistics.median(t):.3f} | {', '.join(f'{x:.3f}' for x in t)} | "
                f"{bt['questions_per_s'][f'{m}_b{b}']:.2f} |")

    def btable(name):
        bt = batching[name]
        (lok, ldiff), (gok, _) = bt["checks"]["loglik"], bt["checks"]["generate"]
        return [
            "| mode | batch | per forward | median s | all rounds s | questions/s |",
            "|---|---|---|---|---|---|",
            brow(name, "loglik", 1, "1 prompt, its 4 options"),
            brow(name, "loglik", B, f"{B} prompts left-padded, {4 * B} options"),
            brow(name, "generate", 1, f"1 prompt, {args.max_new_tokens} greedy tokens"),
            brow(name, "generate", B, f"{B} prompts left-padded, {args.max_new_tokens} greedy tokens each"),
            "",
            f"Batch {B} vs 1: loglik {bt['speedup']['loglik']:.2f}x, generate {bt['speedup']['generate']:.2f}x. "
            f"Identical letters (and generated texts) on all {n} questions: loglik {lok}, generate {gok}; "
            f"max |log-likelihood difference| {ldiff:.2e}.",
        ]

    def ctable():
        bt = batching["circular"]
        (lok, ldiff), (gok, _) = bt["checks"]["loglik"], bt["checks"]["generate"]
        nq = bt["prompts"]
        return [
            "| mode | batch | per forward | median s | all rounds s | prompts/s |",
            "|---|---|---|---|---|---|",
            brow("circular", "loglik", 1, "1 prompt, its 4 options"),
            brow("circular", "loglik", B, f"{B // 4} questions x 4 rotations, prefix once per question, {4 * B} options"),
            brow("circular", "generate", 1, f"1 prompt, {args.max_new_tokens} greedy tokens"),
            brow("circular", "generate", B, f"{B // 4} questions x 4 rotations, prefix once per question"),
            "",
            f"Batch {B} vs 1: loglik {bt['speedup']['loglik']:.2f}x, generate {bt['speedup']['generate']:.2f}x. "
            f"Identical letters (and generated texts) on all {nq} prompts: loglik {lok}, generate {gok}; "
            f"max |log-likelihood difference| {ldiff:.2e}.",
        ]

    main_bt = batching["llava15"]["seconds"]
    decode_share = 1 - statistics.median(main_bt["loglik_b1"]) / statistics.median(main_bt["generate_b1"])
    md = [
        "# MCQ throughput: shared-prefix KV cache vs one forward per option; question batching 1 vs "
        f"{B}",
        "",
        f"speedup: {speedup:.2f}",
        f"batch speedup: {bspeed['generate']:.2f}",
        f"batch speedup, circular bank: {batching['circular']['speedup']['generate']:.2f}",
        "",
        f"(`speedup`: loglik, KV cache vs naive, issue target >= 3x: {'met' if speedup >= 3 else 'not met'}; "
        f"`batch speedup`: generate, batch {B} vs 1 on that model, issue 16 target >= 3 on CPU: "
        f"{'met' if bspeed['generate'] >= 3 else 'not met'}; loglik {bspeed['loglik']:.2f}; on the small model "
        f"generate {batching['small']['speedup']['generate']:.2f}, loglik {batching['small']['speedup']['loglik']:.2f}; "
        f"`batch speedup, circular bank`: generate, batch {B} vs 1, a question's {4} rotations in one batch running "
        f"their common prefix once: {'met' if batching['circular']['speedup']['generate'] >= 3 else 'not met'}; "
        f"loglik there {batching['circular']['speedup']['loglik']:.2f})",
        "",
        f"- date: {result['date']}",
        f"- command: `{result['command']}`",
        f"- machine: {result['cpus']} CPUs, torch threads {result['torch_threads']}, device {args.device}; "
        f"torch {torch.__version__}, Python {result['python']}",
        f"- model: random-init LLaVA, CLIP tower 336 px / patch 14 -> {n_img} image tokens, vision width "
        f"{args.vision_width}, Llama LM width {args.text_width}, {args.layers} layers each, {n_params / 1e6:.1f} M params; "
        f"prompt {prompt_len} tokens (image included)",
        f"- {n} questions x 4 options, {args.rounds} alternating rounds, median round per method "
        "(image preprocessing and tokenising timed in both)",
        f"- machine load (1/5/15-min load average; 2 cores shared with other users): {load_before} before, "
        f"{load_after} after",
        "",
        f"## Question batching (`mgll mcq run --batch-size {B}`): the model above",
        "",
        *btable("llava15"),
        "",
        f"At batch 1, loglik (one prefix forward + one small option forward) takes {1 - decode_share:.0%} of generate's "
        f"time, so ~{decode_share:.0%} of a generate question is the {args.max_new_tokens} decode steps. On one CPU "
        "thread the prefix forward (image tokens + prompt through the LM) is arithmetic-bound: its matrix products "
        "already run at full speed on one row of ~600 tokens, so stacking 8 rows saves nothing there (the padding "
        "mask even costs a few percent in attention); batching only shares the per-call cost of the decode steps "
        "and the option forward.",
        "",
        f"## Question batching on a small model ({small_info['image_tokens']} image tokens, LM 64 wide x 2 layers, "
        f"{small_info['params'] / 1e6:.2f} M params, prompt {small_info['prompt_tokens']} tokens)",
        "",
        "Here per-call overhead (Python, generation bookkeeping, many small kernels) outweighs the arithmetic, and "
        "that overhead is what batching shares out. (A GPU running a 7B model at batch 1 is in a similar regime, "
        "mostly idle per call, but this script has not measured one.)",
        "",
        *btable("small"),
        "",
        f"## A circular bank (every question asked with its 4 option rotations), batch {B} vs 1: the model above",
        "",
        "Rotations of one question share the image and the question text, "
        f"{batching['circular']['prefix_tokens']} of {prompt_len} tokens; in a batch they run that prefix once and "
        "continue each rotation from a copy of its KV cache (`mgll.mllm_eval.shared_prefix`). Batch 1 runs every "
        "rotation's whole prompt.",
        "",
        *ctable(),
        "",
        "## Shared-prefix KV cache (`loglik`)",
        "",
        "| method | forwards per question | median s | all rounds s | questions/s |",
        "|---|---|---|---|---|",
        f"| loglik, prefix once + KV cache reused, 4 options batched | 2 | {statistics.median(times['fast']):.3f} | "
        f"{', '.join(f'{t:.3f}' for t in times['fast'])} | {qps['fast']:.2f} |",
        f"| naive, one full forward (image + prompt + option) per option | 4 | {statistics.median(times['naive']):.3f} | "
        f"{', '.join(f'{t:.3f}' for t in times['naive'])} | {qps['naive']:.2f} |",
        "",
        f"Identical answers on all {n} questions: {same}; max |log-likelihood difference| {max_diff:.2e}.",
        f"Total run time {result['total_s']:.0f} s.",
        "",
    ]
    out = Path(args.out)
    atomic_write_json(out / "mcq_throughput.json", result)
    atomic_write_text(out / "mcq_throughput.md", "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
