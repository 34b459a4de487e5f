"""16-bit grayscale images (``build-xray --bits 16``) are read as the picture they hold, not clipped white."""

import numpy as np
import pytest
from PIL import Image

from mgll.data.dicom_pixels import quantise
from mgll.data.image_dataset import RecordImageDataset
from mgll.data.records import DatasetCard, Level, Record, write_dataset
from mgll.data.rgb import to_rgb


def _ramp(n=64):
    return np.linspace(0.0, 1.0, n * n, dtype=np.float32).reshape(n, n)


def test_plain_convert_saturates_what_to_rgb_keeps():
    """The defect: PIL clips I;16 at 255, so ~all of a 0-65535 ramp turns white."""
    im16 = quantise(_ramp(), 16)
    assert im16.mode == "I;16"
    clipped = np.asarray(im16.convert("RGB"))[..., 0]
    assert (clipped == 255).mean() > 0.99
    ours = np.asarray(to_rgb(im16))[..., 0]
    eight = np.asarray(quantise(_ramp(), 8).convert("RGB"))[..., 0]
    assert np.abs(ours.astype(int) - eight.astype(int)).max() <= 1  # the picture --bits 8 writes, within a grey level
    assert ours.min() == 0 and ours.max() == 255


def test_float_int_and_12_bit_images_are_stretched():
    f = Image.fromarray((_ramp() * 7.0 - 3.0).astype(np.float32), mode="F")
    out = np.asarray(to_rgb(f))[..., 0]
    assert out.min() == 0 and out.max() == 255
    i = Image.fromarray((_ramp() * 200000).astype(np.int32), mode="I")
    assert np.asarray(to_rgb(i))[..., 0].max() == 255
    twelve = Image.fromarray(np.linspace(0, 4095, 64, dtype=np.uint16).reshape(8, 8))  # 12-bit data in a 16-bit PNG
    assert np.asarray(to_rgb(twelve))[..., 0].max() == 255
    rgb = Image.new("RGB", (4, 4), (10, 20, 30))
    assert np.asarray(to_rgb(rgb))[0, 0].tolist() == [10, 20, 30]


def test_training_reads_a_16_bit_png_as_its_8_bit_picture(tmp_path):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    quantise(_ramp(), 16).save(root / "images" / "a.png")
    card = DatasetCard(name="t", levels=(Level("status", "{}"),))
    write_dataset(root, card, [Record(image="images/a.png", labels={"status": ("normal",)})])
    from mgll.data import load_dataset

    img = np.asarray(RecordImageDataset(load_dataset(root)).load_image(0))
    assert img.mean() == pytest.approx(127.5, abs=1.0)  # a full ramp, not a white frame (255)
