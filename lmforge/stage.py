"""What every training stage shares: the common config sections, where to resume from, the
device, and the window of step metrics that becomes one log line."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.checkpoint import META_FILE, read_json, resolve_checkpoint, write_latest
from lmforge.config import dump_config, option
from lmforge.data.chat_datasets import PromptDataset
from lmforge.distributed import DistInfo
from lmforge.engine import EngineConfig
from lmforge.errors import ConfigError
from lmforge.faults import DivergenceError, FaultConfig, FaultMonitor, Verdict
from lmforge.generate import GenerateConfig, generate
from lmforge.loss import LossConfig
from lmforge.model import ModelConfig
from lmforge.model import flops_per_token as model_flops_per_token
from lmforge.optim import OptimConfig
from lmforge.rundir import clean_leftovers, rollback_target
from lmforge.runtime import StopFlag, TrainConfig, all_mean, barrier
from lmforge.tracking import Tracker, TrackingConfig, measure_peak_flops
from lmforge.trainstate import SAVE_PAUSE_ENV as SAVE_PAUSE_ENV  # stages import these from here
from lmforge.trainstate import merge_lora_state as merge_lora_state
from lmforge.trainstate import restore_checkpoint
from lmforge.trainstate import save_stage_checkpoint as save_stage_checkpoint


@dataclass
class StageConfig:
    """Sections every stage has; a stage's config adds its own (model, data, ...)."""

    run_dir: str = option("runs/stage", "Directory for checkpoints, metrics and the config.")
    resume: str = option(
        "auto", "auto = continue from run_dir/latest if present; never; or a checkpoint path."
    )
    init_from: str = option("", "Start from these weights (checkpoint or HF Llama directory).")
    optim: OptimConfig = option(default_factory=OptimConfig, doc="Optimizer and schedule.")
    loss: LossConfig = option(default_factory=LossConfig, doc="Cross-entropy options.")
    engine: EngineConfig = option(default_factory=EngineConfig, doc="DeepSpeed.")
    train: TrainConfig = option(default_factory=TrainConfig, doc="Steps, batches, cadence.")
    tracking: TrackingConfig = option(default_factory=TrackingConfig, doc="Logging.")
    faults: FaultConfig = option(
        default_factory=FaultConfig, doc="Non-finite losses or gradients, loss spikes, rollbacks."
    )

    def validate(self, prefix: str = "") -> None:
        """Checks that span sections, including contradictions between the DeepSpeed JSON and
        this config (found here, before any data is read)."""
        if self.resume not in ("auto", "never") and not Path(self.resume).exists():
            raise ConfigError(f"resume: {self.resume} does not exist; use auto, never or a path")
        from lmforge.distributed import dist_info
        from lmforge.engine import load_deepspeed_json, resolve_deepspeed_config

        world = dist_info().world
        per_step = self.train.micro_batch_size * world
        if self.train.global_batch_size % per_step == 0:  # else the batch error names the key
            resolve_deepspeed_config(
                load_deepspeed_json(self.engine.deepspeed),
                cfg=self.engine,
                optim=self.optim,
                micro_batch=self.train.micro_batch_size,
                grad_accum=self.train.global_batch_size // per_step,
                world=world,
            )


