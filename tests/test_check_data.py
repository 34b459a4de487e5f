"""check-data and preflight_images: data problems found before training, each named; non-UTF-8 records named."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image, ImageFile

from mgll.cli import main as cli_main
from mgll.data import load_dataset, make_synthetic
from mgll.data.check_data import check_data, format_report
from mgll.data.image_checks import inspect_image, preflight_images
from mgll.data.records import RecordError


@pytest.fixture(autouse=True)
def _no_env_budget(monkeypatch):
    monkeypatch.delenv("MGLL_MAX_PIXELS", raising=False)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("data") / "clean", kind="fundus", n=24, size=32, seed=1).root


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _lines(root):
    return (root / "records.jsonl").read_text(encoding="utf-8", errors="surrogateescape").splitlines()


def _write_lines(root, lines, encoding="utf-8"):
    (root / "records.jsonl").write_bytes(("\n".join(lines) + "\n").encode(encoding, "surrogateescape"))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture()
def broken(clean, tmp_path):
    """A copy of the clean dataset with one of each problem; returns (root, {problem: image})."""
    root = _copy(clean, tmp_path / "broken")
    recs = [json.loads(x) for x in _lines(root)]
    img = [r["image"] for r in recs]
    _truncate(root / img[1])
    (root / img[2]).write_bytes(b"")
    shutil.copy(root / img[3], root / img[4])  # img[4] now has img[3]'s bytes
    Image.new("RGB", (100, 100)).save(root / img[5])  # 10,000 pixels, over the 5,000 budget used below
    (root / img[6]).write_bytes(b"this is a text file, not a picture")
    Image.fromarray(np.full((32, 32), 4000, np.uint16)).save(root / img[7])  # 16-bit: convert("RGB") saturates
    recs[8]["labels"]["status"] = [recs[8]["labels"]["status"][0].upper()]  # "NORMAL" vs "normal"
    recs[9]["split"] = "valid"
    lines = [json.dumps(r) for r in recs]
    lines[10] = lines[10].replace('"labels"', '"caf\udce9": 1, "labels"')  # a Latin-1 byte 0xe9 on line 11
    _write_lines(root, lines)
    return root, img


# ----------------------------------------------------------------------------- records: non-UTF-8


def test_non_utf8_records_line_names_file_line_and_byte(broken):
    root, _ = broken
    with pytest.raises(RecordError) as e:
        load_dataset(root)
    msg = str(e.value)
    assert msg.startswith(f"{root / 'records.jsonl'}:11: not valid UTF-8: byte 0xe9 ('é' in Latin-1) at column ")
    assert msg.endswith("; save the file as UTF-8")
    assert isinstance(e.value, ValueError) and e.value.line == 11
    assert cli_main(["check-data", str(root / "nowhere")]) == 2  # bad input: one line, exit 2


def test_non_utf8_card_names_file_and_line(clean, tmp_path, capsys):
    root = _copy(clean, tmp_path / "c")
    card = (root / "dataset.json").read_bytes().replace(b"synthetic-fundus", b"synth\xe9tic")
    (root / "dataset.json").write_bytes(card)
    with pytest.raises(RecordError, match=r"dataset\.json:2: not valid UTF-8: byte 0xe9 \('é' in Latin-1\) at column 17"):
        load_dataset(root)
    assert cli_main(["check-data", str(root), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dataset.json:2: not valid UTF-8" in err[0]


# ----------------------------------------------------------------------------- check-data


def test_clean_dataset_exits_0(clean, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert cli_main(["check-data", str(clean), "--no-progress", "--workers", "1", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["clean"] is True and rep["problems"] == [] and rep["records"] == 24 and rep["images_checked"] == 24
    assert "no problems found" in capsys.readouterr().out


def test_every_problem_is_reported_with_its_file(broken, tmp_path, capsys):
    root, img = broken
    out = tmp_path / "report.json"
    rc = cli_main(["check-data", str(root), "--no-progress", "--workers", "2", "--max-pixels", "5000",
                   "--out", str(out)])
    assert rc == 1
    rep = json.loads(out.read_text())
    assert rep["clean"] is False and rep["max_pixels"] == 5000 and rep["records"] == 23
    by = {}
    for p in rep["problems"]:
        by.setdefault(p["reason"], []).append(p)
    assert [p["image"] for p in by["truncated"]] == [img[1]]
    assert [p["image"] for p in by["empty"]] == [img[2]]
    assert [p["image"] for p in by["duplicate"]] == [img[4]] and img[3] in by["duplicate"][0]["detail"]
    assert [p["image"] for p in by["too_large"]] == [img[5]]
    assert "100x100 = 10,000 pixels is over the 5,000-pixel budget" in by["too_large"][0]["detail"]
    assert [p["image"] for p in by["unreadable"]] == [img[6]]
    assert not any(p["image"] == img[7] for p in rep["problems"])  # 16-bit: rescaled as training reads it, not a problem
    assert [p["image"] for p in by["label_variants"]] == [img[8]]
    upper = json.loads(_lines(root)[8])["labels"]["status"][0]  # "NORMAL" or "ABNORMAL", whichever record 8 had
    assert f"'{upper}' x1" in by["label_variants"][0]["detail"] and "level 'status'" in by["label_variants"][0]["detail"]
    assert [p["image"] for p in by["split_name"]] == [img[9]] and "'valid'" in by["split_name"][0]["detail"]
    assert [(p["line"], p["image"]) for p in by["bad_record"]] == [(11, None)]
    assert "records.jsonl:11: not valid UTF-8: byte 0xe9" in by["bad_record"][0]["detail"]
    for reason in ("truncated", "empty", "too_large", "unreadable", "duplicate"):
        p = by[reason][0]
        assert p["image"] == img[p["line"] - 1] and (p["image"] in p["detail"] or reason == "duplicate")
    assert set(by) == {"truncated", "empty", "duplicate", "too_large", "unreadable",
                       "label_variants", "split_name", "bad_record"}
    assert rep["counts"] == {r: len(v) for r, v in by.items()}
    text = capsys.readouterr().out
    assert f"{len(rep['problems'])} problem(s)" in text
    for p in rep["problems"]:
        assert p["reason"] in text and (p["image"] or "-") in text


def test_one_worker_and_two_agree_and_format_lists_counts(broken):
    root, _ = broken
    a = check_data(root, max_pixels=5000, workers=1, progress=False)
    b = check_data(root, max_pixels=5000, workers=2, progress=False)
    assert a["problems"] == b["problems"]
    table = format_report(a)
    assert "     1  empty: the file has zero bytes" in table


def test_patient_in_two_splits_and_records_without_split(clean, tmp_path):
    root = _copy(clean, tmp_path / "p")
    recs = [json.loads(x) for x in _lines(root)]
    a, b = next((r, s) for r in recs[:-1] for s in recs[:-1] if r["patient"] == s["patient"] and r is not s)
    b["split"] = "test" if a["split"] != "test" else "train"
    recs[-1].pop("split")
    _write_lines(root, [json.dumps(r) for r in recs])
    rep = check_data(root, workers=1, progress=False)
    reasons = {p["reason"]: p for p in rep["problems"]}
    assert set(reasons) == {"patient_leak", "no_split"}
    assert f"patient '{a['patient']}' is in splits" in reasons["patient_leak"]["detail"]
    assert reasons["no_split"]["image"] == recs[-1]["image"]


def test_duplicate_across_splits_is_called_a_leak(clean, tmp_path):
    root = _copy(clean, tmp_path / "d")
    recs = [json.loads(x) for x in _lines(root)]
    tr = next(r for r in recs if r["split"] == "train")
    te = next(r for r in recs if r["split"] == "test")
    shutil.copy(root / tr["image"], root / te["image"])
    rep = check_data(root, workers=1, progress=False)
    dup = [p for p in rep["problems"] if p["reason"] == "duplicate"]
    assert len(dup) == 1 and "a leak across splits" in dup[0]["detail"]


# ----------------------------------------------------------------------------- preflight


def test_preflight_finds_truncated_and_empty_images_without_decoding(broken, monkeypatch):
    root, img = broken
    lines = _lines(root)
    del lines[10]  # drop the non-UTF-8 line so the dataset loads
    _write_lines(root, lines)

    def no_decode(self, *a, **k):
        raise AssertionError("preflight decoded pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    probs = preflight_images(root)
    by = {p["reason"]: p for p in probs}
    assert by["truncated"]["image"] == img[1] and "PNG stream check failed" in by["truncated"]["detail"]
    assert by["empty"]["image"] == img[2] and by["unreadable"]["image"] == img[6]
    assert set(by) == {"truncated", "empty", "unreadable"}  # header level: no duplicates or 16-bit check
    assert all(set(p) == {"image", "reason", "detail"} for p in probs)
    over = [p for p in preflight_images(load_dataset(root), max_pixels=5000) if p["reason"] == "too_large"]
    assert [p["image"] for p in over] == [img[5]] and "100x100 = 10,000 pixels" in over[0]["detail"]
    monkeypatch.undo()
    full = {p["reason"] for p in preflight_images(root, decode=True, workers=2)}
    assert full == {"truncated", "empty", "unreadable"}


def test_preflight_split_and_budget(broken):
    root, img = broken
    lines = _lines(root)
    del lines[10]
    _write_lines(root, lines)
    ds = load_dataset(root)
    split_of = {r.image: r.split for r in ds.records}
    probs = preflight_images(ds, split="train", max_pixels=5000)
    assert all(split_of[p["image"]] == "train" for p in probs)
    expected = {i for i in (img[1], img[2], img[5], img[6]) if split_of.get(i) == "train"}
    assert {p["image"] for p in probs} == expected


def test_truncated_jpeg_is_found_from_its_missing_end_marker(tmp_path):
    arr = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    Image.fromarray(arr).save(tmp_path / "ok.jpg", quality=90)
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert inspect_image(tmp_path / "ok.jpg")["problems"] == []
    probs = inspect_image(tmp_path / "cut.jpg")["problems"]
    assert [r for r, _ in probs] == ["truncated"] and "FF D9" in probs[0][1]
    assert [r for r, _ in inspect_image(tmp_path / "cut.jpg", decode=True)["problems"]] == ["truncated"]
    assert inspect_image(tmp_path / "nope.png")["problems"][0][0] == "missing"
