"""Reward model: parse config, load the SFT checkpoint with a fresh scalar head, build preference
pairs, wrap in the engine, train the Bradley-Terry loss, save as a sequence classifier.

    python finetune/reward.py --config configs/finetune/reward.yaml --init_from=runs/sft

Pairs are rendered with the tokenizer's own chat template, and the head reads the last token of
`apply_chat_template(prompt + [answer])` that is not padding (lmforge's template: the newline after
the answer's `<|end|>`). The saved checkpoint loads with `AutoModelForSequenceClassification`,
which reads that same token of the same ids, and gives the same scores.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.batching import eval_chunks
from lmforge.checkpoint import load_reward_model
from lmforge.checkpointer import Checkpointer
from lmforge.config import option
from lmforge.data.chat import ChatDataConfig, SourceSums, chat_tokenizer, preference_data
from lmforge.data.chat_datasets import PreferenceDataset, pair_order
from lmforge.distributed import DistInfo
from lmforge.engine import Engine, build_engine
from lmforge.errors import ConfigError
from lmforge.loop import before_after, supervised_task, training_loop
from lmforge.model import num_params
from lmforge.prefs import bradley_terry_loss
from lmforge.report import HELDOUT, chat_heldout
from lmforge.runtime import global_means, run_entry, set_seed
from lmforge.stage import (
    StageConfig,
    launch,
    load_start,
    planned,
    start_run,
    to_device,
)


@dataclass
class RewardConfig(StageConfig):
    """Reward-model training on preference pairs: the common stage sections plus data."""

    run_dir: str = option("runs/reward", "Directory for checkpoints, metrics and the config.")
    init_from: str = option(
        "runs/sft", "The checkpoint whose backbone the reward model starts from."
    )
    data: ChatDataConfig = option(default_factory=ChatDataConfig, doc="Preference pairs.")
    length_buckets: int = option(
        0,
        "Group pairs of like length into batches, within windows of this many global batches "
        "(0 = off): less padding, other batch mixes.",
    )

    def validate(self, prefix: str = "") -> None:
        """Checks that span sections."""
        super().validate(prefix)
        if self.length_buckets < 0:
            raise ConfigError(f"length_buckets: must be 0 (off) or more, got {self.length_buckets}")


def pair_scores(
    engine: Engine, batch: dict[str, torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (B,) of the chosen and rejected chats, in one forward pass of 2B rows. Both sides
    share the batch's width T (its longest chat), and each row's score is read at its own
    last_index, which lies inside T, so the width does not change a score."""
    b = batch["chosen_ids"].shape[0]
    inputs = {
        "input_ids": torch.cat([batch["chosen_ids"], batch["rejected_ids"]]),  # (2B, T)
        "last_index": torch.cat([batch["chosen_last"], batch["rejected_last"]]),  # (2B,)
    }
    scores = engine(**to_device(inputs, device))  # (2B,): right padding is invisible causally
    return scores[:b], scores[b:]


@torch.no_grad()
def pair_accuracy(
    engine: Engine,
    data: PreferenceDataset,
    info: DistInfo,
    micro: int,
    device: torch.device,
    sources: list[str] | None = None,
) -> dict[str, float]:
    """Held-out pair accuracy, loss and mean margin, rows split across ranks; with `sources`
    (each held-out pair's source, a mixture's) also eval/<name>/accuracy and /loss, from the
    same passes."""
    sums = {"accuracy": 0.0, "loss": 0.0, "margin": 0.0}
    seen = 0
    by_source = SourceSums(sources)
    for rows, counted in eval_chunks(len(data), info.rank, info.world, micro):
        chosen, rejected = pair_scores(engine, data.get_batch(rows), device)
        if not counted:  # a stand-in pass that keeps ZeRO-3's collectives in step
            continue
        seen += len(rows)
        loss, accuracy = bradley_terry_loss(chosen, rejected)
        sums["accuracy"] += accuracy.item() * len(chosen)
        sums["loss"] += loss.item() * len(chosen)
        sums["margin"] += (chosen - rejected).sum().item()
        for name, at in by_source.groups(rows):
            part_loss, part_accuracy = bradley_terry_loss(chosen[at], rejected[at])
            values = {"accuracy": part_accuracy.item(), "loss": part_loss.item()}
            by_source.add(name, values, len(at))
    means = global_means(sums, seen, info.world)
    per_source = by_source.means(("accuracy", "loss"), info.world)
    return {**{f"eval/{key}": value for key, value in means.items()}, **per_source}


