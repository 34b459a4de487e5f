"""The pieces of generate's shared prompt prefix (mgll.mllm_eval.shared_prefix); the end-to-end equality with
batch size 1 on every host is tests/test_mcq_batching.py."""

import torch

from mgll.adapters.hosts import get_host
from mgll.mllm_eval.shared_prefix import common_prefix_length, group_rows


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
