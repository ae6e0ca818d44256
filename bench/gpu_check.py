"""The GPU check: on one CUDA device, in one bounded command (`make gpu-check`), everything that
proves lmforge there, written under one folder as it goes:

- the machine: nvidia-smi, library versions, the measured bf16 matmul peak (env.json);
- `pytest -m gpu`: the CUDA tests of the fast paths against the plain paths;
- every stage in bf16, a few steps each, chained as `make demo` chains them (pretrain -> SFT ->
  reward -> DPO -> GRPO -> PPO), then each checkpoint loaded by plain transformers;
- bench/train.py (124M at T=1024 eager and compiled, 1B at T=2048 compiled) and
  bench/generate.py (124M, batch 64, 64 + 256 tokens) against transformers in the same run;
- the 7b preset under ZeRO-3 with activation checkpointing, with and without optimizer offload,
  next to `lmforge estimate`.

Every step is its own process with its own time limit, cut to what the whole budget has left, so
one failure or hang costs only its share; summary.json is rewritten after each step, so a lease
that ends early still leaves what was done (bench/steps.py). Steps a failed step feeds (the stage
chain) are skipped with the reason. The CUDA tests run beside the stage chain and DeepSpeed's
CPU Adam op builds beside everything; each benchmark has the GPU to itself. `--cpu-dry-run` runs
the same steps on the CPU at the smallest sizes: the test suite runs it, so the command a GPU
lease gets has run before.

Usage: python bench/gpu_check.py [--out DIR] [--budget SECONDS] [--cpu-dry-run]
(DIR: --out, else $GPU_OUT, else $OUT, else bench/results/gpu-check).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from steps import Step, run_all, say

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
CPU_ADAM = "build_cpu_adam"  # the background build of DeepSpeed's CPU Adam op
BUDGET_S = 390.0  # all steps, on a GPU: the command, wheels and files back fit in 7 minutes
DRY_SLACK = 3.0  # the dry run's time limits and budget, in multiples of the GPU's


def _stage(script: str, config: str, run: Path, args: list[str]) -> list[str]:
    """A stage's command line: its demo config, the run folder, and the check's overrides."""
    return [PY, str(REPO / script), "--config", str(REPO / config), f"--run_dir={run}", *args]


def stage_steps(out: Path, dry: bool) -> list[Step]:
    """pretrain -> SFT -> reward -> DPO -> GRPO -> PPO, a few steps each, bf16 on a GPU (fp32 on
    the CPU), each from the checkpoint before it, then the transformers load of every one."""
    runs = out / "runs"
    steps = 2 if dry else 5
    common = [f"--train.steps={steps}", "--train.eval_every=0", f"--train.save_every={steps}"]
    common += ["--train.epochs=0", "--train.early_stop=0", '--train.keep_best=""']
    common += ["--tracking.log_every=1", f"--engine.precision={'fp32' if dry else 'bf16'}"]
    # the CPU: 8 rows a step, 64 chat examples; a GPU: the demo configs' own sizes
    small = ["--train.global_batch_size=8", "--train.micro_batch_size=8"] if dry else []
    chat = ["--data.num_train=64", "--data.num_heldout=8", *small] if dry else []
    pre = ["--data.max_documents=200", "--train.eval_batches=1", "--train.samples=0"]
    if dry:
        pre += ["--model=debug", "--tokenizer.vocab_size=512", "--data.seq_len=64", *small]
        pre += [f"--data.cache_dir={out / 'cache'}"]
    sft, reward = runs / "sft", runs / "reward"
    rl = [f"--init_from={sft}", *chat, *(["--max_new_tokens=8"] if dry else [])]
    # DPO and GRPO need only the SFT checkpoint: they run beside reward -> PPO (small models,
    # light on a GPU), and the transformers load waits for them.
    table = [
        ("pretrain", "pretrain/train.py", "configs/pretrain/demo.yaml", pre, [], False),
        ("sft", "finetune/sft.py", "configs/finetune/sft.yaml",
         [f"--init_from={runs / 'pretrain'}", *chat], ["pretrain"], False),
        ("dpo", "finetune/dpo.py", "configs/finetune/dpo.yaml",
         [f"--init_from={sft}", *chat], ["sft"], True),
        ("grpo", "finetune/grpo.py", "configs/finetune/grpo.yaml",
         [*rl, *(["--group_size=4"] if dry else [])], ["sft"], True),
        ("reward", "finetune/reward.py", "configs/finetune/reward.yaml",
         [f"--init_from={sft}", *chat], ["sft"], False),
        ("ppo", "finetune/ppo.py", "configs/finetune/ppo.yaml",
         [*rl, f"--reward_model={reward}"], ["sft", "reward"], False),
    ]  # fmt: skip
    out_steps = [
        Step(name, _stage(script, cfg, runs / name, [*common, *args]), 45, needs, background)
        for name, script, cfg, args, needs, background in table
    ]
    names = [s.name for s in out_steps]
    load = [PY, str(Path(__file__).resolve()), "--hf-load", str(runs), *names]
    return [*out_steps, Step("hf_load", load, 60, needs=names, wait_for=["dpo", "grpo"])]


def bench_steps(out: Path, dry: bool) -> list[Step]:
    """The throughput benchmarks against transformers, and the 7b preset's memory check. The
    CPU dry run leaves out --compile: compiling costs a minute a step on a CPU, and the compiled
    paths have their own CPU tests."""
    res = out / "bench"
    compile_ = [] if dry else ["--compile"]
    train, gen = [PY, str(REPO / "bench" / "train.py")], [PY, str(REPO / "bench" / "generate.py")]
    if dry:  # the same scripts and options at the smallest sizes
        t = ["--model=debug", "--seq-len=32", "--micro-batch=2", "--steps=1", "--warmup=1"]
        big, big_t, big_off = "debug", [*t, "--activation-checkpointing", "--no-baseline"], []
        t = t1b = [*t, "--profile-steps=1"]
        g = ["--model=debug", "--batch=4", "--prompt-len=8", "--new-tokens=8", "--repeats=1"]
        g_eager = g
    else:
        # the lease is short: 10 timed steps of each side, then 3 of lmforge's profiled
        few = ["--steps=10", "--warmup=2", "--profile-steps=3"]
        t = ["--model=gpt2-124m", "--seq-len=1024", "--micro-batch=16", *few]
        t1b = ["--model=1b", "--seq-len=2048", "--micro-batch=8", *few]
        # the 7b preset is checked against its memory estimate, not a baseline: 1 + 3 steps,
        # 1 + 2 with the optimizer offloaded (its Adam steps take seconds each on the CPU)
        big, big_t = "7b", ["--model=7b", "--seq-len=2048", "--micro-batch=1", "--warmup=1"]
        big_t += ["--activation-checkpointing", "--no-baseline", "--steps=3"]
        big_off = ["--steps=2"]  # the later option wins
        g = ["--model=gpt2-124m", "--batch=64", "--prompt-len=64", "--new-tokens=256"]
        # transformers' eager generate takes some 20 s a call at this size: 1 + 2 calls
        g, g_eager = [*g, "--repeats=3"], [*g, "--repeats=2"]
    est = [PY, "-m", "lmforge.cli", "estimate", f"--model={big}", "--seq-len=2048"]
    # Most telling first: the budget cuts the tail. The eager generation's baseline is slow and
    # its figure is known, so it comes last. A compiled step compiles both sides (about a
    # minute each); a training step that stops in the baseline's half still leaves lmforge's
    # figures (bench/train.py saves them first).
    runs = [  # name (and its record, bench/NAME.json), arguments, time limit
        ("train_124m_zero2", [*train, *t, "--zero=2"], 120),
        ("train_124m_zero1_compile", [*train, *t, "--zero=1", *compile_], 180),
        ("generate_124m_compile", [*gen, *g, *compile_], 200),
        ("train_1b_zero2_compile", [*train, *t1b, "--zero=2", *compile_], 180),
        ("train_7b_zero3", [*train, *big_t, "--zero=3"], 120),
        ("train_7b_zero3_offload", [*train, *big_t, *big_off, "--zero=3", "--offload"], 150),
        ("generate_124m", [*gen, *g_eager], 120),
    ]
    steps = [Step(name, [*argv, f"--out={res / name}.json"], limit) for name, argv, limit in runs]
    steps.insert(4, Step("estimate_7b", est, 60))  # before the 7b runs, whatever they do
    steps[-2].wait_for.append(CPU_ADAM)
    for step in steps:  # a benchmark has the GPU to itself
        step.wait_for.insert(0, "pytest_gpu")
    return steps


def plan(out: Path, dry: bool) -> list[Step]:
    """Every step, most important first: what a short lease must not miss comes early. The
    CUDA tests (light on the GPU) run beside the stage chain, and the optimizer-offload op
    builds on the CPU beside everything until the offloaded run needs it; the benchmarks wait
    for the tests, so each has the GPU to itself."""
    env = Step(
        "env", [PY, str(Path(__file__).resolve()), "--env-report", str(out / "env.json")], 60
    )
    tests = [PY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    # DeepSpeed's CPU Adam compiles on first use (a minute): built once, here, for the later run
    build = [
        PY,
        "-c",
        "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()",
    ]
    steps = [
        env,
        Step("pytest_gpu", tests, 150, background=True),
        Step(CPU_ADAM, build, 240, background=True),
        *stage_steps(out, dry),
        *bench_steps(out, dry),
    ]
    if dry:  # a CPU of a few cores runs several steps at once, beside the rest of a test run
        for step in steps:
            step.timeout *= DRY_SLACK
    return steps


def check_env(dry: bool) -> dict[str, str]:
    """The environment of every step: unbuffered output, offline hubs, and on the CPU the settings
    the CPU test runs use (DeepSpeed's CPU accelerator, one thread) and the CUDA tests' CPU
    device."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    env.update(HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    # DeepSpeed's op builds read each entry as numbers and fail on an architecture-specific
    # one ("9.0a", as GPU images set it for Hopper); unset, they probe the device themselves
    if arch := env.get("TORCH_CUDA_ARCH_LIST"):
        env["TORCH_CUDA_ARCH_LIST"] = re.sub(r"(\d+\.\d+)[a-z]+", r"\1", arch)
    if dry:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        env["LMFORGE_GPU_TESTS_DEVICE"] = "cpu"  # tests/test_gpu.py runs its checks on the CPU
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def env_report(path: Path) -> None:
    """nvidia-smi, library versions, the device and its measured bf16 matmul peak -> `path`."""
    import torch

    from lmforge.tracking import measure_peak_flops

    smi = shutil.which("nvidia-smi")
    report: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("transformers", "deepspeed", "datasets", "accelerate", "trl"):
        try:
            report[name] = __import__(name).__version__
        except Exception as err:  # a missing or broken package is part of the report
            report[name] = f"unavailable: {type(err).__name__}: {err}"
    report["cuda"] = torch.version.cuda
    cuda = torch.cuda.is_available()
    report["device"] = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = measure_peak_flops(torch.device("cuda")) if cuda else None
    report["bf16_matmul_peak_tflops"] = round(peak / 1e12, 1) if peak else None
    if smi:
        report["nvidia_smi"] = subprocess.run([smi], capture_output=True, text=True).stdout
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "nvidia_smi"}, indent=2))


