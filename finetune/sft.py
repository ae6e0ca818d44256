"""Supervised finetuning: parse config, load the pretrained checkpoint and its tokenizer, build
chat rows with the tokenizer's own chat template (loss on assistant tokens only, packed or padded),
wrap in the engine, loop, save (the tokenizer and template it trained with go into the output).

    python finetune/sft.py --config configs/finetune/sft.yaml --init_from=runs/demo

Evaluation reports the held-out loss and the exact-match accuracy of greedy answers to held-out
prompts; it runs before the first step too, so the log shows what SFT changed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.batching import eval_chunks
from lmforge.checkpoint import load_checkpoint
from lmforge.checkpointer import Checkpointer
from lmforge.config import option
from lmforge.data import GlobalSampler
from lmforge.data.chat import (
    ChatDataConfig,
    accuracy_by_source,
    chat_tokenizer,
    heldout_prompts,
    heldout_sources,
    load_sft_data,
    source_rows,
)
from lmforge.data.chat_datasets import PromptDataset, SFTDataset
from lmforge.distributed import DistInfo
from lmforge.engine import Engine, build_engine
from lmforge.errors import ConfigError
from lmforge.loop import before_after, supervised_task, training_loop
from lmforge.lora import LoraSettings, apply_lora
from lmforge.loss import IGNORE_INDEX, LossConfig
from lmforge.model import num_params
from lmforge.report import HELDOUT, chat_heldout
from lmforge.runtime import all_mean, run_entry, set_seed
from lmforge.stage import (
    Launch,
    StageConfig,
    accuracy_metrics,
    exact_match,
    launch,
    load_start,
    planned,
    start_run,
    to_device,
)


@dataclass
class SFTConfig(StageConfig):
    """Supervised finetuning on chats: the common stage sections plus data and LoRA."""

    run_dir: str = option("runs/sft", "Directory for checkpoints, metrics and the config.")
    init_from: str = option("runs/demo", "The pretrained checkpoint (or run directory) to tune.")
    data: ChatDataConfig = option(default_factory=ChatDataConfig, doc="Chats and packing.")
    lora: LoraSettings = option(default_factory=LoraSettings, doc="Low-rank adapters.")
    loss: LossConfig = option(default_factory=LossConfig, doc="Cross-entropy options.")
    answer_tokens: int = option(16, "Most tokens generated per held-out answer.")


@torch.no_grad()
def heldout_loss_sums(
    engine: Engine, data: SFTDataset, info: DistInfo, micro: int, device: torch.device
) -> torch.Tensor:
    """(loss sum, assistant-token count) over every held-out row, rows split across ranks (the
    same number of forward passes on every rank: see eval_chunks), summed over ranks: (2,)."""
    total = torch.zeros(2, dtype=torch.float64)  # (loss sum, label count)
    for rows, counted in eval_chunks(len(data), info.rank, info.world, micro):
        batch = data.get_batch(rows)
        count = int((batch["labels"] != IGNORE_INDEX).sum())
        loss = engine(**to_device(batch, device)).float().item()
        if counted:
            total += torch.tensor([loss * count, count], dtype=torch.float64)
    return all_mean(total, info.world) * info.world


def heldout_loss(
    engine: Engine, data: SFTDataset, info: DistInfo, micro: int, device: torch.device
) -> float:
    """Mean loss per assistant token over every held-out row."""
    total = heldout_loss_sums(engine, data, info, micro, device)
    return (total[0] / total[1].clamp(min=1)).item()


@dataclass
class Heldout:
    """What SFT evaluates on: held-out rows (loss) and their prompts (exact match)."""

    rows: SFTDataset
    prompts: PromptDataset
    tokenizer: Any
    # A mixture's held-out rows again, one dataset per source (packed on their own, so a row
    # never mixes sources); empty for one source.
    parts: dict[str, SFTDataset] = field(default_factory=dict)


def evaluator(cfg: SFTConfig, engine: Engine, data: Heldout, place: Launch) -> Any:
    """The evaluation function: held-out loss and greedy exact-match accuracy (rank 0 appends
    the answers to run_dir/samples.jsonl)."""

    def evaluate(step: int) -> dict[str, float]:
        if len(data.rows) == 0:  # no held-out chats: nothing to measure (the loop says so once)
            return {}
        micro = cfg.train.micro_batch_size
        info, device = place.info, place.device
        if data.parts:
            metrics = loss_by_source(engine, data.parts, info, micro, device)
        else:
            metrics = {"eval/loss": heldout_loss(engine, data.rows, info, micro, device)}
        samples = place.run_dir / "samples.jsonl" if place.info.is_main else None
        scores = exact_match(
            engine.inference_model(),
            data.prompts,
            data.tokenizer,
            cfg.answer_tokens,
            samples_file=samples,
            step=step,
        )
        return {**metrics, **accuracy_metrics(scores), **accuracy_by_source(data.prompts)}

    return evaluate


def loss_by_source(
    engine: Engine,
    parts: dict[str, SFTDataset],
    info: DistInfo,
    micro: int,
    device: torch.device,
) -> dict[str, float]:
    """eval/<name>/loss of each source and eval/loss over all of them (per assistant token, so
    the overall loss is the per-source losses weighted by their assistant tokens). The engine
    gives one mean per forward pass, so each source's rows are their own micro-batches: at
    most one pass more per source than one mixed set, the same count on every rank."""
    out: dict[str, float] = {}
    total = torch.zeros(2, dtype=torch.float64)
    for name, rows in parts.items():
        sums = heldout_loss_sums(engine, rows, info, micro, device)
        out[f"eval/{name}/loss"] = (sums[0] / sums[1].clamp(min=1)).item()
        total += sums
    return {"eval/loss": (total[0] / total[1].clamp(min=1)).item(), **out}


def build_heldout(records: list[dict[str, Any]], tok: Any, data: ChatDataConfig) -> Heldout:
    """The held-out rows and prompts; for a mixture also each source's rows on their own."""
    names = heldout_sources(records, range(len(records)))
    prompts = heldout_prompts(records, tok, data.seq_len)
    parts = {
        name: SFTDataset([records[i] for i in rows], tok, data.seq_len, pack=data.pack)
        for name, rows in source_rows(names or []).items()
    }
    rows = SFTDataset(records, tok, data.seq_len, pack=data.pack)
    return Heldout(rows, prompts, tok, parts)


