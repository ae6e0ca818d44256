"""lmforge against TRL, stage by stage: SFT, reward model, DPO and GRPO trained from the same
weights on lmforge's own task data in lmforge's sample order, with the same optimizer, schedule,
clipping, steps and one thread each; runs alternate (lmforge, TRL, lmforge, TRL, ...), each in
its own process as a user starts it, and both trained models are scored by lmforge's evaluation.

    make bench-peer                                    # 3 pairs of every stage, ~15 min on 2 cores
    .venv/bin/python bench/peer.py --pairs 1 --stages dpo,grpo --steps dpo=20,grpo=10

lmforge runs `python finetune/<stage>.py --config configs/finetune/<stage>.yaml` (the demo's
configs) with --train.steps and the starting checkpoint set; its training time is read from its
own metrics.jsonl (the step windows: first step to last, no evaluation or saving). TRL runs
bench/peer_trl.py with the same config and overrides. Whole-process wall time is process start
to exit for lmforge (start-up, evaluation before and after, saving) and process start to the
saved model for TRL (start-up, data, training, saving: a TRL script that evaluates nothing).
Quality: lmforge's last evaluation, and TRL's model loaded back into lmforge and scored by the
same function; the noise is lmforge re-run with another data seed (another sample order).
Any `--section.key=value` argument goes to both sides (e.g. --data.num_heldout=50).

PPO: TRL 1.x no longer ships a PPO trainer, so there is nothing to compare lmforge's PPO with.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

STAGES = ("sft", "reward", "dpo", "grpo")
# Steps per stage: a share of the demo configs' (400, 150, 100, 30) that keeps three pairs of
# every stage near 15 minutes on two shared cores; --steps changes them.
DEFAULT_STEPS = {"sft": 30, "reward": 40, "dpo": 30, "grpo": 10}
# The quality figures shown per stage (all of them go to the JSON file).
QUALITY = {
    "sft": ("eval/loss", "eval/accuracy"),
    "reward": ("eval/accuracy", "eval/loss"),
    "dpo": ("eval/reward_accuracy", "eval/loss", "eval/prefers_chosen"),
    "grpo": ("eval/accuracy", "eval/reward", "eval/kl"),
}
NOISE_SEED = 1  # the data seed of the re-run that measures the noise of sample order
# Stages whose training samples (GRPO's rollouts): pair i runs both sides with --train.seed=i.
# The two sides draw their rollouts from different generators, so one seed is one draw of each
# side's result, not the same draw; a few steps at the demo's learning rate can land a draw far
# from the others (decisions.md), so each pair is another draw and the medians compare sides.
SAMPLED = ("grpo",)


def parse_steps(text: str) -> dict[str, int]:
    """'sft=100,dpo=40' or one number for every stage -> steps per stage."""
    steps = dict(DEFAULT_STEPS)
    if not text:
        return steps
    if text.isdigit():
        return dict.fromkeys(STAGES, int(text))
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name not in STAGES or not value.isdigit():
            raise SystemExit(f"error: --steps: expected stage=N with a stage of {STAGES}: {part!r}")
        steps[name] = int(value)
    return steps


def child_env() -> dict[str, str]:
    """One thread per side, offline, quiet; DeepSpeed's CPU accelerator without a GPU."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="disabled",
        PYTHONPATH=str(REPO),
    )
    import torch

    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    return env


def run_process(cmd: list[str], log: Path) -> tuple[float, float, float, int]:
    """Run `cmd` from the repository root, output to `log`: (start, end) wall clock, the CPU
    seconds it used (user + system: what a shared machine's load does not inflate) and rc."""
    with open(log, "w") as out:
        start = time.time()
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=child_env(), stdout=out, stderr=subprocess.STDOUT
        )
        _, status, usage = os.wait4(proc.pid, 0)
        end = time.time()
        proc.returncode = os.waitstatus_to_exitcode(status)
        return start, end, usage.ru_utime + usage.ru_stime, proc.returncode


