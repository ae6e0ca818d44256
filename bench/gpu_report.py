"""The GPU check's verdict: each target of the GPU work against what the check measured, with
the baseline of the same run beside it, as a markdown table (report.md) and JSON (report.json)
in the check's folder. bench/gpu_check.py writes it at its end; run it again on a folder that
came back from a GPU (`--save` also copies every record to bench/results/<device>-NAME.json,
the files to commit).

The targets (MFU against the bf16 8192³ matmul peak measured in the same run, PaLM FLOPs):
- 124M at T=1024 through lmforge's DeepSpeed path: 50% MFU (the better of eager ZeRO-2 and
  compiled ZeRO-1);
- 1B at T=2048, compiled ZeRO-2: 62% MFU;
- generation at 124M, batch 64, 64 + 256 tokens, sampling: 100k new tokens/s (the better of
  eager and compiled);
- the 7b preset under ZeRO-3 with activation checkpointing, with and without optimizer
  offload: every loss finite; tokens/s and peak memory beside `lmforge estimate`'s model
  states plus checkpointed activations for the same settings.

    python bench/gpu_report.py [DIR] [--save]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent


@dataclass
class Row:
    """One target: what it asks, what lmforge measured, the same run's baseline, whether met
    (None: not measured)."""

    target: str
    goal: str
    measured: str
    baseline: str
    met: bool | None
    value: float | None = None
    profile: str = ""  # where lmforge's step time went, when profiled


def _load(folder: Path, name: str) -> dict[str, Any] | None:
    """The record of step NAME, bench/NAME.json in the check's folder (its one top-level
    entry), or None."""
    path = folder / "bench" / f"{name}.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return next(v for k, v in data.items() if k in ("train", "generate"))


def _not_measured(names: list[str], steps: dict[str, Any]) -> str:
    """'not measured (STEP: its status, ...)' for the named steps."""
    why = ", ".join(f"{n}: {steps.get(n, {}).get('status', 'not run')}" for n in names)
    return f"not measured ({why})"


def _missing(target: str, goal: str, names: list[str], steps: dict[str, Any]) -> Row:
    """A target none of whose steps left a record: say what became of them."""
    return Row(target, goal, _not_measured(names, steps), "", None)


def mfu_row(folder: Path, steps: dict[str, Any], target: str, names: list[str], goal: float) -> Row:
    """The best lmforge MFU over the named training records against `goal`."""
    found = {n: r for n in names if (r := _load(folder, n)) is not None}
    want = f">= {goal:.0%} MFU"
    if not found:
        return _missing(target, want, names, steps)
    name = max(found, key=lambda n: found[n]["lmforge"]["mfu_measured"])
    best = found[name]
    ours, shape = best["lmforge"], best["shape"]
    how = "compiled" if shape["compile"] else "eager"
    measured = (
        f"{ours['mfu_measured']:.1%} ({ours['tokens_per_s']:,.0f} tok/s; {shape['preset']}, "
        f"T={shape['seq_len']}, micro-batch {shape['micro_batch']}, "
        f"ZeRO-{shape['zero_stage']} {how})"
    )
    if "baseline" in best:
        base = best["baseline"]
        baseline = f"{base['mfu_measured']:.1%} ({base['tokens_per_s']:,.0f} tok/s)"
    else:  # the run stopped after lmforge's side (see bench/train.py's partial records)
        baseline = _not_measured([name], steps)
    met = ours["mfu_measured"] >= goal and best["loss_check"]["passed"]
    row = Row(target, want, measured, baseline, met, ours["mfu_measured"])
    if "profile" in ours:
        import profiling

        row.profile = profiling.describe(ours["profile"])
    return row


def generation_row(
    folder: Path, steps: dict[str, Any], target: str, names: list[str], goal: float
) -> Row:
    """The best lmforge new-token rate over the generation records against `goal`."""
    want = f">= {goal / 1e3:,.0f}k new tok/s"
    found = {n: r for n in names if (r := _load(folder, n)) is not None}
    if not found:
        return _missing(target, want, names, steps)
    best = max(found.values(), key=lambda r: r["lmforge"]["new_tokens_per_s"])
    rate = best["lmforge"]["new_tokens_per_s"]
    how = "compiled" if best["shape"]["compile"] else "eager"
    kind = {True: "static cache + compile", False: "dynamic cache"}
    bases = ", ".join(
        f"{r['baseline']['new_tokens_per_s']:,.0f} ({kind[bool(r['shape']['compile'])]})"
        if "baseline" in r
        else _not_measured([n], steps)  # stopped after lmforge's side
        for n, r in found.items()
    )
    met = rate >= goal and best["greedy_check"]["passed"]
    shape = best["shape"]
    what = f"{shape['preset']}, batch {shape['batch']}, {shape['prompt_len']}+{shape['new_tokens']}"
    return Row(target, want, f"{rate:,.0f} tok/s ({what}, {how})", bases, met, rate)


def estimated_bytes(shape: dict[str, Any]) -> float:
    """`lmforge estimate`'s GPU bytes for a training record's shape: model states of its ZeRO
    layout plus the activations (checkpointed or not) of one micro-batch."""
    import common

    from lmforge.estimate import estimate

    est = estimate(
        common.model_config(shape["preset"]),
        seq_len=shape["seq_len"],
        micro_batch=shape["micro_batch"],
        precision=shape["precision"],
    )
    offload = "optimizer" if shape["offload_optimizer"] else "none"
    states = est.layout(shape["zero_stage"], offload).gpu_bytes
    checkpointed = shape.get("activation_checkpointing")
    return states + (est.activation_bytes_checkpointed if checkpointed else est.activation_bytes)


def _gib(n: float | None) -> str:
    """Bytes as `lmforge estimate` prints them; n/a without a GPU's count."""
    from lmforge.estimate import format_bytes

    return "n/a (CPU)" if n is None else format_bytes(n)


