"""SLURM for real: a one-node cluster (the distribution's slurmctld and slurmd, started in a
temp dir) runs the project's own launch/slurm/pretrain.sbatch. A two-process pretraining job
completes with a committed checkpoint; a second one is told to stop the way SLURM warns before
a time limit (USR1 to the batch shell), checkpoints, requeues itself and resumes where it
stopped; the same warning to a run that is already complete does not requeue it. Skipped where
slurmctld is not installed (.ci/run installs it)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmforge.checkpoint import read_json, resolve_checkpoint, verify_files

REPO = Path(__file__).resolve().parents[1]
SBATCH = "launch/slurm/pretrain.sbatch"
# The daemons live in sbin, which is not on every PATH.
SEARCH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("slurmctld", path=SEARCH) is None, reason="slurmctld is not installed"
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="slurmd must run as root"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _slurm_conf(root: Path, host: str) -> str:
    """A one-node cluster without munge, accounting or cgroups, everything under `root`.

    cred_expire=5 and sched_interval=1: a requeued job may start again after 5 s instead of
    120 s, and the main scheduling loop (which starts it) runs every second instead of 60 s.
    """
    return f"""\
ClusterName=lmforge-test
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/none
AuthInfo=cred_expire=5
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=3600
FirstJobId={1000 + os.getpid() % 50000}
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """slurmctld + slurmd on this host, configured and logging under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        for sub in ("state", "spool", "log", "out"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.conf = root / "slurm.conf"
        self.conf.write_text(_slurm_conf(root, self.host))
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.daemons: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        """Start both daemons in the foreground (children of the test) and wait for the node."""
        for name, extra in (("slurmctld", ["-i"]), ("slurmd", [])):
            binary = shutil.which(name, path=SEARCH) or name
            with open(self.root / "log" / f"{name}.stdout", "wb") as log:
                self.daemons.append(
                    subprocess.Popen(
                        [binary, "-D", "-f", str(self.conf), *extra],
                        env=self.env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = self.cmd("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.strip()
            if out == "idle":
                return
            time.sleep(0.5)
        raise AssertionError(f"the node never became idle (sinfo: {out!r})\n{self.logs()}")

    def stop(self) -> None:
        """Cancel what still runs, then stop both daemons."""
        if self.daemons and self.daemons[0].poll() is None:
            self.cmd("scancel", "--user", "root", check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.cmd("squeue", "-h", check=False).stdout:
                time.sleep(0.5)
        for proc in reversed(self.daemons):
            proc.terminate()
        for proc in self.daemons:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a SLURM client command against this cluster."""
        proc = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=30)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)}: {proc.stdout}{proc.stderr}\n{self.logs()}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.cmd("scontrol", "show", "job", "-o", job_id).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait(self, job_id: str, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        """Poll until the job reaches one of `states`; fail with every log on timeout."""
        deadline = time.monotonic() + timeout
        info = self.job(job_id)
        while info["JobState"] not in states:
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} stuck in {info}\n{self.logs(job_id)}")
            time.sleep(0.5)
            info = self.job(job_id)
        return info

    def logs(self, job_id: str | None = None) -> str:
        """The daemons' logs and the job's output, for failure messages."""
        files = sorted((self.root / "log").iterdir())
        if job_id is not None:
            files.append(self.root / "out" / f"job-{job_id}.out")  # see output()
        parts = [
            f"==== {f.name}\n{f.read_text(errors='replace')[-6000:]}" for f in files if f.exists()
        ]
        return "\n".join(parts)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


TINY = """\
model: debug
tokenizer: {vocab_size: 512}
data: {source: builtin, max_documents: 400, seq_len: 64, cache_dir: CACHE}
optim: {lr: 3.0e-3, warmup_steps: 2}
train: {global_batch_size: 8, micro_batch_size: 4, eval_every: 0, eval_batches: 2,
        save_every: 1000, samples: 0}
tracking: {log_every: 1}
"""


def submit(cluster: Cluster, name: str, *overrides: str) -> tuple[str, Path]:
    """sbatch the project's pretrain script: one node, two processes, on CPU."""
    run_dir = cluster.root / "runs" / name
    config = cluster.root / "tiny.yaml"
    config.write_text(TINY.replace("CACHE", str(cluster.root / "cache")))
    env = dict(
        cluster.env,
        CONFIG=str(config),
        OVERRIDES=f"--run_dir={run_dir}",
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    try:
        socket.gethostbyname(cluster.host)
    except OSError:  # the node's name does not resolve here: rendezvous on loopback
        env["MASTER_ADDR"] = "127.0.0.1"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        "sbatch",
        "--parsable",
        f"--job-name={name}",
        "--nodes=1",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        "--gpus-per-node=0",
        f"--output={cluster.root}/out/job-%j.out",
        SBATCH,
        *overrides,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30, cwd=REPO)
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\n{cluster.logs()}"
    return proc.stdout.strip().split(";")[0], run_dir


