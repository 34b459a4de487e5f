"""The demo's model side without gradio: input checks, both MLLMs' answers, the encoder's per-level view."""

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from demo_artifacts import build_demo_artifacts  # noqa: E402
from dicom_factory import write_dicom  # noqa: E402

from mgll.data import FUNDUS_DISEASES  # noqa: E402
from mgll.demo.backend import DemoBackend, MllmSide, resolve_host  # noqa: E402
from mgll.demo.encoder_view import EncoderView, patch_text_similarity  # noqa: E402
from mgll.demo.examples import bundled_examples, pydicom_data_file  # noqa: E402
from mgll.demo.inputs import DemoInputError, is_dicom, load_image, mcq_preset, parse_question  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return build_demo_artifacts(tmp_path_factory)


@pytest.fixture(scope="module")
def backend(artifacts):
    return DemoBackend(artifacts["base"], artifacts["swapped"], artifacts["encoder"], device="cpu", max_image_mb=1)


@pytest.fixture(scope="module")
def fundus_png(tmp_path_factory):
    from mgll.data.synthetic import render_fundus

    path = tmp_path_factory.mktemp("img") / "fundus.png"
    Image.fromarray(np.asarray(render_fundus({"glaucoma": 2}, 96, (5,)), dtype=np.uint8)).save(path)
    return path


# -- inputs -------------------------------------------------------------------------------------------
def test_load_image_reads_pictures_and_stretches_16_bit_grayscale(tmp_path, fundus_png):
    im = load_image(fundus_png)
    assert im.mode == "RGB" and im.size == (96, 96)
    arr = np.linspace(1000, 3000, 32 * 16, dtype=np.uint16).reshape(16, 32)
    Image.fromarray(arr).save(tmp_path / "xray16.png")
    im16 = np.asarray(load_image(tmp_path / "xray16.png"))
    assert im16.shape == (16, 32, 3)
    assert im16.min() == 0 and im16.max() == 255  # min-max stretched, not clipped to white