def hf_load(runs: Path, names: list[str]) -> None:
    """Load each stage's latest checkpoint with plain transformers (the reward model as a
    sequence classifier) and run one forward; raise on the first that fails."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from lmforge.checkpoint import read_latest

    for name in names:
        run = runs / name
        latest = read_latest(run)
        if latest is None:
            raise SystemExit(f"{run}: no latest checkpoint; see logs/{name}.log")
        ckpt = run / latest
        auto = AutoModelForSequenceClassification if name == "reward" else AutoModelForCausalLM
        model = auto.from_pretrained(ckpt)
        with torch.no_grad():
            out = model(torch.tensor([[1, 2, 3, 4]]))
        if not torch.isfinite(out.logits.float()).all():
            raise SystemExit(f"{ckpt}: transformers' forward gives non-finite values")
        print(f"{name}: {ckpt.name} loads in transformers ({type(model).__name__}), ok")


def report(out: Path, env: dict[str, str]) -> None:
    """The targets against the measurements (bench/gpu_report.py): report.md and report.json in
    `out`, the table printed; its own process, so a failure there only says so."""
    script = [PY, str(REPO / "bench" / "gpu_report.py"), str(out)]
    try:
        job = subprocess.run(script, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        say(out, "report: timed out after 60 s")
        return
    (out / "logs" / "report.log").write_text(job.stdout + job.stderr)
    if job.returncode == 0:
        print(job.stdout, end="", flush=True)
    else:
        last = (job.stderr.strip().splitlines() or ["no output"])[-1]
        say(out, f"report: failed ({last}); see logs/report.log")


def main(argv: list[str] | None = None) -> int:
    """Run the check; exit 1 when a step did not succeed (the summary says which)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="", help="result folder ($GPU_OUT, $OUT, or bench/results/)")
    ap.add_argument(
        "--budget", type=float, default=None, help=f"seconds for all steps ({BUDGET_S:.0f})"
    )
    ap.add_argument("--cpu-dry-run", action="store_true", help="same steps, smallest sizes, CPU")
    ap.add_argument("--only", default="", help="comma-separated step names to run")
    ap.add_argument("--env-report", default="", help=argparse.SUPPRESS)
    ap.add_argument("--hf-load", nargs="+", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.env_report:
        env_report(Path(args.env_report))
        return 0
    if args.hf_load:
        hf_load(Path(args.hf_load[0]), args.hf_load[1:])
        return 0
    default = REPO / "bench" / "results" / "gpu-check"
    out = Path(args.out or os.environ.get("GPU_OUT") or os.environ.get("OUT") or default)
    steps = plan(out.resolve(), args.cpu_dry_run)
    if args.only:
        keep = set(args.only.split(","))
        unknown = keep - {s.name for s in steps}
        if unknown:
            names = ", ".join(s.name for s in steps)
            print(f"--only: no step {', '.join(sorted(unknown))}; steps: {names}", file=sys.stderr)
            return 2
        steps = [s for s in steps if s.name in keep]
        for s in steps:
            s.needs = [n for n in s.needs if n in keep]
    budget = args.budget or BUDGET_S * (DRY_SLACK if args.cpu_dry_run else 1.0)
    start = time.monotonic()
    summary = run_all(
        steps, out.resolve(), budget, check_env(args.cpu_dry_run), dry_run=args.cpu_dry_run
    )
    states = [r["status"] for r in summary["steps"].values()]
    report(out.resolve(), check_env(args.cpu_dry_run))
    say(
        out.resolve(),
        f"gpu check: {states.count('ok')}/{len(states)} steps ok in "
        f"{time.monotonic() - start:.0f} s; results and logs in {out}",
    )
    return 0 if all(s == "ok" for s in states) else 1


if __name__ == "__main__":
    sys.exit(main())