def big_row(folder: Path, steps: dict[str, Any], target: str, names: list[str], _: float) -> Row:
    """A 7b record (the one name): losses finite; tokens/s and peak memory, with `lmforge
    estimate`'s prediction for the same settings as its baseline (and transformers' run, when
    the record has one)."""
    record = _load(folder, names[0])
    goal = "finite losses; memory vs estimate"
    if record is None:
        return _missing(target, goal, names, steps)
    ours = record["lmforge"]
    measured = (
        f"{record['shape']['preset']}: loss {ours['first_loss']:.3f} -> {ours['last_loss']:.3f}, "
        f"{ours['tokens_per_s']:,.0f} tok/s, peak {_gib(ours['peak_memory_bytes'])}"
    )
    baseline = f"estimate {_gib(estimated_bytes(record['shape']))}"
    if "baseline" in record:
        base = record["baseline"]
        baseline += f"; HF {base['tokens_per_s']:,.0f} tok/s"
        baseline += f", peak {_gib(base['peak_memory_bytes'])}"
    return Row(target, goal, measured, baseline, bool(ours["losses_finite"]), ours["tokens_per_s"])


def rows(folder: Path, steps: dict[str, Any]) -> list[Row]:
    """Every target's row, from the check's folder and its steps' records; a record that
    cannot be read gives a row that says so (the other rows still come)."""
    out = []
    for target, make, names, goal in TARGETS:
        try:
            out.append(make(folder, steps, target, names, goal))
        except (KeyError, TypeError, ValueError) as err:
            what = f"unreadable record ({type(err).__name__}: {err})"
            out.append(Row(target, "", what, "", None))
    return out


# target, its row, the steps whose records it reads, the goal
TARGETS: list[tuple[str, Callable[..., Row], list[str], float]] = [
    ("train 124M, T=1024", mfu_row, ["train_124m_zero2", "train_124m_zero1_compile"], 0.50),
    ("train 1B, T=2048", mfu_row, ["train_1b_zero2_compile"], 0.62),
    ("generation 124M, batch 64, 64+256 tokens", generation_row,
     ["generate_124m", "generate_124m_compile"], 100e3),
    ("7b ZeRO-3, activation checkpointing", big_row, ["train_7b_zero3"], 0.0),
    ("7b ZeRO-3 + optimizer offload, act. ckpt.", big_row, ["train_7b_zero3_offload"], 0.0),
]  # fmt: skip


def markdown(table: list[Row], env: dict[str, Any], steps: dict[str, Any]) -> str:
    """The report as markdown: the machine, the targets table, the steps' outcomes."""
    peak = env.get("bf16_matmul_peak_tflops")
    lines = [
        f"Device {env.get('device', '?')}; torch {env.get('torch', '?')}, transformers "
        f"{env.get('transformers', '?')}, DeepSpeed {env.get('deepspeed', '?')}; measured bf16 "
        f"matmul peak {f'{peak} TFLOP/s' if peak else 'n/a'}.",
        "",
        "| target | goal | lmforge | baseline (same run) | met |",
        "|---|---|---|---|---|",
    ]
    verdict = {True: "yes", False: "**no**", None: "not measured"}
    for r in table:
        lines.append(f"| {r.target} | {r.goal} | {r.measured} | {r.baseline} | {verdict[r.met]} |")
    profiled = [f"- {r.target}: lmforge {r.profile}" for r in table if r.profile]
    if profiled:
        lines += ["", *profiled]
    lines += ["", "| step | status | seconds |", "|---|---|---|"]
    for name, s in steps.items():
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', s.get('why', ''))} |")
    return "\n".join(lines) + "\n"


def write_report(folder: Path) -> list[Row]:
    """report.md and report.json in `folder`; returns the rows."""
    env_path, summary = folder / "env.json", folder / "summary.json"
    env = json.loads(env_path.read_text()) if env_path.exists() else {}
    steps = json.loads(summary.read_text())["steps"] if summary.exists() else {}
    table = rows(folder, steps)
    (folder / "report.md").write_text(markdown(table, env, steps))
    data = {"env": {k: v for k, v in env.items() if k != "nvidia_smi"}, "steps": steps}
    data["targets"] = [r.__dict__ for r in table]
    (folder / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    return table


def save(folder: Path, results: Path) -> list[Path]:
    """Copy the check's records to results/<device>-NAME.json (device from the records)."""
    records = sorted((folder / "bench").glob("*.json"))
    device = next((_load(folder, p.stem) or {}).get("device") for p in records) if records else ""
    if not device:
        raise SystemExit(f"{folder}: no benchmark records to save")
    saved = []
    for path in [*records, folder / "env.json", folder / "report.json"]:
        if path.exists():
            target = results / f"{device}-{path.stem}.json"
            shutil.copyfile(path, target)
            saved.append(target)
    return saved


def main(argv: list[str] | None = None) -> int:
    """Write and print the report of a check's folder; with --save copy its records."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = os.environ.get("GPU_OUT") or os.environ.get("OUT") or "bench/results/gpu-check"
    ap.add_argument("folder", nargs="?", default=default, help="the check's result folder")
    ap.add_argument("--save", action="store_true", help="copy records to bench/results/")
    args = ap.parse_args(argv)
    folder = Path(args.folder)
    if not (folder / "summary.json").exists():
        print(f"{folder}: no summary.json; run make gpu-check first", file=sys.stderr)
        return 2
    sys.path[:0] = [str(BENCH), str(BENCH.parent)]  # common.py; lmforge where not installed
    write_report(folder)
    print((folder / "report.md").read_text(), end="")
    if args.save:
        for path in save(folder, BENCH / "results"):
            print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
