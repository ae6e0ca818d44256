"""PPO for RLHF (Ziegler et al. 2019; Ouyang et al. 2022): parse config, load the SFT actor, a
critic (a RewardModel read at every token), a frozen reference and, when set, a frozen reward
model; then per step: sample one completion per prompt, score it (reward model at the last
response token, or reward functions), add a per-token KL penalty to the reference, estimate
advantages with GAE from the critic's values, and take clipped policy and value steps for a few
epochs. Save actor and critic in the shared format.

    python finetune/ppo.py --config configs/finetune/ppo.yaml --init_from=runs/sft

The actor is saved at run_dir/step-N, the critic at run_dir/critic/step-N; the KL controller and
reward statistics live in the actor checkpoint's lmforge.json, so resume continues exactly.
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

from finetune.rewards import RewardSpec, build_reward_fn
from lmforge.batching import BatchPlan
from lmforge.checkpoint import load_checkpoint, load_reward_model
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
from lmforge.rl import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    clip_rewards,
    gae,
    masked_mean,
    masked_whiten,
    per_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
)
from lmforge.rollout import (
    RolloutConfig,
    RolloutDraft,
    ScoreFn,
    build_sequences,
    chunk_rows,
    eval_line,
    evaluate_policy,
    gather_all,
    load_rollout_draft,
    logprobs_and_entropy,
    rollout_metrics,
    sample_completions,
    scoring_rows,
    token_logprobs,
)
from lmforge.runtime import run_entry, set_seed
from lmforge.stage import Launch, StageConfig, check_batch_sizes, launch, load_start, start_run


@dataclass
class PPOConfig(StageConfig):
    """PPO with a learned reward model (or reward functions) and a KL penalty to the SFT model.

    train.global_batch_size counts prompts per step over all processes (one completion each);
    train.micro_batch_size caps the sequences of one forward pass of the actor or the critic
    (the batch plan splits each process's share into micro-batches).
    """

    run_dir: str = option("runs/ppo", "Directory for checkpoints, metrics and the config.")
    init_from: str = option("runs/sft", "The SFT checkpoint: the actor's start and reference.")
    reward_model: str = option(
        "runs/reward", "Reward checkpoint scoring completions; empty = use `rewards` instead."
    )
    rewards: list[RewardSpec] = option(
        default_factory=lambda: [RewardSpec("exact_answer", 1.0)],
        doc="Reward functions and weights, used when reward_model is empty.",
    )
    critic_from: str = option(
        "", "Critic start: empty = reward_model; else a checkpoint (fresh head on an LM one)."
    )
    data: ChatDataConfig = option(default_factory=ChatDataConfig, doc="Prompts with answers.")
    kl_coef: float = option(0.05, "β of the per-token KL penalty (initial β when adaptive).")
    adaptive_kl: bool = option(False, "Adapt β toward kl_target (Ziegler et al. 2019).")
    kl_target: float = option(6.0, "Target sequence KL of the adaptive controller.")
    kl_horizon: float = option(10000.0, "Horizon (in samples) of the adaptive controller.")
    gamma: float = option(1.0, "Discount γ of GAE.")
    lam: float = option(0.95, "λ of GAE.")
    clip: float = option(0.2, "ε of the clipped policy ratio.")
    value_clip: float = option(0.2, "ε of the clipped value loss.")
    vf_coef: float = option(0.1, "Weight of the value loss.")
    entropy_coef: float = option(0.0, "Weight of the entropy bonus.")
    epochs: int = option(2, "Optimizer passes over each rollout batch.")
    temperature: float = option(1.0, "Sampling temperature of the rollouts (and of the log-probs).")
    max_new_tokens: int = option(16, "Most tokens per completion.")
    whiten_advantages: bool = option(True, "Whiten advantages over each rollout micro-batch.")
    normalise_rewards: bool = option(True, "Normalise scores by running mean and std.")
    reward_clip: float = option(10.0, "Clip (normalised) scores to ±this; 0 = no clipping.")
    rollout: RolloutConfig = option(
        default_factory=RolloutConfig,
        doc="Speculative sampling of the rollouts: rollout.draft, rollout.draft_tokens.",
    )

    def validate(self, prefix: str = "") -> None:
        """Checks that span sections."""
        super().validate(prefix)
        if self.kl_coef < 0 or (self.adaptive_kl and self.kl_coef <= 0):
            raise ConfigError(f"kl_coef: must be >= 0 (> 0 when adaptive), got {self.kl_coef}")
        if self.clip <= 0 or self.value_clip <= 0 or self.epochs < 1 or self.temperature <= 0:
            raise ConfigError("clip > 0, value_clip > 0, epochs >= 1 and temperature > 0 required")
        if self.reward_clip < 0:
            raise ConfigError(f"reward_clip: must be >= 0, got {self.reward_clip}")

    def batch_plan(self, world: int) -> BatchPlan:
        """Prompts per step split over processes, then into micro-batches (one sequence each)."""
        return check_batch_sizes(self.train, world, unit="prompts")


@dataclass
class Models:
    """PPO's models: the actor and critic engines, the frozen reference and the scorer (a
    frozen reward model, or reward functions through `score`)."""

    actor: Engine
    critic: Engine
    reference: torch.nn.Module
    score: ScoreFn
    tok: Any
    draft: RolloutDraft | None = None  # rollout.draft: speculative sampling of the rollouts


def build_score(cfg: PPOConfig, tok: Any, device: torch.device) -> ScoreFn:
    """Raw sequence scores (N,): the reward model at the token it was trained to read (the last
    token of the rendered turn, see `scoring_rows`), or the reward functions on the texts."""
    micro = cfg.train.micro_batch_size
    if not cfg.reward_model:
        reward_fn = build_reward_fn(cfg.rewards, key="rewards")

        def by_functions(
            prompts: list, answers: list, tasks: list, out: Any, _: Any, **fields: list
        ) -> Any:
            texts = [tok.decode(p) for p in prompts]
            result = reward_fn(texts, out.texts(tok), answers, tasks, **fields)
            return torch.tensor(result.total, dtype=torch.float32)

        return by_functions
    scorer, _, _ = load_reward_model(cfg.reward_model, with_tokenizer=False, device=device)
    scorer.requires_grad_(False)

    def by_model(prompts: list, answers: list, tasks: list, out: Any, _: Any, **__: list) -> Any:
        ids, last = scoring_rows(prompts, out, tok)  # (N, W), (N,): as reward training read them
        parts = []
        for s in range(0, len(prompts), micro):
            rows = ids[s : s + micro].to(device)
            parts.append(scorer(rows, last_index=last[s : s + micro].to(device)).float().cpu())
        return torch.cat(parts)

    return by_model


@dataclass
class Rollout:
    """One step's samples and what the updates need of them, per micro-batch."""

    chunks: list[dict[str, torch.Tensor]]
    old: list[torch.Tensor]  # behaviour log-probs (n, L)
    old_values: list[torch.Tensor]  # critic values (n, L)
    parts: list[dict[str, torch.Tensor]]  # mask, advantages, returns, per-token KL
    report: dict[str, float]


