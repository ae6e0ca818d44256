"""Resuming a run with settings that differ from the ones it was started with.

A checkpoint keeps the resolved config of the run that wrote it (`lmforge.json`, key `config`).
When a run resumes, `config_changes` compares that config with the new one, key by key. Every
difference is either applied (from the next step; the keys in `APPLIED_KEYS`), allowed by the
user (`--resume.allow_changes=KEY,...`), or refused with a `ConfigError` naming the key: a
silently ignored or silently taken setting is how a run ends up not being what its config says.

The stage prints `format_changes(...)` on the console and, on rank 0, records them in the run's
`config.yaml` with `record_changes`, as YAML comments, so that file stays the loadable config of
the run while saying at which step each setting changed:

    previous = previous_change_lines(run_dir / "config.yaml")   # before the file is rewritten
    dump_config(cfg, run_dir / "config.yaml")
    record_changes(run_dir / "config.yaml", changes, step, previous)
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from lmforge.config import option, plain
from lmforge.errors import ConfigError

# Settings that may differ from the resumed run's config: they take effect from the next step.
# An entry is a dotted key, and also covers every key under it (`engine` covers `engine.*`).
# Whatever is not here changes what the run *is* (the model's shape, its tokenizer, the data and
# its order, the seed, the stage's objective), so it is refused unless the user allows it.
APPLIED_KEYS: tuple[str, ...] = (
    # The optimizer hyper-parameters and the schedule's shape and length: the learning rate is
    # recomputed from them at every step, and the optimizer state (Adam moments) does not depend
    # on them, so the run continues from its state with the new values.
    "optim.lr",
    "optim.min_lr_ratio",
    "optim.schedule",
    "optim.warmup_steps",
    "optim.decay_fraction",
    "optim.betas",
    "optim.eps",
    "optim.weight_decay",
    "optim.grad_clip",
    # Length of training and the cadence of evaluation, checkpoints and samples: they decide
    # when things happen, not what a step computes. (A stage without one of these keys, such
    # as eval_batches, simply never has it differ.)
    "train.steps",
    "train.stop_at",
    "train.eval_every",
    "train.eval_batches",
    "train.save_every",
    "train.keep_last",
    "train.keep_every",
    "train.min_free_bytes",
    "train.elastic_state",
    "train.save_optimizer",
    "train.samples",
    "train.sample_tokens",
    # The global batch fixes which sequences make up a step (the data order); the micro-batch
    # only splits a step into forward passes (the accumulation count follows), and the device
    # is where they run.
    "train.micro_batch_size",
    "train.device",
    # Logging, the fault policy and the engine: logging touches no state; the fault monitor's
    # state is counters and a loss window that work under new thresholds; the engine is rebuilt
    # at every start and restores on any ZeRO stage or process count (elastic state).
    "tracking",
    "faults",
    "engine",
)

# Keys that never matter for a resume: where to resume from is not a setting of the run, and
# the run directory is where the checkpoints were found (a moved run directory is the same run),
# as is whether it may sit among files lmforge did not write.
IGNORED_KEYS: tuple[str, ...] = ("resume", "run_dir", "allow_foreign_run_dir")

# How a recorded change starts in config.yaml; `previous_change_lines` looks for it.
CHANGE_PREFIX = "# resumed at step "


@dataclass
class ResumeConfig:
    """Where to resume from, and which settings may differ from the resumed run's config."""

    SHORTHAND: ClassVar[str] = "checkpoint"  # `resume: auto` means `resume: {checkpoint: auto}`

    checkpoint: str = option(
        "auto", "auto = continue from run_dir/latest if present; never; or a checkpoint path."
    )
    allow_changes: list[str] = option(
        default_factory=list,
        doc="Keys (or section prefixes like data) that may differ from the resumed run's config.",
    )

    def validate(self, prefix: str = "resume") -> None:
        """Reject a checkpoint path that does not exist and empty allow_changes entries."""
        p = f"{prefix}." if prefix else ""
        if self.checkpoint not in ("auto", "never") and not Path(self.checkpoint).exists():
            raise ConfigError(
                f"{p}checkpoint: {self.checkpoint} does not exist; use auto, never or a path"
            )
        for i, key in enumerate(self.allow_changes):
            if not key.strip(" ."):
                raise ConfigError(f"{p}allow_changes[{i}]: empty key; write a key like optim.lr")


@dataclass
class Change:
    """One setting that differs from the resumed run's config: its dotted key and both values
    (plain YAML/JSON values: lists, dicts and scalars)."""

    key: str
    old: Any
    new: Any


def _covers(entry: str, key: str) -> bool:
    """Whether `entry` (a dotted key) is `key` or a section above it."""
    return key == entry or key.startswith(entry + ".")


