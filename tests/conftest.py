import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def fundus_dataset(tmp_path_factory):
    """A small synthetic fundus dataset shared by the training tests (read-only)."""
    from mgll.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("data") / "fundus", kind="fundus", n=160, size=64, seed=3)
