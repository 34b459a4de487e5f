"""merge: source tags, pixel-level duplicate removal, patient-level splits without leaks."""

import json

import numpy as np
import pytest
from PIL import Image

from mgll.cli import main as cli_main
from mgll.data import DatasetCard, Level, Record, load_dataset, write_dataset
from mgll.data.merge import merge_datasets

LEVELS = (Level("status", "a {} eye"), Level("disease", "showing {}"))


def _ds(root, name, items, levels=LEVELS):
    recs = []
    for fname, seed, fmt, split, patient in items:
        a = np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(root / "images" / fname, format=fmt)
        labels = {lv.name: ("abnormal",) if lv.name == "status" else ("glaucoma",) for lv in levels}
        recs.append(Record(f"images/{fname}", labels, split, patient))
    write_dataset(root, DatasetCard(name, levels), recs)
    return root


@pytest.fixture
def two(tmp_path):
    a = _ds(tmp_path / "a", "set-a", [("a1.png", 1, "PNG", "train", "p1"), ("a2.png", 2, "PNG", "test", "p2"),
                                      ("a3.png", 3, "PNG", "val", None)])
    # b1 has a1's pixels in another container (BMP): a duplicate by content, not by bytes or name
    b = _ds(tmp_path / "b", "set-b", [("b1.bmp", 1, "BMP", "test", "p9"), ("b2.png", 4, "PNG", "train", "p2"),
                                      ("b3.png", 5, "PNG", "train", "p2"), ("b4.png", 6, "PNG", "val", None)])
    return a, b


def test_merge_tags_dedupes_and_reconciles_patients(two, tmp_path):
    a, b = two
    s = merge_datasets([a, f"rel={b}"], tmp_path / "m")
    ds = load_dataset(tmp_path / "m")
    assert len(ds) == 6 and s["duplicates_dropped"] == {"set-a": 0, "rel": 1}
    assert s["sources"] == {"set-a": 3, "rel": 3}
    rows = [json.loads(x) for x in (tmp_path / "m" / "records.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == ["set-a"] * 3 + ["rel"] * 3
    assert all(r["image"].startswith(f"images/{r['source']}/") for r in rows)
    # p2 was in test (set-a) and train twice (rel): the whole patient moves to its majority split
    p2 = {r.split for r in ds.records if r.patient == "p2"}
    assert p2 == {"train"} and s["patients_resplit"] == 1
    assert {r.split for r in ds.records if r.patient == "p1"} == {"train"}  # untouched
    assert not any(r.image.endswith("b1.bmp") for r in ds.records)
    assert (tmp_path / "m" / "summary.md").is_file() and (tmp_path / "m" / "label_frequencies.png").is_file()


def test_resplit_is_by_patient(two, tmp_path):
    a, b = two
    merge_datasets([a, b], tmp_path / "m", resplit="train=0.5,test=0.5", seed=1)
    ds = load_dataset(tmp_path / "m")
    per_patient = {}
    for r in ds.records:
        if r.patient:
            per_patient.setdefault(r.patient, set()).add(r.split)
    assert all(len(s) == 1 for s in per_patient.values())
    assert {r.split for r in ds.records} <= {"train", "test"}


def test_merge_refuses_mismatched_levels_and_non_empty_out(two, tmp_path):
    a, _ = two
    x = _ds(tmp_path / "x", "xray", [("x.png", 9, "PNG", "train", None)],
            levels=(Level("modality", "a {}"), Level("study", "{}")))
    with pytest.raises(ValueError, match="levels .* differ"):
        merge_datasets([a, x], tmp_path / "m")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    assert cli_main(["merge", str(a), str(tmp_path / "busy")]) == 2
    assert cli_main(["merge", str(a), str(tmp_path / "busy"), "--overwrite"]) == 0
    assert len(load_dataset(tmp_path / "busy")) == 3 and not (tmp_path / "busy" / "f").exists()
