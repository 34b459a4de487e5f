"""Procedural fundus-like and X-ray-like datasets with real multi-granular structure.

They exist so the whole pipeline (contract, training, evaluation, MLLM swap) can be exercised and
tested without downloading a medical dataset. The images are cartoons, but the *structure* is the
point: labels at several granularities that are visibly grounded in the pixels, diseases that
co-occur the way they do clinically, severity that changes both the picture and the text, and
nuisance variation a model has to ignore. Everything is vectorised numpy on a coordinate grid so
600 images at 64 px render in a few seconds on one core.

Determinism: label sampling uses one generator seeded by ``seed``; each image is rendered from its
own generator seeded by ``(seed, index)``, so the bytes do not depend on ``workers``.
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from mgll.io import atomic_path

from .records import DatasetCard, Level, MultiGranularDataset, Record, load_dataset, write_dataset

__all__ = [
    "FUNDUS_DISEASES",
    "FUNDUS_EXPLANATIONS",
    "NORMAL_DISEASE",
    "NORMAL_EXPLANATION",
    "SEVERITIES",
    "NO_FINDING",
    "XRAY_FINDINGS",
    "XRAY_MODALITIES",
    "XRAY_REPORTS",
    "XRAY_SERIES",
    "XRAY_STUDIES",
    "fundus_card",
    "make_synthetic",
    "render_fundus",
    "render_xray",
    "xray_card",
]

FUNDUS_DISEASES: tuple[str, ...] = (
    "age-related macular degeneration",
    "cataract",
    "central serous retinopathy",
    "diabetic retinopathy",
    "glaucoma",
    "media haze",
    "myopia",
    "retinitis pigmentosa",
    "diabetic macular edema",
    "tessellation",
)
AMD, CAT, CSR, DR, GLA, HAZE, MYO, RP, DME, TES = FUNDUS_DISEASES
SEVERITIES: tuple[str, ...] = ("mild", "moderate", "severe")
NORMAL_DISEASE = "normal fundus"
NORMAL_EXPLANATION = "a healthy retina with a clear optic disc and normal vessels"

# One explanation per (disease, severity), mild -> moderate -> severe.
_EXPLAIN: dict[str, tuple[str, str, str]] = {
    AMD: (
        "a few small drusen near the macula, early age-related macular degeneration",
        "multiple yellow drusen clustered around the macula, intermediate age-related macular degeneration",
        "extensive confluent drusen with pigment clumping at the macula, advanced age-related macular degeneration",
    ),
    CAT: (
        "a slightly blurred fundus view from a mild cataract",
        "a hazy washed-out fundus with blurred vessels from a moderate cataract",
        "a dense cataract with a whitish blur obscuring most retinal detail",
    ),
    CSR: (
        "a small round serous detachment at the macula, mild central serous retinopathy",
        "a round raised pale blister at the macula from central serous retinopathy",
        "a large serous macular detachment with a bright rim, severe central serous retinopathy",
    ),
    DR: (
        "a few microaneurysms and dot haemorrhages, mild diabetic retinopathy",
        "scattered retinal haemorrhages with some hard exudates, moderate diabetic retinopathy",
        "severe diabetic retinopathy with many retinal haemorrhages and hard exudates",
    ),
    GLA: (
        "a slightly enlarged optic cup, early glaucomatous cupping",
        "an enlarged pale optic cup with a thinned neuroretinal rim from glaucoma",
        "a very large pale optic cup with almost no neuroretinal rim, advanced glaucoma",
    ),
    HAZE: (
        "a faint local haze over part of the fundus",
        "a patch of media haze softening the retinal detail",
        "dense local media haze obscuring a large part of the retina",
    ),
    MYO: (
        "a small pale crescent beside the optic disc from mild myopia",
        "a temporal peripapillary crescent beside a large optic disc from myopia",
        "a wide peripapillary atrophic crescent around an enlarged optic disc, high myopia",
    ),
    RP: (
        "a few dark bone-spicule pigment clumps in the peripheral retina, early retinitis pigmentosa",
        "bone-spicule pigmentation in the mid-periphery with narrowed vessels, retinitis pigmentosa",
        "dense peripheral bone-spicule pigment with attenuated vessels and a pale disc, advanced retinitis pigmentosa",
    ),
    DME: (
        "a partial ring of hard exudates near the macula, mild diabetic macular edema",
        "a ring of hard exudates around the macula from diabetic macular edema",
        "a dense circinate ring of exudates with macular thickening, severe diabetic macular edema",
    ),
    TES: (
        "faintly visible choroidal vessels giving a mildly tessellated fundus",
        "a striped tessellated fundus with visible choroidal vessels",
        "a strongly tessellated fundus with prominent choroidal vessel stripes",
    ),
}
FUNDUS_EXPLANATIONS: dict[tuple[str, str], str] = {
    (d, sev): texts[i] for d, texts in _EXPLAIN.items() for i, sev in enumerate(SEVERITIES)
}

# Label frequencies follow published fundus datasets, with a long tail (the study in
# benchmarks/ablation.py ran on these priors; they were set before it and are not tuned to it).
#   RFMiD (Pachade et al., Data 2021; 1,920 training images, multi-label): normal 401 (21 %),
#     DR 376 (19.6 %), media haze 317 (16.5 %), optic-disc cupping 282 (14.7 %), tessellation 186
#     (9.7 %), drusen 138 + ARMD 100 (12.4 %), myopia 101 (5.3 %), CSR 37 (1.9 %), RP 6 (0.3 %).
#   ODIR-5K (Peking University, 2019; 3,500 training patients): normal 1,135 (32 %), diabetes 1,131
#     (32 %), cataract 212 (6.1 %), glaucoma 207 (5.9 %), myopia 177 (5.1 %), AMD 171 (4.9 %).
#   APTOS 2019 (3,662 graded images): among DR eyes mild 20 %, moderate 54 %, severe/proliferative
#     26 % (the DR severity mix below); IDRiD/MESSIDOR put DME in roughly a quarter to a third of DR eyes.
# The two sources disagree (RFMiD is a referral clinic, ODIR a screening population), so the
# weights below sit between them. One deliberate departure: RFMiD's rarest classes (RP 0.3 %) are
# raised to about CSR's 2 %, so that a 2,000-image synthetic test split holds ~30 images of every
# disease (the MCQ bank's floor) instead of six; the ordering and the ~15x head-to-tail ratio remain.
_P_NORMAL = 0.27
_PRIMARY = {
    DR: 0.30, GLA: 0.15, AMD: 0.12, CAT: 0.10, TES: 0.09,
    MYO: 0.08, HAZE: 0.06, CSR: 0.03, DME: 0.02, RP: 0.025,
}  # fmt: skip
# Companions: co-occurring pairs seen clinically and in RFMiD/ODIR's multi-label rows (DME on DR,
# tessellation with (high) myopia, media haze with cataract, glaucoma suspects among myopes).
_COMPANIONS: dict[str, tuple[tuple[str, float], ...]] = {
    DME: ((DR, 0.9),),
    DR: ((DME, 0.3), (CAT, 0.1)),
    TES: ((MYO, 0.8),),
    MYO: ((TES, 0.45), (GLA, 0.1)),
    HAZE: ((CAT, 0.7),),
    CAT: ((HAZE, 0.2),),
    GLA: ((MYO, 0.15), (CAT, 0.1)),
    RP: ((CAT, 0.2),),
    CSR: (),
    AMD: ((CAT, 0.08),),
}
_SEVERITY_P = {DR: (0.2, 0.54, 0.26)}  # APTOS 2019 grade mix among DR eyes; others below
_SEVERITY_DEFAULT = (0.4, 0.35, 0.25)
_P_BILATERAL = 0.6  # second eye of a patient repeats the first eye's diseases (systemic disease)

XRAY_MODALITIES: tuple[str, ...] = ("CR (computed radiography)", "DX (digital radiography)")
XRAY_STUDIES: tuple[str, ...] = ("chest", "abdomen", "knee", "hand")
XRAY_SERIES: dict[str, tuple[str, ...]] = {
    "chest": ("pa view", "ap view", "lateral view", "portable ap view"),
    "abdomen": ("ap view", "lateral view", "oblique view"),
    "knee": ("ap view", "lateral view", "oblique view"),
    "hand": ("ap view", "lateral view", "oblique view"),
}
# Chest findings, ChestX-ray14 vocabulary (Wang et al., CVPR 2017; 112,120 frontal films): per-image
# frequencies infiltration 17.7 %, effusion 11.9 %, atelectasis 10.3 %, nodule 5.6 %, mass 5.2 %,
# pneumothorax 4.7 %, consolidation 4.2 %, cardiomegaly 2.5 %, emphysema 2.2 %, edema 2.1 %
# (pneumonia 1.3 %, fibrosis 1.5 %, pleural thickening 3.0 %, hernia 0.2 % are not drawn: no sign a
# 64-px cartoon can carry apart from the others); "No Finding" 53.8 %. Its most frequent pairs are
# effusion + infiltration, effusion + atelectasis, atelectasis + infiltration, cardiomegaly +
# effusion, edema + infiltration / effusion and mass + nodule: the companions below. Severity
# changes the drawing (effusion height, heart size, nodule count, opacity extent) and the report.
XRAY_FINDINGS: tuple[str, ...] = (
    "atelectasis",
    "cardiomegaly",
    "consolidation",
    "edema",
    "effusion",
    "emphysema",
    "infiltration",
    "mass",
    "nodule",
    "pneumothorax",
)
ATE, CMG, CON, EDE, EFF, EMP, INF, MAS, NOD, PTX = XRAY_FINDINGS
NO_FINDING = "no finding"
_XRAY_P_NORMAL = 0.5  # of chest films; companions bring the abnormal share near ChestX-ray14's 46 %
_XRAY_PRIMARY = {
    INF: 0.177, EFF: 0.119, ATE: 0.103, NOD: 0.056, MAS: 0.052,
    PTX: 0.047, CON: 0.042, CMG: 0.025, EMP: 0.022, EDE: 0.021,
}  # fmt: skip
_XRAY_COMPANIONS: dict[str, tuple[tuple[str, float], ...]] = {
    EFF: ((INF, 0.3), (ATE, 0.25)),
    ATE: ((EFF, 0.25), (INF, 0.25)),
    INF: ((ATE, 0.15), (EFF, 0.15)),
    CMG: ((EFF, 0.4), (EDE, 0.2)),
    EDE: ((EFF, 0.4), (INF, 0.3)),
    MAS: ((NOD, 0.2),),
    NOD: ((MAS, 0.15),),
    CON: ((EFF, 0.2), (ATE, 0.15)),
    PTX: ((EMP, 0.1),),
    EMP: ((PTX, 0.15),),
}
# Chest films are the most common radiograph; this 55 % share is an assumption, not a measured figure.
_XRAY_STUDY_P = {"chest": 0.55, "abdomen": 0.15, "knee": 0.15, "hand": 0.15}
_XRAY_REPORT: dict[str, tuple[str, str, str]] = {
    ATE: ("a thin plate-like band of atelectasis at a lung base",
          "a band of atelectasis with some volume loss in the lower lung",
          "dense lobar atelectasis with marked volume loss"),
    CMG: ("a mildly enlarged cardiac silhouette", "moderate cardiomegaly with a widened heart shadow",
          "severe cardiomegaly, the heart filling much of the chest"),
    CON: ("a small focal consolidation", "a lobar consolidation with dense airspace opacity",
          "extensive dense consolidation over most of a lung"),
    EDE: ("mild interstitial edema with faint perihilar haze", "moderate pulmonary edema with perihilar haze",
          "severe alveolar edema in a bilateral bat-wing pattern"),
    EFF: ("a small pleural effusion blunting the costophrenic angle", "a moderate pleural effusion with a meniscus",
          "a large pleural effusion filling the lower half of the hemithorax"),
    EMP: ("mildly hyperlucent lungs from emphysema", "hyperinflated hyperlucent lungs from emphysema",
          "severe emphysema with large hyperlucent overinflated lungs"),
    INF: ("a faint patchy infiltrate", "patchy infiltrates in both lower zones", "widespread patchy infiltrates in both lungs"),
    MAS: ("a small lung mass", "a rounded lung mass", "a large lung mass"),
    NOD: ("a single small pulmonary nodule", "two pulmonary nodules", "several pulmonary nodules"),
    PTX: ("a small apical pneumothorax with a thin pleural line",
          "a moderate pneumothorax with the lung edge displaced from the chest wall",
          "a large pneumothorax with a collapsed lung"),
}
XRAY_REPORTS: dict[tuple[str, str], str] = {
    (f, sev): texts[i] for f, texts in _XRAY_REPORT.items() for i, sev in enumerate(SEVERITIES)
}
XRAY_NORMAL_REPORT = {"chest": "no acute cardiopulmonary abnormality"}


def xray_normal_report(study: str) -> str:
    return XRAY_NORMAL_REPORT.get(study, f"no acute abnormality of the {study}")
_SPLIT_NAMES = ("train", "val", "test")


def fundus_card() -> DatasetCard:
    return DatasetCard(
        name="synthetic-fundus",
        levels=(
            Level("status", "a fundus photograph of a {} eye"),
            Level("disease", "a fundus photograph showing {}"),
            Level("explanation", "{}"),
        ),
        description="Procedurally drawn fundus-like images: status -> disease -> severity-aware explanation.",
    )


def xray_card() -> DatasetCard:
    return DatasetCard(
        name="synthetic-xray",
        levels=(
            Level("modality", "a {} radiograph"),
            Level("study", "an x-ray of the {}"),
            Level("series", "a {}"),
            Level("finding", "an x-ray showing {}"),
            Level("report", "{}"),
        ),
        description="Procedurally drawn radiograph-like images: modality -> body part -> view -> chest finding "
        "(ChestX-ray14 vocabulary) -> severity-aware report sentence.",
    )


# =========================================================================== geometry helpers


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


# =========================================================================== fundus


def _vessel_tree(rng, disc, macula, px, width_scale):
    """Two arcades curving round the macula, two nasal trunks, and short side branches."""
    a_list, b_list, w_list = [], [], []

    def add_polyline(pts, w0, w1):
        n = len(pts) - 1
        for i in range(n):
            a_list.append(pts[i])
            b_list.append(pts[i + 1])
            w_list.append((w0 + (w1 - w0) * i / max(n - 1, 1)) * width_scale)

    dx, dy = disc
    mx, my = macula
    for sign in (-1.0, 1.0):  # superior / inferior arcade
        cx = mx + 0.25 * (dx - mx)
        ax = abs(dx - cx)
        by = rng.uniform(0.38, 0.5)
        phi = np.linspace(0.0, rng.uniform(2.4, 2.8), 12)
        side = np.sign(dx - cx) or 1.0
        xs = cx + side * ax * np.cos(phi) * rng.uniform(1.0, 1.25)
        ys = dy + sign * by * np.sin(phi) + rng.normal(0, 0.012, phi.size)
        xs[0], ys[0] = dx, dy
        pts = np.stack([xs, ys], 1)
        add_polyline(pts, 0.032, 0.018)
        for j in rng.choice(np.arange(3, 10), size=3, replace=False):  # branches off the arcade
            start = pts[j]
            toward = np.array([mx, my]) - start if rng.random() < 0.5 else start - np.array([mx, my])
            toward = toward / (np.linalg.norm(toward) + 1e-9)
            ang = np.arctan2(toward[1], toward[0]) + rng.normal(0, 0.4)
            ln = rng.uniform(0.12, 0.25)
            mid = start + 0.5 * ln * np.array([np.cos(ang), np.sin(ang)])
            ang2 = ang + rng.normal(0, 0.3)
            end = mid + 0.5 * ln * np.array([np.cos(ang2), np.sin(ang2)])
            add_polyline(np.stack([start, mid, end]), 0.018, 0.012)
        # nasal trunk: away from the macula
        away = np.sign(dx - mx) or 1.0
        ang = np.arctan2(sign * rng.uniform(0.5, 1.2), away)
        pts = [np.array([dx, dy])]
        for _ in range(5):
            ang += rng.normal(0, 0.18)
            pts.append(pts[-1] + 0.11 * np.array([np.cos(ang), np.sin(ang)]))
        add_polyline(np.stack(pts), 0.026, 0.015)
    return np.array(a_list), np.array(b_list), np.array(w_list) / 2.0


def _random_points_in_annulus(rng, n, cx, cy, r0, r1):
    ang = rng.uniform(0, 2 * np.pi, n)
    rad = np.sqrt(rng.uniform(r0**2, r1**2, n))
    return cx + rad * np.cos(ang), cy + rad * np.sin(ang)


def render_fundus(diseases: dict[str, int], size: int, seed: Sequence[int]) -> np.ndarray:
    """Render one fundus-like RGB uint8 image.

    ``diseases`` maps disease name -> severity index (0 mild, 1 moderate, 2 severe). Nuisance
    variation and lesion placement come from two independent streams of ``seed``, so rendering the
    same seed with and without a disease isolates that disease's visual sign (used by the tests).
    """
    unknown = set(diseases) - set(FUNDUS_DISEASES)
    if unknown:
        raise ValueError(f"unknown diseases {sorted(unknown)}")
    seed = [int(s) for s in seed]
    rng = np.random.default_rng([*seed, 0])  # anatomy + nuisance
    les = np.random.default_rng([*seed, 1])  # lesions
    px = 2.0 / size
    xx0, yy0 = _grid(size)
    r_img = np.sqrt(xx0**2 + yy0**2)

    # nuisance
    fov = rng.uniform(0.86, 0.98)
    angle = rng.uniform(-0.2, 0.2)
    side = 1.0 if rng.random() < 0.5 else -1.0  # right eye: disc on the image right
    brightness = rng.uniform(0.82, 1.15)
    contrast = rng.uniform(0.8, 1.2)
    tint = 1.0 + rng.uniform(-0.08, 0.08, 3)
    noise_sd = rng.uniform(0.004, 0.02)
    pigment = rng.uniform(0.85, 1.1)
    xx, yy = _rotate(xx0, yy0, angle)
    r = r_img / fov

    disc = np.array([side * rng.uniform(0.38, 0.46), rng.uniform(-0.06, 0.04)])
    macula = np.array([-side * rng.uniform(0.0, 0.07), rng.uniform(-0.02, 0.05)])
    s = {d: int(v) for d, v in diseases.items()}

    # background: orange-red with vignetting and low-frequency choroidal mottling
    base = np.array([0.82, 0.36, 0.14]) * pigment
    vign = 1.0 - 0.45 * np.clip(r, 0, 1) ** 2
    mott = 1.0 + 0.04 * np.sin(rng.uniform(2, 5) * xx + rng.uniform(0, 6)) * np.sin(
        rng.uniform(2, 5) * yy + rng.uniform(0, 6)
    )
    img = base[None, None, :] * (vign * mott)[..., None]

    if TES in s:  # striped choroidal vessels, strongest away from the posterior pole
        k = 2 * np.pi / les.uniform(0.13, 0.16)
        theta = les.uniform(0, np.pi)
        u = xx * np.cos(theta) + yy * np.sin(theta)
        v = -xx * np.sin(theta) + yy * np.cos(theta)
        stripes = np.clip(np.sin(k * u + 1.8 * np.sin(3.0 * v + les.uniform(0, 6))), 0, 1)
        strength = (0.3, 0.45, 0.6)[s[TES]] * np.clip(0.4 + r, 0, 1)
        img = img * (1.0 - (strength * stripes)[..., None] * np.array([0.7, 1.0, 1.0]))

    # macula: darker, slightly browner
    dm = np.sqrt((xx - macula[0]) ** 2 + (yy - macula[1]) ** 2)
    img = img * (1.0 - (0.38 * np.exp(-((dm / 0.13) ** 2)))[..., None] * np.array([0.8, 1.0, 1.0]))

    # retinal vessels (attenuated in retinitis pigmentosa)
    wscale = (0.85, 0.7, 0.55)[s[RP]] if RP in s else 1.0
    wscale *= max(1.0, 0.9 * 64 / size) if size < 64 else 1.0
    va, vb, vw = _vessel_tree(rng, disc, macula, px, wscale * rng.uniform(0.9, 1.1))
    vmask = _segments(xx, yy, va, vb, vw, px)
    img = _blend(img, vmask, np.array([0.5, 0.08, 0.05]) * pigment, 0.85)

    # optic disc (+ myopic enlargement and crescent, glaucomatous cupping, pale waxy disc in RP)
    rd = rng.uniform(0.11, 0.135)
    if MYO in s:
        rd *= (1.2, 1.35, 1.5)[s[MYO]]
    dd = np.sqrt((xx - disc[0]) ** 2 + (yy - disc[1]) ** 2)
    if MYO in s:
        to_mac = np.arctan2(macula[1] - disc[1], macula[0] - disc[0])
        ang = np.arctan2(yy - disc[1], xx - disc[0])
        within = np.cos(ang - to_mac)
        outer = rd * (1.45, 1.75, 2.1)[s[MYO]]
        cres = _soft(outer - dd, px) * np.clip((within - 0.15) * 2.5, 0, 1)
        img = _blend(img, cres, (0.97, 0.86, 0.7), 0.9)
    disc_col = np.array([0.98, 0.7, 0.42])
    if RP in s and s[RP] == 2:
        disc_col = np.array([1.0, 0.93, 0.8])
    img = _blend(img, _soft(rd - dd, px * 1.5), disc_col, 0.92)
    cup = rng.uniform(0.25, 0.4)
    if GLA in s:
        cup = (0.6, 0.72, 0.86)[s[GLA]] + les.uniform(-0.03, 0.03)
    cup_col = (1.0, 0.98, 0.92) if GLA in s else (1.0, 0.9, 0.68)
    img = _blend(img, _soft(cup * rd - dd, px), cup_col, 0.95)
    # vessel trunks cross the disc rim
    img = _blend(img, vmask * _soft(dd - cup * rd, px), np.array([0.6, 0.15, 0.1]), 0.5)

    # ---- lesions
    if AMD in s:
        n = (6, 12, 22)[s[AMD]]
        cx, cy = _random_points_in_annulus(les, n, macula[0], macula[1], 0.03, 0.28)
        rr = les.uniform(0.028, 0.045, n) + 0.006 * s[AMD]
        img = _blend(img, _dots(xx, yy, cx, cy, rr, px).max(0), (0.98, 0.88, 0.38), 0.95)
        if s[AMD] == 2:
            cx, cy = _random_points_in_annulus(les, 4, macula[0], macula[1], 0.0, 0.12)
            img = _blend(img, _dots(xx, yy, cx, cy, np.full(4, 0.03), px).max(0), (0.2, 0.1, 0.05), 0.8)
    if DR in s:
        n = (5, 12, 24)[s[DR]]
        cx, cy = _random_points_in_annulus(les, n, 0.0, 0.0, 0.1, 0.72 * fov)
        rr = les.uniform(0.022, 0.04, n) * (1.0 + 0.2 * s[DR])
        img = _blend(img, _dots(xx, yy, cx, cy, rr, px).max(0), (0.32, 0.02, 0.02), 0.95)
        ne = (2, 6, 12)[s[DR]]
        cx, cy = _random_points_in_annulus(les, ne, macula[0], macula[1], 0.08, 0.45)
        img = _blend(
            img, _dots(xx, yy, cx, cy, les.uniform(0.02, 0.034, ne), px).max(0), (1.0, 0.92, 0.45), 0.95
        )
        if s[DR] == 2:  # cotton-wool spots
            cx, cy = _random_points_in_annulus(les, 3, 0.0, 0.0, 0.15, 0.6)
            img = _blend(img, _dots(xx, yy, cx, cy, np.full(3, 0.05), px * 2).max(0), (0.95, 0.9, 0.85), 0.7)
    if DME in s:
        n = (9, 14, 22)[s[DME]]
        arc = (1.1, 1.6, 2.0)[s[DME]] * np.pi
        start = les.uniform(0, 2 * np.pi)
        ang = start + np.sort(les.uniform(0, arc, n))
        rad = les.uniform(0.15, 0.2) + les.normal(0, 0.015, n)
        cx, cy = macula[0] + rad * np.cos(ang), macula[1] + rad * np.sin(ang)
        img = _blend(
            img, _dots(xx, yy, cx, cy, les.uniform(0.024, 0.036, n), px).max(0), (1.0, 0.95, 0.5), 0.97
        )
        if s[DME] == 2:
            img = _blend(img, np.exp(-((dm / 0.12) ** 2)), (0.95, 0.8, 0.45), 0.35)
    if CSR in s:
        c = macula + les.normal(0, 0.03, 2)
        rc = (0.13, 0.18, 0.23)[s[CSR]]
        dc = np.sqrt((xx - c[0]) ** 2 + (yy - c[1]) ** 2)
        img = _blend(img, _soft(rc - dc, px * 1.5), (0.92, 0.62, 0.42), 0.5)
        ring = _soft(px * 1.2 - np.abs(dc - rc), px)
        img = _blend(img, ring, (1.0, 0.85, 0.7), 0.55)
    if RP in s:
        n = (16, 32, 60)[s[RP]]
        cx, cy = _random_points_in_annulus(les, n, 0.0, 0.0, 0.5 * fov, 0.9 * fov)
        ang = les.uniform(0, np.pi, n)
        ln = les.uniform(0.03, 0.07, n)
        a = np.stack([cx - ln * np.cos(ang), cy - ln * np.sin(ang)], 1)
        b = np.stack([cx + ln * np.cos(ang), cy + ln * np.sin(ang)], 1)
        img = _blend(img, _segments(xx, yy, a, b, les.uniform(0.012, 0.02, n), px), (0.1, 0.05, 0.04), 0.92)

    # media opacities: cataract everywhere, media haze locally
    fov_mask = _soft(1.0 - r, px / fov)
    img = img * fov_mask[..., None]
    if HAZE in s:
        c = _random_points_in_annulus(les, 1, 0.0, 0.0, 0.0, 0.45)
        hr = les.uniform(0.35, 0.5)
        hm = np.exp(-(((xx - c[0]) ** 2 + (yy - c[1]) ** 2) / hr**2))[..., None] * fov_mask[..., None]
        bl = _blur(img, (0.7, 1.1, 1.6)[s[HAZE]] * size / 64)
        img = img * (1 - hm) + bl * hm
        img = _blend(img, hm[..., 0], (0.85, 0.78, 0.68), (0.3, 0.42, 0.55)[s[HAZE]])
    if CAT in s:
        img = _blur(img, (0.9, 1.5, 2.3)[s[CAT]] * size / 64)
        img = _blend(img, fov_mask, (0.86, 0.8, 0.7), (0.22, 0.36, 0.5)[s[CAT]])

    # global photometric nuisance
    img = img * tint[None, None, :] * brightness
    mean = (img * fov_mask[..., None]).sum((0, 1)) / max(fov_mask.sum(), 1.0)
    img = (img - mean) * contrast + mean
    img = img + rng.normal(0, noise_sd, img.shape)
    img = img * fov_mask[..., None]
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _sample_fundus_diseases(rng: np.random.Generator) -> dict[str, int]:
    if rng.random() < _P_NORMAL:
        return {}
    names = list(_PRIMARY)
    p = np.array([_PRIMARY[k] for k in names])
    primary = names[rng.choice(len(names), p=p / p.sum())]
    chosen = [primary]
    for comp, prob in _COMPANIONS[primary]:
        if rng.random() < prob and comp not in chosen:
            chosen.append(comp)
    if len(chosen) < 3 and rng.random() < 0.08:  # an unrelated incidental finding
        other = [d for d in FUNDUS_DISEASES if d not in chosen and d != AMD]
        chosen.append(other[rng.integers(len(other))])
    return {d: _sample_severity(rng, d) for d in chosen[:3]}


def _sample_severity(rng: np.random.Generator, disease: str | None = None) -> int:
    return int(rng.choice(3, p=list(_SEVERITY_P.get(disease, _SEVERITY_DEFAULT))))


def _fundus_labels(diseases: dict[str, int]) -> dict[str, tuple[str, ...]]:
    if not diseases:
        return {"status": ("normal",), "disease": (NORMAL_DISEASE,), "explanation": (NORMAL_EXPLANATION,)}
    ordered = [d for d in FUNDUS_DISEASES if d in diseases]
    return {
        "status": ("abnormal",),
        "disease": tuple(ordered),
        "explanation": tuple(FUNDUS_EXPLANATIONS[(d, SEVERITIES[diseases[d]])] for d in ordered),
    }


def _plan_fundus(n: int, rng: np.random.Generator) -> list[tuple[str, dict]]:
    """(patient, spec) per image: patients contribute a right and a left eye, often with the same disease."""
    plan: list[tuple[str, dict]] = []
    pid = 0
    while len(plan) < n:
        patient = f"p{pid:05d}"
        first = _sample_fundus_diseases(rng)
        plan.append((patient, {"diseases": first}))
        if len(plan) < n:
            if first and rng.random() < _P_BILATERAL:
                second = {d: _sample_severity(rng, d) for d in first}
            else:
                second = _sample_fundus_diseases(rng)
            plan.append((patient, {"diseases": second}))
        pid += 1
    return plan


# =========================================================================== x-ray


def _chest(xx, yy, px, view, rng, heart_scale: float = 1.0):
    d = np.zeros_like(xx)
    if view == "lateral view":
        d += 0.42 * _ellipse(xx, yy, 0.0, 0.15, 0.6, 1.05, 0.0, px)
        d -= 0.28 * _ellipse(xx, yy, 0.02, -0.05, 0.38, 0.55, 0.1, px)
        d += 0.22 * _ellipse(xx, yy, -0.15, 0.3, 0.25 * heart_scale, 0.22 * min(heart_scale, 1.2), 0.3, px)  # heart, anterior
        for k in range(8):  # vertebral bodies posteriorly
            y = -0.85 + k * 0.24
            d += 0.35 * _ellipse(xx, yy, 0.42, y, 0.09, 0.09, 0.0, px)
        d += 0.2 * _capsule(xx, yy, -0.5, -0.6, -0.45, 0.45, 0.03, px)  # sternum
        return d
    ap = view != "pa view"
    d += 0.42 * _ellipse(xx, yy, 0.0, 0.15, 0.9, 1.1, 0.0, px)
    lungs = _ellipse(xx, yy, -0.37, -0.05, 0.28, 0.56, 0.05, px) + _ellipse(
        xx, yy, 0.37, -0.05, 0.28, 0.56, -0.05, px
    )
    d -= 0.3 * lungs
    hw = (rng.uniform(0.3, 0.36) if ap else rng.uniform(0.23, 0.27)) * heart_scale  # AP magnifies the heart
    d += 0.26 * _ellipse(xx, yy, 0.1, 0.32, hw, 0.22 * min(heart_scale, 1.2), -0.2, px)
    d += 0.25 * _capsule(xx, yy, 0.0, -1.1, 0.0, 1.1, 0.07, px)  # spine
    period = rng.uniform(0.15, 0.18)
    ribs = np.clip((np.cos(2 * np.pi * (yy - 0.3 * np.abs(xx) ** 1.5) / period) - 0.55) * 3.0, 0, 1)
    d += 0.14 * ribs * np.clip(lungs * 1.2, 0, 1)
    cy = -0.86 if ap else -0.76
    tilt = 0.02 if ap else 0.1
    for sgn in (-1, 1):
        d += 0.28 * _capsule(xx, yy, sgn * 0.06, cy, sgn * 0.58, cy - tilt, 0.035, px)  # clavicles
        if ap:  # scapulae project over the lungs on AP
            d += 0.12 * _ellipse(xx, yy, sgn * 0.62, -0.35, 0.16, 0.32, sgn * 0.3, px)
    return d


def _abdomen(xx, yy, px, view, rng):
    d = np.zeros_like(xx)
    lateral = view == "lateral view"
    d += 0.45 * _ellipse(xx, yy, 0.0, 0.0, 0.55 if lateral else 0.92, 1.15, 0.0, px)
    sx = 0.35 if lateral else 0.0
    for k in range(8):  # vertebral bodies
        y = -0.95 + k * 0.22
        d += 0.3 * _ellipse(xx, yy, sx, y, 0.1 if not lateral else 0.12, 0.085, 0.0, px)
    if not lateral:
        for sgn in (-1, 1):
            d += 0.22 * _ellipse(xx, yy, sgn * 0.45, 0.82, 0.32, 0.24, sgn * 0.4, px)  # iliac wings
    n = rng.integers(8, 16)
    gx = rng.uniform(-0.6, 0.6, n) * (0.55 if lateral else 1.0) - (0.1 if lateral else 0.0)
    gy = rng.uniform(-0.6, 0.6, n)
    for x, y in zip(gx, gy):
        d -= 0.22 * _ellipse(
            xx, yy, x, y, rng.uniform(0.05, 0.12), rng.uniform(0.04, 0.08), rng.uniform(0, np.pi), px
        )
    return d


def _knee(xx, yy, px, view, rng):
    d = np.zeros_like(xx)
    if view == "lateral view":
        flex = rng.uniform(0.2, 0.45)
        d += 0.3 * _ellipse(xx, yy, 0.0, 0.0, 0.5, 1.3, 0.0, px)
        fx, tx = -np.sin(flex) * 1.1, np.sin(flex * 0.6) * 1.1
        d += 0.42 * _capsule(xx, yy, fx, -1.2, 0.0, -0.12, 0.16, px)
        d += 0.35 * _ellipse(xx, yy, 0.04, -0.1, 0.2, 0.14, 0.0, px)  # overlapping condyles
        d += 0.42 * _capsule(xx, yy, 0.02, 0.1, tx, 1.2, 0.14, px)
        d += 0.25 * _capsule(xx, yy, 0.14, 0.2, tx + 0.12, 1.2, 0.045, px)  # fibula, behind tibia
        d += 0.4 * _ellipse(xx, yy, -0.27, -0.12, 0.07, 0.14, 0.2, px)  # patella, anterior
        return d
    oblique = view == "oblique view"
    d += 0.3 * _ellipse(xx, yy, 0.0, 0.0, 0.55, 1.3, 0.0, px)
    d += 0.42 * _capsule(xx, yy, 0.0, -1.2, 0.0, -0.2, 0.17, px)
    d -= 0.1 * _capsule(xx, yy, 0.0, -1.2, 0.0, -0.35, 0.08, px)  # medullary canal
    d += 0.4 * _ellipse(xx, yy, -0.13, -0.1, 0.14, 0.1, 0.0, px)
    d += 0.4 * _ellipse(
        xx, yy, 0.13, -0.1 + (0.04 if oblique else 0.0), 0.14 * (0.8 if oblique else 1.0), 0.1, 0.0, px
    )
    d += 0.42 * _ellipse(xx, yy, 0.0, 0.07, 0.3, 0.06, 0.0, px)  # tibial plateau
    d += 0.42 * _capsule(xx, yy, 0.0, 0.1, 0.0, 1.2, 0.15, px)
    d -= 0.1 * _capsule(xx, yy, 0.0, 0.3, 0.0, 1.2, 0.07, px)
    fib = 0.14 if oblique else 0.27  # oblique: fibula overlaps the tibia
    d += 0.3 * _capsule(xx, yy, fib, 0.2, fib - 0.03, 1.2, 0.05, px)
    d += 0.1 * _ellipse(xx, yy, 0.0, -0.12, 0.1, 0.12, 0.0, px)  # patella seen through the femur
    return d


def _hand(xx, yy, px, view, rng):
    d = np.zeros_like(xx)
    bones_a, bones_b, bones_r = [], [], []

    def bone(x0, y0, x1, y1, r):
        bones_a.append((x0, y0))
        bones_b.append((x1, y1))
        bones_r.append(r)

    wrist = np.array([0.0, 0.85])
    if view == "lateral view":
        d += 0.3 * _ellipse(xx, yy, 0.0, 0.35, 0.16, 0.5, 0.0, px)
        angs = -np.pi / 2 + np.linspace(-0.05, 0.05, 4)
        spread = [0.0, 0.025, 0.05, 0.075]
    else:
        d += 0.3 * _ellipse(xx, yy, 0.0, 0.42, 0.38, 0.38, 0.0, px)
        sp = rng.uniform(0.12, 0.2)
        angs = -np.pi / 2 + np.array([-1.5, -0.5, 0.5, 1.5]) * sp
        spread = [-0.22, -0.075, 0.075, 0.22]
    lengths = [0.36, 0.42, 0.4, 0.32]
    for ang, off, ln in zip(angs, spread, lengths):
        base = wrist + np.array([off * 0.6, -0.05])
        knuckle = base + np.array([off * 0.6, 0.0]) + 0.55 * np.array([np.cos(ang), np.sin(ang)])
        bone(*base, *knuckle, 0.035)
        p = knuckle
        for frac in (0.45, 0.32, 0.23):
            q = p + (ln * frac / 0.5) * 0.5 * np.array([np.cos(ang), np.sin(ang)]) * 1.1
            gap = 0.03 * (q - p) / np.linalg.norm(q - p)
            bone(*(p + gap), *(q - gap), 0.028)
            d += 0.3 * _capsule(xx, yy, *p, *q, 0.065, px)  # finger soft tissue
            p = q
    # thumb
    t_ang = -np.pi / 2 - (1.0 if view != "lateral view" else 0.5)
    p = wrist + np.array([-0.2, -0.05])
    for ln in (0.3, 0.22, 0.17):
        q = p + ln * np.array([np.cos(t_ang), np.sin(t_ang)])
        gap = 0.03 * (q - p) / np.linalg.norm(q - p)
        bone(*(p + gap), *(q - gap), 0.033)
        d += 0.3 * _capsule(xx, yy, *p, *q, 0.07, px)
        p = q
        t_ang += 0.25
    d = np.minimum(d, 0.3)  # soft tissue does not stack
    for k in range(6):  # carpals
        d += 0.3 * _ellipse(xx, yy, -0.15 + 0.06 * k, 0.88 + 0.05 * (k % 2), 0.045, 0.04, 0.0, px)
    d += 0.3 * _capsule(xx, yy, -0.12, 0.97, -0.14, 1.3, 0.07, px)
    d += 0.3 * _capsule(xx, yy, 0.12, 0.97, 0.13, 1.3, 0.05, px)
    d += 0.45 * _segments(xx, yy, np.array(bones_a), np.array(bones_b), np.array(bones_r), px)
    return d


def _chest_findings(xx, yy, px, view, findings: dict[str, int], les) -> np.ndarray:
    """Attenuation added (opacities) or removed (lucencies) by chest findings, severity 0-2."""
    d = np.zeros_like(xx)
    lateral = view == "lateral view"
    if lateral:
        lungs = [(0.02, -0.05, 0.38, 0.55)]
    else:
        lungs = [(-0.37, -0.05, 0.28, 0.56), (0.37, -0.05, 0.28, 0.56)]
    masks = [_ellipse(xx, yy, cx, cy, ax, ay, 0.0, px) for cx, cy, ax, ay in lungs]
    both = np.clip(sum(masks), 0, 1)

    def lung():
        i = int(les.integers(len(lungs)))
        return lungs[i], masks[i]

    def point_in(lb, frac=0.7, y_range=(-1.0, 1.0)):
        cx, cy, ax, ay = lb
        r, a = np.sqrt(les.uniform(0, 1)) * frac, les.uniform(0, 2 * np.pi)
        return cx + ax * r * np.cos(a), float(np.clip(cy + ay * r * np.sin(a), *y_range))

    for f, sev in findings.items():
        if f == EFF:  # fluid in the dependent base with a meniscus rising laterally
            (cx, cy, ax, ay), m = lung()
            h = (0.22, 0.38, 0.55)[sev] * ay * 2
            lateralness = np.clip(np.abs(xx - cx) / ax, 0, 1) if not lateral else 0.0
            level = cy + ay - h - 0.12 * lateralness
            d += 0.32 * m * _soft(yy - level, px * 2)
        elif f == ATE:  # plate-like band in a lower zone, thicker and denser with severity
            lb, m = lung()
            cx, cy, ax, ay = lb
            y0 = cy + ay * les.uniform(0.2, 0.45)
            tilt = les.uniform(-0.15, 0.15)
            band = _capsule(xx, yy, cx - 0.8 * ax, y0 - tilt, cx + 0.8 * ax, y0 + tilt, (0.025, 0.045, 0.07)[sev], px)
            d += (0.22, 0.26, 0.3)[sev] * band * m
        elif f == INF:  # patchy ill-defined opacities: thresholded smooth noise inside the lungs
            noise = _blur(les.normal(0, 1, xx.shape), 2.5 * xx.shape[0] / 64)
            noise /= noise.std() + 1e-9
            patch = np.clip(noise - (1.2, 0.7, 0.2)[sev], 0, 1)
            d += 0.2 * patch * both
        elif f == CON:  # dense homogeneous airspace opacity in one lobe
            lb, m = lung()
            x, y = point_in(lb, 0.45)
            r = (0.12, 0.18, 0.25)[sev]
            blob = _blur(_ellipse(xx, yy, x, y, r, r * 1.3, les.uniform(0, np.pi), px), 1.0 * xx.shape[0] / 64)
            d += 0.32 * blob * m
        elif f == EDE:  # bilateral perihilar haze (bat wings), denser with severity
            hila = [(0.0, -0.05)] if lateral else [(-0.2, -0.02), (0.2, -0.02)]
            haze = sum(np.exp(-(((xx - hx) ** 2) / 0.05 + ((yy - hy) ** 2) / 0.09)) for hx, hy in hila)
            d += (0.1, 0.16, 0.24)[sev] * np.clip(haze, 0, 1) * both
        elif f == EMP:  # hyperlucent, over-expanded lungs
            big = [_ellipse(xx, yy, cx, cy + 0.04, ax * 1.08, ay * 1.12, 0.0, px) for cx, cy, ax, ay in lungs]
            d -= (0.08, 0.13, 0.18)[sev] * np.clip(sum(big), 0, 1)
        elif f == NOD:  # 1-3 small round dense dots
            k = sev + 1
            pts = [point_in(lung()[0], 0.75) for _ in range(k)]
            rr = les.uniform(0.035, 0.05, k)
            d += 0.3 * _dots(xx, yy, [p[0] for p in pts], [p[1] for p in pts], rr, px).max(0)
        elif f == MAS:  # one larger round opacity
            x, y = point_in(lung()[0], 0.5)
            r = (0.09, 0.13, 0.17)[sev]
            d += 0.34 * _dots(xx, yy, [x], [y], [r], px)[0]
        elif f == PTX:  # lucent rim without lung markings at the apex / lateral edge, thin pleural line
            (cx, cy, ax, ay), m = lung()
            w = (0.1, 0.2, 0.32)[sev]
            inner = _ellipse(xx, yy, cx + (0.0 if lateral else np.sign(cx) * -w * 0.3), cy + w * 0.6,
                             max(ax - w * 0.6, 0.05), max(ay - w, 0.1), 0.0, px)
            rim = np.clip(m - inner, 0, 1)
            d -= 0.16 * rim
            line = _soft(px * 1.2 - np.abs(inner - 0.5) * px * 4, px) * m
            d += 0.12 * line
    return d


_XRAY_DRAW = {"chest": _chest, "abdomen": _abdomen, "knee": _knee, "hand": _hand}


def render_xray(
    modality: str, study: str, series: str, size: int, seed: Sequence[int], findings: dict[str, int] | None = None
) -> np.ndarray:
    """Render one radiograph-like grayscale uint8 image.

    Structures add up as attenuation (like a line integral), then a modality-specific detector
    response is applied: CR gets a flatter contrast curve, veil and coarse correlated grain with
    plate scan lines; DX gets a steeper curve and fine, faint noise. ``findings`` (chest only) maps
    a finding to its severity (0 mild .. 2 severe); lesions come from their own stream of ``seed``,
    so rendering the same seed with and without a finding isolates its sign (used by the tests).
    """
    findings = dict(findings or {})
    unknown = set(findings) - set(XRAY_FINDINGS)
    if unknown:
        raise ValueError(f"unknown findings {sorted(unknown)}")
    if findings and study != "chest":
        raise ValueError(f"findings are drawn on chest films only, not {study!r}")
    if modality not in XRAY_MODALITIES:
        raise ValueError(f"unknown modality {modality!r}")
    if series not in XRAY_SERIES.get(study, ()):
        raise ValueError(f"unknown study/series {study!r}/{series!r}")
    rng = np.random.default_rng([int(s) for s in seed])
    px = 2.0 / size
    xx, yy = _grid(size)
    scale = rng.uniform(0.92, 1.08)
    shift = rng.uniform(-0.05, 0.05, 2)
    angle = rng.uniform(-0.06, 0.06)
    if series == "portable ap view":
        angle += rng.choice([-1, 1]) * rng.uniform(0.12, 0.22)
    if series == "oblique view":
        angle += rng.choice([-1, 1]) * rng.uniform(0.35, 0.55)
    gx, gy = _rotate(xx, yy, angle)
    gx, gy = (gx - shift[0]) / scale, (gy - shift[1]) / scale
    if series == "oblique view":
        gx = gx / 0.8  # foreshortening
    if study == "chest":
        heart = (1.3, 1.45, 1.6)[findings[CMG]] if CMG in findings else 1.0
        dens = _chest(gx, gy, px / scale, series, rng, heart_scale=heart)
        if findings:
            les = np.random.default_rng([*(int(s) for s in seed), 1])
            dens = dens + _chest_findings(gx, gy, px / scale, series, findings, les)
    else:
        dens = _XRAY_DRAW[study](gx, gy, px / scale, series, rng)
    dens = np.clip(dens, 0, None)

    if modality.startswith("CR"):
        img = 1.0 - np.exp(-2.2 * dens)
        img = 0.1 + 0.72 * img / (1.0 - np.exp(-2.2))
        img = _blur(img, 0.7 * size / 64)
        grain = _blur(rng.normal(0, 1, img.shape), 1.0 * size / 64)
        img = img + 0.05 * grain / (grain.std() + 1e-9)
        img = img + rng.normal(0, 0.02, (size, 1))  # plate read-out lines
    else:
        img = 1.0 - np.exp(-2.8 * dens)
        img = img / (1.0 - np.exp(-2.8))
        img = np.clip(img, 0, 1) ** 1.3
        img = img + rng.normal(0, 0.012, img.shape)
    if series == "portable ap view":
        img = 0.15 + 0.7 * img
        mx = rng.choice([-1, 1]) * 0.75
        mark = _capsule(xx, yy, mx, -0.88, mx, -0.7, 0.025, px)
        mark = np.maximum(mark, _capsule(xx, yy, mx, -0.7, mx + 0.1, -0.7, 0.025, px))  # an "L" marker
        img = np.maximum(img, mark * 0.98)
        for _ in range(3):  # ECG electrodes
            ex, ey = rng.uniform(-0.5, 0.5), rng.uniform(-0.6, 0.3)
            img = np.maximum(img, _dots(xx, yy, [ex], [ey], [0.035], px)[0] * 0.95)
    img = img * rng.uniform(0.9, 1.1)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _sample_chest_findings(rng: np.random.Generator) -> dict[str, int]:
    if rng.random() < _XRAY_P_NORMAL:
        return {}
    names = list(_XRAY_PRIMARY)
    p = np.array([_XRAY_PRIMARY[k] for k in names])
    chosen = [names[rng.choice(len(names), p=p / p.sum())]]
    for comp, prob in _XRAY_COMPANIONS[chosen[0]]:
        if rng.random() < prob and comp not in chosen:
            chosen.append(comp)
    return {f: _sample_severity(rng) for f in chosen[:3]}


def _xray_labels(spec: dict) -> dict[str, tuple[str, ...]]:
    f = spec.get("findings") or {}
    ordered = [x for x in XRAY_FINDINGS if x in f]
    labels = {"modality": (spec["modality"],), "study": (spec["study"],), "series": (spec["series"],)}
    if not ordered:
        return {**labels, "finding": (NO_FINDING,), "report": (xray_normal_report(spec["study"]),)}
    return {**labels, "finding": tuple(ordered), "report": tuple(XRAY_REPORTS[(x, SEVERITIES[f[x]])] for x in ordered)}


def _plan_xray(n: int, rng: np.random.Generator) -> list[tuple[str, dict]]:
    """A patient has one study and 1-3 distinct views of it, acquired on one modality."""
    plan: list[tuple[str, dict]] = []
    pid = 0
    while len(plan) < n:
        patient = f"p{pid:05d}"
        modality = XRAY_MODALITIES[rng.integers(len(XRAY_MODALITIES))]
        study = XRAY_STUDIES[rng.choice(len(XRAY_STUDIES), p=[_XRAY_STUDY_P[st] for st in XRAY_STUDIES])]
        views = XRAY_SERIES[study]
        findings = _sample_chest_findings(rng) if study == "chest" else {}  # one study: every view shows them
        k = min(int(rng.integers(1, 4)), len(views), n - len(plan))
        for v in rng.choice(len(views), size=k, replace=False):
            plan.append((patient, {"modality": modality, "study": study, "series": views[int(v)], "findings": findings}))
        pid += 1
    return plan


# =========================================================================== driver


def _render_task(task: tuple) -> None:
    kind, index, spec, size, seed, path = task
    if kind == "fundus":
        image = Image.fromarray(render_fundus(spec["diseases"], size, (seed, index)), "RGB")
    else:
        image = Image.fromarray(
            render_xray(spec["modality"], spec["study"], spec["series"], size, (seed, index), spec.get("findings")), "L"
        )
    with atomic_path(path) as tmp:  # a killed run never leaves a truncated PNG behind
        image.save(tmp, format="PNG")


def _assign_splits(patients: list[str], splits: Sequence[float], rng: np.random.Generator) -> dict[str, str]:
    fr = np.asarray(splits, dtype=np.float64)
    if fr.ndim != 1 or not 1 <= fr.size <= 3 or (fr < 0).any() or fr.sum() <= 0:
        raise ValueError(f"splits must be 1-3 non-negative fractions (train, val, test), got {splits!r}")
    fr = fr / fr.sum()
    order = rng.permutation(len(patients))
    bounds = np.round(np.cumsum(fr) * len(patients)).astype(int)
    out = {}
    for rank, idx in enumerate(order):
        k = int(np.searchsorted(bounds, rank, side="right"))
        out[patients[idx]] = _SPLIT_NAMES[min(k, fr.size - 1)]
    return out


def make_synthetic(
    out: str | Path,
    kind: str = "fundus",
    n: int = 400,
    size: int = 64,
    seed: int = 0,
    splits: Sequence[float] = (0.7, 0.15, 0.15),
    workers: int = 1,
    overwrite: bool = False,
) -> MultiGranularDataset:
    """Generate a synthetic dataset folder and return it loaded (and therefore validated).

    Refuses a non-empty ``out`` unless ``overwrite``: stale images from a bigger earlier run would
    otherwise sit next to the new records and silently mislead anyone browsing the folder.
    """
    if kind not in ("fundus", "xray"):
        raise ValueError(f"kind must be 'fundus' or 'xray', got {kind!r}")
    if n < 1:
        raise ValueError("n must be >= 1")
    if size < 16:
        raise ValueError("size must be >= 16 pixels for the signs to be drawable")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass overwrite=True to replace it")
        shutil.rmtree(out / "images", ignore_errors=True)
    (out / "images").mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    plan = _plan_fundus(n, rng) if kind == "fundus" else _plan_xray(n, rng)
    patients = list(dict.fromkeys(p for p, _ in plan))
    split_of = _assign_splits(patients, splits, np.random.default_rng([seed, 7]))

    tasks, records = [], []
    for i, (patient, spec) in enumerate(plan):
        rel = f"images/{i:06d}.png"
        tasks.append((kind, i, spec, size, seed, str(out / rel)))
        if kind == "fundus":
            labels = _fundus_labels(spec["diseases"])
        else:
            labels = _xray_labels(spec)
        records.append(Record(image=rel, labels=labels, split=split_of[patient], patient=patient))

    if workers > 1 and len(tasks) > 1:
        methods = mp.get_all_start_methods()
        ctx = mp.get_context("fork" if "fork" in methods else "spawn")
        with ctx.Pool(min(workers, len(tasks))) as pool:
            for _ in pool.imap_unordered(_render_task, tasks, chunksize=max(1, len(tasks) // (workers * 8))):
                pass
    else:
        for t in tasks:
            _render_task(t)

    card = fundus_card() if kind == "fundus" else xray_card()
    write_dataset(out, card, records)
    return load_dataset(out)
