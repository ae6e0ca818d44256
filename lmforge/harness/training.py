"""lm-evaluation-harness tasks at every evaluation of a training run (the `eval` section).

With `eval.harness_tasks` set, each evaluation the loop makes (before training where the stage
has one, every train.eval_every steps, at the end) also runs those tasks on the live model: the
main engine's inference model, in eval mode, without gradients. Their metrics join the
evaluation's as `harness/<task>/<metric>` (metrics.jsonl, the console line, W&B) and can be the
metric train.keep_best and train.early_stop follow.

Processes: the harness shares the requests out over the ranks and gathers the results on rank 0,
which sends the metrics to every rank (each rank judges keep_best alike). Under ZeRO-3 every rank
must take part in every forward pass, so there every rank runs every request instead.

The harness seeds Python's, NumPy's and torch's generators when it starts; the run's generators
are put back afterwards, so a run's training is the same with and without harness tasks.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from lmforge.config import option
from lmforge.errors import ConfigError

PREFIX = "harness/"  # metrics.jsonl key prefix of in-training harness metrics
BEFORE = "harness_before/"  # the same metrics measured before training, in a run's last metrics
COUNTS = ("sample_len",)  # what the harness reports beside metrics: examples, not a measure


@dataclass
class EvalConfig:
    """lm-evaluation-harness tasks run at each of the stage's evaluations."""

    harness_tasks: list[str] = option(
        default_factory=list,
        doc="Harness tasks to run at every evaluation (names such as lmforge_chat_mc, or task "
        "YAML files / folders); metrics logged as harness/<task>/<metric>. [] = off.",
    )
    harness_limit: float = option(
        0.0, "At most this many examples per task (below 1: that share of each task); 0 = all."
    )
    harness_chat: Literal["auto", "chat", "plain"] = option(
        "auto",
        "Apply the model's chat template to the tasks' prompts: chat, plain, or auto = chat for "
        "finetuning stages whose tokenizer has a chat template, plain for pretraining.",
    )
    harness_batch_size: int = option(16, "Rows per forward pass of the harness.")

    def validate(self, prefix: str = "eval") -> None:
        """Reject bad sizes; with tasks, a missing harness or an unknown task (one line each),
        at config load, before any data is read."""
        p = f"{prefix}." if prefix else ""
        if self.harness_limit < 0:
            raise ConfigError(f"{p}harness_limit: must be >= 0, got {self.harness_limit:g}")
        if self.harness_batch_size < 1:
            raise ConfigError(
                f"{p}harness_batch_size: must be at least 1, got {self.harness_batch_size}"
            )
        if self.harness_tasks:
            check_tasks(self.harness_tasks, f"{p}harness_tasks")

    def limit(self) -> float | int | None:
        """harness_limit as the harness takes it: None (all), a share, or a count."""
        if self.harness_limit <= 0:
            return None
        return self.harness_limit if self.harness_limit < 1 else int(self.harness_limit)

    def chat(self, stage: str, tokenizer: Any) -> bool:
        """Whether the tasks' prompts go through the chat template (see harness_chat)."""
        if self.harness_chat != "auto":
            return self.harness_chat == "chat"
        return stage != "pretrain" and bool(getattr(tokenizer, "chat_template", None))


def check_tasks(tasks: list[str], key: str) -> None:
    """One ConfigError line for a missing harness, an empty entry or an unknown task."""
    from lmforge.harness import INSTALL
    from lmforge.harness.run import _quiet_harness, resolve_tasks

    for i, task in enumerate(tasks):
        if not str(task).strip():
            raise ConfigError(f"{key}[{i}]: empty task name; write a name like lmforge_chat_mc")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"{key}: needs lm-evaluation-harness, which is not installed: {INSTALL}"
        ) from None
    with _quiet_harness():
        resolve_tasks([str(t).strip() for t in tasks], key=key)


def harness_config(config: Any) -> EvalConfig | None:
    """The stage config's `eval` section when it names harness tasks, else None."""
    section = getattr(config, "eval", None)
    if isinstance(section, EvalConfig) and section.harness_tasks:
        return section
    return None


def check_stage(stage: str, config: Any) -> None:
    """Refuse harness tasks where the trained model is no language model (a reward model)."""
    if stage == "reward" and harness_config(config) is not None:
        raise ConfigError(
            "eval.harness_tasks: a reward model scores text and has no language-model head for "
            "harness tasks; evaluate the policy it serves instead (set eval.harness_tasks: [])"
        )


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """The harness's progress bars off (every tqdm bar is made with disable=True meanwhile): a
    training log holds the evaluation's one line instead. tqdm reads TQDM_DISABLE only when
    it is imported, so the environment cannot do this."""
    from functools import partialmethod

    from tqdm import std

    init = std.tqdm.__init__
    std.tqdm.__init__ = partialmethod(init, disable=True)  # type: ignore[method-assign]
    try:
        yield
    finally:
        std.tqdm.__init__ = init  # type: ignore[method-assign]


@contextlib.contextmanager
def kept_rng() -> Iterator[None]:
    """Run the block and put Python's, NumPy's and torch's (CPU and CUDA) generators back."""
    py, npy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def harness_metrics(
    cfg: EvalConfig,
    module: torch.nn.Module,
    tokenizer: Any,
    *,
    stage: str,
    split_ranks: bool,
    metadata: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Run cfg's tasks on `module` (in eval mode already); {harness/<task>/<metric>: value},
    the same on every rank."""
    import torch.distributed as dist

    from lmforge.harness.run import run_harness

    tasks = [t.strip() for t in cfg.harness_tasks]
    with torch.no_grad(), kept_rng(), no_progress_bars():
        results = run_harness(
            module,
            tokenizer,
            tasks,
            limit=cfg.limit(),
            batch_size=cfg.harness_batch_size,
            chat=cfg.chat(stage, tokenizer),
            split_ranks=split_ranks,
            metadata=metadata,
        )
    flat = {
        f"{PREFIX}{task}/{m}": v
        for task, row in results.items()
        for m, v in row.items()
        if m not in COUNTS
    }
    if split_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [flat]
        dist.broadcast_object_list(box, src=0)  # rank 0 holds the gathered results
        flat = box[0]
    return flat


def run_in_training(config: Any, stage: str, engine: Any, tokenizer: Any) -> dict[str, float]:
    """The harness metrics of the `engine`'s live model for one evaluation of the loop, or {}
    without eval.harness_tasks. Collective: every rank calls it."""
    cfg = harness_config(config)
    if cfg is None:
        return {}
    zero3 = int(getattr(engine, "zero_stage", 0) or 0) >= 3
    module = engine.inference_model()  # a whole replica under ZeRO-3 (collective)
    was_training = module.training
    module.eval()
    try:
        return harness_metrics(
            cfg, module, tokenizer, stage=stage, split_ranks=not zero3, metadata=_metadata(config)
        )
    finally:
        module.train(was_training)


def _metadata(config: Any) -> dict[str, Any]:
    """Task metadata from the run's config: its data cache (lmforge_corpus reads the embedded
    corpus there, as the run's own data does, not in a second cache)."""
    cache = getattr(getattr(config, "data", None), "cache_dir", None)
    return {"cache_dir": str(cache)} if isinstance(cache, str) and cache else {}


def format_metrics(metrics: dict[str, float]) -> str:
    """'harness lmforge_chat_mc/acc 0.6250, ...' for the evaluation's console line."""
    shown = ", ".join(f"{k[len(PREFIX) :]} {v:.4f}" for k, v in metrics.items())
    return f"harness {shown}" if shown else ""
