"""Peak memory and step time of GRPO steps at a 32k vocabulary (issue 15, lean log-probs).

    python bench/grpo_memory.py --logprobs [--vocab V]
    python bench/grpo_memory.py [--repo DIR] [--steps N] [--vocab V]

--logprobs: the log-prob work of one GRPO step of the demo config's shape (64 sequences of
prompt + 12 answer tokens, 48 positions, in 2 micro-batches of 32: the reference pass, the old
policy pass, then forward and backward of the clipped loss), on the tiny preset with a V-entry
output layer, once the plain way (fp32 log_softmax over the whole (32, 48, V) logits, and the old
pass) and once the lean way (lmforge.rollout.token_logprobs, chunked; no old pass, as GRPO
with one epoch now runs), each in a fresh process: the peak resident memory above the
process's own before the step (getrusage), and the seconds.

Without --logprobs:
builds a random-weight start checkpoint once (the tiny preset with a V-entry output layer, the
builtin tasks' tokenizer; sampled ids past the tokenizer's own entries decode to nothing), then
runs the GRPO stage of the demo config (configs/finetune/grpo.yaml: 8 prompts × G=8 per step,
micro-batches of 32 sequences, 12 new tokens) for N steps in a fresh process, from this
repository or from another checkout (--repo: e.g. a worktree of an older commit, to compare
before and after). Prints the child's peak resident memory (getrusage of the waited-for child:
a fresh process per variant) and the median step, generation and training seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_start(path: Path, vocab: int) -> None:
    """A random-weight tiny-preset checkpoint with a `vocab`-entry embedding and output."""
    from lmforge.checkpoint import save_checkpoint
    from lmforge.config import load_preset
    from lmforge.data.tasks import task_examples
    from lmforge.model import ModelConfig, build_model
    from lmforge.tokenizer import train_tokenizer

    texts = [m["content"] for ex in task_examples("train", 2000, 1) for m in ex["messages"]]
    tok = train_tokenizer(texts, vocab_size=400)
    cfg = load_preset(ModelConfig, "tiny")
    cfg.vocab_size = vocab
    model = build_model(cfg, seed=0)
    save_checkpoint(path / "step-000000", model, tok, update_latest=True, stage="sft", step=0)


def run(repo: Path, start: Path, run_dir: Path, steps: int) -> dict[str, float]:
    """One GRPO run of the demo config in a fresh process; its peak RSS and median timings."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, str(repo / "finetune/grpo.py"),
        "--config", str(repo / "configs/finetune/grpo.yaml"),
        f"--init_from={start}", f"--run_dir={run_dir}", f"--train.steps={steps}",
        "--train.save_every=1000", "--data.num_heldout=4", "--tracking.log_every=1",
    ]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_gib = child.ru_maxrss / 2**20  # KiB on Linux
    cpu = child.ru_utime + child.ru_stime  # the whole process: start-up, steps, saving
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step_seconds" in r][1:] or rows  # the first step warms up
    med = {k: statistics.median(r[k] for r in rows if k in r) for k in ("step_seconds",)}
    for key in ("time/generation_seconds", "train_seconds", "generate_seconds"):
        med[key] = statistics.median(r[key] for r in rows if key in r)
    rss = max((r["memory/rss_gb"] for r in rows if "memory/rss_gb" in r), default=0.0)
    return {"peak_rss_gib": peak_gib, "rss_after_steps_gib": rss, "process_cpu_s": cpu, **med}


def logprobs_step(variant: str, vocab: int) -> dict[str, float]:
    """The log-prob work of one GRPO step (see the module docstring), in this process."""
    import time

    import torch

    from lmforge.config import load_preset
    from lmforge.model import ModelConfig, build_model
    from lmforge.rl import grpo_loss
    from lmforge.rollout import token_logprobs

    torch.manual_seed(0)
    cfg = load_preset(ModelConfig, "tiny")
    cfg.vocab_size = vocab
    policy, reference = build_model(cfg, seed=0), build_model(cfg, seed=0).requires_grad_(False)
    n, length, answer, micro = 64, 48, 12, 32
    ids = torch.randint(0, vocab, (n, length))  # (N, L)
    labels = torch.full((n, length), -100)
    labels[:, -answer - 1 : -1] = ids[:, -answer:]
    chunks = [{"input_ids": ids[s : s + micro], "labels": labels[s : s + micro]}
              for s in range(0, n, micro)]  # fmt: skip
    cpu = torch.device("cpu")

    def plain(model: torch.nn.Module, c: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=c["input_ids"]).float() / 1.0  # (n, L, V): before issue 15
        logp = torch.log_softmax(logits, dim=-1)
        picked = logp.gather(-1, c["labels"].clamp(min=0)[..., None]).squeeze(-1)
        return picked * (c["labels"] != -100)

    def lean(model: torch.nn.Module, c: dict[str, torch.Tensor]) -> torch.Tensor:
        return token_logprobs(model, c, 1.0, cpu)

    fn = plain if variant == "plain" else lean
    adv = torch.randn(micro)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        ref = [fn(reference, c) for c in chunks]
        old = [fn(policy, c) for c in chunks] if variant == "plain" else []
    for j, c in enumerate(chunks):
        logp = fn(policy, c)
        mask = (c["labels"] != -100).float()
        loss, _ = grpo_loss(logp, old[j] if old else logp.detach(), ref[j], adv, mask, 0.2, 0.04)
        loss.backward()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mib = (peak - base) / 1024
    return {"variant": variant, "step_peak_mib": mib, "seconds": seconds, "cpu_seconds": cpu}


def main() -> None:
    """Parse arguments, build the start checkpoint, run one variant, print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose GRPO to run")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--start", type=Path, default=None, help="reuse a start checkpoint")
    parser.add_argument("--logprobs", action="store_true", help="the log-prob work alone")
    parser.add_argument("--variant", choices=("plain", "lean"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # a child of --logprobs: one variant in a fresh process
        print(json.dumps(logprobs_step(args.variant, args.vocab)))
        return
    if args.logprobs:
        for variant in ("plain", "lean"):
            cmd = [sys.executable, __file__, f"--vocab={args.vocab}", f"--variant={variant}"]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            print(out.stdout.strip().splitlines()[-1])
        return
    with tempfile.TemporaryDirectory() as tmp:
        start = args.start or Path(tmp) / "start"
        if not (start / "latest").exists():
            make_start(start, args.vocab)
        result = run(args.repo.resolve(), start, Path(tmp) / "grpo", args.steps)
    made = {"vocab": args.vocab} if args.start is None else {"start": str(args.start)}
    print(json.dumps({"repo": str(args.repo), **made, **result}))


if __name__ == "__main__":
    main()
