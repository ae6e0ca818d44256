"""The one loop's fault policy and the one checkpointer in the RL stages, run for real: a NaN
step of GRPO and of PPO is skipped with the weights of every engine (actor and critic) unchanged,
a run of bad steps rolls back and ends exactly where a run that only skipped them ends, and a
kill inside a PPO save leaves both engines on the previous checkpoint, from which the run
resumes to the uninterrupted run's metrics."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from stagerun import metrics, run_stage, spawn_group, wait_group

from lmforge.checkpointer import SAVE_PAUSE_ENV
from lmforge.rundir import latest_name

pytestmark = pytest.mark.slow

COMMON = [
    "--data.num_train=400",
    "--data.num_heldout=8",
    "--data.seq_len=64",
    "--train.eval_every=0",
    "--optim.warmup_steps=0",
    "--optim.weight_decay=0",
    "--optim.schedule=constant",
    "--tracking.log_every=1",
    "--max_new_tokens=8",
]
GRPO = [*COMMON, "--group_size=4", "--train.global_batch_size=16", "--train.micro_batch_size=8"]
PPO = [
    *COMMON,
    "--train.global_batch_size=16",
    "--train.micro_batch_size=8",
    "--reward_model=",
    "--rewards=[{name: 'contains:9', weight: 1.0}]",
    "--kl_coef=0.01",
    "--normalise_rewards=false",
]


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "model.safetensors")


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def events(run: Path) -> list[tuple[int, str]]:
    return [(r["step"], r["event"]) for r in metrics(run) if "event" in r]


def grpo(policy: Path, run: Path, *extra: str) -> None:
    args = [*GRPO, f"--init_from={policy}", f"--run_dir={run}", "--beta=0.04", "--optim.lr=1e-3"]
    run_stage("finetune/grpo.py", [*args, *extra])


def ppo_args(policy: Path, run: Path, *extra: str) -> list[str]:
    return [*PPO, f"--init_from={policy}", f"--critic_from={policy}", f"--run_dir={run}", *extra]


def test_grpo_nan_step_is_skipped_with_weights_unchanged(task_policy: Path, tmp_path: Path):
    run = tmp_path / "grpo"
    grpo(
        task_policy, run, "--train.steps=4", "--train.save_every=1",
        "--faults.inject_nan_at_steps=[3]", "--faults.max_consecutive=0",
    )  # fmt: skip
    assert events(run) == [(3, "skip")]
    step = {n: weights(run / f"step-{n:06d}") for n in (2, 3, 4)}
    assert same(step[2], step[3]), "the NaN step changed the weights"
    assert not same(step[3], step[4]), "the step after it did not train"
    logged = [r for r in metrics(run) if "faults/skipped" in r]
    assert logged[-1]["faults/skipped"] == 1 and logged[-1]["step"] == 4


def test_grpo_rollback_ends_where_skipping_ends(task_policy: Path, tmp_path: Path):
    """Two NaN steps in a row with max_consecutive 2 roll back to step 2 and pass over the two
    batches; the run ends bit-identical to one that only skipped them."""
    common = ("--train.steps=6", "--train.save_every=2", "--faults.inject_nan_at_steps=[3, 4]")
    skipped, rolled = tmp_path / "skipped", tmp_path / "rolled"
    grpo(task_policy, skipped, *common, "--faults.max_consecutive=0")
    grpo(task_policy, rolled, *common, "--faults.max_consecutive=2")
    assert events(rolled) == [(3, "skip"), (4, "skip"), (4, "rollback"), (3, "skip"), (4, "skip")]
    assert same(weights(skipped / "step-000006"), weights(rolled / "step-000006"))


def test_ppo_nan_step_leaves_actor_and_critic_unchanged(task_policy: Path, tmp_path: Path):
    run = tmp_path / "ppo"
    args = ppo_args(
        task_policy, run, "--optim.lr=1e-3", "--train.steps=3", "--train.save_every=1",
        "--faults.inject_nan_at_steps=[2]", "--faults.max_consecutive=0",
    )  # fmt: skip
    run_stage("finetune/ppo.py", args)
    assert events(run) == [(2, "skip")]
    for where in (run, run / "critic"):
        one, two, three = (weights(where / f"step-{n:06d}") for n in (1, 2, 3))
        assert same(one, two), f"{where}: the NaN step changed the weights"
        assert not same(two, three), f"{where}: the step after it did not train"


def test_ppo_rollback_ends_where_skipping_ends(task_policy: Path, tmp_path: Path):
    common = ("--optim.lr=1e-3", "--train.steps=5", "--faults.inject_nan_at_steps=[2, 3]")
    skipped, rolled = tmp_path / "skipped", tmp_path / "rolled"
    run_stage("finetune/ppo.py", ppo_args(task_policy, skipped, *common, "--train.save_every=1"))
    args = ppo_args(task_policy, rolled, *common, "--train.save_every=1")
    run_stage("finetune/ppo.py", [*args, "--faults.max_consecutive=2"])
    assert [e for _, e in events(rolled)] == ["skip", "skip", "rollback", "skip", "skip"]
    for sub in ("", "critic"):
        a, b = skipped / sub / "step-000005", rolled / sub / "step-000005"
        assert same(weights(a), weights(b)), f"{sub or 'actor'} differs"


def test_kill_inside_ppo_save_leaves_both_engines_on_the_previous_checkpoint(
    task_policy: Path, tmp_path: Path
) -> None:
    """SIGKILL while the actor's save of step 3 is in progress (the critic's step 3 is already
    written): `latest` stays at step 2, the resumed run loads actor and critic of step 2 and
    ends with the uninterrupted run's metrics."""
    extra = ("--optim.lr=1e-3", "--train.steps=4", "--train.save_every=1", "--adaptive_kl=true")
    whole, run = tmp_path / "whole", tmp_path / "killed"
    run_stage("finetune/ppo.py", ppo_args(task_policy, whole, *extra))
    procs = spawn_group(
        "finetune/ppo.py", ppo_args(task_policy, run, *extra), nproc=1,
        log_dir=tmp_path / "logs", env={SAVE_PAUSE_ENV: "5"},
    )  # fmt: skip
    partial = run / ".step-000003.partial"
    deadline = time.monotonic() + 600
    while not (partial.is_dir() and (run / "critic" / "step-000003").is_dir()):
        assert time.monotonic() < deadline and procs[0].poll() is None, "no save of step 3 seen"
        time.sleep(0.05)
    os.killpg(procs[0].pid, signal.SIGKILL)
    wait_group(procs)
    assert latest_name(run) == "step-000002"
    out = run_stage("finetune/ppo.py", ppo_args(task_policy, run, *extra)).stdout
    assert re.search(r"^resume: step 2 from \S+step-000002 via ", out, re.M), out
    assert not list(run.glob(".*partial")) and latest_name(run) == "step-000004"
    a = {r["step"]: r for r in metrics(whole) if "reward" in r}
    b = {r["step"]: r for r in metrics(run) if "reward" in r}  # steps 3-4 logged again
    for key in ("reward", "loss", "value_loss", "kl", "kl_coef"):
        assert b[4][key] == pytest.approx(a[4][key], abs=1e-6), key
    assert same(weights(whole / "critic" / "step-000004"), weights(run / "critic" / "step-000004"))


