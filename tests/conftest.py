import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def fundus_dataset(tmp_path_factory):
    """A small synthetic fundus dataset shared by the training tests (read-only)."""
    from mgll.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("data") / "fundus", kind="fundus", n=160, size=64, seed=3)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared CPU, two threads' spin-waits made each step ~10x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A randomly initialised tiny encoder saved as a run folder (training is not what is tested here).

    Module scope: probe caches features beside the encoder, and each module starts from an empty cache.
    """
    import torch

    from mgll.encoder.factory import create_encoder, save_encoder

    torch.manual_seed(0)
    model, _, _, _, name = create_encoder("mgll-tiny-vit")
    run = tmp_path_factory.mktemp("enc") / "encoder-tiny"
    save_encoder(model, run / "encoder", name, {"loss": "clip", "levels": []})
    return run
