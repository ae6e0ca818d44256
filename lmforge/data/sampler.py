"""A deterministic, resumable sample order that does not depend on the number of processes.

The global sample stream is the concatenation of epochs; epoch e is a permutation of
range(num_samples) drawn from numpy's PCG64 seeded by (seed, e). Global position p is sample
`permutation(p // num_samples)[p % num_samples]`. Training consumes the stream one global batch
at a time, and rank r of `world` processes takes its contiguous share of each global batch
(`rank_slice`), so the model sees the same global batches with 1 process or 8. The only data
state of a run is the cursor (global samples consumed so far): resuming sets it, and the next
batch is exactly the one an uninterrupted run would have drawn.
"""

from __future__ import annotations

import numpy as np

from lmforge.errors import ConfigError, DataError


def rank_slice(
    global_batch_start: int, global_batch: int, rank: int, world: int
) -> tuple[int, int]:
    """(start, count) in the global stream of rank's share of the batch at global_batch_start."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world} process(es)")
    if global_batch < 1 or global_batch % world:
        raise ConfigError(
            f"the global batch size {global_batch} is not a positive multiple of the "
            f"{world} processes; choose a multiple of {world}"
        )
    per_rank = global_batch // world
    return global_batch_start + rank * per_rank, per_rank


class GlobalSampler:
    """Sample indices of the global stream, by position; stateless apart from a small cache."""

    def __init__(self, num_samples: int, seed: int) -> None:
        if num_samples < 1:
            raise DataError(
                "no training samples: the train split is shorter than one sample (seq_len + 1 "
                "tokens); add documents or lower data.seq_len"
            )
        self.num_samples = num_samples
        self.seed = seed
        self._cache: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of epoch `epoch`: (num_samples,) int64, a permutation of range(num_samples)."""
        perm = self._cache.get(epoch)
        if perm is None:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            perm = rng.permutation(self.num_samples)
            if len(self._cache) >= 2:  # a batch spans at most two epochs in practice
                self._cache.pop(next(iter(self._cache)))
            self._cache[epoch] = perm
        return perm

    def indices(self, start: int, count: int) -> list[int]:
        """Sample indices at global positions start .. start + count - 1."""
        if start < 0 or count < 0:
            raise ValueError(f"start and count must be >= 0, got {start} and {count}")
        out: list[int] = []
        pos, end = start, start + count
        while pos < end:  # one slice per epoch touched
            epoch, offset = divmod(pos, self.num_samples)
            take = min(end - pos, self.num_samples - offset)
            out += self.permutation(epoch)[offset : offset + take].tolist()
            pos += take
        return out

    def epoch(self, cursor: int) -> int:
        """The epoch that global position `cursor` falls in (for logging)."""
        return cursor // self.num_samples

    def rank_indices(self, cursor: int, global_batch: int, rank: int, world: int) -> list[int]:
        """Rank's share of the global batch that starts at `cursor`."""
        return self.indices(*rank_slice(cursor, global_batch, rank, world))
