"""The demo served on localhost: driven through gradio_client and through a real headless Chromium."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from demo_artifacts import build_demo_artifacts  # noqa: E402
from dicom_factory import write_dicom  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

from mgll.demo.app import ERROR_PREFIX, OK_PREFIX, build_app, launch  # noqa: E402
from mgll.demo.backend import DemoBackend  # noqa: E402
from mgll.demo.examples import bundled_examples  # noqa: E402
from mgll.demo.inputs import mcq_preset  # noqa: E402
from mgll.demo.screenshot import chromium_paths, compare_in_browser  # noqa: E402

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword):DeprecationWarning")

BROWSER, DRIVER = chromium_paths()
N_OUT = 11  # status, preview, base answer, base probs, swapped answer, swapped probs, 3 levels, heat map, JSON


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    art = build_demo_artifacts(tmp_path_factory)
    backend = DemoBackend(art["base"], art["swapped"], art["encoder"], device="cpu", max_image_mb=10)
    examples_dir = tmp_path_factory.mktemp("examples")
    bundled = bundled_examples(examples_dir)
    examples = {e.path.name: e.path for e in bundled}
    app = build_app(backend, bundled)
    _, url, _ = launch(app, port=None, allowed_paths=[examples_dir], block=False, max_upload_mb=40)
    assert url.startswith("http://127.0.0.1:")
    yield url, examples
    app.close()


@pytest.fixture(scope="module")
def client(served, tmp_path_factory):
    return Client(served[0], analytics_enabled=False, verbose=False, download_files=str(tmp_path_factory.mktemp("dl")))


def _conf(label: dict) -> dict[str, float]:
    return {c["label"]: c["confidence"] for c in label["confidences"]}


def test_both_answers_and_per_level_probabilities_come_back(client, served):
    out = client.predict(handle_file(str(served[1]["synthetic-glaucoma.png"])), mcq_preset(), api_name="/compare")
    assert len(out) == N_OUT
    status, preview, base_md, base_probs, swapped_md, swapped_probs, *levels, heat, details = out
    assert status.startswith(OK_PREFIX) and "multiple choice, 10 options" in status
    assert base_md.startswith("**Answer:** ") and swapped_md.startswith("**Answer:** ")
    for md, probs, side in ((base_md, base_probs, "base"), (swapped_md, swapped_probs, "swapped")):
        conf = _conf(probs)
        assert len(conf) == 10 and sum(conf.values()) == pytest.approx(1.0, abs=1e-6)
        assert probs["label"] in md and details[side]["text"] == probs["label"]
    assert [lv["level"] for lv in details["levels"]] == ["status", "disease", "explanation"]
    for label, lv in zip(levels, details["levels"]):
        if lv["kind"] != "multilabel":  # single-label level: every class shown, summing to one
            assert _conf(label) == pytest.approx(lv["probs"])
            assert sum(_conf(label).values()) == pytest.approx(1.0, abs=1e-6)
            assert sum(lv["probs"].values()) == pytest.approx(1.0, abs=1e-6)
    assert details["levels"][0]["kind"] == "binary"
    from PIL import Image

    with Image.open(heat) as im:
        assert im.size == (448, 448)
    with Image.open(preview) as im:
        assert im.size == (256, 256)


def test_free_text_and_dicom_upload(client, served):
    dcm = [p for name, p in served[1].items() if name.endswith(".dcm")]
    image = dcm[0] if dcm else served[1]["retina.jpg"]
    out = client.predict(handle_file(str(image)), "What does this radiograph show?", "status: abnormal", api_name="/compare")
    status, _, base_md, base_probs, swapped_md, swapped_probs, *_, details = out
    assert status.startswith(OK_PREFIX) and "free text" in status and "status: abnormal" in status
    assert len(base_md) > len("**Answer:** ") and len(swapped_md) > len("**Answer:** ")
    assert not base_probs and not swapped_probs and details["multiple_choice"] is False  # no option bars


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    (tmp / "notes.txt").write_text("not a picture")
    write_dicom(tmp / "nopixels.dcm", np.zeros((8, 8)), pixels=False)
    (tmp / "huge.png").write_bytes(np.random.default_rng(0).bytes(11 * 2**20))  # the size check comes first
    return {
        "non-image file": (tmp / "notes.txt", "notes.txt: not an image"),
        "unreadable DICOM": (tmp / "nopixels.dcm", "nopixels.dcm: unreadable DICOM"),
        "image over the size limit": (tmp / "huge.png", "huge.png: 11.0 MB is over this demo's 10 MB limit"),
    }


def test_bad_inputs_return_the_ui_message(client, served, tmp_path):
    cases = _bad_inputs(tmp_path)
    good = served[1]["synthetic-glaucoma.png"]
    cases["empty question"] = (good, "Empty question")
    for what, (path, message) in cases.items():
        question = "   " if what == "empty question" else mcq_preset()
        out = client.predict(handle_file(str(path)), question, api_name="/compare")
        status = out[0]
        assert status.startswith(ERROR_PREFIX) and message in status, (what, status)
        assert out[2] == out[4] == "" and not any(out[i] for i in (1, 3, 5, 6, 7, 8, 9, 10)), what  # nothing stale


@pytest.mark.skipif(not (BROWSER.is_file() and DRIVER.is_file()),
                    reason=f"needs Debian's chromium and chromium-driver ({BROWSER}, {DRIVER}); .ci/run installs them with apt-get")
def test_headless_chromium_uploads_an_example_and_gets_both_answers(served, tmp_path):
    url, examples = served
    r = compare_in_browser(url, examples["retina.jpg"], tmp_path / "demo.png")
    assert r.status.startswith("Done") and "multiple choice" in r.status
    for text in (r.base, r.swapped):
        assert text.startswith("Answer: ") and len(text) > len("Answer: ")
    chosen = r.base.removeprefix("Answer: ").rsplit(" (", 1)[0]
    assert chosen in r.base_bars and "%" in r.base_bars  # the option bars are filled too
    assert r.heatmap_shown
    png = (tmp_path / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_cli_loads_the_models_and_serves_on_loopback_without_share(monkeypatch, tmp_path, tmp_path_factory, capsys):
    import argparse

    from mgll.demo.cli import register

    art = build_demo_artifacts(tmp_path_factory)
    seen = {}
    monkeypatch.setattr("mgll.demo.app.launch", lambda app, **kw: seen.update(kw, app=app))
    parser = argparse.ArgumentParser(prog="mgll")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo", "--base", str(art["base"]), "--swapped", str(art["swapped"]), "--encoder",
                              str(art["encoder"]), "--examples-dir", str(tmp_path / "ex"), "--max-image-mb", "5"])
    assert args.func(args) == 0
    assert (seen["server_name"], seen["share"], seen["port"], seen["max_upload_mb"]) == ("127.0.0.1", False, None, 20.0)
    assert seen["allowed_paths"] == [tmp_path / "ex"] and any((tmp_path / "ex").iterdir())
    assert "/compare" in seen["app"].get_api_info()["named_endpoints"]
    assert "loading base" in capsys.readouterr().out
