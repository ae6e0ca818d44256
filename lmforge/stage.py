"""How a stage starts: the config sections every stage has, the process group and the resume
point (`launch`), the weights it starts from (`load_start`), and the started run the loop takes
(`start_run`: tracker, fault monitor, restored engines and parts, settings changed on resume).

A stage file reads top to bottom: parse config (lmforge.runtime.run_entry) → `launch` → data and
model → `build_engine` → a `Checkpointer` holding its engines and stateful parts → `start_run`
→ `lmforge.loop.training_loop` with the stage's step and evaluation functions. The loop owns the
cadence, the checkpointer owns the disk; this module owns only the start.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.batching import BatchPlan, plan_batch
from lmforge.checkpoint import LATEST_FILE, read_latest, resolve_checkpoint
from lmforge.checkpointer import Checkpointer, ResumePoint, open_point
from lmforge.config import dump_config, option
from lmforge.data.chat_datasets import PromptDataset
from lmforge.data.templates import pad_token_id, stop_token_ids
from lmforge.distributed import DistInfo
from lmforge.engine import EngineConfig
from lmforge.errors import CheckpointError, ConfigError
from lmforge.faults import FaultConfig, FaultMonitor
from lmforge.generate import GenerateConfig, generate
from lmforge.harness.training import EvalConfig
from lmforge.loop import Run
from lmforge.model import ModelConfig
from lmforge.model import flops_per_token as model_flops_per_token
from lmforge.optim import OptimConfig
from lmforge.resume import (
    Change,
    ResumeConfig,
    config_changes,
    format_changes,
    previous_change_lines,
    record_changes,
)
from lmforge.rundir import clean_leftovers, run_dir_path
from lmforge.runlock import claim_run_dir
from lmforge.runtime import TrainConfig
from lmforge.tracking import Tracker, TrackingConfig, measure_peak_flops


@dataclass
class StageConfig:
    """Sections every stage has; a stage's config adds its own (model, data, loss, ...)."""

    run_dir: str = option("runs/stage", "Directory for checkpoints, metrics and the config.")
    allow_foreign_run_dir: bool = option(
        False,
        "Let run_dir be an existing, non-empty directory that lmforge did not make (lmforge adds "
        "its own files and deletes nothing else); without it such a directory is refused.",
    )
    resume: ResumeConfig = option(
        default_factory=ResumeConfig,
        doc="Where to continue from (`resume: auto | never | PATH`) and allowed changes.",
    )
    init_from: str = option(
        "",
        "Start from these weights: a checkpoint or run directory, a Hugging Face model "
        "directory (llama, qwen2, mistral) or a hub name (org/name).",
    )
    optim: OptimConfig = option(default_factory=OptimConfig, doc="Optimizer and schedule.")
    engine: EngineConfig = option(default_factory=EngineConfig, doc="DeepSpeed.")
    train: TrainConfig = option(default_factory=TrainConfig, doc="Steps, batches, cadence.")
    tracking: TrackingConfig = option(default_factory=TrackingConfig, doc="Logging.")
    faults: FaultConfig = option(
        default_factory=FaultConfig, doc="Non-finite losses or gradients, loss spikes, rollbacks."
    )
    eval: EvalConfig = option(
        default_factory=EvalConfig,
        doc="lm-evaluation-harness tasks at every evaluation of the run (harness_tasks).",
    )

    def validate(self, prefix: str = "") -> None:
        """Checks that span sections, including contradictions between the engine's own config
        file and this config (found here, before any data is read)."""
        from lmforge.distributed import dist_info
        from lmforge.engine import check_engine_config
        from lmforge.memcheck import check_memory

        # The batch plan first: an impossible split is found here, before any data is read.
        plan = self.batch_plan(dist_info().world)
        check_engine_config(self.engine, self.optim, plan)
        # Then a model or micro-batch that cannot fit: refused before anything is allocated.
        check_memory(self, plan.micro, plan.world)

    def batch_plan(self, world: int) -> BatchPlan:
        """How a step's global batch splits on `world` processes (see lmforge.batching); a
        stage whose rows are not plain sequences (GRPO's groups, PPO's prompts) overrides it."""
        return check_batch_sizes(self.train, world)


