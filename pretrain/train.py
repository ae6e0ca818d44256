"""Pretraining stage: parse config, build tokenizer and data, build model, wrap in the engine,
loop, save. Runs the same under `deepspeed pretrain/train.py --config ...`, `torchrun`,
`accelerate launch` and plain `python`.

    python pretrain/train.py --config configs/pretrain/demo.yaml --train.steps=200
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.checkpoint import load_checkpoint, resolve_checkpoint
from lmforge.checkpointer import Checkpointer
from lmforge.config import option
from lmforge.data import DataConfig, GlobalSampler, PackedDataset, prepare_data
from lmforge.data.mixture import MixedDataset, prepare_mixture
from lmforge.data.sampler import MixtureSampler
from lmforge.distributed import DistInfo
from lmforge.engine import Engine, build_engine
from lmforge.errors import ConfigError
from lmforge.generate import GenerateConfig, generate
from lmforge.loop import supervised_task, training_loop
from lmforge.loss import IGNORE_INDEX, LossConfig
from lmforge.model import ModelConfig, build_model, num_params
from lmforge.report import HELDOUT, describe_corpus_heldout, heldout_record
from lmforge.runtime import TrainConfig, all_mean, barrier, run_entry, set_seed
from lmforge.stage import Launch, StageConfig, launch, planned, start_run, to_device
from lmforge.tokenizer import TokenizerConfig
from lmforge.tracking import Tracker
from pretrain.objectives import (
    ObjectiveConfig,
    apply_objective,
    choose_objective,
    sample_generators,
)


@dataclass
class PretrainTrainConfig(TrainConfig):
    """The train section plus what pretraining's evaluation reads."""

    eval_batches: int = option(8, "Validation micro-batches per objective per evaluation.")
    samples: int = option(2, "Greedy continuations of validation text shown at each evaluation.")
    sample_tokens: int = option(48, "Tokens generated per sample.")

    def validate(self, prefix: str = "train") -> None:
        """Reject out-of-range values, naming the key."""
        super().validate(prefix)
        if self.eval_batches <= 0 or self.sample_tokens <= 0 or self.samples < 0:
            raise ConfigError(
                f"{prefix}.eval_batches and {prefix}.sample_tokens must be positive and "
                f"{prefix}.samples >= 0"
            )


@dataclass
class PretrainConfig(StageConfig):
    """The whole pretraining run: the common stage sections plus model, tokenizer, data."""

    run_dir: str = option("runs/pretrain", "Directory for checkpoints, metrics and the config.")
    model: ModelConfig = option(default_factory=ModelConfig, doc="Architecture (or a preset).")
    tokenizer: TokenizerConfig = option(default_factory=TokenizerConfig, doc="Tokenizer.")
    data: DataConfig = option(default_factory=DataConfig, doc="Corpus and packing.")
    objective: ObjectiveConfig = option(default_factory=ObjectiveConfig, doc="Objectives.")
    loss: LossConfig = option(default_factory=LossConfig, doc="Cross-entropy options.")
    train: PretrainTrainConfig = option(
        default_factory=PretrainTrainConfig, doc="Steps, batches, cadence."
    )

    def validate(self, prefix: str = "") -> None:
        """Checks that span sections."""
        super().validate(prefix)
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len: {self.data.seq_len} exceeds model.max_seq_len="
                f"{self.model.max_seq_len}; shorten the sequences or raise the limit"
            )
        self._check_held_out()

    def _check_held_out(self) -> None:
        """Before any data is read: train.keep_best needs a validation split."""
        fractions = [self.data.validation_fraction] + [
            s.validation_fraction for s in self.data.sources if s.validation_fraction is not None
        ]
        if self.train.keep_best and max(fractions) <= 0:
            raise ConfigError(
                "train.keep_best: data.validation_fraction is 0, so there is no validation to "
                "keep the best of; hold some data out or unset keep_best"
            )


@dataclass
class Run:
    """What evaluation and sampling need from a running stage."""

    cfg: PretrainConfig
    engine: Engine
    val: PackedDataset | MixedDataset
    info: DistInfo
    device: torch.device
    tokenizer: Any
    tracker: Tracker
    mask_id: int
    special_ids: torch.Tensor
    # A mixture's validation sets: (name, normalised weight, windows), those with any windows.
    val_parts: list[tuple[str, float, PackedDataset]] = dataclasses.field(default_factory=list)