def test_load_image_rejects_bad_files_with_a_message_naming_them(tmp_path):
    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.raises(DemoInputError, match=r"notes\.txt: not an image"):
        load_image(tmp_path / "notes.txt")
    with pytest.raises(DemoInputError, match="No image"):
        load_image(None)
    with pytest.raises(DemoInputError, match="file not found"):
        load_image(tmp_path / "missing.png")
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 2**20
    with pytest.raises(DemoInputError, match=r"big\.png: 1\.\d MB is over this demo's 1 MB limit.*--max-image-mb"):
        load_image(big, max_mb=1)
    assert load_image(big, max_mb=2).size == (700, 700)
    (tmp_path / "garbage.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 40)
    with pytest.raises(DemoInputError, match=r"garbage\.dcm: unreadable DICOM"):
        load_image(tmp_path / "garbage.dcm")
    write_dicom(tmp_path / "nopixels.dcm", np.zeros((8, 8)), pixels=False)
    with pytest.raises(DemoInputError, match=r"nopixels\.dcm: unreadable DICOM \(the file has no Pixel Data"):
        load_image(tmp_path / "nopixels.dcm")


def test_dicom_goes_through_the_xray_pixel_pipeline(tmp_path):
    arr = np.tile(np.arange(64, dtype=np.uint16) * 50, (48, 1))
    write_dicom(tmp_path / "ramp", arr, photometric="MONOCHROME1", center=1600, width=3200)  # no suffix: found by magic
    assert is_dicom(tmp_path / "ramp")
    im = np.asarray(load_image(tmp_path / "ramp"))
    assert im.shape == (48, 64, 3)  # small images keep their size
    row = im[im.shape[0] // 2, :, 0].astype(int)
    assert row[0] > 200 > 50 > row[-1]  # MONOCHROME1: high stored values render dark
    cr = pydicom_data_file("RG1_UNCR.dcm")
    if cr is not None:  # pydicom-data is a dev dependency
        real = load_image(cr)
        assert real.mode == "RGB" and real.size == (964, 1024) and np.asarray(real).std() > 10  # 1841 x 1955 rendered down


def test_parse_question_tells_multiple_choice_from_free_text():
    text, options = parse_question(mcq_preset())
    assert options == list(FUNDUS_DISEASES) and text.startswith("Which of the following diseases")
    assert parse_question("  describe the fundus image.  ") == ("describe the fundus image.", None)
    assert parse_question("Which?\nA. drusen\nB) glaucoma")[1] == ["drusen", "glaucoma"]
    assert parse_question("Which?\nA. drusen\nC. glaucoma")[1] is None  # letters must run A, B, ...
    assert parse_question("A. only one")[1] is None
    for empty in ("", "   \n ", None):
        with pytest.raises(DemoInputError, match="Empty question"):
            parse_question(empty)


def test_bundled_examples_are_written_once_and_all_load(tmp_path):
    examples = bundled_examples(tmp_path)
    names = [e.name for e in examples]
    assert any("retina" in n for n in names) and any("microaneurysms" in n for n in names)
    assert sum(n.startswith("synthetic") for n in names) >= 3
    if pydicom_data_file("RG1_UNCR.dcm") is not None:
        dcm = next(e for e in examples if e.path.suffix == ".dcm")
        assert is_dicom(dcm.path)
    stamps = {e.path: e.path.stat().st_mtime_ns for e in examples}
    for e in examples:
        assert load_image(e.path).mode == "RGB"
    assert {e.path: e.path.stat().st_mtime_ns for e in bundled_examples(tmp_path)} == stamps


# -- models ---------------------------------------------------------------------------------------------
def test_hosts_are_read_from_the_checkpoints(artifacts, backend, tmp_path):
    assert backend.base.host == "llava" and not backend.base.swapped  # plain checkpoint: config.json's model_type
    assert backend.swapped.host == "llava" and backend.swapped.swapped
    with pytest.raises(ValueError, match="mgll_swap.json says host 'llava'"):
        resolve_host(artifacts["swapped"], "qwen2_vl")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_host(tmp_path)


def test_multiple_choice_answers_score_options_like_the_reference(backend, fundus_png):
    from mgll.mllm_eval.scoring import build_prompt, encode_prefix, naive_option_logliks, option_text

    r = backend.compare(fundus_png, mcq_preset())
    expected = [option_text(i, d) for i, d in enumerate(FUNDUS_DISEASES)]
    for side, ans in (("base", r.base), ("swapped", r.swapped)):
        assert ans.options == expected and list(ans.probs) == expected, side
        assert sum(ans.probs.values()) == pytest.approx(1.0, abs=1e-9)
        assert ans.text == max(ans.probs, key=ans.probs.get)
    assert r.base.logliks != r.swapped.logliks  # different towers see the image differently
    # the demo's cached-prefix scores equal one full forward per option
    side = backend.swapped
    image = load_image(fundus_png)
    prefix = encode_prefix(side.processor, build_prompt("llava", side.processor, r.question), image, "cpu", torch.float32)
    ids = [side.processor.tokenizer(t, add_special_tokens=False)["input_ids"] for t in expected]
    ref = naive_option_logliks(side.model, prefix, ids)
    assert np.allclose(r.swapped.logliks, ref.numpy(), atol=1e-3)


def test_encoder_levels_sum_to_one_when_single_label(backend, fundus_png, artifacts):
    from mgll.data import load_dataset

    r = backend.compare(fundus_png, "describe the fundus image.", "status: normal")
    assert r.options is None and r.base.probs is None
    assert isinstance(r.base.text, str) and r.base.text and isinstance(r.swapped.text, str) and r.swapped.text
    card = load_dataset(artifacts["data"]).card
    assert [lp.level for lp in r.levels] == list(card.level_names)
    kinds = {lp.level: lp.kind for lp in r.levels}
    assert kinds["status"] == "binary" and kinds["disease"] == "multilabel"
    for lp in r.levels:
        assert all(0.0 <= p <= 1.0 for p in lp.probs.values())
        if lp.single_label:
            assert sum(lp.probs.values()) == pytest.approx(1.0, abs=1e-9), lp.level
        assert lp.score == "softmax"  # no logit_bias: soft CLIP's softmax, also for multi-label levels
    assert (r.heat_level, r.heat_label) == ("status", "normal")
    assert r.heatmap.mode == "RGB" and max(r.heatmap.size) == 448
    assert -1.0 <= r.heat_range["min"] < r.heat_range["max"] <= 1.0
    auto = backend.compare(fundus_png, "describe the fundus image.")
    disease = next(lp.probs for lp in auto.levels if lp.level == "disease")
    assert (auto.heat_level, auto.heat_label) == ("disease", max(disease, key=disease.get))
    with pytest.raises(DemoInputError, match="unknown heat-map label"):
        backend.compare(fundus_png, "describe the fundus image.", "disease: unicorns")
    with pytest.raises(DemoInputError, match="Empty question"):
        backend.compare(fundus_png, "   ")


def test_patch_similarity_matches_open_clip_intermediates(backend):
    visual = backend.encoder.model.visual
    pixels = torch.randn(1, 3, *visual.image_size, generator=torch.Generator().manual_seed(0))
    text = torch.randn(visual.output_dim, generator=torch.Generator().manual_seed(1))
    sim = patch_text_similarity(visual, pixels, text)
    gh, gw = visual.grid_size
    assert sim.shape == (1, gh, gw)
    # independent route: last block's tokens from forward_intermediates, then ln_post and the projection
    with torch.no_grad():
        inter = visual.forward_intermediates(pixels, indices=1, intermediates_only=True, output_fmt="NLC")
        tokens = visual.ln_post(inter["image_intermediates"][-1]) @ visual.proj
    ref = torch.nn.functional.normalize(tokens, dim=-1) @ torch.nn.functional.normalize(text, dim=0)
    assert torch.allclose(sim.reshape(1, -1), ref, atol=1e-5)


def test_swapped_twin_loads_an_alignment_runs_projector(artifacts, backend, fundus_png, tmp_path):
    from mgll.adapters.hosts import get_host
    from mgll.adapters.swap import save_projector

    model = backend.swapped.model
    proj = get_host("llava").projector(model)
    before = {k: v.clone() for k, v in proj.state_dict().items()}
    with torch.no_grad():
        for p in proj.parameters():
            p.mul_(3.0)  # stands in for a trained projector
    save_projector(model, "llava", tmp_path / "align" / "projector.safetensors")
    proj.load_state_dict(before)
    aligned = MllmSide(artifacts["swapped"], align_dir=tmp_path / "align")
    got = get_host("llava").projector(aligned.model).state_dict()
    assert all(torch.allclose(got[k], 3.0 * before[k]) for k in before)
    image = load_image(fundus_png)
    text, options = parse_question(mcq_preset())
    assert aligned.answer(image, text, options).logliks != backend.swapped.answer(image, text, options).logliks
    with pytest.raises(FileNotFoundError, match="alignment run folder not found"):
        MllmSide(artifacts["swapped"], align_dir=tmp_path / "nope")


def test_encoder_view_needs_a_dataset_and_an_encoder(artifacts, tmp_path):
    lone = tmp_path / "lone"
    (lone / "encoder").mkdir(parents=True)
    for f in (artifacts["encoder"] / "encoder").iterdir():
        (lone / "encoder" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(FileNotFoundError, match="pass --data DATASET"):
        EncoderView(lone)
    assert EncoderView(lone, data=artifacts["data"]).levels == ["status", "disease", "explanation"]
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        EncoderView(tmp_path / "nothing", data=artifacts["data"])


# -- CLI --------------------------------------------------------------------------------------------------
def _demo_args(*argv):
    from mgll.demo.cli import register

    parser = argparse.ArgumentParser(prog="mgll")
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["demo", *argv])


def test_cli_without_quickstart_says_how_to_get_models(tmp_path):
    args = _demo_args("--quickstart", str(tmp_path / "qs"))
    assert (args.server_name, args.share, args.max_image_mb) == ("127.0.0.1", False, 20.0)
    with pytest.raises(FileNotFoundError) as e:
        args.func(args)
    msg = str(e.value)
    assert f"mgll quickstart --out {tmp_path / 'qs'}" in msg
    assert "--base" in msg and "--swapped" in msg and "--encoder" in msg and "mgll swap" in msg
    with pytest.raises(ValueError, match="--max-image-mb must be positive"):
        args = _demo_args("--max-image-mb", "0")
        args.func(args)
