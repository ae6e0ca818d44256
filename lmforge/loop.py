"""The one training loop: every stage (pretraining, SFT, reward, DPO, GRPO, PPO) runs through
`training_loop`, which owns the cadence of a run and nothing of any stage's own.

A stage hands it a `Task`: a step function that turns the step's batch (or rollout) into losses,
an evaluation function, and how many samples a step consumes. The step function is a generator:
it yields one `Micro` (a loss, its metrics, and which engine it trains) per micro-batch and may
return step-level metrics (rewards, KL, ...). The loop does everything around it:

- backward on the right engine and the optimizer step at each accumulation boundary, guarded by
  the fault policy (lmforge.faults): a non-finite loss or gradient, or a loss spike, refuses that
  update on every rank; once one update of a step is refused, the step's remaining updates are
  refused too (the step's batch is bad), and a run of bad steps rolls the whole run back through
  the checkpointer, passing over the bad batches afterwards;
- the length of the run: train.steps, or with train.epochs the steps that many passes over the
  task's training samples take (the learning-rate schedule is stretched to span them), with a
  line at each epoch's end;
- logging (means over the log window and the ranks, learning rate, gradient norm, throughput,
  MFU), evaluation (before the first step for finetuning stages, every `eval_every` and at the
  end), checkpoints (every `save_every`, at the end, at `stop_at`, on SIGTERM/SIGUSR1, when
  the launcher died, and at an evaluation that is a new train.keep_best), early stopping
  (train.early_stop), and the closing summary line.

Stages never call `backward` or `step` on an engine and never write a checkpoint themselves.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import torch

from lmforge.checkpointer import MAIN, Checkpointer
from lmforge.distributed import DistInfo
from lmforge.engine import StatefulEngine, TrainEngine
from lmforge.faults import DivergenceError, FaultMonitor, Verdict
from lmforge.harness.training import BEFORE as HARNESS_BEFORE
from lmforge.harness.training import PREFIX as HARNESS_PREFIX
from lmforge.harness.training import check_stage, format_metrics, run_in_training
from lmforge.optim import OptimConfig, lr_factor
from lmforge.runtime import StopFlag, TrainConfig, all_mean
from lmforge.tracking import Tracker, format_duration


@dataclass
class Micro:
    """One micro-batch's loss for `engine` (backward is the loop's), with its metrics."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    engine: str = MAIN


@dataclass
class StepContext:
    """The step a step function computes: its number (from 1) and the global position of its
    first sample. `skipped` turns true once the loop has refused an update of this step."""

    step: int
    cursor: int
    skipped: bool = False


