"""Hugging Face model cards (``README.md``) for every folder mgll writes: encoders, runs, exports, swaps, alignments.

Why: a folder pushed with ``huggingface-cli upload`` (``hf upload``) is only useful to someone else if it says
what it is and how it was made. The Hub reads the YAML block (``library_name`` picks the loading
snippet and widget, ``pipeline_tag`` the task, ``base_model`` links the model tree, ``datasets``
the data); the body records what produced the folder (loss and weights, data card, steps, the
exact command line) and evaluation figures once there are any. Cards are written with
``huggingface_hub.ModelCard`` so they parse exactly as the Hub parses them.

Each writer calls :func:`write_card` once, inside its atomic temporary folder, so a folder and its
card appear together. Facts a later folder needs about its source (the encoder's loss and data
for a swap, the swap's base MLLM for an alignment) are read back from the source's own card
(the ``mgll`` block of its metadata) or its ``mgll_config.json``, so cards chain without the
writers passing state around. :func:`add_results` (``mgll card FOLDER --results ...``) adds probe,
zero-shot and MCQ figures later, in the body and as ``model-index`` metadata.

This module imports nothing heavy at import time: ``mgll.cli`` imports it to record the command.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mgll.io import atomic_write_text

__all__ = [
    "CARD_FILE",
    "set_command",
    "command_line",
    "hub_id",
    "read_card_meta",
    "build_card",
    "write_card",
    "encoder_card",
    "export_hf_card",
    "swap_card",
    "align_card",
    "aligned_card",
    "read_figures",
    "add_results",
]

CARD_FILE = "README.md"
EVAL_HEADING = "## Evaluation"
FOOTER = ("_Card written by mgll with `huggingface_hub.ModelCard`; `huggingface-cli upload REPO_ID FOLDER .` "
          "(`hf upload` with huggingface_hub >= 1.0) uploads this folder as it is._")
_NO_EVAL = ("No evaluation recorded yet. Add probe, zero-shot or MCQ figures with "
            "`mgll card FOLDER --results EVAL_FOLDER ...`.")
_ARGV: list[str] | None = None
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ----------------------------------------------------------------------------- command and ids


def set_command(argv: Sequence[str] | None) -> None:
    """Record the command being run (``mgll.cli.main`` calls this with the argv it parses)."""
    global _ARGV
    _ARGV = None if argv is None else ["mgll", *argv]


def command_line() -> str:
    """The exact command that is writing the folder: the mgll argv when run through ``mgll.cli``, else ``sys.argv``."""
    argv = _ARGV if _ARGV is not None else [Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
    return shlex.join(argv)


def hub_id(name: str | os.PathLike | None) -> str | None:
    """``org/name`` when ``name`` is a Hub repository id (``hf-hub:`` prefix allowed), None for local paths and names.

    The Hub links ``base_model`` entries to repositories, so only real ids go there; local
    folders are named in the card's body instead.
    """
    if name is None:
        return None
    s = str(name)
    s = s[len("hf-hub:"):] if s.startswith("hf-hub:") else s
    if not _HUB_ID.match(s) or Path(s).exists():
        return None
    return s


def _open_clip_base(model_name: str, pretrained: str | None) -> list[str]:
    """Hub ids of the open_clip weights an encoder started from (an hf-hub name, or a pretrained tag's hf_hub)."""
    ids = []
    if (h := hub_id(model_name)) is not None and str(model_name).startswith("hf-hub:"):
        ids.append(h)
    if pretrained and not Path(pretrained).is_file():
        try:
            import open_clip

            cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
        except Exception:  # an unknown tag: nothing to link, the body still names it
            cfg = {}
        if (h := hub_id(str(cfg.get("hf_hub", "")).strip("/"))) is not None:
            ids.append(h)
    return ids


def read_card_meta(folder: str | os.PathLike | None) -> dict[str, Any]:
    """The YAML metadata of ``folder``'s README.md (``{}`` without one), as the Hub would read it."""
    if folder is None:
        return {}
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return {}
    from huggingface_hub import ModelCard

    return ModelCard.load(path).data.to_dict()


def _encoder_facts(encoder: str | os.PathLike | None) -> dict[str, Any]:
    """What produced an encoder folder: its card's ``mgll`` block, else its ``mgll_config.json``."""
    if encoder is None:
        return {}
    p = Path(encoder)
    for folder in (p, p / "encoder"):
        meta = read_card_meta(folder)
        if meta.get("mgll"):
            return {**meta["mgll"], "base_model": meta.get("base_model"), "datasets": meta.get("datasets")}
        cfg = folder / "mgll_config.json"
        if cfg.is_file():
            with open(cfg, encoding="utf-8") as f:
                return json.load(f)
    return {}


def _as_list(x: Any) -> list[str]:
    if x is None:
        return []
    return [str(v) for v in (x if isinstance(x, (list, tuple)) else [x])]


def _unique(xs: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(x for x in xs if x))


# ----------------------------------------------------------------------------- body pieces


def _cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _data_section(data: dict[str, Any] | None) -> str:
    if not data:
        return "No dataset (this folder was not trained on data)."
    lines = [f"**{data.get('name', 'unnamed dataset')}**" + (f": {data['description']}" if data.get("description") else "")]
    if data.get("path"):
        lines.append(f"\nFolder: `{data['path']}`")
    if data.get("splits"):
        lines.append("\nSplits: " + ", ".join(f"{k} {v}" for k, v in data["splits"].items()))
    if data.get("split_used"):
        lines.append(f"\nTrained on split: `{data['split_used']}`")
    levels = data.get("levels") or []
    if levels:
        lines.append("\n" + _table(["level (coarse to fine)", "text template"], [[lv["name"], f"`{lv['template']}`"] for lv in levels]))
    return "\n".join(lines)


def _eval_section(figures: Sequence[dict] | None) -> str:
    if not figures:
        return _NO_EVAL
    rows = [[f["evaluation"], f["dataset"], f["task"], f["metric"], f"{f['value']:.4f}" if isinstance(f["value"], float) else f["value"],
             f"`{f['source']}`"] for f in figures]
    return _table(["evaluation", "dataset", "task", "metric", "value", "report"], rows)


def build_card(
    *,
    kind: str,
    title: str,
    intro: str,
    library_name: str,
    pipeline_tag: str,
    tags: Sequence[str],
    base_models: Sequence[str] = (),
    datasets: Sequence[str] = (),
    produced: Sequence[tuple[str, Any]] = (),
    data: dict[str, Any] | None = None,
    usage: str = "",
    facts: dict[str, Any] | None = None,
    figures: Sequence[dict] | None = None,
):
    """A ``ModelCard``: YAML metadata + body (intro, usage, how it was produced, data card, command, evaluation).

    ``facts`` (JSON-able) go under the metadata key ``mgll`` with ``kind`` and ``command``, so the
    next folder built from this one can read them back (:func:`read_card_meta`).
    """
    from huggingface_hub import ModelCard, ModelCardData

    command = command_line()
    bases = _unique(base_models)
    meta = ModelCardData(
        library_name=library_name,
        pipeline_tag=pipeline_tag,
        tags=_unique(["mgll", "medical-imaging", *tags]),
        base_model=(bases[0] if len(bases) == 1 else bases) or None,  # one id as a string, the Hub's usual form
        datasets=(_unique(datasets) or None),
        mgll={"kind": kind, "command": command, **(facts or {})},
    )
    if figures:
        meta.model_name = title
        meta.eval_results = _eval_results(figures)
    body = [
        f"# {title}",
        "",
        intro,
        "",
    ]
    if usage:
        body += ["## Use", "", usage, ""]
    body += ["## How it was produced", "", _table(["", ""], [[k, v] for k, v in produced]) if produced else "-", ""]
    body += ["## Data card", "", _data_section(data), ""]
    body += ["## Command", "", "```", command, "```", ""]
    body += [EVAL_HEADING, "", _eval_section(figures), ""]
    body += [FOOTER, ""]
    return ModelCard(f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(body))


def write_card(folder: str | os.PathLike, card) -> Path:
    """``folder/README.md``, atomically (a writer calls this inside its temporary folder, before the rename)."""
    return atomic_write_text(Path(folder) / CARD_FILE, str(card))


def _loss_row(facts: dict[str, Any]) -> str:
    loss = facts.get("loss")
    if not loss:
        return "-"
    w = facts.get("loss_weights") or {}
    if loss == "mgll" and w:
        return "mgll: " + ", ".join(f"{k} {v:g}" for k, v in w.items())
    return str(loss)


# ----------------------------------------------------------------------------- one card per writer


def encoder_card(*, folder_kind: str, model_name: str, pretrained: str | None, loss: str, loss_weights: dict[str, float],
                 steps: int, data: dict[str, Any], train: dict[str, Any], final: dict[str, Any] | None = None,
                 start_encoder: str | None = None):
    """The card of ``mgll train``'s encoder folder (``folder_kind="encoder"``) or run folder (``"run"``)."""
    parent = _encoder_facts(start_encoder) if start_encoder else {}
    base = _open_clip_base(model_name, pretrained) + _as_list(parent.get("base_model"))
    facts = {"model_name": model_name, "pretrained": pretrained, "loss": loss, "loss_weights": loss_weights, "steps": steps,
             "dataset": data.get("name"),
             "dataset_card": {k: data[k] for k in ("name", "description", "levels") if data.get(k)}}
    produced = [
        ("architecture", f"`{model_name}`" + (f" from `{start_encoder}`" if start_encoder else "")),
        ("initial weights", f"`{pretrained}`" if pretrained else ("the saved encoder" if start_encoder else "random")),
        ("loss", _loss_row(facts)),
        ("steps", steps),
        *[(k, v) for k, v in train.items()],
        *[(f"final {k}", f"{v:.4f}" if isinstance(v, float) else v) for k, v in (final or {}).items()],
    ]
    if folder_kind == "encoder":
        usage = ("An open_clip model folder (`open_clip_config.json` + `open_clip_model.safetensors`):\n\n```python\n"
                 "import open_clip\nmodel, _, preprocess = open_clip.create_model_and_transforms('local-dir:PATH')  "
                 "# or 'hf-hub:REPO_ID' once uploaded\ntokenizer = open_clip.get_tokenizer('local-dir:PATH')\n```")
        library = "open_clip"
    else:
        usage = ("An `mgll train` run folder: `encoder/` is the open_clip model (`local-dir:RUN/encoder`), "
                 "`config.yaml` the full configuration, `metrics.jsonl` the loss curve, `checkpoints/` resumable state.")
        library = "mgll"
    return build_card(
        kind=folder_kind, title=f"MGLL encoder ({loss} loss, {model_name})" if folder_kind == "encoder" else f"mgll train run ({loss} loss)",
        intro=f"A CLIP-style image-text encoder trained by `mgll train` with the **{loss}** objective on "
              f"{data.get('name', 'a records dataset')}.",
        library_name=library, pipeline_tag="zero-shot-image-classification",
        tags=["clip", "open_clip", f"{loss}-loss"], base_models=base, datasets=[data.get("name", "")],
        produced=produced, data=data, usage=usage, facts=facts,
    )


def export_hf_card(folder: Path, *, source: str, model_name: str, pretrained: str | None, full: bool):
    """The card of an ``mgll export-hf`` folder (``CLIPModel`` with ``full``, else ``CLIPVisionModel``)."""
    enc = _encoder_facts(source)
    with open(Path(folder) / "config.json", encoding="utf-8") as f:
        arch = json.load(f).get("architectures", ["?"])[0]
    base = _open_clip_base(model_name, pretrained) + _as_list(enc.get("base_model"))
    if full:
        usage = ("```python\nfrom transformers import pipeline\nclf = pipeline('zero-shot-image-classification', model='PATH')\n"
                 "clf(image, candidate_labels=[...], hypothesis_template='a fundus photograph showing {}')\n```\n\n"
                 "With one template, the probabilities are `mgll zeroshot`'s for that template (tested to 1e-4). The tokenizer "
                 "is open_clip's BPE (same ids); for PIL-exact resizing pass "
                 "`image_processor=AutoImageProcessor.from_pretrained('PATH', backend='pil')`.")
    else:
        usage = ("```python\nfrom transformers import CLIPVisionModel\nmodel = CLIPVisionModel.from_pretrained('PATH')\n```\n\n"
                 "`hidden_states[i]` equal open_clip's block-i output (0 = after `ln_pre`), the layers LLaVA-style towers select.")
    produced = [
        ("exported from", f"`{source}` (`{model_name}`)"),
        ("class", f"`{arch}`"),
        ("encoder loss", _loss_row(enc)),
        ("encoder training steps", enc.get("steps", "-")),
    ]
    data = enc.get("dataset_card") or ({"name": enc["dataset"]} if enc.get("dataset") else None)
    return build_card(
        kind="export-hf-full" if full else "export-hf",
        title=f"MGLL encoder as transformers {arch}",
        intro=f"The open_clip encoder `{model_name}` converted by `mgll export-hf{' --full' if full else ''}` to transformers' "
              f"`{arch}` (weights map one to one; no custom code).",
        library_name="transformers", pipeline_tag="zero-shot-image-classification" if full else "image-feature-extraction",
        tags=["clip", "transformers"], base_models=base, datasets=_as_list(enc.get("datasets")) or [enc.get("dataset", "")],
        produced=produced, data=data, usage=usage,
        facts={"source": source, "model_name": model_name, "class": arch, "loss": enc.get("loss"),
               "loss_weights": enc.get("loss_weights"), "steps": enc.get("steps"), "dataset": enc.get("dataset")},
    )


def swap_card(folder: str | os.PathLike, spec: dict[str, Any]):
    """The card of an ``mgll swap`` folder (written model files in ``folder``): the MLLM with an MGLL encoder as its tower."""
    enc = _encoder_facts(spec.get("encoder"))
    base = _unique([hub_id(spec.get("source_mllm")) or "", *_as_list(read_card_meta(spec.get("source_mllm")).get("base_model")),
                    *_as_list(enc.get("base_model"))])
    tower = spec.get("tower", {})
    produced = [
        ("host", f"`{spec['host']}` (`{spec.get('model_class', '?')}`)"),
        ("source MLLM", f"`{spec.get('source_mllm')}`"),
        ("vision encoder", f"`{spec.get('encoder')}` (`{spec.get('encoder_model_name')}`)"),
        ("encoder loss", _loss_row(enc)),
        ("encoder training steps", enc.get("steps", "-")),
        ("projector", f"{spec.get('projector_init')} init" + (f", weights `{spec['projector_weights']}`" if spec.get("projector_weights") else "")),
        ("image view", spec.get("image_view")),
        ("tower", ", ".join(f"{k} {v}" for k, v in tower.items() if isinstance(v, (int, float, str)))),
    ]
    config = Path(folder) / "config.json"
    remote = config.is_file() and "auto_map" in json.loads(config.read_text(encoding="utf-8"))
    load = ("AutoModelForImageTextToText.from_pretrained('PATH'" + (", trust_remote_code=True" if remote else "") + ")")
    usage = (f"```python\nfrom transformers import AutoModelForImageTextToText, AutoProcessor\nmodel = {load}\n"
             "processor = AutoProcessor.from_pretrained('PATH', trust_remote_code=True)\n```\n\n"
             "The projector is untrained unless a projector file was given: align it with `mgll align` first.")
    return build_card(
        kind="swap", title=f"{spec['host']} with an MGLL vision encoder",
        intro=f"`{spec.get('source_mllm')}` with its vision tower replaced by the MGLL encoder `{spec.get('encoder')}` "
              "(`mgll swap`).",
        library_name="transformers", pipeline_tag="image-text-to-text", tags=[spec["host"], "vision-tower-swap"],
        base_models=base, datasets=_as_list(enc.get("datasets")) or [enc.get("dataset", "")], produced=produced,
        data={"name": enc["dataset"]} if enc.get("dataset") else None, usage=usage,
        facts={"host": spec["host"], "source_mllm": str(spec.get("source_mllm")), "encoder": str(spec.get("encoder")),
               "loss": enc.get("loss"), "dataset": enc.get("dataset")},
    )


def align_card(cfg: Any, summary: dict[str, Any], data: dict[str, Any]):
    """The card of an ``mgll align`` run folder (projector, LoRA adapter when stage 2)."""
    swap_meta = read_card_meta(cfg.model)
    stage2 = summary["stage"] == 2
    produced = [
        ("swapped model", f"`{cfg.model}`"),
        ("stage", f"{summary['stage']} ({'projector + LoRA on the LM' + (' in 4-bit nf4' if cfg.qlora else '') if stage2 else 'projector only'})"),
        ("steps", summary["steps"]),
        ("batch size / lr", f"{cfg.batch_size} / {cfg.lr:g}"),
        ("LoRA r / alpha", f"{cfg.lora_r} / {cfg.lora_alpha}" if stage2 else "-"),
        ("caption pairs (skipped)", f"{summary['pairs']} ({len(summary['skipped'])})"),
        ("loss first -> last", f"{summary['loss_first']:.4f} -> {summary['loss_last']:.4f}"),
        ("instruction", f"`{cfg.instruction}`"),
    ]
    usage = ("Trained parts only (`projector.safetensors`" + (", `adapter/` (peft LoRA)" if stage2 else "") + "): load with "
             "`mgll.adapters.align.load_aligned(SWAP_FOLDER, THIS_FOLDER)`, or merge into a stand-alone model with "
             "`mgll export-aligned --model SWAP_FOLDER --align THIS_FOLDER --out OUT`.")
    return build_card(
        kind="align", title=f"mgll align stage {summary['stage']} ({summary['host']})",
        intro=f"Alignment of the swapped model `{cfg.model}` on caption pairs written from {data.get('name', 'a dataset')}'s label levels.",
        library_name="peft" if stage2 else "mgll", pipeline_tag="image-text-to-text",
        tags=[summary["host"], "alignment", *(["lora"] if stage2 else []), *(["qlora"] if cfg.qlora else [])],
        base_models=_as_list(swap_meta.get("base_model")), datasets=[data.get("name", ""), *_as_list(swap_meta.get("datasets"))],
        produced=produced, data=data, usage=usage,
        facts={"host": summary["host"], "stage": summary["stage"], "steps": summary["steps"], "swap": str(cfg.model),
               "loss_last": summary["loss_last"], "dataset": data.get("name")},
    )


def aligned_card(spec: dict[str, Any], swap_dir: str | os.PathLike, align_dir: str | os.PathLike, merged: bool):
    """The card of an ``mgll export-aligned`` folder: swap + alignment run as one loadable model."""
    swap_meta, align_meta = read_card_meta(swap_dir), read_card_meta(align_dir)
    a = align_meta.get("mgll") or {}
    summary_path = Path(align_dir) / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    produced = [
        ("swapped model", f"`{swap_dir}`"),
        ("alignment run", f"`{align_dir}` (stage {summary.get('stage', '?')}, {summary.get('steps', '?')} steps)"),
        ("LoRA merged into the LM", "yes" if merged else "no (stage 1: projector only)"),
        ("alignment loss first -> last", f"{summary['loss_first']:.4f} -> {summary['loss_last']:.4f}" if summary else "-"),
        ("encoder loss", _loss_row(_encoder_facts(spec.get("encoder")))),
    ]
    usage = ("```python\nfrom transformers import AutoModelForImageTextToText, AutoProcessor\n"
             "model = AutoModelForImageTextToText.from_pretrained('PATH', trust_remote_code=True)\n"
             "processor = AutoProcessor.from_pretrained('PATH', trust_remote_code=True)\n```")
    return build_card(
        kind="export-aligned", title=f"{spec['host']} with an aligned MGLL vision encoder",
        intro=f"`mgll export-aligned`: the swapped `{spec['host']}` model with its alignment run's projector"
              + (" and merged LoRA" if merged else "") + ", loadable without mgll.",
        library_name="transformers", pipeline_tag="image-text-to-text", tags=[spec["host"], "aligned"],
        base_models=_as_list(swap_meta.get("base_model")),
        datasets=[*_as_list(align_meta.get("datasets")), *_as_list(swap_meta.get("datasets"))], produced=produced,
        data={"name": a["dataset"]} if a.get("dataset") else None, usage=usage,
        facts={"host": spec["host"], "swap": str(swap_dir), "align": str(align_dir), "lora_merged": merged},
    )


# ----------------------------------------------------------------------------- figures


def read_figures(paths: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """Rows (evaluation, dataset, task, metric, value, source) from probe / zero-shot ``metrics.json`` and MCQ ``results.json``."""
    rows: list[dict[str, Any]] = []
    for p in map(Path, paths):
        files = [p] if p.is_file() else [f for f in (p / "metrics.json", p / "results.json") if f.is_file()]
        if not files:
            raise FileNotFoundError(f"{p}: no metrics.json (mgll probe / zeroshot) or results.json (mgll mcq run) here")
        with open(files[0], encoding="utf-8") as f:
            try:
                rep = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{files[0]}: not JSON ({e})") from None
        src = str(files[0])
        if rep.get("command") == "probe":
            task = rep["task"]
            for name, m in rep["results"].items():
                ev = f"linear probe ({rep.get('head', 'logreg')}, {name})"
                rows += _metric_rows(ev, rep.get("dataset_name", "?"), f"{task['level']} ({task['kind']})", m, src, "image-classification")
        elif rep.get("command") == "zeroshot":
            for level, m in rep["results"].items():
                kind = rep.get("levels", {}).get(level.split(" (")[0], {}).get("task", {}).get("kind", "")
                rows += _metric_rows("zero-shot", rep.get("dataset_name", "?"), f"{level} ({kind})" if kind else level, m, src,
                                     "zero-shot-image-classification")
        elif "per_disease" in rep:
            for key, name in (("average", "average accuracy (%)"), ("overall", "overall accuracy (%)")):
                if rep.get(key) is not None:
                    rows.append({"evaluation": f"MCQ ({rep.get('label', '?')})", "dataset": "ten-disease MCQ bank",
                                 "task": f"{rep.get('n_questions', '?')} questions" + (", circular" if rep.get("circular") else ""),
                                 "metric": name, "value": float(rep[key]), "source": src, "task_type": "visual-question-answering"})
        else:
            raise ValueError(f"{src}: not an mgll probe/zeroshot metrics.json or mcq results.json")
    return rows


def _metric_rows(ev: str, dataset: str, task: str, m: dict, src: str, task_type: str) -> list[dict[str, Any]]:
    out = []
    for key, name in (("macro_auc", "macro AUC"), ("accuracy", "accuracy")):
        if m.get(key) is not None:
            out.append({"evaluation": ev, "dataset": dataset, "task": task, "metric": name, "value": float(m[key]),
                        "source": src, "task_type": task_type})
    return out


def _eval_results(figures: Sequence[dict]):
    from huggingface_hub import EvalResult

    return [EvalResult(task_type=f.get("task_type", "image-classification"), task_name=f["evaluation"],
                       dataset_type=f["dataset"], dataset_name=f"{f['dataset']}: {f['task']}",
                       metric_type=f["metric"].split(" (")[0].replace(" ", "_").lower(), metric_name=f["metric"],
                       metric_value=f["value"]) for f in figures]


def add_results(folder: str | os.PathLike, paths: Sequence[str | os.PathLike]) -> Path:
    """Put the figures of ``paths`` into ``folder``'s card (body table + ``model-index``), replacing earlier ones."""
    from huggingface_hub import ModelCard

    path = Path(folder) / CARD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no model card; `mgll card` updates the README.md that mgll writes into its folders")
    if not paths:
        raise ValueError("no --results given")
    figures = read_figures(paths)
    card = ModelCard.load(path)
    if EVAL_HEADING not in card.text:
        raise ValueError(f"{path}: no '{EVAL_HEADING}' section; not a card mgll wrote")
    head, rest = card.text.split(EVAL_HEADING, 1)
    footer = FOOTER + rest.split(FOOTER, 1)[1] if FOOTER in rest else ""
    card.text = head + EVAL_HEADING + "\n\n" + _eval_section(figures) + "\n\n" + footer
    card.data.model_name = card.data.model_name or Path(folder).resolve().name
    card.data.eval_results = _eval_results(figures)
    return atomic_write_text(path, str(card))
