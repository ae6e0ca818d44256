"""The Markdown reference of every stage config (docs/config.md), generated from the config
dataclasses' `option(doc=...)` strings.

    python -m lmforge.config_reference            # rewrite docs/config.md
    python -m lmforge.config_reference --check    # exit 1 when docs/config.md is stale
    lmforge config-reference [--check]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import typing
from pathlib import Path
from typing import Any

from lmforge.config import _type_name, describe
from lmforge.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "docs" / "config.md"
REFRESH = ".venv/bin/python -m lmforge.config_reference"

# stage name -> its config class, "module:Class"; the script is the module's file
STAGES: dict[str, str] = {
    "pretrain": "pretrain.train:PretrainConfig",
    "sft": "finetune.sft:SFTConfig",
    "reward": "finetune.reward:RewardConfig",
    "dpo": "finetune.dpo:DPOConfig",
    "grpo": "finetune.grpo:GRPOConfig",
    "ppo": "finetune.ppo:PPOConfig",
}
EXAMPLES = {"pretrain": "configs/pretrain/demo.yaml"}  # else configs/finetune/<stage>.yaml


def stage_config_class(stage: str) -> type:
    """The config dataclass of a stage ("pretrain", "sft", ...)."""
    if stage not in STAGES:
        raise ConfigError(f"stage '{stage}': unknown; choose one of {', '.join(STAGES)}")
    module, _, name = STAGES[stage].partition(":")
    return getattr(importlib.import_module(module), name)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return f"`{_cell(text)}`" if text else ""


def _field_type(cls: type, key: str) -> Any:
    """The resolved annotation of a dotted key (`optim.schedule` -> Literal[...])."""
    tp: Any = cls
    for name in key.split("."):
        tp = typing.get_type_hints(tp)[name]
    return tp


def render_stage(stage: str) -> str:
    """The section of one stage: a table of key, type, default and meaning."""
    cls = stage_config_class(stage)
    script = STAGES[stage].partition(":")[0].replace(".", "/") + ".py"
    example = EXAMPLES.get(stage, f"configs/finetune/{stage}.yaml")
    doc = (cls.__doc__ or "").strip().split("\n")[0]
    lines = [
        f"## {stage}",
        "",
        f"{doc} `{script}`; example: `{example}`.",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for key, written, default, text in describe(cls):
        if default == "":  # a section: its doc as a heading row
            lines.append(f"| **{_cell(key)}** | {_code(written)} | | {_cell(text)} |")
            continue
        tp = _field_type(cls, key)
        shown = written if dataclasses.is_dataclass(tp) else _type_name(tp)
        lines.append(f"| `{_cell(key)}` | {_code(shown)} | {_code(default)} | {_cell(text)} |")
    return "\n".join(lines)


def render() -> str:
    """The whole reference, every stage in pipeline order."""
    head = [
        "# Configuration reference",
        "",
        f"Generated from the config dataclasses by `{REFRESH}`; do not edit by hand.",
        "",
        "Set a key in a YAML file (`--config FILE`) or on the command line as",
        "`--section.key=value` (a YAML value: `--train.steps=100`, `--data.tasks=[add,sort]`);",
        "the command line wins over the YAML, the YAML over these defaults. `model` also takes a",
        "preset name from `configs/model/` (`--model=gpt2-124m`). Defaults are shown as Python",
        "values: `None` is `null` in YAML, `True` is `true`.",
        "",
        "Stages: " + ", ".join(f"[{name}](#{name})" for name in STAGES) + ".",
    ]
    body = [render_stage(name) for name in STAGES]
    return "\n\n".join(["\n".join(head), *body]) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the reference, or with --check report whether the file on disk is current."""
    parser = argparse.ArgumentParser(
        prog="lmforge config-reference",
        description="Generate the Markdown reference of every stage config (docs/config.md).",
    )
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, help="file to write")
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if the file is out of date"
    )
    args = parser.parse_args(argv)
    text = render()
    current = args.output.read_text(encoding="utf-8") if args.output.exists() else None
    if args.check:
        if current != text:
            print(f"{args.output} is out of date; refresh it with: {REFRESH}", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    if current != text:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_name(f".{args.output.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
