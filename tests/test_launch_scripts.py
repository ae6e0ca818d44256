"""The launch scripts: every one parses (bash -n) and passes shellcheck, and launch/local.sh
really starts two processes of a stage on a machine without CUDA."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    p for p in (REPO / "launch").rglob("*") if p.is_file() and p.suffix in (".sh", ".sbatch")
)


def test_there_are_scripts() -> None:
    names = {p.relative_to(REPO).as_posix() for p in SCRIPTS}
    assert {
        "launch/local.sh",
        "launch/slurm/job.sh",
        "launch/slurm/pretrain.sbatch",
        "launch/slurm/finetune.sbatch",
    } <= names
    for script in SCRIPTS:
        assert script.read_text().startswith("#!/usr/bin/env bash\n"), script
        assert os.access(script, os.X_OK), f"{script} is not executable"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_bash_parses(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_shellcheck_is_clean(script: Path) -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    proc = subprocess.run(
        ["shellcheck", "--shell=bash", "--external-sources", str(script)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hostfile_example_parses_as_deepspeed_reads_it() -> None:
    from deepspeed.launcher.runner import _parse_hostfile

    lines = (REPO / "launch" / "hostfile.example").read_text().splitlines()
    pool = _parse_hostfile(lines)
    assert len(pool) >= 2 and all(slots > 0 for slots in pool.values()), pool


@pytest.mark.slow
def test_local_launch_starts_two_cpu_processes_with_the_arguments() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "RANK")}
    env.update(
        PYTHON=sys.executable,
        NPROC_PER_NODE="2",
        MASTER_PORT=str(29800 + os.getpid() % 1000),
        CUDA_VISIBLE_DEVICES="",
    )
    proc = subprocess.run(
        [
            "launch/local.sh",
            "pretrain/train.py",
            "--model=debug",
            "--data.seq_len=64",
            "--train.steps=7",
            "--dry-run",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es) of pretrain/train.py with deepspeed (CPU)" in proc.stderr
    assert proc.stdout.count("# parameters:") == 2, proc.stdout[-3000:]
    assert proc.stdout.count("  steps: 7\n") == 2
