"""Synthetic fundus photographs: vocabulary, label frequencies (RFMiD / ODIR-5K / APTOS), renderer, label plan.

status -> disease -> severity-aware explanation; a patient's second eye often repeats the first's
diseases. :func:`render_fundus` draws one image from its diseases and severities.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mgll.data.records import DatasetCard, Level

from .drawing import _blend, _blur, _dots, _grid, _rotate, _segments, _soft
from .sampling import SEVERITIES, SEVERITY_DEFAULT_P, sample_severity, sample_with_companions

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
_P_BILATERAL = 0.6  # second eye of a patient repeats the first eye's diseases (systemic disease)


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
    chosen = sample_with_companions(rng, _P_NORMAL, _PRIMARY, _COMPANIONS)
    if not chosen:
        return {}
    if len(chosen) < 3 and rng.random() < 0.08:  # an unrelated incidental finding
        other = [d for d in FUNDUS_DISEASES if d not in chosen and d != AMD]
        chosen.append(other[rng.integers(len(other))])
    return {d: _sample_severity(rng, d) for d in chosen[:3]}


def _sample_severity(rng: np.random.Generator, disease: str | None = None) -> int:
    return sample_severity(rng, _SEVERITY_P.get(disease, SEVERITY_DEFAULT_P))


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