StepFn = Callable[[StepContext], Generator[Micro, None, "dict[str, float] | None"]]
MicroStep = Callable[[int, int, int], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class Task:
    """What a stage hands the loop."""

    step: StepFn
    evaluate: Callable[[int], dict[str, float]]
    samples_per_step: int  # global samples a step consumes (the data cursor's advance)
    num_samples: int  # samples in one epoch of the training data
    tokens_per_step: int  # tokens a step trains on over all ranks, unless it reports "tokens"
    summary: Callable[[dict[str, Any]], str]  # the closing line's stage-specific part
    updates_per_step: int = 1  # optimizer updates per step of every engine (RL epochs)
    evaluate_first: bool = True  # evaluate before the first step (eval_before/* metrics)
    eval_line: Callable[[dict[str, float]], str] | None = None


@dataclass
class Run:
    """A started run: where it is, what it logs to, what it saves with, and where it starts."""

    stage: str
    train: TrainConfig
    log_every: int
    info: DistInfo
    tracker: Tracker
    checkpointer: Checkpointer
    monitor: FaultMonitor
    step: int = 0
    cursor: int = 0
    tokens: int = 0
    carried: dict[str, Any] = field(default_factory=dict)  # metrics a resume keeps (eval_before)
    no_heldout_said: bool = False  # an evaluation came back empty and the run said so


def micro_batches(micro_step: MicroStep, train: TrainConfig, info: DistInfo) -> StepFn:
    """The step function of a supervised stage: this rank's micro-batches of the global batch,
    `micro_step(step, start, count)` giving the loss of the `count` samples at positions start..
    """
    accum = train.global_batch_size // (train.micro_batch_size * info.world)

    def step_fn(ctx: StepContext) -> Generator[Micro, None, None]:
        for micro in range(accum):
            start = ctx.cursor + (info.rank * accum + micro) * train.micro_batch_size
            loss, metrics = micro_step(ctx.step, start, train.micro_batch_size)
            yield Micro(loss, metrics)

    return step_fn


def supervised_task(
    micro_step: MicroStep,
    evaluate: Callable[[int], dict[str, float]],
    train: TrainConfig,
    info: DistInfo,
    *,
    num_samples: int,
    tokens_per_sample: int,
    summary: Callable[[dict[str, Any]], str],
) -> Task:
    """The Task of a stage that trains on a global batch of samples per step (pretraining, SFT,
    reward, DPO): `micro_batches(micro_step)`, the cursor advancing by the global batch."""
    return Task(
        step=micro_batches(micro_step, train, info),
        evaluate=evaluate,
        samples_per_step=train.global_batch_size,
        num_samples=num_samples,
        tokens_per_step=train.global_batch_size * tokens_per_sample,
        summary=summary,
    )


def before_after(last: dict[str, Any], key: str, label: str) -> str:
    """'label 0.250 -> 0.410' from eval_before/<key> and eval/<key> of a run's last metrics
    ('label not measured' when the run evaluated nothing, e.g. without held-out data)."""
    before, after = last.get(f"eval_before/{key}"), last.get(f"eval/{key}")
    if before is None and after is None:
        return f"{label} not measured"
    nan = float("nan")
    before, after = nan if before is None else before, nan if after is None else after
    return f"{label} {before:.3f} -> {after:.3f}"


class StepWindow:
    """Step metrics since the last log line: averaged over steps, then over ranks."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new window."""
        self.t0 = time.perf_counter()
        self.steps = 0
        self.tokens = 0
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, tokens: int, values: dict[str, float]) -> None:
        """Record one finished step: the tokens it trained on and its values."""
        self.steps += 1
        self.tokens += tokens
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
            self.counts[key] = self.counts.get(key, 0) + 1

    def flush(self, tracker: Tracker, engine: TrainEngine, world: int) -> dict[str, Any]:
        """The window's metrics (means over steps and ranks, lr, grad norm, throughput); resets."""
        elapsed = time.perf_counter() - self.t0
        keys = sorted(self.sums)
        means = torch.tensor([self.sums[k] / self.counts[k] for k in keys], dtype=torch.float64)
        means = all_mean(means, world) if keys else means
        metrics: dict[str, Any] = dict(zip(keys, means.tolist(), strict=True))
        metrics.setdefault("loss", math.nan)  # every step of the window was skipped
        metrics.update(lr=engine.lr, grad_norm=engine.grad_norm())
        metrics.update(tracker.throughput(self.tokens, elapsed))
        metrics["step_seconds"] = elapsed / max(self.steps, 1)
        self.reset()
        return metrics


@dataclass
class _Outcome:
    """What one step did: its metric means (empty when skipped), tokens, and a rollback."""

    values: dict[str, float]
    tokens: int
    rolled_back: bool = False


class _Stepper:
    """Runs one step's micro-batches through the engines with the fault policy around them."""

    def __init__(self, run: Run, task: Task) -> None:
        self.run, self.task = run, task
        self.engines = run.checkpointer.engines()

    def __call__(self, step: int, cursor: int) -> _Outcome:
        monitor, ctx = self.run.monitor, StepContext(step + 1, cursor)
        if monitor.known_bad(cursor):
            for engine in self.engines.values():
                for _ in range(self.task.updates_per_step):
                    engine.skip_step()
            monitor.skip_known(ctx.step, cursor)
            return _Outcome({}, 0)
        values, report, verdict = self._updates(ctx)
        if monitor.after_step(ctx.step, cursor, verdict, ctx.skipped):
            self._roll_back(ctx.step)
            return _Outcome({}, 0, rolled_back=True)
        tokens = int(report.pop("tokens", 0)) * self.run.info.world or self.task.tokens_per_step
        return _Outcome({} if ctx.skipped else {**values, **report}, tokens)

    def _updates(self, ctx: StepContext) -> tuple[dict[str, float], dict[str, float], Verdict]:
        """Drive the stage's step generator; returns (micro-batch means, step report, verdict)."""
        monitor, gen = self.run.monitor, self.task.step(ctx)
        losses: dict[str, list[float]] = {}
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        first: Verdict | None = None
        bad = Verdict()
        while True:
            try:
                micro = next(gen)
            except StopIteration as done:
                report = dict(done.value or {})
                break
            engine = self.engines[micro.engine]
            loss = monitor.inject(ctx.step, micro.loss)
            engine.backward(loss)
            value = float(loss.detach().float().item())
            losses.setdefault(micro.engine, []).append(value)
            shown = {"loss": value} if micro.engine == MAIN else {}
            for key, v in {**shown, **micro.metrics}.items():
                sums[key] = sums.get(key, 0.0) + float(v)
                counts[key] = counts.get(key, 0) + 1
            if not engine.at_boundary():
                engine.step()
                continue
            batch = losses.pop(micro.engine)
            if ctx.skipped:  # the step's batch is bad: refuse its remaining updates too
                engine.step(skip=True)
                continue
            spikes = first is None and micro.engine == MAIN
            verdict = monitor.judge(ctx.step, batch, spikes=spikes)
            engine.step(skip=verdict.skip)
            first = first or verdict
            if engine.last_step_skipped:
                ctx.skipped, bad = True, verdict
        means = {k: sums[k] / counts[k] for k in sums}
        return means, report, bad if ctx.skipped else (first or Verdict())

    def _roll_back(self, step: int) -> None:
        """Go back to the newest checkpoint before the current run of bad steps (collective)."""
        run = self.run
        point = run.checkpointer.rollback(run.monitor.streak_start(step))
        if point is None:
            raise DivergenceError(
                f"training diverged at step {step} before any checkpoint was saved, so there is "
                "nothing to roll back to; lower optim.lr or save earlier (train.save_every)"
            )
        run.monitor.rolled_back(step, point.step, str(point.path), point.meta.get("faults"))
        for engine in self.engines.values():
            engine.set_lr_scale(run.monitor.state.lr_scale)
        run.step, run.cursor = point.step, point.cursor
        run.tokens = int(point.meta.get("tokens_seen", 0))


