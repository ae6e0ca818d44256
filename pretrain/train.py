"""Pretraining stage: parse config, build tokenizer and data, build model, wrap in the engine,
loop, save. Runs the same under `deepspeed pretrain/train.py --config ...`, `torchrun`,
`accelerate launch` and plain `python`.

    python pretrain/train.py --config configs/pretrain/demo.yaml --train.steps=200
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.checkpoint import load_checkpoint, resolve_checkpoint
from lmforge.config import option
from lmforge.data import DataConfig, GlobalSampler, PackedDataset, prepare_data
from lmforge.distributed import DistInfo
from lmforge.engine import build_engine
from lmforge.errors import ConfigError
from lmforge.generate import GenerateConfig, generate
from lmforge.loss import IGNORE_INDEX
from lmforge.model import ModelConfig, build_model, flops_per_token, num_params
from lmforge.runtime import (
    StopFlag,
    all_mean,
    barrier,
    run_entry,
    set_seed,
)
from lmforge.stage import (
    StageConfig,
    StepWindow,
    checkpoint_meta,
    launch,
    open_tracker,
    optimizer_step,
    restore,
    save_stage_checkpoint,
    start_monitor,
    to_device,
)
from lmforge.tokenizer import TokenizerConfig
from lmforge.tracking import Tracker, format_duration, measure_peak_flops
from pretrain.objectives import (
    ObjectiveConfig,
    apply_objective,
    choose_objective,
    sample_generators,
)


@dataclass
class PretrainConfig(StageConfig):
    """The whole pretraining run: the common stage sections plus model, tokenizer, data."""

    run_dir: str = option("runs/pretrain", "Directory for checkpoints, metrics and the config.")
    model: ModelConfig = option(default_factory=ModelConfig, doc="Architecture (or a preset).")
    tokenizer: TokenizerConfig = option(default_factory=TokenizerConfig, doc="Tokenizer.")
    data: DataConfig = option(default_factory=DataConfig, doc="Corpus and packing.")
    objective: ObjectiveConfig = option(default_factory=ObjectiveConfig, doc="Objectives.")

    def validate(self, prefix: str = "") -> None:
        """Checks that span sections."""
        super().validate(prefix)
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len: {self.data.seq_len} exceeds model.max_seq_len="
                f"{self.model.max_seq_len}; shorten the sequences or raise the limit"
            )


@dataclass
class Run:
    """What evaluation and sampling need from a running stage."""

    cfg: PretrainConfig
    engine: Any
    val: PackedDataset
    info: DistInfo
    device: torch.device
    tokenizer: Any
    tracker: Tracker
    mask_id: int
    special_ids: torch.Tensor


@torch.no_grad()
def evaluate(ctx: Run, step: int) -> dict[str, float]:
    """Loss and perplexity per objective on fixed validation windows, all ranks together."""
    cfg, engine, val = ctx.cfg, ctx.engine, ctx.val
    engine.train(False)
    per_rank = cfg.train.micro_batch_size
    metrics: dict[str, float] = {}
    for name in cfg.objective.active:
        total = torch.zeros(2, dtype=torch.float64)  # (loss sum, label count)
        for b in range(cfg.train.eval_batches):
            start = (b * ctx.info.world + ctx.info.rank) * per_rank
            idx = [i % len(val) for i in range(start, start + per_rank)]
            inputs = apply_objective(
                name,
                val.get_batch(idx),
                cfg.objective,
                mask_id=ctx.mask_id,
                vocab_size=cfg.model.vocab_size,
                special_ids=ctx.special_ids,
                generators=sample_generators(cfg.train.seed + 1, idx),
            )
            count = (inputs["labels"] != IGNORE_INDEX).sum().item()
            loss = engine(**to_device(inputs, ctx.device)).float().item()
            total += torch.tensor([loss * count, count], dtype=torch.float64)
        total = all_mean(total, ctx.info.world) * ctx.info.world
        value = (total[0] / total[1].clamp(min=1)).item()
        metrics[f"eval/{name}/loss"] = value
        metrics[f"eval/{name}/ppl"] = math.exp(min(value, 50.0))
    engine.train(True)
    return metrics


def show_samples(ctx: Run) -> list[str]:
    """Greedy continuations of the starts of a few validation documents (every rank runs them,
    so ZeRO-3 can gather parameters; rank 0 prints)."""
    cfg, tok = ctx.cfg, ctx.tokenizer
    if cfg.train.samples <= 0:
        return []
    prompts = [
        ctx.val.get_batch([i])["input_ids"][0, :16].tolist() for i in range(cfg.train.samples)
    ]
    room = cfg.model.max_seq_len - 16
    gen_cfg = GenerateConfig(max_new_tokens=min(cfg.train.sample_tokens, room), temperature=0)
    out = generate(ctx.engine.module, prompts, gen_cfg, eos_ids=[tok.eos_token_id])
    pairs = list(zip([tok.decode(p) for p in prompts], out.texts(tok), strict=True))
    texts = [p + " ⟶ " + t for p, t in pairs]
    for text in texts:
        ctx.tracker.message("  sample: " + text.replace("\n", " ")[:300])
    ctx.tracker.log_samples([{"prompt": p, "completion": t} for p, t in pairs])  # W&B table
    return texts


def train(cfg: PretrainConfig) -> dict[str, Any]:
    """Run (or resume) pretraining; returns the final metrics."""
    place, done = launch(cfg, "pretrain")
    if done is not None:
        return done
    info, device, run_dir, resume_from = place.info, place.device, place.run_dir, place.resume_from
    if resume_from is not None or cfg.init_from:
        source = resume_from or Path(cfg.init_from)
        if (resolve_checkpoint(source) / "tokenizer.json").exists() and not cfg.tokenizer.path:
            cfg.tokenizer.path = str(resolve_checkpoint(source))
    data = prepare_data(cfg.data, cfg.tokenizer, is_main=info.is_main)
    barrier()
    tok = data.tokenizer
    if len(tok) > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
            f"{len(tok)} tokens; raise it or train a smaller tokenizer"
        )
    set_seed(cfg.train.seed, info.rank)
    meta: dict[str, Any] = {}
    if resume_from is not None or cfg.init_from:
        model, _, meta = load_checkpoint(resume_from or cfg.init_from, with_tokenizer=False)
        cfg.model = model.cfg
        model.train()
    else:
        model = build_model(cfg.model, seed=cfg.train.seed)
    model.loss_cfg = cfg.loss
    per_step = cfg.train.micro_batch_size * info.world
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size: {cfg.train.global_batch_size} is not a multiple of "
            f"micro_batch_size × processes = {per_step}"
        )
    accum = cfg.train.global_batch_size // per_step
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
    tokens_seen = int(meta.get("tokens_seen", 0)) if resume_from else 0
    seq = cfg.data.seq_len
    dataset = PackedDataset(
        data.train,
        seq,
        eos_id=tok.eos_token_id,
        document_mask=cfg.data.document_mask,
        reset_positions=cfg.data.reset_positions,
    )
    val = PackedDataset(
        data.val,
        seq,
        eos_id=tok.eos_token_id,
        document_mask=cfg.data.document_mask,
        reset_positions=cfg.data.reset_positions,
    )
    if len(dataset) == 0 or len(val) == 0:
        raise ConfigError(
            f"data.seq_len: {seq} is longer than the whole train or validation split; "
            "use a shorter seq_len or more data"
        )
    sampler = GlobalSampler(len(dataset), cfg.data.seed)
    fpt = flops_per_token(cfg.model, seq)
    tracker = open_tracker(
        cfg, place, meta, flops_per_token=fpt, peak_flops=measure_peak_flops(device)
    )
    special = torch.tensor([tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens])
    ctx = Run(cfg, engine, val, info, device, tok, tracker, tok.mask_token_id, special)
    if info.is_main:
        what = "resuming from " + str(resume_from) if resume_from else "starting"
        tracker.message(
            f"pretrain: {what}; {num_params(cfg.model) / 1e6:.2f}M parameters, "
            f"{len(dataset)} train sequences of {seq} tokens, {info.world} process(es), "
            f"ZeRO-{engine.zero_stage}, {accum} accumulation step(s), device {device}"
        )
    stop = StopFlag()
    monitor = start_monitor(cfg, engine, info, tracker)
    engine.train(True)
    last_metrics: dict[str, Any] = {}
    window = StepWindow()
    started = time.perf_counter()
    while step < cfg.train.steps:
        name = choose_objective(cfg.objective, step, cfg.train.seed)

        def forward(micro: int, cursor: int = cursor, name: str = name) -> Any:
            start = cursor + (info.rank * accum + micro) * cfg.train.micro_batch_size
            idx = sampler.indices(start, cfg.train.micro_batch_size)
            inputs = apply_objective(
                name,
                dataset.get_batch(idx),
                cfg.objective,
                mask_id=ctx.mask_id,
                vocab_size=cfg.model.vocab_size,
                special_ids=special,
                generators=sample_generators(cfg.train.seed, list(range(start, start + len(idx)))),
            )
            loss = engine(**to_device(inputs, device))
            return loss, {f"loss/{name}": loss.detach().float().item()}

        result = optimizer_step(
            engine=engine,
            monitor=monitor,
            step=step,
            cursor=cursor,
            accum=accum,
            forward=forward,
            run_dir=run_dir,
            info=info,
        )
        if result.rolled_back is not None:
            step, cursor = int(result.rolled_back["step"]), int(result.rolled_back["data_cursor"])
            tokens_seen = int(result.rolled_back.get("tokens_seen", cursor * seq))
            window.reset()
            continue
        step += 1
        cursor += cfg.train.global_batch_size
        tokens_seen += cfg.train.global_batch_size * seq
        window.add(**result.values)
        window.close_step()
        if step % cfg.tracking.log_every == 0 or step == cfg.train.steps:
            metrics = window.flush(tracker, engine, info.world, cfg.train.global_batch_size * seq)
            metrics.update(tokens=tokens_seen, epoch=cursor / len(dataset), **monitor.metrics())
            tracker.log(step, metrics)
            tracker.progress(step, metrics, metrics["step_seconds"])
            last_metrics.update(metrics)
        last = step == cfg.train.steps
        if last or (cfg.train.eval_every and step % cfg.train.eval_every == 0):
            eval_metrics = evaluate(ctx, step)
            tracker.log(step, eval_metrics)
            tracker.message(
                f"eval step {step}: "
                + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items() if k.endswith("loss"))
            )
            show_samples(ctx)
            last_metrics.update(eval_metrics)
        stopping = stop.requested() or step == cfg.train.stop_at
        if last or stopping or step % cfg.train.save_every == 0:
            path = save_stage_checkpoint(
                engine,
                run_dir / f"step-{step:06d}",
                tokenizer=tok,
                info=info,
                meta=checkpoint_meta(
                    "pretrain",
                    cfg,
                    place,
                    tracker,
                    step=step,
                    cursor=cursor,
                    parent=resume_from or cfg.init_from,
                    metrics=last_metrics,
                    tokens_seen=tokens_seen,
                ),
            )
            tracker.message(f"saved {path}")
        if stopping:
            tracker.message(f"stop requested: saved at step {step}; resume with resume: auto")
            break
    summary = ", ".join(
        f"{k.split('/')[1]} loss {v:.3f} (ppl {math.exp(min(v, 50)):.1f})"
        for k, v in last_metrics.items()
        if k.startswith("eval/") and k.endswith("/loss")
    )
    tracker.message(
        f"done: {step} steps, {tokens_seen / 1e6:.2f}M tokens in "
        f"{format_duration(time.perf_counter() - started)}; validation {summary or 'n/a'}; "
        f"checkpoint {run_dir / f'step-{step:06d}'} (latest in {run_dir}/latest)"
    )
    tracker.close()
    return last_metrics


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: --config FILE, --dry-run, and --section.key=value overrides."""
    return run_entry(PretrainConfig, train, argv, "pretrain")


if __name__ == "__main__":
    sys.exit(main())
