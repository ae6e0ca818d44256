"""Crash safety: a 2-process ZeRO-2 pretraining killed (SIGKILL, every rank at once) ten times at
seeded random moments -- during start-up, during training steps, and in the middle of writing a
checkpoint -- resumes each time from the last complete checkpoint, never uses or keeps a partial
one, and ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import os
import random
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from stagerun import spawn_group, tiny_pretrain_args, wait_group

from lmforge.checkpointer import SAVE_PAUSE_ENV
from lmforge.rundir import latest_name

pytestmark = pytest.mark.slow

STEPS = 40
RESUME = re.compile(r"^resume: step (\d+) from (\S+) via ", re.M)


def args(run_dir: Path, cache: Path) -> list[str]:
    return [*tiny_pretrain_args(run_dir, cache, steps=STEPS, save_every=2), "--engine.zero_stage=2"]


def hidden(run_dir: Path) -> list[str]:
    """What a save in progress (or an interrupted one) leaves: hidden names."""
    return sorted(p.name for p in run_dir.glob(".*")) if run_dir.is_dir() else []


def wait_for(predicate: Callable[[], object], timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.02)


def inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def steps_logged(log: Path) -> list[int]:
    text = log.read_text(errors="replace") if log.exists() else ""
    return [int(m) for m in re.findall(r"^step (\d+)/", text, re.M)]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / latest_name(run_dir) / "model.safetensors")  # type: ignore[operator]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Token shards and tokenizer, built once for the module's runs."""
    return tmp_path_factory.mktemp("cache")


