"""`make bench`: the training and generation benchmarks in one process, one table, one file.

Runs bench/train.py's and bench/generate.py's measurements (same options; see their docs),
prints one table (shape, baseline, lmforge, ratio) and writes both records to
bench/results/<device>-<preset>.json. Fails only when a correctness check fails (first-step
losses disagree, or greedy tokens differ); timings are reported, never asserted.

    python bench/run.py [--model tiny] [--zero 2] [--compile] [--steps 10] ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import common
import generate
import train


def print_table(t: dict[str, Any], g: dict[str, Any], path: Path) -> None:
    """One row per benchmark: shape, unit, baseline, lmforge, ratio and its per-round spread."""
    v = common.versions()
    ts, gs = t["shape"], g["shape"]
    threads = f", {ts['threads']} thread(s)" if ts["threads"] else ""
    print(
        f"\nlmforge bench: {ts['preset']} ({ts['parameters'] / 1e6:.1f}M parameters) on "
        f"{t['device']}{threads}; torch {v['torch']}, deepspeed {v['deepspeed']}, "
        f"transformers {v['transformers']}"
    )
    how = "compiled" if ts["compile"] else "eager"
    rows = [
        (
            "train",
            f"seq {ts['seq_len']} x batch {ts['micro_batch']}, ZeRO-{ts['zero_stage']}"
            f"{'+offload' if ts['offload_optimizer'] else ''}, {ts['precision']}, {how}",
            "tokens/s",
            t["baseline"]["tokens_per_s"],
            t["lmforge"]["tokens_per_s"],
            t["ratio"],
            t.get("ratio_per_round"),
        ),
        (
            "generate",
            f"batch {gs['batch']}, prompt {gs['prompt_len']}, +{gs['new_tokens']}, T=1, "
            f"{gs['dtype']}, {'compiled' if gs['compile'] else 'eager'}",
            "new tokens/s",
            g["baseline"]["new_tokens_per_s"],
            g["lmforge"]["new_tokens_per_s"],
            g["ratio"],
            g.get("ratio_per_round"),
        ),
    ]
    width = max(len(r[1]) for r in rows) + 2
    print(
        f"\n{'what':<10}{'shape':<{width}}{'unit':<14}{'baseline':>11}{'lmforge':>11}"
        f"{'ratio':>8}  per-round"
    )
    for what, shape, unit, base, ours, ratio, spread in rows:
        per = f"{spread['min']:.2f}-{spread['max']:.2f}" if spread else "-"
        print(
            f"{what:<10}{shape:<{width}}{unit:<14}{base:>11,.0f}{ours:>11,.0f}{ratio:>7.2f}x  {per}"
        )
    p = t["peak_flops"]
    mfu = f"MFU (train): baseline {t['baseline']['mfu_measured']:.1%}, "
    mfu += f"lmforge {t['lmforge']['mfu_measured']:.1%} of {p['measured']:.3g} FLOP/s "
    mfu += f"({p['measured_label']})"
    if "datasheet" in p:
        mfu += f"; {t['baseline']['mfu_datasheet']:.1%} and {t['lmforge']['mfu_datasheet']:.1%}"
        mfu += f" of {p['datasheet']:.3g} FLOP/s ({p['datasheet_label']})"
    print("\n" + mfu)
    c, q = t["loss_check"], g["greedy_check"]
    print(
        f"check: first-step loss lmforge {c['lmforge']:.6f}, baseline {c['baseline']:.6f}, "
        f"|diff| {c['abs_diff']:.1e} (tolerance {c['tolerance']:.1e}): "
        f"{'ok' if c['passed'] else 'MISMATCH'}"
    )
    print(
        f"check: greedy tokens ({q['dtype']}), {q['sequences_equal']}/{q['prompts']} sequences "
        f"equal, {q['share_tokens_equal']:.1%} of tokens: {'ok' if q['passed'] else 'MISMATCH'}"
    )
    print(f"results: {common.shown(path)}")


def main() -> None:
    """Run both benchmarks, print the table, write the results file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    train.add_common_args(parser)
    train.add_train_args(parser)
    generate.add_generate_args(parser)
    args = parser.parse_args()
    if args.no_baseline:
        parser.error("--no-baseline: this table compares both sides; run bench/train.py instead")
    t = train.run(args, show=False)
    g = generate.run(args, show=False)
    device = common.bench_device()
    path = Path(args.out or common.results_path(device, t["shape"]["preset"]))
    common.write_section(path, "train", t)
    common.write_section(path, "generate", g)
    print_table(t, g, path)
    sys.exit(0 if t["loss_check"]["passed"] and g["greedy_check"]["passed"] else 1)


if __name__ == "__main__":
    main()
