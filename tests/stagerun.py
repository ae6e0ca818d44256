"""Run a stage script in subprocesses the way users do: plain python, torchrun, deepspeed or
accelerate launch, on CPU with gloo."""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port no one listens on now: the rendezvous port of one launch. Asked of the kernel,
    so that test workers running side by side never pick the same one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stage_env() -> dict[str, str]:
    """The environment of a CPU stage run, without any launcher variables of our own."""
    env = dict(os.environ)
    # An inherited path stays after the repository: on a machine whose packages come from a
    # folder of carried wheels (the GPU check), DeepSpeed is found only through it.
    path = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONPATH=path,
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def launch_command(launcher: str, nproc: int, script: str, args: list[str]) -> list[str]:
    """The command line that starts `script` with `nproc` processes under `launcher`."""
    port, path = free_port(), str(REPO / script)
    if launcher == "python":
        return [sys.executable, path, *args]
    if launcher == "torchrun":
        return [
            str(BIN / "torchrun"),
            f"--nproc_per_node={nproc}",
            f"--master_port={port}",
            path,
            *args,
        ]
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), f"--num_gpus={nproc}", f"--master_port={port}", path, *args]
    if launcher == "accelerate":
        return [
            str(BIN / "accelerate"),
            "launch",
            "--cpu",
            f"--num_processes={nproc}",
            f"--main_process_port={port}",
            path,
            *args,
        ]
    raise ValueError(launcher)


def run_stage(
    script: str, args: list[str], *, nproc: int = 1, launcher: str = "python", check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a stage to completion; with check, a failure shows its output."""
    cmd = launch_command(launcher, nproc, script, args)
    proc = subprocess.run(
        cmd, env=stage_env(), capture_output=True, text=True, timeout=900, cwd=REPO
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def plain_transformers(script: str, job: dict, cwd: Path) -> dict:
    """Run `script` (Python reading a JSON job from sys.argv[1]) in a new process, the way a
    user of plain transformers would, and return the JSON object it prints last. That object's
    `lmforge_imported` must be false: the process never imported lmforge."""
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(job)],
        capture_output=True,
        text=True,
        cwd=cwd,  # nothing of the repository importable from the working directory
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["lmforge_imported"] is False, "the plain-transformers process imported lmforge"
    return report


def metrics(run_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss by step."""
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def final_metrics(run_dir: Path) -> dict:
    """The metrics stored in the run's latest checkpoint."""
    latest = (run_dir / "latest").read_text().strip()
    return json.loads((run_dir / latest / "lmforge.json").read_text())["metrics"]


def spawn_group(
    script: str, args: list[str], *, nproc: int, log_dir: Path, env: dict[str, str] | None = None
) -> list[subprocess.Popen[bytes]]:
    """Start `nproc` ranks of `script` the way srun does (RANK, WORLD_SIZE, ... in the
    environment, no launcher process), all in one new process group, so that one os.killpg
    reaches every rank. Rank r writes its output to log_dir/rank{r}.log."""
    base = {**stage_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    base.update(env or {})
    procs: list[subprocess.Popen[bytes]] = []
    log_dir.mkdir(parents=True, exist_ok=True)
    for rank in range(nproc):
        rank_env = {
            **base,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
        }
        with open(log_dir / f"rank{rank}.log", "wb") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(REPO / script), *args],
                    env=rank_env,
                    cwd=REPO,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=functools.partial(os.setpgid, 0, procs[0].pid if procs else 0),
                )
            )
    return procs


def wait_group(procs: list[subprocess.Popen[bytes]], timeout: float = 600) -> list[int]:
    """Wait for every rank; their exit codes."""
    return [p.wait(timeout=timeout) for p in procs]


def tiny_pretrain_args(run_dir: Path, cache: Path, *, steps: int, save_every: int) -> list[str]:
    """Overrides of a seconds-long pretraining run of the `debug` preset on the builtin corpus
    (400 documents, 64-token rows, 8 rows per step in micro-batches of 4), logging every step."""
    return [
        "--model=debug",
        "--tokenizer.vocab_size=512",
        "--data.source=builtin",
        "--data.max_documents=400",
        "--data.seq_len=64",
        f"--data.cache_dir={cache}",
        f"--train.steps={steps}",
        "--train.global_batch_size=8",
        "--train.micro_batch_size=4",
        "--train.eval_every=0",
        "--train.eval_batches=2",
        f"--train.save_every={save_every}",
        "--train.samples=0",
        "--optim.lr=3e-3",
        "--optim.warmup_steps=2",
        "--tracking.log_every=1",
        f"--run_dir={run_dir}",
    ]
