"""Score a question bank on an MLLM: ``loglik`` (best option by log-likelihood) or ``generate`` (greedy + extraction).

``loglik`` runs the image + question + options prefix once, copies its KV cache across the
K option continuations and scores them in one batched forward: the image tokens (576 for
LLaVA-1.5) dominate the sequence, so this is close to K times cheaper than one full forward
per option, and gives the same numbers (:func:`naive_option_logliks` is the reference).

Answers are appended to ``answers.jsonl`` (flushed and fsynced per question), so a killed
run resumes where it stopped; ``run.json`` pins host, model, bank and mode so a resumed run
never mixes answers from another setting.

At Table-2 scale (~845 questions x 16 models) one prompt at a time leaves the hardware idle, so
``batch_size`` > 1 scores several prompts (one image each) per forward: the processor left-pads
them, every row gets the position ids it would have alone (from its attention mask; Qwen2-VL's
M-RoPE from its own ``get_rope_index`` over the unpadded tokens), and in ``loglik`` mode each
row's prefix KV cache is kept and repeated for that row's options only; in both modes the
rotations of one circular question in a batch run their common prefix once
(:mod:`mgll.mllm_eval.shared_prefix`). Under a launcher (``accelerate launch`` / ``torchrun``:
``WORLD_SIZE`` > 1) each process takes every K-th question (rotations together), appends to its own
``answers.part-R-of-K.jsonl``, and rank 0 merges the parts into ``answers.jsonl`` in bank order
(:func:`merge_answers`), as a single process would write it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from mgll.adapters.hosts import get_host
from mgll.adapters.prompts import (  # one prompt layout for alignment and inference
    build_prompt,
    encode_prefix,
    encode_prefixes,
)
from mgll.data.pixel_budget import load_rgb
from mgll.data.question_bank import (
    INSTRUCTION,
    QuestionBank,
    Variant,
    format_question,
    load_bank,
    option_text,
)
from mgll.io import atomic_write_json, atomic_write_text
from mgll.mllm_eval.answers import ANSWERS_FILE, PART_GLOB, read_answers
from mgll.mllm_eval.extract import extract_answer
from mgll.mllm_eval.kv_cache import (
    TOKEN_ALIGNED,
    base_model,
    cache_kwarg,
    cache_of,
    keep_last_logit_kw,
    prefix_positions,
)
from mgll.mllm_eval.shared_prefix import shared_prefix_inputs

__all__ = [
    "MODES",
    "INSTRUCTION",
    "format_question",
    "build_prompt",
    "option_text",
    "encode_prefix",
    "option_logliks",
    "naive_option_logliks",
    "generate_answer",
    "score_variant",
    "prefix_positions",
    "batch_option_logliks",
    "generate_answers",
    "score_variants",
    "merge_answers",
    "merge_run",
    "part_name",
    "launch_env",
    "load_model",
    "run_bank",
    "run_mcq",
    "read_answers",
]

MODES = ("loglik", "generate")
RUN_FILE = "run.json"
# hosts whose top-level forward always re-encodes the image: continue through their LM instead
_CONTINUE_VIA_LM = {"instructblip"}


# -- prompts ---------------------------------------------------------------------------------------
def _option_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    empty = [t for t, i in zip(texts, ids) if not i]
    if empty:
        raise ValueError(f"options {empty} tokenise to nothing; cannot score their likelihood")
    return ids


# -- log-likelihood ----------------------------------------------------------------------------------
@torch.inference_mode()
def option_logliks(host: str, model, prefix: dict, option_ids: list[list[int]], pad_id: int = 0) -> torch.Tensor:
    """Sum of token log-probs of each option after the prefix: one prefix forward, one batched forward.

    The options are right-padded, so under the causal mask no real token sees a pad and the
    padded positions are simply not summed.
    """
    k = len(option_ids)
    model = base_model(model)
    if hasattr(model, "option_logliks"):  # models whose image conditioning lives outside the KV cache (Flamingo)
        return model.option_logliks(prefix, option_ids, pad_id=pad_id)
    out = model(**prefix, use_cache=True, **keep_last_logit_kw(model))
    first = out.logits[:, -1:].float()  # predicts each option's first token
    cache = cache_of(out)
    cache.batch_repeat_interleave(k)  # in place: the prefix cache is not used again
    width = max(len(o) for o in option_ids)
    device = prefix["input_ids"].device
    ids = torch.full((k, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((k, width), dtype=torch.bool, device=device)
    for i, o in enumerate(option_ids):
        ids[i, : len(o)] = torch.tensor(o, device=device)
        mask[i, : len(o)] = True
    lm = get_host(host).language_model(model) if host in _CONTINUE_VIA_LM else model
    logits = first.expand(k, 1, -1)
    if width > 1:
        kw = {cache_kwarg(lm): cache}
        # no attention mask: the pads sit after every real token, and Qwen2-VL derives its M-RoPE
        # positions from a mask's length rather than the cache offset
        rest = lm(input_ids=ids[:, :-1], use_cache=True, **kw).logits.float()
        logits = torch.cat([logits, rest], dim=1)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(dim=1).cpu()


@torch.inference_mode()
def naive_option_logliks(model, prefix: dict, option_ids: list[list[int]]) -> torch.Tensor:
    """The reference: one full forward (image included) of prefix + option per option."""
    n = prefix["input_ids"].shape[1]
    scores = []
    for o in option_ids:
        inputs = dict(prefix)
        cont = torch.tensor([o], dtype=torch.long, device=prefix["input_ids"].device)
        inputs["input_ids"] = torch.cat([prefix["input_ids"], cont], dim=1)
        for key, fill in TOKEN_ALIGNED.items():
            if key in inputs and inputs[key].shape[-1] == n:
                inputs[key] = torch.cat([inputs[key], torch.full_like(cont, fill)], dim=1)
        logits = model(**inputs, use_cache=False).logits[0, n - 1 : n - 1 + len(o)].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, cont[0].unsqueeze(-1)).sum()
        scores.append(logp)
    return torch.stack(scores).cpu()


# -- generation ----------------------------------------------------------------------------------------
@torch.inference_mode()
def generate_answer(model, processor, prefix: dict, max_new_tokens: int = 16) -> str:
    out = model.generate(**prefix, max_new_tokens=max_new_tokens, do_sample=False)[0]
    n = prefix["input_ids"].shape[1]
    if out.shape[0] >= n and torch.equal(out[:n], prefix["input_ids"][0]):  # decoder-only hosts echo the prompt
        out = out[n:]
    tok = getattr(processor, "tokenizer", processor)
    return tok.decode(out, skip_special_tokens=True).strip()


def score_variant(
    host: str, model, processor, bank: QuestionBank, v: Variant, image: Image.Image, mode: str,
    max_new_tokens: int = 16, device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """One answered variant as the JSON line stored in ``answers.jsonl``."""
    dtype = next(model.parameters()).dtype
    prompt = build_prompt(host, processor, format_question(bank.question, v.options))
    tok = getattr(processor, "tokenizer", processor)
    row: dict[str, Any] = {"qid": v.qid, "rotation": v.rotation, "answer_index": v.answer_index}
    if mode == "loglik":
        prefix = encode_prefix(processor, prompt, image, device, dtype)
        ids = _option_ids(tok, [option_text(i, o) for i, o in enumerate(v.options)])
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        scores = option_logliks(host, model, prefix, ids, pad_id=pad)
        pred = int(torch.argmax(scores))
        row.update(pred_index=pred, scores=[round(float(s), 6) for s in scores], method="loglik")
    elif mode == "generate":
        prefix = encode_prefix(processor, prompt, image, device, dtype)
        text = generate_answer(model, processor, prefix, max_new_tokens)
        ext = extract_answer(text, v.options)
        row.update(pred_index=ext.index, text=text, method=ext.method)
    else:
        raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
    row["correct"] = row["pred_index"] == v.answer_index
    return row


# -- batches of prompts ----------------------------------------------------------------------------------
def _right_padded(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
    keep = torch.zeros((len(seqs), width), dtype=torch.bool, device=device)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, device=device)
        keep[i, : len(s)] = True
    return ids, keep


@torch.inference_mode()
def batch_option_logliks(host: str, model, prefix: dict, option_ids: list[list[list[int]]], pad_id: int = 0) -> list[torch.Tensor]:
    """:func:`option_logliks` for B left-padded prefixes at once: ``option_ids[b]`` are row b's options.

    One forward runs the B prefixes (positions from :func:`prefix_positions`); the KV cache keeps
    one row per prefix and is then indexed so that each option sits on a copy of its own prompt's
    row; the options (right-padded) continue in one forward with the prefix mask (so the left pads
    stay hidden) and positions counting on from each prompt's last real token.
    """
    model = base_model(model)
    if hasattr(model, "batch_option_logliks"):  # Flamingo: image conditioning outside the KV cache
        return model.batch_option_logliks(prefix, option_ids, pad_id=pad_id)
    b = prefix["input_ids"].shape[0]
    if len(option_ids) != b:
        raise ValueError(f"{b} prompts but option lists for {len(option_ids)}")
    pos = prefix_positions(host, model, prefix)
    out = model(**prefix, position_ids=pos, use_cache=True, **keep_last_logit_kw(model))
    # left padding: the last column is every row's last real token
    return _option_logliks_after(host, model, out, prefix["attention_mask"], pos.amax(dim=-1), option_ids, pad_id)


@torch.inference_mode()
def shared_option_logliks(host: str, model, shared: dict, option_ids: list[list[list[int]]], pad_id: int = 0) -> list[torch.Tensor]:
    """:func:`batch_option_logliks` for prompts whose common prefix already ran (``shared_prefix_inputs(..., None)``).

    Each row's own tokens continue its copy of the prefix cache (positions counted along the
    attention mask, so the masked gap is skipped; plus the M-RoPE offset on Qwen2-VL), then the
    options continue each row as in :func:`batch_option_logliks`.
    """
    model = base_model(model)
    cache = shared[cache_kwarg(model)]
    width = int(cache.get_seq_length())
    mask = shared["attention_mask"]
    pos = prefix_positions(host, model, {"attention_mask": mask})[:, width:]  # along the mask: the gap is skipped
    if shared.get("rope_deltas") is not None:  # text after the image: the same position on all three M-RoPE axes
        pos = (pos + shared["rope_deltas"]).unsqueeze(0).expand(3, -1, -1)
    out = model(input_ids=shared["input_ids"][:, width:], attention_mask=mask, position_ids=pos, use_cache=True,
                **{cache_kwarg(model): cache}, **keep_last_logit_kw(model))
    return _option_logliks_after(host, model, out, mask, pos[..., -1], option_ids, pad_id)


def _option_logliks_after(host: str, model, out, mask: torch.Tensor, last_pos: torch.Tensor,
                          option_ids: list[list[list[int]]], pad_id: int) -> list[torch.Tensor]:
    """Options' log-likelihoods after a forward ``out`` of B prompts (one cache row each, last logit = last token).

    The cache is indexed so that each option sits on a copy of its own prompt's row; the options
    (right-padded) continue in one forward with the prompts' mask (so their pads stay hidden) and
    positions counting on from each prompt's last position ``last_pos`` (``(B,)``, or ``(3, B)``).
    """
    device = mask.device
    first = out.logits[:, -1:].float()
    counts = [len(o) for o in option_ids]
    rows = torch.repeat_interleave(torch.arange(len(option_ids), device=device), torch.tensor(counts, device=device))
    cache = cache_of(out)
    cache.batch_select_indices(rows)  # in place: the prompts' cache is not used again
    ids, keep = _right_padded([o for opts in option_ids for o in opts], pad_id, device)
    logits = first[rows]
    width = ids.shape[1]
    if width > 1:
        steps = torch.arange(width - 1, device=device)
        cont_pos = (last_pos + 1)[..., rows, None] + steps  # (R, w-1), or (3, R, w-1) for M-RoPE
        attn = torch.cat([mask[rows], torch.ones((len(rows), width - 1), dtype=mask.dtype, device=device)], dim=1)
        lm = get_host(host).language_model(model) if host in _CONTINUE_VIA_LM else model
        rest = lm(input_ids=ids[:, :-1], attention_mask=attn, position_ids=cont_pos, use_cache=True,
                  **{cache_kwarg(lm): cache}).logits.float()
        logits = torch.cat([logits, rest], dim=1)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return list((logp * keep).sum(dim=1).cpu().split(counts))


def _stop_ids(host: str, model) -> set[int]:
    """The token ids ``generate`` stops a row at (the generation config it actually uses)."""
    m = base_model(model)
    if hasattr(m, "eoc_token_id"):  # Flamingo's own greedy loop stops at <|endofchunk|>
        return {int(m.eoc_token_id)}
    gen = get_host(host).language_model(m) if host in _CONTINUE_VIA_LM else m  # InstructBLIP: its LM generates
    eos = getattr(getattr(gen, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


@torch.inference_mode()
def generate_answers(host: str, model, processor, prefix: dict, max_new_tokens: int = 16) -> list[str]:
    """:func:`generate_answer` for a left-padded batch: greedy tokens per row, cut after the row's end token.

    A row that ends early is filled with pad ids while the others go on; cutting after its first
    stop token leaves exactly what it generated alone (whether or not the pad token is special).
    """
    out = model.generate(**prefix, max_new_tokens=max_new_tokens, do_sample=False)
    ids = prefix["input_ids"]
    n = ids.shape[1]
    if out.shape[1] >= n and torch.equal(out[:, :n], ids):  # decoder-only hosts echo the prompt
        out = out[:, n:]
    stops = _stop_ids(host, model)
    tok = getattr(processor, "tokenizer", processor)
    texts = []
    for row in out.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        texts.append(tok.decode(row[:cut], skip_special_tokens=True).strip())
    return texts


def score_variants(
    host: str, model, processor, bank: QuestionBank, variants: list[Variant], images: list[Image.Image], mode: str,
    max_new_tokens: int = 16, device: str | torch.device = "cpu",
) -> list[dict[str, Any]]:
    """:func:`score_variant` for several variants (``images[i]`` is variant i's image) in one batch; same rows."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
    dtype = next(model.parameters()).dtype
    prompts = [build_prompt(host, processor, format_question(bank.question, v.options)) for v in variants]
    prefix = encode_prefixes(processor, prompts, images, device, dtype)
    tok = getattr(processor, "tokenizer", processor)
    rows: list[dict[str, Any]] = [{"qid": v.qid, "rotation": v.rotation, "answer_index": v.answer_index} for v in variants]
    keys = [(v.qid, id(im)) for v, im in zip(variants, images)]  # a circular question's rotations share a prefix
    if mode == "loglik":
        ids = [_option_ids(tok, [option_text(i, o) for i, o in enumerate(v.options)]) for v in variants]
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        shared = shared_prefix_inputs(host, model, processor, prompts, images, keys, prefix, device, dtype, None)
        scores_per_row = (shared_option_logliks(host, model, shared, ids, pad_id=pad) if shared is not None
                          else batch_option_logliks(host, model, prefix, ids, pad_id=pad))
        for row, scores in zip(rows, scores_per_row):
            row.update(pred_index=int(torch.argmax(scores)), scores=[round(float(s), 6) for s in scores], method="loglik")
    else:  # a circular question's rotations in the batch run their common prefix once (None: not this host/batch)
        shared = shared_prefix_inputs(host, model, processor, prompts, images, keys, prefix, device, dtype, max_new_tokens)
        for row, v, text in zip(rows, variants, generate_answers(host, model, processor, shared or prefix, max_new_tokens)):
            ext = extract_answer(text, v.options)
            row.update(pred_index=ext.index, text=text, method=ext.method)
    for row in rows:
        row["correct"] = row["pred_index"] == row["answer_index"]
    return rows


# -- runs ------------------------------------------------------------------------------------------------
def load_model(host: str, model_dir: str | os.PathLike, align_dir: str | os.PathLike | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """A swap folder (``mgll_swap.json``), optionally with an alignment run, or a plain host checkpoint."""
    from transformers import AutoProcessor

    kw = {"dtype": dtype} if dtype is not None else {}
    if (Path(model_dir) / "mgll_swap.json").is_file():
        if align_dir:
            from mgll.adapters.align import load_aligned

            model, processor = load_aligned(model_dir, align_dir, **kw)
        else:
            from mgll.adapters.swap import load_swapped

            model, processor = load_swapped(model_dir, **kw)
    else:
        if align_dir:
            raise ValueError(f"--align needs a swap folder; {model_dir} has no mgll_swap.json")
        h = get_host(host)
        if hasattr(h, "load_source"):  # not a transformers folder (OpenFlamingo): the host loads it
            model, processor, tokenizer = h.load_source(model_dir, dtype)
            processor = processor or h.source_processor(model, tokenizer)
        else:
            model = h.source_class().from_pretrained(str(model_dir), **kw)
            processor = AutoProcessor.from_pretrained(str(model_dir))
    return model.to(device).eval(), processor


def part_name(rank: int, world: int) -> str:
    """Process ``rank``'s answers file in a run sharded over ``world`` processes."""
    return f"answers.part-{rank}-of-{world}.jsonl"


def merge_answers(out: str | os.PathLike, bank: QuestionBank) -> dict[tuple[str, int], dict]:
    """Fold shard part files into ``answers.jsonl``, rows in bank order, then delete the parts.

    Bank order (question, then rotation) is the order a single process writes a fresh run in, so
    a merged sharded run has the same file. The new file replaces the old one atomically before
    any part is deleted: a kill in between leaves duplicates, which :func:`read_answers` drops.
    """
    out = Path(out)
    parts = sorted(out.glob(PART_GLOB))
    done = read_answers(out)
    if not parts:
        return done
    order = [(v.qid, v.rotation) for q in bank.questions for v in q.variants(bank.circular)]
    known = set(order)
    rows = [done[k] for k in order if k in done] + [r for k, r in done.items() if k not in known]
    atomic_write_text(out / ANSWERS_FILE, "".join(json.dumps(r) + "\n" for r in rows))
    for path in parts:
        path.unlink()
    return done


def _drop_torn_tail(path: Path) -> None:
    """Cut a partial last line (a kill mid-write) so the next append starts on a line of its own."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def _check_run_spec(out: Path, spec: dict) -> None:
    path = out / RUN_FILE
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = [k for k in spec if old.get(k) != spec[k]]
        if diff:
            k = diff[0]
            raise ValueError(f"{path}: {k} is {old.get(k)!r} but this run has {spec[k]!r}; use another --out to avoid mixing answers")
    else:
        atomic_write_json(path, spec)


def _questions_to_answer(bank, todo_questions, done, data_root, progress, desc, skipped):
    """``(variants not answered yet, image)`` per question, in bank order; an unreadable image is listed and skipped."""
    for q in tqdm(todo_questions, disable=not progress, desc=desc):
        todo = [v for v in q.variants(bank.circular) if (v.qid, v.rotation) not in done]
        if not todo:
            continue
        path = bank.image_path(q, data_root)
        try:
            image = load_rgb(path)
        except (OSError, ValueError) as e:  # ValueError: over the pixel budget (the message names the file)
            skipped.append(f"{q.qid} {path}: {e.__class__.__name__}: {e}")
            continue
        yield todo, image


def _write_rows(f, done, variants, rows, sync: bool = True) -> int:
    """Append answered rows (then flush and fsync, unless ``sync`` is False): a kill loses only what was not written."""
    for v, row in zip(variants, rows):
        f.write(json.dumps(row) + "\n")
        done[(v.qid, v.rotation)] = row
    if sync:
        f.flush()
        os.fsync(f.fileno())
    return len(rows)


def _answer_one_by_one(bank, todo_questions, done, f, score, data_root, progress, desc, skipped) -> int:
    """Today's path (batch size 1): every variant alone."""
    scored = 0
    for todo, image in _questions_to_answer(bank, todo_questions, done, data_root, progress, desc, skipped):
        for i, v in enumerate(todo):  # each row as soon as it is scored; synced once per question
            scored += _write_rows(f, done, [v], [score(v, image)], sync=i == len(todo) - 1)
    return scored


def _answer_in_batches(bank, todo_questions, done, f, score_many, batch_size, data_root, progress, desc, skipped) -> int:
    """Variants in bank order, ``batch_size`` per forward (across questions), written per batch."""
    scored = 0
    pending: list[tuple[Variant, Image.Image]] = []
    for todo, image in _questions_to_answer(bank, todo_questions, done, data_root, progress, desc, skipped):
        for v in todo:
            pending.append((v, image))
            if len(pending) == batch_size:
                scored += _write_rows(f, done, [v for v, _ in pending], score_many([v for v, _ in pending], [im for _, im in pending]))
                pending.clear()
    if pending:
        scored += _write_rows(f, done, [v for v, _ in pending], score_many([v for v, _ in pending], [im for _, im in pending]))
    return scored


def run_bank(
    bank: QuestionBank, host: str, model, processor, out: str | os.PathLike, mode: str = "loglik",
    spec: dict | None = None, data_root: str | os.PathLike | None = None, max_new_tokens: int = 16,
    device: str | torch.device = "cpu", label: str | None = None, progress: bool = True,
    batch_size: int = 1, shard: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Score every variant not yet answered in ``out``; write ``results.json`` + ``results.md``.

    ``batch_size`` > 1 scores that many prompts per forward (:func:`score_variants`); 1 is the
    one-prompt path. ``shard=(rank, world)`` with ``world`` > 1 scores only questions
    ``rank, rank + world, ...`` into this process's part file and returns its share
    (``scored_now``, ``skipped_images``) without results: :func:`merge_run` finishes the run once
    every shard is done. Answers already in ``answers.jsonl`` or any part file are not rescored.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size {batch_size!r}: expected a whole number >= 1")
    rank, world = shard or (0, 1)
    if not 0 <= rank < world:
        raise ValueError(f"shard {rank} of {world}: expected 0 <= rank < world")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = {**(spec or {}), "host": host, "mode": mode, "bank_fingerprint": bank.fingerprint(), "circular": bank.circular}
    if mode == "generate":
        spec["max_new_tokens"] = max_new_tokens
    _check_run_spec(out, spec)
    if world == 1:
        merge_answers(out, bank)  # finishes, in one process, a sharded run that was stopped
        path, questions, desc = out / ANSWERS_FILE, bank.questions, f"mcq {mode}"
    else:
        path, questions, desc = out / part_name(rank, world), bank.questions[rank::world], f"mcq {mode} [{rank}/{world}]"
    _drop_torn_tail(path)
    done = read_answers(out)
    cached = len(done)
    skipped: list[str] = []
    with open(path, "a", encoding="utf-8") as f:
        if batch_size == 1:
            def one(v, image):
                return score_variant(host, model, processor, bank, v, image, mode, max_new_tokens, device)

            scored = _answer_one_by_one(bank, questions, done, f, one, data_root, progress, desc, skipped)
        else:
            def many(vs, images):
                return score_variants(host, model, processor, bank, vs, images, mode, max_new_tokens, device)

            scored = _answer_in_batches(bank, questions, done, f, many, batch_size, data_root, progress, desc, skipped)
    if world > 1:
        return {"rank": rank, "world": world, "scored_now": scored, "skipped_images": skipped}
    return _finish(out, bank, spec, read_answers(out), label, scored, cached, skipped)


def _finish(out: Path, bank: QuestionBank, spec: dict, done: dict, label: str | None, scored: int, cached: int,
            skipped: list[str], **run_extra: Any) -> dict[str, Any]:
    from mgll.mllm_eval.report import summarise, write_results

    result = summarise(bank, done, label=label or spec.get("model") or out.name)
    result.update(run={**spec, "scored_now": scored, "cached": cached, **run_extra}, skipped_images=skipped)
    write_results(out, result)
    return result


def merge_run(out: str | os.PathLike, bank: QuestionBank | None = None, label: str | None = None,
              scored_now: int = 0, skipped_images: list[str] | None = None, shards: int | None = None) -> dict[str, Any]:
    """Merge a sharded run's part files (:func:`merge_answers`) and write its results, as one process would.

    Rank 0 calls it when every shard is done; ``mgll mcq merge`` calls it on a run folder whose
    shards were stopped before that (only once no shard is still writing: the parts are deleted
    after the merge). A rerun would merge them too, first thing. The bank is read from ``run.json`` unless given, and must be the
    one the answers were scored on.
    """
    out = Path(out)
    spec_path = out / RUN_FILE
    if not spec_path.is_file():
        raise FileNotFoundError(f"{spec_path}: no run.json; is {out} an `mgll mcq run` folder?")
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    if bank is None:
        bank = load_bank(spec["bank"])
    if bank.fingerprint() != spec.get("bank_fingerprint"):
        raise ValueError(f"{out}: the answers were scored on another question bank (fingerprint {spec.get('bank_fingerprint')}, "
                         f"this bank {bank.fingerprint()})")
    done = merge_answers(out, bank)
    if label is None and (out / "results.json").is_file():
        label = json.loads((out / "results.json").read_text(encoding="utf-8")).get("label")
    if label is None and spec.get("model"):
        label = Path(spec["model"]).name  # as `mgll mcq run` labels a run by default
    extra = {"shards": shards} if shards else {}
    return _finish(out, bank, spec, done, label, scored_now, len(done) - scored_now, list(skipped_images or []), **extra)


def launch_env() -> tuple[int, int, int]:
    """``(rank, world, local_rank)`` from the launcher's environment (``accelerate launch``, ``torchrun``), else ``(0, 1, 0)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return rank, world, int(os.environ.get("LOCAL_RANK", str(rank)))


# a shard waits at the end for the slowest one; at Table-2 scale on a CPU that can take hours
_SHARD_TIMEOUT_H = 48


def run_mcq(
    host: str, model_dir: str | os.PathLike, bank_path: str | os.PathLike, out: str | os.PathLike,
    mode: str = "loglik", align_dir: str | os.PathLike | None = None, data_root: str | os.PathLike | None = None,
    max_new_tokens: int = 16, device: str | None = None, label: str | None = None, progress: bool = True,
    batch_size: int = 1,
) -> dict[str, Any]:
    """Load the model and score the bank; under ``accelerate launch`` / ``torchrun`` each process scores its shard.

    With ``WORLD_SIZE`` > 1 every process loads the model (on ``cuda:LOCAL_RANK`` when there are
    GPUs), scores questions ``rank::world`` into its part file, and waits for the others on a gloo
    group (CPU tensors only, so it works beside NCCL and without GPUs); rank 0 then merges the
    parts and writes the results, which every process returns.
    """
    get_host(host)  # unknown host: fail before loading anything
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size {batch_size!r}: expected a whole number >= 1")
    rank, world, local_rank = launch_env()
    if device is None:
        device = (f"cuda:{local_rank}" if world > 1 else "cuda") if torch.cuda.is_available() else "cpu"
    bank = load_bank(bank_path)
    model, processor = load_model(host, model_dir, align_dir, device=device)
    spec = {"model": str(Path(model_dir).resolve()), "align": str(Path(align_dir).resolve()) if align_dir else None,
            "bank": str(Path(bank_path).resolve())}
    kw = dict(spec=spec, data_root=data_root, max_new_tokens=max_new_tokens, device=device, label=label,
              progress=progress, batch_size=batch_size)
    if world == 1:
        return run_bank(bank, host, model, processor, out, mode, **kw)
    import datetime

    import torch.distributed as dist

    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=_SHARD_TIMEOUT_H))
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=_SHARD_TIMEOUT_H))
    try:
        share = run_bank(bank, host, model, processor, out, mode, shard=(rank, world), **kw)
        shares: list[Any] = [None] * world
        dist.all_gather_object(shares, share, group=group)  # also the barrier: every shard has finished writing
        if rank == 0:
            result = merge_run(out, bank, label=label or spec["model"], scored_now=sum(s["scored_now"] for s in shares),
                               skipped_images=[x for s in shares for x in s["skipped_images"]], shards=world)
        dist.barrier(group=group)  # results.json is written
        if rank != 0:
            from mgll.mllm_eval.report import load_results

            result = load_results(out)
    finally:
        if own_group:
            dist.destroy_process_group()
    return result