@torch.no_grad()
def make_rollout(
    cfg: PPOConfig, m: Models, batch: list[list[int]], answers: Any, ctx: StepContext, **kw: Any
) -> Rollout:
    """Sample, score (normalised and clipped), add the per-token KL penalty and estimate GAE
    advantages from the critic's values. kw: moments, kl_ctl, place, micro (rows per
    micro-batch), rows (the prompts' global positions, which seed their samples), fields (the
    prompt records' other fields, for reward functions)."""
    moments, kl_ctl, place = kw["moments"], kw["kl_ctl"], kw["place"]
    m.critic.train(False)
    t0 = time.perf_counter()
    out = sample_completions(
        m.actor, batch, m.tok, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
        seed=cfg.train.seed, step=ctx.step - 1, rows=kw["rows"], draft=m.draft,
    )  # fmt: skip
    t_sample = time.perf_counter() - t0  # generation alone: what a faster sampler would save
    seqs = build_sequences(batch, out.tokens.cpu(), out.lengths.cpu(), m.tok.pad_token_id)
    mask = (seqs["labels"] != IGNORE_INDEX).float()  # (N, L)
    chunks = [{k: v.to(place.device) for k, v in c.items()} for c in chunk_rows(seqs, kw["micro"])]
    raw = m.score(batch, *answers, out, seqs, **kw["fields"])
    scores = raw
    if cfg.normalise_rewards:
        moments.update(gather_all(raw, place.info.world))
        scores = moments.normalise(raw)
    if cfg.reward_clip > 0:
        scores = clip_rewards(scores, cfg.reward_clip)
    # No graph: the losses detach these; a graph would keep every micro-batch's activations.
    # The old pass stays even with one epoch: the KL penalty and GAE need every micro-batch's
    # old log-probs before the first loss forward.
    with torch.no_grad():
        old = [token_logprobs(m.actor, c, cfg.temperature, place.device) for c in chunks]
        ref = [token_logprobs(m.reference, c, cfg.temperature, place.device) for c in chunks]
        old_values = [m.critic.module.values(c["input_ids"]) for c in chunks]
    parts, n = [], kw["micro"]
    for j in range(len(chunks)):
        mj = mask[j * n : (j + 1) * n].to(place.device)
        rewards, kl = per_token_rewards(
            scores[j * n : (j + 1) * n], old[j], ref[j], mj, kl_ctl.value
        )
        adv, returns = gae(rewards, old_values[j], mj, cfg.gamma, cfg.lam)
        adv = masked_whiten(adv, mj) if cfg.whiten_advantages else adv
        parts.append({"mask": mj, "adv": adv, "returns": returns, "kl": kl})
    value = torch.cat(
        [masked_mean(v, p["mask"]).reshape(1) for v, p in zip(old_values, parts, strict=True)]
    )
    report = {
        "reward": float(raw.mean()),
        "score": float(scores.mean()),
        "value": float(value.mean()),
        "response_length": float(out.lengths.float().mean()),
        "tokens": float(mask.sum()),
        "time/generation_seconds": t_sample,
        **rollout_metrics(out),
    }
    return Rollout(chunks, old, old_values, parts, report)