def fail(what: str, log: Path) -> None:
    """Stop with the tail of a failed run's log."""
    from common import shown

    tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
    raise SystemExit(f"error: {what} failed (log {shown(log)}):\n{tail}")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl records."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def lmforge_figures(records: list[dict[str, Any]], stage: str, batch: int) -> dict[str, Any]:
    """Training seconds (the step windows), generation time and tokens (GRPO), the last
    evaluation and the times around the steps, from an lmforge run's metrics."""
    train = gen_s = gen_tokens = 0.0
    prev, last_log = 0, None
    for r in records:
        if "step_seconds" not in r:
            continue
        steps = r["step"] - prev
        prev = r["step"]
        train += r["step_seconds"] * steps
        gen_s += r.get("time/generation_seconds", 0.0) * steps
        gen_tokens += r.get("response_length", 0.0) * batch * steps
        last_log = r
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    first_log = next(r for r in records if "step_seconds" in r)
    out = {
        "train_seconds": train,
        "quality": {k: v for k, v in evals[-1].items() if k.startswith("eval/")},
        "quality_before": {k: v for k, v in evals[0].items() if k.startswith("eval/")},
        # wall clock at the end of the first log window and of the last step
        "_first_log": first_log["time"],
        "_first_steps": first_log["step"],
        "_last_log": last_log["time"] if last_log else 0.0,
    }
    if stage == "grpo":
        out.update(generate_seconds=gen_s, generated_tokens=gen_tokens)
    return out


