"""Vectorised drawing primitives on a coordinate grid (soft-edged dots, segments, capsules, ellipses, blur, blend).

Shared by the fundus and X-ray renderers: each returns a float mask or image in [0, 1], anti-aliased
over about one pixel (``px``), so a 64-px image renders in milliseconds without a graphics library.
"""

from __future__ import annotations

import numpy as np


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    u = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0
    yy, xx = np.meshgrid(u, u, indexing="ij")
    return xx, yy


def _rotate(xx: np.ndarray, yy: np.ndarray, angle: float, cx: float = 0.0, cy: float = 0.0):
    c, s = np.cos(angle), np.sin(angle)
    x, y = xx - cx, yy - cy
    return c * x + s * y + cx, -s * x + c * y + cy


def _soft(sd: np.ndarray, px: float) -> np.ndarray:
    """Anti-aliased inside mask from a signed distance (positive inside), one pixel of ramp."""
    return np.clip(sd / px + 0.5, 0.0, 1.0)


def _dots(xx, yy, cx, cy, r, px) -> np.ndarray:
    """Per-dot masks, shape (K, H, W); callers take max or weighted sums."""
    cx = np.asarray(cx, dtype=np.float64)[:, None, None]
    cy = np.asarray(cy, dtype=np.float64)[:, None, None]
    r = np.asarray(r, dtype=np.float64)[:, None, None]
    d = np.sqrt((xx[None] - cx) ** 2 + (yy[None] - cy) ** 2)
    return _soft(r - d, px)


def _segments(xx, yy, a: np.ndarray, b: np.ndarray, halfw: np.ndarray, px: float) -> np.ndarray:
    """Max mask over capsules (segments a->b with half-width), shape (H, W)."""
    if len(a) == 0:
        return np.zeros_like(xx)
    p = np.stack([xx.ravel(), yy.ravel()], 1)  # (N, 2)
    ab = b - a  # (M, 2)
    denom = np.maximum((ab**2).sum(1), 1e-12)
    t = (
        (p[None, :, 0] - a[:, None, 0]) * ab[:, None, 0] + (p[None, :, 1] - a[:, None, 1]) * ab[:, None, 1]
    ) / denom[:, None]
    t = np.clip(t, 0.0, 1.0)
    dx = p[None, :, 0] - (a[:, None, 0] + t * ab[:, None, 0])
    dy = p[None, :, 1] - (a[:, None, 1] + t * ab[:, None, 1])
    d = np.sqrt(dx * dx + dy * dy)
    m = _soft(halfw[:, None] - d, px).max(0)
    return m.reshape(xx.shape)


def _capsule(xx, yy, x0, y0, x1, y1, r, px) -> np.ndarray:
    return _segments(xx, yy, np.array([[x0, y0]]), np.array([[x1, y1]]), np.array([r]), px)


def _ellipse(xx, yy, cx, cy, ax, ay, angle, px) -> np.ndarray:
    x, y = _rotate(xx, yy, angle, cx, cy)
    x, y = x - cx, y - cy
    q = np.sqrt((x / ax) ** 2 + (y / ay) ** 2)
    return _soft((1.0 - q) * min(ax, ay), px)


def _blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Separable Gaussian blur on an (H, W[, C]) array; numpy-only so no scipy dependency."""
    if sigma_px <= 0.05:
        return img
    k = max(1, int(np.ceil(3 * sigma_px)))
    w = np.exp(-0.5 * (np.arange(-k, k + 1) / sigma_px) ** 2)
    w /= w.sum()
    h, wd = img.shape[:2]
    pad = [(k, k), (0, 0)] + [(0, 0)] * (img.ndim - 2)
    p = np.pad(img, pad, mode="edge")
    out = sum(w[j] * p[j : j + h] for j in range(2 * k + 1))
    pad = [(0, 0), (k, k)] + [(0, 0)] * (img.ndim - 2)
    p = np.pad(out, pad, mode="edge")
    return sum(w[j] * p[:, j : j + wd] for j in range(2 * k + 1))


def _blend(img: np.ndarray, mask: np.ndarray, colour, alpha: float = 1.0) -> np.ndarray:
    m = (mask * alpha)[..., None]
    return img * (1.0 - m) + np.asarray(colour, dtype=np.float64) * m