def _val_loss(ctx: Run, val: PackedDataset | MixedDataset, name: str) -> float:
    """Objective `name`'s mean loss per label over the fixed validation windows of `val`."""
    cfg, engine = ctx.cfg, ctx.engine
    per_rank = cfg.train.micro_batch_size
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
    return (total[0] / total[1].clamp(min=1)).item()


@torch.no_grad()
def evaluate(ctx: Run, step: int) -> dict[str, float]:
    """Loss and perplexity per objective on fixed validation windows, all ranks together.

    A mixture evaluates each source's own validation windows (val/<name>/loss, or
    val/<name>/<objective>/loss with several objectives); its eval/<objective>/loss is their
    mean weighted by the sources' weights, the mixture the model is trained on."""
    cfg = ctx.cfg
    if len(ctx.val) == 0:  # no validation split: nothing to evaluate (the loop says so once)
        return {}
    ctx.engine.train(False)
    metrics: dict[str, float] = {}
    several = len(cfg.objective.active) > 1
    for name in cfg.objective.active:
        if ctx.val_parts:
            weighted = 0.0
            for source, weight, val in ctx.val_parts:
                loss = _val_loss(ctx, val, name)
                metrics[f"val/{source}/{name}/loss" if several else f"val/{source}/loss"] = loss
                weighted += weight * loss
            value = weighted / sum(w for _, w, _ in ctx.val_parts)
        else:
            value = _val_loss(ctx, ctx.val, name)
        metrics[f"eval/{name}/loss"] = value
        metrics[f"eval/{name}/ppl"] = math.exp(min(value, 50.0))
    ctx.engine.train(True)
    return metrics


def show_samples(ctx: Run) -> list[str]:
    """Greedy continuations of the starts of a few validation documents (every rank runs them,
    so ZeRO-3 can gather parameters; rank 0 prints)."""
    cfg, tok = ctx.cfg, ctx.tokenizer
    # The validation split may hold fewer windows than train.samples, or none: show what it has.
    count = min(cfg.train.samples, len(ctx.val))
    if count <= 0:
        return []
    prompts = [ctx.val.get_batch([i])["input_ids"][0, :16].tolist() for i in range(count)]
    room = cfg.model.max_seq_len - 16
    gen_cfg = GenerateConfig(max_new_tokens=min(cfg.train.sample_tokens, room), temperature=0)
    out = generate(ctx.engine.module, prompts, gen_cfg, eos_ids=[tok.eos_token_id])
    pairs = list(zip([tok.decode(p) for p in prompts], out.texts(tok), strict=True))
    texts = [p + " ⟶ " + t for p, t in pairs]
    for text in texts:
        ctx.tracker.message("  sample: " + text.replace("\n", " ")[:300])
    ctx.tracker.log_samples([{"prompt": p, "completion": t} for p, t in pairs])  # W&B table
    return texts


def build_start(cfg: PretrainConfig, place: Launch, vocab: int) -> Any:
    """The model to pretrain: the resume point's or init_from's weights (whose architecture
    replaces the model section), else a fresh one."""
    if vocab > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
            f"{vocab} tokens; raise it or train a smaller tokenizer"
        )
    if place.point is not None:
        model, _, _ = load_checkpoint(place.point.path, meta=place.point.meta, with_tokenizer=False)
    elif cfg.init_from:
        model, _, _ = load_checkpoint(cfg.init_from, with_tokenizer=False)
    else:
        return build_model(cfg.model, seed=cfg.train.seed)
    return model.train()


def packed(cfg: PretrainConfig, tokens: Any, eos_id: int) -> PackedDataset:
    """Windows of data.seq_len + 1 tokens of one split."""
    data = cfg.data
    return PackedDataset(
        tokens,
        data.seq_len,
        eos_id=eos_id,
        document_mask=data.document_mask,
        reset_positions=data.reset_positions,
    )


