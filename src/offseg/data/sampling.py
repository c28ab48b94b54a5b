"""Sampling helpers for reproducible training with any number of DataLoader workers.

The datasets draw each sample's augmentation from ``(seed, epoch, index)`` (see
`offseg.data.datasets`). `InfiniteSampler` yields ``(index, epoch)`` pairs, so the epoch reaches
the dataset even inside persistent workers, and batches are identical for 0, 1 or N workers.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sized

import cv2
import numpy as np
import torch


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless ``(index, epoch)`` pairs: a fresh permutation (seeded by ``seed`` and the epoch)
    per pass over the data, for iteration-based training.

    `start` skips that many samples — resume at iteration ``i`` with ``start=i * batch_size``
    and the stream continues exactly where it stopped. With several processes, ``rank`` and
    ``world_size`` give each process every ``world_size``-th sample of the common stream.
    """

    def __init__(
        self, data: Sized | int, shuffle: bool = True, seed: int = 0, start: int = 0, rank: int = 0, world_size: int = 1
    ):
        self.size = data if isinstance(data, int) else len(data)
        if self.size <= 0:
            raise ValueError("InfiniteSampler needs a non-empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.shuffle = shuffle
        self.seed = int(seed)
        self.start = int(start)
        self.rank = rank
        self.world_size = world_size

    def order(self, epoch: int) -> np.ndarray:
        """The sample order of one pass over the data."""
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # Position in the common stream of all processes; this process takes every
        # world_size-th element starting at its rank.
        position = self.start * self.world_size + self.rank
        epoch, offset = divmod(position, self.size)
        order = self.order(epoch)
        while True:
            while offset < self.size:
                yield int(order[offset]), epoch
                offset += self.world_size
            epoch, offset = epoch + offset // self.size, offset % self.size
            order = self.order(epoch)


def worker_init_fn(worker_id: int) -> None:
    """Set up a DataLoader worker: OpenCV on one thread, and Python's and numpy's global
    generators seeded from torch's per-worker seed (base seed + worker id).

    One OpenCV thread per worker (torch already runs one there; offseg.data.transforms also turns
    OpenCV's pool off at import, so no worker is forked from a parent holding one) keeps the
    pipeline off the cores of the training step: parallelism comes from the number of workers. The datasets here do not
    use global random state, so the seeding only matters for extra transforms that do; without
    it every worker would copy the parent's numpy state.
    """
    cv2.setNumThreads(1)
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
