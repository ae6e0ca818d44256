"""A run directory has one writer and holds only what its run wrote: a second run on it is
refused while the first holds its lock (on every rank of a multi-process run), a lock left by a
killed run is taken over and the resume is exact, a folder lmforge did not make is refused and
nothing of the user's is ever deleted, `latest` names only the run's own checkpoints, and a
resumed run keeps its before-training evaluation. Real stage runs: subprocesses where processes
matter (a concurrent run, a SIGKILL, two ranks), the entry point in-process otherwise."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from stagerun import (
    BIN,
    REPO,
    launch_command,
    losses,
    run_stage,
    spawn_group,
    stage_env,
    tiny_pretrain_args,
    wait_group,
)

from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.checkpointer import SAVE_PAUSE_ENV
from lmforge.errors import CheckpointError
from lmforge.model import build_model
from lmforge.rundir import latest_name
from lmforge.runlock import LOCK_FILE, acquire

STEPS, SAVE_EVERY = 6, 3
HOST = socket.gethostname()


def pretrain_args(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    """A seconds-long pretraining run: 6 steps, checkpoints after steps 3 and 6."""
    return [*tiny_pretrain_args(run_dir, cache, steps=STEPS, save_every=SAVE_EVERY), *extra]


@contextlib.contextmanager
def process_state() -> Iterator[None]:
    """An in-process stage starts a (1-process) process group and exports launcher variables:
    undo both afterwards."""
    env = dict(os.environ)
    try:
        yield
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(env)


@pytest.fixture(autouse=True)
def _clean_process_state() -> Iterator[None]:
    with process_state():
        yield


def run_main(module: str, args: list[str]) -> tuple[int, str, str]:
    """Run a stage's main(argv) in this process; (exit code, stdout, stderr)."""
    main = __import__(module, fromlist=["main"]).main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def one_error(code: int, err: str, *needles: str) -> str:
    """The single `error:` line of a failed entry point, after checking what it must hold."""
    assert code != 0, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under folder with its mtime and size."""
    return {
        str(p.relative_to(folder)): (p.lstat().st_mtime_ns, p.lstat().st_size)
        for p in sorted(folder.rglob("*"))
    }


def wait_for(predicate: Callable[[], object], proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended first (exit {proc.returncode})")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """pretrain/train.py as one plain python process, its output in `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            launch_command("python", 1, "pretrain/train.py", args),
            env={**stage_env(), **env},
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / str(latest_name(run_dir)) / "model.safetensors")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rundir")


@pytest.fixture(scope="module")
def cache(root: Path) -> Path:
    return root / "cache"


# -- one writer -------------------------------------------------------------------------------


USER_FILES = {
    ".bashrc.old": "alias ll='ls -l'\n",
    "project/.settings.old": "theme=dark\n",
    "project/.thesis.partial/file": "chapter 1\n",
    "notes.txt": "mine\n",
}


def user_folder(folder: Path) -> Path:
    """A folder of the user's, with names the old start-up clean-up deleted."""
    for name, text in USER_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


@pytest.fixture(scope="module")
def concurrent(root: Path, cache: Path) -> SimpleNamespace:
    """Run A trains in a user's folder, allowed by allow_foreign_run_dir (each save held 2 s by
    the test hook so that the run lasts); once it holds the folder, run B starts on it, in this
    process."""
    import deepspeed  # noqa: F401  (imported before A starts: B must not lag behind A)

    from pretrain.train import main  # noqa: F401

    run = user_folder(root / "home")
    mine = snapshot(run)
    log = root / "a.log"
    args = pretrain_args(run, cache, "--allow_foreign_run_dir=true")
    first = start(args, log, {SAVE_PAUSE_ENV: "4"})
    wait_for(lambda: (run / "config.yaml").exists(), first)  # past its lock
    holder = (run / LOCK_FILE).read_text()
    config_before = (run / "config.yaml").stat().st_mtime_ns
    with process_state():
        code, _, err = run_main("pretrain.train", args)
    a_running = first.poll() is None
    config_after = (run / "config.yaml").stat().st_mtime_ns
    first.wait(timeout=600)
    return SimpleNamespace(
        run=run, first=first, log=log, holder=holder, code=code, err=err, mine=mine,
        a_running=a_running, config_unchanged=config_before == config_after,
    )  # fmt: skip


def test_a_second_run_on_a_held_run_dir_is_refused(concurrent: SimpleNamespace) -> None:
    c = concurrent
    line = one_error(c.code, c.err, str(c.run), "in use by another run")
    assert f"host {HOST}, pid {c.first.pid}" in line, line  # A held the lock when B started
    assert c.a_running
    assert str(c.first.pid) in c.holder and HOST in c.holder
    assert c.config_unchanged  # B wrote nothing: not even its config
    assert c.first.returncode == 0, c.log.read_text()[-3000:]
    steps = [int(s) for s in re.findall(r'"step": (\d+)', (c.run / "metrics.jsonl").read_text())]
    assert sorted(set(steps)) == list(range(1, STEPS + 1))
    assert steps == sorted(steps)  # one writer: records in order, none from a second run
    assert latest_name(c.run) == f"step-{STEPS:06d}"
    assert not (c.run / LOCK_FILE).exists()  # released at A's exit


def test_a_killed_runs_lock_is_taken_over_and_the_resume_is_exact(
    concurrent: SimpleNamespace, root: Path, cache: Path
) -> None:
    run = root / "killed"
    proc = start(pretrain_args(run, cache), root / "killed.log", {SAVE_PAUSE_ENV: "5"})
    partial = run / f".step-{STEPS:06d}.partial"
    # Inside the last save, held before its commit: the step 3 checkpoint is complete.
    wait_for(lambda: (partial / "model.safetensors").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert f'"pid": {proc.pid}' in (run / LOCK_FILE).read_text()  # left behind
    assert latest_name(run) == f"step-{SAVE_EVERY:06d}" and partial.is_dir()

    proc_out = run_stage("pretrain/train.py", pretrain_args(run, cache))
    out = proc_out.stdout
    assert f"taking over the lock of a run that ended without releasing it (host {HOST}, " in out
    assert f"pid {proc.pid}, " in out
    assert f"removed what interrupted saves left: {partial.name}" in out
    assert f"resume: step {SAVE_EVERY} from {run / f'step-{SAVE_EVERY:06d}'}" in out
    assert losses(run) == losses(concurrent.run)  # every step, the resumed ones included
    ours, ref = weights(run), weights(concurrent.run)
    assert all(torch.equal(ours[k], ref[k]) for k in ref) and ours.keys() == ref.keys()
    assert not (run / LOCK_FILE).exists() and not partial.exists()


def test_every_rank_refuses_a_run_dir_another_run_holds(root: Path, cache: Path) -> None:
    run = root / "held"
    run.mkdir()
    lock = acquire(run)  # this test process is the other run
    assert lock is not None
    try:
        before = snapshot(run)
        procs = spawn_group(
            "pretrain/train.py", pretrain_args(run, cache), nproc=2, log_dir=root / "held-logs"
        )
        codes = wait_group(procs, timeout=300)  # no rank waits for the others: no hang
        assert snapshot(run) == before
    finally:
        lock.release()
    for rank, code in enumerate(codes):
        text = (root / "held-logs" / f"rank{rank}.log").read_text()
        line = one_error(code, text, str(run), f"host {HOST}, pid {os.getpid()}")
        assert line.startswith("error:" if rank == 0 else f"error (rank {rank}):"), line
    assert not run.exists() or not any(run.iterdir())


# -- user files ---------------------------------------------------------------------------------


def test_a_user_folder_is_refused_and_nothing_of_the_users_is_deleted(
    tmp_path: Path, cache: Path, concurrent: SimpleNamespace
) -> None:
    folder = user_folder(tmp_path / "home")
    before = snapshot(folder)
    code, _, err = run_main("pretrain.train", pretrain_args(folder, cache))
    one_error(code, err, str(folder), "not made by lmforge", "allow_foreign_run_dir")
    assert snapshot(folder) == before
    # Allowed (run A of the concurrent runs): the run trained there, and everything of the
    # user's is still there, untouched.
    run = concurrent.run
    assert concurrent.first.returncode == 0 and latest_name(run) == f"step-{STEPS:06d}"
    assert {k: v for k, v in snapshot(run).items() if k in concurrent.mine} == concurrent.mine
    assert {n: (run / n).read_text() for n in USER_FILES} == USER_FILES


def test_empty_run_dir_is_an_error(cache: Path) -> None:
    args = [a for a in pretrain_args(Path("x"), cache) if not a.startswith("--run_dir=")]
    code, _, err = run_main("pretrain.train", [*args, "--run_dir="])
    one_error(code, err, "run_dir: empty")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_run_dir_is_one_line(tmp_path: Path, cache: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("run_dir: run\n")
    run.chmod(0o555)
    try:
        before = snapshot(run)
        code, _, err = run_main("pretrain.train", pretrain_args(run, cache))
        one_error(code, err, str(run), "read-only")
        assert snapshot(run) == before
    finally:
        run.chmod(0o755)


# Mounts the run directory read-only in a private mount namespace, then runs the stage there:
# the same refusal as a directory without write permission, and it holds for root too (root
# ignores permission bits, not a read-only mount). Exit 97: mounting is not allowed here.
_READ_ONLY = """
mount --bind "$RUN" "$RUN" && mount -o remount,bind,ro "$RUN" || exit 97
exec "$PY" pretrain/train.py "$@"
"""


def test_read_only_mount_as_run_dir_is_one_line(tmp_path: Path, cache: Path) -> None:
    if not shutil.which("unshare"):
        pytest.skip("needs unshare for a private read-only mount")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("run_dir: run\n")
    before = snapshot(run)
    env = {**stage_env(), "RUN": str(run), "PY": sys.executable}
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", _READ_ONLY, "ro"]
    proc = subprocess.run(
        [*cmd, *pretrain_args(run, cache)], env=env, cwd=REPO, capture_output=True, text=True
    )
    if proc.returncode == 97 or "unshare:" in proc.stderr:
        pytest.skip(f"no private read-only mount here: {proc.stderr.strip()[-200:]}")
    one_error(proc.returncode, proc.stderr, str(run), "read-only")
    assert snapshot(run) == before


# -- latest -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_run(root: Path) -> Path:
    """Another run's complete checkpoint, which a bad `latest` could lead to."""
    from conftest import small_config

    ckpt = root / "other" / "step-000004"
    save_checkpoint(ckpt, build_model(small_config(), seed=0), update_latest=True, step=4)
    return ckpt


LATEST_CASES = [
    ("parent path", lambda other: b"../other/step-000004\n", "is a path"),
    ("absolute path", lambda other: str(other).encode(), "is a path"),
    ("binary bytes", lambda other: b"\xff\xfe\x00step\x9c", "binary bytes"),
    ("missing step", lambda other: b"step-000004\n", "not a checkpoint in"),
]


@pytest.mark.parametrize(
    ("make", "needle"), [c[1:] for c in LATEST_CASES], ids=[c[0] for c in LATEST_CASES]
)
def test_latest_names_only_a_checkpoint_of_its_own_run(
    root: Path, other_run: Path, cache: Path, tmp_path: Path, make: Callable, needle: str
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("run_dir: run\n")
    (run / "latest").write_bytes(make(other_run))
    before = snapshot(run)
    code, _, err = run_main("pretrain.train", pretrain_args(run, cache))
    one_error(code, err, str(run / "latest"), needle)
    assert snapshot(run) == before
    with pytest.raises(CheckpointError) as e:  # the library's readers say the same
        load_checkpoint(run)
    assert str(run / "latest") in str(e.value) and "\n" not in str(e.value)


def test_a_run_continues_only_its_own_stage(task_base: Path, tmp_path: Path) -> None:
    run = tmp_path / "sft"
    shutil.copytree(task_base, run)  # a pretraining checkpoint where an SFT run's would be
    before = snapshot(run)
    code, _, err = run_main("finetune.sft", [*SFT, f"--init_from={task_base}", f"--run_dir={run}"])
    one_error(code, err, "a pretrain checkpoint", "this is a sft run", "init_from=")
    assert snapshot(run) == before


# -- before-training metrics survive a resume ----------------------------------------------------

SFT = [
    "--data.num_train=64",
    "--data.num_heldout=6",
    "--data.seq_len=64",
    "--train.steps=4",
    "--train.global_batch_size=8",
    "--train.micro_batch_size=8",
    "--train.eval_every=0",
    "--train.save_every=100",
    "--tracking.log_every=1",
]


def test_resumed_sft_reports_the_before_numbers_of_an_uninterrupted_run(
    task_base: Path, tmp_path: Path
) -> None:
    straight, resumed = tmp_path / "a" / "sft", tmp_path / "b" / "sft"
    script = "finetune/sft.py"
    first = [*SFT, f"--init_from={task_base}"]
    both = [
        subprocess.Popen(
            launch_command("python", 1, script, [*first, f"--run_dir={run}", *extra]),
            env=stage_env(),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for run, extra in ((straight, []), (resumed, ["--train.stop_at=2"]))
    ]
    for proc in both:
        text = proc.communicate(timeout=600)[0].decode(errors="replace")
        assert proc.returncode == 0, text[-3000:]
    out = run_stage(script, [*first, f"--run_dir={resumed}"]).stdout
    assert "resume: step 2 from" in out  # the second half was a resume
    meta = [load_checkpoint(r, with_tokenizer=False)[2]["metrics"] for r in (straight, resumed)]
    before = [{k: v for k, v in m.items() if k.startswith("eval_before/")} for m in meta]
    assert before[0] and before[0] == before[1]
    report = subprocess.run(
        [str(BIN / "lmforge"), "report", str(straight), str(resumed)],
        capture_output=True,
        text=True,
        env=stage_env(),
        timeout=300,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    rows = [line for line in report.stdout.splitlines() if str(tmp_path) in line]
    ours = [line.replace(str(straight), "RUN") for line in rows if str(straight) in line]
    theirs = [line.replace(str(resumed), "RUN") for line in rows if str(resumed) in line]
    assert ours and ours == theirs, report.stdout  # before and after, number for number
    for value in before[0].values():
        assert f"{value:.3f}" in report.stdout


def test_leftover_names_are_exactly_lmforges(tmp_path: Path) -> None:
    from lmforge.rundir import clean_leftovers

    run = tmp_path / "run"
    ours = [".step-000004.partial/x", ".step-000002.old/x", ".step-000001.deleting/x"]
    ours += [".latest.tmp", ".config.yaml.a1b2c3_d.tmp", "critic/.step-000004.partial/x"]
    theirs = [".bashrc.old", ".x.partial/f", "project/.settings.old", "project/.step-1.partial/f"]
    theirs += [".step-.partial/f", ".latest.tmp.bak", "deep/critic/.step-000004.partial/x"]
    for name in ours + theirs:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    removed = clean_leftovers(run)
    assert sorted(removed) == sorted({n.split("/x")[0] for n in ours}), removed
    assert all((run / n).exists() for n in theirs)
    assert not any((run / n).exists() for n in ours)
