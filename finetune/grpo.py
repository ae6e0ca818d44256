"""GRPO (Shao et al. 2024): parse config, load the SFT policy (and a frozen reference when
beta > 0), then per step: sample G completions for each prompt, score them with the configured
reward functions, normalise rewards within each group, and take clipped policy-gradient steps
with a k3 KL penalty to the reference. Save in the shared format.

    python finetune/grpo.py --config configs/finetune/grpo.yaml --init_from=runs/sft

A group never straddles processes, so advantages need no communication. Under ZeRO-3 the policy
is gathered once per rollout into a replica that generates (not once per token).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.rewards import CombinedRewardFn, RewardSpec, build_reward_fn
from lmforge.batching import BatchPlan
from lmforge.checkpoint import load_checkpoint
from lmforge.checkpointer import Checkpointer
from lmforge.config import option
from lmforge.data import GlobalSampler
from lmforge.data.chat import (
    ChatDataConfig,
    accuracy_by_source,
    chat_records,
    chat_tokenizer,
    heldout_prompts,
)
from lmforge.data.chat_datasets import PromptDataset
from lmforge.engine import Engine, build_engine
from lmforge.errors import ConfigError
from lmforge.loop import Micro, StepContext, Task, before_after, training_loop
from lmforge.loss import IGNORE_INDEX
from lmforge.report import HELDOUT, chat_heldout
from lmforge.rl import group_advantages, grpo_loss, masked_mean
from lmforge.rollout import (
    RolloutConfig,
    RolloutDraft,
    build_sequences,
    chunk_rows,
    eval_line,
    evaluate_policy,
    load_rollout_draft,
    rollout_metrics,
    sample_completions,
    token_logprobs,
)
from lmforge.runtime import run_entry, set_seed
from lmforge.stage import Launch, StageConfig, check_batch_sizes, launch, load_start, start_run


@dataclass
class GRPOConfig(StageConfig):
    """Group-relative policy optimisation with verifiable rewards.

    train.global_batch_size counts sequences per step over all processes: prompts × group_size;
    each process samples whole groups, and train.micro_batch_size caps the sequences of one
    forward pass (the batch plan splits the process's sequences into micro-batches).
    """

    run_dir: str = option("runs/grpo", "Directory for checkpoints, metrics and the config.")
    init_from: str = option("runs/sft", "The SFT checkpoint: the policy's start and reference.")
    data: ChatDataConfig = option(default_factory=ChatDataConfig, doc="Prompts with answers.")
    rewards: list[RewardSpec] = option(
        default_factory=lambda: [RewardSpec("exact_answer", 1.0)],
        doc="Reward functions and weights: exact_answer, format, contains:<text>, module:function.",
    )
    group_size: int = option(8, "G: completions sampled per prompt.")
    epochs: int = option(1, "Optimizer passes over each rollout batch.")
    clip: float = option(0.2, "ε of the clipped ratio.")
    beta: float = option(0.04, "Coefficient of the k3 KL to the reference; 0 = no reference.")
    temperature: float = option(1.0, "Sampling temperature of the rollouts (and of the log-probs).")
    max_new_tokens: int = option(16, "Most tokens per completion.")
    scale_advantages: bool = option(True, "Divide by the group's std (False: Dr. GRPO, mean only).")
    rollout: RolloutConfig = option(
        default_factory=RolloutConfig,
        doc="Speculative sampling of the rollouts: rollout.draft, rollout.draft_tokens.",
    )

    def validate(self, prefix: str = "") -> None:
        """Checks that span sections."""
        if self.group_size < 2:
            raise ConfigError(f"group_size: must be at least 2, got {self.group_size}")
        super().validate(prefix)  # the batch plan in whole groups (batch_plan below)
        if self.beta < 0 or self.clip <= 0 or self.epochs < 1 or self.temperature <= 0:
            raise ConfigError("beta >= 0, clip > 0, epochs >= 1 and temperature > 0 are required")

    def batch_plan(self, world: int) -> BatchPlan:
        """Sequences per step split over processes in whole groups (a group never straddles
        processes: its advantages are normalised together), then into micro-batches."""
        return check_batch_sizes(
            self.train, world, group=self.group_size, group_key="group_size", unit="sequences"
        )


@dataclass
class Policy:
    """What a GRPO step works with."""

    engine: Engine
    reference: torch.nn.Module | None
    tok: Any
    prompts: PromptDataset
    reward_fn: CombinedRewardFn
    draft: RolloutDraft | None = None  # rollout.draft: speculative sampling of the rollouts


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether any dropout of `model` is active in train mode (a dropout layer, LoRA's
    included, or the attention-probability dropout that the GPT keeps as a rate)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            return True
        rate = getattr(module, "attn_dropout", 0.0)
        if isinstance(rate, float) and rate > 0:
            return True
    return False


def old_logprobs_are_current(cfg: GRPOConfig, engine: Engine) -> bool:
    """Whether the old policy's log-probs equal those the loss's own forward computes, so that
    the separate pass computing them can be skipped: one epoch (the step's single optimizer
    update comes after all its micro-batches, so the weights are the rollout's at every loss
    forward) and no dropout (the train-mode forward computes what the eval-mode one did)."""
    return cfg.epochs == 1 and not has_dropout(engine.module)


def grpo_step(
    cfg: GRPOConfig, policy: Policy, place: Launch, plan: BatchPlan, *, old_pass: bool = False
) -> Any:
    """The step function: sample G completions for this rank's prompts, score and normalise
    them per group, then `epochs` passes of clipped policy-gradient micro-batches.

    The old policy's log-probs come from a separate no-grad pass only where they can differ
    from the loss's (`old_logprobs_are_current`) or where `old_pass` forces it; otherwise each
    micro-batch uses its own log-probs, detached: the same ratio (1), loss and gradients."""
    sampler = GlobalSampler(len(policy.prompts), cfg.data.seed)
    per_rank = plan.per_rank // cfg.group_size  # prompts of this rank per step
    micro, device = plan.micro, place.device
    engine, tok, prompts = policy.engine, policy.tok, policy.prompts
    reuse = not old_pass and old_logprobs_are_current(cfg, engine)

    def step_fn(ctx: StepContext) -> Generator[Micro, None, dict[str, float]]:
        t0 = time.perf_counter()
        first = ctx.cursor + place.info.rank * per_rank  # global position of this rank's prompts
        idx = sampler.indices(first, per_rank)
        rows = [i for i in idx for _ in range(cfg.group_size)]
        batch = [prompts.prompt_ids[i] for i in rows]
        out = sample_completions(
            engine, batch, tok, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
            seed=cfg.train.seed, step=ctx.step - 1, draft=policy.draft,
            rows=list(range(first * cfg.group_size, (first + per_rank) * cfg.group_size)),
        )  # fmt: skip
        t_sample = time.perf_counter() - t0  # generation alone: what a faster sampler would save
        rewards = policy.reward_fn(
            [tok.decode(p) for p in batch],
            out.texts(tok),
            [prompts.answers[i] for i in rows],
            [prompts.tasks[i] for i in rows],
            **prompts.field_lists(rows),
        )
        scores = torch.tensor(rewards.total, dtype=torch.float32)  # (N,)
        advantages = group_advantages(scores, cfg.group_size, scale=cfg.scale_advantages)
        seqs = build_sequences(batch, out.tokens.cpu(), out.lengths.cpu(), tok.pad_token_id)
        mask = (seqs["labels"] != IGNORE_INDEX).float()  # (N, L)
        chunks = chunk_rows(seqs, micro)
        with torch.no_grad():
            old = (
                []
                if reuse
                else [token_logprobs(engine, c, cfg.temperature, device) for c in chunks]
            )
            ref = [
                token_logprobs(policy.reference, c, cfg.temperature, device)
                if policy.reference is not None
                else None
                for c in chunks
            ]
        t_gen = time.perf_counter() - t0
        engine.train(True)
        for _ in range(cfg.epochs):
            for j, c in enumerate(chunks):
                rows_j = slice(j * micro, (j + 1) * micro)
                logp = token_logprobs(engine, c, cfg.temperature, device)
                if reuse:  # one epoch: micro-batch j's old log-probs are its current ones
                    old.append(logp.detach())
                loss, m = grpo_loss(
                    logp, old[j], ref[j], advantages[rows_j].to(device), mask[rows_j].to(device),
                    cfg.clip, cfg.beta,
                )  # fmt: skip
                yield Micro(loss, {k: v.item() for k, v in m.items()})
        t_step = time.perf_counter() - t0
        return {
            "reward": float(scores.mean()),
            **{f"reward/{k}": sum(v) / len(v) for k, v in rewards.parts.items()},
            "response_length": float(out.lengths.float().mean()),
            "generate_seconds": t_gen,
            "train_seconds": t_step - t_gen,
            "time/generation_seconds": t_sample,
            "time/generation_share": t_sample / max(t_step, 1e-9),
            "sample_entropy": float(-masked_mean(torch.cat(old).cpu(), mask)),
            "tokens": float(mask.sum()),
            **rollout_metrics(out),
        }

    return step_fn


def train(cfg: GRPOConfig) -> dict[str, Any]:
    """Run (or resume) GRPO; returns the final metrics."""
    place, done = launch(cfg, "grpo")
    if done is not None:
        return done
    info, device = place.info, place.device
    if not cfg.init_from:
        raise ConfigError("init_from: GRPO starts from an SFT checkpoint; set init_from")
    plan = cfg.batch_plan(info.world)
    groups = cfg.train.global_batch_size // cfg.group_size  # prompts per step
    reward_fn = build_reward_fn(cfg.rewards, key="rewards")
    set_seed(cfg.train.seed, info.rank)
    model, tok, _ = load_start(place, cfg.init_from, load_checkpoint)
    if tok is None:
        raise ConfigError(f"init_from: {cfg.init_from} has no tokenizer files; GRPO needs it")
    tok = chat_tokenizer(tok, cfg.data)  # its own template (or data.chat_template)
    reference = None
    if cfg.beta > 0:
        reference, _, _ = load_checkpoint(cfg.init_from, with_tokenizer=False, device=device)
        reference.requires_grad_(False)
    draft = load_rollout_draft(cfg.rollout, tok, model.cfg, device)
    model.train()
    train_records, heldout_records = chat_records(cfg.data, "sft")
    heldout = heldout_prompts(heldout_records, tok, cfg.data.seq_len)  # a mixture's: by source
    engine = build_engine(
        model,
        cfg.engine,
        cfg.optim,
        micro_batch=plan.micro,
        grad_accum=plan.accum,
        total_steps=cfg.train.steps * cfg.epochs,
        info=info,
    )
    policy = Policy(
        engine,
        reference,
        tok,
        PromptDataset(train_records, tok, cfg.data.seq_len),
        reward_fn,
        draft,
    )
    checkpointer = Checkpointer(place.run_dir, info, cfg, "grpo", tok)
    checkpointer.record[HELDOUT] = chat_heldout(cfg.data, len(heldout), "prompts")
    checkpointer.add_engine("model", engine, parent=cfg.init_from)
    run = start_run(cfg, place, checkpointer)

    def score(b: list, answers: list, tasks: list, out: Any, _: Any, **fields: list) -> Any:
        texts = [tok.decode(p) for p in b]
        return torch.tensor(reward_fn(texts, out.texts(tok), answers, tasks, **fields).total)

    run.tracker.message(
        f"grpo: from {place.resume_from or cfg.init_from}; {len(policy.prompts)} prompts, "
        f"{groups} per step × G={cfg.group_size}; rewards {[r.name for r in cfg.rewards]}; "
        f"β={cfg.beta}; {engine.describe()}, {info.world} process(es)"
        + (f"; rollouts drafted by {cfg.rollout.draft} ({draft.describe()})" if draft else "")
    )
    run.tracker.message(plan.describe())
    task = Task(
        step=grpo_step(cfg, policy, place, plan),
        evaluate=lambda step: {
            **evaluate_policy(engine, reference, heldout, tok, score, cfg, place.run_dir, step),
            **accuracy_by_source(heldout),  # from the same greedy answers
        },
        samples_per_step=groups,
        num_samples=len(policy.prompts),
        tokens_per_step=0,
        updates_per_step=cfg.epochs,
        eval_line=eval_line,
        summary=lambda last: (
            f"{before_after(last, 'accuracy', 'held-out exact match')}, "
            f"{before_after(last, 'reward', 'sampled reward')}"
        ),
    )
    return training_loop(run, task)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: --config FILE, --dry-run, and --section.key=value overrides."""
    return run_entry(GRPOConfig, train, argv, "grpo")


if __name__ == "__main__":
    sys.exit(main())
