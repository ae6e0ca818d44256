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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.grpo import (
    build_sequences,
    eval_line,
    evaluate_policy,
    sample_completions,
    token_logprobs,
)
from finetune.rewards import RewardSpec, build_reward_fn
from lmforge.checkpoint import load_checkpoint, load_reward_model
from lmforge.config import option
from lmforge.data import GlobalSampler
from lmforge.data.chat import ChatDataConfig, chat_records
from lmforge.data.chat_datasets import PromptDataset
from lmforge.engine import build_engine
from lmforge.errors import ConfigError
from lmforge.loss import IGNORE_INDEX
from lmforge.rl import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    clip_rewards,
    entropy_from_logits,
    gae,
    masked_mean,
    masked_whiten,
    per_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
)
from lmforge.runtime import StopFlag, load_rng, run_entry, set_seed
from lmforge.stage import (
    StageConfig,
    StepWindow,
    checkpoint_meta,
    launch,
    open_tracker,
    restore,
    save_stage_checkpoint,
)
from lmforge.tracking import format_duration


@dataclass
class PPOConfig(StageConfig):
    """PPO with a learned reward model (or reward functions) and a KL penalty to the SFT model.

    train.global_batch_size counts prompts per step over all processes (one completion each).
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

    def validate(self, prefix: str = "") -> None:
        """Checks that span sections."""
        super().validate(prefix)
        if self.kl_coef < 0 or (self.adaptive_kl and self.kl_coef <= 0):
            raise ConfigError(f"kl_coef: must be >= 0 (> 0 when adaptive), got {self.kl_coef}")
        if self.clip <= 0 or self.value_clip <= 0 or self.epochs < 1 or self.temperature <= 0:
            raise ConfigError("clip > 0, value_clip > 0, epochs >= 1 and temperature > 0 required")
        if self.reward_clip < 0:
            raise ConfigError(f"reward_clip: must be >= 0, got {self.reward_clip}")


def gather_all(x: torch.Tensor, world: int) -> torch.Tensor:
    """Concatenation of the same-shaped CPU tensor `x` from every rank (rank order)."""
    if world == 1 or not dist.is_initialized():
        return x
    local = x.cuda() if dist.get_backend() == "nccl" else x
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    return torch.cat(parts).cpu()


def logprobs_and_entropy(
    model: Any, seqs: dict[str, torch.Tensor], mask: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """As `token_logprobs` (N, L), plus the mean entropy over response tokens, from one forward."""
    labels = seqs["labels"]
    logits = model(input_ids=seqs["input_ids"]).float() / temperature  # (N, L, V)
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)  # (N, L)
    return picked * (labels != IGNORE_INDEX), entropy_from_logits(logits, mask)


def train(cfg: PPOConfig) -> dict[str, Any]:
    """Run (or resume) PPO; returns the final metrics."""
    place, done = launch(cfg, "ppo")
    if done is not None:
        return done
    info, device, run_dir, resume_from = place.info, place.device, place.run_dir, place.resume_from
    if not cfg.init_from:
        raise ConfigError("init_from: PPO starts from an SFT checkpoint; set init_from")
    critic_start = cfg.critic_from or cfg.reward_model
    if not critic_start:
        raise ConfigError("critic_from: without a reward_model the critic needs a checkpoint")
    if cfg.train.global_batch_size % info.world:
        raise ConfigError(
            f"train.global_batch_size: {cfg.train.global_batch_size} prompts do not split over "
            f"{info.world} processes"
        )
    per_rank = cfg.train.global_batch_size // info.world
    micro = cfg.train.micro_batch_size
    if per_rank % micro:
        raise ConfigError(
            f"train.micro_batch_size: {micro} does not divide the {per_rank} sequences each "
            "process trains on per step"
        )
    reward_fn = None if cfg.reward_model else build_reward_fn(cfg.rewards, key="rewards")
    set_seed(cfg.train.seed, info.rank)
    source = resume_from or cfg.init_from
    actor, tok, meta = load_checkpoint(source)
    if tok is None:
        raise ConfigError(f"init_from: {source} has no tokenizer files; PPO needs its tokenizer")
    critic_source = resume_from.parent / "critic" / resume_from.name if resume_from else None
    if critic_source is not None and not critic_source.is_dir():
        raise ConfigError(f"resume: {critic_source} (the critic of {resume_from}) is missing")
    critic, _, _ = load_reward_model(
        critic_source or critic_start, with_tokenizer=False, seed=cfg.train.seed
    )
    reference, _, _ = load_checkpoint(cfg.init_from, with_tokenizer=False, device=device)
    reference.requires_grad_(False)
    scorer = None
    if cfg.reward_model:
        scorer, _, _ = load_reward_model(cfg.reward_model, with_tokenizer=False, device=device)
        scorer.requires_grad_(False)
    actor.train()
    critic.train()
    train_records, heldout_records = chat_records(cfg.data, "sft")
    prompts = PromptDataset(train_records, tok, cfg.data.seq_len)
    heldout = PromptDataset(heldout_records, tok, cfg.data.seq_len)
    engines = {
        name: build_engine(
            model,
            cfg.engine,
            cfg.optim,
            micro_batch=micro,
            grad_accum=per_rank // micro,
            total_steps=cfg.train.steps * cfg.epochs,
            info=info,
        )
        for name, model in (("actor", actor), ("critic", critic))
    }
    engine, critic_engine = engines["actor"], engines["critic"]
    step, cursor = restore(engine, place, meta)
    if critic_source is not None and (critic_source / "deepspeed").is_dir():
        critic_engine.load_state(critic_source / "deepspeed")
        load_rng(resume_from / "deepspeed", info.rank)  # the actor's RNG is the run's RNG
    kl_ctl: AdaptiveKLController | FixedKLController = (
        AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        if cfg.adaptive_kl
        else FixedKLController(cfg.kl_coef)
    )
    moments = RunningMoments()
    if resume_from is not None:
        kl_ctl.load_state_dict(meta.get("kl_controller", kl_ctl.state_dict()))
        moments.load_state_dict(meta.get("reward_moments", moments.state_dict()))
    tracker = open_tracker(cfg, place, meta)

    def score(
        batch_prompts: list[list[int]], answers: list[str], tasks: list[str], out: Any, seqs: dict
    ) -> torch.Tensor:
        """Raw sequence scores (N,) of completions to `batch_prompts`."""
        if scorer is None:
            assert reward_fn is not None
            result = reward_fn(
                [tok.decode(p) for p in batch_prompts], out.texts(tok), answers, tasks
            )
            return torch.tensor(result.total, dtype=torch.float32)
        ends = torch.tensor([len(p) - 1 for p in batch_prompts]) + out.lengths.cpu()  # (N,)
        parts = []
        for s in range(0, len(batch_prompts), micro):
            ids = seqs["input_ids"][s : s + micro].to(device)
            parts.append(scorer(ids, last_index=ends[s : s + micro].to(device)).float().cpu())
        return torch.cat(parts)

    def evaluate(step: int) -> dict[str, float]:
        return evaluate_policy(engine, reference, heldout, tok, score, cfg, run_dir, step)

    if info.is_main:
        source_name = cfg.reward_model or [r.name for r in cfg.rewards]
        tracker.message(
            f"ppo: from {source}; {len(prompts)} prompts, {cfg.train.global_batch_size} per "
            f"step; reward {source_name}; critic from {critic_source or critic_start}; "
            f"β={kl_ctl.value:.4g}{' (adaptive)' if cfg.adaptive_kl else ''}; "
            f"ZeRO-{engine.zero_stage}, {info.world} process(es)"
        )
    last: dict[str, Any] = {}
    if step == 0:
        before = evaluate(0)
        last.update({k.replace("eval/", "eval_before/"): v for k, v in before.items()})
        tracker.log(0, before)
        tracker.message(f"before PPO: {eval_line(before)}")
    sampler = GlobalSampler(len(prompts), cfg.data.seed)
    window, stop, started = StepWindow(), StopFlag(), time.perf_counter()
    while step < cfg.train.steps:
        t0 = time.perf_counter()
        idx = sampler.indices(cursor + info.rank * per_rank, per_rank)
        batch_prompts = [prompts.prompt_ids[i] for i in idx]
        critic_engine.train(False)
        out = sample_completions(
            engine,
            batch_prompts,
            tok,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            seed=cfg.train.seed,
            step=step,
            rank=info.rank,
        )
        seqs = build_sequences(batch_prompts, out.tokens.cpu(), out.lengths.cpu(), tok.pad_token_id)
        mask = (seqs["labels"] != IGNORE_INDEX).float()  # (N, L)
        chunks = [
            {k: v[s : s + micro].to(device) for k, v in seqs.items()}
            for s in range(0, per_rank, micro)
        ]
        with torch.no_grad():
            answers = [prompts.answers[i] for i in idx]
            raw = score(batch_prompts, answers, [prompts.tasks[i] for i in idx], out, seqs)
            scores = raw
            if cfg.normalise_rewards:
                moments.update(gather_all(raw, info.world))
                scores = moments.normalise(raw)
            if cfg.reward_clip > 0:
                scores = clip_rewards(scores, cfg.reward_clip)
            old = [token_logprobs(engine, c, cfg.temperature, device) for c in chunks]
            ref = [token_logprobs(reference, c, cfg.temperature, device) for c in chunks]
            old_values = [critic_engine.module.values(c["input_ids"]) for c in chunks]
            rollout = []
            for j in range(len(chunks)):
                m = mask[j * micro : (j + 1) * micro].to(device)
                rewards, kl = per_token_rewards(
                    scores[j * micro : (j + 1) * micro], old[j], ref[j], m, kl_ctl.value
                )
                adv, returns = gae(rewards, old_values[j], m, cfg.gamma, cfg.lam)
                if cfg.whiten_advantages:
                    adv = masked_whiten(adv, m)
                rollout.append({"mask": m, "adv": adv, "returns": returns, "kl": kl})
        t_gen = time.perf_counter() - t0
        seq_kl = torch.cat([(r["kl"] * r["mask"]).sum(-1).cpu() for r in rollout])  # (N,)
        engine.train(True)
        critic_engine.train(True)
        stats: dict[str, float] = {}
        n = len(chunks) * cfg.epochs
        for _ in range(cfg.epochs):
            for j, c in enumerate(chunks):
                r = rollout[j]
                logp, entropy = logprobs_and_entropy(engine, c, r["mask"], cfg.temperature)
                pg_loss, pm = ppo_policy_loss(logp, old[j], r["adv"], r["mask"], cfg.clip)
                loss = pg_loss - cfg.entropy_coef * entropy
                engine.backward(loss)
                engine.step()
                values = critic_engine.module.values(c["input_ids"])
                v_loss, vm = ppo_value_loss(
                    values, old_values[j], r["returns"], r["mask"], cfg.value_clip
                )
                critic_engine.backward(cfg.vf_coef * v_loss)
                critic_engine.step()
                for key, value in {
                    "loss": loss.item(),
                    "policy_loss": pg_loss.item(),
                    "value_loss": v_loss.item(),
                    "entropy": entropy.item(),
                    **{k: v.item() for k, v in {**pm, **vm}.items()},
                }.items():
                    stats[key] = stats.get(key, 0.0) + value / n
        step += 1
        cursor += cfg.train.global_batch_size
        mean_kl = float(gather_all(seq_kl, info.world).mean())
        kl_coef_used = kl_ctl.value
        kl_ctl.update(mean_kl, cfg.train.global_batch_size)
        window.add(
            **stats,
            reward=float(raw.mean()),
            score=float(scores.mean()),
            kl=float(seq_kl.mean()),
            kl_coef=kl_coef_used,
            value=float(
                torch.cat(
                    [
                        masked_mean(v, r["mask"]).reshape(1)
                        for v, r in zip(old_values, rollout, strict=True)
                    ]
                ).mean()
            ),
            response_length=float(out.lengths.float().mean()),
            generate_seconds=t_gen,
            train_seconds=time.perf_counter() - t0 - t_gen,
        )
        window.close_step()
        if step % cfg.tracking.log_every == 0 or step == cfg.train.steps:
            metrics = window.flush(tracker, engine, info.world, int(mask.sum()) * info.world)
            tracker.log(step, metrics)
            tracker.progress(step, metrics, metrics["step_seconds"])
            last.update(metrics)
        final = step == cfg.train.steps
        if final or (cfg.train.eval_every and step % cfg.train.eval_every == 0):
            result = evaluate(step)
            tracker.log(step, result)
            tracker.message(f"eval step {step}: {eval_line(result)}")
            last.update(result)
        stopping = stop.requested() or step == cfg.train.stop_at
        if final or stopping or step % cfg.train.save_every == 0:
            name = f"step-{step:06d}"
            common = {"step": step, "cursor": cursor, "metrics": last}
            save_stage_checkpoint(
                critic_engine,
                run_dir / "critic" / name,
                tokenizer=tok,
                info=info,
                meta=checkpoint_meta(
                    "ppo-critic", cfg, place, tracker, parent=critic_start, **common
                ),
            )
            path = save_stage_checkpoint(
                engine,
                run_dir / name,
                tokenizer=tok,
                info=info,
                meta=checkpoint_meta(
                    "ppo",
                    cfg,
                    place,
                    tracker,
                    parent=cfg.init_from,
                    kl_controller=kl_ctl.state_dict(),
                    reward_moments=moments.state_dict(),
                    **common,
                ),
            )
            tracker.message(f"saved {path} (critic {run_dir / 'critic' / name})")
        if stopping:
            break
    nan = float("nan")
    tracker.message(
        f"ppo done in {format_duration(time.perf_counter() - started)}: held-out reward "
        f"{last.get('eval_before/reward', nan):.3f} -> {last.get('eval/reward', nan):.3f} "
        f"(KL to the reference {last.get('eval/kl', nan):.3f} nats), exact match "
        f"{last.get('eval_before/accuracy', nan):.3f} -> {last.get('eval/accuracy', nan):.3f}"
    )
    tracker.close()
    return last


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: --config FILE, --dry-run, and --section.key=value overrides."""
    return run_entry(PPOConfig, train, argv, "ppo")


if __name__ == "__main__":
    sys.exit(main())
