"""Contrastive objectives: CLIP, SigLIP and MGLL (soft CLIP + point-wise + smooth KL).

All functions take L2-normalised features and an already exponentiated logit scale, as
``open_clip.loss`` does, and compute in float32 (float64 stays float64) with autocast off:
bf16 logits at a scale of 100 lose the differences the softmax needs.

Notation: B images, level l with K_l distinct texts in the (global) batch, I (B, D) image
features, T_l (K_l, D) text features, y_l (B, K_l) binary incidence (y_ik = 1 iff image i
carries text k at level l), s the logit scale, L the number of levels.

CLIP (``clip_loss``)
    L = 1/2 [CE(s I T^T, diag) + CE(s T I^T, diag)], one caption per image; identical to
    ``open_clip.loss.ClipLoss`` on one process.

SigLIP (``siglip_loss``)
    L = -1/B sum_ij log sigmoid(z_ij (s I_i.T_j + b)), z = +1 on the diagonal, -1 elsewhere;
    identical to ``open_clip.loss.SigLipLoss`` on one process.

Soft CLIP, per level (``soft_clip_loss``, paper Eq. 1-2)
    p_ik = softmax_k(s I_i.T_k)            w_ik = y_ik / sum_k y_ik   (image -> text targets)
    q_ki = softmax_i(s T_k.I_i)            v_ki = y_ik / sum_i y_ik   (text -> image targets)
    L_sCLIP = 1/2 [ -1/B sum_i sum_k w_ik log p_ik  -  1/K sum_k sum_i v_ki log q_ki ]
    Each row of w and v sums to one, so the normaliser of each direction is its number of
    rows that hold a positive pair (every image and every column has one by construction).
    With one distinct text per image (y = identity) this is exactly the CLIP loss.
    Gradient w.r.t. the normalised image feature I_i of the image->text half:
        dL/dI_i = s/(2B) * (sum_k p_ik T_k - sum_k w_ik T_k)
    so each image is pulled toward the w-weighted centroid of its texts and away from the
    p-weighted centroid of all texts. The paper's centroid result (V_i proportional to
    sum_k w_ik T_k at the optimum) holds for the image->text term alone, with fixed text
    features, in the limit of large s where p_i can match w_i only through the direction
    of I_i; the text->image term and learned text features move the optimum away from it.

Point-wise, per level (``pointwise_loss``, Eq. 3-4)
    L_P = -1/B sum_i sum_k [y_ik log sig(u_ik) + (1 - y_ik) log(1 - sig(u_ik))],
    u_ik = t I_i.T_k + b with its own learnable t (init 10) and b (init -10), as SigLIP.

Smooth KL across levels (``smooth_kl_loss``, Eq. 5-7)
    For level l the sample-level text of image j is S_lj = normalise(sum_k w_jk T_lk), the
    normalised mean of its level-l label embeddings. P_l = row-softmax(s I S_l^T) over the
    batch (B x B), M = 1/L sum_l P_l and
    L_sKL = sum_l 1/B sum_i KL(P_l,i || M_i).
    log M is taken as logsumexp_l(log P_l) - log L, which is finite whenever the log P_l
    are; log-probabilities come from log_softmax, each row's KL is clamped at >= 0 and the
    whole term is computed in float32. It is finite for logits at +-1e4, bf16 or fp16
    features and identical rows, and exactly zero when all levels agree.

MGLL (``MGLLLoss``)
    L = a1 * mean_l L_sCLIP,l + a2 * mean_l L_P,l + a3 * L_sKL, defaults a1 = 1, a2 = 0, a3 = 0.1
    (the point-wise term is off by default; the option variants below apply when a2 > 0).

Variants (``MGLLOptions``, config keys ``loss.<name>``; the first value of each is the default and
reproduces the objective above; ``benchmarks/ablation.py`` measures each):
    pointwise_reduction   the scale of L_P,l (BCE_ik the pair's binary cross-entropy):
        sum_texts       1/B       sum_i sum_k BCE_ik   (per image, summed over the level's K_l texts)
        mean_pairs      1/(B K_l) sum_i sum_k BCE_ik   (the reference code's scale: a mean over pairs)
        mean_positives  1/P_l     sum_i sum_k BCE_ik,  P_l = sum_ik y_ik (per positive pair)
    pointwise_temperature  learnable: u_ik = t I_i.T_k + b with t, b learnt (init 10, -10);
                           fixed: t = 10, b = -10 held constant (no parameters).
    pointwise_levels      all: L_P = mean over the L levels; fine: mean over levels 2..L only (the
                           coarsest level, e.g. normal / abnormal, carries no point-wise term).
    smooth_kl_levels      all: every level enters M; min_texts: only levels with K_l >= m distinct
                           texts in the batch (m = smooth_kl_min_texts), L_sKL = 0 if fewer than two
                           qualify. A level with two texts makes P_l nearly flat over the batch, which
                           flattens M for every level (benchmarks/results/loss_scales.md).
    smooth_kl_direction   image_to_text: P_l,i = softmax_j(s I_i.S_lj) (rows, as above);
                          text_to_image: Q_l,j = softmax_i(s S_lj.I_i) (columns: a distribution over
                          images per sample text), L_sKL = sum_l 1/B sum_j KL(Q_l,j || mean_l Q_l,j).
    smooth_kl_schedule    a3 is multiplied by r(p), p = step / steps in [0, 1], ramp = smooth_kl_ramp:
        constant  r = 1;   warmup  r = min(1, p / ramp);   decay  r = min(1, (1 - p) / ramp).
    soft_clip_coarse      per-level weights of L_sCLIP: the coarsest level weighs w, every finer one 1,
                          L_sCLIP = (w L_1 + sum_{l>=2} L_l) / (w + L - 1); w = 1 is the plain mean.
    The defaults come from the term study (``benchmarks/ablation.py``, ``benchmarks/results/ablation.md``:
    17 variants x 2 synthetic families x 3 seeds, chosen on the validation split by a rule fixed
    before the runs). At the quickstart budget no added term beat soft CLIP alone on either family;
    soft CLIP + L_sKL (a2 = 0, a3 = 0.1) had the best validation macro AUC (0.8744, against 0.8733
    for soft CLIP alone, 0.8613 for the previous a2 = a3 = 0.1, 0.8544 for the paper's unit
    weights), so it is the default; it is a tie with soft CLIP alone within noise. Every L_P
    variant scored below soft CLIP alone at that budget. At 4x the budget the full objective with
    a2 = a3 = 0.1 was the one variant that beat soft CLIP alone (X-ray, +0.013 test macro AUC,
    t-interval [+0.003, +0.024]); set ``loss.pointwise: 0.1`` for long runs on many-level labels.
    Why L_P hurts early: it sums over every text of a level, so at init its gradient is ~8x soft
    CLIP's; the smooth KL pulls every level toward the mixture M, which the nearly flat coarse
    level (normal / abnormal) flattens (``benchmarks/loss_scales.py``, ``benchmarks/README.md``).

Where this departs from the public reference code (HUANGLIZI/MGLL, models/pretrain.py):
    * features there are not L2-normalised before the logits; here they are (as CLIP);
    * its targets compare strings per sample (B x B columns, one per sample), so two samples
      with the same text are two columns; here each distinct text is one column, so an
      identical text is never a negative;
    * its "soft" CE uses the raw co-occurrence as targets (not row-normalised) and its BCE
      uses those soft targets; here CE uses row/column-normalised targets and BCE the 0/1
      incidence y;
    * its KL runs on raw logits and turns NaN, which the code then skips; here it runs on
      log-probabilities with a stable mixture and cannot produce NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_WEIGHTS = {"soft_clip": 1.0, "pointwise": 0.0, "smooth_kl": 0.1}  # chosen on validation: see the docstring
POINTWISE_REDUCTIONS = ("sum_texts", "mean_pairs", "mean_positives")
FIXED_POINTWISE = (10.0, -10.0)  # SigLIP's initial scale and bias, held fixed by pointwise_temperature=fixed

__all__ = [
    "DEFAULT_WEIGHTS",
    "clip_loss",
    "siglip_loss",
    "soft_clip_loss",
    "pointwise_loss",
    "smooth_kl_loss",
    "sample_text_features",
    "MGLLLoss",
    "MGLLOptions",
    "MGLLWeights",
    "POINTWISE_REDUCTIONS",
    "schedule_factor",
]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with caption i the only positive of image i."""
    dtype = _compute_dtype(image_features, text_features)
    with _no_autocast(image_features.device):
        img, txt = image_features.to(dtype), text_features.to(dtype)
        logits = logit_scale.to(dtype) * img @ txt.T
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
) -> torch.Tensor:
    """Sigmoid pairwise loss, summed over pairs and divided by the number of images."""
    dtype = _compute_dtype(image_features, text_features)
    with _no_autocast(image_features.device):
        img, txt = image_features.to(dtype), text_features.to(dtype)
        logits = logit_scale.to(dtype) * img @ txt.T + logit_bias.to(dtype)
        n = logits.shape[0]
        signs = 2 * torch.eye(n, device=logits.device, dtype=dtype) - 1
        return -F.logsigmoid(signs * logits).sum() / n