def train(cfg: RewardConfig) -> dict[str, Any]:
    """Run (or resume) reward-model training; returns the final metrics."""
    place, done = launch(cfg, "reward")
    if done is not None:
        return done
    info, device = place.info, place.device
    set_seed(cfg.train.seed, info.rank)
    model, tok, _ = load_start(place, cfg.init_from, load_reward_model, seed=cfg.train.seed)
    source = place.resume_from or cfg.init_from
    if tok is None:
        raise ConfigError(f"init_from: {source} has no tokenizer files; the reward model needs it")
    tok = chat_tokenizer(tok, cfg.data)  # its own template (or data.chat_template): trained, saved
    if cfg.data.seq_len > model.cfg.max_seq_len:
        raise ConfigError(
            f"data.seq_len: {cfg.data.seq_len} exceeds the model's max_seq_len="
            f"{model.cfg.max_seq_len}"
        )
    model.train()
    train_data, heldout, sources = preference_data(cfg.data, tok)
    micro, plan = cfg.train.micro_batch_size, cfg.batch_plan(info.world)
    engine = build_engine(
        model,
        cfg.engine,
        cfg.optim,
        micro_batch=plan.micro,
        grad_accum=plan.accum,
        total_steps=cfg.train.steps,
        info=info,
    )
    checkpointer = Checkpointer(place.run_dir, info, cfg, "reward", tok)
    checkpointer.record[HELDOUT] = chat_heldout(cfg.data, len(heldout), "pairs")
    checkpointer.add_engine("model", engine, parent=cfg.init_from)
    run = start_run(cfg, place, checkpointer, model_cfg=model.cfg, seq_len=cfg.data.seq_len)
    run.tracker.message(
        f"reward: from {source}; {num_params(model.cfg) / 1e6:.2f}M parameters + scalar head; "
        f"{train_data.summary()}; held-out {heldout.summary()}; "
        f"{engine.describe()}, {info.world} process(es)"
    )
    run.tracker.message(plan.describe())
    # Batches are padded to their longest pair (PreferenceDataset.get_batch), in this order.
    sampler = pair_order(train_data, cfg.data.seed, cfg.train.global_batch_size, cfg.length_buckets)

    def micro_step(step: int, start: int, count: int) -> tuple[torch.Tensor, dict[str, float]]:
        batch = train_data.get_batch(sampler.indices(start, count))
        chosen, rejected = pair_scores(engine, batch, device)
        loss, accuracy = bradley_terry_loss(chosen, rejected)
        return loss, {"accuracy": accuracy.item(), "margin": (chosen - rejected).mean().item()}

    task = supervised_task(
        micro_step,
        # No held-out pairs: nothing to measure (the loop says so once).
        lambda step: (
            pair_accuracy(engine, heldout, info, micro, device, sources) if len(heldout) else {}
        ),
        planned(cfg.train, plan),
        info,
        num_samples=len(train_data),
        tokens_per_sample=round(train_data.num_tokens / len(train_data)),  # real, both sides
        summary=lambda last: before_after(last, "accuracy", "held-out pair accuracy"),
    )
    return training_loop(run, task)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: --config FILE, --dry-run, and --section.key=value overrides."""
    return run_entry(RewardConfig, train, argv, "reward")


if __name__ == "__main__":
    sys.exit(main())
