"""Run lm-evaluation-harness tasks on an lmforge model in this process; write the results.

Tasks are harness task names (its own registry), lmforge's shipped local tasks (`lmforge_*`,
see tasks/lmforge_tasks.py), or paths to task YAML files / folders of them. The results of a
checkpoint go to `<checkpoint>/eval/<tasks>.json`, which `lmforge inspect` and `lmforge report`
list.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import ConfigError
from lmforge.harness import require_harness

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
SHIPPED = ("lmforge_corpus", "lmforge_chat_gen", "lmforge_chat_mc")
EVAL_DIR = "eval"


def answer_suffix(tokenizer: Any) -> str:
    """What the tokenizer's chat template writes after an assistant message's text (its end of
    turn), or "" without a template."""
    if not getattr(tokenizer, "chat_template", None):
        return ""
    marker = "\u2063lmforge-answer\u2063"
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}]
    text = str(tokenizer.apply_chat_template(chat, tokenize=False))
    return text.split(marker, 1)[1] if marker in text else ""


def split_tasks(tasks: Sequence[str]) -> tuple[list[str], list[Path]]:
    """(task names, task files or folders): a value that exists on disk is a path."""
    names, paths = [], []
    for task in tasks:
        path = Path(task).expanduser()
        if path.exists():
            paths.append(path.resolve())
        elif task.endswith((".yaml", ".yml")) or "/" in task:
            raise ConfigError(f"--tasks: {task}: no such task file or folder")
        else:
            names.append(task)
    return names, paths


def _yaml_task_names(path: Path) -> list[str]:
    """The `task:` (or `group:`) names that a task YAML file or a folder of them declares."""
    files = sorted(path.rglob("*.yaml")) if path.is_dir() else [path]
    found = []
    for file in files:
        text = file.read_text(errors="replace")
        match = re.search(r"^(?:task|group):\s*['\"]?([\w.\-]+)", text, flags=re.M)
        if match:
            found.append(match.group(1))
    if not found:
        raise ConfigError(f"--tasks: {path}: no task YAML (a file with a `task:` key) found there")
    return found


def run_harness(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    limit: float | None = None,
    batch_size: int = 16,
    num_fewshot: int | None = None,
    chat: bool = False,
    split_ranks: bool = True,
    metadata: dict[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate `model` on `tasks`; {task: {metric: value}} (stderr entries dropped, the
    harness's ",none" filter suffix removed). Under torch.distributed with split_ranks the
    requests are shared out over the ranks; without, every rank runs all of them (what ZeRO-3
    needs: every rank takes part in every forward pass)."""
    require_harness()
    from lm_eval import simple_evaluate

    from lmforge.harness.model import LmforgeLM

    meta = {"answer_suffix": answer_suffix(tokenizer) if chat else "", **(metadata or {})}
    with _quiet_harness():
        manager, requested = resolve_tasks(tasks, meta)
        lm = LmforgeLM(model, tokenizer, batch_size=batch_size)
        if not split_ranks:
            lm._rank, lm._world_size = 0, 1
        out = simple_evaluate(
            model=lm,
            tasks=requested,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            apply_chat_template=chat,
            log_samples=False,
            bootstrap_iters=0,
            verbosity="WARNING",
        )
    if out is None:  # a rank other than 0 of a split run: rank 0 holds the results
        return {}
    return _metrics(out["results"])


def resolve_tasks(
    tasks: Sequence[str], metadata: dict[str, Any] | None = None, *, key: str = "--tasks"
) -> tuple[Any, list[str]]:
    """(the harness's TaskManager, the task names to run) for `tasks`: names and task YAML
    files / folders. An unknown name or a path without tasks is one ConfigError naming `key`.
    The harness's own registry is indexed only when a name is not one of lmforge's."""
    require_harness()
    from lm_eval.tasks import TaskManager

    try:
        names, paths = split_tasks(tasks)
        requested = names + [n for p in paths for n in _yaml_task_names(p)]
    except ConfigError as e:
        raise ConfigError(str(e).replace("--tasks", key, 1)) from None
    if not requested:
        raise ConfigError(f"{key}: name at least one task")
    # lmforge_* names are lmforge's own (none in the harness's registry): a misspelt one is
    # found without indexing the registry's thousands of task files.
    include_defaults = any(n not in SHIPPED and not n.startswith("lmforge_") for n in names)
    # The harness indexes folders: a task file is found through its own folder.
    folders = dict.fromkeys(str(p.parent if p.is_file() else p) for p in paths)
    manager = TaskManager(
        include_path=[str(TASKS_DIR), *folders],
        include_defaults=include_defaults,
        metadata=metadata or {},
    )
    unknown = [n for n in requested if n not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"{key}: unknown task {', '.join(unknown)}; lmforge ships "
            f"{', '.join(SHIPPED)}, and any lm-evaluation-harness task name or task YAML "
            "path works"
        )
    return manager, requested


def _metrics(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The harness's results without stderr entries and with plain metric names."""
    clean: dict[str, dict[str, float]] = {}
    for task, values in results.items():
        row = {}
        for key, value in values.items():
            metric = key.split(",", 1)[0]
            if metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            row[metric] = float(value)
        clean[task] = row
    return clean


@contextlib.contextmanager
def _quiet_harness() -> Iterator[None]:
    """The harness at work without its notes to command-line users (errors still show)."""
    import lm_eval.evaluator as evaluator

    loggers = [logging.getLogger(name) for name in ("lm-eval", "lm_eval")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        # Warnings too: every custom-dataset task warns how to pass --metadata on its CLI.
        logger.setLevel(logging.ERROR)
    # The harness records `git describe` of the working directory (a user's own project, or
    # none: then git prints "fatal: not a git repository"); lmforge records the checkpoint.
    git_hash = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = git_hash
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def results_file(checkpoint: Path, tasks: Sequence[str]) -> Path:
    """<checkpoint>/eval/<tasks>.json, the task list made a file name."""
    stem = "+".join(Path(t).stem if Path(t).suffix else Path(t).name for t in tasks)
    stem = re.sub(r"[^\w.+\-]", "_", stem)[:120] or "tasks"
    return checkpoint / EVAL_DIR / f"{stem}.json"


def listed_results(checkpoint: Path) -> dict[str, Any]:
    """{file name: what it holds} of every evaluation written into a checkpoint."""
    import json

    folder = checkpoint / EVAL_DIR
    found = {}
    for file in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            found[file.name] = json.loads(file.read_text())
        except (OSError, ValueError):
            found[file.name] = "unreadable"
    return found