def train(cfg: PretrainConfig) -> dict[str, Any]:
    """Run (or resume) pretraining; returns the final metrics."""
    place, done = launch(cfg, "pretrain")
    if done is not None:
        return done
    info, device = place.info, place.device
    source = place.resume_from or (Path(cfg.init_from) if cfg.init_from else None)
    has_tokenizer = source is not None and (resolve_checkpoint(source) / "tokenizer.json").exists()
    tok_cfg = cfg.tokenizer
    if has_tokenizer and not cfg.tokenizer.path:  # a checkpoint's own tokenizer, not a new one
        tok_cfg = dataclasses.replace(tok_cfg, path=str(resolve_checkpoint(source)))
    data = _prepare(cfg, tok_cfg, info.is_main)
    barrier()
    tok, seq = data.tokenizer, cfg.data.seq_len
    set_seed(cfg.train.seed, info.rank)
    model = build_start(cfg, place, len(tok))
    # What this run trains with; `cfg` stays as the user wrote it (config.yaml, resume checks).
    run_cfg = dataclasses.replace(cfg, model=model.cfg, tokenizer=tok_cfg)
    model.loss_cfg = cfg.loss
    plan = cfg.batch_plan(info.world)
    engine = build_engine(
        model,
        cfg.engine,
        cfg.optim,
        micro_batch=plan.micro,
        grad_accum=plan.accum,
        total_steps=cfg.train.steps,
        info=info,
    )
    dataset, val, val_parts, sampler = _datasets(cfg, data, tok.eos_token_id)
    checkpointer = Checkpointer(place.run_dir, info, cfg, "pretrain", tok)
    per_set = cfg.train.eval_batches * cfg.train.micro_batch_size * info.world
    windows = sum(min(len(v), per_set) for _, _, v in val_parts) or min(len(val), per_set)
    checkpointer.record[HELDOUT] = heldout_record(
        _describe_heldout(cfg.data), windows, f"windows of {seq} tokens"
    )
    checkpointer.add_engine("model", engine, parent=source or "")
    run = start_run(cfg, place, checkpointer, model_cfg=model.cfg, seq_len=seq)
    special = torch.tensor([tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens])
    ctx = Run(
        run_cfg, engine, val, info, device, tok, run.tracker, tok.mask_token_id, special, val_parts
    )
    what = "resuming from " + str(place.resume_from) if place.resume_from else "starting"
    run.tracker.message(
        f"pretrain: {what}; {num_params(model.cfg) / 1e6:.2f}M parameters, "
        f"{len(dataset)} train sequences of {seq} tokens, {info.world} process(es), "
        f"{engine.describe()}, device {device}"
    )
    if cfg.data.sources:
        run.tracker.message(_describe_mixture(data, dataset, [name for name, _, _ in val_parts]))
    run.tracker.message(plan.describe())

    def micro_step(step: int, start: int, count: int) -> tuple[torch.Tensor, dict[str, float]]:
        name = choose_objective(cfg.objective, step - 1, cfg.train.seed)
        inputs = apply_objective(
            name,
            dataset.get_batch(sampler.indices(start, count)),
            cfg.objective,
            mask_id=ctx.mask_id,
            vocab_size=model.cfg.vocab_size,
            special_ids=special,
            generators=sample_generators(cfg.train.seed, list(range(start, start + count))),
        )
        loss = engine(**to_device(inputs, device))
        return loss, {f"loss/{name}": loss.detach().float().item()}

    def evaluate_and_show(step: int) -> dict[str, float]:
        metrics = evaluate(ctx, step)
        show_samples(ctx)
        return metrics

    task = supervised_task(
        micro_step,
        evaluate_and_show,
        planned(cfg.train, plan),
        info,
        num_samples=len(dataset),
        tokens_per_sample=seq,
        summary=lambda last: (
            f"{last.get('tokens', 0) / 1e6:.2f}M tokens; validation "
            f"{validation_summary(last) or 'n/a'}"
        ),
    )
    task.evaluate_first = False  # a fresh model has nothing to compare against
    task.eval_line = lambda m: ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k.endswith("loss"))
    return training_loop(run, task)


