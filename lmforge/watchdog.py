"""Workers never outlive their launcher.

A rank started by a launcher (torchrun, `deepspeed`, `accelerate launch`, launch/local.sh) keeps
running when that launcher is killed: it is reparented and trains on, writing into a run
directory a restart will use too. `LauncherWatch` records the launcher processes above this one
when the process starts (pid and start time from /proc, so a reused pid is not mistaken for the
launcher) and answers, at each step boundary, whether one of them is gone; the training loop
then checkpoints and stops as on SIGTERM (see `lmforge.runtime.StopFlag`).

Only known launchers are watched: the walk up from the parent stops at the first process that
is not one, so a run started from a shell, under `nohup`, by srun (SLURM ends its tasks itself)
or by a test harness watches nothing. A wrapper script marks itself a launcher by adding its pid
to LMFORGE_LAUNCHER_PIDS (launch/local.sh does).

`python -m lmforge.watchdog forward SIGNAL PID` sends SIGNAL to every rank below process PID
(the processes whose environment a launcher gave a LOCAL_RANK): launch/local.sh forwards stop
signals to the ranks themselves, so no launcher tears them down before they save.

Linux only (it reads /proc); elsewhere nothing is watched.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

LAUNCHER_PIDS_ENV = "LMFORGE_LAUNCHER_PIDS"  # space-separated pids of wrapper scripts to watch

# What a launcher's command line runs: `python -m MODULE` or a console script of this name.
_MODULES = {
    "torch.distributed.run": "torchrun",
    "torch.distributed.launch": "torch.distributed.launch",
    "deepspeed.launcher.runner": "deepspeed",
    "deepspeed.launcher.launch": "deepspeed.launcher.launch",
    "accelerate.commands.launch": "accelerate launch",
    "accelerate.commands.accelerate_cli": "accelerate launch",
}
_SCRIPTS = {"torchrun", "deepspeed", "accelerate"}


@dataclass(frozen=True)
class Proc:
    """One launcher process: pid, start time (clock ticks after boot) and a name for messages."""

    pid: int
    start: int
    name: str


@dataclass(frozen=True)
class _Stat:
    state: str
    ppid: int
    start: int


def _stat(pid: int) -> _Stat | None:
    """State, parent and start time of a process from /proc/PID/stat; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = text[text.rindex(")") + 2 :].split()
    return _Stat(state=fields[0], ppid=int(fields[1]), start=int(fields[19]))


def _argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _launcher_name(argv: list[str]) -> str | None:
    """The launcher a command line runs (by module or console script), or None."""
    head = argv[:6]  # interpreter, a few flags, then the module or script
    for i, arg in enumerate(head[:-1]):
        if arg == "-m" and head[i + 1] in _MODULES:
            return _MODULES[head[i + 1]]
    for arg in head[:3]:
        if os.path.basename(arg) in _SCRIPTS:
            return os.path.basename(arg)
    return None


def _script_name(argv: list[str]) -> str:
    """What a marked wrapper is called in messages: its script, else its program."""
    for arg in argv[1:3]:
        if not arg.startswith("-"):
            return os.path.basename(arg)
    return os.path.basename(argv[0]) if argv else "launcher"


def _marked() -> set[int]:
    return {int(p) for p in os.environ.get(LAUNCHER_PIDS_ENV, "").split() if p.isdigit()}


def _ancestors(pid: int) -> list[int]:
    """pid's parent, grandparent, ... up to (not including) init."""
    out: list[int] = []
    stat = _stat(pid)
    while stat is not None and stat.ppid > 1 and stat.ppid not in out:
        out.append(stat.ppid)
        stat = _stat(stat.ppid)
    return out


def _alive(proc: Proc) -> bool:
    """The same process (pid and start time) still runs; a zombie has already exited."""
    stat = _stat(proc.pid)
    return stat is not None and stat.start == proc.start and stat.state not in ("Z", "X")


