"""Why do the point-wise and smooth-KL terms not help the tiny encoder's linear probe?

The ablation (``ablation.py``) found that adding L_P and L_sKL with the paper's unit weights
lowers the disease-level probe AUC. This script looks at the three terms on the same batches,
for a random-init encoder and for encoders trained under different weights, and reports for
each term:

* its value, and the norm of its gradient w.r.t. the encoder's parameters: the term's *scale*
  relative to L_sCLIP, which is what a weight multiplies;
* the cosine between its gradient and L_sCLIP's: below zero the two pull the encoder apart;
* for L_sKL, each level's share of the divergence and the entropy of its image-to-sample
  distribution P_l (normalised by log B): a level with few distinct texts (status: normal /
  abnormal) has nearly flat rows, and the mixture M that every level is pulled toward mixes
  those flat rows in.

The point-wise term's own scale and bias are held at their initial values (t = 10, b = -10):
saved encoders do not carry them. Every figure is a mean over the same fixed batches.

    python benchmarks/loss_scales.py                         # trains 3 tiny encoders (~3 min), analyses 4
    python benchmarks/loss_scales.py --no-train --encoder mgll=runs/quickstart/encoder-mgll/encoder
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from mgll.data import RecordImageDataset, collate_records, load_dataset
from mgll.data.synthetic import make_synthetic
from mgll.encoder.batch_texts import build_batch_texts
from mgll.encoder.contrastive import ContrastiveModel
from mgll.encoder.factory import create_encoder
from mgll.encoder.losses import pointwise_loss, sample_text_features, smooth_kl_loss, soft_clip_loss
from mgll.encoder.trainer import train
from mgll.io import atomic_write_json, atomic_write_text
from mgll.quickstart import quickstart_config

TRAINED = {  # label -> loss weights (a2, a3); a1 = 1 throughout
    "sCLIP only": {"pointwise": 0.0, "smooth_kl": 0.0},
    "MGLL a2=a3=1 (paper)": {"pointwise": 1.0, "smooth_kl": 1.0},
    "MGLL a2=a3=0.1 (default)": {"pointwise": 0.1, "smooth_kl": 0.1},
}


def _flat_grad(term: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def _level_stats(img: torch.Tensor, samples: list[torch.Tensor], scale: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per level: mean row entropy of P_l / log B, and mean KL(P_l || M) (the level's share of L_sKL)."""
    log_p = torch.stack([F.log_softmax(scale * img @ s.T, dim=1) for s in samples])
    log_m = torch.logsumexp(log_p, dim=0) - math.log(len(samples))
    p = log_p.exp()
    entropy = (-(p * log_p).sum(-1).mean(-1) / math.log(img.shape[0])).tolist()
    kl = (p * (log_p - log_m)).sum(-1).clamp_min(0).mean(-1).tolist()
    return entropy, kl


def analyse(encoder, tokenizer, levels, batches) -> dict:
    model = ContrastiveModel(encoder, tokenizer, levels, loss="mgll")
    model.eval()  # no dropout: the gradients compared come from the same function
    params = [p for p in encoder.parameters() if p.requires_grad]
    pw_scale, pw_bias = torch.tensor(10.0), torch.tensor(-10.0)
    rows = []
    for images, labels in batches:
        img = F.normalize(encoder.encode_image(images), dim=-1)
        bt = build_batch_texts(labels, levels, captions=False, per_level=True)
        text = model.encode_distinct_texts(bt.texts, images.device)
        level_text = [text[cols] for cols in bt.level_columns]
        targets = list(bt.level_targets)
        scale = model.logit_scale()
        n = len(targets)
        terms = {
            "soft_clip": sum(soft_clip_loss(img, t, y, scale) for t, y in zip(level_text, targets)) / n,
            "pointwise": sum(pointwise_loss(img, t, y, pw_scale, pw_bias) for t, y in zip(level_text, targets)) / n,
        }
        samples = [sample_text_features(t, y) for t, y in zip(level_text, targets)]
        terms["smooth_kl"] = smooth_kl_loss(img, samples, scale)
        grads = {k: _flat_grad(v, params) for k, v in terms.items()}
        entropy, kl = _level_stats(img.detach(), [s.detach() for s in samples], scale.detach())
        rows.append({
            "value": {k: float(v) for k, v in terms.items()},
            "grad_norm": {k: float(g.norm()) for k, g in grads.items()},
            "cos_with_soft_clip": {k: float(F.cosine_similarity(g, grads["soft_clip"], dim=0)) for k, g in grads.items()
                                   if k != "soft_clip"},
            "level_entropy": entropy,
            "level_kl": kl,
            "logit_scale": float(scale),
        })
    mean = lambda xs: statistics.fmean(xs)  # noqa: E731
    out = {
        "value": {k: mean([r["value"][k] for r in rows]) for k in rows[0]["value"]},
        "grad_norm": {k: mean([r["grad_norm"][k] for r in rows]) for k in rows[0]["grad_norm"]},
        "cos_with_soft_clip": {k: mean([r["cos_with_soft_clip"][k] for r in rows]) for k in rows[0]["cos_with_soft_clip"]},
        "level_entropy": [mean([r["level_entropy"][i] for r in rows]) for i in range(len(levels))],
        "level_kl": [mean([r["level_kl"][i] for r in rows]) for i in range(len(levels))],
        "logit_scale": mean([r["logit_scale"] for r in rows]),
    }
    out["grad_ratio_to_soft_clip"] = {k: out["grad_norm"][k] / out["grad_norm"]["soft_clip"] for k in ("pointwise", "smooth_kl")}
    return out


