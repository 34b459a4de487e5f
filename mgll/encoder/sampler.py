"""Deterministic global batches that survive restarts and any number of processes.

The order depends only on (seed, epoch): a run resumed at step s, or run on W processes
instead of one, sees exactly the same global batches. Each rank takes its contiguous slice
of the global batch, and each item carries its epoch so its augmentation can be seeded from
(seed, epoch, index) rather than from whatever state a worker process happens to have.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["GlobalBatchSampler", "SeededItems"]


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's ``[(index, epoch), ...]`` for global steps ``start_step .. total_steps-1``."""

    def __init__(
        self,
        n_items: int,
        global_batch: int,
        total_steps: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
    ):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        if n_items < global_batch:
            raise ValueError(f"dataset has {n_items} items, fewer than one global batch of {global_batch}")
        self.n_items = n_items
        self.global_batch = global_batch
        self.total_steps = total_steps
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_step = start_step
        self.steps_per_epoch = n_items // global_batch  # the last partial batch is dropped

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_items, generator=g)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        local = self.global_batch // self.world_size
        epoch, perm = -1, None
        for step in range(self.start_step, self.total_steps):
            e, b = divmod(step, self.steps_per_epoch)
            if e != epoch:
                epoch, perm = e, self._permutation(e)
            batch = perm[b * self.global_batch : (b + 1) * self.global_batch]
            mine = batch[self.rank * local : (self.rank + 1) * local]
            yield [(int(i), epoch) for i in mine]

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)


class SeededItems(Dataset):
    """Index with ``(index, epoch)``; random transforms draw from a generator seeded by both."""

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            return self.dataset[index]
