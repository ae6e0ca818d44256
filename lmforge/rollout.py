"""What the online RL stages (GRPO, PPO) share: sampling rollouts from the policy, the sequences
built from them, token log-probs, and the policy's evaluation (greedy exact match, then the
reward and KL of sampled answers to the held-out prompts)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lmforge.data.chat_datasets import PromptDataset
from lmforge.data.templates import end_of_turn, pad_token_id
from lmforge.engine import Engine
from lmforge.generate import GenerateConfig, Generation, generate
from lmforge.loss import IGNORE_INDEX
from lmforge.prefs import model_token_logprobs
from lmforge.rl import entropy_from_logits, masked_mean
from lmforge.stage import accuracy_metrics, exact_match, stop_ids

# score(prompts, answers, tasks, generation, sequences, **record fields) -> raw rewards (n,)
ScoreFn = Callable[..., torch.Tensor]


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


def scoring_rows(
    prompts: list[list[int]], out: Generation, tok: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + answer ids (N, W) as the chat template renders a finished turn, right-padded,
    and the index of each row's last token (N,): where a reward model reads its score. An answer
    that stopped on the end-of-turn token gets the tokens the template writes after it (e.g. the
    newline of lmforge's and ChatML's templates), as reward training saw its rows end."""
    end, suffix = end_of_turn(tok) if tok.chat_template else ([], [])
    rows = []
    for i, prompt in enumerate(prompts):
        answer = out.tokens[i, : int(out.lengths[i])].tolist()
        closed = bool(answer) and answer[-1] in end
        rows.append(prompt + answer + (suffix if closed else []))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id(tok), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids, torch.tensor([len(r) - 1 for r in rows])


def chunk_rows(seqs: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """The rows of a sequence batch in consecutive micro-batches of `size`."""
    n = len(seqs["input_ids"])
    return [{k: v[s : s + size] for k, v in seqs.items()} for s in range(0, n, size)]


def token_logprobs(
    model: Any, seqs: dict[str, torch.Tensor], temperature: float, device: torch.device
) -> torch.Tensor:
    """fp32 log-probs (N, L) of the labels under softmax(logits / temperature); 0 off-response.
    Computed in chunks of rows (never the fp32 (N, L, V) logits) wherever `output_weight`
    allows (lmforge.prefs), else from the whole logits; the two agree to float rounding."""
    labels, ids = seqs["labels"].to(device), seqs["input_ids"].to(device)
    lean = model_token_logprobs(model, ids, labels, temperature=temperature)
    if lean is not None:
        return lean[0]
    logits = model(input_ids=ids).float() / temperature  # (N, L, V)
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)  # (N, L)
    return picked * (labels != IGNORE_INDEX)


def logprobs_and_entropy(
    model: Any, seqs: dict[str, torch.Tensor], mask: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """As `token_logprobs` (N, L), plus the mean entropy over response tokens, from one forward
    (chunked as `token_logprobs` is; the entropy's gradient too)."""
    labels = seqs["labels"]
    lean = model_token_logprobs(
        model, seqs["input_ids"], labels, temperature=temperature, with_entropy=True
    )
    if lean is not None:
        logp, entropy = lean
        assert entropy is not None
        return logp, masked_mean(entropy, mask)
    logits = model(input_ids=seqs["input_ids"]).float() / temperature  # (N, L, V)
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)  # (N, L)
    return picked * (labels != IGNORE_INDEX), entropy_from_logits(logits, mask)


def gather_all(x: torch.Tensor, world: int) -> torch.Tensor:
    """Concatenation of the same-shaped CPU tensor `x` from every rank (rank order)."""
    if world == 1 or not dist.is_initialized():
        return x
    local = x.cuda() if dist.get_backend() == "nccl" else x
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    return torch.cat(parts).cpu()


def sample_completions(
    engine: Engine,
    prompts: list[list[int]],
    tok: Any,
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    step: int,
    rows: list[int],
) -> Generation:
    """Sampled completions of `prompts` from the policy in eval mode. Row i samples from its
    own stream, seeded by (seed, step, rows[i]) where rows[i] is its global position in the
    step's batch, so a rollout is the same on any number of processes and after a resume."""
    engine.train(False)
    cfg = GenerateConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    base = (seed * 1_000_003 + step) * 1_000_033
    return generate(
        engine.inference_model(),
        prompts,
        cfg,
        eos_ids=stop_ids(tok),
        pad_id=tok.pad_token_id,
        row_seeds=[base + row for row in rows],
    )


@torch.no_grad()
def heldout_reward_kl(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    heldout: PromptDataset,
    tok: Any,
    score: ScoreFn,
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
) -> dict[str, float]:
    """Mean raw reward and mean sequence KL(policy ‖ reference) of one completion sampled at
    `temperature` for every held-out prompt, with a fixed seed (so evaluations differ only by the
    weights). KL is the sum over response tokens of log π − log π_ref (k1), an unbiased estimate
    under the policy's own samples; without a reference it is left out. Every rank computes the
    same numbers (every rank runs every prompt)."""
    device = next(policy.parameters()).device
    gen = GenerateConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + 1)
    rewards, kls = [], []
    for start in range(0, len(heldout), 64):
        rows = range(start, min(start + 64, len(heldout)))
        batch = [heldout.prompt_ids[i] for i in rows]
        out = generate(policy, batch, gen, eos_ids=stop_ids(tok), pad_id=tok.pad_token_id)
        seqs = build_sequences(batch, out.tokens.cpu(), out.lengths.cpu(), tok.pad_token_id)
        answers, tasks = [heldout.answers[i] for i in rows], [heldout.tasks[i] for i in rows]
        rewards.append(score(batch, answers, tasks, out, seqs, **heldout.field_lists(rows)))
        if reference is not None:
            logp = token_logprobs(policy, seqs, temperature, device)  # (n, L)
            ref = token_logprobs(reference, seqs, temperature, device)  # (n, L)
            kls.append((logp - ref).sum(-1).cpu())
    result = {"eval/reward": float(torch.cat(rewards).mean())}
    if kls:
        result["eval/kl"] = float(torch.cat(kls).mean())
    return result


def evaluate_policy(
    engine: Engine,
    reference: torch.nn.Module | None,
    heldout: PromptDataset,
    tok: Any,
    score: ScoreFn,
    cfg: Any,
    run_dir: Path,
    step: int,
) -> dict[str, float]:
    """An RL stage's evaluation: greedy held-out exact match (answers appended to
    run_dir/samples.jsonl by rank 0), then the sampled held-out reward and KL of
    `heldout_reward_kl` at the rollout temperature (cfg.temperature, cfg.max_new_tokens,
    cfg.train.seed). Collective under ZeRO-3."""
    samples = run_dir / "samples.jsonl" if engine.info.is_main else None
    model = engine.inference_model()
    scores = exact_match(model, heldout, tok, cfg.max_new_tokens, samples_file=samples, step=step)
    result = accuracy_metrics(scores)
    result.update(
        heldout_reward_kl(
            model,
            reference,
            heldout,
            tok,
            score,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            seed=cfg.train.seed,
        )
    )
    return result


def eval_line(result: dict[str, float]) -> str:
    """One console line of an RL evaluation: greedy exact match, sampled reward, KL."""
    line = (
        f"held-out exact match {result['eval/accuracy']:.3f}, "
        f"sampled reward {result['eval/reward']:.3f}"
    )
    return line + (f", KL {result['eval/kl']:.3f}" if "eval/kl" in result else "")