def test_ten_kills_resume_from_the_last_complete_checkpoint(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    reference = tmp_path / "reference"
    ref_logs = tmp_path / "reference-logs"  # beside the run: a run dir holds lmforge's files only
    procs = spawn_group("pretrain/train.py", args(reference, cache), nproc=2, log_dir=ref_logs)
    assert wait_group(procs) == [0, 0], (ref_logs / "rank0.log").read_text()[-3000:]

    rng = random.Random(2024)
    kinds = ["startup"] * 2 + ["save"] * 2 + ["train"] * 5
    rng.shuffle(kinds)
    kinds = ["train", *kinds]  # ten kills; the first gets past start-up
    points = []
    for i, kind in enumerate(kinds):
        latest = latest_name(run)
        expected = int(latest.split("-")[1]) if latest else 0
        stale = {name: (run / name).stat().st_ino for name in hidden(run)}  # cleaned at start
        env = {SAVE_PAUSE_ENV: "8"} if kind == "save" else {}
        logs = tmp_path / f"round{i}"
        procs = spawn_group("pretrain/train.py", args(run, cache), nproc=2, log_dir=logs, env=env)
        log = logs / "rank0.log"
        if kind == "startup":
            delay = rng.uniform(1.0, 6.0)
            time.sleep(delay)
        elif kind == "train":  # after a seeded number of steps, plus a fraction of one
            steps = rng.randint(1, 3)
            wait_for(lambda log=log, steps=steps: len(steps_logged(log)) >= steps)
            delay = rng.uniform(0.0, 0.15)
            time.sleep(delay)
        else:  # in the middle of a save: the test hook holds it before the commit
            wait_for(lambda log=log: steps_logged(log))  # past start-up's clean-up of leftovers
            wait_for(lambda: any(n.endswith(".partial") for n in hidden(run)))
            delay = rng.uniform(0.2, 2.0)
            time.sleep(delay)
        os.killpg(procs[0].pid, signal.SIGKILL)
        codes = wait_group(procs)
        assert codes == [-signal.SIGKILL] * 2, f"round {i} ended by itself: {codes}"
        text = log.read_text(errors="replace")
        # Saves this round's processes had begun and not finished. A kind "save" kill comes after
        # start-up deleted the stale ones, so every partial left is this round's, even one that
        # reuses a deleted partial's name and inode (a resumed run saves the same step again).
        partial = [
            n
            for n in hidden(run)
            if n.endswith(".partial") and (kind == "save" or stale.get(n) != inode(run / n))
        ]
        resumed = RESUME.search(text)
        if resumed:  # it got as far as loading: from the last complete checkpoint
            assert int(resumed.group(1)) == expected, (i, resumed.group(0), latest)
            assert ".partial" not in resumed.group(2)
        elif "pretrain: starting" in text:
            assert expected == 0
        if kind == "save":
            assert partial, f"round {i}: the kill was meant to land inside a save"
            assert latest_name(run) == latest or latest is None, "latest moved to a partial save"
        assert latest_name(run) is None or not latest_name(run).startswith(".")  # type: ignore[union-attr]
        done = steps_logged(log)
        points.append((i, kind, round(delay, 2), max(done) if done else None, partial))

    latest = latest_name(run)
    procs = spawn_group("pretrain/train.py", args(run, cache), nproc=2, log_dir=tmp_path / "final")
    assert wait_group(procs) == [0, 0], (tmp_path / "final" / "rank0.log").read_text()[-3000:]
    text = (tmp_path / "final" / "rank0.log").read_text()
    resumed = RESUME.search(text)
    assert resumed and f"step-{int(resumed.group(1)):06d}" == latest, text[-2000:]
    assert "via DeepSpeed engine state (2 process(es), ZeRO-2)" in text  # same topology
    assert not hidden(run), f"left behind: {hidden(run)}"
    assert latest_name(run) == f"step-{STEPS:06d}"
    ours, ref = final_weights(run), final_weights(reference)
    assert ours.keys() == ref.keys()
    for key in ref:
        assert torch.equal(ours[key], ref[key]), key
    with capsys.disabled():
        print("\nkill points (round, kind, delay s, last step logged, save interrupted):")
        for point in points:
            print("  ", point)
    assert sum(1 for p in points if p[4]) >= 2  # at least the two mid-save kills hit a save


# -- preemption: a stop signal checkpoints at the next step boundary and exits 0 ------------


@pytest.mark.parametrize("signal_to", ["SIGTERM to every rank", "SIGUSR1 to rank 1 only"])
def test_stop_signal_saves_at_the_next_step_and_exits_zero(
    tmp_path: Path, cache: Path, signal_to: str
) -> None:
    run = tmp_path / "run"
    extra = ["--train.steps=400", "--train.save_every=1000"]
    procs = spawn_group("pretrain/train.py", [*args(run, cache), *extra], nproc=2, log_dir=tmp_path)
    log = tmp_path / "rank0.log"
    wait_for(lambda: len(steps_logged(log)) >= 3)
    seen = max(steps_logged(log))
    if signal_to.startswith("SIGTERM"):
        os.killpg(procs[0].pid, signal.SIGTERM)
    else:
        procs[1].send_signal(signal.SIGUSR1)  # the ranks agree through an all-reduce
    assert wait_group(procs) == [0, 0], log.read_text()[-3000:]
    text = log.read_text()
    stopped = int(re.findall(r"stop requested: saved at step (\d+)", text)[-1])
    assert seen <= stopped <= seen + 3, (seen, stopped)
    assert latest_name(run) == f"step-{stopped:06d}"
    assert max(steps_logged(log)) == stopped and not hidden(run)
    assert (run / f"step-{stopped:06d}" / "deepspeed" / "state").is_dir()


def test_sft_stops_on_sigterm(task_base: Path, tmp_path: Path) -> None:
    import subprocess

    from stagerun import launch_command, stage_env

    run = tmp_path / "sft"
    cmd = launch_command(
        "python",
        1,
        "finetune/sft.py",
        [
            f"--init_from={task_base}",
            f"--run_dir={run}",
            "--data.num_train=400",
            "--data.num_heldout=8",
            "--data.seq_len=64",
            "--train.steps=400",
            "--train.global_batch_size=8",
            "--train.micro_batch_size=8",
            "--train.eval_every=0",
            "--train.save_every=1000",
            "--tracking.log_every=1",
        ],
    )
    log = tmp_path / "sft.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=stage_env(), stdout=out, stderr=subprocess.STDOUT)
    wait_for(lambda: len(steps_logged(log)) >= 2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    stopped = int(
        re.findall(r"stop requested: saved at step (\d+); resume with", log.read_text())[-1]
    )
    assert latest_name(run) == f"step-{stopped:06d}" and 2 <= stopped < 400
