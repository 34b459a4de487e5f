"""Every host's swapped processor, as saved and reloaded, shows the MGLL tower the encoder's own eval transform.

Found on a 200x150 image: five of six host processors squashed, padded or refused non-square images, so the
tower saw pixels it was never trained on. Here, for landscape, portrait, square and tiny images, the view the
tower gets (the only view, LLaVA-NeXT's base view, InternVL's thumbnail or single tile) must equal open_clip's
eval transform of the encoder within one 8-bit level; tiles of multi-tile hosts stay the host's own tiling.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mgll.adapters.hosts import get_host
from mgll.adapters.swap import load_processor, load_swapped, read_swap_spec
from mgll.cli import main
from mgll.encoder.factory import create_encoder, save_encoder
from mgll.mllm_eval.scoring import build_prompt, encode_prefix
from mgll.testing import tiny

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from stock_models import build_stock  # noqa: E402  (tiny models from transformers' own classes, each release's processor)

MEAN, STD = (0.4, 0.45, 0.5), (0.2, 0.25, 0.3)  # not any host's own: a processor left on those fails
SIZES = [(150, 200), (200, 150), (64, 64), (13, 20), (101, 333)]  # (height, width): landscape, portrait, square, tiny, wide
HOSTS = ["instructblip", "internvl", "janus", "llava", "llava_next", "qwen2_vl"]
ONE_LEVEL = 1.0 + 1e-3  # in 8-bit levels, after undoing the normalisation


def photo(h: int, w: int, seed: int = 0) -> Image.Image:
    """A smooth image with detail at every scale (noise would make resampling differences look larger than they are)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(7 * x + 3 * y), np.cos(5 * y - 2 * x), np.sin(11 * x * y)], -1)
    arr = (127.5 + 100 * base + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    torch.manual_seed(0)
    enc, _, preprocess, _, name = create_encoder("mgll-tiny-vit", image_mean=MEAN, image_std=STD)
    save_encoder(enc, root / "enc", name)
    return root / "enc", preprocess


def swap_folder(tmp_path, host, encoder_dir, *extra):
    build_stock(host, tmp_path / "src")
    out = tmp_path / "swapped"
    assert main(["swap", "--host", host, "--mllm", str(tmp_path / "src"), "--encoder", str(encoder_dir), "--out", str(out), *extra]) == 0
    return out


def qwen_frames(pixel_values: torch.Tensor, grid_thw: torch.Tensor, patch: int = 8, merge: int = 2) -> torch.Tensor:
    """Undo Qwen2-VL's patch flattening for single-frame images: (N, 3*2*p*p) -> (images, 3, H, W)."""
    out = []
    start = 0
    for t, h, w in grid_thw.tolist():
        n = t * h * w
        x = pixel_values[start:start + n].view(t, h // merge, w // merge, merge, merge, 3, 2, patch, patch)
        x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(t, 2, 3, h * patch, w * patch)
        out.append(x[0, 0])
        start += n
    return torch.stack(out)


def tower_view(host: str, processor, image: Image.Image) -> tuple[torch.Tensor, dict]:
    """The whole-image view the MGLL tower gets for ``image`` through the inference path (the processor's
    full call on the host's chat prompt, as `mgll mcq` and the demo do), as (3, S, S) pixels, and the raw inputs."""
    out = encode_prefix(processor, build_prompt(host, processor, "describe the image"), image, "cpu", torch.float32)
    pv = out["pixel_values"]
    if host == "qwen2_vl":
        return qwen_frames(pv, out["image_grid_thw"])[0], out
    if host == "llava_next":
        return pv[0, 0], out  # the base view comes before the anyres tiles
    if host == "internvl":
        return pv[-1], out  # the thumbnail is the last tile (or the single tile)
    return pv[0], out


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs() * torch.tensor(STD).view(3, 1, 1) * 255


@pytest.mark.parametrize("host", HOSTS)
def test_the_tower_sees_the_encoders_eval_transform(host, encoder, tmp_path):
    encoder_dir, preprocess = encoder
    folder = swap_folder(tmp_path, host, encoder_dir)
    assert read_swap_spec(folder)["image_view"] == "crop"
    processor = load_processor(folder)  # as saved: the folder's own image-processing code
    worst = {}
    for h, w in SIZES:
        image = photo(h, w)
        got, _ = tower_view(host, processor, image)
        want = preprocess(image)
        assert got.shape == want.shape, (host, (h, w), got.shape)
        worst[(h, w)] = float(levels(got, want).max())
    assert max(worst.values()) <= ONE_LEVEL, f"{host}: worst difference per size in 8-bit levels {worst}"


@pytest.mark.parametrize(("host", "stock_class"), [("llava_next", "LlavaNextImageProcessor"), ("internvl", "GotOcr2ImageProcessor")])
def test_multi_tile_hosts_keep_their_own_tiles(host, stock_class, encoder, tmp_path):
    """Only the whole-image view changes: every other tile equals the stock processor's at the same settings."""
    import transformers

    folder = swap_folder(tmp_path, host, encoder[0])
    ours = load_processor(folder).image_processor
    settings = {k: v for k, v in ours.to_dict().items() if k not in ("mgll_view", "image_processor_type", "auto_map", "processor_class")}
    stock = getattr(transformers, stock_class)(**settings)
    image = photo(150, 300)
    tiling = {"crop_to_patches": True} if host == "internvl" else {}  # InternVLProcessor tiles by default
    a = ours([image], return_tensors="pt", **tiling)["pixel_values"]
    b = stock([image], return_tensors="pt", **tiling)["pixel_values"]
    assert a.shape == b.shape
    if host == "llava_next":
        assert a.shape[1] > 2, "the wide image should make several anyres tiles"
        torch.testing.assert_close(a[0, 1:], b[0, 1:], rtol=0, atol=0)
        assert (a[0, 0] - b[0, 0]).abs().max() > 0.1  # the base view: the encoder's crop, not LLaVA-NeXT's squash
    else:
        assert a.shape[0] > 2, "the wide image should make several InternVL tiles plus a thumbnail"
        torch.testing.assert_close(a[:-1], b[:-1], rtol=0, atol=0)
        assert (a[-1] - b[-1]).abs().max() > 0.1  # the thumbnail: the encoder's crop, not a squash


def test_llava_pad_view_is_an_explicit_recorded_choice(encoder, tmp_path, capsys):
    """LLaVA-1.5 / LLaVA-Med pad to a square with the mean colour: kept only when asked, and then exactly."""
    from transformers import LlavaImageProcessor, LlavaProcessor

    encoder_dir, preprocess = encoder
    src = tiny.make_tiny_llava(tmp_path / "src", ["describe the image"])
    old = LlavaProcessor.from_pretrained(src)  # as `mgll convert-llava` writes LLaVA-Med: a padding processor
    old.image_processor = LlavaImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_pad=True)
    old.save_pretrained(src)

    base = ["swap", "--host", "llava", "--mllm", str(src), "--encoder", str(encoder_dir)]
    assert main([*base, "--out", str(tmp_path / "crop")]) == 0
    assert "processor uses the 'pad' view; the swapped processor uses the encoder's 'crop' view (pass --image-view pad" in capsys.readouterr().out
    assert main([*base, "--out", str(tmp_path / "pad"), "--image-view", "pad"]) == 0
    spec = read_swap_spec(tmp_path / "pad")
    assert (spec["image_view"], spec["source_image_view"]) == ("pad", "pad")

    image = photo(150, 200)
    side = 200
    square = Image.new("RGB", (side, side), tuple(int(round(m * 255)) for m in MEAN))
    square.paste(image, (0, (side - 150) // 2))
    _, processor = load_swapped(tmp_path / "pad", with_processor=True)
    got = processor.image_processor([image], return_tensors="pt")["pixel_values"][0]
    assert float(levels(got, preprocess(square)).max()) <= ONE_LEVEL
    crop = load_processor(tmp_path / "crop").image_processor([image], return_tensors="pt")["pixel_values"][0]
    assert float(levels(crop, preprocess(image)).max()) <= ONE_LEVEL and float(levels(crop, got).max()) > 10


@pytest.mark.parametrize("host", ["qwen2_vl", "instructblip", "internvl"])
def test_alignment_batches_use_the_saved_processors_pixels(host, encoder, tmp_path):
    """align builds its batches through the same saved processor: the same pixels as inference for a non-square image."""
    folder = swap_folder(tmp_path, host, encoder[0])
    model, processor = load_swapped(folder)
    image = photo(150, 200)
    batch = get_host(host).build_batch(model, processor, [image], ["describe the image"], ["normal"])
    _, out = tower_view(host, processor, image)
    torch.testing.assert_close(batch["pixel_values"], out["pixel_values"], rtol=0, atol=0)
