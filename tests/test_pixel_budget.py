"""The pixel budget: images are sized from their header and refused, named, before anything is decoded.

Each defect of issue 13 items 3/7 is reproduced first: an 8000 x 8000 deflated DICOM of ~130 KB, a
PNG over PIL's bomb limit (uncaught DecompressionBombError naming no file), an oversized PNG in
training, evaluation and the demo.
"""

import json
import zlib

import numpy as np
import pydicom
import pytest
from helpers.dataset_copy import copy_records
from helpers.dicom_factory import make_dataset, write_dicom
from PIL import Image
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

import mgll.data.dicom_header as dicom_header
from mgll.data import RecordImageDataset, load_dataset
from mgll.data.build_fundus import build_fundus
from mgll.data.dicom_header import check_dicom_budget, read_dicom_header
from mgll.data.dicom_pixels import DicomPixelError, dicom_to_array, dicom_to_image
from mgll.data.pixel_budget import (
    DEFAULT_MAX_PIXELS,
    ImageTooLargeError,
    check_size,
    load_rgb,
    open_image,
    resolve_max_pixels,
)
from mgll.data.records import Record, RecordError
from mgll.data.records import write_dataset as write_records
from mgll.demo.inputs import DemoInputError
from mgll.demo.inputs import load_image as demo_load_image


@pytest.fixture(autouse=True)
def _no_env_budget(monkeypatch):
    monkeypatch.delenv("MGLL_MAX_PIXELS", raising=False)


def write_deflated(path, rows, cols, value=0, **kw):
    """A Deflated Explicit VR Little Endian DX file of constant pixels, deflated as a stream.

    The pixel bytes go through zlib in 1 MB pieces, so an 8000 x 8000 file (130 KB on disk, 128 MB
    of pixels) is written without holding 128 MB; pydicom's own writer would need the whole array.
    """
    ds = make_dataset(np.zeros((1, 1), np.uint16), pixels=False, **kw)
    ds.Rows, ds.Columns = rows, cols
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    n = rows * cols * 2
    pixel_header = b"\xe0\x7f\x10\x00OW\x00\x00" + n.to_bytes(4, "little")
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    chunk = np.full(1 << 19, value, np.uint16).tobytes()  # 1 MB
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM" + meta.getvalue())
        f.write(z.compress(body.getvalue() + pixel_header))
        left = n
        while left:
            piece = chunk[: min(left, len(chunk))]
            f.write(z.compress(piece))
            left -= len(piece)
        f.write(z.flush())
    return path


@pytest.fixture(scope="module")
def bomb_dcm(tmp_path_factory):
    return write_deflated(tmp_path_factory.mktemp("dcm") / "bomb.dcm", 8000, 8000)


def _png(path, size, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)
    return path


# ----------------------------------------------------------------------------- the budget itself


def test_default_budget_takes_mammograms_and_cr_but_not_8000_squared(monkeypatch):
    assert resolve_max_pixels() == DEFAULT_MAX_PIXELS == 40_000_000
    assert check_size("mammo.png", 4000, 5000) == 20_000_000
    assert check_size("cr.png", 3000, 3000) == 9_000_000
    with pytest.raises(ImageTooLargeError) as e:
        check_size("x.png", 12000, 12000)
    assert str(e.value) == ("x.png: 12000x12000 = 144.0 MP is over the 40 MP pixel budget "
                            "(MGLL_MAX_PIXELS or --max-pixels)")
    assert e.value.reason == "too_large" and isinstance(e.value, ValueError)
    with pytest.raises(ImageTooLargeError, match="8000x8000 = 64.0 MP"):
        check_size("big.png", 8000, 8000)


def test_budget_from_env_and_argument(monkeypatch):
    monkeypatch.setenv("MGLL_MAX_PIXELS", "12M")
    assert resolve_max_pixels() == 12_000_000
    monkeypatch.setenv("MGLL_MAX_PIXELS", "4e7")
    assert resolve_max_pixels() == 40_000_000
    assert resolve_max_pixels(5000) == 5000  # the argument wins over the variable
    assert resolve_max_pixels("70MP") == 70_000_000
    monkeypatch.setenv("MGLL_MAX_PIXELS", "lots")
    with pytest.raises(ValueError, match="MGLL_MAX_PIXELS: 'lots' is not a pixel count"):
        resolve_max_pixels()
    with pytest.raises(ValueError, match="must be positive"):
        resolve_max_pixels(0)


# ----------------------------------------------------------------------------- DICOM


def test_the_deflated_bomb_is_130_kb_and_valid_dicom(tmp_path, bomb_dcm):
    assert bomb_dcm.stat().st_size < 200_000
    small = write_deflated(tmp_path / "small.dcm", 40, 30, value=700)
    ds = pydicom.dcmread(small)  # the stream writer above makes files pydicom reads like its own
    assert ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert ds.pixel_array.shape == (40, 30) and int(ds.pixel_array.max()) == 700