def resume_point(run_dir: Path, resume: str, stage: str = "") -> ResumePoint | None:
    """The checkpoint to resume from — run_dir's latest (auto), none (never) or a path — with
    its manifest read and its weights verified once. `latest` must name a checkpoint directory
    of run_dir itself (lmforge.checkpoint.read_latest), and the checkpoint must be one of this
    `stage`: a run only ever continues itself; another run's weights are what init_from is for."""
    if resume == "never":
        if (run_dir / LATEST_FILE).exists():
            raise ConfigError(
                f"run_dir: {run_dir} already holds checkpoints; use resume: auto to continue "
                "or choose a new run_dir"
            )
        return None
    if resume == "auto":
        if read_latest(run_dir) is None:
            return None
        point, where = open_point(run_dir), f"{run_dir / LATEST_FILE}: names {run_dir}/"
    else:
        point, where = open_point(resolve_checkpoint(resume)), "resume: "
    saved = point.meta.get("stage")
    if stage and saved and saved != stage:
        raise CheckpointError(
            f"{where}{point.path.name if resume == 'auto' else point.path}, a {saved} checkpoint, "
            f"but this is a {stage} run, which continues only its own checkpoints; to start "
            f"from its weights use init_from={point.path} with a new run_dir"
        )
    return point


def finished_run(
    point: ResumePoint | None, steps: int, info: DistInfo, stage: str
) -> dict[str, Any] | None:
    """If the run already reached `steps` (with train.epochs: the steps it planned from its
    data, recorded as planned_steps) or stopped early (train.early_stop), report it (rank 0)
    and return its metrics. The point is this stage's own (`resume_point` refuses another
    stage's checkpoints)."""
    if point is None:
        return None
    best = point.meta.get("best")
    stopped = int(best.get("stopped") or 0) if isinstance(best, dict) else 0
    planned = point.meta.get("planned_steps")
    target = int(planned) if isinstance(planned, int) and planned > 0 else steps
    if point.step < target and not stopped:
        return None
    metrics = dict(point.meta.get("metrics", {}))
    if info.is_main:
        shown = ", ".join(
            f"{k} {v:.4f}"
            for k, v in metrics.items()
            if k.startswith("eval/") and isinstance(v, (int, float))
        )
        how = (
            f"stopped early at step {point.step} (train.early_stop)"
            if stopped
            else f"already trained to step {point.step} (train.steps={target})"
        )
        print(f"{stage}: {point.path.parent} {how}; checkpoint {point.path}; {shown}")
    return metrics


def stage_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    """cuda:<local rank> when asked or available (auto), else cpu."""
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def to_device(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move the tensors of a batch dict to `device`."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def check_batch_sizes(
    cfg: TrainConfig, world: int, *, group: int = 1, group_key: str = "", unit: str = ""
) -> BatchPlan:
    """The batch plan of `cfg` on `world` processes: the micro-batch is the largest that fits
    `cfg.micro_batch_size` and divides each process's share, the accumulation follows. Only an
    impossible split (the global batch over processes, or over whole groups of `group`) is a
    ConfigError naming the keys and a working value."""
    return plan_batch(
        cfg.global_batch_size,
        cfg.micro_batch_size,
        world,
        group=group,
        group_key=group_key,
        unit=unit,
    )


def planned(train: TrainConfig, plan: BatchPlan) -> TrainConfig:
    """The train section as the loop runs it: the plan's micro-batch (the configured
    micro_batch_size is only its ceiling). config.yaml and resume checks keep the user's."""
    return dataclasses.replace(train, micro_batch_size=plan.micro)


