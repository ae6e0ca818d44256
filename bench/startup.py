"""Start-up time of the `lmforge` command against a bare Python start, measured in one run.

    .venv/bin/python bench/startup.py [--runs 7]

Each command runs `--runs` times as a fresh process; the table gives the median and fastest
wall time and the ratio of the median to `python -c pass` (the interpreter's own start-up,
the floor of any command). `import torch` is shown for scale: what the help paths no longer pay.
Reports only; the test of the help paths (tests/test_startup.py) checks which modules they
import, not timing.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def lmforge_command() -> list[str]:
    """The installed `lmforge` script next to this Python, else the module behind it."""
    script = Path(sys.executable).parent / "lmforge"
    found = str(script) if script.exists() else shutil.which("lmforge")
    return [found] if found else [sys.executable, "-m", "lmforge.cli"]


def wall_times(command: list[str], runs: int) -> list[float]:
    """Seconds from spawn to exit of `command`, `runs` times (output discarded; must exit 0)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    """Measure every command, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="runs per command (default 7)")
    parser.add_argument(
        "--no-torch", action="store_true", help="skip the `import torch` reference row"
    )
    args = parser.parse_args(argv)
    lmforge = lmforge_command()
    rows = [
        ("python -c pass", [sys.executable, "-c", "pass"]),
        ("lmforge --help", [*lmforge, "--help"]),
        ("lmforge sft --help", [*lmforge, "sft", "--help"]),
        ("lmforge --version", [*lmforge, "--version"]),
    ]
    if not args.no_torch:
        rows.append(("python -c 'import torch'", [sys.executable, "-c", "import torch"]))
    results = []
    for name, command in rows:
        wall_times(command, 1)  # warm the file cache; not counted
        results.append((name, wall_times(command, args.runs)))
    base = statistics.median(results[0][1])
    print(f"start-up, {args.runs} runs each ({' '.join(lmforge)})")
    print(f"{'command':<28} {'median s':>9} {'min s':>7} {'x pass':>7}")
    for name, times in results:
        median = statistics.median(times)
        print(f"{name:<28} {median:>9.3f} {min(times):>7.3f} {median / base:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
