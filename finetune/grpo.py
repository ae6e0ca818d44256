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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.rewards import RewardSpec, build_reward_fn
from lmforge.checkpoint import load_checkpoint
from lmforge.config import option
from lmforge.data import GlobalSampler
from lmforge.data.chat import ChatDataConfig, chat_records
from lmforge.data.chat_datasets import PromptDataset
from lmforge.engine import build_engine
from lmforge.errors import ConfigError
from lmforge.generate import GenerateConfig, Generation, generate
from lmforge.loss import IGNORE_INDEX
from lmforge.rl import group_advantages, grpo_loss, masked_mean
from lmforge.runtime import StopFlag, run_entry, set_seed
from lmforge.stage import (
    StageConfig,
    StepWindow,
    checkpoint_meta,
    exact_match,
    launch,
    open_tracker,
    restore,
    save_stage_checkpoint,
    stop_ids,
)
from lmforge.tracking import format_duration


@dataclass
class GRPOConfig(StageConfig):
    """Group-relative policy optimisation with verifiable rewards.

    train.global_batch_size counts sequences per step over all processes: prompts × group_size.
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

    def validate(self, prefix: str = "") -> None:
        """Checks that span sections."""
        super().validate(prefix)
        if self.group_size < 2:
            raise ConfigError(f"group_size: must be at least 2, got {self.group_size}")
        if self.train.global_batch_size % self.group_size:
            raise ConfigError(
                f"train.global_batch_size: {self.train.global_batch_size} is not a multiple of "
                f"group_size={self.group_size}"
            )
        if self.beta < 0 or self.clip <= 0 or self.epochs < 1 or self.temperature <= 0:
            raise ConfigError("beta >= 0, clip > 0, epochs >= 1 and temperature > 0 are required")


def build_sequences(
    prompts: list[list[int]], responses: torch.Tensor, lengths: torch.Tensor, pad_id: int
) -> dict[str, torch.Tensor]:
    """Prompt + response rows, right-padded: input_ids (N, L) and labels (N, L) holding each
    response token at the position that predicts it (-100 elsewhere)."""
    rows = [p + responses[i, : int(lengths[i])].tolist() for i, p in enumerate(prompts)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (p, row) in enumerate(zip(prompts, rows, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, len(p) - 1 : len(row) - 1] = torch.tensor(row[len(p) :])  # shifted by one
    return {"input_ids": ids, "labels": labels}


def token_logprobs(
    model: Any, seqs: dict[str, torch.Tensor], temperature: float, device: torch.device
) -> torch.Tensor:
    """fp32 log-probs (N, L) of the labels under softmax(logits / temperature); 0 off-response."""
    labels = seqs["labels"].to(device)
    logits = model(input_ids=seqs["input_ids"].to(device)).float() / temperature  # (N, L, V)
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)  # (N, L)
    return picked * (labels != IGNORE_INDEX)


def heldout_accuracy(
    engine: Any,
    heldout: PromptDataset,
    tok: Any,
    max_new_tokens: int,
    run_dir: Path,
    is_main: bool,
    step: int,
) -> dict[str, float]:
    """Greedy held-out exact match (overall and per task) of the policy; rank 0 appends the
    answers to run_dir/samples.jsonl. Collective under ZeRO-3."""
    engine.train(False)
    samples = run_dir / "samples.jsonl" if is_main else None
    scores = exact_match(
        engine.inference_model(), heldout, tok, max_new_tokens, samples_file=samples, step=step
    )
    engine.train(True)
    return {("eval/accuracy" if k == "all" else f"eval/accuracy/{k}"): v for k, v in scores.items()}


@torch.no_grad()
def heldout_reward_kl(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    heldout: PromptDataset,
    tok: Any,
    score: Callable[..., torch.Tensor],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
) -> dict[str, float]:
    """Mean raw reward and mean sequence KL(policy ‖ reference) of one completion sampled at
    `temperature` for every held-out prompt, with a fixed seed (so evaluations differ only by the
    weights). `score(prompts, answers, tasks, generation, sequences)` gives rewards (n,). KL is
    the sum over response tokens of log π − log π_ref (k1), an unbiased estimate under the
    policy's own samples; without a reference it is left out. Every rank computes the same
    numbers (every rank runs every prompt)."""
    device = next(policy.parameters()).device
    gen = GenerateConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + 1)
    rewards, kls = [], []
    for start in range(0, len(heldout), 64):
        rows = range(start, min(start + 64, len(heldout)))
        batch = [heldout.prompt_ids[i] for i in rows]
        out = generate(policy, batch, gen, eos_ids=stop_ids(tok), pad_id=tok.pad_token_id)
        seqs = build_sequences(batch, out.tokens.cpu(), out.lengths.cpu(), tok.pad_token_id)
        answers, tasks = [heldout.answers[i] for i in rows], [heldout.tasks[i] for i in rows]
        rewards.append(score(batch, answers, tasks, out, seqs))
        if reference is not None:
            logp = token_logprobs(policy, seqs, temperature, device)  # (n, L)
            ref = token_logprobs(reference, seqs, temperature, device)  # (n, L)
            kls.append((logp - ref).sum(-1).cpu())
    result = {"eval/reward": float(torch.cat(rewards).mean())}
    if kls:
        result["eval/kl"] = float(torch.cat(kls).mean())
    return result


def evaluate_policy(
    engine: Any,
    reference: torch.nn.Module | None,
    heldout: PromptDataset,
    tok: Any,
    score: Callable[..., torch.Tensor],
    cfg: Any,
    run_dir: Path,
    step: int,
) -> dict[str, float]:
    """An RL stage's evaluation: greedy held-out exact match (answers appended to
    run_dir/samples.jsonl by rank 0), then the sampled held-out reward and KL of
    `heldout_reward_kl` at the rollout temperature. Collective under ZeRO-3."""
    is_main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    result = heldout_accuracy(engine, heldout, tok, cfg.max_new_tokens, run_dir, is_main, step)
    engine.train(False)
    result.update(
        heldout_reward_kl(
            engine.inference_model(),
            reference,
            heldout,
            tok,
            score,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            seed=cfg.train.seed,
        )
    )
    engine.train(True)
    return result


def eval_line(result: dict[str, float]) -> str:
    """One console line of an RL evaluation: greedy exact match, sampled reward, KL."""
    line = (
        f"held-out exact match {result['eval/accuracy']:.3f}, "
        f"sampled reward {result['eval/reward']:.3f}"
    )
    return line + (f", KL {result['eval/kl']:.3f}" if "eval/kl" in result else "")


def sample_completions(
    engine: Any,
    prompts: list[list[int]],
    tok: Any,
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    step: int,
    rank: int,
) -> Generation:
    """Sampled completions of `prompts` from the policy (eval mode, seeded by step and rank, so
    a resumed run samples what the uninterrupted one would)."""
    engine.train(False)
    cfg = GenerateConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed * 1_000_003 + step * 1009 + rank,
    )
    return generate(
        engine.inference_model(), prompts, cfg, eos_ids=stop_ids(tok), pad_id=tok.pad_token_id
    )


def train(cfg: GRPOConfig) -> dict[str, Any]:
    """Run (or resume) GRPO; returns the final metrics."""
    place, done = launch(cfg, "grpo")
    if done is not None:
        return done
    info, device, run_dir, resume_from = place.info, place.device, place.run_dir, place.resume_from
    if not cfg.init_from:
        raise ConfigError("init_from: GRPO starts from an SFT checkpoint; set init_from")
    groups = cfg.train.global_batch_size // cfg.group_size
    if groups % info.world:
        raise ConfigError(
            f"train.global_batch_size: {groups} prompts per step do not split over "
            f"{info.world} processes; make global_batch_size / group_size a multiple of it"
        )
    per_rank = cfg.train.global_batch_size // info.world  # sequences of this rank per step
    if per_rank % cfg.train.micro_batch_size:
        raise ConfigError(
            f"train.micro_batch_size: {cfg.train.micro_batch_size} does not divide the "
            f"{per_rank} sequences each process trains on per step"
        )
    reward_fn = build_reward_fn(cfg.rewards, key="rewards")
    set_seed(cfg.train.seed, info.rank)
    source = resume_from or cfg.init_from
    policy, tok, meta = load_checkpoint(source)
    if tok is None:
        raise ConfigError(f"init_from: {source} has no tokenizer files; GRPO needs its tokenizer")
    reference = None
    if cfg.beta > 0:
        reference, _, _ = load_checkpoint(cfg.init_from, with_tokenizer=False, device=device)
        reference.requires_grad_(False)
    policy.train()
    train_records, heldout_records = chat_records(cfg.data, "sft")
    prompts = PromptDataset(train_records, tok, cfg.data.seq_len)
    heldout = PromptDataset(heldout_records, tok, cfg.data.seq_len)
    accum = per_rank // cfg.train.micro_batch_size
    engine = build_engine(
        policy,
        cfg.engine,
        cfg.optim,
        micro_batch=cfg.train.micro_batch_size,
        grad_accum=accum,
        total_steps=cfg.train.steps * cfg.epochs,
        info=info,
    )
    step, cursor = restore(engine, place, meta)
    tracker = open_tracker(cfg, place, meta)

    def score(
        b: list[list[int]], answers: list[str], tasks: list[str], out: Any, _: Any
    ) -> torch.Tensor:
        texts = [tok.decode(p) for p in b]
        return torch.tensor(reward_fn(texts, out.texts(tok), answers, tasks).total)

    def evaluate(step: int) -> dict[str, float]:
        return evaluate_policy(engine, reference, heldout, tok, score, cfg, run_dir, step)

    if info.is_main:
        tracker.message(
            f"grpo: from {source}; {len(prompts)} prompts, {groups} per step × G={cfg.group_size}"
            f"; rewards {[r.name for r in cfg.rewards]}; β={cfg.beta}; "
            f"ZeRO-{engine.zero_stage}, {info.world} process(es)"
        )
    last: dict[str, Any] = {}
    if step == 0:
        before = evaluate(0)
        last.update({k.replace("eval/", "eval_before/"): v for k, v in before.items()})
        tracker.log(0, before)
        tracker.message(f"before GRPO: {eval_line(before)}")
    sampler = GlobalSampler(len(prompts), cfg.data.seed)
    window, stop, started = StepWindow(), StopFlag(), time.perf_counter()
    prompts_per_rank = groups // info.world
    micro = cfg.train.micro_batch_size
    while step < cfg.train.steps:
        t0 = time.perf_counter()
        idx = sampler.indices(cursor + info.rank * prompts_per_rank, prompts_per_rank)
        batch_prompts = [prompts.prompt_ids[i] for i in idx for _ in range(cfg.group_size)]
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
        completions = out.texts(tok)
        rewards = reward_fn(
            [tok.decode(p) for p in batch_prompts],
            completions,
            [prompts.answers[i] for i in idx for _ in range(cfg.group_size)],
            [prompts.tasks[i] for i in idx for _ in range(cfg.group_size)],
        )
        scores = torch.tensor(rewards.total, dtype=torch.float32)  # (N,)
        advantages = group_advantages(scores, cfg.group_size, scale=cfg.scale_advantages)
        seqs = build_sequences(batch_prompts, out.tokens.cpu(), out.lengths.cpu(), tok.pad_token_id)
        mask = (seqs["labels"] != IGNORE_INDEX).float()  # (N, L)
        with torch.no_grad():
            chunks = [
                {k: v[s : s + micro] for k, v in seqs.items()}
                for s in range(0, len(batch_prompts), micro)
            ]
            old = [token_logprobs(engine, c, cfg.temperature, device) for c in chunks]
            ref = (
                [token_logprobs(reference, c, cfg.temperature, device) for c in chunks]
                if reference is not None
                else [None] * len(chunks)
            )
        t_gen = time.perf_counter() - t0
        engine.train(True)
        stats: dict[str, float] = {}
        for _ in range(cfg.epochs):
            for j, c in enumerate(chunks):
                rows = slice(j * micro, (j + 1) * micro)
                logp = token_logprobs(engine, c, cfg.temperature, device)
                loss, m = grpo_loss(
                    logp,
                    old[j],
                    ref[j],
                    advantages[rows].to(device),
                    mask[rows].to(device),
                    cfg.clip,
                    cfg.beta,
                )
                engine.backward(loss)
                engine.step()
                n = len(chunks) * cfg.epochs
                for key, value in {
                    "loss": loss.item(),
                    **{k: v.item() for k, v in m.items()},
                }.items():
                    stats[key] = stats.get(key, 0.0) + value / n
        step += 1
        cursor += groups
        window.add(
            **stats,
            reward=float(scores.mean()),
            **{f"reward/{k}": sum(v) / len(v) for k, v in rewards.parts.items()},
            response_length=float(out.lengths.float().mean()),
            generate_seconds=t_gen,
            train_seconds=time.perf_counter() - t0 - t_gen,
            sample_entropy=float(-masked_mean(torch.cat(old).cpu(), mask)),
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
            path = save_stage_checkpoint(
                engine,
                run_dir / f"step-{step:06d}",
                tokenizer=tok,
                info=info,
                meta=checkpoint_meta(
                    "grpo",
                    cfg,
                    place,
                    tracker,
                    step=step,
                    cursor=cursor,
                    parent=cfg.init_from,
                    metrics=last,
                ),
            )
            tracker.message(f"saved {path}")
        if stopping:
            break
    nan = float("nan")
    tracker.message(
        f"grpo done in {format_duration(time.perf_counter() - started)}: held-out exact match "
        f"{last.get('eval_before/accuracy', nan):.3f} -> {last.get('eval/accuracy', nan):.3f}, "
        f"sampled reward {last.get('eval_before/reward', nan):.3f} -> "
        f"{last.get('eval/reward', nan):.3f}"
    )
    tracker.close()
    return last


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: --config FILE, --dry-run, and --section.key=value overrides."""
    return run_entry(GRPOConfig, train, argv, "grpo")


if __name__ == "__main__":
    sys.exit(main())