def _prepare(cfg: PretrainConfig, tok_cfg: TokenizerConfig, is_main: bool) -> Any:
    """The prepared corpus: one source's PreparedData or a mixture's PreparedMixture."""
    if cfg.data.sources:
        return prepare_mixture(cfg.data, tok_cfg, is_main=is_main)
    return prepare_data(cfg.data, tok_cfg, is_main=is_main)


def _datasets(
    cfg: PretrainConfig, data: Any, eos_id: int
) -> tuple[
    PackedDataset | MixedDataset,
    PackedDataset | MixedDataset,
    list[tuple[str, float, PackedDataset]],
    GlobalSampler | MixtureSampler,
]:
    """(train windows, validation windows, a mixture's per-source validation sets, the sampler
    of the training order). Raises ConfigError when a split holds no window."""
    seq = cfg.data.seq_len
    if not cfg.data.sources:
        dataset, val = packed(cfg, data.train, eos_id), packed(cfg, data.val, eos_id)
        if len(dataset) == 0:
            raise ConfigError(
                f"data.seq_len: {seq} is longer than the whole train split; use a shorter "
                "seq_len or more data"
            )
        _check_validation(cfg, len(val))  # no window: validation is skipped
        return dataset, val, [], GlobalSampler(len(dataset), cfg.data.seed)
    trains = [packed(cfg, part.data.train, eos_id) for part in data.parts]
    for i, (part, train_set) in enumerate(zip(data.parts, trains, strict=True)):
        if len(train_set) == 0:
            raise ConfigError(
                f"data.sources[{i}] ({part.name}): its train split is shorter than one sample "
                f"of data.seq_len={seq} tokens; add documents, lower data.seq_len or drop it"
            )
    vals = [(p.name, p.weight, packed(cfg, p.data.val, eos_id)) for p in data.parts]
    val_parts = [v for v in vals if len(v[2])]
    sampler = MixtureSampler([len(t) for t in trains], data.weights, cfg.data.seed)
    if not val_parts:  # no source has a validation window: validation is skipped
        _check_validation(cfg, 0)
        return MixedDataset(trains), vals[0][2], [], sampler
    return MixedDataset(trains), MixedDataset([v for _, _, v in val_parts]), val_parts, sampler


def _check_validation(cfg: PretrainConfig, windows: int) -> None:
    """A validation split of no window skips validation, unless train.keep_best needs it."""
    if windows == 0 and cfg.train.keep_best:
        raise ConfigError(
            f"train.keep_best: the validation split holds no window of data.seq_len="
            f"{cfg.data.seq_len} + 1 tokens, so there is nothing to keep the best of; raise "
            "data.validation_fraction, shorten data.seq_len or unset keep_best"
        )


def _describe_mixture(data: Any, dataset: MixedDataset, val: list[str]) -> str:
    """'mixture: wiki 70.0% (1200 windows, a new epoch of it every ~1714 samples), ...'; a source
    without validation windows is said to be left out of evaluation."""
    words = []
    for part, train_set in zip(data.parts, dataset.parts, strict=True):
        every = len(train_set) / part.weight
        held = "" if part.name in val else "; no validation window: not evaluated"
        words.append(
            f"{part.name} {100 * part.weight:.1f}% ({len(train_set)} windows, a new epoch of it "
            f"every ~{every:.0f} samples{held})"
        )
    return "mixture: " + ", ".join(words)


def _describe_heldout(data: DataConfig) -> str:
    """The validation split in words; for a mixture, each source's share."""
    if not data.sources:
        return describe_corpus_heldout(data)
    shares = []
    for i, src in enumerate(data.sources):
        one = data.for_source(i)
        shares.append(f"{src.label()} {one.validation_fraction} of {src.source}")
    return "validation of data.sources: " + ", ".join(shares)


def validation_summary(last: dict[str, Any]) -> str:
    """'causal loss 5.031 (ppl 153.1), ...' from the last evaluation."""
    return ", ".join(
        f"{k.split('/')[1]} loss {v:.3f} (ppl {math.exp(min(v, 50)):.1f})"
        for k, v in last.items()
        if k.startswith("eval/") and k.endswith("/loss")
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: --config FILE, --dry-run, and --section.key=value overrides."""
    return run_entry(PretrainConfig, train, argv, "pretrain")


if __name__ == "__main__":
    sys.exit(main())