def stop_ids(tokenizer: Any) -> list[int]:
    """Token ids that end a generated answer: the model's own EOS and end-of-turn ids (its
    generation_config.json's eos_token_id list, the tokenizer's EOS, the chat template's
    end-of-turn token; lmforge's tokenizer: <|eos|> and <|end|>). See `stop_token_ids`."""
    return stop_token_ids(tokenizer)


@torch.no_grad()
def exact_match(
    module: torch.nn.Module,
    prompts: PromptDataset,
    tokenizer: Any,
    max_new_tokens: int,
    *,
    samples_file: Path | None = None,
    step: int = 0,
) -> dict[str, float]:
    """Greedy answers to every held-out prompt scored by exact match, overall and per task.
    Every rank runs every prompt (ZeRO-3 gathers parameters in lockstep). With samples_file,
    each (prompt, completion, answer) is appended to it as a JSON line tagged with the step."""
    completions = greedy_completions(module, prompts, tokenizer, max_new_tokens)
    if samples_file is not None:
        samples_file.parent.mkdir(parents=True, exist_ok=True)
        with open(samples_file, "a") as f:
            for prompt, completion, answer in zip(
                prompts.prompts, completions, prompts.answers, strict=True
            ):
                record = {"step": step, "prompt": prompt[-1]["content"], "answer": answer}
                f.write(json.dumps({**record, "completion": completion}) + "\n")
    return prompts.exact_match(completions)


@torch.no_grad()
def greedy_completions(
    module: torch.nn.Module, prompts: PromptDataset, tokenizer: Any, max_new_tokens: int
) -> list[str]:
    """The greedy answer text to every prompt, in batches of 64."""
    completions: list[str] = []
    cfg = GenerateConfig(max_new_tokens=max_new_tokens, temperature=0)
    stops, pad = stop_ids(tokenizer), pad_token_id(tokenizer)  # found once, used by every batch
    for start in range(0, len(prompts), 64):
        batch = prompts.prompt_ids[start : start + 64]
        out = generate(module, batch, cfg, eos_ids=stops, pad_id=pad)
        completions += out.texts(tokenizer)
    return completions


def accuracy_metrics(scores: dict[str, float]) -> dict[str, float]:
    """exact_match's scores as metrics: eval/accuracy and eval/accuracy/<task>."""
    return {("eval/accuracy" if k == "all" else f"eval/accuracy/{k}"): v for k, v in scores.items()}


@dataclass
class Launch:
    """Where a stage runs, what it resumes from and which settings changed since."""

    info: DistInfo
    device: torch.device
    run_dir: Path
    point: ResumePoint | None
    changes: list[Change] = field(default_factory=list)

    @property
    def resume_from(self) -> Path | None:
        """The resumed checkpoint's directory, if any."""
        return self.point.path if self.point else None


def launch(cfg: StageConfig, stage: str) -> tuple[Launch, dict[str, Any] | None]:
    """Claim the run directory (rank 0 checks, creates and locks it before anything is written
    into it), start the process group, settle the claim on every rank (a refusal is raised on
    all of them), find the resume point, check what changed since it was saved (a refused
    change is a ConfigError before any data is read) and clean what interrupted saves left.
    The second value is the finished run's metrics when run_dir already reached train.steps.
    The lock is held until the process ends or lmforge.runlock.release_all runs (run_entry
    does, after the stage)."""
    from lmforge.distributed import dist_info
    from lmforge.engine import init_distributed

    run_dir = run_dir_path(cfg.run_dir)  # every rank sees the same config: no collective needed
    info = dist_info()
    claim = claim_run_dir(run_dir, cfg.allow_foreign_run_dir, info.rank)  # rank 0: check, lock
    if info.world == 1:
        claim.settle(1)  # refused before DeepSpeed starts: one process has no one to tell
    init_distributed(info, cfg.engine.backend)
    claim.settle(info.world)  # collective: rank 0's outcome on every rank, none left waiting
    point = resume_point(run_dir, cfg.resume.checkpoint, stage)
    changes: list[Change] = []
    if point is not None and isinstance(point.meta.get("config"), dict):
        changes = config_changes(point.meta["config"], cfg, cfg.resume.allow_changes)
    if info.is_main:
        removed = clean_leftovers(run_dir)
        if removed:
            print(f"removed what interrupted saves left: {', '.join(removed)}", flush=True)
    place = Launch(info, stage_device(cfg.train, info.local_rank), run_dir, point, changes)
    return place, finished_run(point, cfg.train.steps, info, stage)


