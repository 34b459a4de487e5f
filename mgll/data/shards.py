"""A records dataset as WebDataset tar shards, for corpora past one disk: written once, read as streams.

The tools of this field read image-text corpora as tar shards (open_clip's training, img2dataset's
output). ``mgll shard`` writes a dataset folder that way: each sample is the image's bytes plus a
JSON of its record index, labels and split; the dataset card sits beside the shards, and
``manifest.json`` lists every shard with its sample count per split and its SHA-256. Records are
shuffled once (seeded, recorded) before they are cut into shards, so a shard is a random slice of
the corpus rather than one disease or one site. Every shard is written to a temporary name and
renamed when complete, the manifest after it: a killed run resumes at the first shard the manifest
does not list, and nothing half-written is ever read.

Reading uses the ``webdataset`` library (local paths, ``http(s)://``, ``pipe:`` and every scheme its
``gopen`` knows), never a tar reader of our own. The training stream that cuts these shards into
global batches is :mod:`mgll.data.shard_stream`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mgll.data.records import (
    DatasetCard,
    MultiGranularDataset,
    Record,
    _parse_card,
    load_dataset,
    write_dataset,
)
from mgll.io import atomic_path, atomic_write_json, file_sha256

__all__ = ["MANIFEST", "is_shard_pattern", "write_shards", "ShardSet", "open_shards", "iter_shard", "unpack_shards", "open_dataset"]

MANIFEST = "manifest.json"
FORMAT = "mgll-shards/1"
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://|^pipe:", re.IGNORECASE)


def is_shard_pattern(path: str | os.PathLike) -> bool:
    """``data.path`` names shards (``shards/{000000..000012}.tar``, a URL, one ``.tar``), not a dataset folder."""
    s = str(path)
    return s.endswith(".tar") or bool(_URL.match(s)) or ("{" in s and ".tar" in s)


def _records_digest(ds: MultiGranularDataset) -> str:
    """What the shards were cut from: a resumed ``mgll shard`` must see the same records in the same order."""
    h = hashlib.sha256()
    for r in ds.records:
        h.update(json.dumps(r.to_dict(), sort_keys=True).encode())
    return h.hexdigest()


def write_shards(src: str | os.PathLike, out: str | os.PathLike, shard_size: int = 1000, seed: int = 0,
                 overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Write ``out/{000000..}.tar`` + ``dataset.json`` + ``manifest.json`` from the dataset folder ``src``; resumes."""
    import webdataset as wds
    from tqdm.auto import tqdm

    if shard_size < 1:
        raise ValueError(f"--shard-size {shard_size}: expected a positive number of samples per shard")
    ds = load_dataset(src)
    out = Path(out)
    digest = _records_digest(ds)
    order = list(range(len(ds.records)))
    random.Random(seed).shuffle(order)
    n_shards = -(-len(order) // shard_size)
    manifest = {"format": FORMAT, "source": str(Path(src).resolve()), "records_sha256": digest, "seed": seed,
                "shard_size": shard_size, "n_samples": len(order), "n_shards": n_shards,
                "card": ds.card.to_dict(), "splits": ds.splits(), "shards": [], "complete": False}
    old = out / MANIFEST
    if old.is_file():
        prev = json.loads(old.read_text(encoding="utf-8"))
        same = {k: prev.get(k) for k in ("records_sha256", "seed", "shard_size")} == {"records_sha256": digest, "seed": seed,
                                                                                      "shard_size": shard_size}
        if prev.get("complete") and same and not overwrite:
            raise FileExistsError(f"--out {out}: already holds these shards, complete; pass --overwrite to write them again")
        if not same and not overwrite:
            raise FileExistsError(f"--out {out}: holds shards of other records or settings; pass --overwrite to replace them")
        if same and not overwrite:  # resume: keep every listed shard whose bytes still match
            for entry in prev["shards"]:
                if not (out / entry["name"]).is_file() or file_sha256(out / entry["name"]) != entry["sha256"]:
                    break
                manifest["shards"].append(entry)
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out}: already exists and is not empty; pass --overwrite to replace its shards")
    if overwrite and out.is_dir():
        for p in out.glob("*.tar"):
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_dataset_card(out, ds.card)
    done = len(manifest["shards"])
    bar = tqdm(total=n_shards, initial=done, desc="shard", disable=not progress, unit="shard")
    for s in range(done, n_shards):
        name = f"{s:06d}.tar"
        chunk = order[s * shard_size:(s + 1) * shard_size]
        splits: dict[str, int] = {}
        with atomic_path(out / name) as tmp:
            with wds.TarWriter(str(tmp), mtime=0) as sink:  # fixed header times: the same records give the same bytes
                for i in chunk:
                    rec = ds.records[i]
                    path = Path(ds.image_path(rec))
                    ext = path.suffix.lower().lstrip(".") or "png"
                    meta = {"index": i, "image": rec.image, "labels": {k: list(v) for k, v in rec.labels.items()},
                            "split": rec.split, "patient": rec.patient}
                    sink.write({"__key__": f"{i:09d}", ext: path.read_bytes(), "json": json.dumps(meta).encode()})
                    splits[rec.split or ""] = splits.get(rec.split or "", 0) + 1
        manifest["shards"].append({"name": name, "count": len(chunk), "splits": splits, "sha256": file_sha256(out / name),
                                   "bytes": (out / name).stat().st_size})
        atomic_write_json(out / MANIFEST, manifest)
        bar.update(1)
    bar.close()
    manifest["complete"] = True
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def write_dataset_card(out: Path, card: DatasetCard) -> None:
    """The card beside the shards, as in a dataset folder (``dataset.json``)."""
    atomic_write_json(out / "dataset.json", card.to_dict())


