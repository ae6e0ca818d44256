"""The GPU check (`make gpu-check`, bench/gpu_check.py) before any GPU sees it: its CPU dry run
executes every step at the smallest sizes (the CUDA tests on the CPU), and its bounds hold (a
failed step skips what needs it, a hanging one is killed at its limit, the budget is never
overrun)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from stagerun import REPO, stage_env

sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # bench/ is not a package: imported from its folder


def test_cpu_dry_run_runs_every_step(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    job = subprocess.run(
        ["make", "-s", "gpu-check", f"GPU_CHECK_ARGS=--cpu-dry-run --out {out}"],
        cwd=REPO,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    names = [s.name for s in gpu_check.plan(out, dry=True)]
    assert list(summary["steps"]) == names and summary["dry_run"]
    assert all(r["status"] == "ok" for r in summary["steps"].values()), summary
    assert all((out / "logs" / f"{n}.log").stat().st_size > 0 for n in names)
    assert (
        (out / "check.log")
        .read_text()
        .splitlines()[-1]
        .startswith(f"gpu check: {len(names)}/{len(names)} steps ok")
    )
    # the CUDA tests ran their checks on the CPU, none skipped
    tests = (out / "logs" / "pytest_gpu.log").read_text().strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ passed in [\d.]+s", tests), tests
    env = json.loads((out / "env.json").read_text())
    assert env["device"] == "cpu" and env["torch"]
    loads = (out / "logs" / "hf_load.log").read_text()
    for stage in ("pretrain", "sft", "reward", "dpo", "grpo", "ppo"):
        assert f"{stage}: step-000002 loads in transformers" in loads
    train = json.loads((out / "bench" / "train-7b-offload.json").read_text())["train"]
    assert train["shape"]["offload_optimizer"] and train["shape"]["activation_checkpointing"]
    assert train["loss_check"]["passed"]  # same first loss as transformers' Llama
    gen = json.loads((out / "bench" / "generate-124m.json").read_text())["generate"]
    assert gen["greedy_check"]["passed"] and gen["lmforge"]["new_tokens_per_s"] > 0


def test_steps_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_check, "MIN_STEP_SECONDS", 1.0)
    py = [sys.executable, "-c"]
    steps = [
        gpu_check.Step("fine", [*py, "print('hello')"], 30),
        gpu_check.Step("broken", [*py, "raise SystemExit(3)"], 30),
        gpu_check.Step("after_broken", [*py, "pass"], 30, needs=["broken"]),
        gpu_check.Step("hangs", [*py, "import time; time.sleep(60)"], 30),
        gpu_check.Step("too_late", [*py, "pass"], 30),
    ]
    summary = gpu_check.run_all(steps, tmp_path, budget=3.0, dry=True)["steps"]
    assert summary["fine"]["status"] == "ok" and summary["broken"] == {
        **summary["broken"],
        "status": "failed",
        "rc": 3,
    }
    assert summary["after_broken"] == {"status": "skipped", "why": "needs broken"}
    # killed when the budget ran out, long before its own limit
    assert summary["hangs"]["status"] == "timeout" and summary["hangs"]["limit"] < 3.0
    assert summary["too_late"]["status"] == "skipped" and "budget" in summary["too_late"]["why"]
    assert "hello" in (tmp_path / "logs" / "fine.log").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == summary


def test_an_unknown_step_is_named() -> None:
    job = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--only", "env,warp_drive"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert job.returncode == 2
    assert job.stderr.startswith("--only: no step warp_drive; steps: env, pytest_gpu, ")
