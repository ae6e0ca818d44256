"""Bounded steps for the GPU check: each step is a process of its own with a time limit cut to
what the whole budget has left, its output in logs/NAME.log, and summary.json rewritten as each
one ends, so a run cut short still says what it did.

A step may run in the background, beside the steps after it: a light GPU test run beside the
stage chain, an op build on the CPU beside everything. A step names the background steps it
waits for (`wait_for`: a benchmark must have the GPU to itself) and the steps that must have
succeeded before it (`needs`: otherwise it is skipped with the reason).

Not a package: bench/gpu_check.py imports it as a sibling module.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

# A step is not started with less than this left of the budget: it could not finish.
MIN_STEP_SECONDS = 10.0


@dataclass
class Step:
    """One bounded command: its name (and log file), argv, time limit in seconds, the steps
    whose success it needs, whether it runs in the background, and the background steps that
    must have ended before it starts."""

    name: str
    argv: list[str]
    timeout: float
    needs: list[str] = field(default_factory=list)
    background: bool = False
    wait_for: list[str] = field(default_factory=list)


@dataclass
class Running:
    """A started step: its process, open log, start time and limit."""

    step: Step
    proc: subprocess.Popen[bytes]
    log: IO[str]
    start: float
    limit: float


def start_step(step: Step, out: Path, left: float, env: dict[str, str], cwd: Path) -> Running:
    """Start `step` with its output in out/logs/NAME.log, to be killed at min(limit, left)."""
    log = open(out / "logs" / f"{step.name}.log", "w")  # noqa: SIM115 -- closed by finish_step
    log.write("$ " + " ".join(step.argv) + "\n")
    log.flush()
    proc = subprocess.Popen(
        step.argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    return Running(step, proc, log, time.monotonic(), min(step.timeout, left))


def finish_step(run: Running) -> dict[str, Any]:
    """Wait for a started step until its limit (then kill its whole process group: launchers
    leave children behind); its record: status, exit code, seconds, limit."""
    remaining = run.limit - (time.monotonic() - run.start)
    try:
        rc: int | None = run.proc.wait(timeout=max(remaining, 0.0))
    except subprocess.TimeoutExpired:
        os.killpg(run.proc.pid, 9)
        run.proc.wait()
        rc = None
    run.log.close()
    seconds = time.monotonic() - run.start
    status = "ok" if rc == 0 else ("timeout" if rc is None else "failed")
    return {"status": status, "rc": rc, "seconds": round(seconds, 1), "limit": round(run.limit, 1)}


def say(out: Path, line: str) -> None:
    """Print a progress line and keep it in out/check.log (it comes back with the results)."""
    print(line, flush=True)
    with open(out / "check.log", "a") as f:
        f.write(line + "\n")


class Runner:
    """Runs steps in order within a budget, keeping the summary and the progress lines."""

    def __init__(self, steps: list[Step], out: Path, budget: float, env: dict[str, str]) -> None:
        self.steps, self.out, self.env = steps, out, env
        self.cwd = Path(__file__).resolve().parents[1]
        self.deadline = time.monotonic() + budget
        self.index = {s.name: i for i, s in enumerate(steps, 1)}
        self.running: dict[str, Running] = {}
        self.summary: dict[str, Any] = {"budget_s": budget, "steps": {}}
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def record(self, name: str, record: dict[str, Any]) -> None:
        """Keep a step's record, rewrite summary.json, print its line."""
        self.summary["steps"][name] = record
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")
        if record["status"] == "running":
            what = f"started in the background (limit {record['limit']} s)"
        else:
            what = record.get("why") or f"{record['seconds']} s (limit {record['limit']} s)"
        say(self.out, f"[{self.index[name]}/{len(self.steps)}] {name}: {record['status']}, {what}")

    def wait(self, names: list[str]) -> None:
        """Let the named background steps end (each within its own limit) and record them."""
        for name in names:
            if name in self.running:
                self.record(name, finish_step(self.running.pop(name)))

    def run(self, step: Step) -> None:
        """Run one step (or start it, in the background), or skip it with the reason."""
        self.wait(step.wait_for)
        left = self.deadline - time.monotonic()
        done = self.summary["steps"]
        failed = [n for n in step.needs if done.get(n, {}).get("status") != "ok"]
        if failed:
            self.record(step.name, {"status": "skipped", "why": f"needs {', '.join(failed)}"})
        elif left < MIN_STEP_SECONDS:
            self.record(step.name, {"status": "skipped", "why": f"budget: {left:.0f} s left"})
        elif step.background:
            self.running[step.name] = run = start_step(step, self.out, left, self.env, self.cwd)
            self.record(step.name, {"status": "running", "limit": round(run.limit, 1)})
        else:
            run = start_step(step, self.out, left, self.env, self.cwd)
            self.record(step.name, finish_step(run))


def run_all(
    steps: list[Step], out: Path, budget: float, env: dict[str, str], **extra: Any
) -> dict[str, Any]:
    """Run the steps in order within `budget` seconds (background ones beside the next), wait
    for what still runs at the end; summary.json (with `extra` keys) after every change."""
    runner = Runner(steps, out, budget, env)
    runner.summary.update(extra)
    for step in steps:
        runner.run(step)
    runner.wait(list(runner.running))
    return runner.summary
