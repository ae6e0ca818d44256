"""The Markdown reference of every stage config (docs/config.md), generated from the config
dataclasses' `option(doc=...)` strings, and the stage index (lmforge/stage_index.json): each
stage's `--help` text, which `lmforge STAGE --help` prints without importing the stage (its
config class lists the top-level keys, and it lives in a module that imports torch: seconds).

    python -m lmforge.config_reference            # rewrite docs/config.md and the index
    python -m lmforge.config_reference --check    # exit 1 when either is stale
    lmforge config-reference [--check]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

from lmforge.config import _type_name, describe
from lmforge.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "docs" / "config.md"
INDEX = Path(__file__).with_name("stage_index.json")
HELP_COLUMNS = 100  # the width of the stored stage help texts
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


def stage_help(stage: str) -> str:
    """The text `python STAGE_SCRIPT --help` prints (the stage's own parser, run_entry's), with
    lines wrapped at HELP_COLUMNS whatever the terminal, so that the index is the same
    everywhere."""
    module = importlib.import_module(STAGES[stage].partition(":")[0])
    out, columns = io.StringIO(), os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(HELP_COLUMNS)  # argparse wraps at $COLUMNS
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            module.main(["--help"])
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    return out.getvalue()


def stage_index() -> dict[str, dict[str, str]]:
    """Per stage, its help text ("help"), as `lmforge STAGE --help` prints it."""
    return {stage: {"help": stage_help(stage)} for stage in STAGES}


def render_index() -> str:
    """The stage index as the JSON text stored in lmforge/stage_index.json."""
    return json.dumps(stage_index(), indent=2) + "\n"


def _sync(path: Path, text: str, check: bool) -> bool:
    """Whether `path` holds `text`; without `check`, make it so (written whole, then renamed)."""
    current = path.read_text(encoding="utf-8") if path.exists() else None
    if check or current == text:
        return current == text
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return True


def main(argv: list[str] | None = None) -> int:
    """Write the reference and the stage index, or with --check report whether the files on disk
    are current."""
    parser = argparse.ArgumentParser(
        prog="lmforge config-reference",
        description="Generate the Markdown reference of every stage config (docs/config.md).",
    )
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, help="file to write")
    parser.add_argument(
        "--index",
        type=Path,
        help="stage index to write (default: lmforge/stage_index.json, unless -o is given)",
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if the file is out of date"
    )
    args = parser.parse_args(argv)
    # -o alone writes a Markdown copy elsewhere and leaves the package's index alone
    index = args.index or (INDEX if args.output == DEFAULT_OUTPUT else None)
    files = [(args.output, render())] + ([(index, render_index())] if index else [])
    stale = [path for path, text in files if not _sync(path, text, args.check)]
    if args.check:
        for path in stale:
            print(f"{path} is out of date; refresh it with: {REFRESH}", file=sys.stderr)
        if not stale:
            print(" and ".join(f"{path}" for path, _ in files) + " up to date")
        return 1 if stale else 0
    for path, _ in files:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
