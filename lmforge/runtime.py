"""Plumbing every stage entry point shares: the train section, argument parsing and error
reporting, seeding, stop signals and small collectives. What runs a stage lives elsewhere:
lmforge.stage starts it, lmforge.loop trains it, lmforge.checkpointer saves and restores it."""

from __future__ import annotations

import argparse
import gc
import math
import os
import random
import signal
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from lmforge.config import load_config, option
from lmforge.errors import ConfigError, LmforgeError
from lmforge.watchdog import at_start

T = TypeVar("T")


@dataclass
class TrainConfig:
    """Length of training, batch sizes and the evaluation / checkpoint cadence."""

    steps: int = option(1000, "Optimizer steps to train.")
    global_batch_size: int = option(
        32,
        "Sequences per optimizer step over all processes (GRPO: prompts × group_size; PPO: "
        "prompts); the same on any process count, which must divide it.",
    )
    micro_batch_size: int = option(
        8,
        "The most sequences one process runs in one forward pass: the largest divisor of its "
        "share (global / processes) up to this is used; gradient accumulation makes up the rest.",
    )
    seed: int = option(1234, "Seed of initialisation, dropout and masking.")
    eval_every: int = option(
        200, "Evaluate every this many steps (and at the end); 0 = only at the end."
    )
    save_every: int = option(500, "Checkpoint every this many steps (and at the end).")
    keep_last: int = option(
        0, "Keep only the newest this many step checkpoints (0 = keep all); see keep_every."
    )
    keep_every: int = option(
        0, "Also keep every checkpoint whose step is a multiple of this (0 = none extra)."
    )
    min_free_bytes: int = option(
        0, "Refuse to start a save that would leave less free disk space than this (bytes)."
    )
    save_optimizer: bool = option(
        True,
        "Save the optimizer state with each checkpoint (DeepSpeed's shards, one copy), so the "
        "run can resume, on any process count or ZeRO stage; false = weights only: smaller, "
        "a valid init_from, but the run cannot resume from it.",
    )
    elastic_state: bool = option(
        False,
        "Also save a second, consolidated copy of the fp32 weights and optimizer state as "
        "safetensors (a gather to rank 0; about 3x the fp32 weights). Not needed to resume on "
        "another process count or ZeRO stage: that reads the shards.",
    )
    stop_at: int = option(
        0,
        "Checkpoint and stop after this step (0 = run all steps); the schedule still spans steps.",
    )
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto = cuda when available.")
    epochs: float = option(
        0,
        "Train this many passes over the training set instead of a number of steps (0 = use "
        "steps): steps = ceil(epochs × training samples / global_batch_size), counted once the "
        "data is read. Leave steps at its default when setting it.",
    )
    keep_best: str = option(
        "",
        "Keep a `best` file beside `latest` naming the checkpoint with the best value of this "
        "evaluation metric (as in metrics.jsonl, e.g. eval/loss); an evaluation that improves "
        "it is saved even off save_every, and retention never deletes it. '' = off.",
    )
    keep_best_mode: Literal["auto", "min", "max"] = option(
        "auto",
        "Whether lower or higher keep_best values are better; auto = min for metrics named "
        "*loss, *ppl, *perplexity or *bits_per_byte, max for any other.",
    )
    early_stop: int = option(
        0,
        "Stop (with a checkpoint, exit 0) after this many evaluations in a row without a new "
        "best keep_best value; 0 = never.",
    )

    def validate(self, prefix: str = "train") -> None:
        """Reject non-positive sizes and contradictory lengths, naming the key."""
        for key in ("steps", "global_batch_size", "micro_batch_size", "save_every"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{prefix}.{key}: must be positive, got {getattr(self, key)}")
        for key in ("eval_every", "stop_at", "keep_last", "keep_every", "min_free_bytes"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{prefix}.{key}: must be >= 0, got {getattr(self, key)}")
        self._validate_length(prefix)
        self._validate_best(prefix)

    def _validate_length(self, prefix: str) -> None:
        """epochs is an alternative to steps: a steps value other than the default beside it
        would be silently ignored, so it is refused."""
        if not math.isfinite(self.epochs) or self.epochs < 0:
            raise ConfigError(f"{prefix}.epochs: must be >= 0, got {self.epochs:g}")
        default = type(self)().steps
        if self.epochs > 0 and self.steps != default:
            raise ConfigError(
                f"{prefix}.epochs and {prefix}.steps: both set ({self.epochs:g} epochs, "
                f"{self.steps} steps); set one of them (--{prefix}.epochs=0 to train by steps)"
            )

    def _validate_best(self, prefix: str) -> None:
        if self.early_stop < 0:
            raise ConfigError(f"{prefix}.early_stop: must be >= 0, got {self.early_stop}")
        if self.early_stop and not self.keep_best:
            raise ConfigError(
                f"{prefix}.early_stop: needs {prefix}.keep_best, the metric whose improvement "
                "it waits for (e.g. keep_best: eval/loss)"
            )
        name = self.keep_best
        evaluated = name.startswith(("eval/", "val/", "harness/"))  # harness: eval.harness_*
        if name and (not evaluated or not name.isprintable()):
            raise ConfigError(
                f"{prefix}.keep_best: {name!r} is not an evaluation metric; name one as "
                "metrics.jsonl writes it, starting with eval/, val/ or harness/ (e.g. eval/loss)"
            )

    def best_is_lower(self) -> bool:
        """Whether a lower keep_best value is better (keep_best_mode; auto: *loss, *ppl)."""
        if self.keep_best_mode != "auto":
            return self.keep_best_mode == "min"
        return self.keep_best.endswith(("loss", "ppl", "perplexity", "bits_per_byte"))

    def describe_length(self) -> str:
        """One line: how long the run trains and what it keeps (the dry run shows it)."""
        per = f"{self.global_batch_size} samples per step"
        if self.epochs > 0:
            line = (
                f"length: train.epochs={self.epochs:g}, steps = ceil({self.epochs:g} × training "
                f"samples / {self.global_batch_size}), counted when the run reads its data"
            )
        else:
            line = f"length: train.steps={self.steps} ({per})"
        if self.keep_best:
            better = "lower" if self.best_is_lower() else "higher"
            line += f"; best checkpoint by {self.keep_best} ({better} is better) in run_dir/best"
        if self.early_stop:
            line += f"; early stop after {self.early_stop} evaluations without a new best"
        return line

    def planned_steps(self, num_samples: int) -> int:
        """The steps the run trains: `steps`, or with epochs > 0 as many global batches as
        `epochs` passes over `num_samples` training samples take (at least one)."""
        if self.epochs <= 0:
            return self.steps
        return max(1, math.ceil(self.epochs * num_samples / self.global_batch_size))


def set_seed(seed: int, rank: int) -> None:
    """Seed Python, NumPy and torch; dropout differs per rank, initialisation does not (the
    model is built with its own generator)."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_mean(value: torch.Tensor, world: int) -> torch.Tensor:
    """Mean of a CPU tensor over ranks."""
    if world == 1 or not dist.is_initialized():
        return value
    out = value.clone().double() if value.dtype != torch.float64 else value.clone()
    if dist.get_backend() == "nccl":
        out = out.cuda()
    dist.all_reduce(out)
    return (out / world).cpu().to(value.dtype)


def global_means(sums: dict[str, float], count: float, world: int) -> dict[str, float]:
    """Each of this rank's `sums`, added up over ranks, divided by the ranks' total `count`
    (at least 1): a mean over every example of a held-out set split across ranks."""
    keys = list(sums)
    total = torch.tensor([*(sums[k] for k in keys), count], dtype=torch.float64)
    total = all_mean(total, world) * world
    n = total[-1].clamp(min=1)
    return {key: (total[i] / n).item() for i, key in enumerate(keys)}


class StopFlag:
    """Stop at the next step boundary with a checkpoint and a clean exit when SIGTERM or SIGUSR1
    arrives (SLURM sends one before preemption) or when this rank's launcher has died (an orphan
    must not train on; see lmforge.watchdog). All ranks agree through an all-reduce when asked,
    so every rank saves and exits together."""

    def __init__(self) -> None:
        self._signal = ""  # the stop signal this rank received
        self._launcher = ""  # why this rank's launcher is gone
        self._watch = at_start()
        self.reason = ""  # why the run stops, once requested() said so
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self._signal = signal.Signals(signum).name

    def requested(self) -> bool:
        """True on every rank if any rank received a stop signal or lost its launcher."""
        if not self._launcher and self._watch is not None:
            self._launcher = self._watch.gone()  # a few /proc reads
        # (2,): [a stop signal arrived, a launcher is gone], each the max over ranks
        flags = torch.tensor([float(bool(self._signal)), float(bool(self._launcher))])
        if dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl":
                flags = flags.cuda()
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signalled, orphaned = (bool(v > 0) for v in flags.tolist())
        if signalled:
            self.reason = "stop requested"
        elif orphaned:
            if not self._launcher and self._watch is not None:
                # Another rank saw it first; ranks sharing a launcher see it gone by now too,
                # and the line then names it rather than "another rank's".
                self._launcher = self._watch.gone()
            self.reason = self._launcher or "another rank's launcher exited"
        return signalled or orphaned


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N; the rank comes from the environment."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            continue
        if arg in ("--local_rank", "--local-rank"):
            skip = True
            continue
        out.append(arg)
    return out


def quiet_libraries() -> None:
    """Keep library chatter (deprecations, tokenizer forks, info logs) off the console."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def _first_line(cls: type) -> str:
    return (cls.__doc__ or "").strip().split("\n")[0]


def _stage_epilog(config_cls: type) -> str:
    """The help text after the options: how overrides are written and the config's sections."""
    from lmforge.config import describe

    top = [key for key, *_ in describe(config_cls) if "." not in key]
    return (
        "Any config key is set on the command line as --section.key=value (a YAML value), e.g.\n"
        "  --train.steps=100 --optim.lr=3e-4 --engine.zero_stage=3\n"
        f"top-level keys: {', '.join(top)}\n"
        "every key, its type, default and meaning: docs/config.md (lmforge config-reference)"
    )


def run_entry(
    config_cls: type[T], body: Callable[[T], Any], argv: list[str] | None, stage: str
) -> int:
    """Parse `--config FILE [--dry-run] [--section.key=value ...]`, then run `body(cfg)`.

    A user error (LmforgeError) prints one line `error: ...` and returns its exit code.
    """
    args = _strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(
        prog=f"lmforge {stage}",
        description=f"Run (or resume) the lmforge {stage} stage. {_first_line(config_cls)}",
        epilog=_stage_epilog(config_cls),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML run config (command line > YAML > defaults)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check what the run would read (resume point, init_from, data, reward functions, "
        "batch plan) and print the resolved config and memory estimate; train nothing",
    )
    known, overrides = parser.parse_known_args(args)
    own_process = argv is None  # a stage script's own process, not a call from other code
    if own_process:
        # Hundreds of thousands of objects come with torch, DeepSpeed and transformers and live
        # as long as the process: keep the cyclic collector from walking them again and again.
        gc.freeze()
    if not torch.cuda.is_available():  # say it before DeepSpeed guesses (and warns about it)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    quiet_libraries()
    try:
        if known.dry_run:  # check what the run would read; train and write nothing
            from lmforge.preflight import dry_run, memory_check_deferred

            with memory_check_deferred():  # the dry run lists it with its other checks
                cfg = load_config(config_cls, known.config, overrides)
            return dry_run(cfg, stage)
        cfg = load_config(config_cls, known.config, overrides)
        body(cfg)
    except LmforgeError as e:
        rank = os.environ.get("RANK", "0")
        where = "" if rank == "0" else f" (rank {rank})"
        sys.stderr.write(f"error{where}: {e}\n")  # one write: ranks' lines never interleave
        sys.stderr.flush()
        return e.exit_code
    finally:  # the run directory's lock ends with the run, also when a stage runs in-process
        from lmforge.runlock import release_all

        release_all()
        if own_process:
            # Interpreter exit runs one full collection over everything still alive (seconds
            # with a model and its data loaded); the process ends right after, so skip it.
            gc.freeze()
    return 0
