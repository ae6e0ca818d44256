"""Numerical faults during training: non-finite losses or gradients, loss spikes, and the policy.

Every optimizer step the loop hands the monitor the step's losses before the update
(`judge`, one all-reduce, so every rank decides the same). A step is skipped when any rank's
loss is not finite, when DeepSpeed finds the gradient norm not finite, or on a loss spike with
`spike_policy: skip`: the update is not applied (weights and optimizer state are unchanged), the
batch is consumed, and the learning-rate schedule still advances. `max_consecutive` skipped steps
in a row (or a spike under `spike_policy: rollback`) roll back: the engine reloads the newest
checkpoint saved before the trouble began, the offending batches' positions join a skip list
(the data order is a function of the position, so the replay passes over them without computing
them), and the learning rate is multiplied by `lr_factor_on_rollback`. The monitor's state
(skip list, counters, learning-rate scale, recent losses) is saved in every checkpoint.
Every event is one console line and one `metrics.jsonl` record with an `event` field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist

from lmforge.config import option
from lmforge.errors import ConfigError, LmforgeError

SpikePolicy = Literal["skip", "rollback", "ignore"]


class DivergenceError(LmforgeError):
    """Training kept producing faults after the allowed number of rollbacks."""


@dataclass
class FaultConfig:
    """What to do about non-finite losses or gradients and loss spikes."""

    max_consecutive: int = option(
        3, "Roll back to the last checkpoint after this many skipped steps in a row; 0 = never."
    )
    max_rollbacks: int = option(3, "Stop with an error after this many rollbacks in one run.")
    lr_factor_on_rollback: float = option(
        1.0, "Multiply the learning rate by this at each rollback (e.g. 0.5); 1 = keep it."
    )
    spike_zscore: float = option(
        6.0, "A loss this many standard deviations above the recent mean is a spike; 0 = off."
    )
    spike_window: int = option(128, "Recent applied steps whose losses define 'recent'.")
    spike_warmup: int = option(
        100, "No spike detection before this step (nor before the window is full)."
    )
    spike_policy: SpikePolicy = option(
        "skip", "skip = do not apply that step; rollback = roll back at once; ignore = log only."
    )
    inject_nan_at_steps: list[int] = option(
        doc="Testing aid: rank 0's loss becomes NaN at these steps.", default_factory=list
    )
    inject_spike_at_steps: list[int] = option(
        doc="Testing aid: rank 0's loss is multiplied by 10 at these steps.", default_factory=list
    )

    def validate(self, prefix: str = "faults") -> None:
        """Reject values outside their range, naming the key."""
        p = f"{prefix}." if prefix else ""
        for key in ("max_consecutive", "max_rollbacks", "spike_warmup"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{p}{key}: must be >= 0, got {getattr(self, key)}")
        if self.spike_window < 2:
            raise ConfigError(f"{p}spike_window: must be at least 2, got {self.spike_window}")
        if not 0.0 < self.lr_factor_on_rollback <= 1.0:
            raise ConfigError(
                f"{p}lr_factor_on_rollback: must be in (0, 1], got {self.lr_factor_on_rollback}"
            )
        if not self.spike_zscore >= 0.0 or math.isinf(self.spike_zscore):
            raise ConfigError(f"{p}spike_zscore: must be a number >= 0, got {self.spike_zscore}")
        for key in ("inject_nan_at_steps", "inject_spike_at_steps"):
            if any(s < 1 for s in getattr(self, key)):
                raise ConfigError(f"{p}{key}: steps count from 1, got {getattr(self, key)}")


@dataclass
class Verdict:
    """The monitor's judgement of one step, the same on every rank."""

    skip: bool = False
    rollback: bool = False
    reason: str = ""
    loss: float = math.nan  # mean over ranks and micro-batches


@dataclass
class FaultState:
    """What a checkpoint keeps of the monitor."""

    skip_batches: list[int] = field(default_factory=list)  # global positions of bad batches
    skipped: int = 0
    rollbacks: int = 0
    lr_scale: float = 1.0
    window: list[float] = field(default_factory=list)


