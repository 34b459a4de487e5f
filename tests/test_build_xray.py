"""build-xray on real radiographs shipped by pydicom / pydicom-data and on DICOMs written here."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from mgll.cli import main as cli_main
from mgll.data import load_dataset
from mgll.data.build_xray import build_xray, load_salt, source_key
from mgll.data.dicom_pixels import dicom_to_array, dicom_to_image

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from dicom_factory import make_dataset, write_dicom  # noqa: E402

PYDICOM_DATA = Path(pydicom.__file__).parent / "data"
CSPINE = PYDICOM_DATA / "test_files" / "dicomdirtests" / "77654033" / "CR1" / "6154"
CSPINE2 = PYDICOM_DATA / "test_files" / "dicomdirtests" / "77654033" / "CR2" / "6247"
CHEST_PA_NO_PIXELS = PYDICOM_DATA / "charset_files" / "chrJapMulti.dcm"  # CR "Chest PA", MONOCHROME1, no pixels
SIZE = 64


def _ramp(h=SIZE, w=SIZE, top=4095):
    return np.tile(np.linspace(0, top, w).round().astype(np.int64), (h, 1))


# --------------------------------------------------------------------------- pixel pipeline


def test_monochrome1_is_the_inverse_of_monochrome2():
    a2 = dicom_to_array(make_dataset(_ramp(), photometric="MONOCHROME2", bits_stored=12, center=2048, width=4096))
    a1 = dicom_to_array(make_dataset(_ramp(), photometric="MONOCHROME1", bits_stored=12, center=2048, width=4096))
    np.testing.assert_allclose(a1, 1.0 - a2, atol=1e-6)
    assert a2[:, 0].max() < 0.01 and a2[:, -1].min() > 0.99


def test_bits_above_bits_stored_are_ignored():
    clean = _ramp()
    dirty = clean | 0xF000  # overlay / garbage in the 4 unused high bits of a 12-in-16 file
    a = dicom_to_array(make_dataset(clean, bits_stored=12))
    b = dicom_to_array(make_dataset(dirty, bits_stored=12))
    np.testing.assert_array_equal(a, b)


def test_signed_12_bit_values_are_sign_extended():
    vals = np.array([[-2048, -1, 0, 2047]]).repeat(4, 0)
    ds = make_dataset(vals & 0x0FFF, bits_stored=12, signed=True, center=0, width=4096)  # raw 12-bit two's complement
    a = dicom_to_array(ds)
    assert a[0, 0] < 0.01 and abs(a[0, 2] - 0.5) < 0.01 and a[0, 3] > 0.99


def test_rescale_then_window():
    # stored 300/500/700 -> HU -400/0/400 with slope 2, intercept -1000; window 0 +- 200
    arr = np.array([[300, 500, 700, 550]]).repeat(2, 0)
    a = dicom_to_array(make_dataset(arr, slope=2, intercept=-1000, center=0, width=401))
    np.testing.assert_allclose(a[0], [0.0, (0.5 + 200) / 400, 1.0, (100.5 + 200) / 400], atol=1e-6)


def test_first_of_multi_valued_window_is_used():
    arr = np.array([[0, 100, 200]])
    a = dicom_to_array(make_dataset(arr, center=[100, 1000], width=[201, 50]))
    np.testing.assert_allclose(a[0], [0.0, 0.5, 1.0], atol=1e-2)


def test_voi_lut_sequence_beats_window():
    arr = np.arange(256).reshape(16, 16)
    ds = make_dataset(arr, bits_stored=8, center=10, width=2)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.LUTData = [(255 - i) * 257 for i in range(256)]  # an inverting LUT: proves the LUT, not the window, ran
    ds.VOILUTSequence = [item]
    np.testing.assert_allclose(dicom_to_array(ds), 1.0 - arr / 255.0, atol=1e-6)


def test_percentile_window_without_tags_ignores_outliers():
    rng = np.random.default_rng(0)
    arr = rng.normal(1000, 50, (64, 64)).clip(0, 4095)
    arr[0, :4] = 4095  # a few burnt-in bright pixels must not squash the contrast
    a = dicom_to_array(make_dataset(arr.round().astype(np.int64), bits_stored=12))
    assert 0.3 < a.mean() < 0.7 and a.std() > 0.15


def test_dicom_to_image_keeps_aspect_and_bit_depth():
    ds = make_dataset(_ramp(300, 150), bits_stored=12)
    im8 = dicom_to_image(ds, size=64)
    im16 = dicom_to_image(ds, size=64, bits=16)
    assert im8.size == (32, 64) and im8.mode == "L"
    assert im16.mode == "I;16" and np.asarray(im16).max() > 60000


def test_real_monochrome1_radiograph_matches_pydicom_reference():
    from pydicom.pixels import apply_voi_lut

    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    ours = dicom_to_array(ds)
    ref = apply_voi_lut(ds.pixel_array.astype(np.float64), ds)
    ref = 1.0 - (ref - ref.min()) / (ref.max() - ref.min())  # MONOCHROME1: invert
    assert ours.shape == ds.pixel_array.shape
    assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.999
    j2k = dicom_to_array(get_testdata_file("RG1_J2KR.dcm"))  # the same image, JPEG 2000 lossless
    np.testing.assert_allclose(j2k, ours, atol=1e-6)


# --------------------------------------------------------------------------- end-to-end build


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A DICOM tree as a hospital export would look: paths carry the patient ID."""
    src = tmp_path_factory.mktemp("src")
    files = {}
    for rel, real in {
        "77654033/CR1/6154": CSPINE,
        "77654033/CR2/6247": CSPINE2,
        "charset/chest_pa": CHEST_PA_NO_PIXELS,
        "rg/RG1_UNCR.dcm": Path(get_testdata_file("RG1_UNCR.dcm")),
        "rg/RG3_J2KR": Path(get_testdata_file("RG3_J2KR.dcm")),
        "other/CT_small.dcm": Path(get_testdata_file("CT_small.dcm")),
        "other/MR_small.dcm": Path(get_testdata_file("MR_small.dcm")),
    }.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(real, src / rel)
        files[rel] = pydicom.dcmread(real, stop_before_pixels=True)
    ramp = _ramp()
    w = src / "written"
    files["written/mono1.dcm"] = write_dicom(w / "mono1.dcm", ramp, photometric="MONOCHROME1", bits_stored=12,
                                             center=2048, width=4096, study="Chest  X-Ray", series="PA   view",
                                             patient_id="PAT-MONO1", patient_name="Smith^Anna")
    files["written/12in16.dcm"] = write_dicom(w / "12in16.dcm", ramp | 0xF000, bits_stored=12, study="HAND",
                                              series="", patient_id="PAT-BITS", patient_name="Jones^Bob")
    files["written/rescale"] = write_dicom(w / "rescale", np.full((SIZE, SIZE), 500) + np.eye(SIZE, dtype=int) * 200,
                                           slope=2, intercept=-1000, center=0, width=401, study="Knee 20230916",
                                           series="AP", patient_id="PAT-RESC", patient_name="Brown^Carl")
    files["written/j2k.dcm"] = write_dicom(w / "j2k.dcm", ramp, j2k=True, bits_stored=12, center=2048, width=4096,
                                           study="Chest", series="LAT", patient_id="PAT-J2K", patient_name="Lee^Dana")
    files["written/nopixels.dcm"] = write_dicom(w / "nopixels.dcm", ramp, pixels=False, patient_id="PAT-NOPIX",
                                                patient_name="Kim^Eve")
    full = w / "full.dcm"
    files["written/truncated.dcm"] = write_dicom(full, ramp, bits_stored=12, patient_id="PAT-TRUNC",
                                                 patient_name="Park^Finn")
    (w / "truncated.dcm").write_bytes(full.read_bytes()[:-3000])
    full.unlink()
    (w / "readme.txt").write_text("not a DICOM file\n")
    return src, files


