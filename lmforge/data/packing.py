"""Pack a token shard into fixed-length training samples, with per-document ids and positions.

Sample i is the window tokens[i*(T+1) : (i+1)*(T+1)] of the shard (T = seq_len; the last partial
window is dropped): inputs are its first T tokens, labels its last T, so labels are the inputs
shifted left by one. Documents are packed back to back; with `document_mask` each token also gets
the id of its document inside the window (which increments after every EOS: the EOS belongs to
the document it ends) so attention can be blocked across documents, and with `reset_positions`
position ids restart at 0 at each document start (packing as in Krell et al. 2021).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lmforge.data.config import DataConfig
from lmforge.data.shards import TokenShard

Batch = dict[str, torch.Tensor]


def document_fields(
    inputs: np.ndarray, eos_id: int, reset_positions: bool
) -> dict[str, np.ndarray]:
    """doc_ids and position_ids of packed inputs: (B, T) int64 -> two (B, T) int64 arrays."""
    b, t = inputs.shape
    is_eos = inputs == eos_id  # (B, T)
    doc_ids = np.cumsum(is_eos, axis=1) - is_eos  # EOS tokens belong to the doc they end
    arange = np.broadcast_to(np.arange(t), (b, t))
    if not reset_positions:
        return {"doc_ids": doc_ids, "position_ids": arange.copy()}
    # start[b, t] = index of the first token of t's document: t itself right after an EOS,
    # otherwise carried forward from the left (a running maximum).
    start = np.zeros((b, t), dtype=np.int64)
    start[:, 1:] = np.where(is_eos[:, :-1], arange[:, 1:], 0)
    np.maximum.accumulate(start, axis=1, out=start)
    return {"doc_ids": doc_ids, "position_ids": arange - start}


def collate(items: Sequence[Batch]) -> Batch:
    """Stack per-sample (T,) tensors into (B, T) tensors, key by key."""
    if not items:
        raise ValueError("collate needs at least one item")
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


class PackedDataset(torch.utils.data.Dataset):
    """Non-overlapping windows of seq_len + 1 tokens of a shard, as training samples."""

    collate = staticmethod(collate)

    def __init__(
        self,
        shard: TokenShard,
        seq_len: int,
        *,
        eos_id: int,
        document_mask: bool = True,
        reset_positions: bool = True,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.shard = shard
        self.seq_len = seq_len
        self.eos_id = eos_id
        self.document_mask = document_mask
        self.reset_positions = reset_positions
        self.num_windows = shard.num_tokens // (seq_len + 1)
        self._view()

    def _view(self) -> None:
        # A (num_windows, T + 1) view of the memmap: no data is read until rows are indexed.
        width = self.seq_len + 1
        self.windows = self.shard.tokens[: self.num_windows * width].reshape(-1, width)

    def __getstate__(self) -> dict[str, object]:
        # Pickle without the view (which would copy the tokens); the shard pickles as a path.
        return {k: v for k, v in self.__dict__.items() if k != "windows"}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._view()

    def __len__(self) -> int:
        return self.num_windows

    def _check(self, indices: np.ndarray) -> None:
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_windows):
            bad = indices[(indices < 0) | (indices >= self.num_windows)][0]
            raise IndexError(f"sample {bad} out of range for {self.num_windows} samples")

    def __getitem__(self, i: int) -> Batch:
        """One sample as (T,) int64 tensors: the simple per-item path (a DataLoader's)."""
        self._check(np.asarray([i]))
        window = torch.from_numpy(self.windows[i].astype(np.int64))  # (T + 1,)
        item = {"input_ids": window[:-1], "labels": window[1:].clone()}
        if self.document_mask:
            is_eos = (item["input_ids"] == self.eos_id).long()  # (T,)
            item["doc_ids"] = torch.cumsum(is_eos, 0) - is_eos
            positions = torch.arange(self.seq_len)  # (T,)
            if self.reset_positions:  # minus the index where each token's document starts
                starts = torch.zeros_like(positions)
                starts[1:] = torch.where(is_eos[:-1].bool(), positions[1:], 0)
                positions = positions - torch.cummax(starts, 0).values
            item["position_ids"] = positions
        return item

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> Batch:
        """Samples `indices` as (B, T) int64 tensors, read straight from the memmap (fast path)."""
        idx = np.asarray(indices, dtype=np.int64)
        self._check(idx)
        rows = self.windows[idx].astype(np.int64)  # (B, T + 1): one gather, one cast
        inputs = np.ascontiguousarray(rows[:, :-1])  # (B, T)
        batch = {"input_ids": inputs, "labels": np.ascontiguousarray(rows[:, 1:])}
        if self.document_mask:
            batch.update(document_fields(inputs, self.eos_id, self.reset_positions))
        return {key: torch.from_numpy(value) for key, value in batch.items()}


def build_packed(shard: TokenShard, cfg: DataConfig) -> PackedDataset:
    """The PackedDataset of a shard as cfg says (seq_len, document_mask, reset_positions)."""
    return PackedDataset(
        shard,
        cfg.seq_len,
        eos_id=shard.eos_id,
        document_mask=cfg.document_mask,
        reset_positions=cfg.reset_positions,
    )