class FaultMonitor:
    """Judges steps, counts skips, decides rollbacks and logs every event (see the module)."""

    def __init__(
        self, cfg: FaultConfig, *, rank: int, world: int, tracker: Any, state: Any = None
    ) -> None:
        self.cfg = cfg
        self.rank = rank
        self.world = world
        self.tracker = tracker
        self.load_state_dict(state)
        self.streak: list[int] = []  # positions of this run of consecutive skipped steps

    # -- per step ---------------------------------------------------------------------------

    def known_bad(self, cursor: int) -> bool:
        """Whether the batch at global position `cursor` was skipped by a rollback."""
        return cursor in self.state.skip_batches

    def inject(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The testing aids: rank 0's loss made NaN or ten times larger at the listed steps."""
        if self.rank != 0:
            return loss
        if step in self.cfg.inject_nan_at_steps:
            return loss * float("nan")
        if step in self.cfg.inject_spike_at_steps:
            return loss * 10.0
        return loss

    def judge(self, step: int, losses: list[float], *, spikes: bool = True) -> Verdict:
        """Decide about an optimizer update of step `step` from this rank's micro-batch losses.
        Collective. Without `spikes` only non-finite losses count (a step's later updates, or
        another engine's, whose losses are not on the scale the spike window tracks)."""
        bad = sum(1 for x in losses if not math.isfinite(x))
        values = torch.tensor(
            [sum(losses) if not bad else 0.0, bad, len(losses)], dtype=torch.float64
        )
        if self.world > 1 and dist.is_initialized():
            if dist.get_backend() == "nccl":
                values = values.cuda()
            dist.all_reduce(values)
            values = values.cpu()
        total, bad_all, count = values.tolist()
        if bad_all:
            return Verdict(skip=True, reason="non-finite loss")
        loss = total / max(count, 1.0)
        z = self._zscore(step, loss) if spikes else None
        if z is None or z <= self.cfg.spike_zscore:
            return Verdict(loss=loss)
        reason = f"loss spike ({loss:.4f}, z-score {z:.1f})"
        if self.cfg.spike_policy == "ignore":
            self._event(step, "spike", f"{reason}; ignored (spike_policy: ignore)", loss=loss)
            return Verdict(loss=loss)
        return Verdict(
            skip=True, rollback=self.cfg.spike_policy == "rollback", reason=reason, loss=loss
        )

    def _zscore(self, step: int, loss: float) -> float | None:
        window = self.state.window
        if (
            not self.cfg.spike_zscore
            or step <= self.cfg.spike_warmup
            or len(window) < self.cfg.spike_window
        ):
            return None
        mean = sum(window) / len(window)
        std = math.sqrt(sum((x - mean) ** 2 for x in window) / len(window))
        return (loss - mean) / max(std, 1e-12)

    def after_step(self, step: int, cursor: int, verdict: Verdict, skipped: bool) -> bool:
        """Record the outcome of step `step` (its batch at `cursor`; `skipped` as the engine
        reports it). Returns whether to roll back now."""
        if not skipped:
            self.streak.clear()
            if math.isfinite(verdict.loss):
                self.state.window = [*self.state.window, verdict.loss][-self.cfg.spike_window :]
            return False
        self.state.skipped += 1
        self.streak.append(cursor)
        reason = verdict.reason or "non-finite gradient norm"
        shown = f"{verdict.loss:.4f}" if math.isfinite(verdict.loss) else "n/a"
        self._event(
            step,
            "skip",
            f"{reason} (loss {shown}); update not applied, weights unchanged "
            f"({len(self.streak)} in a row)",
            cursor=cursor,
        )
        limit = self.cfg.max_consecutive
        return verdict.rollback or bool(limit and len(self.streak) >= limit)

    def skip_known(self, step: int, cursor: int) -> None:
        """Log a batch passed over because a rollback put it on the skip list."""
        self.state.skipped += 1
        self._event(
            step, "skip", "batch on the skip list of a rollback; not computed", cursor=cursor
        )

    # -- rollback ---------------------------------------------------------------------------

    def streak_start(self, step: int) -> int:
        """The first step of the current run of skipped steps ending at `step`."""
        return step - len(self.streak) + 1

    def rolled_back(self, step: int, to_step: int, checkpoint: str, saved: Any) -> None:
        """Update the state after the engine went back to `checkpoint` (at `to_step`, with the
        monitor state `saved` in its metadata) from `step`; raises DivergenceError when the
        rollbacks are used up."""
        self.state.rollbacks += 1
        if self.state.rollbacks > self.cfg.max_rollbacks:
            raise DivergenceError(
                f"training diverged: step {step} needs rollback {self.state.rollbacks} but "
                f"faults.max_rollbacks is {self.cfg.max_rollbacks}; lower optim.lr, set "
                "faults.lr_factor_on_rollback below 1, or check the data near this step"
            )
        self.state.skip_batches = sorted({*self.state.skip_batches, *self.streak})
        self.state.lr_scale *= self.cfg.lr_factor_on_rollback
        window = saved.get("window", []) if isinstance(saved, dict) else []
        self.state.window = [float(x) for x in window]
        skipped = len(self.streak)
        self.streak.clear()
        self._event(
            step,
            "rollback",
            f"{skipped} bad step(s): rolled back to {checkpoint} (step {to_step}); their "
            f"batches will be skipped; learning-rate scale {self.state.lr_scale:g}",
            to_step=to_step,
            checkpoint=checkpoint,
            lr_scale=self.state.lr_scale,
        )

    # -- reporting --------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """Counters for the step log."""
        return {"faults/skipped": self.state.skipped, "faults/rollbacks": self.state.rollbacks}

    def load_state_dict(self, saved: Any) -> None:
        """Continue from the state a checkpoint saved (see state_dict)."""
        saved = saved if isinstance(saved, dict) else {}
        self.state = FaultState(
            skip_batches=[int(c) for c in saved.get("skip_batches", [])],
            skipped=int(saved.get("skipped", 0)),
            rollbacks=int(saved.get("rollbacks", 0)),
            lr_scale=float(saved.get("lr_scale", 1.0)),
            window=[float(x) for x in saved.get("window", [])],
        )

    def state_dict(self) -> dict[str, Any]:
        """The monitor state for the checkpoint's lmforge.json."""
        return {
            "skip_batches": list(self.state.skip_batches),
            "skipped": self.state.skipped,
            "rollbacks": self.state.rollbacks,
            "lr_scale": self.state.lr_scale,
            "window": list(self.state.window),
        }

    def _event(self, step: int, kind: str, text: str, **fields: Any) -> None:
        self.tracker.message(f"faults: step {step}: {text}")
        self.tracker.log(step, {"event": kind, "detail": text, **fields})