@pytest.fixture(scope="module")
def built(source, tmp_path_factory):
    src, files = source
    root = tmp_path_factory.mktemp("xray")
    salt_file = root / "salt"
    out = root / "out"
    summary = build_xray(src, out, size=SIZE, workers=2, salt_file=salt_file, progress=False)
    salt = load_salt(salt_file)
    keys = {rel: source_key(rel, salt) for rel in files}
    return out, summary, keys, files, salt_file


def _by_key(out):
    recs = {Path(r.image).stem: r for r in load_dataset(out).records}
    rej = {e["key"]: e for e in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())}
    return recs, rej


def test_levels_and_rejections(built):
    out, summary, keys, _, _ = built
    recs, rej = _by_key(out)
    lab = {rel: recs[k].labels for rel, k in keys.items() if k in recs}
    assert lab["77654033/CR1/6154"] == {"modality": ("CR (computed radiography)",),
                                        "study": ("xr c spine comp min 4 views",), "series": ("cervical lat",)}
    assert lab["77654033/CR2/6247"]["series"] == ("cervical obli 1",)
    assert lab["rg/RG1_UNCR.dcm"] == {"modality": ("CR (computed radiography)",), "study": ("thorax",),
                                      "series": ("unknown",)}
    assert lab["rg/RG3_J2KR"]["study"] == ("non-ossifying fibroma of distal tibia",)
    assert lab["written/mono1.dcm"] == {"modality": ("DX (digital radiography)",), "study": ("chest x-ray",),
                                        "series": ("pa view",)}
    assert lab["written/12in16.dcm"]["series"] == ("unknown",)
    assert lab["written/rescale"]["study"] == ("knee",)  # the date inside the description is removed
    reasons = {rel: rej[k]["reason"] for rel, k in keys.items() if k in rej}
    assert reasons == {"charset/chest_pa": "no_pixel_data", "other/CT_small.dcm": "wrong_modality",
                       "other/MR_small.dcm": "wrong_modality", "written/nopixels.dcm": "no_pixel_data",
                       "written/truncated.dcm": "pixel_decode_failed"}
    assert summary["records"] == 8 and summary["rejected_total"] == 5
    assert summary["rejected"] == {"no_pixel_data": 2, "pixel_decode_failed": 1, "wrong_modality": 2}
    assert summary["skipped"] == {"not_dicom": 1}
    # both C-spine views belong to one patient, so they share a hash and a split
    a, b = recs[keys["77654033/CR1/6154"]], recs[keys["77654033/CR2/6247"]]
    assert a.patient == b.patient and a.split == b.split and a.patient.startswith("p-")
    assert len({r.patient for r in recs.values()}) == 7