def _check_targets(targets: torch.Tensor, n_images: int, n_texts: int, where: str) -> None:
    if targets.shape != (n_images, n_texts):
        raise ValueError(f"{where}: targets have shape {tuple(targets.shape)}, expected ({n_images}, {n_texts})")
    if (targets.sum(dim=1) <= 0).any():
        raise ValueError(f"{where}: every image needs at least one positive text at this level")
    if (targets.sum(dim=0) <= 0).any():
        raise ValueError(f"{where}: every text column needs at least one image that carries it")


def soft_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    targets: torch.Tensor,
    logit_scale: torch.Tensor,
    direction: str = "both",
) -> torch.Tensor:
    """Soft-target CLIP for one level; ``targets`` is the 0/1 incidence y (B, K).

    ``direction`` = "image_to_text" or "text_to_image" returns that half alone (not halved),
    which is what the centroid analysis is about.
    """
    if direction not in ("both", "image_to_text", "text_to_image"):
        raise ValueError(f"direction must be both, image_to_text or text_to_image, got {direction!r}")
    _check_targets(targets, image_features.shape[0], text_features.shape[0], "soft_clip_loss")
    dtype = _compute_dtype(image_features, text_features)
    with _no_autocast(image_features.device):
        img, txt, y = image_features.to(dtype), text_features.to(dtype), targets.to(dtype)
        logits = logit_scale.to(dtype) * img @ txt.T  # (B, K)
        w = y / y.sum(dim=1, keepdim=True)
        v = (y / y.sum(dim=0, keepdim=True)).T  # (K, B)
        i2t = -(w * F.log_softmax(logits, dim=1)).sum() / logits.shape[0]
        if direction == "image_to_text":
            return i2t
        t2i = -(v * F.log_softmax(logits.T, dim=1)).sum() / logits.shape[1]
        if direction == "text_to_image":
            return t2i
        return (i2t + t2i) / 2


