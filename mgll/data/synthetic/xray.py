"""Synthetic radiographs: modality -> study -> series -> chest finding (ChestX-ray14 vocabulary) -> report.

Frequencies and frequent finding pairs follow ChestX-ray14; severity changes both the drawing and
the report sentence. :func:`render_xray` draws one grayscale film.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mgll.data.records import DatasetCard, Level

from .drawing import _blur, _capsule, _dots, _ellipse, _grid, _rotate, _segments, _soft
from .sampling import SEVERITIES, sample_severity, sample_with_companions

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
    chosen = sample_with_companions(rng, _XRAY_P_NORMAL, _XRAY_PRIMARY, _XRAY_COMPANIONS)
    return {f: sample_severity(rng) for f in chosen[:3]}


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