def test_png_pixels(built):
    out, _, keys, _, _ = built

    def png(rel):
        return np.asarray(Image.open(out / "images" / keys[rel][:2] / f"{keys[rel]}.png"))

    mono1 = png("written/mono1.dcm")
    assert mono1.shape == (SIZE, SIZE) and mono1.dtype == np.uint8
    assert mono1[:, 0].min() > 250 and mono1[:, -1].max() < 5  # inverted: low stored values are bright
    j2k = png("written/j2k.dcm")
    np.testing.assert_array_equal(j2k, 255 - mono1)  # decoded JPEG 2000 == same ramp, MONOCHROME2
    bits = png("written/12in16.dcm")
    assert bits[:, 0].max() < 5 and bits[:, -1].min() > 250  # high garbage bits ignored; percentile window
    resc = png("written/rescale")  # background 500 -> 0 HU -> mid grey; diagonal 700 -> 400 HU -> white
    assert abs(int(resc[0, 1]) - 128) <= 1 and (np.diag(resc) == 255).all()
    rg1 = png("rg/RG1_UNCR.dcm")
    assert rg1.shape == (SIZE, round(1841 * SIZE / 1955))  # longest side = size, aspect kept
    assert 150 < rg1.mean() < 220  # the thorax window shows a bright (inverted) radiograph, not a negative


def test_no_identifier_anywhere_in_outputs(built):
    out, _, _, files, _ = built
    secrets = {"77654033", "Archibald", "Doe^Archibald", "9RG1", "11RG3", "Smith", "PAT-", "20230916", "19610407"}
    for ds in files.values():
        for tag in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "StudyDate"):
            if ds.get(tag):
                secrets.add(str(ds.get(tag)))
        for part in str(ds.get("PatientName") or "").replace("=", "^").split("^"):
            if len(part) >= 2:
                secrets.add(part)
    blobs = [p.read_bytes() for p in out.rglob("*") if p.is_file()]
    assert len(blobs) > 10
    for s in secrets:
        needle = s.encode()
        assert not any(needle in b for b in blobs), f"identifier {s!r} leaked into the outputs"


