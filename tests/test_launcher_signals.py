"""Signals to each launcher of a 2-process run (deepspeed, torchrun, launch/local.sh): SIGTERM,
SIGUSR1 and SIGKILL to the launcher process, mid-run. In every case every process of the run is
gone soon after, the ranks stopped together at a step boundary (through a signal that reached
them, or because they noticed their launcher died), and the launcher's exit status is the one
the README's table states.

The matrix runs the real launchers with light ranks (`LIGHT_RANK`: the real StopFlag and its
all-reduce over gloo, 50 ms steps, no model), so nine launches fit the time budget. A real
2-process pretraining checks the orphan path end to end: an orphan left by a killed torchrun
saves a real checkpoint at a step boundary and stops, and the run resumes in the same run
directory to its final step (what a forwarded SIGTERM does to a real run is
tests/test_crash.py's). Stand-in launchers (no torch) check the watchdog itself."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from stagerun import REPO, free_port, launch_command, stage_env, tiny_pretrain_args

from lmforge.watchdog import ranks_below

STEPS = 20000  # never reached: a run stops at the signal (a lost signal fails the time bound)
BOUND = 90.0  # seconds from the signal until every process of the run is gone (busy 2 cores)
STOP_LINE = re.compile(r"^(.+): saved at step (\d+); resume with resume: auto$", re.M)
ORPHAN = re.compile(r"launcher \S+ \(pid \d+\) exited")

# launcher, signal -> (exit status of the signalled launcher, why the ranks stopped). ORPHAN:
# the signal never reached the ranks; they stopped because that launcher process died.
CASES = {
    # torchrun forwards SIGTERM to the ranks (they save and exit 0) but exits 1 itself.
    ("torchrun", "SIGTERM"): (1, "stop requested"),
    ("torchrun", "SIGUSR1"): (-signal.SIGUSR1, ORPHAN),  # no handler: USR1 kills it
    ("torchrun", "SIGKILL"): (-signal.SIGKILL, ORPHAN),
    # The deepspeed runner handles no signal on one node: it dies, deepspeed.launcher.launch and
    # the ranks are left; the ranks notice their grandparent is gone.
    ("deepspeed", "SIGTERM"): (-signal.SIGTERM, ORPHAN),
    ("deepspeed", "SIGUSR1"): (-signal.SIGUSR1, ORPHAN),
    ("deepspeed", "SIGKILL"): (-signal.SIGKILL, ORPHAN),
    # local.sh forwards SIGTERM / SIGUSR1 to the ranks and exits 0 after their clean stop (with
    # its default launcher, deepspeed, and with torchrun); killed, its ranks notice.
    ("local.sh", "SIGTERM"): (0, "stop requested"),
    ("local.sh torchrun", "SIGUSR1"): (0, "stop requested"),
    ("local.sh", "SIGKILL"): (-signal.SIGKILL, ORPHAN),
}

# A light rank: the real StopFlag (watchdog, signal handlers, all-reduce over gloo) around 50 ms
# "steps"; rank 0 appends each step to OUT/steps; on stop each rank writes OUT/rank<R>.json.
LIGHT_RANK = """
import json, os, sys, time
from pathlib import Path
import torch.distributed as dist
from lmforge.runtime import StopFlag

out = Path(next(a for a in sys.argv[1:] if not a.startswith("--")))  # deepspeed adds --local_rank
rank = int(os.environ["RANK"])
dist.init_process_group("gloo")
stop, step = StopFlag(), 0
while step < 4000:
    step += 1
    time.sleep(0.05)
    if rank == 0:
        with open(out / "steps", "a") as f:
            f.write(f"{step}\\n")
    if stop.requested():
        break
(out / f"rank{rank}.json").write_text(json.dumps({"step": step, "reason": stop.reason}))
dist.destroy_process_group()
"""


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[19])


def process_tree(root: int) -> dict[int, int]:
    """root and all its descendants now: pid -> start time (a reused pid is another process)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[1], []).append(int(entry.name))
            starts[int(entry.name)] = stat[2]
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in starts:
            tree[pid] = starts[pid]
            todo.extend(children.get(pid, []))
    return tree


