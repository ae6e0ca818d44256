"""The batch plan: how one optimizer step's global batch is split over processes, forward passes
and gradient accumulation.

The user sets two numbers and the launcher sets a third: `train.global_batch_size` (sequences
per optimizer step over all processes: what the run *is*), `train.micro_batch_size` (the most
sequences one process runs through one forward pass: what its memory allows) and the process
count. Everything else follows:

    global = processes × micro × accum

with `micro` the largest divisor of the per-process share (global / processes) that does not
exceed `train.micro_batch_size`, and `accum` the share divided by it. So the same config runs
on 1, 2 or 8 processes with the same global batch; only an impossible combination (a global
batch that does not split evenly over the processes, or over whole GRPO groups) is an error.

This module is plain Python (no torch), so a dry run and the config check use it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """One optimizer step: `world` processes × `micro` rows per forward pass × `accum` passes."""

    global_batch: int
    world: int
    micro: int
    accum: int
    unit: str = ""  # what a row is, when not a plain sequence (e.g. "prompts")

    @property
    def per_rank(self) -> int:
        """Rows each process handles per optimizer step."""
        return self.micro * self.accum

    def describe(self) -> str:
        """The plan in one line, e.g. 'batch: global 16 = 2 processes × micro 8 × accum 1'."""
        unit = f" {self.unit}" if self.unit else ""
        procs = "process" if self.world == 1 else "processes"
        return (
            f"batch: global {self.global_batch}{unit} = {self.world} {procs} × "
            f"micro {self.micro} × accum {self.accum}"
        )


def largest_divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of `n` that is at most `limit` (1 at worst)."""
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


def plan_batch(
    global_batch: int,
    micro_max: int,
    world: int,
    *,
    group: int = 1,
    group_key: str = "",
    unit: str = "",
    prefix: str = "train",
) -> BatchPlan:
    """The batch plan for `global_batch` rows per step on `world` processes, at most `micro_max`
    rows per forward pass. With `group` > 1 (GRPO: completions per prompt, key `group_key`), a
    group never straddles processes, so each process gets whole groups.

    Raises ConfigError naming the keys and a working global batch when no plan exists."""
    key = f"{prefix}.global_batch_size"
    if global_batch <= 0 or micro_max <= 0 or world <= 0 or group <= 0:
        raise ConfigError(
            f"{key} ({global_batch}), {prefix}.micro_batch_size ({micro_max}) and the process "
            f"count ({world}) must be positive"
        )
    if group > 1 and global_batch % group:
        raise ConfigError(
            f"{key}: {global_batch} is not a multiple of {group_key}={group} (the completions "
            f"of a prompt form one step's group); use {_multiple_near(global_batch, group)}"
        )
    step = group * world  # whole groups on every process
    if global_batch % step:
        what = f"{world} processes" + (f" × {group_key}={group}" if group > 1 else "")
        raise ConfigError(
            f"{key}: {global_batch} does not split over {what}; use a multiple of {step}, "
            f"e.g. {key}={_multiple_near(global_batch, step)}"
        )
    per_rank = global_batch // world
    micro = largest_divisor_at_most(per_rank, micro_max)
    return BatchPlan(global_batch, world, micro, per_rank // micro, unit)


def _multiple_near(value: int, step: int) -> int:
    """The multiple of `step` nearest to `value` (the larger one on a tie), at least `step`."""
    below, above = (value // step) * step, -(-value // step) * step
    if below == 0 or above - value <= value - below:
        return above
    return below


def eval_chunks(count: int, rank: int, world: int, micro: int) -> list[tuple[list[int], bool]]:
    """This rank's share of `count` held-out rows (rank, rank + world, ...) in micro-batches of
    at most `micro`, as (rows, counted) pairs, padded with stand-in passes (row 0, counted False)
    so that every rank runs the same number of forward passes. Under ZeRO-3 each forward pass is
    collective (it gathers the parameters from every rank): a rank with fewer passes than the
    others would leave them waiting forever (33 rows on 2 processes, micro 16: 2 passes vs 1)."""
    rows = list(range(rank, count, world))
    most = -(-count // world)  # rows of the rank with the most
    passes = -(-most // micro)  # its forward passes
    chunks = [(rows[i : i + micro], True) for i in range(0, len(rows), micro)]
    return chunks + [([0], False)] * (passes - len(chunks))