def training_loop(run: Run, task: Task) -> dict[str, Any]:
    """Train `task` from `run.step` to train.steps (or train.epochs' steps; see the module);
    returns the last metrics (evaluation, the last log window, eval_before/*). Closes the
    tracker."""
    engines = run.checkpointer.engines()
    last: dict[str, Any] = dict(run.carried)
    check_stage(run.stage, run.checkpointer.config)
    plan_length(run, task)
    best = run.checkpointer.best
    if best is not None and best.stopped:
        run.tracker.message(
            f"{run.stage}: stopped early at step {best.stopped} (train.early_stop); best "
            f"{best.describe()}; nothing left to train"
        )
        run.tracker.close()
        return last
    if run.step == 0 and task.evaluate_first:
        before = _evaluate(run, task, engines, 0, "before training")
        last.update({_before_key(k): v for k, v in before.items()})
    stepper, window, stop = _Stepper(run, task), StepWindow(), StopFlag()
    started, train = time.perf_counter(), run.train
    for engine in engines.values():
        engine.train(True)
    while run.step < train.steps:
        outcome = stepper(run.step, run.cursor)
        if outcome.rolled_back:
            window.reset()
            continue
        run.step += 1
        run.cursor += task.samples_per_step
        run.tokens += outcome.tokens
        window.add(outcome.tokens, outcome.values)
        if _after_step(run, task, engines, window, last, stop):
            break
    if best is not None and best.value is not None:
        last["best_step"] = best.step
    run.tracker.message(
        f"{run.stage} done: {run.step} steps in {format_duration(time.perf_counter() - started)}"
        f"; {task.summary(last)}; checkpoint {run.checkpointer.run_dir / f'step-{run.step:06d}'}"
        + (f"; best {best.describe()} ({run.checkpointer.run_dir / 'best'})" if best else "")
    )
    run.tracker.close()
    return last


def plan_length(run: Run, task: Task) -> None:
    """With train.epochs, set run.train.steps from the training set's size and the global
    batch, stretch every engine's learning-rate schedule over them and say so. The engines were
    built before the stage knew its data size; the same numbers give the same steps on resume.
    """
    train = run.train
    if train.epochs <= 0:
        return
    steps = train.planned_steps(task.num_samples)
    run.train = dataclasses.replace(train, steps=steps)
    run.tracker.total_steps = steps
    optim = getattr(run.checkpointer.config, "optim", None)
    if isinstance(optim, OptimConfig):
        for engine in run.checkpointer.engines().values():
            _span_schedule(engine, optim, steps * task.updates_per_step)
            engine.set_lr_scale(run.monitor.state.lr_scale)  # recompute the current rate
    run.tracker.message(
        f"train.epochs={train.epochs:g}: {task.num_samples} training samples, "
        f"{task.samples_per_step} per step: {steps} steps"
    )


def _span_schedule(engine: StatefulEngine, optim: OptimConfig, updates: int) -> None:
    """Make the engine's learning-rate schedule (a LambdaLR of lmforge.optim.lr_factor) span
    `updates` optimizer updates instead of the count it was built with."""
    sched = getattr(getattr(engine, "ds", None), "lr_scheduler", None)
    if not isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
        return

    def factor(step: int) -> float:  # a plain function: LambdaLR's state_dict leaves it out
        return lr_factor(step, optim, updates)

    sched.lr_lambdas = [factor] * len(sched.lr_lambdas)