def pointwise_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    reduction: str = "sum_texts",
) -> torch.Tensor:
    """Binary cross-entropy on every (image, text) pair of one level; ``reduction`` as in the module doc."""
    if reduction not in POINTWISE_REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(POINTWISE_REDUCTIONS)}, got {reduction!r}")
    _check_targets(targets, image_features.shape[0], text_features.shape[0], "pointwise_loss")
    dtype = _compute_dtype(image_features, text_features)
    with _no_autocast(image_features.device):
        img, txt, y = image_features.to(dtype), text_features.to(dtype), targets.to(dtype)
        logits = scale.to(dtype) * img @ txt.T + bias.to(dtype)
        bce = F.binary_cross_entropy_with_logits(logits, y, reduction="sum")
        if reduction == "mean_pairs":
            return bce / logits.numel()
        if reduction == "mean_positives":
            return bce / y.sum()
        return bce / logits.shape[0]


def sample_text_features(text_features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-image text embedding of a level: the normalised mean of the image's label embeddings."""
    dtype = _compute_dtype(text_features)
    y = targets.to(dtype)
    mean = (y / y.sum(dim=1, keepdim=True).clamp_min(1)) @ text_features.to(dtype)
    return F.normalize(mean, dim=-1)


def smooth_kl_loss(
    image_features: torch.Tensor,
    level_sample_features: Sequence[torch.Tensor],
    logit_scale: torch.Tensor,
    direction: str = "image_to_text",
) -> torch.Tensor:
    """sum_l KL(P_l || M) with P_l the image-to-sample softmax of level l and M their mean.

    ``direction="text_to_image"`` takes each sample text's softmax over the images instead
    (the columns of the same logits).
    """
    if direction not in ("image_to_text", "text_to_image"):
        raise ValueError(f"direction must be image_to_text or text_to_image, got {direction!r}")
    if len(level_sample_features) < 2:
        return image_features.new_zeros((), dtype=_compute_dtype(image_features))
    dtype = _compute_dtype(image_features, *level_sample_features)
    with _no_autocast(image_features.device):
        img = image_features.to(dtype)
        logits = [logit_scale.to(dtype) * img @ s.to(dtype).T for s in level_sample_features]  # (B images, B texts)
        if direction == "text_to_image":
            logits = [z.T for z in logits]  # row j: sample text j over the images
        log_p = torch.stack([F.log_softmax(z, dim=1) for z in logits])  # (L, B, B)
        n_levels = log_p.shape[0]
        log_m = torch.logsumexp(log_p, dim=0) - math.log(n_levels)  # (B, B)
        p = log_p.exp()
        kl_rows = (p * (log_p - log_m.unsqueeze(0))).sum(dim=-1).clamp_min(0.0)  # (L, B)
        return kl_rows.mean(dim=1).sum()


class MGLLWeights(nn.Module):
    """The point-wise term's own learnable scale and bias (SigLIP initialisation)."""

    def __init__(self, init_scale: float = 10.0, init_bias: float = -10.0):
        super().__init__()
        self.pointwise_logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.pointwise_logit_bias = nn.Parameter(torch.tensor(init_bias))


@dataclass(frozen=True)
class MGLLOptions:
    """The variants of the module doc; the defaults are the objective as published here before them."""

    pointwise_reduction: str = "sum_texts"
    pointwise_temperature: str = "learnable"  # learnable | fixed
    pointwise_levels: str = "all"  # all | fine
    smooth_kl_levels: str = "all"  # all | min_texts
    smooth_kl_min_texts: int = 3
    smooth_kl_direction: str = "image_to_text"  # image_to_text | text_to_image
    smooth_kl_schedule: str = "constant"  # constant | warmup | decay
    smooth_kl_ramp: float = 0.5
    soft_clip_coarse: float = 1.0

    def __post_init__(self):
        allowed = {
            "pointwise_reduction": POINTWISE_REDUCTIONS,
            "pointwise_temperature": ("learnable", "fixed"),
            "pointwise_levels": ("all", "fine"),
            "smooth_kl_levels": ("all", "min_texts"),
            "smooth_kl_direction": ("image_to_text", "text_to_image"),
            "smooth_kl_schedule": ("constant", "warmup", "decay"),
        }
        for name, values in allowed.items():
            if getattr(self, name) not in values:
                raise ValueError(f"loss.{name} must be one of {', '.join(values)}, got {getattr(self, name)!r}")
        if self.smooth_kl_min_texts < 1:
            raise ValueError(f"loss.smooth_kl_min_texts must be >= 1, got {self.smooth_kl_min_texts}")
        if not 0 < self.smooth_kl_ramp <= 1:
            raise ValueError(f"loss.smooth_kl_ramp must be in (0, 1], got {self.smooth_kl_ramp}")
        if not 0 <= self.soft_clip_coarse < float("inf"):
            raise ValueError(f"loss.soft_clip_coarse must be a finite weight >= 0, got {self.soft_clip_coarse}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def schedule_factor(schedule: str, progress: float, ramp: float) -> float:
    """r(p) of ``smooth_kl_schedule``: 1, a linear warm-up over the first ``ramp``, or a decay over the last."""
    p = min(max(float(progress), 0.0), 1.0)
    if schedule == "warmup":
        return min(1.0, p / ramp)
    if schedule == "decay":
        return min(1.0, (1.0 - p) / ramp)
    return 1.0


class MGLLLoss(nn.Module):
    """a1 * soft CLIP + a2 * point-wise + a3 * smooth KL over the levels of a batch.

    ``forward`` returns a dict with the weighted total under ``"loss"`` and each unweighted
    term (``"soft_clip"``, ``"pointwise"``, ``"smooth_kl"``) for logging. ``progress`` (step /
    steps, set by the trainer before each step) drives ``smooth_kl_schedule``.
    """

    def __init__(
        self,
        soft_clip_weight: float = DEFAULT_WEIGHTS["soft_clip"],
        pointwise_weight: float = DEFAULT_WEIGHTS["pointwise"],
        smooth_kl_weight: float = DEFAULT_WEIGHTS["smooth_kl"],
        max_logit_scale: float = 100.0,
        options: MGLLOptions | None = None,
    ):
        super().__init__()
        self.soft_clip_weight = soft_clip_weight
        self.pointwise_weight = pointwise_weight
        self.smooth_kl_weight = smooth_kl_weight
        self.max_logit_scale = max_logit_scale
        self.options = options or MGLLOptions()
        self.progress = 0.0
        # Only terms with a weight own parameters: DDP rejects parameters that get no gradient.
        learnable = self.options.pointwise_temperature == "learnable"
        self.pointwise = MGLLWeights() if pointwise_weight and learnable else None

    def _level_weights(self, n_levels: int) -> list[float]:
        return [self.options.soft_clip_coarse if i == 0 and n_levels > 1 else 1.0 for i in range(n_levels)]

    def forward(
        self,
        image_features: torch.Tensor,
        level_text_features: Sequence[torch.Tensor],
        level_targets: Sequence[torch.Tensor],
        logit_scale: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        if len(level_text_features) != len(level_targets) or not level_targets:
            raise ValueError("MGLLLoss needs one (text features, targets) pair per level, at least one level")
        opt = self.options
        if self.pointwise is not None:
            # clamp the log before exp: exp past ~89 is inf in float32 and its gradient NaN
            pw_scale = self.pointwise.pointwise_logit_scale.clamp(max=math.log(self.max_logit_scale)).exp()
            pw_bias = self.pointwise.pointwise_logit_bias
        else:
            pw_scale, pw_bias = (image_features.new_tensor(v) for v in FIXED_POINTWISE)
        zero = image_features.new_zeros((), dtype=_compute_dtype(image_features))
        soft, point = zero, zero
        n_levels = len(level_targets)
        lw = self._level_weights(n_levels)
        pw_levels = range(1, n_levels) if opt.pointwise_levels == "fine" and n_levels > 1 else range(n_levels)
        for i, (txt, y) in enumerate(zip(level_text_features, level_targets)):
            if self.soft_clip_weight and lw[i]:
                soft = soft + lw[i] * soft_clip_loss(image_features, txt, y, logit_scale)
            if self.pointwise_weight and i in pw_levels:
                point = point + pointwise_loss(image_features, txt, y, pw_scale, pw_bias, opt.pointwise_reduction)
        soft, point = soft / max(sum(lw), 1e-12), point / len(pw_levels)
        kl = zero
        factor = schedule_factor(opt.smooth_kl_schedule, self.progress, opt.smooth_kl_ramp)
        if self.smooth_kl_weight:
            kept = [
                (txt, y) for txt, y in zip(level_text_features, level_targets)
                if opt.smooth_kl_levels == "all" or txt.shape[0] >= opt.smooth_kl_min_texts
            ]
            samples = [sample_text_features(txt, y) for txt, y in kept]
            kl = smooth_kl_loss(image_features, samples, logit_scale, opt.smooth_kl_direction)
        total = self.soft_clip_weight * soft + self.pointwise_weight * point + self.smooth_kl_weight * factor * kl
        return {"loss": total, "soft_clip": soft.detach(), "pointwise": point.detach(), "smooth_kl": kl.detach()}