@dataclass
class LauncherWatch:
    """The launcher processes above one process, recorded when it started (see the module)."""

    pid: int  # the watching process
    parent: int  # its parent then
    launchers: list[Proc]  # the launcher chain from the parent up
    lost: str = ""  # a marked wrapper that was already gone (or not above us) at the start

    @classmethod
    def record(cls) -> LauncherWatch:
        """The launchers above this process now."""
        me, parent = os.getpid(), os.getppid()
        marked, chain = _marked(), []
        ancestors = _ancestors(me)
        for pid in ancestors:
            stat, argv = _stat(pid), _argv(pid)
            name = _launcher_name(argv) or (_script_name(argv) if pid in marked else None)
            if stat is None or name is None:
                break
            chain.append(Proc(pid, stat.start, name))
        # A marked wrapper above us that the walk did not reach is watched too; one that is no
        # longer above us died before this process started looking (or we were reparented).
        lost = ""
        for pid in sorted(marked - {p.pid for p in chain}):
            stat = _stat(pid)
            if pid in ancestors and stat is not None:
                chain.append(Proc(pid, stat.start, _script_name(_argv(pid))))
            elif not lost:
                lost = f"launcher (pid {pid}) exited before this rank started"
        return cls(me, parent, chain, lost)

    def gone(self) -> str:
        """Why this process lost its launcher ('' while every launcher runs)."""
        if self.lost:
            return self.lost
        if not self.launchers:
            return ""
        first = self.launchers[0]
        if first.pid == self.parent and os.getppid() != self.parent:  # reparented
            return f"launcher {first.name} (pid {first.pid}) exited"
        for proc in self.launchers:
            if not _alive(proc):
                return f"launcher {proc.name} (pid {proc.pid}) exited"
        return ""


# Recorded when lmforge.runtime is first imported, at the very start of every stage: a launcher
# that dies during start-up (data, model, engine) is noticed at the first step boundary.
_AT_START = LauncherWatch.record() if sys.platform.startswith("linux") else None


def at_start() -> LauncherWatch | None:
    """The launchers recorded when this process started (None off Linux)."""
    global _AT_START
    if _AT_START is not None and _AT_START.pid != os.getpid():  # a forked child: its own
        _AT_START = LauncherWatch.record()
    return _AT_START


def _has_local_rank(pid: int) -> bool:
    """Whether a launcher started pid as a rank: its initial environment holds LOCAL_RANK."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return any(item.startswith(b"LOCAL_RANK=") for item in env.split(b"\0"))


def ranks_below(root: int) -> list[int]:
    """The ranks among root's descendants: processes with a launcher-given LOCAL_RANK whose
    parent has none (a rank's own children inherit it and are not ranks)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat.state not in ("Z", "X"):
                children.setdefault(stat.ppid, []).append(int(entry.name))
    ranks, todo = [], [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            if _has_local_rank(child):
                ranks.append(child)  # not deeper: a rank's children are its own
            else:
                todo.append(child)
    return sorted(ranks)


def forward(signum: int, root: int) -> list[int]:
    """Send signum to every rank below root; the ranks signalled."""
    sent = []
    for pid in ranks_below(root):
        try:
            os.kill(pid, signum)
            sent.append(pid)
        except ProcessLookupError:
            pass  # it exited meanwhile
    return sent


def main(argv: list[str]) -> int:
    """`forward SIGNAL PID`, PID a child of the caller (the launcher a script started): exit 0
    when at least one rank got SIGNAL, 1 when there is none yet."""
    if len(argv) != 3 or argv[0] != "forward" or not argv[2].isdigit():
        sys.stderr.write("usage: python -m lmforge.watchdog forward SIGNAL PID\n")
        return 2
    name, root = argv[1].upper(), int(argv[2])
    signum = signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
    stat = _stat(root)
    if stat is None or stat.ppid != os.getppid():  # only a launcher the calling script started
        sys.stderr.write(f"lmforge.watchdog: process {root} is not a child of the caller\n")
        return 2
    return 0 if forward(signum, root) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