def _after_step(
    run: Run,
    task: Task,
    engines: dict[str, StatefulEngine],
    window: StepWindow,
    last: dict[str, Any],
    stop: StopFlag,
) -> bool:
    """Log, evaluate and save as the cadence says after step run.step; True to stop now."""
    step, train = run.step, run.train
    final = step == train.steps
    epoch = run.cursor / max(task.num_samples, 1)
    if step % run.log_every == 0 or final:
        metrics = window.flush(run.tracker, engines[MAIN], run.info.world)
        metrics.update(tokens=run.tokens, epoch=epoch)
        metrics.update(run.monitor.metrics())
        run.tracker.log(step, metrics)
        run.tracker.progress(step, metrics, metrics["step_seconds"])
        last.update(metrics)
    _epoch_line(run, task, step)
    improved = early = False
    if final or (train.eval_every and step % train.eval_every == 0):
        result = _evaluate(run, task, engines, step, f"eval step {step} (epoch {epoch:.2f})")
        last.update(result)
        improved, early = _judge_best(run, step, result)
    requested = stop.requested()
    stopping = requested or step == train.stop_at or early
    if final or stopping or improved or step % train.save_every == 0:
        planned = {"planned_steps": train.steps} if train.epochs > 0 else {}
        path = run.checkpointer.save(step, run.cursor, last, tokens_seen=run.tokens, **planned)
        run.tracker.message(f"saved {path}")
    if stopping and not final:
        best = run.checkpointer.best
        if early and best is not None:
            run.tracker.message(
                f"early stop: {train.keep_best} has not improved for {best.waited} evaluations "
                f"(train.early_stop={train.early_stop}); best {best.describe()}, kept as "
                f"{run.checkpointer.run_dir / 'best'}; saved at step {step}"
            )
        else:
            why = stop.reason if requested else f"train.stop_at={train.stop_at}"
            run.tracker.message(f"{why}: saved at step {step}; resume with resume: auto")
    return stopping


def _epoch_line(run: Run, task: Task, step: int) -> None:
    """'epoch 2 of 5 done at step 120' when this step's samples completed a pass."""
    num, per = max(task.num_samples, 1), task.samples_per_step
    done = run.cursor // num
    if done > (run.cursor - per) // num:
        of = f" of {run.train.epochs:g}" if run.train.epochs > 0 else ""
        run.tracker.message(f"epoch {done}{of} done at step {step}")


def _judge_best(run: Run, step: int, result: dict[str, float]) -> tuple[bool, bool]:
    """Give the evaluation just made to train.keep_best; (a new best, stop early now).
    Stopping is recorded in the state before the save that ends the run."""
    best = run.checkpointer.best
    if best is None:
        return False, False
    improved = best.judge(step, result)
    if improved:
        run.tracker.message(f"new best {best.describe()}")
    early = best.exhausted() and step < run.train.steps
    if early:
        best.stopped = step
    return improved, early


def _evaluate(
    run: Run, task: Task, engines: dict[str, StatefulEngine], step: int, title: str
) -> dict[str, float]:
    """Run the stage's evaluation, and eval.harness_tasks on the main engine's model (see
    lmforge.harness.training), with every engine in eval mode; log both and print one line."""
    for engine in engines.values():
        engine.train(False)
    result = task.evaluate(step)
    ckpt = run.checkpointer
    harness = run_in_training(ckpt.config, run.stage, engines[MAIN], ckpt.tokenizer)
    for engine in engines.values():
        engine.train(True)
    if not result and not run.no_heldout_said:  # no held-out data: said once, not every time
        run.tracker.message(f"{run.stage}: no held-out data, so evaluation is skipped")
        run.no_heldout_said = True
    if not result and not harness:
        return result
    lines = [task.eval_line(result) if task.eval_line else _plain_line(result)] if result else []
    lines += [format_metrics(harness)] if harness else []
    result = {**result, **harness}
    run.tracker.log(step, result)
    run.tracker.message(f"{title}: {'; '.join(lines)}")
    return result


def _before_key(key: str) -> str:
    """The name a metric of the evaluation before training keeps in the run's last metrics:
    eval/x -> eval_before/x, harness/t/m -> harness_before/t/m."""
    if key.startswith(HARNESS_PREFIX):
        return HARNESS_BEFORE + key[len(HARNESS_PREFIX) :]
    return key.replace("eval/", "eval_before/")


def _plain_line(result: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in result.items())