def train(cfg: SFTConfig) -> dict[str, Any]:
    """Run (or resume) supervised finetuning; returns the final metrics."""
    place, done = launch(cfg, "sft")
    if done is not None:
        return done
    set_seed(cfg.train.seed, place.info.rank)
    model, tok, _ = load_start(place, cfg.init_from, load_checkpoint)
    source = place.resume_from or cfg.init_from
    if tok is None:
        raise ConfigError(f"init_from: {source} has no tokenizer files; SFT needs its tokenizer")
    tok = chat_tokenizer(tok, cfg.data)  # its own template (or data.chat_template): trained, saved
    if cfg.data.seq_len > model.cfg.max_seq_len:
        raise ConfigError(
            f"data.seq_len: {cfg.data.seq_len} exceeds the model's max_seq_len="
            f"{model.cfg.max_seq_len}"
        )
    model.train()
    model.loss_cfg = cfg.loss
    train_data, heldout_records = load_sft_data(cfg.data, tok)
    heldout = build_heldout(heldout_records, tok, cfg.data)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    plan = cfg.batch_plan(place.info.world)
    engine = build_engine(
        model,
        cfg.engine,
        cfg.optim,
        micro_batch=plan.micro,
        grad_accum=plan.accum,
        total_steps=cfg.train.steps,
        info=place.info,
    )
    checkpointer = Checkpointer(place.run_dir, place.info, cfg, "sft", tok)
    checkpointer.record[HELDOUT] = chat_heldout(cfg.data, len(heldout.prompts), "prompts")
    scaling = cfg.lora.alpha / cfg.lora.rank if cfg.lora.enabled else None
    checkpointer.add_engine("model", engine, parent=cfg.init_from, lora_scaling=scaling)
    run = start_run(cfg, place, checkpointer, model_cfg=model.cfg, seq_len=cfg.data.seq_len)
    run.tracker.message(
        f"sft: from {source}; {num_params(model.cfg) / 1e6:.2f}M parameters "
        f"({engine.num_parameters(trainable=True) / 1e6:.3f}M trainable); "
        f"{train_data.summary()}; {heldout.prompts.summary()}; {engine.describe()}, "
        f"{place.info.world} process(es)"
    )
    run.tracker.message(plan.describe())
    sampler = GlobalSampler(len(train_data), cfg.data.seed)

    def micro_step(step: int, start: int, count: int) -> tuple[torch.Tensor, dict[str, float]]:
        batch = train_data.get_batch(sampler.indices(start, count))
        return engine(**to_device(batch, place.device)), {}

    task = supervised_task(
        micro_step,
        evaluator(cfg, engine, heldout, place),
        planned(cfg.train, plan),
        place.info,
        num_samples=len(train_data),
        tokens_per_sample=cfg.data.seq_len,
        summary=lambda last: before_after(last, "accuracy", "held-out exact match"),
    )
    return training_loop(run, task)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: --config FILE, --dry-run, and --section.key=value overrides."""
    return run_entry(SFTConfig, train, argv, "sft")


if __name__ == "__main__":
    sys.exit(main())