def metric_steps(run_dir: Path) -> list[int]:
    """The step of every training record in metrics.jsonl, in file order."""
    file = run_dir / "metrics.jsonl"
    if not file.exists():
        return []
    records = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return [r["step"] for r in records if "loss" in r]


def committed_step(run_dir: Path) -> tuple[int, Path]:
    """The step of run_dir/latest, after checking that its files are all there and intact."""
    ckpt = resolve_checkpoint(run_dir)
    meta = read_json(ckpt / "lmforge.json")
    assert (ckpt / "model.safetensors").is_file()
    verify_files(ckpt, meta)
    return int(meta["step"]), ckpt


DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def output(cluster: Cluster, job_id: str) -> str:
    """The job's output file (every start appends to it)."""
    file = cluster.root / "out" / f"job-{job_id}.out"
    return file.read_text(errors="replace") if file.exists() else ""


@pytest.fixture(scope="module")
def finished(cluster: Cluster) -> tuple[str, Path, dict[str, str]]:
    """A four-step two-process pretraining job, run to the end: job id, run_dir, final state."""
    job_id, run_dir = submit(cluster, "plain", "--train.steps=4")
    return job_id, run_dir, cluster.wait(job_id, DONE, timeout=150)


def test_two_process_pretraining_job_completes_with_a_checkpoint(
    cluster: Cluster, finished: tuple[str, Path, dict[str, str]]
) -> None:
    job_id, run_dir, info = finished
    assert info["JobState"] == "COMPLETED", cluster.logs(job_id)
    assert info["Restarts"] == "0"
    step, ckpt = committed_step(run_dir)
    assert (step, ckpt.name) == (4, "step-000004")
    assert metric_steps(run_dir) == [1, 2, 3, 4]
    assert "2 process(es)" in output(cluster, job_id)


def test_a_warning_to_a_finished_run_does_not_requeue(
    cluster: Cluster, finished: tuple[str, Path, dict[str, str]]
) -> None:
    _, run_dir, _ = finished
    job_id, same_dir = submit(cluster, "plain", "--train.steps=4")
    assert same_dir == run_dir
    deadline = time.monotonic() + 60
    while f"lmforge job {job_id} (restart 0)" not in output(cluster, job_id):  # trap is set
        assert time.monotonic() < deadline, cluster.logs(job_id)
        time.sleep(0.2)
    cluster.cmd("scancel", "--batch", "--signal=USR1", job_id)
    info = cluster.wait(job_id, DONE, timeout=120)
    out = output(cluster, job_id)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "0"), cluster.logs(job_id)
    assert "the run is complete; not requeueing" in out, out
    assert committed_step(run_dir)[0] == 4
    assert metric_steps(run_dir) == [1, 2, 3, 4]


def test_usr1_checkpoints_requeues_and_resumes(cluster: Cluster) -> None:
    steps = 60
    job_id, run_dir = submit(cluster, "preempted", f"--train.steps={steps}")
    deadline = time.monotonic() + 150
    while not metric_steps(run_dir):
        assert time.monotonic() < deadline, cluster.logs(job_id)
        assert cluster.job(job_id)["JobState"] in ("PENDING", "RUNNING"), cluster.logs(job_id)
        time.sleep(0.2)
    # What --signal=B:USR1@SECS does before the time limit: USR1 to the batch shell only.
    cluster.cmd("scancel", "--batch", "--signal=USR1", job_id)
    info = cluster.wait(job_id, DONE, timeout=150)
    out = output(cluster, job_id)
    assert info["JobState"] == "COMPLETED", cluster.logs(job_id)
    assert info["Restarts"] == "1", out
    assert "requeueing to resume" in out, out

    # Only the stop and the end save (save_every is larger than the run).
    saved = sorted(int(p.name.split("-")[1]) for p in run_dir.glob("step-*"))
    assert len(saved) == 2 and saved[1] == steps, saved
    stopped = saved[0]
    assert f"stop requested: saved at step {stopped}" in out, out
    assert f"resuming from {run_dir / f'step-{stopped:06d}'}" in out, out
    # The second start continued after the stop's checkpoint instead of starting over: every
    # step was trained (and logged) exactly once.
    assert metric_steps(run_dir) == list(range(1, steps + 1))
    step, ckpt = committed_step(run_dir)
    assert (step, ckpt.name) == (steps, f"step-{steps:06d}")
