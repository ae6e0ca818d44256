"""`lmforge` command line: stages and checkpoint tools.

lmforge pretrain --config configs/pretrain/demo.yaml [--section.key=value ...]
lmforge sample runs/demo --prompt "The import statement" [--max-new-tokens 64]
lmforge inspect runs/demo
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lmforge.errors import LmforgeError


def _sample(args: argparse.Namespace) -> int:
    from lmforge.checkpoint import load_checkpoint
    from lmforge.generate import GenerateConfig, generate

    model, tokenizer, _ = load_checkpoint(args.checkpoint)
    if tokenizer is None:
        raise LmforgeError(f"{args.checkpoint}: has no tokenizer files; cannot encode a prompt")
    cfg = GenerateConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_strings=args.stop or [],
    )
    prompts = args.prompt or [""]
    ids = [
        [tokenizer.bos_token_id, *tokenizer.encode(p, add_special_tokens=False)] for p in prompts
    ]
    end = tokenizer.convert_tokens_to_ids("<|end|>") if "<|end|>" in tokenizer.get_vocab() else None
    eos = [t for t in (tokenizer.eos_token_id, end) if t is not None]
    out = generate(model, ids, cfg, eos_ids=eos, pad_id=tokenizer.pad_token_id, tokenizer=tokenizer)
    for prompt, text in zip(prompts, out.texts(tokenizer), strict=True):
        print(prompt + text)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from lmforge.checkpoint import META_FILE, read_json, resolve_checkpoint, verify_files

    ckpt = resolve_checkpoint(args.checkpoint)
    meta: dict[str, Any] = read_json(ckpt / META_FILE) if (ckpt / META_FILE).exists() else {}
    if args.verify and meta:
        verify_files(ckpt, meta, engine=True)
    hf = read_json(ckpt / "config.json")
    info = {
        "path": str(ckpt),
        "model_type": hf.get("model_type"),
        "stage": meta.get("stage"),
        "step": meta.get("step"),
        "tokens_seen": meta.get("tokens_seen"),
        "parent": meta.get("parent"),
        "created": meta.get("created"),
        "metrics": meta.get("metrics", {}),
        "files": len(meta.get("files", {})),
        "verified": bool(args.verify and meta),
    }
    print(json.dumps(info, indent=2))
    return 0


# What each stage exists for, as (metric label, key before, key after) read from lmforge.json.
_REPORT = {
    "pretrain": [("validation loss", None, "eval/causal/loss")],
    "sft": [
        ("held-out exact match", "eval_before/accuracy", "eval/accuracy"),
        ("held-out loss", "eval_before/loss", "eval/loss"),
    ],
    "reward": [("held-out pair accuracy", "eval_before/accuracy", "eval/accuracy")],
    "dpo": [
        ("held-out implicit-reward accuracy", None, "eval/reward_accuracy"),
        ("policy prefers chosen", "eval_before/prefers_chosen", "eval/prefers_chosen"),
        ("mean log-prob margin", "eval_before/logp_margin", "eval/logp_margin"),
    ],
    "grpo": [
        ("held-out exact match", "eval_before/accuracy", "eval/accuracy"),
        ("mean rollout reward", None, "reward"),
    ],
    "ppo": [
        ("held-out exact match", "eval_before/accuracy", "eval/accuracy"),
        ("mean rollout reward", None, "reward"),
        ("KL to the start", None, "kl"),
    ],
}


def _report(args: argparse.Namespace) -> int:
    from lmforge.checkpoint import META_FILE, read_json, resolve_checkpoint

    rows = []
    for run in args.runs:
        ckpt = resolve_checkpoint(run)
        meta = read_json(ckpt / META_FILE)
        stage, metrics = meta.get("stage", "?"), meta.get("metrics", {})
        for label, before, after in _REPORT.get(stage, []):
            old = metrics.get(before) if before else None
            new = metrics.get(after)
            rows.append(
                (
                    stage,
                    label,
                    "" if old is None else f"{old:.3f}",
                    "" if new is None else f"{new:.3f}",
                    str(ckpt),
                )
            )
    header = ("stage", "measure", "before", "after", "checkpoint")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


_STAGES = {
    "pretrain": "pretrain.train",
    "sft": "finetune.sft",
    "reward": "finetune.reward",
    "dpo": "finetune.dpo",
    "grpo": "finetune.grpo",
    "ppo": "finetune.ppo",
}


def _stage(name: str, rest: list[str]) -> int:
    import importlib

    return importlib.import_module(_STAGES[name]).main(rest)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per tool."""
    parser = argparse.ArgumentParser(prog="lmforge", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in _STAGES.items():
        sub.add_parser(name, help=f"run the {name} stage ({module})", add_help=False)
    report = sub.add_parser("report", help="what each stage measured, as a table")
    report.add_argument("runs", nargs="+", help="run or checkpoint directories")
    sample = sub.add_parser("sample", help="generate text from a checkpoint")
    sample.add_argument("checkpoint", help="checkpoint directory or run directory")
    sample.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    sample.add_argument("--max-new-tokens", type=int, default=64)
    sample.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    sample.add_argument("--top-k", type=int, default=50)
    sample.add_argument("--top-p", type=float, default=1.0)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--stop", action="append", help="stop string (repeatable)")
    inspect = sub.add_parser("inspect", help="show a checkpoint's stage, step, metrics, lineage")
    inspect.add_argument("checkpoint", help="checkpoint directory or run directory")
    inspect.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the size and sha256 check of every file",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lmforge` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _STAGES:
        return _stage(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return {"sample": _sample, "inspect": _inspect, "report": _report}[args.command](args)
    except LmforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