def _leaves(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, plain value) of every setting in a config object or nested dict.

    In a config object the settings are its fields, so a dict-valued field (`objective.mix`) is
    one setting, compared whole: a corpus added to a mix is a change. In a plain dict every
    nested mapping is taken for a section (an empty one is a setting of its own)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            if not f.init:
                continue
            sub = getattr(value, f.name)
            key = f"{prefix}.{f.name}" if prefix else f.name
            if dataclasses.is_dataclass(sub) and not isinstance(sub, type):
                yield from _leaves(sub, key)
            else:
                yield key, plain(sub)
    elif isinstance(value, Mapping) and value:
        for name, sub in value.items():
            key = f"{prefix}.{name}" if prefix else str(name)
            if isinstance(sub, Mapping) and sub:
                yield from _leaves(sub, key)
            else:
                yield key, plain(sub)


_MISSING = object()


def _lookup(data: Mapping[str, Any], key: str) -> Any:
    """The value at dotted `key` of nested dict `data`, or _MISSING."""
    node: Any = data
    for name in key.split("."):
        if not isinstance(node, Mapping) or name not in node:
            return _MISSING
        node = node[name]
    return node


def _same(a: Any, b: Any) -> bool:
    """Equal as settings: 1 == 1.0 and a list equals a tuple, but True is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _show(value: Any) -> str:
    """A value for a one-line message: its repr, shortened."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def config_changes(saved: Mapping[str, Any], current: Any, allow: Sequence[str]) -> list[Change]:
    """The settings of `current` that differ from `saved`, the resumed run's config.

    `saved` is the `config` of the checkpoint's lmforge.json; `current` is the config being
    started (the config object, or a dict of it: with the object a dict-valued setting is
    compared whole, with a dict its keys are compared one by one). Keys under `resume` and
    `run_dir` are ignored, as are keys one side lacks (a config written by another lmforge
    version). Numbers compare by value (1 == 1.0), lists equal tuples.

    Returns the differences that are applied (`APPLIED_KEYS`) or allowed by `allow` (keys, or
    sections above keys), in config order. Raises ConfigError, in one line, naming the first
    other difference, or an `allow` entry that names no key of `current`.
    """
    current_leaves = dict(_leaves(current))
    entries = [a.strip().strip(".") for a in allow]
    for entry in entries:
        if not any(_covers(entry, key) for key in current_leaves):
            close = difflib.get_close_matches(entry, list(current_leaves), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"resume.allow_changes: '{entry}' is not a config key{hint}")
    changes: list[Change] = []
    refused: list[Change] = []
    for key, new in current_leaves.items():
        if any(_covers(entry, key) for entry in IGNORED_KEYS):
            continue
        old = _lookup(saved, key)
        if old is _MISSING or _same(old, new):
            continue
        old = plain(old)
        if any(_covers(entry, key) for entry in (*APPLIED_KEYS, *entries)):
            changes.append(Change(key, old, new))
        else:
            refused.append(Change(key, old, new))
    if refused:
        first = refused[0]
        more = ""
        if len(refused) > 1:
            rest = ", ".join(c.key for c in refused[1:])
            more = f" (and {len(refused) - 1} more: {rest})"
        keys = ",".join(c.key for c in refused)
        them = "them" if len(refused) > 1 else "it"
        raise ConfigError(
            f"resume: {first.key} differs from the run being resumed "
            f"({_show(first.old)} -> {_show(first.new)}){more}; it cannot change mid-run: "
            f"start a new run_dir, or allow {them} with --resume.allow_changes={keys}"
        )
    return changes


def format_changes(changes: Sequence[Change]) -> list[str]:
    """Console lines for applied changes: `resume: optim.lr 0.003 -> 0.0001`."""
    return [f"resume: {c.key} {_show(c.old)} -> {_show(c.new)}" for c in changes]


def previous_change_lines(config_yaml: Path) -> list[str]:
    """The change records (`# resumed at step ...` lines) of an existing config.yaml, to keep
    them when the stage writes that file afresh. [] if there is no such file."""
    try:
        text = Path(config_yaml).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [line for line in text.splitlines() if line.startswith(CHANGE_PREFIX)]


def record_changes(
    config_yaml: Path, changes: Sequence[Change], step: int, previous: Sequence[str] = ()
) -> None:
    """Append to a freshly written config.yaml the earlier change records (`previous`, from
    `previous_change_lines`), then one `# resumed at step STEP: KEY OLD -> NEW` line per change.

    Comments keep the file loadable YAML with the new values. A line already among `previous`
    is not written twice (a resume that crashed before its first checkpoint, then resumed
    again with the same settings, would find the same changes at the same step). Call on one
    process only (rank 0).
    """
    lines = list(previous)
    for c in changes:
        line = f"{CHANGE_PREFIX}{step}: {c.key} {_show(c.old)} -> {_show(c.new)}"
        if line not in lines:
            lines.append(line)
    if not lines:
        return
    path = Path(config_yaml)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    with path.open("a", encoding="utf-8") as fh:
        if text and not text.endswith("\n"):
            fh.write("\n")
        fh.write("".join(line + "\n" for line in lines))
        fh.flush()
        os.fsync(fh.fileno())
