"""Supervised finetuning: parse config, load the pretrained checkpoint and its tokenizer, build
chat rows (loss on assistant tokens only, packed or padded), wrap in the engine, loop, save.

    python finetune/sft.py --config configs/finetune/sft.yaml --init_from=runs/demo

Evaluation reports the held-out loss and the exact-match accuracy of greedy answers to held-out
prompts; it runs before the first step too, so the log shows what SFT changed.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.checkpoint import load_checkpoint
from lmforge.config import option
from lmforge.data import GlobalSampler
from lmforge.data.chat import ChatDataConfig, load_sft_data
from lmforge.data.chat_datasets import PromptDataset, SFTDataset
from lmforge.distributed import DistInfo
from lmforge.engine import build_engine
from lmforge.errors import ConfigError
from lmforge.lora import LoraSettings, apply_lora
from lmforge.loss import IGNORE_INDEX
from lmforge.model import num_params
from lmforge.runtime import all_mean, run_entry, set_seed
from lmforge.stage import (
    StageConfig,
    check_batch_sizes,
    checkpoint_meta,
    exact_match,
    launch,
    open_tracker,
    restore,
    save_stage_checkpoint,
    to_device,
    training_loop,
)
from lmforge.tracking import format_duration


@dataclass
class SFTConfig(StageConfig):
    """Supervised finetuning on chats: the common stage sections plus data and LoRA."""

    run_dir: str = option("runs/sft", "Directory for checkpoints, metrics and the config.")
    init_from: str = option("runs/demo", "The pretrained checkpoint (or run directory) to tune.")
    data: ChatDataConfig = option(default_factory=ChatDataConfig, doc="Chats and packing.")
    lora: LoraSettings = option(default_factory=LoraSettings, doc="Low-rank adapters.")
    answer_tokens: int = option(16, "Most tokens generated per held-out answer.")


@torch.no_grad()
def heldout_loss(
    engine: Any, data: SFTDataset, info: DistInfo, micro: int, device: torch.device
) -> float:
    """Mean loss per assistant token over every held-out row, rows split across ranks."""
    total = torch.zeros(2, dtype=torch.float64)  # (loss sum, label count)
    rows = list(range(info.rank, len(data), info.world))
    for start in range(0, len(rows), micro):
        batch = data.get_batch(rows[start : start + micro])
        count = int((batch["labels"] != IGNORE_INDEX).sum())
        loss = engine(**to_device(batch, device)).float().item()
        total += torch.tensor([loss * count, count], dtype=torch.float64)
    total = all_mean(total, info.world) * info.world
    return (total[0] / total[1].clamp(min=1)).item()


def evaluate(ctx: dict[str, Any]) -> dict[str, float]:
    """Held-out loss and exact-match accuracy."""
    engine = ctx["engine"]
    metrics = {
        "eval/loss": heldout_loss(engine, ctx["heldout"], ctx["info"], ctx["micro"], ctx["device"])
    }
    samples = ctx["run_dir"] / "samples.jsonl" if ctx["info"].is_main else None
    scores = exact_match(
        engine.inference_model(),
        ctx["prompts"],
        ctx["tokenizer"],
        ctx["answer_tokens"],
        samples_file=samples,
        step=ctx["step"],
    )
    metrics.update(
        {f"eval/accuracy/{k}" if k != "all" else "eval/accuracy": v for k, v in scores.items()}
    )
    return metrics


def train(cfg: SFTConfig) -> dict[str, Any]:
    """Run (or resume) supervised finetuning; returns the final metrics."""
    place, done = launch(cfg, "sft")
    if done is not None:
        return done
    info, device, run_dir, resume_from = place.info, place.device, place.run_dir, place.resume_from
    source = resume_from or cfg.init_from
    if not source:
        raise ConfigError("init_from: SFT starts from a pretrained checkpoint; set init_from")
    set_seed(cfg.train.seed, info.rank)
    model, tok, meta = load_checkpoint(source)
    if tok is None:
        raise ConfigError(f"init_from: {source} has no tokenizer files; SFT needs its tokenizer")
    if cfg.data.seq_len > model.cfg.max_seq_len:
        raise ConfigError(
            f"data.seq_len: {cfg.data.seq_len} exceeds the model's max_seq_len="
            f"{model.cfg.max_seq_len}"
        )
    model.train()
    model.loss_cfg = cfg.loss
    train_data, heldout_records = load_sft_data(cfg.data, tok)
    heldout = SFTDataset(heldout_records, tok, cfg.data.seq_len, pack=cfg.data.pack)
    prompts = PromptDataset(heldout_records, tok, cfg.data.seq_len)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    accum = check_batch_sizes(cfg.train, info.world)
    engine = build_engine(
        model,
        cfg.engine,
        cfg.optim,
        micro_batch=cfg.train.micro_batch_size,
        grad_accum=accum,
        total_steps=cfg.train.steps,
        info=info,
    )
    step, cursor = restore(engine, place, meta)
    tracker = open_tracker(cfg, place, meta, model_cfg=model.cfg, seq_len=cfg.data.seq_len)
    ctx = {
        "engine": engine,
        "heldout": heldout,
        "prompts": prompts,
        "tokenizer": tok,
        "info": info,
        "micro": cfg.train.micro_batch_size,
        "device": device,
        "answer_tokens": cfg.answer_tokens,
        "run_dir": run_dir,
        "step": 0,
    }
    trainable = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
    tracker.message(
        f"sft: from {source}; {num_params(model.cfg) / 1e6:.2f}M parameters "
        f"({trainable / 1e6:.3f}M trainable); {train_data.summary()}; "
        f"{prompts.summary()}; ZeRO-{engine.zero_stage}, {info.world} process(es)"
    )
    last: dict[str, Any] = {}
    if step == 0:
        engine.train(False)
        before = evaluate(ctx)
        last.update({k.replace("eval/", "eval_before/"): v for k, v in before.items()})
        tracker.log(0, before)
        tracker.message(
            f"before SFT: held-out loss {before['eval/loss']:.4f}, "
            f"exact match {before['eval/accuracy']:.3f}"
        )
    sampler = GlobalSampler(len(train_data), cfg.data.seed)

    def micro_step(step: int, start: int, count: int) -> tuple[torch.Tensor, dict[str, float]]:
        batch = train_data.get_batch(sampler.indices(start, count))
        return engine(**to_device(batch, device)), {}

    def save(step: int, cursor: int, metrics: dict[str, Any]) -> Path:
        meta = checkpoint_meta(
            "sft",
            cfg,
            place,
            tracker,
            step=step,
            cursor=cursor,
            parent=source,
            metrics={**last, **metrics},
        )
        scaling = cfg.lora.alpha / cfg.lora.rank if cfg.lora.enabled else None
        return save_stage_checkpoint(
            engine,
            run_dir / f"step-{step:06d}",
            tokenizer=tok,
            info=info,
            meta=meta,
            lora_scaling=scaling,
        )

    started = time.perf_counter()
    step, cursor, final = training_loop(
        cfg=cfg,
        engine=engine,
        info=info,
        tracker=tracker,
        num_samples=len(train_data),
        step=step,
        cursor=cursor,
        micro_step=micro_step,
        evaluate=lambda step: evaluate({**ctx, "step": step}),
        save=save,
        tokens_per_step=cfg.train.global_batch_size * cfg.data.seq_len,
    )
    last.update(final)
    tracker.message(
        f"sft done in {format_duration(time.perf_counter() - started)}: held-out "
        f"exact match {last.get('eval_before/accuracy', float('nan')):.3f} -> "
        f"{last.get('eval/accuracy', float('nan')):.3f}"
    )
    tracker.close()
    return last


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: --config FILE, --dry-run, and --section.key=value overrides."""
    return run_entry(SFTConfig, train, argv, "sft")


if __name__ == "__main__":
    sys.exit(main())
