"""`lmforge eval CHECKPOINT_OR_RUN`: harness tasks and/or a user's file, on 1..N processes.

    lmforge eval runs/sft --tasks lmforge_chat_gen,lmforge_chat_mc --chat
    lmforge eval runs/demo --tasks lmforge_corpus --limit 20
    lmforge eval runs/sft --file heldout.jsonl [--reward-fn mymod:score]
    torchrun --nproc_per_node 2 -m lmforge.cli eval runs/demo --tasks lmforge_corpus

Under a launcher (WORLD_SIZE > 1) every process loads the model and the harness gives each its
share of the requests; rank 0 prints and writes the results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.errors import ConfigError

if TYPE_CHECKING:
    import torch


def add_eval(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `eval` subcommand."""
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint with lm-evaluation-harness tasks or your own file",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("checkpoint", help="checkpoint directory, run directory or run_dir/best")
    p.add_argument(
        "--tasks",
        action="append",
        default=[],
        help="comma-separated harness task names (lmforge ships lmforge_corpus, "
        "lmforge_chat_gen, lmforge_chat_mc) or task YAML files / folders; repeatable",
    )
    p.add_argument("--file", help="your own .jsonl/.txt file: text, prompt/answer or preference")
    p.add_argument("--limit", type=float, help="at most this many examples per task (<1: share)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length for --file")
    p.add_argument("--reward-fn", default="", help="--file: reward function (as GRPO's rewards)")
    p.add_argument("--reward-model", default="", help="--file: reward checkpoint for pairs")


def _tasks(values: list[str]) -> list[str]:
    return [t.strip() for v in values for t in v.split(",") if t.strip()]


def _check_args(args: argparse.Namespace) -> list[str]:
    tasks = _tasks(args.tasks)
    if not tasks and not args.file:
        raise ConfigError("lmforge eval: give --tasks (harness tasks) and/or --file (your data)")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: must be at least 1, got {args.batch_size}")
    if args.limit is not None and args.limit <= 0:
        raise ConfigError(f"--limit: must be positive, got {args.limit:g}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ConfigError(f"--num-fewshot: must be >= 0, got {args.num_fewshot}")
    return tasks


def _start_processes() -> tuple[int, int, torch.device]:
    """(rank, world, device); starts the process group under a launcher."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if world > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world, device


def run_eval(args: argparse.Namespace) -> int:
    """Run `lmforge eval`; prints the results and writes them into the checkpoint."""
    from lmforge.checkpoint import load_checkpoint, resolve_checkpoint
    from lmforge.harness.run import results_file, run_harness

    tasks = _check_args(args)
    if tasks:
        from lmforge.harness import require_harness

        require_harness()
    ckpt = resolve_checkpoint(args.checkpoint)
    rank, world, device = _start_processes()
    model, tokenizer, meta = load_checkpoint(ckpt, device=device)
    if tokenizer is None:
        raise ConfigError(f"{ckpt}: has no tokenizer files; lmforge eval needs them")
    limit = None if args.limit is None else (args.limit if args.limit < 1 else int(args.limit))
    start = time.perf_counter()
    results: dict[str, Any] = {}
    if tasks:
        results.update(
            run_harness(
                model,
                tokenizer,
                tasks,
                limit=limit,
                batch_size=args.batch_size,
                num_fewshot=args.num_fewshot,
                chat=args.chat,
            )
        )
    if args.file and rank == 0:
        from lmforge.harness.files import evaluate_file

        bos = tokenizer.bos_token_id
        prefix = bos if bos is not None else tokenizer.eos_token_id
        results[Path(args.file).name] = evaluate_file(
            model,
            tokenizer,
            args.file,
            max_new_tokens=args.max_new_tokens,
            reward_fn=args.reward_fn,
            reward_model=args.reward_model,
            prefix_id=int(prefix or 0),
        )
    if rank != 0:
        return 0
    seconds = time.perf_counter() - start
    names = tasks + ([f"file-{Path(args.file).stem}"] if args.file else [])
    record = {
        "checkpoint": str(ckpt),
        "step": meta.get("step"),
        "stage": meta.get("stage"),
        "tasks": tasks,
        "file": args.file or None,
        "limit": args.limit,
        "num_fewshot": args.num_fewshot,
        "chat": args.chat,
        "processes": world,
        "seconds": round(seconds, 2),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "results": results,
    }
    out = results_file(ckpt, names)
    _write(out, record)
    print(format_results(results))
    done = f"{len(results)} result set(s) in {seconds:.1f}s on {world} process(es)"
    print(f"eval done: {done}; {out}")
    return 0


def _write(path: Path, record: dict[str, Any]) -> None:
    """Write the JSON atomically (a reader never sees half a file)."""
    from lmforge.data.atomic import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def format_results(results: dict[str, dict[str, float]]) -> str:
    """One line per task / file and metric: `task  metric  value`."""
    rows = [(task, metric, value) for task, m in results.items() for metric, value in m.items()]
    if not rows:
        return "(no results)"
    w1 = max(len(r[0]) for r in rows)
    w2 = max(len(r[1]) for r in rows)
    return "\n".join(f"{t:<{w1}}  {m:<{w2}}  {v:.6g}" for t, m, v in rows)
