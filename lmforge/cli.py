"""`lmforge` command line: stages and checkpoint tools.

lmforge pretrain --config configs/pretrain/demo.yaml [--section.key=value ...]
lmforge sample runs/demo --prompt "The import statement" [--max-new-tokens 64]
lmforge inspect runs/demo
lmforge export runs/sft hf/sft [--max-shard-size 2GB] [--dtype bf16]
lmforge plot runs/demo [runs/other ...] [-o curves.png]
lmforge estimate --model 7b --gpus 8
lmforge config-reference [--check]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError, LmforgeError


def _prompt_ids(tokenizer: Any, text: str, chat: bool, system: str | None) -> list[int]:
    """The ids of one prompt: the tokenizer's chat template around a user turn (with a system
    turn when given, and the generation prompt), or plain text after the tokenizer's BOS — the
    way pretraining documents start — unless the text already begins with it."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise LmforgeError("--chat: the checkpoint's tokenizer has no chat template")
        turns = [{"role": "system", "content": system}] if system else []
        turns.append({"role": "user", "content": text})
        rendered = tokenizer.apply_chat_template(
            turns, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(rendered["input_ids"])
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    return ids if bos is None or ids[:1] == [bos] else [bos, *ids]


def _sample(args: argparse.Namespace) -> int:
    from lmforge.checkpoint import load_checkpoint
    from lmforge.generate import GenerateConfig, generate
    from lmforge.stage import stop_ids

    if args.system and not args.chat:
        raise LmforgeError("--system: needs --chat (a system turn belongs to a chat)")
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
    ids = [_prompt_ids(tokenizer, p, args.chat, args.system) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = generate(
        model, ids, cfg, eos_ids=stop_ids(tokenizer), pad_id=pad or 0, tokenizer=tokenizer
    )
    for prompt, text in zip(prompts, out.texts(tokenizer), strict=True):
        print(text if args.chat else prompt + text)
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


def _report(args: argparse.Namespace) -> int:
    from lmforge.report import format_report, report_rows

    print(format_report(report_rows(args.runs)))
    return 0


_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_DTYPES = {
    "auto": None,
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def parse_size(text: str) -> int:
    """Bytes in '2GB' (10^9, as Hugging Face counts), '500MiB' (2^20) or '1000000'."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else ""
    if m is None or unit not in _SIZE_UNITS or float(m.group(1)) <= 0:
        raise ConfigError(
            f"--max-shard-size: cannot read {text!r}; write a size such as 2GB, 500MB or 10GiB"
        )
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def _export(args: argparse.Namespace) -> int:
    import torch

    from lmforge.checkpoint import (
        load_checkpoint,
        load_reward_model,
        read_json,
        resolve_checkpoint,
        save_checkpoint,
    )
    from lmforge.hf import head_of, is_llama_compatible

    src = resolve_checkpoint(args.checkpoint)
    out = Path(args.out)
    max_shard = parse_size(args.max_shard_size)
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"{out}: exists and is not a directory; choose a directory to export to")
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        raise LmforgeError(f"{out}: holds the checkpoint being exported; choose another directory")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise LmforgeError(
            f"{out}: not empty; choose a new directory or pass --force to replace it"
        )
    dtype = _DTYPES[args.dtype]
    head = head_of(read_json(src / "config.json"), str(src / "config.json"))
    loader = load_reward_model if head == "reward" else load_checkpoint
    model, tokenizer, meta = loader(src, dtype=getattr(torch, dtype) if dtype else None)
    keep = ("stage", "step", "tokens_seen", "metrics", "config", "wandb_run_id")
    record = {k: meta[k] for k in keep if k in meta}
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty target: the export's rename puts the real one in its place
    # Written into .OUT.partial/ and renamed into place (a replaced OUT is removed only after).
    save_checkpoint(
        out,
        model,
        tokenizer,
        overwrite=True,
        max_shard_bytes=max_shard,
        parent=str(src),
        **record,
    )
    for file in out.iterdir():  # safetensors writes owner-only files; an export is for sharing
        file.chmod(file.stat().st_mode | 0o444)
    files = sorted(p.name for p in out.iterdir())
    shards = sum(name.endswith(".safetensors") for name in files)
    kind = read_json(out / "config.json")
    print(
        f"exported {src} -> {out}: {kind.get('model_type')} {kind.get('architectures', ['?'])[0]}, "
        f"{kind.get('dtype') or kind.get('torch_dtype')}, {shards} safetensors file(s)"
    )
    if tokenizer is None:
        print(f"note: {src} has no tokenizer files; none were exported", file=sys.stderr)
    if not is_llama_compatible(model.cfg):
        print(
            "note: this architecture is not Llama's: transformers loads it only after "
            "`import lmforge` (which registers it)",
            file=sys.stderr,
        )
    return 0


def _plot(args: argparse.Namespace) -> int:
    from lmforge.plot import save_plot

    print(f"wrote {save_plot(args.run_dirs, args.output)}")
    return 0


def _stage_from_file(path: str, overrides: list[str]) -> tuple[str, Any]:
    """(stage, config) for a YAML whose stage is not given: the stage named like the file, else
    the first stage whose config accepts it; if none does, the closest one's error."""
    from lmforge.config import load_config
    from lmforge.config_reference import STAGES, stage_config_class

    stem = Path(path).stem
    order = sorted(STAGES, key=lambda name: name != stem)
    first_error: LmforgeError | None = None
    for name in order:
        try:
            return name, load_config(stage_config_class(name), path, overrides)
        except LmforgeError as e:
            if "config file" in str(e):
                raise  # the file itself is unreadable: no other stage will do better
            first_error = first_error or e
    assert first_error is not None
    raise ConfigError(f"{first_error} (pass --stage to say which stage the config is for)")


def _preset_model(name: str, overrides: list[str]) -> Any:
    """ModelConfig of preset `name` with `--model.key=value` overrides (no stage config)."""
    from lmforge.config import from_dict, parse_overrides
    from lmforge.model import ModelConfig

    other = [arg for arg in overrides if arg.startswith("--") and not arg.startswith("--model.")]
    if other:
        raise ConfigError(
            f"{other[0].split('=')[0]}: without --config only --model.KEY=VALUE overrides "
            "apply; give --config FILE to estimate a stage config"
        )
    parsed = parse_overrides(overrides)
    return from_dict(ModelConfig, {"preset": name, **parsed.get("model", {})}, prefix="model")


def _estimate(args: argparse.Namespace, overrides: list[str]) -> int:
    from lmforge.config import load_config
    from lmforge.config_reference import stage_config_class
    from lmforge.estimate import (
        configured_layout,
        estimate,
        format_estimate,
        stage_model,
        stage_seq_len,
    )

    if args.gpus < 1:
        raise ConfigError(f"--gpus: must be at least 1, got {args.gpus}")
    layout, stage = None, args.stage or "pretrain"
    if args.config is None:
        if args.model is None:
            raise ConfigError("estimate: give --config FILE or --model PRESET")
        model = _preset_model(args.model, overrides)
        seq_len, micro = model.max_seq_len, 1
    else:
        if args.model is not None:
            overrides = [f"--model={args.model}", *overrides]
        if args.stage is None:
            stage, cfg = _stage_from_file(args.config, overrides)
        else:
            cfg = load_config(stage_config_class(stage), args.config, overrides)
        model = stage_model(cfg)
        layout = configured_layout(cfg, args.gpus)
        seq_len, micro = stage_seq_len(cfg, model), cfg.train.micro_batch_size
    est = estimate(
        model,
        seq_len=args.seq_len or seq_len,
        micro_batch=args.micro_batch or micro,
        gpus=args.gpus,
        precision=args.precision or (layout.precision if layout else "bf16"),
    )
    print(f"{stage}: {args.config}" if args.config else f"model preset {args.model}")
    print(format_estimate(est, layout=layout))
    if args.config and stage in ("dpo", "grpo", "ppo"):
        print(
            f"note: {stage} also holds frozen copies (reference, reward model) and, for ppo, a "
            "trained critic: not counted above"
        )
    return 0


def _config_reference(rest: list[str]) -> int:
    from lmforge.config_reference import main as reference_main

    return reference_main(rest)


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


def _add_export(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `export` subcommand: a checkpoint as a Hugging Face model directory."""
    export = sub.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face model directory",
        description="Write CKPT as a directory that transformers' from_pretrained loads "
        "(config.json, safetensors shards with an index when large, tokenizer files, "
        "generation_config.json). Written into a hidden sibling and renamed when complete.",
    )
    export.add_argument(
        "checkpoint", metavar="CKPT", help="checkpoint directory or run directory (its latest)"
    )
    export.add_argument("out", metavar="OUT", help="directory to create")
    export.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest safetensors file, e.g. 2GB (10^9 bytes) or 500MiB (default 5GB)",
    )
    export.add_argument(
        "--dtype",
        choices=list(_DTYPES),
        default="auto",
        help="weight precision of the export (default auto: as stored)",
    )
    export.add_argument("--force", action="store_true", help="replace a non-empty OUT")


def _add_plot(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `plot` subcommand: the curves of one or more runs as an image."""
    plot = sub.add_parser(
        "plot",
        help="draw the curves each run's stage measures, several runs overlaid",
        description="Draw from each RUN_DIR/metrics.jsonl, against step, a panel per measured "
        "curve: training and held-out loss; reward, KL and response length (GRPO, PPO); "
        "accuracy; pair accuracy and margins (reward, DPO); learning rate and tokens/s. "
        "Several runs share the panels, one colour per run.",
    )
    plot.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.jsonl"
    )
    plot.add_argument(
        "-o",
        "--output",
        help="image file (.png, .svg, .pdf; default RUN_DIR/curves.png for one run, "
        "curves.png here for several)",
    )


def _add_estimate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `estimate` subcommand: size, FLOPs and memory of a run before it runs."""
    est = sub.add_parser(
        "estimate",
        help="parameters, FLOPs per token and memory per GPU for every ZeRO stage",
        description="Size and memory of a training run before it runs: parameters, FLOPs per\n"
        "token (6N + 12·L·H·E·T), model-state memory per GPU for ZeRO stages 0-3 with and\n"
        "without offload (GPU and CPU bytes; ZeRO paper accounting, 16 bytes per parameter\n"
        "for mixed-precision Adam) and activation memory. Extra --section.key=value\n"
        "arguments override the config (only --model.KEY=VALUE without --config).",
        epilog="examples:\n  lmforge estimate --model 7b --gpus 8 --seq-len 4096\n"
        "  lmforge estimate --config configs/pretrain/demo.yaml --model.n_layers=8",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    est.add_argument("--config", help="a stage's YAML config")
    est.add_argument("--model", help="a model preset (configs/model/NAME.yaml) or YAML file")
    est.add_argument(
        "--stage",
        choices=list(_STAGES),
        help="the config's stage (default: guessed from the file)",
    )
    est.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs (default 1)")
    est.add_argument(
        "--seq-len",
        type=int,
        help="tokens per sequence (default: data.seq_len, or the model's max_seq_len)",
    )
    est.add_argument(
        "--micro-batch",
        type=int,
        help="sequences per GPU per forward (default: train.micro_batch_size, or 1)",
    )
    est.add_argument(
        "--precision",
        choices=["bf16", "fp16", "fp32"],
        help="training precision (default: the config's, bf16 for auto)",
    )


def _add_report(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `report` subcommand: what each stage measured."""
    report = sub.add_parser(
        "report",
        help="what each stage measured, as a table",
        description="What each run's checkpoint measured before and after training, the "
        "held-out set behind each number, and which numbers are not comparable.",
    )
    report.add_argument("runs", nargs="+", help="run or checkpoint directories")


def _add_sample(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `sample` subcommand: text generated from a checkpoint."""
    sample = sub.add_parser("sample", help="generate text from a checkpoint")
    sample.add_argument("checkpoint", help="checkpoint directory or run directory")
    sample.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    sample.add_argument("--max-new-tokens", type=int, default=64)
    sample.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    sample.add_argument("--top-k", type=int, default=50)
    sample.add_argument("--top-p", type=float, default=1.0)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--stop", action="append", help="stop string (repeatable)")
    sample.add_argument(
        "--chat",
        action="store_true",
        help="each prompt is a user turn rendered with the checkpoint's chat template; prints "
        "the assistant's answer",
    )
    sample.add_argument("--system", help="with --chat: a system turn before the user's")


def _add_inspect(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `inspect` subcommand: a checkpoint's metadata, its files verified."""
    inspect = sub.add_parser("inspect", help="show a checkpoint's stage, step, metrics, lineage")
    inspect.add_argument("checkpoint", help="checkpoint directory or run directory")
    inspect.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the size and sha256 check of every file",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per tool."""
    parser = argparse.ArgumentParser(
        prog="lmforge",
        description=__doc__.split("\n")[0],
        epilog="`lmforge COMMAND --help` describes each command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Stages and config-reference parse their own arguments (see main); these entries only
    # list them in the help.
    for name, module in _STAGES.items():
        sub.add_parser(
            name, help=f"run the {name} stage ({module}; --dry-run to check)", add_help=False
        )
    sub.add_parser(
        "config-reference",
        help="write docs/config.md, the reference of every config key",
        add_help=False,
    )
    # Added in this order so that `lmforge --help` lists them as before.
    for add in (_add_export, _add_plot, _add_estimate, _add_report, _add_sample, _add_inspect):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lmforge` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _STAGES:
        return _stage(argv[0], argv[1:])
    if argv and argv[0] == "config-reference":
        return _config_reference(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "estimate":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "estimate":
            return _estimate(args, extra)
        tools = {
            "sample": _sample,
            "inspect": _inspect,
            "report": _report,
            "export": _export,
            "plot": _plot,
        }
        return tools[args.command](args)
    except LmforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