def test_deflated_header_is_read_without_inflating_the_pixels(bomb_dcm, monkeypatch):
    biggest = []

    class Spy(dicom_header._Inflating):
        def _fill(self, upto):
            super()._fill(upto)
            biggest.append(len(self._buf))

    monkeypatch.setattr(dicom_header, "_Inflating", Spy)
    ds = read_dicom_header(bomb_dcm)
    assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.Modality) == (8000, 8000, 16, "DX")
    assert "PixelData" not in ds
    assert 0 < max(biggest) < 256 * 1024  # of 128 MB of pixels, at most one inflate chunk past the header


def test_dicom_to_array_rejects_the_deflated_bomb_as_too_large(bomb_dcm):
    with pytest.raises(DicomPixelError) as e:
        dicom_to_array(bomb_dcm)
    assert e.value.reason == "too_large"
    assert str(e.value).startswith(f"{bomb_dcm}: 8000x8000 = 64.0 MP (122 MB decoded) is over the 40 MP")
    with pytest.raises(DicomPixelError) as e:
        check_dicom_budget(bomb_dcm)
    assert e.value.reason == "too_large" and isinstance(e.value.__cause__, ImageTooLargeError)
    assert check_dicom_budget(bomb_dcm, max_pixels=64_000_000) == 64_000_000


def test_a_dataset_is_checked_before_its_pixels_are_decoded(tmp_path):
    ds = make_dataset(np.zeros((4, 4), np.uint16))
    ds.Rows = ds.Columns = 9000  # 16 bytes of pixels: decoding would fail, the budget must fire first
    with pytest.raises(DicomPixelError) as e:
        dicom_to_array(ds)
    assert e.value.reason == "too_large" and "9000x9000 = 81.0 MP" in str(e.value)
    ds.NumberOfFrames = 3
    ds.Rows = ds.Columns = 3000  # 9 MP a frame, 27 MP in all: frames count
    with pytest.raises(DicomPixelError, match="3000x3000 x 3 frames = 27.0 MP"):
        dicom_to_image(ds, max_pixels=20_000_000)


def test_a_budget_raised_over_the_file_decodes_it(tmp_path):
    path = write_deflated(tmp_path / "f.dcm", 300, 200, value=1000, center=1000, width=400)
    with pytest.raises(DicomPixelError, match=r"200x300 = 60,000 pixels \(117 KB decoded\) is over the 50,000-pixel budget"):
        dicom_to_array(path, max_pixels=50_000)
    arr = dicom_to_array(path, max_pixels=60_000)
    assert arr.shape == (300, 200) and float(arr.mean()) == pytest.approx(0.5, abs=0.01)


def test_build_xray_lists_the_bomb_as_rejected_too_large(tmp_path, bomb_dcm, monkeypatch):
    import shutil

    from mgll.data.build_xray import build_xray

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(bomb_dcm, src / "bomb.dcm")
    write_dicom(src / "ok.dcm", np.full((64, 48), 1000, np.uint16), center=1000, width=400)
    summary = build_xray(src, tmp_path / "out", workers=1, progress=False, salt_file=tmp_path / "salt")
    assert summary["records"] == 1 and summary["rejected"] == {"too_large": 1}
    rej = [json.loads(x) for x in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rej] == ["too_large"]
    assert rej[0]["detail"].startswith("<file>: 8000x8000 = 64.0 MP")  # named, yet no path in OUT

    monkeypatch.setenv("MGLL_MAX_PIXELS", "1000")  # the env budget reaches build-xray's worker code
    summary = build_xray(src, tmp_path / "out2", workers=1, progress=False, salt_file=tmp_path / "salt")
    assert summary["records"] == 0 and summary["rejected"] == {"too_large": 2}


# ----------------------------------------------------------------------------- PNG / JPEG


def test_pil_bomb_limit_no_longer_fires_first_with_an_unnamed_error(tmp_path, monkeypatch):
    path = _png(tmp_path / "wide.png", (100, 100), "1")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(Image.DecompressionBombError):  # the defect: not an OSError/ValueError, names no file
        Image.open(path)
    with pytest.raises(ImageTooLargeError, match=r"wide\.png: 10,000 pixels is over the 500-pixel budget"):
        open_image(path, 500)  # PIL's limit above the budget: its error is turned into ours, named
    assert load_rgb(path, 20_000).size == (100, 100)  # budget above PIL's: PIL's limit is lifted to match
    assert Image.MAX_IMAGE_PIXELS == 20_000


def test_a_9000_squared_png_is_refused_from_its_header(tmp_path):
    path = _png(tmp_path / "huge.png", (9000, 9000), "1")
    assert path.stat().st_size < 100_000
    with pytest.raises(ImageTooLargeError, match=r"huge\.png: 9000x9000 = 81\.0 MP is over the 40 MP"):
        load_rgb(path)