def markdown(results: dict, level_names: list[str], meta: dict) -> str:
    lines = [
        "# Loss-term scales and conflicts on the tiny encoder",
        "",
        f"Measured {meta['date']} on {meta['threads']} CPU threads, torch {torch.__version__}; {meta['seconds']:.0f} s in all.",
        f"Setup: `mgll-tiny-vit`, synthetic fundus ({meta['n']} images, 64 px, seed 0), {meta['batches']} fixed training-split "
        "batches of 32; trained encoders: the quickstart's budget (300 steps, batch 32, seed 0), only the loss weights differ. "
        "Point-wise scale/bias at their init (10, -10). Means over the batches.",
        f"Command: `{meta['command']}`",
        "",
        "| encoder | logit scale | L_sCLIP | L_P | L_sKL | ‖∇L_P‖/‖∇L_sCLIP‖ | ‖∇L_sKL‖/‖∇L_sCLIP‖ | cos(∇L_P, ∇L_sCLIP) | cos(∇L_sKL, ∇L_sCLIP) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        v, g, c = r["value"], r["grad_ratio_to_soft_clip"], r["cos_with_soft_clip"]
        lines.append(
            f"| {name} | {r['logit_scale']:.1f} | {v['soft_clip']:.3f} | {v['pointwise']:.3f} | {v['smooth_kl']:.4f} | "
            f"{g['pointwise']:.2f} | {g['smooth_kl']:.3f} | {c['pointwise']:+.3f} | {c['smooth_kl']:+.3f} |"
        )
    lines += [
        "",
        "Per level (coarse to fine): entropy of the image-to-sample distribution P_l (1 = uniform over the batch) and the "
        "level's KL(P_l ‖ M), whose sum is L_sKL.",
        "",
        "| encoder | " + " | ".join(f"H({n}) / log B" for n in level_names) + " | "
        + " | ".join(f"KL({n} ‖ M)" for n in level_names) + " |",
        "|---|" + "---|" * (2 * len(level_names)),
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | " + " | ".join(f"{x:.3f}" for x in r["level_entropy"]) + " | "
            + " | ".join(f"{x:.4f}" for x in r["level_kl"]) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="synthetic fundus dataset (default: generate 600 images, seed 0, as the ablation)")
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300, help="training steps of each trained encoder")
    ap.add_argument("--no-train", action="store_true", help="analyse only the random init and --encoder ones")
    ap.add_argument("--encoder", action="append", default=[], metavar="LABEL=PATH", help="also analyse this saved encoder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mgll-scales-") as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "fundus"
        if not args.data:
            make_synthetic(data, kind="fundus", n=args.n, size=64, seed=0)
        ds = load_dataset(data)
        levels = ds.card.levels
        encoders = {"random init": "mgll-tiny-vit"}
        if not args.no_train:
            for label, weights in TRAINED.items():
                cfg = quickstart_config(data, Path(tmp) / f"run{len(encoders)}", "mgll", args.steps, 0)
                for term, w in weights.items():
                    setattr(cfg.loss, term, w)
                print(f"training {label} ({args.steps} steps)", flush=True)
                encoders[label] = str(train(cfg, progress=False) / "encoder")
        for spec in args.encoder:
            label, _, path = spec.partition("=")
            if not path:
                ap.error(f"--encoder expects LABEL=PATH, got {spec!r}")
            encoders[label] = path
        results = {}
        for label, path in encoders.items():
            torch.manual_seed(0)
            enc, _, pre_val, tok, _ = create_encoder(path)
            images = RecordImageDataset(ds, split="train", transform=pre_val)
            g = torch.Generator().manual_seed(0)
            order = torch.randperm(len(images), generator=g).tolist()
            batches = [collate_records([images[i] for i in order[b * 32:(b + 1) * 32]]) for b in range(args.batches)]
            print(f"analysing {label}", flush=True)
            results[label] = analyse(enc, tok, levels, batches)
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - t0, "n": args.n, "batches": args.batches,
        "command": " ".join(["python", "benchmarks/loss_scales.py", *sys.argv[1:]]),
    }
    md = markdown(results, [lv.name for lv in levels], meta)
    out = Path(args.out)
    atomic_write_text(out / "loss_scales.md", md)
    atomic_write_json(out / "loss_scales.json", {"meta": meta, "results": results})
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
