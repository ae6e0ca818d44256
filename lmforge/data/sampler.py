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


def block_counts(weights: np.ndarray, blocks: int, block: int) -> np.ndarray:
    """Positions given to each source in the first `blocks` blocks: (K,) int64 summing to
    blocks * block, each within one of its exact share (floors, then the largest remainders)."""
    exact = weights * (blocks * block)  # (K,)
    counts = np.floor(exact).astype(np.int64)
    left = blocks * block - int(counts.sum())
    if left > 0:  # ties go to the earlier source: a stable sort of the remainders
        counts[np.argsort(-(exact - counts), kind="stable")[:left]] += 1
    return counts


class MixtureSampler:
    """The global stream of a weighted mixture of sources, by position, independent of the
    number of processes like GlobalSampler.

    Positions are cut into blocks of `block`. Block b gives each source k exactly
    counts_k(b + 1) - counts_k(b) of its positions (see `block_counts`: the realised share is
    the weight to within one sample per block) in an order drawn from PCG64 seeded by
    (seed, b). A position's sample is the source's next one: the source's own GlobalSampler
    (its own seed, a reshuffle each epoch) at that source's count of earlier positions, which is
    counts_k(b) plus the position's rank inside its block: O(1) per position, no scan from 0.
    A source used up before the run ends simply goes on to its next epoch.

    Indices are global: source k's sample j is `offsets[k] + j` (offsets: the cumulative sample
    counts), as MixedDataset reads them.
    """

    def __init__(
        self, sizes: list[int], weights: list[float], seed: int, block: int = 4096
    ) -> None:
        if len(sizes) != len(weights) or not sizes:
            raise ValueError("a mixture needs one size per weight, at least one source")
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()  # (K,)
        self.block = block
        self.seed = seed
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # (K + 1,)
        self.num_samples = int(self.offsets[-1])
        # Each source its own order; derived seeds keep them apart from each other and the mix.
        self.sources = [
            GlobalSampler(n, int(np.random.SeedSequence([seed, k]).generate_state(1)[0]))
            for k, n in enumerate(sizes)
        ]
        if np.any(block_counts(self.weights, 1, block) < 1):
            raise ConfigError(f"a mixture weight is under 1/{block} of the total; raise it")
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source of each position (B,), its rank among the block's positions of that source
        (B,), positions of each source before the block (K,))."""
        got = self._cache.get(b)
        if got is None:
            before = block_counts(self.weights, b, self.block)  # (K,)
            here = block_counts(self.weights, b + 1, self.block) - before  # (K,)
            rng = np.random.Generator(np.random.PCG64([self.seed, b]))
            choice = rng.permutation(np.repeat(np.arange(len(here)), here))  # (B,)
            order = np.argsort(choice, kind="stable")  # (B,) grouped by source, in block order
            starts = np.concatenate([[0], np.cumsum(here)[:-1]])  # (K,) each group's start
            rank = np.empty(self.block, dtype=np.int64)
            rank[order] = np.arange(self.block) - starts[choice[order]]
            if len(self._cache) >= 2:  # a batch spans at most two blocks in practice
                self._cache.pop(next(iter(self._cache)))
            got = self._cache[b] = (choice, rank, before)
        return got

    def choices(self, start: int, count: int) -> np.ndarray:
        """The source of each position start .. start + count - 1: (count,) int64."""
        return self._walk(start, count)[0]

    def _walk(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, that source's own position) of each position: two (count,) int64."""
        if start < 0 or count < 0:
            raise ValueError(f"start and count must be >= 0, got {start} and {count}")
        src, own = [], []
        pos, end = start, start + count
        while pos < end:  # one slice per block touched
            b, offset = divmod(pos, self.block)
            take = min(end - pos, self.block - offset)
            choice, rank, before = self._block(b)
            part = choice[offset : offset + take]
            src.append(part)
            own.append(before[part] + rank[offset : offset + take])
            pos += take
        if not src:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(src).astype(np.int64), np.concatenate(own)

    def indices(self, start: int, count: int) -> list[int]:
        """Global sample indices (offsets[k] + sample of source k) at positions start ..
        start + count - 1."""
        src, own = self._walk(start, count)
        out = np.empty(count, dtype=np.int64)
        for k in np.unique(src):
            at = np.flatnonzero(src == k)
            # A source's positions inside one range are consecutive in its own stream.
            first = int(own[at[0]])
            local = self.sources[k].indices(first, len(at))
            out[at] = self.offsets[k] + np.asarray(local, dtype=np.int64)
        return out.tolist()

    def epoch(self, cursor: int) -> int:
        """Epochs of the whole mixture's sample count that `cursor` has passed (for logging)."""
        return cursor // self.num_samples

    def rank_indices(self, cursor: int, global_batch: int, rank: int, world: int) -> list[int]:
        """Rank's share of the global batch that starts at `cursor`."""
        return self.indices(*rank_slice(cursor, global_batch, rank, world))