def load_start(place: Launch, init_from: str | Path, loader: Callable[..., Any], **kw: Any) -> Any:
    """Load the weights a stage starts from with `loader` (load_checkpoint or
    load_reward_model): the resume point's (its manifest verified once, at launch) or
    `init_from`'s. Returns what the loader returns."""
    if place.point is not None:
        return loader(place.point.path, meta=place.point.meta, **kw)
    if not init_from:
        raise ConfigError("init_from: this stage starts from a checkpoint; set init_from")
    return loader(init_from, **kw)


def open_tracker(
    cfg: StageConfig,
    place: Launch,
    *,
    model_cfg: ModelConfig | None = None,
    seq_len: int = 0,
) -> Tracker:
    """The run's tracker; rank 0 also writes the resolved config.yaml into run_dir (created and
    locked by `launch`), with the changes a resume applied, and when. A resumed run continues
    its W&B run. With `model_cfg` and `seq_len` the tracker reports MFU against this device's
    measured peak."""
    flops, peak = 0.0, None
    if model_cfg is not None and seq_len:
        flops = model_flops_per_token(model_cfg, seq_len)
        peak = measure_peak_flops(place.device)
    if place.info.is_main:
        place.run_dir.mkdir(parents=True, exist_ok=True)
        config_yaml = place.run_dir / "config.yaml"
        previous = previous_change_lines(config_yaml)
        dump_config(cfg, config_yaml)
        step = place.point.step if place.point else 0
        record_changes(config_yaml, place.changes, step, previous=previous)
    meta = place.point.meta if place.point else {}
    return Tracker(
        place.run_dir,
        cfg.tracking,
        is_main=place.info.is_main,
        config=dataclasses.asdict(cfg),
        total_steps=cfg.train.steps,
        flops_per_token=flops,
        peak_flops=peak,
        resume_id=meta.get("wandb_run_id"),
    )


def start_run(
    cfg: StageConfig,
    place: Launch,
    checkpointer: Checkpointer,
    *,
    model_cfg: ModelConfig | None = None,
    seq_len: int = 0,
) -> Run:
    """Open the tracker, start the fault monitor, restore every engine and part from the resume
    point (collective), take the settings changed since it was saved, and print what happened."""
    tracker = open_tracker(cfg, place, model_cfg=model_cfg, seq_len=seq_len)
    monitor = FaultMonitor(
        cfg.faults, rank=place.info.rank, world=place.info.world, tracker=tracker
    )
    checkpointer.add_state("faults", monitor)
    checkpointer.record["wandb_run_id"] = tracker.run_id
    run = Run(
        checkpointer.stage, cfg.train, cfg.tracking.log_every, place.info, tracker, checkpointer,
        monitor,
    )  # fmt: skip
    point = place.point
    if point is not None:
        how = checkpointer.restore(point)
        run.step, run.cursor = point.step, point.cursor
        run.tokens = int(point.meta.get("tokens_seen", 0))
        run.carried = {
            k: v for k, v in point.meta.get("metrics", {}).items() if k.startswith("eval_before/")
        }
        tracker.message(f"resume: step {point.step} from {point.path} via {how}")
        for line in format_changes(place.changes):
            tracker.message(line)
    for engine in checkpointer.engines().values():
        engine.set_lr_scale(monitor.state.lr_scale)  # a rollback's lower rate carries over
    return run