def resume_point(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: run_dir's latest (auto), none (never), or a path."""
    if resume == "never":
        if (run_dir / "latest").exists():
            raise ConfigError(
                f"run_dir: {run_dir} already holds checkpoints; use resume: auto to continue "
                "or choose a new run_dir"
            )
        return None
    if resume == "auto":
        return resolve_checkpoint(run_dir) if (run_dir / "latest").exists() else None
    return resolve_checkpoint(resume)


def finished_run(resume_from: Path | None, steps: int, info: DistInfo, stage: str) -> dict | None:
    """If the run already reached `steps`, report it (rank 0) and return its metrics."""
    if resume_from is None:
        return None
    meta = read_json(resume_from / "lmforge.json")
    if int(meta.get("step", 0)) < steps:
        return None
    metrics = dict(meta.get("metrics", {}))
    if info.is_main:
        shown = ", ".join(
            f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("eval/") and v is not None
        )
        print(
            f"{stage}: {resume_from.parent} already trained to step {meta['step']} "
            f"(train.steps={steps}); checkpoint {resume_from}; {shown}"
        )
    return metrics


def stage_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    """cuda:<local rank> when asked or available (auto), else cpu."""
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def to_device(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move the tensors of a batch dict to `device`."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


class StepWindow:
    """Step metrics since the last log line: averaged over steps, then over ranks."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new window."""
        self.t0 = time.perf_counter()
        self.steps = 0
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, **values: float) -> None:
        """Record one step's values (e.g. loss=..., accuracy=...)."""
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
            self.counts[key] = self.counts.get(key, 0) + 1

    def close_step(self) -> None:
        """Mark the end of an optimizer step."""
        self.steps += 1

    def flush(
        self, tracker: Tracker, engine: Any, world: int, tokens_per_step: int
    ) -> dict[str, Any]:
        """The window's metrics (means over steps and ranks, lr, grad norm, throughput); resets."""
        elapsed = time.perf_counter() - self.t0
        keys = sorted(self.sums)
        means = torch.tensor([self.sums[k] / self.counts[k] for k in keys], dtype=torch.float64)
        means = all_mean(means, world) if keys else means
        metrics: dict[str, Any] = dict(zip(keys, means.tolist(), strict=True))
        metrics.setdefault("loss", math.nan)  # every step of the window was skipped
        metrics.update(lr=engine.lr, grad_norm=engine.grad_norm())
        metrics.update(tracker.throughput(tokens_per_step * self.steps, elapsed))
        metrics["step_seconds"] = elapsed / max(self.steps, 1)
        self.reset()
        return metrics


MicroStep = Callable[[int, int, int], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class StepResult:
    """What one optimizer step did: the means of its losses and metrics (empty when skipped),
    whether it was skipped, and the lmforge.json of the checkpoint a rollback went back to."""

    values: dict[str, float]
    skipped: bool
    rolled_back: dict[str, Any] | None = None


def optimizer_step(
    *,
    engine: Any,
    monitor: FaultMonitor,
    step: int,
    cursor: int,
    accum: int,
    forward: Callable[[int], tuple[torch.Tensor, dict[str, float]]],
    run_dir: Path,
    info: DistInfo,
) -> StepResult:
    """Step `step + 1` of a stage loop, with the fault policy (lmforge.faults) around it.

    forward(micro) returns the loss of micro-batch `micro` and extra metrics; this runs
    backward, asks the monitor to judge the step before the update, and lets the engine apply
    or skip it. A batch a rollback put on the skip list is not computed. After a rollback the
    caller continues from the returned checkpoint's step and data cursor."""
    if monitor.known_bad(cursor):
        engine.skip_step()
        monitor.skip_known(step + 1, cursor)
        engine.run_state["faults"] = monitor.saved_state()
        return StepResult({}, True)
    values: dict[str, float] = {}
    losses: list[float] = []
    verdict = Verdict()
    for micro in range(accum):
        loss, extra = forward(micro)
        loss = monitor.inject(step + 1, loss)
        engine.backward(loss)
        losses.append(loss.detach().float().item())
        if micro == accum - 1:
            verdict = monitor.judge(step + 1, losses)
        engine.step(skip=verdict.skip)
        for key, value in {"loss": losses[-1], **extra}.items():
            values[key] = values.get(key, 0.0) + float(value) / accum
    skipped = engine.last_step_skipped
    rollback = monitor.after_step(step + 1, cursor, verdict, skipped)
    result = StepResult({} if skipped else values, skipped)
    if rollback:
        result.rolled_back = roll_back(engine, monitor, run_dir, info, step + 1)
    engine.run_state["faults"] = monitor.saved_state()
    return result


def roll_back(
    engine: Any, monitor: FaultMonitor, run_dir: Path, info: DistInfo, step: int
) -> dict[str, Any]:
    """Reload the newest checkpoint saved before the current run of bad steps (collective);
    returns its lmforge.json. `latest` is pointed back at it."""
    target = rollback_target(run_dir, monitor.streak_start(step))
    if target is None:
        raise DivergenceError(
            f"training diverged at step {step} before any checkpoint was saved, so there is "
            "nothing to roll back to; lower optim.lr or save earlier (train.save_every)"
        )
    meta = read_json(target / META_FILE)
    monitor.rolled_back(step, int(meta["step"]), str(target), meta.get("faults"))
    restore_checkpoint(engine, target, info, run_dir)
    engine.set_lr_scale(monitor.state.lr_scale)
    barrier()
    if info.is_main:
        write_latest(run_dir, target.name)
    return meta


def training_loop(
    *,
    cfg: StageConfig,
    engine: Any,
    info: DistInfo,
    tracker: Tracker,
    num_samples: int,
    step: int,
    cursor: int,
    micro_step: MicroStep,
    evaluate: Callable[[int], dict[str, float]],
    save: Callable[[int, int, dict[str, Any]], Path],
    tokens_per_step: int,
) -> tuple[int, int, dict[str, Any]]:
    """The optimizer-step loop every stage shares.

    micro_step(step, start, count) computes the loss of the `count` samples at global positions
    start.. (this rank's share of the global batch) and returns (loss, extra metrics); the loop
    runs backward and the engine step (through `optimizer_step`, which applies the fault
    policy), logs every `log_every` steps, evaluates every `eval_every` (and at the end), and
    calls save(step, cursor, metrics) every `save_every`, at the end, at `stop_at` and on a
    stop signal. Returns (step, cursor, last metrics).
    """
    train = cfg.train
    per_step = train.micro_batch_size * info.world
    accum = train.global_batch_size // per_step
    window, stop, last = StepWindow(), StopFlag(), {}
    monitor = start_monitor(cfg, engine, info, tracker)
    engine.train(True)
    while step < train.steps:

        def forward(micro: int, step: int = step, cursor: int = cursor) -> Any:
            start = cursor + (info.rank * accum + micro) * train.micro_batch_size
            return micro_step(step, start, train.micro_batch_size)

        result = optimizer_step(
            engine=engine,
            monitor=monitor,
            step=step,
            cursor=cursor,
            accum=accum,
            forward=forward,
            run_dir=Path(cfg.run_dir),
            info=info,
        )
        if result.rolled_back is not None:
            step, cursor = int(result.rolled_back["step"]), int(result.rolled_back["data_cursor"])
            window.reset()
            continue
        step += 1
        cursor += train.global_batch_size
        window.add(**result.values)
        window.close_step()
        if step % cfg.tracking.log_every == 0 or step == train.steps:
            metrics = window.flush(tracker, engine, info.world, tokens_per_step)
            metrics["epoch"] = cursor / num_samples
            metrics.update(monitor.metrics())
            tracker.log(step, metrics)
            tracker.progress(step, metrics, metrics["step_seconds"])
            last.update(metrics)
        final = step == train.steps
        if final or (train.eval_every and step % train.eval_every == 0):
            engine.train(False)
            result_metrics = evaluate(step)
            engine.train(True)
            tracker.log(step, result_metrics)
            tracker.message(
                f"eval step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result_metrics.items())
            )
            last.update(result_metrics)
        stopping = stop.requested() or step == train.stop_at
        if final or stopping or step % train.save_every == 0:
            tracker.message(f"saved {save(step, cursor, last)}")
        if stopping:
            tracker.message(f"stopped at step {step}; resume with resume: auto")
            break
    return step, cursor, last


def start_monitor(cfg: StageConfig, engine: Any, info: DistInfo, tracker: Tracker) -> FaultMonitor:
    """The fault monitor of a stage loop, continuing the resumed checkpoint's state (which
    `restore` left in engine.run_state), with its learning-rate scale applied."""
    state = engine.run_state.get("faults")
    monitor = FaultMonitor(
        cfg.faults, rank=info.rank, world=info.world, tracker=tracker, state=state
    )
    if monitor.state.lr_scale != 1.0:
        engine.set_lr_scale(monitor.state.lr_scale)
    engine.run_state["faults"] = monitor.saved_state()
    return monitor


def check_batch_sizes(cfg: TrainConfig, world: int) -> int:
    """Gradient-accumulation steps for the global batch, or a ConfigError naming the key."""
    per_step = cfg.micro_batch_size * world
    if cfg.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size: {cfg.global_batch_size} is not a multiple of "
            f"micro_batch_size × processes = {per_step}"
        )
    return cfg.global_batch_size // per_step


def stop_ids(tokenizer: Any) -> list[int]:
    """Token ids that end a generated answer: EOS and, for chat tokenizers, <|end|>."""
    ids = [tokenizer.eos_token_id]
    if "<|end|>" in tokenizer.get_vocab():
        ids.append(tokenizer.convert_tokens_to_ids("<|end|>"))
    return ids


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
    completions: list[str] = []
    cfg = GenerateConfig(max_new_tokens=max_new_tokens, temperature=0)
    for start in range(0, len(prompts), 64):
        batch = prompts.prompt_ids[start : start + 64]
        out = generate(
            module, batch, cfg, eos_ids=stop_ids(tokenizer), pad_id=tokenizer.pad_token_id
        )
        completions += out.texts(tokenizer)
    if samples_file is not None:
        samples_file.parent.mkdir(parents=True, exist_ok=True)
        with open(samples_file, "a") as f:
            for prompt, completion, answer in zip(
                prompts.prompts, completions, prompts.answers, strict=True
            ):
                record = {"step": step, "prompt": prompt[-1]["content"], "answer": answer}
                f.write(json.dumps({**record, "completion": completion}) + "\n")
    return prompts.exact_match(completions)


@dataclass
class Launch:
    """Where a stage runs and what it resumes from."""

    info: DistInfo
    device: torch.device
    run_dir: Path
    resume_from: Path | None


def launch(cfg: StageConfig, stage: str) -> tuple[Launch, dict[str, Any] | None]:
    """Start the process group and find the resume point. The second value is the finished
    run's metrics when run_dir already reached train.steps (the stage then just returns them)."""
    from lmforge.distributed import dist_info
    from lmforge.engine import init_distributed

    info = dist_info()
    init_distributed(info, cfg.engine.backend)
    run_dir = Path(cfg.run_dir)
    resume_from = resume_point(run_dir, cfg.resume)
    if info.is_main and run_dir.is_dir():
        removed = clean_leftovers(run_dir)
        if removed:
            print(f"removed what interrupted saves left: {', '.join(removed)}", flush=True)
    place = Launch(info, stage_device(cfg.train, info.local_rank), run_dir, resume_from)
    return place, finished_run(resume_from, cfg.train.steps, info, stage)


def restore(engine: Any, place: Launch, meta: dict[str, Any]) -> tuple[int, int]:
    """Load the training state and this rank's RNG of the resume checkpoint, if any (see
    restore_checkpoint; rank 0 prints which way it was read); returns (step, data cursor)."""
    if place.resume_from is None:
        return 0, 0
    how = restore_checkpoint(engine, place.resume_from, place.info, place.run_dir)
    step, cursor = int(meta["step"]), int(meta["data_cursor"])
    if place.info.is_main:
        print(f"resume: step {step} from {place.resume_from} via {how}", flush=True)
    return step, cursor


def open_tracker(
    cfg: StageConfig,
    place: Launch,
    meta: dict[str, Any],
    *,
    flops_per_token: float = 0.0,
    peak_flops: float | None = None,
    model_cfg: ModelConfig | None = None,
    seq_len: int = 0,
) -> Tracker:
    """The run's tracker; rank 0 also creates run_dir and writes the resolved config.yaml. A
    resumed run continues its W&B run. With `model_cfg` and `seq_len` (the trained model and its
    row length) the tracker reports MFU against this GPU's measured bf16 peak."""
    if model_cfg is not None and seq_len and not flops_per_token:
        flops_per_token = model_flops_per_token(model_cfg, seq_len)
        peak_flops = measure_peak_flops(place.device)
    if place.info.is_main:
        place.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, place.run_dir / "config.yaml")
    return Tracker(
        place.run_dir,
        cfg.tracking,
        is_main=place.info.is_main,
        config=dataclasses.asdict(cfg),
        total_steps=cfg.train.steps,
        flops_per_token=flops_per_token,
        peak_flops=peak_flops,
        resume_id=meta.get("wandb_run_id") if place.resume_from else None,
    )


def checkpoint_meta(
    stage: str,
    cfg: StageConfig,
    place: Launch,
    tracker: Tracker,
    *,
    step: int,
    cursor: int,
    parent: str | Path,
    metrics: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """The lmforge.json record of a stage checkpoint."""
    return {
        "stage": stage,
        "step": step,
        "data_cursor": cursor,
        "seed": cfg.train.seed,
        "world_size": place.info.world,
        "config": dataclasses.asdict(cfg),
        "parent": str(parent) or None,
        "wandb_run_id": tracker.run_id,
        "metrics": {k: v for k, v in metrics.items() if v is not None},
        **extra,
    }
