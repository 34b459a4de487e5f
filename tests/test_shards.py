"""WebDataset shards: written atomically and resumably, streamed disjointly per rank, every sample once per epoch,
the same inputs as the folder path, and a resumed run that repeats and skips nothing."""

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from mgll.cli import main
from mgll.data import make_synthetic
from mgll.data.image_dataset import RecordImageDataset
from mgll.data.shard_stream import ShardStream
from mgll.data.shards import MANIFEST, iter_shard, open_dataset, open_shards, write_shards
from mgll.encoder.config import load_config
from mgll.encoder.factory import create_encoder
from mgll.encoder.sampler import SeededItems
from mgll.encoder.trainer import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    ds = make_synthetic(root / "folder", kind="fundus", n=60, size=32, seed=5)
    write_shards(root / "folder", root / "shards", shard_size=8, progress=False)
    return root, ds


def pattern(root: Path, n: int = 8) -> str:
    return str(root / "shards" / ("{000000.." + f"{n - 1:06d}" + "}.tar"))


def train_indices(ds) -> list[int]:
    return [i for i, r in enumerate(ds.records) if r.split == "train"]


def test_shards_hold_every_record_once_with_card_and_checksums(data):
    root, ds = data
    m = json.loads((root / "shards" / MANIFEST).read_text())
    assert m["complete"] and m["n_samples"] == 60 and m["n_shards"] == 8 and [e["count"] for e in m["shards"]] == [8] * 7 + [4]
    assert json.loads((root / "shards" / "dataset.json").read_text()) == ds.card.to_dict()
    seen = []
    for e in m["shards"]:
        path = root / "shards" / e["name"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == e["sha256"]
        for meta, ext, blob in iter_shard(str(path)):
            rec = ds.records[meta["index"]]
            assert blob == ds.image_path(rec).read_bytes() and ext == "png"
            assert meta["labels"] == {k: list(v) for k, v in rec.labels.items()} and meta["split"] == rec.split
            seen.append(meta["index"])
    assert sorted(seen) == list(range(60)) and seen != sorted(seen)  # every record once, shuffled before cutting


def test_an_interrupted_shard_run_resumes_to_the_same_bytes(data, tmp_path):
    root, _ = data
    out = tmp_path / "s"
    shutil.copytree(root / "shards", out)
    m = json.loads((out / MANIFEST).read_text())
    m["complete"], m["shards"] = False, m["shards"][:3]  # as if killed after shard 3 was listed
    (out / MANIFEST).write_text(json.dumps(m))
    (out / "000005.tar").write_bytes(b"torn")  # a torn shard the manifest never listed
    (out / "000006.tar").unlink()
    again = write_shards(root / "folder", out, shard_size=8, progress=False)
    assert again["complete"] and again["shards"] == json.loads((root / "shards" / MANIFEST).read_text())["shards"]


def test_existing_shards_are_kept_unless_overwrite(data, capsys):
    root, _ = data
    assert main(["shard", str(root / "folder"), str(root / "shards"), "--shard-size", "8", "--no-progress"]) == 2
    assert "already holds these shards, complete; pass --overwrite" in capsys.readouterr().err
    assert main(["shard", str(root / "nope"), str(root / "x"), "--no-progress"]) == 2


def test_ranks_read_disjoint_shards_and_cover_the_split_each_epoch(data):
    root, ds = data
    shards = open_shards(pattern(root))
    per_rank = {}
    for rank in (0, 1):
        stream = ShardStream(shards, "train", lambda im: torch.zeros(1), global_batch=4, total_steps=40, seed=3, rank=rank, world_size=2)
        spe = stream.steps_per_epoch(0)
        per_rank[rank] = [i for _, (_, _, idx) in zip(range(spe), iter(stream)) for i in idx]
        shard_of = {i: e["name"] for e in shards.entries for i in _indices(root / "shards" / e["name"])}
        per_rank[rank, "shards"] = {shard_of[i] for i in per_rank[rank]}
    assert not set(per_rank[0]) & set(per_rank[1])  # no sample on both ranks
    assert not per_rank[0, "shards"] & per_rank[1, "shards"]  # not even a shard
    union = Counter(per_rank[0] + per_rank[1])
    assert max(union.values()) == 1 and set(union) <= set(train_indices(ds))
    assert len(union) >= len(train_indices(ds)) - 2 * 2 * 3  # each rank drops less than a batch at the epoch's end


def _indices(path: Path) -> list[int]:
    return [m["index"] for m, _, _ in iter_shard(str(path))]


def test_one_stream_sees_the_folder_epochs_multiset_with_the_folder_inputs(data):
    """One process: an epoch of the stream is the folder sampler's epoch (the same samples), with identical tensors."""
    root, ds = data
    _, _, preprocess, _, _ = create_encoder("mgll-tiny-vit")
    train_recs = train_indices(ds)
    batch = 4
    stream = ShardStream(open_shards(pattern(root)), "train", preprocess, global_batch=batch, total_steps=100, seed=1)
    spe = stream.steps_per_epoch(0)
    assert spe == len(train_recs) // batch
    rows = [b for _, b in zip(range(spe), iter(stream))]
    got = [i for _, _, idx in rows for i in idx]
    assert len(got) == spe * batch and set(got) <= set(train_recs) and len(set(got)) == len(got)
    # with a batch that leaves nothing over, an epoch is exactly the split's multiset, as the folder sampler's epoch
    ones = ShardStream(open_shards(pattern(root)), "train", lambda im: torch.zeros(1), global_batch=1, total_steps=200, seed=1)
    epoch0 = [idx[0] for _, (_, _, idx) in zip(range(ones.steps_per_epoch(0)), iter(ones))]
    assert Counter(epoch0) == Counter(train_recs)
    folder = SeededItems(RecordImageDataset(ds, split="train", transform=preprocess), seed=1)
    position = {rec: k for k, rec in enumerate(train_recs)}
    images, labels, idx = rows[0]
    for j, rec in enumerate(idx):  # the same augmentation seed (seed, epoch, record) as the folder path
        want_image, want_labels = folder[(position[rec], 0)]
        assert torch.equal(images[j], want_image) and labels[j] == want_labels


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_started_at_step_k_is_the_tail_of_the_uninterrupted_one(data, workers):
    root, _ = data
    shards = open_shards(pattern(root))

    def indices(start):
        stream = ShardStream(shards, "train", lambda im: torch.zeros(1), global_batch=2, total_steps=30, seed=7,
                             streams=max(1, workers), start_step=start)
        loader = DataLoader(stream, batch_size=None, num_workers=workers)
        return [tuple(idx) for _, _, idx in loader]

    full = indices(0)
    assert len(full) == 30 and len(set(full)) < 30  # crosses into the next epoch
    for k in (5, 17):  # mid-epoch and in the second epoch
        assert indices(k) == full[k:]


def test_training_from_shards_resumes_exactly_and_keeps_its_stream_layout(data, tmp_path):
    root, _ = data

    def cfg(out, workers=0):
        return load_config(overrides=[f"output_dir={out}", f"data.path={pattern(root)}", "train.batch_size=4",
                                      "train.steps=6", "train.save_every=3", "train.warmup_steps=1", f"data.num_workers={workers}"])

    whole = train(cfg(tmp_path / "whole"), progress=False)
    train(cfg(tmp_path / "parts"), max_steps_this_run=3, progress=False)
    with pytest.raises(ValueError, match=r"read its shards with 1 processes x 1 streams .* resuming with 1 x 2 would repeat"):
        train(cfg(tmp_path / "parts", workers=2), resume=True, progress=False)
    parts = train(cfg(tmp_path / "parts"), resume=True, progress=False)
    a = [json.loads(x)["loss"] for x in (whole / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x)["loss"] for x in (parts / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == 6 and a == pytest.approx(b, abs=1e-6)


def test_evaluation_reads_shards_through_a_cache(data, tmp_path, monkeypatch):
    root, ds = data
    monkeypatch.setenv("MGLL_CACHE", str(tmp_path / "cache"))
    unpacked = open_dataset(pattern(root), splits=("test",))
    want = sorted((r.labels["disease"], ds.image_path(r).read_bytes()) for r in ds.split("test"))
    got = sorted((r.labels["disease"], unpacked.image_path(r).read_bytes()) for r in unpacked.records)
    assert got == want and {r.split for r in unpacked.records} == {"test"}
    again = open_dataset(pattern(root), splits=("test",))
    assert again.root == unpacked.root and len(again.records) == len(unpacked.records)


def test_a_probe_on_shards_equals_the_probe_on_the_folder(data, tmp_path, monkeypatch):
    from mgll.encoder.factory import save_encoder

    root, _ = data
    monkeypatch.setenv("MGLL_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    enc, _, _, _, name = create_encoder("mgll-tiny-vit")
    save_encoder(enc, tmp_path / "enc", name)
    out = {}
    for tag, where in (("shards", pattern(root)), ("folder", str(root / "folder"))):
        assert main(["probe", "--encoder", str(tmp_path / "enc"), "--data", where, "--level", "status", "--bootstrap", "0",
                     "--out", str(tmp_path / tag), "--no-progress"]) == 0
        out[tag] = json.loads((tmp_path / tag / "metrics.json").read_text())["results"]
    assert out["shards"] == out["folder"]
