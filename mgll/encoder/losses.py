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
    L = a1 * mean_l L_sCLIP,l + a2 * mean_l L_P,l + a3 * L_sKL, defaults a1 = 1, a2 = a3 = 0.1.
    The defaults come from ``benchmarks/ablation.py``: on the tiny encoder with the quickstart's
    budget, a2 = a3 = 1 (the paper's unit weights) lowered the linear-probe macro AUC from 0.924
    (soft CLIP alone) to 0.871; at 0.1 each the full objective reached 0.902 (3 seeds each). The
    point-wise term sums over every text of a level, so at init its gradient is ~8x soft CLIP's;
    the smooth KL pulls every level toward the mixture M, which the nearly flat coarse level
    (normal / abnormal) flattens, and once trained its gradient opposes soft CLIP's
    (``benchmarks/loss_scales.py``; the findings are in ``benchmarks/README.md``).

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

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_WEIGHTS = {"soft_clip": 1.0, "pointwise": 0.1, "smooth_kl": 0.1}

__all__ = [
    "DEFAULT_WEIGHTS",
    "clip_loss",
    "siglip_loss",
    "soft_clip_loss",
    "pointwise_loss",
    "smooth_kl_loss",
    "sample_text_features",
    "MGLLLoss",
    "MGLLWeights",
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
) -> torch.Tensor:
    """Binary cross-entropy on every (image, text) pair of one level, per image."""
    _check_targets(targets, image_features.shape[0], text_features.shape[0], "pointwise_loss")
    dtype = _compute_dtype(image_features, text_features)
    with _no_autocast(image_features.device):
        img, txt, y = image_features.to(dtype), text_features.to(dtype), targets.to(dtype)
        logits = scale.to(dtype) * img @ txt.T + bias.to(dtype)
        bce = F.binary_cross_entropy_with_logits(logits, y, reduction="sum")
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
) -> torch.Tensor:
    """sum_l KL(P_l || M) with P_l the image-to-sample softmax of level l and M their mean."""
    if len(level_sample_features) < 2:
        return image_features.new_zeros((), dtype=_compute_dtype(image_features))
    dtype = _compute_dtype(image_features, *level_sample_features)
    with _no_autocast(image_features.device):
        img = image_features.to(dtype)
        log_p = torch.stack(
            [F.log_softmax(logit_scale.to(dtype) * img @ s.to(dtype).T, dim=1) for s in level_sample_features]
        )  # (L, B, B)
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


class MGLLLoss(nn.Module):
    """a1 * soft CLIP + a2 * point-wise + a3 * smooth KL over the levels of a batch.

    ``forward`` returns a dict with the weighted total under ``"loss"`` and each unweighted
    term (``"soft_clip"``, ``"pointwise"``, ``"smooth_kl"``) for logging.
    """

    def __init__(
        self,
        soft_clip_weight: float = DEFAULT_WEIGHTS["soft_clip"],
        pointwise_weight: float = DEFAULT_WEIGHTS["pointwise"],
        smooth_kl_weight: float = DEFAULT_WEIGHTS["smooth_kl"],
        max_logit_scale: float = 100.0,
    ):
        super().__init__()
        self.soft_clip_weight = soft_clip_weight
        self.pointwise_weight = pointwise_weight
        self.smooth_kl_weight = smooth_kl_weight
        self.max_logit_scale = max_logit_scale
        # Only terms with a weight own parameters: DDP rejects parameters that get no gradient.
        self.pointwise = MGLLWeights() if pointwise_weight else None

    def forward(
        self,
        image_features: torch.Tensor,
        level_text_features: Sequence[torch.Tensor],
        level_targets: Sequence[torch.Tensor],
        logit_scale: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        if len(level_text_features) != len(level_targets) or not level_targets:
            raise ValueError("MGLLLoss needs one (text features, targets) pair per level, at least one level")
        if self.pointwise is not None:
            # clamp the log before exp: exp past ~89 is inf in float32 and its gradient NaN
            pw_scale = self.pointwise.pointwise_logit_scale.clamp(max=math.log(self.max_logit_scale)).exp()
            pw_bias = self.pointwise.pointwise_logit_bias
        zero = image_features.new_zeros((), dtype=_compute_dtype(image_features))
        soft, point = zero, zero
        for txt, y in zip(level_text_features, level_targets):
            if self.soft_clip_weight:
                soft = soft + soft_clip_loss(image_features, txt, y, logit_scale)
            if self.pointwise_weight:
                point = point + pointwise_loss(image_features, txt, y, pw_scale, pw_bias)
        n_levels = len(level_targets)
        soft, point = soft / n_levels, point / n_levels
        kl = zero
        if self.smooth_kl_weight:
            samples = [sample_text_features(txt, y) for txt, y in zip(level_text_features, level_targets)]
            kl = smooth_kl_loss(image_features, samples, logit_scale)
        total = self.soft_clip_weight * soft + self.pointwise_weight * point + self.smooth_kl_weight * kl
        return {"loss": total, "soft_clip": soft.detach(), "pointwise": point.detach(), "smooth_kl": kl.detach()}
