"""Loader throughput: PackedDataset.get_batch against per-item __getitem__ + collate, one core.

Builds (or reuses) the builtin corpus shards with the demo tokenizer settings, then reads random
global batches for a few seconds each way and prints tokens/s and the ratio. A benchmark, not a
test: it never fails on timing.

    python bench/loader.py [--seconds 3] [--batch 32] [--seq-len 256] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

from lmforge.data import DataConfig, GlobalSampler, build_packed, prepare_data
from lmforge.data.packing import Batch, PackedDataset, collate
from lmforge.tokenizer import TokenizerConfig


def _naive(ds: PackedDataset) -> Callable[[list[int]], Batch]:
    return lambda idx: collate([ds[i] for i in idx])


def _time(fn: Callable[[list[int]], Batch], batches: list[list[int]], seconds: float) -> float:
    """Batches per second of fn over the (cycled) batches for about `seconds`."""
    fn(batches[0])  # warm the page cache and any lazy setup
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn(batches[done % len(batches)])
        done += 1
    return done / elapsed


def main() -> None:
    """Run the benchmark and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--batch", type=int, default=32, help="global batch (samples)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--cache-dir", default=".cache/lmforge")
    args = parser.parse_args()
    cfg = DataConfig(source="builtin", seq_len=args.seq_len, cache_dir=args.cache_dir)
    t0 = time.perf_counter()
    prepared = prepare_data(cfg, TokenizerConfig(vocab_size=4096))
    ds = build_packed(prepared.train, cfg)
    print(
        f"builtin corpus: {prepared.train.num_documents + prepared.val.num_documents} documents, "
        f"{prepared.train.num_tokens + prepared.val.num_tokens:,} tokens "
        f"(train {prepared.train.num_tokens:,}, val {prepared.val.num_tokens:,}), "
        f"{len(ds):,} train samples of {args.seq_len}; ready in {time.perf_counter() - t0:.1f} s"
    )
    # Time on one core: pinned (after the build, which may use every core) with one torch thread.
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)
    sampler = GlobalSampler(len(ds), cfg.seed)
    batches = [sampler.indices(k * args.batch, args.batch) for k in range(256)]
    assert all(  # the two paths must agree before their speeds mean anything
        torch.equal(a, b)
        for a, b in zip(
            ds.get_batch(batches[0]).values(), _naive(ds)(batches[0]).values(), strict=True
        )
    )
    tokens = args.batch * args.seq_len
    rows = [
        ("__getitem__ + collate (baseline)", _time(_naive(ds), batches, args.seconds)),
        ("get_batch", _time(ds.get_batch, batches, args.seconds)),
    ]
    print(f"\n{'path (1 core)':<34}{'batches/s':>12}{'tokens/s':>16}{'vs baseline':>13}")
    for name, rate in rows:
        print(f"{name:<34}{rate:>12,.0f}{rate * tokens:>16,.0f}{rate / rows[0][1]:>12.1f}x")
    print(f"\nbatch {args.batch} x {args.seq_len} tokens, document_mask and reset_positions on")


if __name__ == "__main__":
    main()
