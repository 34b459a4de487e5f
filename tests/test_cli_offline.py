"""Offline, the CLI keeps transformers' hub kernels off (their fetch fails every CUDA from_pretrained without a network)."""

import pytest

from mgll.cli import offline_defaults


@pytest.mark.parametrize(("offline", "user", "want"), [("1", None, "0"), ("true", None, "0"), ("1", "1", "1"), ("0", None, None), (None, None, None)])
def test_hub_kernels_are_off_offline_unless_the_user_says(monkeypatch, offline, user, want):
    for key, value in (("HF_HUB_OFFLINE", offline), ("USE_HUB_KERNELS", user)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    offline_defaults()
    import os

    assert os.environ.get("USE_HUB_KERNELS") == want
