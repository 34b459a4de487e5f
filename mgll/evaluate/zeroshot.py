"""``mgll zeroshot``: classify each level of a dataset from text prompts alone.

Prompts. Each class gets the dataset card's template for its level plus every user template
(``"a retinal image with {}"``). Their normalised text embeddings are averaged and the mean
renormalised (a prompt ensemble), exactly open_clip's ``build_zero_shot_classifier``, which
is used here.

Scores. ``logits = logit_scale * image @ classifier`` with L2-normalised image features.

* Single-label levels (binary, multi-class): ``softmax(logits)`` over the level's classes, so
  rows sum to one, as CLIP zero-shot does.
* Multi-label levels: every class needs a score of its own, comparable across images (AUC ranks
  images per class). Two choices, ``multilabel_score``:

  - ``"softmax"``: the same softmax probabilities, used as per-class scores. Soft CLIP, the
    MGLL objective, trains exactly this quantity toward ``1/k`` for each of an image's ``k``
    labels and toward 0 for the others, so it is the model's own estimate; a text-only "no X"
    negative prompt would instead rely on the text tower understanding negation, which a
    label-trained encoder never saw.
  - ``"sigmoid"``: ``sigmoid(logit_scale * cos + logit_bias)``, independent probabilities, for
    encoders trained with a sigmoid loss (SigLIP), which carry a learned ``logit_bias``.
  - ``"auto"`` (default): sigmoid when the encoder has a ``logit_bias``, softmax otherwise.

  Softmax scores of an image with k labels are near 1/k each, so the 0.5-threshold
  (exact-match) accuracy of a multi-label level is low by construction; its AUC and AP, which
  only rank, are the meaningful figures.

Hierarchical consistency (``hierarchical=True``). The card lists levels coarse to fine; a fine
label's parent is the label of the level above it that co-occurs with it most often in the
training records (``support`` = the fraction of its images that carry that parent; 1.0 means
"always"). Going down the levels, a fine label's score becomes ``min(score, parent's score)``,
the parent's score already bounded by its own parent. Bounding never raises a score, so a
label is never more likely than its ancestor; rows of a single-label level then no longer
have to sum to one, which is why the unbounded scores are kept and reported too.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from tqdm.auto import tqdm

from mgll.data.pixel_budget import resolve_max_pixels
from mgll.data.records import MultiGranularDataset, Record
from mgll.data.shards import open_dataset
from mgll.encoder.factory import create_encoder
from mgll.evaluate.features import encoder_identity, extract_features, read_rgb_or_reason
from mgll.evaluate.metrics import evaluate_scores
from mgll.evaluate.probe import encoder_label
from mgll.evaluate.tasks import Task, make_task, task_records, task_targets
from mgll.io import atomic_path

__all__ = [
    "MULTILABEL_SCORES",
    "LevelScores",
    "check_template",
    "build_classifier",
    "class_scores",
    "learn_parents",
    "bound_by_parents",
    "encode_images",
    "zeroshot",
]

MULTILABEL_SCORES = ("auto", "softmax", "sigmoid")


def check_template(template: str) -> str:
    if not isinstance(template, str) or "{}" not in template:
        raise ValueError(f"prompt template {template!r} must contain '{{}}' where the class name goes")
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError) as e:
        raise ValueError(f"prompt template {template!r} is not a valid format string ({e})") from None
    return template


def build_classifier(model, tokenizer, classes: Sequence[str], templates: Sequence[str], device="cpu") -> torch.Tensor:
    """(D, C) prompt-ensemble classifier: per class, the renormalised mean of normalised prompt embeddings."""
    templates = [check_template(t) for t in templates]
    if not templates:
        raise ValueError("zero-shot needs at least one prompt template")
    return build_zero_shot_classifier(model, tokenizer, list(classes), templates, num_classes_per_batch=None, device=device)


def _logit_scale(model) -> float:
    ls = getattr(model, "logit_scale", None)
    if ls is None:
        return 100.0
    return float(torch.as_tensor(ls).detach().float().exp().clamp(max=100.0).reshape(-1)[0])


def _logit_bias(model) -> float | None:
    b = getattr(model, "logit_bias", None)
    return None if b is None else float(torch.as_tensor(b).detach().float().reshape(-1)[0])


def class_scores(
    image_features: torch.Tensor,
    classifier: torch.Tensor,
    logit_scale: float,
    multilabel: bool,
    score: str = "softmax",
    logit_bias: float | None = None,
) -> np.ndarray:
    """(N, C) scores in [0, 1]; see the module docstring for the softmax / sigmoid choice."""
    logits = logit_scale * image_features.float() @ classifier.float()
    if multilabel and score == "sigmoid":
        if logit_bias is None:
            raise ValueError("multi-label score 'sigmoid' needs an encoder with a logit_bias (SigLIP-trained); use 'softmax'")
        return torch.sigmoid(logits + logit_bias).numpy().astype(np.float64)
    if score not in ("softmax", "sigmoid"):
        raise ValueError(f"unknown score {score!r}; known: softmax, sigmoid")
    return torch.softmax(logits.double(), dim=1).numpy()


def learn_parents(records: Sequence[Record], coarse: str, fine: str) -> dict[str, dict]:
    """fine label -> {"parent", "support", "n"}: the coarse label it co-occurs with most (ties: by name)."""
    counts: dict[str, Counter] = {}
    for rec in records:
        for f in rec.labels[fine]:
            counts.setdefault(f, Counter()).update(rec.labels[coarse])
    n_images = Counter(f for rec in records for f in rec.labels[fine])
    out = {}
    for f, c in sorted(counts.items()):
        parent, k = min(c.items(), key=lambda kv: (-kv[1], kv[0]))
        out[f] = {"parent": parent, "support": k / n_images[f], "n": n_images[f]}
    return out


def bound_by_parents(
    fine_scores: np.ndarray,
    fine_classes: Sequence[str],
    parent_scores: np.ndarray,
    parent_classes: Sequence[str],
    parents: dict[str, dict],
) -> np.ndarray:
    """``min(fine, parent)`` column-wise; fine labels with no known parent are left as they are."""
    out = np.array(fine_scores, dtype=np.float64, copy=True)
    col = {c: i for i, c in enumerate(parent_classes)}
    for j, name in enumerate(fine_classes):
        p = parents.get(name)
        if p is not None and p["parent"] in col:
            out[:, j] = np.minimum(out[:, j], parent_scores[:, col[p["parent"]]])
    return out


def encode_images(
    model, preprocess, dataset: MultiGranularDataset, records: Sequence[Record], device="cpu", batch_size: int = 64, progress: bool = True
) -> tuple[torch.Tensor, list[int], list[dict]]:
    """L2-normalised image features of the readable records; unreadable or over-budget images are skipped and listed."""
    budget = resolve_max_pixels()
    feats, kept, skipped = [], [], []
    batch, idx = [], []

    def flush():
        with torch.no_grad():
            f = model.encode_image(torch.stack(batch).to(device), normalize=True)
        feats.append(f.float().cpu())
        kept.extend(idx)
        batch.clear()
        idx.clear()

    for i, rec in enumerate(tqdm(records, desc="encode images", disable=not progress, dynamic_ncols=True)):
        img, why = read_rgb_or_reason(dataset.image_path(rec), budget)
        if img is None:
            skipped.append({"image": rec.image, "line": rec.line, "reason": why})
            continue
        batch.append(preprocess(img))
        idx.append(i)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not feats:
        raise ValueError(f"{dataset.root}: none of the {len(records)} images could be read")
    return torch.cat(feats), kept, skipped


@dataclass
class LevelScores:
    task: Task
    images: list[str]  # one per score row (every readable image of the split)
    scores: np.ndarray  # (N, C): hierarchically bounded when asked, else equal to raw
    raw: np.ndarray  # (N, C): before bounding
    prompts: dict[str, list[str]]
    metrics: dict | None = None
    parents: dict[str, dict] | None = None
    score: str = "softmax"
    notes: list[str] = field(default_factory=list)


def _score_kind(task: Task, requested: str, bias: float | None) -> str:
    if task.kind != "multilabel":
        return "softmax"
    if requested == "auto":
        return "sigmoid" if bias is not None else "softmax"
    return requested


def _evaluate(task: Task, y: np.ndarray, scores: np.ndarray, bootstrap: int, seed: int) -> dict:
    return evaluate_scores(task, y, scores[:, 1] if task.kind == "binary" else scores, bootstrap=bootstrap, seed=seed)


def zeroshot(
    encoder: str,
    data: str | Path | MultiGranularDataset,
    levels: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    templates: Sequence[str] = (),
    split: str = "test",
    hierarchical: bool = False,
    multilabel_score: str = "auto",
    pretrained: str | None = None,
    batch_size: int = 64,
    bootstrap: int = 1000,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
    use_cache: bool = True,
    cache_dir: str | Path | None = None,
    model_bundle: tuple | None = None,
) -> tuple[dict[str, LevelScores], dict]:
    """Zero-shot scores and metrics per level; returns ``(level -> LevelScores, report)``.

    The report is ``reports.write_report``'s run-summary form: one evaluation per level under
    ``results`` (plus ``LEVEL (unbounded)`` when hierarchical). Image features come from the
    probe's feature cache when the encoder's weights are fixed (a saved encoder or a
    pretrained tag), so a zero-shot after a probe does not re-encode; a randomly initialised
    architecture is encoded by the very model whose text tower scores it.
    ``model_bundle`` = ``(model, preprocess_val, tokenizer)`` uses a model already in memory.
    """
    if multilabel_score not in MULTILABEL_SCORES:
        raise ValueError(f"unknown multilabel_score {multilabel_score!r}; known: {', '.join(MULTILABEL_SCORES)}")
    user_templates = [check_template(t) for t in templates]
    ds = data if isinstance(data, MultiGranularDataset) else open_dataset(data)  # a folder, or shards unpacked once
    card = ds.card
    wanted = list(dict.fromkeys(levels)) if levels else list(card.level_names)
    for lv in wanted:
        card.level(lv)  # RecordError listing the card's levels
    if classes and len(wanted) != 1:
        raise ValueError(f"classes restrict one level; pass exactly one level (got {wanted})")
    records = ds.split(split)
    if not records:
        raise ValueError(f"{ds.root}: no records in split {split!r}; splits: {ds.splits()}")
    order = list(card.level_names)
    needed = wanted
    if hierarchical:  # every ancestor of a requested level is scored, to bound it
        needed = order[: max(order.index(lv) for lv in wanted) + 1]

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cached = use_cache and model_bundle is None and encoder_identity(encoder, pretrained)[0] is not None
    if cached:
        fs = extract_features(encoder, ds, records, split, pretrained=pretrained, cache_dir=cache_dir,
                              batch_size=batch_size, device=device, progress=progress)
        by_image = {r.image: i for i, r in enumerate(records)}
        kept = [by_image[im] for im in fs.images]
        feats = torch.nn.functional.normalize(torch.from_numpy(fs.features).float(), dim=-1)
        skipped = fs.skipped
    if model_bundle is None:
        model, _, preprocess, tokenizer, _ = create_encoder(encoder, pretrained=pretrained, device=device)
    else:
        model, preprocess, tokenizer = model_bundle
        model = model.to(device)
    model.eval()
    if not cached:
        feats, kept, skipped = encode_images(model, preprocess, ds, records, device, batch_size, progress)
    records = [records[i] for i in kept]
    scale, bias = _logit_scale(model), _logit_bias(model)

    train = ds.split("train")
    parent_source = "train split" if train else "all records (no train split)"
    results: dict[str, LevelScores] = {}
    for lv in order:
        if lv not in needed:
            continue
        task = make_task(ds, lv, classes if (classes and lv in wanted) else None)
        level_templates = [card.level(lv).template, *user_templates]
        classifier = build_classifier(model, tokenizer, task.classes, level_templates, device).cpu()
        kind = _score_kind(task, multilabel_score, bias)
        raw = class_scores(feats, classifier, scale, task.kind == "multilabel", kind, bias)
        prompts = {c: [t.format(c) for t in level_templates] for c in task.classes}
        res = LevelScores(task=task, images=[r.image for r in records], scores=raw, raw=raw, prompts=prompts, score=kind)
        i = order.index(lv)
        if hierarchical and i > 0:
            up = results[order[i - 1]]
            res.parents = learn_parents(train or ds.records, order[i - 1], lv)
            res.scores = bound_by_parents(raw, task.classes, up.scores, up.task.classes, res.parents)
            orphans = [c for c in task.classes if c not in res.parents]
            if orphans:
                res.notes.append(f"no parent learned (never seen in the {parent_source}), left unbounded: {orphans}")
        results[lv] = res

    evals: dict[str, dict] = {}
    for lv in wanted:
        res = results[lv]
        defined = {id(r) for r in task_records(res.task, records)}
        rows = [i for i, r in enumerate(records) if id(r) in defined]
        y = task_targets(res.task, [records[i] for i in rows])
        res.metrics = evals[lv] = _evaluate(res.task, y, res.scores[rows], bootstrap, seed)
        if res.parents is not None:
            evals[f"{lv} (unbounded)"] = _evaluate(res.task, y, res.raw[rows], bootstrap, seed)
    report = {
        "command": "zeroshot",
        "label": encoder_label(str(encoder)),
        "encoder": str(encoder),
        "pretrained": pretrained,
        "dataset": str(ds.root),
        "dataset_name": card.name,
        "split": split,
        "n_images": len(records),
        "skipped": skipped,
        "features": {"cache": bool(cached and fs.cache_hit), "cache_path": str(fs.cache_path) if cached and fs.cache_path else None},
        "templates": user_templates,
        "hierarchical": hierarchical,
        "parents_from": parent_source if hierarchical else None,
        "logit_scale": scale,
        "levels": {
            lv: {
                "task": results[lv].task.to_dict(),
                "score": results[lv].score,
                "prompts": results[lv].prompts,
                "parents": results[lv].parents,
                "notes": results[lv].notes,
            }
            for lv in wanted
        },
        "results": evals,
    }
    return {lv: results[lv] for lv in wanted}, report


def write_scores_csv(path: str | Path, res: LevelScores) -> Path:
    """One row per image, one column per class (the bounded scores when hierarchical)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["image", *res.task.classes])
            for image, row in zip(res.images, res.scores):
                w.writerow([image, *(f"{v:.6g}" for v in row)])
    return Path(path)