def ppo_step(cfg: PPOConfig, m: Models, prompts: PromptDataset, place: Launch, **kw: Any) -> Any:
    """The step function: a rollout, then `epochs` passes of a clipped policy micro-batch on the
    actor and a clipped value micro-batch on the critic; the KL controller follows the step's
    KL unless the loop refused the step. kw: moments, kl_ctl."""
    sampler = GlobalSampler(len(prompts), cfg.data.seed)
    plan, kl_ctl = cfg.batch_plan(place.info.world), kw["kl_ctl"]
    per_rank = plan.per_rank  # prompts of this rank per step

    def step_fn(ctx: StepContext) -> Generator[Micro, None, dict[str, float]]:
        t0 = time.perf_counter()
        first = ctx.cursor + place.info.rank * per_rank  # global position of this rank's prompts
        idx = sampler.indices(first, per_rank)
        answers = ([prompts.answers[i] for i in idx], [prompts.tasks[i] for i in idx])
        batch = [prompts.prompt_ids[i] for i in idx]
        rows, micro = list(range(first, first + per_rank)), plan.micro
        fields = prompts.field_lists(idx)
        r = make_rollout(
            cfg, m, batch, answers, ctx, place=place, micro=micro, rows=rows, fields=fields, **kw
        )
        t_gen = time.perf_counter() - t0
        m.actor.train(True)
        m.critic.train(True)
        for _ in range(cfg.epochs):
            for j, c in enumerate(r.chunks):
                p = r.parts[j]
                logp, entropy = logprobs_and_entropy(m.actor, c, p["mask"], cfg.temperature)
                pg_loss, pm = ppo_policy_loss(logp, r.old[j], p["adv"], p["mask"], cfg.clip)
                metrics = {"policy_loss": pg_loss.item(), "entropy": entropy.item()}
                yield Micro(pg_loss - cfg.entropy_coef * entropy, {**metrics, **_items(pm)})
                values = m.critic.module.values(c["input_ids"])
                v_loss, vm = ppo_value_loss(
                    values, r.old_values[j], p["returns"], p["mask"], cfg.value_clip
                )
                metrics = {"value_loss": v_loss.item(), **_items(vm)}
                yield Micro(cfg.vf_coef * v_loss, metrics, engine="critic")
        seq_kl = torch.cat([(p["kl"] * p["mask"]).sum(-1).cpu() for p in r.parts])  # (N,)
        kl_coef_used = kl_ctl.value
        mean_kl = float(gather_all(seq_kl, place.info.world).mean())
        if not ctx.skipped:
            kl_ctl.update(mean_kl, cfg.train.global_batch_size)
        t_step = time.perf_counter() - t0
        return {
            **r.report,
            "kl": float(seq_kl.mean()),
            "kl_coef": kl_coef_used,
            "generate_seconds": t_gen,
            "train_seconds": t_step - t_gen,
            "time/generation_share": r.report["time/generation_seconds"] / max(t_step, 1e-9),
        }

    return step_fn


def _items(values: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: v.item() for k, v in values.items()}


