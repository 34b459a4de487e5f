"""Score a question bank on an MLLM: ``loglik`` (best option by log-likelihood) or ``generate`` (greedy + extraction).

``loglik`` runs the image + question + options prefix once, copies its KV cache across the
K option continuations and scores them in one batched forward: the image tokens (576 for
LLaVA-1.5) dominate the sequence, so this is close to K times cheaper than one full forward
per option, and gives the same numbers (:func:`naive_option_logliks` is the reference).

Answers are appended to ``answers.jsonl`` (flushed and fsynced per question), so a killed
run resumes where it stopped; ``run.json`` pins host, model, bank and mode so a resumed run
never mixes answers from another setting.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from mgll.adapters.hosts import get_host
from mgll.adapters.prompts import build_prompt, encode_prefix  # one prompt layout for alignment and inference
from mgll.data.pixel_budget import load_rgb
from mgll.io import atomic_write_json
from mgll.mllm_eval.extract import extract_answer
from mgll.mllm_eval.question_bank import (
    INSTRUCTION,
    LETTERS,
    QuestionBank,
    Variant,
    format_question,
    load_bank,
)

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
    "load_model",
    "run_bank",
    "run_mcq",
    "read_answers",
]

MODES = ("loglik", "generate")
ANSWERS_FILE = "answers.jsonl"
RUN_FILE = "run.json"
# hosts whose top-level forward always re-encodes the image: continue through their LM instead
_CONTINUE_VIA_LM = {"instructblip"}
# per-token inputs beyond input_ids, and the value an appended text token takes in each
_TOKEN_ALIGNED = {"attention_mask": 1, "token_type_ids": 0, "mm_token_type_ids": 0}


# -- prompts ---------------------------------------------------------------------------------------
def option_text(index: int, option: str) -> str:
    """What is scored in ``loglik`` mode: the letter and the disease, as a model would answer."""
    return f"{LETTERS[index]}. {option}"


def _option_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    empty = [t for t, i in zip(texts, ids) if not i]
    if empty:
        raise ValueError(f"options {empty} tokenise to nothing; cannot score their likelihood")
    return ids


def _base(model):
    """The transformers model under a peft wrapper (LoRA layers sit inside it, so it scores the same)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _cache_name(model) -> str:
    """transformers 5.2x calls the KV cache argument ``cache``; earlier releases ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(_base(model).forward).parameters else "past_key_values"


def _cache_of(out):
    """The KV cache in a forward's output (InstructBLIP nests its LM's output)."""
    for o in (out, out.get("language_model_outputs")):
        if o is None:
            continue
        for key in ("cache", "past_key_values"):
            if o.get(key) is not None:
                return o.get(key)
    raise ValueError(f"{type(out).__name__} holds no KV cache; the model was not run with use_cache=True")


def _keep_last_logit_kw(model) -> dict:
    """Only the last prefix position's logits are needed; skip a (tokens x vocab) tensor where allowed."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(_base(model).forward).parameters else {}


# -- log-likelihood ----------------------------------------------------------------------------------
@torch.inference_mode()
def option_logliks(host: str, model, prefix: dict, option_ids: list[list[int]], pad_id: int = 0) -> torch.Tensor:
    """Sum of token log-probs of each option after the prefix: one prefix forward, one batched forward.

    The options are right-padded, so under the causal mask no real token sees a pad and the
    padded positions are simply not summed.
    """
    k = len(option_ids)
    model = _base(model)
    if hasattr(model, "option_logliks"):  # models whose image conditioning lives outside the KV cache (Flamingo)
        return model.option_logliks(prefix, option_ids, pad_id=pad_id)
    out = model(**prefix, use_cache=True, **_keep_last_logit_kw(model))
    first = out.logits[:, -1:].float()  # predicts each option's first token
    cache = _cache_of(out)
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
        kw = {_cache_name(lm): cache}
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
        for key, fill in _TOKEN_ALIGNED.items():
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


def read_answers(out: str | os.PathLike) -> dict[tuple[str, int], dict]:
    """Answered variants; a torn last line (the run died mid-write) is ignored and rescored."""
    path = Path(out) / ANSWERS_FILE
    done: dict[tuple[str, int], dict] = {}
    if not path.is_file():
        return done
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[(row["qid"], int(row["rotation"]))] = row
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


def run_bank(
    bank: QuestionBank, host: str, model, processor, out: str | os.PathLike, mode: str = "loglik",
    spec: dict | None = None, data_root: str | os.PathLike | None = None, max_new_tokens: int = 16,
    device: str | torch.device = "cpu", label: str | None = None, progress: bool = True,
) -> dict[str, Any]:
    """Score every variant not yet in ``out/answers.jsonl``; write ``results.json`` + ``results.md``."""
    from mgll.mllm_eval.report import summarise, write_results

    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = {**(spec or {}), "host": host, "mode": mode, "bank_fingerprint": bank.fingerprint(), "circular": bank.circular}
    if mode == "generate":
        spec["max_new_tokens"] = max_new_tokens
    _check_run_spec(out, spec)
    _drop_torn_tail(out / ANSWERS_FILE)
    done = read_answers(out)
    cached = len(done)
    skipped: list[str] = []
    scored = 0
    with open(out / ANSWERS_FILE, "a", encoding="utf-8") as f:
        for q in tqdm(bank.questions, disable=not progress, desc=f"mcq {mode}"):
            todo = [v for v in q.variants(bank.circular) if (v.qid, v.rotation) not in done]
            if not todo:
                continue
            path = bank.image_path(q, data_root)
            try:
                image = load_rgb(path)
            except (OSError, ValueError) as e:  # ValueError: over the pixel budget (the message names the file)
                skipped.append(f"{q.qid} {path}: {e.__class__.__name__}: {e}")
                continue
            for v in todo:
                row = score_variant(host, model, processor, bank, v, image, mode, max_new_tokens, device)
                f.write(json.dumps(row) + "\n")
                done[(v.qid, v.rotation)] = row
                scored += 1
            f.flush()
            os.fsync(f.fileno())
    result = summarise(bank, done, label=label or spec.get("model") or out.name)
    result.update(run={**spec, "scored_now": scored, "cached": cached}, skipped_images=skipped)
    write_results(out, result)
    return result


def run_mcq(
    host: str, model_dir: str | os.PathLike, bank_path: str | os.PathLike, out: str | os.PathLike,
    mode: str = "loglik", align_dir: str | os.PathLike | None = None, data_root: str | os.PathLike | None = None,
    max_new_tokens: int = 16, device: str | None = None, label: str | None = None, progress: bool = True,
) -> dict[str, Any]:
    get_host(host)  # unknown host: fail before loading anything
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    bank = load_bank(bank_path)
    model, processor = load_model(host, model_dir, align_dir, device=device)
    spec = {"model": str(Path(model_dir).resolve()), "align": str(Path(align_dir).resolve()) if align_dir else None,
            "bank": str(Path(bank_path).resolve())}
    return run_bank(bank, host, model, processor, out, mode, spec=spec, data_root=data_root,
                    max_new_tokens=max_new_tokens, device=device, label=label, progress=progress)
