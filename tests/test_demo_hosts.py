"""The demo's answering side on every host family, not only LLaVA: a plain checkpoint and its MGLL twin
answer a multiple-choice question (probabilities over the options) and a free-text one."""

import numpy as np
import pytest
import torch
from PIL import Image

from mgll.adapters.swap import swap
from mgll.data import FUNDUS_DISEASES
from mgll.data.question_bank import QUESTION
from mgll.demo.backend import MllmSide
from mgll.encoder.factory import create_encoder, save_encoder
from mgll.mllm_eval.scoring import INSTRUCTION, option_text
from mgll.testing import tiny

torch.set_num_threads(1)

TEXTS = [QUESTION, INSTRUCTION, " ".join(FUNDUS_DISEASES), "describe the fundus image.", "user assistant answer : . a b c d"]
MAKERS = {
    "qwen2_vl": tiny.make_tiny_qwen2_vl,
    "instructblip": tiny.make_tiny_instructblip,
    "llava_next": tiny.make_tiny_llava_next,
    "internvl": tiny.make_tiny_internvl,
    "janus": tiny.make_tiny_janus,
}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-hosts-enc")
    torch.manual_seed(0)
    enc, _, _, _, arch = create_encoder("mgll-tiny-vit")
    save_encoder(enc, root / "encoder", arch)
    return root / "encoder"


@pytest.mark.parametrize("host", sorted(MAKERS))
def test_plain_checkpoint_and_mgll_twin_answer_both_kinds_of_question(host, encoder, tmp_path):
    base = MAKERS[host](tmp_path / "base", TEXTS, seed=0)
    twin = swap(host, base, encoder, tmp_path / "twin", seed=0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    options = list(FUNDUS_DISEASES[:4])
    for folder in (base, twin):
        side = MllmSide(folder, host=host if folder == base else None, max_new_tokens=4)
        assert side.host == host and side.swapped == (folder == twin)
        mcq = side.answer(image, QUESTION, options)
        assert mcq.options == [option_text(i, o) for i, o in enumerate(options)]
        assert sum(mcq.probs.values()) == pytest.approx(1.0, abs=1e-9)
        assert mcq.text == max(mcq.probs, key=mcq.probs.get)
        assert len(set(mcq.logliks)) == len(options)  # real scores, one per option
        free = side.answer(image, "describe the fundus image.", None)
        assert isinstance(free.text, str) and free.text and free.probs is None


def test_medflamingo_source_and_twin_answer(encoder, tmp_path):
    pytest.importorskip("open_flamingo", reason="run scripts/install_open_flamingo.sh")
    base = tiny.make_tiny_flamingo(tmp_path / "base", TEXTS, vision_width=32, image_size=32, patch_size=8, num_latents=8)
    twin = swap("medflamingo", base, encoder, tmp_path / "twin", seed=0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    options = list(FUNDUS_DISEASES[:4])
    for folder in (base, twin):
        side = MllmSide(folder, host="medflamingo", max_new_tokens=4)
        mcq = side.answer(image, QUESTION, options)
        assert sum(mcq.probs.values()) == pytest.approx(1.0, abs=1e-9) and len(set(mcq.logliks)) == len(options)
        assert isinstance(side.answer(image, "describe the fundus image.", None).text, str)
