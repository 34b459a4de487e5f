import hashlib
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from mgll.data import FUNDUS_DISEASES, RecordImageDataset, collate_records, load_dataset, make_synthetic
from mgll.data.synthetic import (
    FUNDUS_EXPLANATIONS,
    NO_FINDING,
    NORMAL_DISEASE,
    SEVERITIES,
    XRAY_FINDINGS,
    XRAY_MODALITIES,
    XRAY_REPORTS,
    XRAY_SERIES,
    XRAY_STUDIES,
    _plan_fundus,
    _plan_xray,
    render_fundus,
    render_xray,
)
from mgll.data.synthetic.drawing import _blur

DR, DME, TES, MYO, HAZE, CAT, AMD = (
    "diabetic retinopathy",
    "diabetic macular edema",
    "tessellation",
    "myopia",
    "media haze",
    "cataract",
    "age-related macular degeneration",
)


@pytest.fixture(scope="module")
def fundus(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("fundus"), kind="fundus", n=400, size=64, seed=0)


@pytest.fixture(scope="module")
def xray(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("xray"), kind="xray", n=120, size=64, seed=0)


def _hashes(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _p(records, cond, given=None):
    pool = [r for r in records if given is None or given(r)]
    return sum(cond(r) for r in pool) / max(len(pool), 1)


def has(d):
    return lambda r: d in r.labels["disease"]


# --------------------------------------------------------------------------- fundus


def test_fundus_loads_and_validates(fundus):
    again = load_dataset(fundus.root)
    assert len(again.records) == 400 == len(fundus.records)
    assert again.card.name == "synthetic-fundus"
    assert again.card.level_names == ("status", "disease", "explanation")
    assert again.card.level("status").text("normal") == "a fundus photograph of a normal eye"
    assert again.card.level("disease").template == "a fundus photograph showing {}"
    assert {r.image for r in again.records} == {f"images/{i:06d}.png" for i in range(400)}
    with Image.open(again.image_path(again.records[0])) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    x, labels = RecordImageDataset(again, split="train")[0]
    assert x.shape == (3, 64, 64) and set(labels) == {"status", "disease", "explanation"}
    batch = collate_records([RecordImageDataset(again)[i] for i in range(4)])
    assert batch[0].shape == (4, 3, 64, 64)


def test_fundus_label_structure(fundus):
    recs = fundus.records
    assert set(fundus.label_vocab("status")) == {"normal", "abnormal"}
    assert set(fundus.label_vocab("disease")) == set(FUNDUS_DISEASES) | {NORMAL_DISEASE}
    assert len(FUNDUS_DISEASES) == 10
    n_normal = 0
    for r in recs:
        if r.labels["status"] == ("normal",):
            n_normal += 1
            assert r.labels["disease"] == (NORMAL_DISEASE,)
        else:
            assert 1 <= len(r.labels["disease"]) <= 3
            assert NORMAL_DISEASE not in r.labels["disease"]
            assert len(r.labels["explanation"]) == len(r.labels["disease"])
            for d, e in zip(r.labels["disease"], r.labels["explanation"]):
                assert e in {FUNDUS_EXPLANATIONS[(d, s)] for s in SEVERITIES}
    assert 0.15 < n_normal / len(recs) < 0.45


def test_fundus_cooccurrence_is_real(fundus):
    recs = fundus.records
    p_dr = _p(recs, has(DR))
    p_dr_dme = _p(recs, has(DR), given=has(DME))
    assert p_dr_dme > 0.6 and p_dr_dme > p_dr + 0.3
    assert _p(recs, has(MYO), given=has(TES)) > 0.6 > _p(recs, has(MYO))
    assert _p(recs, has(CAT), given=has(HAZE)) > 0.5 > _p(recs, has(CAT))
    assert _p(recs, lambda r: len(r.labels["disease"]) == 1, given=has(AMD)) > 0.7


def test_severity_changes_explanation(fundus):
    for d in FUNDUS_DISEASES:
        texts = {FUNDUS_EXPLANATIONS[(d, s)] for s in SEVERITIES}
        assert len(texts) == 3
    assert (
        FUNDUS_EXPLANATIONS[(DR, "severe")]
        == "severe diabetic retinopathy with many retinal haemorrhages and hard exudates"
    )
    seen = defaultdict(set)
    for r in fundus.records:
        for d, e in zip(r.labels["disease"], r.labels["explanation"]):
            seen[d].add(e)
    assert len(seen[DR]) == 3  # all severities of a common disease actually occur


def test_split_by_patient(fundus):
    split_of = defaultdict(set)
    eyes = defaultdict(int)
    for r in fundus.records:
        split_of[r.patient].add(r.split)
        eyes[r.patient] += 1
    assert all(len(s) == 1 for s in split_of.values())
    assert set(eyes.values()) == {2}
    counts = fundus.splits()
    assert set(counts) == {"train", "val", "test"}
    assert 0.6 < counts["train"] / 400 < 0.8 and counts["val"] > 30 and counts["test"] > 30


def test_determinism(tmp_path):
    a = make_synthetic(tmp_path / "a", n=24, seed=3).root
    b = make_synthetic(tmp_path / "b", n=24, seed=3, workers=2).root  # workers must not change the bytes
    c = make_synthetic(tmp_path / "c", n=24, seed=4).root
    ha, hb, hc = _hashes(a), _hashes(b), _hashes(c)
    assert ha == hb
    assert ha.keys() == hc.keys() and ha != hc
    assert sum(ha[k] != hc[k] for k in ha if k.startswith("images/")) > 20
    xa = _hashes(make_synthetic(tmp_path / "xa", kind="xray", n=10, seed=3).root)
    xb = _hashes(make_synthetic(tmp_path / "xb", kind="xray", n=10, seed=3).root)
    assert xa == xb


def test_refuses_non_empty_out(tmp_path):
    make_synthetic(tmp_path, n=4)
    with pytest.raises(FileExistsError):
        make_synthetic(tmp_path, n=4)
    ds = make_synthetic(tmp_path, n=2, overwrite=True)
    assert len(ds.records) == 2 and len(list((tmp_path / "images").iterdir())) == 2
    with pytest.raises(ValueError):
        make_synthetic(tmp_path / "z", kind="mri")


@pytest.mark.parametrize("disease", FUNDUS_DISEASES)
def test_each_disease_draws_a_visible_sign(disease):
    """Same seed with and without the disease: the pixels must change, more with severity."""
    diffs = []
    for sev in range(3):
        d = []
        for k in range(4):
            healthy = render_fundus({}, 64, (11, k)).astype(float)
            sick = render_fundus({disease: sev}, 64, (11, k)).astype(float)
            diff = np.abs(sick - healthy)
            changed = (diff.max(-1) > 25).sum()  # local lesions: a few strongly changed pixels
            assert changed >= 5 or diff.mean() > 2.0, (
                disease,
                sev,
                k,
                changed,
                diff.mean(),
            )  # or a diffuse change
            d.append(diff.mean())
        diffs.append(np.mean(d))
    assert diffs[0] < diffs[1] < diffs[2], diffs


def test_dr_images_differ_from_normal_in_lesion_channel(fundus):
    """Dataset-level check: dark red dots show up as pixels much darker in R than their surroundings."""
    u = (np.arange(64) + 0.5) / 32 - 1
    inner = np.sqrt(u[None] ** 2 + u[:, None] ** 2) < 0.75

    def dark_red_spots(rec):
        with Image.open(fundus.image_path(rec)) as im:
            red = np.asarray(im.convert("RGB"), dtype=float)[..., 0]
        return int(((red < 0.6 * _blur(red, 2.5)) & inner).sum())

    dr = [dark_red_spots(r) for r in fundus.records if r.labels["disease"] == (DR,)]
    normal = [dark_red_spots(r) for r in fundus.records if r.labels["status"] == ("normal",)]
    assert len(dr) >= 15 and len(normal) >= 50
    assert np.mean(dr) > 5 * (np.mean(normal) + 1)
    assert np.mean(np.array(dr) > np.percentile(normal, 95)) > 0.8


# --------------------------------------------------------------------------- x-ray


def test_xray_loads_and_labels(xray):
    again = load_dataset(xray.root)
    assert again.card.name == "synthetic-xray"
    assert again.card.level_names == ("modality", "study", "series", "finding", "report")
    assert again.card.level("series").text("lateral view") == "a lateral view"
    assert set(again.label_vocab("modality")) == set(XRAY_MODALITIES)
    assert set(again.label_vocab("study")) == set(XRAY_STUDIES)
    for r in again.records:
        (study,), (series,) = r.labels["study"], r.labels["series"]
        assert series in XRAY_SERIES[study]
    split_of = defaultdict(set)
    for r in again.records:
        split_of[r.patient].add(r.split)
    assert all(len(s) == 1 for s in split_of.values())
    x, _ = RecordImageDataset(again)[0]
    assert x.shape == (3, 64, 64)


def test_xray_modality_and_view_are_visible():
    # CR: veiled blacks and coarse grain; DX: true blacks.
    for k in range(12):
        study = XRAY_STUDIES[k % 4]
        series = XRAY_SERIES[study][k % 3]
        cr = render_xray(XRAY_MODALITIES[0], study, series, 64, (5, k)).astype(float)
        dx = render_xray(XRAY_MODALITIES[1], study, series, 64, (5, k)).astype(float)
        assert np.percentile(cr, 10) > np.percentile(dx, 10) + 5
    # Lateral chest is a narrower profile than PA; views of one study render differently.
    for k in range(5):
        widths = {}
        for series in XRAY_SERIES["chest"]:
            img = render_xray(XRAY_MODALITIES[1], "chest", series, 64, (6, k)).astype(float)
            widths[series] = int((img[32] > 40).sum())
        assert widths["lateral view"] < widths["pa view"] - 10
        imgs = [render_xray(XRAY_MODALITIES[1], "hand", s, 64, (6, k)) for s in XRAY_SERIES["hand"]]
        assert len({i.tobytes() for i in imgs}) == 3


# --------------------------------------------------------------------------- realism: published frequencies


def _freqs(plan, key):
    counts = defaultdict(int)
    for _, spec in plan:
        for d in spec[key]:
            counts[d] += 1
    return {d: c / len(plan) for d, c in counts.items()}


def test_fundus_frequencies_are_long_tailed_like_rfmid_and_odir():
    plan = _plan_fundus(20000, np.random.default_rng(0))
    f = _freqs(plan, "diseases")
    normal = sum(not spec["diseases"] for _, spec in plan) / len(plan)
    assert 0.18 < normal < 0.35  # RFMiD 21 %, ODIR-5K 32 %
    ranked = sorted(f, key=f.get, reverse=True)
    assert ranked[0] == DR  # the head in both datasets
    assert set(ranked[-2:]) == {"retinitis pigmentosa", "central serous retinopathy"}  # RFMiD's tail
    assert f[ranked[0]] / f[ranked[-1]] > 8  # a long tail, not a flat prior
    assert min(f.values()) > 0.02  # floor: ~30 of the rarest disease in a 2,000-image test split


def test_xray_chest_findings_follow_chestxray14():
    plan = _plan_xray(20000, np.random.default_rng(0))
    chest = [(p, s) for p, s in plan if s["study"] == "chest"]
    assert all(not s["findings"] for p, s in plan if s["study"] != "chest")
    assert 0.45 < len(chest) / len(plan) < 0.65
    f = _freqs(chest, "findings")
    assert set(f) == set(XRAY_FINDINGS)
    normal = sum(not s["findings"] for _, s in chest) / len(chest)
    assert 0.4 < normal < 0.6  # ChestX-ray14: 53.8 % "No Finding"
    ranked = sorted(f, key=f.get, reverse=True)
    assert ranked[:3] == ["infiltration", "effusion", "atelectasis"]  # ChestX-ray14's three most frequent
    assert f[ranked[0]] / f[ranked[-1]] > 5

    def p(cond, given=None):
        pool = [s["findings"] for _, s in chest if given is None or given in s["findings"]]
        return sum(cond in x for x in pool) / len(pool)

    assert p("effusion", "cardiomegaly") > p("effusion") + 0.2  # co-occurring pairs
    assert p("nodule", "mass") > 3 * p("nodule", None) - 0.1 and p("nodule", "mass") > p("nodule")
    assert p("effusion", "edema") > p("effusion") + 0.2


def test_xray_labels_and_reports(xray):
    for r in xray.records:
        (study,) = r.labels["study"]
        if r.labels["finding"] == (NO_FINDING,):
            assert len(r.labels["report"]) == 1 and r.labels["report"][0].startswith("no acute")
        else:
            assert study == "chest" and NO_FINDING not in r.labels["finding"]
            assert len(r.labels["report"]) == len(r.labels["finding"])
            for f, text in zip(r.labels["finding"], r.labels["report"]):
                assert text in {XRAY_REPORTS[(f, s)] for s in SEVERITIES}
    assert len({XRAY_REPORTS[(f, s)] for f in XRAY_FINDINGS for s in SEVERITIES}) == 30
    with pytest.raises(ValueError, match="chest films only"):
        render_xray(XRAY_MODALITIES[1], "knee", "ap view", 64, (0, 0), {"effusion": 1})


@pytest.mark.parametrize("finding", XRAY_FINDINGS)
def test_each_chest_finding_draws_a_visible_sign(finding):
    """Same seed with and without the finding: the film changes, more with severity (PA view)."""
    diffs = []
    for sev in range(3):
        d = []
        for k in range(4):
            clean = render_xray(XRAY_MODALITIES[1], "chest", "pa view", 64, (9, k)).astype(float)
            sick = render_xray(XRAY_MODALITIES[1], "chest", "pa view", 64, (9, k), {finding: sev}).astype(float)
            diff = np.abs(sick - clean)
            assert (diff > 20).sum() >= 5, (finding, sev, k)
            d.append(diff.mean())
        diffs.append(np.mean(d))
    assert diffs[0] < diffs[2], diffs