def test_outputs_load_and_summaries_exist(built):
    out, summary, _, _, _ = built
    ds = load_dataset(out)
    assert ds.card.level_names == ("modality", "study", "series")
    assert json.loads((out / "summary.json").read_text())["levels"]["modality"] == {"CR (computed radiography)": 4,
                                                                                    "DX (digital radiography)": 4}
    md = (out / "summary.md").read_text()
    assert "| study | xr c spine comp min 4 views | 2 |" in md and "| wrong_modality | 2 |" in md
    assert Image.open(out / "label_frequencies.png").size[0] > 300


def test_rerun_skips_done_and_rejected_unless_asked(built, source, tmp_path):
    out, _, _, _, salt_file = built
    src, _ = source
    work = tmp_path / "out"
    shutil.copytree(out, work)
    before = (work / "records.jsonl").read_bytes()
    again = build_xray(src, work, size=SIZE, workers=1, salt_file=salt_file, progress=False)
    assert again["processed_this_run"] == 0 and (work / "records.jsonl").read_bytes() == before
    retry = build_xray(src, work, size=SIZE, workers=1, salt_file=salt_file, progress=False, retry_rejected=True)
    assert retry["processed_this_run"] == 6  # 5 rejected + 1 non-DICOM
    assert (work / "records.jsonl").read_bytes() == before
    with pytest.raises(ValueError, match="different settings.*size"):
        build_xray(src, work, size=SIZE * 2, workers=1, salt_file=salt_file, progress=False)


def test_missing_skip_and_modalities(source, tmp_path):
    src, _ = source
    summary = build_xray(src, tmp_path / "o", size=16, workers=1, salt_file=tmp_path / "s", progress=False,
                         missing="skip", modalities=["CR", "CT"])
    # RG1, RG3 and CT_small have no SeriesDescription; MR and the six written DX files are filtered out
    assert summary["rejected"] == {"missing_tag": 3, "wrong_modality": 7, "no_pixel_data": 1}
    assert summary["levels"]["modality"] == {"CR (computed radiography)": 2}


def test_cli_show_rejected_prints_paths_only_to_terminal(built, source, capsys):
    out, _, _, _, salt_file = built
    src, _ = source
    assert cli_main(["build-xray", str(src), str(out), "--salt-file", str(salt_file), "--show-rejected"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and any("CT_small.dcm\twrong_modality\tCT" in ln for ln in lines)
    assert cli_main(["build-xray", str(src / "nope"), str(out)]) == 2


def test_sigkill_then_resume_equals_clean_run(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for i in range(120):
        arr = rng.integers(0, 4096, (256, 256))
        write_dicom(src / f"pat{i % 30}" / f"img{i}.dcm", arr, bits_stored=12, patient_id=f"P{i % 30}",
                    study=["Chest", "Knee"][i % 2], series=["PA", "LAT", "AP"][i % 3])
    salt = tmp_path / "salt"
    clean = tmp_path / "clean"
    build_xray(src, clean, size=128, workers=2, salt_file=salt, progress=False)

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mgll.cli", "build-xray", str(src), str(killed), "--size", "128",
           "--workers", "2", "--salt-file", str(salt), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    journal = killed / ".build" / "journal.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 20:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, pool workers included
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (killed / "records.jsonl").exists(), "the build finished before it was killed"
    done = journal.read_bytes().count(b"\n")
    assert 20 <= done < 120

    summary = build_xray(src, killed, size=128, workers=2, salt_file=salt, progress=False)
    assert summary["processed_this_run"] <= 120 - done + 2
    assert (killed / "records.jsonl").read_bytes() == (clean / "records.jsonl").read_bytes()
    assert (killed / "rejected.jsonl").read_bytes() == (clean / "rejected.jsonl").read_bytes()
    files = sorted(p.relative_to(killed).as_posix() for p in (killed / "images").rglob("*"))
    assert files == sorted(p.relative_to(clean).as_posix() for p in (clean / "images").rglob("*"))
    for rec in load_dataset(killed).records:
        assert (killed / rec.image).read_bytes() == (clean / rec.image).read_bytes()
    assert not [p for p in killed.rglob("*") if p.name.endswith(".tmp")]