def test_ppo_stopped_on_two_processes_resumes_on_one(task_policy: Path, tmp_path: Path):
    """Rollouts are seeded per sample, not per process, so a PPO run stopped on 2 processes
    and resumed on 1 (actor and critic re-sharded from their whole fp32 state) logs the
    uninterrupted 2-process run's metrics."""
    extra = ("--optim.lr=1e-3", "--train.steps=4", "--train.save_every=1000", "--adaptive_kl=true")
    whole, split = tmp_path / "whole", tmp_path / "split"
    two = {"nproc": 2, "launcher": "torchrun"}
    run_stage("finetune/ppo.py", ppo_args(task_policy, whole, *extra), **two)  # type: ignore[arg-type]
    stop = ppo_args(task_policy, split, *extra, "--train.stop_at=2")
    run_stage("finetune/ppo.py", stop, **two)  # type: ignore[arg-type]
    out = run_stage("finetune/ppo.py", ppo_args(task_policy, split, *extra)).stdout
    assert "re-sharded from 2 process(es), ZeRO-2 to 1 process(es), ZeRO-2" in out, out
    a = {r["step"]: r for r in metrics(whole) if "reward" in r}
    b = {r["step"]: r for r in metrics(split) if "reward" in r}
    keys = ("reward", "loss", "value_loss", "kl", "kl_coef", "response_length")
    worst = max(abs(b[step][k] - a[step][k]) for step in (3, 4) for k in keys)
    print(f"PPO 2 -> 1 processes: max |metric difference| at steps 3-4 = {worst:.2e}")
    for step in (1, 2, 3, 4):
        for key in keys:
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-5), (step, key)
