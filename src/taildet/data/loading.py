"""Loading plumbing shared by the trainer, the MFS pre-fill and the calibration pass.

* :func:`sample_seed` -- the seed of one sample, from ``(seed, epoch, rank, position)``;
* :class:`SeededDataset` -- loads ``dataset[idx]`` for keys ``(idx, seed)`` with every RNG seeded
  from ``seed``, so augmentation depends on the key only (not on worker count or resume point);
* :class:`EpochBatches` -- one epoch's batches of a sampler as lists of such keys;
* :func:`list_collate` -- ``[(image, target), ...]`` -> ``([images], [targets])``;
* :func:`to_device` -- targets (dicts of tensors) moved to a device.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["sample_seed", "SeededDataset", "EpochBatches", "list_collate", "to_device"]


def sample_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank, position]).generate_state(1, np.uint64)[0] >> 1)


class SeededDataset(torch.utils.data.Dataset):
    """Loads ``dataset[idx]`` for keys ``(idx, seed)`` with all RNGs seeded from ``seed`` (and the
    caller's RNG states left untouched), so augmentation depends only on the key."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        idx, seed = key
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % (2**32))
                return self.dataset[idx]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class EpochBatches(torch.utils.data.Sampler):
    """Batches ``start..stop-1`` of one epoch of ``sampler``, as lists of ``(index, seed)``."""

    def __init__(self, indices: Sequence[int], batch_size: int, start: int, stop: int, seed: int,
                 epoch: int, rank: int):
        self.indices, self.batch_size = list(indices), batch_size
        self.start, self.stop, self.seed, self.epoch, self.rank = start, stop, seed, epoch, rank

    def __len__(self):
        return max(0, self.stop - self.start)

    def __iter__(self):
        bs = self.batch_size
        for b in range(self.start, self.stop):
            yield [(int(self.indices[p]), sample_seed(self.seed, self.epoch, self.rank, p))
                   for p in range(b * bs, (b + 1) * bs)]


def list_collate(batch):
    """``[(image, target), ...]`` -> ``([images], [targets])``."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


def to_device(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
            for t in targets]