def running(tree: dict[int, int]) -> list[int]:
    """The processes of `tree` still running (an exited, unreaped zombie is not)."""
    out = []
    for pid, start in tree.items():
        stat = _stat(pid)
        if stat is not None and stat[2] == start and stat[0] not in ("Z", "X"):
            out.append(pid)
    return out


def last_step(run_dir: Path) -> int:
    """The newest step in metrics.jsonl (0 before any), ignoring a line being written."""
    path, step = run_dir / "metrics.jsonl", 0
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line being written
                step = max(step, int(json.loads(line).get("step", 0)))
    return step


def launch(launcher: str, script: str, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start 2 ranks of `script` under `launcher` ("local.sh LAUNCHER" picks local.sh's) in a
    session of its own, output to `log`."""
    env = stage_env()
    if launcher.startswith("local.sh"):
        env.update(
            PYTHON=sys.executable,
            NPROC_PER_NODE="2",
            MASTER_PORT=str(free_port()),
            CUDA_VISIBLE_DEVICES="",
            LAUNCHER=launcher.split()[1] if " " in launcher else "deepspeed",
        )
        cmd = ["launch/local.sh", script, *args]
    else:
        cmd = launch_command(launcher, 2, script, args)
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def kill_all(proc: subprocess.Popen[bytes], tree: dict[int, int]) -> None:
    """Leave nothing behind: the launcher's group while it is unreaped, then every recorded
    process still running (torchrun's ranks have sessions of their own)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for pid in running(tree):
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
            os.kill(pid, signal.SIGKILL)


def signal_mid_run(
    launcher: str,
    script: str,
    args: list[str],
    sig: signal.Signals,
    progress: Callable[[], int],
    log: Path,
) -> tuple[int, int, float]:
    """Launch, wait until `progress()` (the last step logged) reaches 3, send `sig` to the
    launcher process and wait until every process of the run has ended. Returns the launcher's
    exit status, the step seen before the signal and the seconds until all were gone."""
    proc = launch(launcher, script, args, log)
    tree: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 300
        while (seen := progress()) < 3:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached step 3"
            time.sleep(0.05)
        tree = process_tree(proc.pid)
        assert len(ranks_below(proc.pid)) == 2, tree
        sent = time.monotonic()
        proc.send_signal(sig)
        code = proc.wait(timeout=BOUND)
        while running(tree) and time.monotonic() - sent < BOUND:
            time.sleep(0.05)
        assert not running(tree), f"still running {BOUND:.0f} s after {sig.name}: {running(tree)}"
        return code, seen, time.monotonic() - sent
    finally:
        kill_all(proc, tree)


def check_checkpoint(run_dir: Path, log: Path, seen: int) -> tuple[str, int]:
    """The ranks' one stop line, and its step's checkpoint is the run's latest, complete, with
    nothing trained after it. Returns (why they stopped, the step)."""
    text = log.read_text()
    stops = STOP_LINE.findall(text)
    assert len(stops) == 1, text[-3000:]
    why, step = stops[0][0], int(stops[0][1])
    assert seen <= step < STEPS, (seen, step)
    assert (run_dir / "latest").read_text().strip() == f"step-{step:06d}"
    meta = json.loads((run_dir / f"step-{step:06d}" / "lmforge.json").read_text())
    assert meta["step"] == step and last_step(run_dir) == step
    assert not [p for p in run_dir.iterdir() if "partial" in p.name]
    return why, step


# -- the watchdog on its own: stand-in launchers (real processes, no torch), about a second -------

# A rank: records its launchers, says which, then checks like the loop does until one is gone.
RANK_CODE = """
import time
from lmforge.watchdog import at_start
watch = at_start()
print("watching", *[p.name for p in watch.launchers], flush=True)
while not (why := watch.gone()):
    time.sleep(0.02)
print(why, flush=True)
"""
# A launcher: starts its command (sys.argv[1:]), as LOCAL_RANK=N, N times if asked, then waits.
LAUNCHER_CODE = """
import os, subprocess, sys, time
n = int(os.environ.pop("STANDIN_RANKS", "0"))
kids = [subprocess.Popen(sys.argv[1:], env={**os.environ, "LOCAL_RANK": str(i)}) for i in range(n)]
if not n:
    kids = [subprocess.Popen(sys.argv[1:])]
time.sleep(600)
"""


def standin(tmp_path: Path, name: str) -> str:
    """An executable Python script called `name` that acts as a launcher."""
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\n{LAUNCHER_CODE}")
    path.chmod(0o755)
    return str(path)


def wait_for_line(log: Path, prefix: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if line.startswith(prefix):
                return line
        time.sleep(0.02)
    raise AssertionError(f"no line {prefix!r} in: {log.read_text()[-2000:]}")


@pytest.mark.parametrize(
    ("chain", "expected"),
    [
        (["torchrun"], "watching torchrun"),  # the parent dies: the rank is reparented
        (["deepspeed", "torchrun"], "watching torchrun deepspeed"),  # the grandparent dies
        (["wrapper.sh marked"], "watching wrapper.sh"),  # a wrapper that marked its pid
        (["wrapper.sh"], "watching"),  # an unknown parent: not watched, the rank runs on
    ],
    ids=["parent", "grandparent", "marked-wrapper", "unknown-parent"],
)
def test_a_rank_notices_when_a_launcher_above_it_dies(
    tmp_path: Path, chain: list[str], expected: str
) -> None:
    """The top of `chain` (launcher names, outermost first) is killed with SIGKILL."""
    log = tmp_path / "out.log"
    cmd = [sys.executable, "-c", RANK_CODE]
    env = {**stage_env(), "LMFORGE_LAUNCHER_PIDS": ""}
    for name in reversed(chain):
        script = standin(tmp_path, name.split()[0])
        if name.endswith("marked"):  # a shell wrapper marks itself, then runs the next level
            cmd = ["bash", script, *cmd]
            Path(script).write_text('export LMFORGE_LAUNCHER_PIDS=$$\n"$@"\n')
        elif name.endswith(".sh"):
            cmd = ["bash", script, *cmd]
            Path(script).write_text('"$@"\n')
        else:
            cmd = [script, *cmd]
    with open(log, "wb") as out:
        top = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )
    tree: dict[int, int] = {}
    try:
        assert wait_for_line(log, "watching") == expected
        tree = process_tree(top.pid)
        top.kill()
        top.wait()
        if expected == "watching":  # nothing watched: the rank outlives its parent
            time.sleep(1)
            assert len(running(tree)) == 1
        else:
            why = wait_for_line(log, "launcher ")
            assert why == f"launcher {chain[0].split()[0]} (pid {top.pid}) exited"
    finally:
        kill_all(top, tree)


def test_a_rank_whose_marked_launcher_died_before_it_started_stops(tmp_path: Path) -> None:
    """A wrapper that marked itself but is no longer above the rank when it starts (it died
    during the launch, the rank was reparented) counts as gone."""
    ended = subprocess.Popen(["true"])
    ended.wait()  # its pid: no one's ancestor now
    done = subprocess.run(
        [sys.executable, "-c", RANK_CODE],
        env={**stage_env(), "LMFORGE_LAUNCHER_PIDS": str(ended.pid)},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.stdout.splitlines()[-1] == (
        f"launcher (pid {ended.pid}) exited before this rank started"
    ), done.stdout + done.stderr


def test_forward_signals_the_ranks_and_not_their_children(tmp_path: Path) -> None:
    """The ranks below a launcher are the processes it gave a LOCAL_RANK, not theirs."""
    launcher = standin(tmp_path, "launcher")
    sub = standin(tmp_path, "sub")
    env = {**stage_env(), "STANDIN_RANKS": "2"}
    # launcher -> 2 ranks (each a `sub` stand-in) -> each a sleeping child of its own
    top = subprocess.Popen(
        [launcher, sub, "sleep", "600"], env=env, cwd=REPO, start_new_session=True
    )
    tree: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 60
        while len(tree) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
            tree = process_tree(top.pid)
        ranks = ranks_below(top.pid)
        parents = {pid: _stat(pid)[1] for pid in tree}  # type: ignore[index]
        assert len(ranks) == 2 and all(parents[r] == top.pid for r in ranks), (ranks, parents)
    finally:
        kill_all(top, tree)


# -- every launcher, every signal: real launchers, light ranks --------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("launcher", "sig"), list(CASES), ids=lambda v: str(v).replace(" ", "-"))
def test_signal_to_the_launcher_stops_every_rank_at_one_step(
    launcher: str, sig: str, tmp_path: Path
) -> None:
    script = tmp_path / "rank.py"
    script.write_text(LIGHT_RANK)
    out, log = tmp_path / "out", tmp_path / "launch.log"
    out.mkdir()

    def progress() -> int:
        steps = out / "steps"
        return len(steps.read_text().splitlines()) if steps.exists() else 0

    code, seen, took = signal_mid_run(
        launcher, str(script), [str(out)], signal.Signals[sig], progress, log
    )
    text = log.read_text()
    expected_code, expected_why = CASES[(launcher, sig)]
    assert code == expected_code, (code, text[-3000:])
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] >= seen, (ranks, seen)  # together, after seen
    for rank in ranks:
        if isinstance(expected_why, re.Pattern):
            assert expected_why.fullmatch(rank["reason"]), rank
        else:
            assert rank["reason"] == expected_why, rank
    if (launcher, sig) != ("torchrun", "SIGTERM"):  # torchrun's SignalException is its own
        assert "Traceback" not in text, text[-3000:]
    print(f"{launcher} {sig}: exit {code}, stopped at step {ranks[0]['step']}, {took:.1f} s")


# -- the real thing: 2-process pretraining, a real checkpoint, a resume ----------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Token shards and tokenizer, built once for the module's runs."""
    return tmp_path_factory.mktemp("cache")


def pretrain(
    launcher: str, sig: signal.Signals, run_dir: Path, cache: Path, log: Path
) -> tuple[int, str, int]:
    """A tiny 2-process pretraining signalled after step 3: (launcher exit, why, step saved)."""
    args = tiny_pretrain_args(run_dir, cache, steps=STEPS, save_every=STEPS)
    code, seen, took = signal_mid_run(
        launcher, "pretrain/train.py", args, sig, lambda: last_step(run_dir), log
    )
    why, step = check_checkpoint(run_dir, log, seen)
    print(f"{launcher} {sig.name}: exit {code}, saved at step {step}, all gone after {took:.1f} s")
    return code, why, step


@pytest.mark.slow
def test_an_orphan_left_by_a_killed_torchrun_stops_and_the_run_resumes(
    tmp_path: Path, cache: Path
) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "launch.log"
    code, why, step = pretrain("torchrun", signal.SIGKILL, run_dir, cache, log)
    assert code == -signal.SIGKILL
    assert re.fullmatch(r"launcher torchrun \(pid \d+\) exited", why), why
    # The same run directory, resumed, continues from that checkpoint to its final step.
    final = step + 3
    args = [*tiny_pretrain_args(run_dir, cache, steps=STEPS, save_every=STEPS)]
    cmd = launch_command("torchrun", 2, "pretrain/train.py", [*args, f"--train.steps={final}"])
    done = subprocess.run(
        cmd, env=stage_env(), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resume: step {step} from" in done.stdout, done.stdout[-3000:]
    assert (run_dir / "latest").read_text().strip() == f"step-{final:06d}"
    assert last_step(run_dir) == final
