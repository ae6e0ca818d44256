"""The launch scripts (and bench/*.sh): every one parses (bash -n) and passes shellcheck,
launch/local.sh really starts two processes of a stage on a machine without CUDA, and
launch/slurm/job.sh forwards SIGTERM and SIGUSR1 and exits 0 after the stage's clean stop
(stand-ins for srun and scontrol; tests/test_slurm.py runs the real thing where SLURM is
installed). What local.sh does with signals is in tests/test_launcher_signals.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    [p for p in (REPO / "launch").rglob("*") if p.is_file() and p.suffix in (".sh", ".sbatch")]
    + list((REPO / "bench").glob("*.sh"))
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


# -- launch/slurm/job.sh's signal handling, with stand-ins for srun, scontrol and the stage -----

FAKE_SRUN = """#!/usr/bin/env bash
while [[ $1 == --* ]]; do shift; done  # srun's own options
exec "$@"  # one task: it gets the signals job.sh sends srun (real srun forwards them)
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case $1 in
  show) echo localhost ;;
  requeue) echo "requeue $2" >>"$SCONTROL_LOG" ;;
esac
"""
# A stage: with --dry-run prints a resolved config; otherwise "trains" until SIGTERM or SIGUSR1,
# then "saves" and exits 0, as lmforge's stages do at the next step boundary.
FAKE_STAGE = """
import signal, sys, time
if "--dry-run" in sys.argv:
    run_dir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--run_dir="))
    print(f"run_dir: {run_dir}\\ntrain:\\n  steps: 5")
    sys.exit(0)
stop = []
signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
signal.signal(signal.SIGUSR1, lambda s, f: stop.append(s))
print("training", flush=True)
while not stop:
    time.sleep(0.02)
print(f"saved after {signal.Signals(stop[0]).name}", flush=True)
"""


@pytest.mark.parametrize("sig", ["TERM", "USR1"])
def test_slurm_job_forwards_a_stop_signal_and_exits_zero_after_the_save(
    tmp_path: Path, sig: str
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "stage.py").write_text(FAKE_STAGE)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHON=sys.executable,
        PYTHONPATH=str(REPO),
        STAGE=str(tmp_path / "stage.py"),
        CONFIG="",
        OVERRIDES=f"--run_dir={tmp_path / 'run'}",
        SLURM_JOB_ID="77",
        SLURM_JOB_NODELIST="localhost",
        SLURM_JOB_NUM_NODES="1",
        SCONTROL_LOG=str(tmp_path / "scontrol.log"),
    )
    log = tmp_path / "job.log"
    with open(log, "wb") as out:
        job = subprocess.Popen(
            ["bash", "launch/slurm/job.sh"], env=env, cwd=REPO, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 60
        while "training" not in log.read_text():
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        job.send_signal(getattr(signal, f"SIG{sig}"))
        assert job.wait(timeout=120) == 0, log.read_text()
    finally:
        if job.poll() is None:
            job.kill()
    text = log.read_text()
    assert f"saved after SIG{sig}" in text, text
    requeued = (tmp_path / "scontrol.log").read_text() if sig == "USR1" else ""
    # USR1 (the time-limit warning) requeues a run short of train.steps; TERM never does.
    assert requeued == ("requeue 77\n" if sig == "USR1" else ""), text
