"""Batch orders: transformers' LengthGroupedSampler (megabatch semantics) and a seeded random order.

get_length_grouped_indices(lengths, batch_size, generator):
    1. indices = randperm(n)                                 (torch, the given generator)
    2. cut into megabatches of mega_batch_mult * batch_size, mega_batch_mult = min(n // (4*batch_size), 50) or 1
    3. sort each megabatch by length, longest first
    4. swap the globally longest element to position 0 (an OOM shows up on the first batch)
transformers' Trainer passes batch_size = per_device_train_batch_size * gradient_accumulation_steps.

Both samplers derive their generator from (seed, epoch), so the order of any epoch can be rebuilt when a
run resumes; `start_index` skips the examples already consumed in that epoch.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import Sampler


def get_length_grouped_indices(lengths: Sequence[int], batch_size: int, mega_batch_mult: Optional[int] = None,
                               generator: Optional[torch.Generator] = None) -> list[int]:
    """Same indices as transformers.trainer_pt_utils.get_length_grouped_indices for the same generator state."""
    if mega_batch_mult is None:
        mega_batch_mult = min(len(lengths) // (batch_size * 4), 50)
        if mega_batch_mult == 0:
            mega_batch_mult = 1
    indices = torch.randperm(len(lengths), generator=generator)
    megabatch_size = mega_batch_mult * batch_size
    megabatches = [indices[i: i + megabatch_size].tolist() for i in range(0, len(lengths), megabatch_size)]
    megabatches = [sorted(mb, key=lambda i: lengths[i], reverse=True) for mb in megabatches]
    maxima = [lengths[mb[0]] for mb in megabatches]
    max_idx = int(torch.argmax(torch.tensor(maxima)).item())
    megabatches[0][0], megabatches[max_idx][0] = megabatches[max_idx][0], megabatches[0][0]
    return [i for mb in megabatches for i in mb]


class _EpochSampler(Sampler[int]):
    def __init__(self, n: int, seed: int = 42):
        self.n = n
        self.seed = seed
        self.epoch = 0
        self.start_index = 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Order of `epoch`, skipping its first `start_index` examples (resume)."""
        self.epoch = epoch
        self.start_index = start_index

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + self.epoch)

    def order(self) -> list[int]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start_index:])

    def __len__(self) -> int:
        return self.n - self.start_index


class LengthGroupedSampler(_EpochSampler):
    """transformers.trainer_pt_utils.LengthGroupedSampler with a (seed, epoch) generator."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 42):
        super().__init__(len(lengths), seed)
        self.lengths = list(lengths)
        self.batch_size = batch_size

    def order(self) -> list[int]:
        return get_length_grouped_indices(self.lengths, self.batch_size, generator=self.generator())


class RandomSampler(_EpochSampler):
    """A seeded permutation per epoch (torch.randperm), like torch's RandomSampler with a generator."""

    def order(self) -> list[int]:
        return torch.randperm(self.n, generator=self.generator()).tolist()
