"""Global batches from tar shards: disjoint shards per rank, every sample once per epoch, exact resume.

The folder path of training draws each global batch from a seeded permutation of all records
(``mgll.encoder.sampler``); shards cannot be indexed, so here each *epoch* is a seeded order of the
shards instead. Rank ``r`` of ``W`` reads the shards ``order[r::W]`` and none other; within a rank the
shards are dealt to ``S`` streams (one per DataLoader worker, ``S = max(1, num_workers)``), stream
``s`` reads its shards one at a time and yields that shard's samples of the split in a seeded
permutation (one shard is held in memory: the bound per input is the shard). Step ``t`` of an epoch
comes from stream ``t % S`` (the DataLoader's round-robin over workers), so every epoch has
``S * min(batches any stream can fill)`` steps, a number each process computes from the manifest
alone: all ranks step together and a sample's position depends only on (seed, epoch, rank, S).

Resume needs no state beyond the step: step ``t`` maps to (epoch, step in epoch) from the
per-epoch step counts, and each stream skips the batches it already gave. The rank count and ``S``
must not change across a resume (the trainer records them in the run folder and refuses a change).
Each sample carries its record index, so its augmentation is seeded from (seed, epoch, index) as in
the folder path: the same images, labels and augmentations, in another order.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import IterableDataset, get_worker_info

from mgll.data.image_dataset import collate_records
from mgll.data.pixel_budget import ImageTooLargeError, open_image
from mgll.data.records import RecordError
from mgll.data.rgb import to_rgb
from mgll.data.shards import ShardSet, iter_shard

__all__ = ["ShardStream", "epoch_plan"]


def _shard_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def epoch_plan(counts: list[int], seed: int, epoch: int, rank: int, world: int, streams: int, local_batch: int):
    """``(shards per stream of this rank, batches per stream)`` for one epoch, from per-shard sample counts."""
    order = _shard_order(len(counts), seed, epoch)
    per_rank = [order[r::world] for r in range(world)]
    per_stream = {(r, s): per_rank[r][s::streams] for r in range(world) for s in range(streams)}
    fill = min(sum(counts[i] for i in shards) // local_batch for shards in per_stream.values())
    return [per_stream[(rank, s)] for s in range(streams)], fill


class ShardStream(IterableDataset):
    """This rank's local batches ``(images, label sets, record indices)`` for global steps ``start_step..total_steps-1``."""

    def __init__(self, shards: ShardSet, split: str | None, transform: Callable[[Image.Image], torch.Tensor],
                 global_batch: int, total_steps: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 streams: int = 1, start_step: int = 0, max_pixels: int | None = None):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        self.shards, self.split, self.transform = shards, split, transform
        self.local = global_batch // world_size
        self.total_steps, self.seed, self.rank, self.world, self.streams = total_steps, seed, rank, world_size, max(1, streams)
        self.start_step, self.max_pixels = start_step, max_pixels
        self.counts = shards.counts(split)
        first = epoch_plan(self.counts, seed, 0, rank, world_size, self.streams, self.local)[1]
        if first == 0:
            raise ValueError(
                f"{shards.pattern}: split {split!r} fills no batch of {self.local} in some stream "
                f"({self.world} processes x {self.streams} streams over {len(self.counts)} shards); use more or smaller shards"
            )

    def steps_per_epoch(self, epoch: int) -> int:
        return self.streams * epoch_plan(self.counts, self.seed, epoch, self.rank, self.world, self.streams, self.local)[1]

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, step within it)`` of global step ``step``."""
        epoch = 0
        while step >= (n := self.steps_per_epoch(epoch)):
            step -= n
            epoch += 1
        return epoch, step

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)

    def _samples(self, shard_ids: list[int], epoch: int) -> Iterator[tuple[int, bytes, dict[str, Any]]]:
        for i in shard_ids:
            rows = [(m, data) for m, _ext, data in iter_shard(self.shards.urls[i]) if self.split is None or m["split"] == self.split]
            random.Random((self.seed * 1_000_003 + epoch) * 1_000_033 + i).shuffle(rows)
            for meta, data in rows:
                yield meta["index"], data, meta["labels"], f"{self.shards.urls[i]} sample {meta['index']:09d}"

    def _item(self, index: int, data: bytes, labels: dict, where: str, epoch: int):
        with torch.random.fork_rng(devices=[]):  # the folder path's seeding: (seed, epoch, record index)
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            try:
                with open_image(io.BytesIO(data), self.max_pixels) as im:
                    image = self.transform(to_rgb(im))
            except ImageTooLargeError as e:
                raise RecordError(f"{where}: {e}") from None
            except (OSError, UnidentifiedImageError, ValueError) as e:
                raise RecordError(f"{where}: cannot read image ({e})") from None
        return image, {k: tuple(v) for k, v in labels.items()}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list, list[int]]]:
        info = get_worker_info()
        workers = 1 if info is None else info.num_workers
        if workers != 1 and workers != self.streams:
            raise ValueError(f"ShardStream has {self.streams} streams but the DataLoader has {workers} workers")
        mine = [s for s in range(self.streams) if info is None or (self.start_step + info.id) % self.streams == s]
        if info is None and self.streams > 1:
            raise ValueError("ShardStream with several streams needs a DataLoader with num_workers = streams")
        stream = mine[0]
        epoch, in_epoch = self.position(self.start_step)
        step = self.start_step
        while step < self.total_steps:
            plan, fill = epoch_plan(self.counts, self.seed, epoch, self.rank, self.world, self.streams, self.local)
            n_steps = self.streams * fill
            # this stream's steps of the epoch: in_epoch' with in_epoch' % streams == stream
            first = in_epoch + ((stream - in_epoch) % self.streams)
            skip = first // self.streams  # batches of this stream already given before the resumed step
            samples = self._samples(plan[stream], epoch)
            for _ in range(skip * self.local):
                next(samples)
            for k in range(first, n_steps, self.streams):
                if step + (k - in_epoch) >= self.total_steps:
                    return
                batch = [next(samples) for _ in range(self.local)]
                items = [self._item(i, d, lab, where, epoch) for i, d, lab, where in batch]
                images, labels = collate_records(items)
                yield images, labels, [b[0] for b in batch]
            step += n_steps - in_epoch
            epoch, in_epoch = epoch + 1, 0