def load_models(cfg: PPOConfig, place: Launch) -> tuple[Any, Any, Any, Any]:
    """(actor, tokenizer, critic, reference): the actor and critic from the resume point (the
    critic beside the actor under critic/) or from init_from and critic_from / reward_model."""
    critic_start = cfg.critic_from or cfg.reward_model
    if not critic_start:
        raise ConfigError("critic_from: without a reward_model the critic needs a checkpoint")
    actor, tok, _ = load_start(place, cfg.init_from, load_checkpoint)
    if tok is None:
        raise ConfigError(f"init_from: {cfg.init_from} has no tokenizer files; PPO needs it")
    tok = chat_tokenizer(tok, cfg.data)  # its own template (or data.chat_template)
    if place.point is not None:  # the critic saved beside the resumed actor
        saved = place.point.open_sibling("critic")
        critic, _, _ = load_reward_model(saved.path, meta=saved.meta, with_tokenizer=False)
    else:
        critic, _, _ = load_reward_model(critic_start, with_tokenizer=False, seed=cfg.train.seed)
    reference, _, _ = load_checkpoint(cfg.init_from, with_tokenizer=False, device=place.device)
    reference.requires_grad_(False)
    return actor.train(), tok, critic.train(), reference


def train(cfg: PPOConfig) -> dict[str, Any]:
    """Run (or resume) PPO; returns the final metrics."""
    place, done = launch(cfg, "ppo")
    if done is not None:
        return done
    info = place.info
    if not cfg.init_from:
        raise ConfigError("init_from: PPO starts from an SFT checkpoint; set init_from")
    plan = cfg.batch_plan(info.world)
    set_seed(cfg.train.seed, info.rank)
    actor, tok, critic, reference = load_models(cfg, place)
    draft = load_rollout_draft(cfg.rollout, tok, actor.cfg, place.device)
    score = build_score(cfg, tok, place.device)
    train_records, heldout_records = chat_records(cfg.data, "sft")
    prompts = PromptDataset(train_records, tok, cfg.data.seq_len)
    heldout = heldout_prompts(heldout_records, tok, cfg.data.seq_len)  # a mixture's: by source
    actor_engine, critic_engine = (
        build_engine(
            model, cfg.engine, cfg.optim, micro_batch=plan.micro, grad_accum=plan.accum,
            total_steps=cfg.train.steps * cfg.epochs, info=info,
        )
        for model in (actor, critic)
    )  # fmt: skip
    kl_ctl: AdaptiveKLController | FixedKLController = (
        AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        if cfg.adaptive_kl
        else FixedKLController(cfg.kl_coef)
    )
    moments = RunningMoments()
    checkpointer = Checkpointer(place.run_dir, info, cfg, "ppo", tok)
    checkpointer.record[HELDOUT] = chat_heldout(cfg.data, len(heldout), "prompts")
    checkpointer.add_engine("model", actor_engine, parent=cfg.init_from)
    critic_start = cfg.critic_from or cfg.reward_model
    checkpointer.add_engine("critic", critic_engine, subdir="critic", parent=critic_start)
    checkpointer.add_state("kl_controller", kl_ctl)
    checkpointer.add_state("reward_moments", moments)
    run = start_run(cfg, place, checkpointer)
    models = Models(actor_engine, critic_engine, reference, score, tok, draft)
    run.tracker.message(
        f"ppo: from {place.resume_from or cfg.init_from}; {len(prompts)} prompts, "
        f"{cfg.train.global_batch_size} per step; reward "
        f"{cfg.reward_model or [r.name for r in cfg.rewards]}; critic from {critic_start}; "
        f"β={kl_ctl.value:.4g}{' (adaptive)' if cfg.adaptive_kl else ''}; "
        f"{actor_engine.describe()}, {info.world} process(es)"
        + (f"; rollouts drafted by {cfg.rollout.draft} ({draft.describe()})" if draft else "")
    )
    run.tracker.message(plan.describe())
    task = Task(
        step=ppo_step(cfg, models, prompts, place, moments=moments, kl_ctl=kl_ctl),
        evaluate=lambda step: {
            **evaluate_policy(
                actor_engine, reference, heldout, tok, score, cfg, place.run_dir, step
            ),
            **accuracy_by_source(heldout),  # from the same greedy answers
        },
        samples_per_step=cfg.train.global_batch_size,
        num_samples=len(prompts),
        tokens_per_step=0,
        updates_per_step=cfg.epochs,
        eval_line=eval_line,
        summary=lambda last: (
            f"{before_after(last, 'reward', 'held-out reward')} (KL to the reference "
            f"{last.get('eval/kl', float('nan')):.3f} nats), "
            f"{before_after(last, 'accuracy', 'exact match')}"
        ),
    )
    return training_loop(run, task)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: --config FILE, --dry-run, and --section.key=value overrides."""
    return run_entry(PPOConfig, train, argv, "ppo")


if __name__ == "__main__":
    sys.exit(main())
