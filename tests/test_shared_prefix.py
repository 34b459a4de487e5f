"""The pieces of generate's shared prompt prefix (mgll.mllm_eval.shared_prefix); the end-to-end equality with
batch size 1 on every host is tests/test_mcq_batching.py."""

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mgll.adapters.hosts import get_host
from mgll.adapters.prompts import encode_prefixes
from mgll.mllm_eval.scoring import build_prompt, format_question, load_model
from mgll.mllm_eval.shared_prefix import common_prefix_length, group_rows, shared_prefix_inputs

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from stock_models import build_stock  # noqa: E402


def t(*ids):
    return torch.tensor(ids)


def test_rows_group_by_key_in_order_of_first_appearance():
    assert group_rows(["q2", "q1", "q2", "q3", "q1", "q2"]) == [[0, 2, 5], [1, 4], [3]]
    assert group_rows([]) == []


def test_common_prefix_stops_at_the_first_difference_and_leaves_every_row_a_token():
    assert common_prefix_length([t(1, 2, 3, 4), t(1, 2, 5, 4)]) == 2
    assert common_prefix_length([t(1, 2, 3, 4), t(1, 2, 3, 9), t(1, 7, 3, 4)]) == 1  # the earliest difference wins
    assert common_prefix_length([t(1, 2, 3), t(1, 2, 3)]) == 2  # identical rows: the last token stays each row's own
    assert common_prefix_length([t(1, 2), t(1, 2, 3, 4)]) == 1  # capped by the shortest row
    assert common_prefix_length([t(5, 2, 3), t(1, 2, 3)]) == 0
    assert common_prefix_length([t(4)]) == 0


def test_hosts_whose_prefix_depends_on_what_follows_or_that_run_their_own_loop_opt_out():
    shares = {name: get_host(name).shares_prompt_prefix
              for name in ("llava", "llava_next", "internvl", "janus", "qwen2_vl", "instructblip", "medflamingo")}
    assert shares == {"llava": True, "llava_next": True, "internvl": True, "janus": True,
                      "qwen2_vl": True, "instructblip": False, "medflamingo": False}


# -- shared_prefix_inputs on a stock LLaVA (tests/helpers/stock_models): what it returns, and when it declines -----
QUESTION = "Which disease does this fundus photograph show?"


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return load_model("llava", build_stock("llava", tmp_path_factory.mktemp("stock") / "llava"))


def _inputs(llava, prompts, keys, max_new_tokens=4):
    model, processor = llava
    images = [Image.new("RGB", (40, 30), (120, 60, 30))] * len(prompts)
    prefix = encode_prefixes(processor, prompts, images, "cpu", torch.float32)
    return prefix, shared_prefix_inputs("llava", model, processor, prompts, images, keys, prefix, "cpu", torch.float32,
                                        max_new_tokens)


def test_rotations_share_their_prefix_columns_and_a_single_row_continues_alone(llava):
    _, processor = llava
    opts = ["cataract", "glaucoma", "myopia drusen"]
    prompts = [build_prompt("llava", processor, format_question(QUESTION, o)) for o in (opts, opts[1:] + opts[:1])]
    prompts.append(build_prompt("llava", processor, format_question("Is the optic disc cupped?", ["yes", "no"])))
    prefix, got = _inputs(llava, prompts, ["q1", "q1", "q2"])
    assert got is not None
    cache = next(v for k, v in got.items() if k in ("cache", "past_key_values"))
    real = [prefix["input_ids"][r][prefix["attention_mask"][r].bool()] for r in range(3)]
    width = int(cache.get_seq_length())
    n_q1 = common_prefix_length(real[:2])
    assert width == max(n_q1, len(real[2]) - 1)  # the longest group prefix; a lone row keeps one own token
    ids, mask = got["input_ids"], got["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 3
    for r in range(3):  # every row's real tokens, in order, are the prompt's tokens
        assert torch.equal(ids[r][mask[r].bool()], real[r])
    assert torch.equal(ids[0, :width], ids[1, :width])  # one cached prefix for the two rotations
    assert got["disable_compile"] is True


def test_declines_when_the_rows_differ_before_their_image(llava):
    _, processor = llava
    image = processor.image_token
    prompts = [f"USER: red {image}\n{QUESTION} ASSISTANT:", f"USER: blue {image}\n{QUESTION} ASSISTANT:"]
    assert _inputs(llava, prompts, ["q", "q"])[1] is None
    assert _inputs(llava, prompts[:1] * 2, ["q", "q"])[1] is not None  # the same prompt twice: shared


def test_declines_a_model_with_its_own_cache_or_a_sliding_window(llava, monkeypatch):
    model, processor = llava
    opts = ["cataract", "glaucoma"]
    prompts = [build_prompt("llava", processor, format_question(QUESTION, o)) for o in (opts, opts[::-1])]
    assert _inputs(llava, prompts, ["q", "q"])[1] is not None
    monkeypatch.setattr(model.generation_config, "cache_implementation", "static")
    assert _inputs(llava, prompts, ["q", "q"])[1] is None
    monkeypatch.setattr(model.generation_config, "cache_implementation", None)
    monkeypatch.setattr(model.config.get_text_config(decoder=True), "sliding_window", 8, raising=False)
    assert _inputs(llava, prompts, ["q", "q"])[1] is None