def _expand(pattern: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def _sibling(url: str, name: str) -> str:
    """``name`` in the folder of shard ``url`` (a local path or any URL fsspec opens)."""
    url = url.removeprefix("pipe:")
    return url.rsplit("/", 1)[0] + "/" + name if "/" in url else name


@dataclass
class ShardSet:
    """The shards of ``pattern``, in order, with their manifest entries and the dataset card."""

    pattern: str
    urls: list[str]
    entries: list[dict[str, Any]]
    card: DatasetCard
    manifest: dict[str, Any]

    def counts(self, split: str | None) -> list[int]:
        """Samples of ``split`` (all, if None) in each shard, from the manifest: no shard is opened."""
        if split is None:
            return [int(e["count"]) for e in self.entries]
        return [int(e["splits"].get(split, 0)) for e in self.entries]


def open_shards(pattern: str | os.PathLike) -> ShardSet:
    """The shards of a pattern, checked against the ``manifest.json`` beside them (names, completeness)."""
    import fsspec

    pattern = str(pattern)
    urls = _expand(pattern)
    if not urls:
        raise ValueError(f"data.path {pattern}: the pattern names no shards")
    where = _sibling(urls[0], MANIFEST)
    try:
        with fsspec.open(where, "rt", encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{where}: cannot read the shards' manifest ({type(e).__name__}: {e}); write shards with `mgll shard`") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{where}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if not manifest.get("complete"):
        raise ValueError(f"{where}: the shards are incomplete (`mgll shard` was interrupted; run it again to finish)")
    by_name = {e["name"]: e for e in manifest["shards"]}
    entries = []
    for u in urls:
        name = u.rstrip("/").rsplit("/", 1)[-1]
        if name not in by_name:
            raise ValueError(f"data.path {pattern}: {name} is not in {where}")
        entries.append(by_name[name])
    return ShardSet(pattern=pattern, urls=urls, entries=entries, card=_parse_card(manifest["card"], where), manifest=manifest)


def iter_shard(url: str) -> Iterator[tuple[dict[str, Any], str, bytes]]:
    """``(meta, extension, image bytes)`` of every sample of one shard, in its stored order (webdataset's reader)."""
    import webdataset as wds

    stream = wds.WebDataset(url, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    for sample in stream:
        meta = json.loads(sample["json"])
        ext = next(k for k in sample if not k.startswith("__") and k != "json")
        yield meta, ext, sample[ext]


def unpack_shards(pattern: str | os.PathLike, out: str | os.PathLike, splits: tuple[str, ...] | None = None) -> MultiGranularDataset:
    """A dataset folder (records + images) of the shards' samples of ``splits``: how evaluation reads shards.

    Evaluation visits each image of its splits once or a few times and indexes them by record, which
    a stream cannot; its splits are unpacked once into ``out`` (reused while the manifest is unchanged).
    """
    from PIL import Image

    shards = open_shards(pattern)
    out = Path(out)
    stamp = {"manifest_sha256": hashlib.sha256(json.dumps(shards.manifest, sort_keys=True).encode()).hexdigest(),
             "pattern": shards.pattern, "splits": sorted(splits) if splits else None}
    if (out / "unpacked.json").is_file() and json.loads((out / "unpacked.json").read_text()) == stamp:
        return load_dataset(out)
    records: list[Record] = []
    (out / "images").mkdir(parents=True, exist_ok=True)
    for url in shards.urls:
        for meta, ext, data in iter_shard(url):
            if splits and meta["split"] not in splits:
                continue
            rel = f"images/{meta['index']:09d}.{ext}"
            with Image.open(io.BytesIO(data)) as im:
                im.verify()  # a damaged sample fails here, named, not inside an evaluation loop
            with atomic_path(out / rel) as tmp:
                tmp.write_bytes(data)
            records.append(Record(image=rel, labels={k: tuple(v) for k, v in meta["labels"].items()}, split=meta["split"],
                                  patient=meta.get("patient")))
    records.sort(key=lambda r: r.image)
    write_dataset(out, shards.card, records)
    atomic_write_json(out / "unpacked.json", stamp)
    return load_dataset(out)


def open_dataset(path: str | os.PathLike, splits: tuple[str, ...] | None = None) -> MultiGranularDataset:
    """A dataset folder as it is, or shards unpacked once (their ``splits``) into a cache folder for evaluation.

    The cache is ``$MGLL_CACHE`` (default ``~/.cache/mgll``) ``/shards/<hash of the pattern>``.
    """
    if not is_shard_pattern(path):
        return load_dataset(path)
    root = Path(os.environ.get("MGLL_CACHE", Path.home() / ".cache" / "mgll")).expanduser()
    key = hashlib.sha256(f"{path}|{sorted(splits) if splits else None}".encode()).hexdigest()[:16]
    return unpack_shards(path, root / "shards" / key, splits)