class Bench:
    """The runs of one benchmark: where they go and what both sides are given."""

    def __init__(self, args: argparse.Namespace, overrides: list[str]) -> None:
        self.args, self.overrides = args, overrides
        self.work = Path(args.work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.steps = parse_steps(args.steps)
        self.sft_from = args.sft_from

    def stage_args(
        self, stage: str, seed: int | None = None, train_seed: int | None = None
    ) -> list[str]:
        """Overrides both sides get: starting weights, steps, cadence, the user's overrides;
        `seed` sets data.seed (the noise run), `train_seed` train.seed (a sampled stage's pair)."""
        steps = self.steps[stage]
        init = self.args.init if stage == "sft" else self.sft_from
        out = [
            f"--init_from={init}",
            f"--train.steps={steps}",
            "--train.epochs=0",  # the demo SFT counts epochs; here every stage counts steps
            f"--train.save_every={steps}",
            "--train.eval_every=0",  # evaluated before and after (lmforge) or after (TRL)
            "--train.early_stop=0",
            '--train.keep_best=""',
            *self.overrides,
        ]
        out += [f"--data.seed={seed}"] if seed is not None else []
        return out + ([f"--train.seed={train_seed}"] if train_seed is not None else [])

    def default_sft(self) -> str:
        """The demo configs' SFT checkpoint (runs/sft/best) when it exists, else ''."""
        import yaml

        init = yaml.safe_load(Path(self.config("dpo")).read_text()).get("init_from", "")
        return init if init and (REPO / init).exists() else ""

    def config(self, stage: str) -> str:
        return str(REPO / "configs" / "finetune" / f"{stage}.yaml")

    def lmforge(
        self, stage: str, name: str, seed: int | None = None, train_seed: int | None = None
    ) -> dict[str, Any]:
        """One lmforge run as a user starts it; its figures from its own metrics."""
        run_dir = self.work / name
        cmd = [sys.executable, f"finetune/{stage}.py", "--config", self.config(stage)]
        cmd += [f"--run_dir={run_dir}", *self.stage_args(stage, seed, train_seed)]
        log = self.work / f"{name}.log"
        start, end, cpu, rc = run_process(cmd, log)
        if rc != 0:
            fail(f"lmforge {stage} ({name})", log)
        batch = self.batch(run_dir)
        fig = lmforge_figures(read_metrics(run_dir), stage, batch)
        before_first = fig.pop("_first_log") - start
        first_steps = fig.pop("_first_steps")
        # the first window's steps ran just before its record: what came before them is overhead
        per_step = fig["train_seconds"] / max(self.steps[stage], 1)
        fig["before_steps_seconds"] = max(0.0, before_first - per_step * first_steps)
        fig["after_steps_seconds"] = end - fig.pop("_last_log")
        fig["wall_seconds"] = end - start
        fig["cpu_seconds"] = cpu
        fig["run_dir"] = _relative(run_dir)
        return fig

    def trl(self, stage: str, name: str, train_seed: int | None = None) -> dict[str, Any]:
        """One TRL run (bench/peer_trl.py) with the same config and overrides."""
        result = self.work / f"{name}.json"
        cmd = [sys.executable, "bench/peer_trl.py", "--stage", stage, "--config"]
        cmd += [self.config(stage), "--out", str(self.work / name), "--result", str(result)]
        cmd += self.stage_args(stage, train_seed=train_seed)
        log = self.work / f"{name}.log"
        start, end, _, rc = run_process(cmd, log)
        if rc != 0:
            fail(f"TRL {stage} ({name})", log)
        fig = json.loads(result.read_text())
        fig["wall_seconds"] = fig.pop("saved_at") - start
        fig["cpu_seconds"] = fig.pop("saved_cpu_seconds")  # its own count, up to the save
        fig["process_seconds"] = end - start  # with the scoring by lmforge's evaluation
        return fig

    @staticmethod
    def batch(run_dir: Path) -> int:
        """Sequences per step (GRPO: prompts x group size), from the run's resolved config."""
        import yaml

        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        return int(config["train"]["global_batch_size"])


def _relative(path: Path) -> str:
    """`path` relative to the repository when it lies inside it (the results file names no
    machine's directories; the stages run from the repository root, so it still resolves)."""
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarise(stage: str, pairs: list[dict[str, Any]], noise: dict[str, Any] | None) -> dict:
    """Ratios per pair and their medians, tokens/s, wall times, quality side by side, noise."""
    time_ratio = [p["lmforge"]["train_seconds"] / p["trl"]["train_seconds"] for p in pairs]
    wall_ratio = [p["lmforge"]["wall_seconds"] / p["trl"]["wall_seconds"] for p in pairs]
    cpu_ratio = [p["lmforge"]["cpu_seconds"] / p["trl"]["cpu_seconds"] for p in pairs]
    out: dict[str, Any] = {
        "train_ratio": time_ratio,
        "train_ratio_median": median(time_ratio),
        "wall_ratio": wall_ratio,
        "wall_ratio_median": median(wall_ratio),
        "cpu_ratio": cpu_ratio,
        "cpu_ratio_median": median(cpu_ratio),
    }
    for side in ("lmforge", "trl"):
        runs = [p[side] for p in pairs]
        tokens = [p["trl"].get("tokens", 0) for p in pairs]  # the same data on both sides
        out[side] = {
            "train_seconds_median": median([r["train_seconds"] for r in runs]),
            "wall_seconds_median": median([r["wall_seconds"] for r in runs]),
            "cpu_seconds_median": median([r["cpu_seconds"] for r in runs]),
            "tokens_per_s_median": median(
                [t / r["train_seconds"] for t, r in zip(tokens, runs, strict=True)]
            ),
            "quality_median": {
                k: median([r["quality"][k] for r in runs if k in r["quality"]])
                for k in runs[0]["quality"]
            },
            "quality_range": {  # lowest and highest over the pairs: a sampled stage's spread
                k: [min(v), max(v)]
                for k in runs[0]["quality"]
                if (v := [r["quality"][k] for r in runs if k in r["quality"]])
            },
        }
        if stage == "grpo":
            out[side]["generate_tokens_per_s_median"] = median(
                [r["generated_tokens"] / max(r["generate_seconds"], 1e-9) for r in runs]
            )
    if stage == "grpo":
        g = [
            (p["lmforge"]["generated_tokens"] / p["lmforge"]["generate_seconds"])
            / (p["trl"]["generated_tokens"] / p["trl"]["generate_seconds"])
            for p in pairs
        ]
        out["generate_tps_ratio"], out["generate_tps_ratio_median"] = g, median(g)
    if noise is not None:
        out["noise"] = {
            k: abs(noise["quality"][k] - pairs[0]["lmforge"]["quality"][k])
            for k in QUALITY[stage]
            if k in noise["quality"]
        }
    return out


def report(stage: str, s: dict[str, Any]) -> list[str]:
    """The console lines of one stage."""
    per = ", ".join(f"{r:.2f}" for r in s["train_ratio"])
    wall = ", ".join(f"{r:.2f}" for r in s["wall_ratio"])
    lm, trl = s["lmforge"], s["trl"]
    lines = [
        f"{stage}: training time lmforge / TRL {s['train_ratio_median']:.2f} (pairs {per}); "
        f"lmforge {lm['train_seconds_median']:.1f} s, TRL {trl['train_seconds_median']:.1f} s",
        # GRPO trains on its own samples: no fixed token count (its generation line follows)
        (
            f"  tokens/s lmforge {lm['tokens_per_s_median']:,.0f}, "
            f"TRL {trl['tokens_per_s_median']:,.0f}; "
            if trl["tokens_per_s_median"]
            else "  "
        )
        + f"whole process lmforge {lm['wall_seconds_median']:.1f} s, TRL "
        f"{trl['wall_seconds_median']:.1f} s, ratio {s['wall_ratio_median']:.2f} (pairs {wall})",
        f"  process CPU seconds lmforge {lm['cpu_seconds_median']:.1f}, TRL "
        f"{trl['cpu_seconds_median']:.1f}, ratio {s['cpu_ratio_median']:.2f}",
    ]
    if "generate_tps_ratio_median" in s:
        lines.append(
            f"  generation tokens/s lmforge {lm['generate_tokens_per_s_median']:,.0f}, TRL "
            f"{trl['generate_tokens_per_s_median']:,.0f}, "
            f"ratio {s['generate_tps_ratio_median']:.2f}"
        )
    quality = "; ".join(
        f"{k.removeprefix('eval/')} lmforge {lm['quality_median'].get(k, float('nan')):.3f} "
        f"TRL {trl['quality_median'].get(k, float('nan')):.3f}"
        + (f" (noise {s['noise'][k]:.3f})" if k in s.get("noise", {}) else "")
        for k in QUALITY[stage]
    )
    lines.append(f"  quality (lmforge's evaluation): {quality}")
    if stage in SAMPLED:  # one rollout draw per pair: the spread is the noise of sampling
        spread = "; ".join(
            f"{k.removeprefix('eval/')} lmforge {_span(lm['quality_range'].get(k))} "
            f"TRL {_span(trl['quality_range'].get(k))}"
            for k in QUALITY[stage]
        )
        lines.append(f"  over the pairs' seeds (lowest-highest): {spread}")
    return lines


def _span(pair: list[float] | None) -> str:
    """'0.675-0.690' from [lowest, highest] (or '-' without values)."""
    return f"{pair[0]:.3f}-{pair[1]:.3f}" if pair else "-"


def versions() -> dict[str, str]:
    """Library versions of both sides."""
    import torch
    import transformers
    import trl

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table; write bench/results/peer-<device>.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=3, help="alternating runs per side")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages")
    shown_steps = ",".join(f"{k}={v}" for k, v in DEFAULT_STEPS.items())
    parser.add_argument("--steps", default="", help=f"N, or stage=N,... (default {shown_steps})")
    parser.add_argument("--init", default="runs/demo", help="pretrained checkpoint (SFT's start)")
    parser.add_argument(
        "--sft-from",
        default="",
        help="the SFT checkpoint reward, DPO and GRPO start from (default: runs/sft if present, "
        "else this benchmark's first lmforge SFT run)",
    )
    parser.add_argument("--noise", type=int, default=1, help="1: re-run lmforge, another seed")
    parser.add_argument(
        "--first-seed",
        type=int,
        default=1,
        help="train.seed of a sampled stage's (GRPO's) first pair; pair i gets first-seed + i - 1",
    )
    parser.add_argument("--work", default="runs/peer", help="directory for both sides' runs")
    parser.add_argument("--out", default="", help="results file (default bench/results/...)")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not (o.startswith("--") and "=" in o)]
    if bad:
        parser.error(f"unknown argument {bad[0]!r} (overrides are --section.key=value)")
    try:  # first: without it nothing else is worth loading
        import trl  # noqa: F401
    except ImportError:
        print("bench/peer.py needs TRL: pip install lmforge[peer]", file=sys.stderr)
        return 2
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"--stages: unknown stage {unknown[0]!r}; choose from {', '.join(STAGES)}")
    import torch
    from common import RESULTS_DIR, device_label, shown

    bench = Bench(args, overrides)
    if not bench.sft_from and "sft" not in stages:
        bench.sft_from = bench.default_sft() or "runs/sft"
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    results: dict[str, Any] = {
        "device": device_label(device),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
        "pairs": args.pairs,
        "steps": {s: bench.steps[s] for s in stages},
        "overrides": overrides,
        "stages": {},
        "ppo": "not compared: TRL 1.x ships no PPO trainer",
    }
    out = Path(args.out) if args.out else RESULTS_DIR / f"peer-{device_label(device)}.json"
    pairs: dict[str, list[dict[str, Any]]] = {s: [] for s in stages}
    noise: dict[str, Any] = {}

    def record() -> list[str]:
        """Summarise what ran so far into `results` and the file (after every pair)."""
        lines = []
        for stage in stages:
            if not pairs[stage]:
                continue
            summary = summarise(stage, pairs[stage], noise.get(stage))
            results["stages"][stage] = {
                "runs": pairs[stage], "noise_run": noise.get(stage), **summary
            }  # fmt: skip
            lines += report(stage, summary)
        results["sft_from"] = bench.sft_from
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
        return lines

    # Pairs outermost: every stage gets its first pair before any gets its second, so a
    # benchmark cut short still compares every stage.
    for i in range(1, args.pairs + 1):
        for stage in stages:
            if stage != "sft" and not bench.sft_from:
                bench.sft_from = bench.default_sft()
            seed = args.first_seed + i - 1 if stage in SAMPLED else None  # another rollout draw
            lm = bench.lmforge(stage, f"lmforge-{stage}-{i}", train_seed=seed)
            if stage == "sft" and not bench.sft_from:
                bench.sft_from = lm["run_dir"]  # the later stages start from this SFT run
            trl_run = bench.trl(stage, f"trl-{stage}-{i}", train_seed=seed)
            pairs[stage].append({"lmforge": lm, "trl": trl_run, "train_seed": seed})
            trl_s = pairs[stage][-1]["trl"]["train_seconds"]
            print(
                f"{stage} pair {i}: training lmforge {lm['train_seconds']:.1f} s, TRL "
                f"{trl_s:.1f} s; whole process lmforge {lm['wall_seconds']:.1f} s, TRL "
                f"{pairs[stage][-1]['trl']['wall_seconds']:.1f} s",
                flush=True,
            )
            record()
        if i == 1 and args.noise:  # early: a benchmark cut short still has its noise
            for stage in stages:
                name = f"lmforge-{stage}-seed{NOISE_SEED}"
                noise[stage] = bench.lmforge(stage, name, NOISE_SEED)
        record()
    lines = record()
    print("\n".join(lines))
    print(f"PPO: {results['ppo']}")
    print(f"wrote {shown(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