def _one_image_dataset(tmp_path, size):
    root = tmp_path / "ds"
    _png(root / "images" / "a.png", size)
    from mgll.data.records import DatasetCard, Level

    card = DatasetCard("t", (Level("status", "a {} eye"),))
    write_records(root, card, [Record("images/a.png", {"status": ("normal",)}, split="train")])
    return load_dataset(root)


def test_record_dataset_raises_record_error_naming_the_file(tmp_path, monkeypatch):
    ds = _one_image_dataset(tmp_path, (300, 200))
    with pytest.raises(RecordError, match=r"images/a\.png: 300x200 = 60,000 pixels is over the 50,000-pixel"):
        RecordImageDataset(ds, max_pixels=50_000)[0]
    x, labels = RecordImageDataset(ds, max_pixels=60_000)[0]
    assert tuple(x.shape) == (3, 200, 300) and labels == {"status": ("normal",)}
    monkeypatch.setenv("MGLL_MAX_PIXELS", "50000")
    with pytest.raises(RecordError, match="over the 50,000-pixel budget"):
        RecordImageDataset(ds).load_image(0)


def test_record_dataset_names_the_file_where_pil_bombs(tmp_path, monkeypatch):
    ds = _one_image_dataset(tmp_path, (100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(RecordError, match=r"a\.png: 10,000 pixels is over"):
        RecordImageDataset(ds, max_pixels=900).load_image(0)


def test_probe_features_skip_and_list_an_oversized_image(fundus_dataset, tiny_encoder, tmp_path, monkeypatch):
    from mgll.evaluate.features import extract_features
    from mgll.evaluate.probe import run_probe

    root = tmp_path / "ds"
    recs = copy_records(fundus_dataset, root)
    big = next(r for r in recs if r.split == "train")
    _png(root / big.image, (100, 100))  # 10,000 pixels; the others are 64 x 64 = 4,096
    ds = load_dataset(root)
    train = ds.split("train")
    fs = extract_features(str(tiny_encoder), ds, train, "train", max_pixels=5000, progress=False, use_cache=False)
    assert [s["image"] for s in fs.skipped] == [big.image]
    assert "100x100 = 10,000 pixels is over the 5,000-pixel budget" in fs.skipped[0]["reason"]
    assert len(fs.images) == len(train) - 1 and big.image not in fs.images

    monkeypatch.setenv("MGLL_MAX_PIXELS", "5000")
    rep = run_probe(str(tiny_encoder), ds, "status", bootstrap=0, out=tmp_path / "probe", progress=False)
    assert [s["image"] for s in rep["features"]["skipped"]] == [big.image]
    assert any(big.image in w and "pixel budget" in w for w in rep["warnings"])


def test_the_demo_refuses_oversized_dicom_and_png_with_a_message(tmp_path, bomb_dcm):
    with pytest.raises(DemoInputError) as e:
        demo_load_image(bomb_dcm)
    msg = str(e.value)
    assert msg.startswith("bomb.dcm: 8000x8000 = 64.0 MP (122 MB decoded) is over this demo's 40 MP pixel budget")
    assert "--max-pixels" in msg and str(bomb_dcm.parent) not in msg  # the page gets the name, not the server path
    png = _png(tmp_path / "huge.png", (9000, 9000), "1")
    with pytest.raises(DemoInputError, match=r"^huge\.png: 9000x9000 = 81\.0 MP is over this demo's 40 MP"):
        demo_load_image(png)
    small = _png(tmp_path / "s.png", (300, 200))
    with pytest.raises(DemoInputError, match="over this demo's 50,000-pixel budget"):
        demo_load_image(small, max_pixels=50_000)
    assert demo_load_image(small, max_pixels=60_000).size == (300, 200)


def test_build_fundus_rejects_over_budget_images_in_rejected_jsonl(tmp_path):
    src = tmp_path / "kaggle"
    _png(src / "normal" / "small.png", (48, 40))
    _png(src / "normal" / "large.png", (300, 200))
    s = build_fundus(src, tmp_path / "out", fmt="folder", size=32, workers=1, progress=False, max_pixels=50_000)
    assert s["records"] == 1 and s["rejected"] == {"too_large": 1}
    rej = [json.loads(x) for x in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert len(rej) == 1 and rej[0]["reason"] == "too_large" and rej[0]["key"].endswith("large.png")
    assert rej[0]["detail"] == "300x200 = 60,000 pixels is over the 50,000-pixel budget"
    s = build_fundus(src, tmp_path / "out", fmt="folder", size=32, workers=1, progress=False, max_pixels=60_000,
                     retry_rejected=True)
    assert s["records"] == 2 and s["rejected_total"] == 0
