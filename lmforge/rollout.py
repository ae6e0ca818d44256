"""What the online RL stages (GRPO, PPO) share: sampling rollouts from the policy, the sequences
built from them, token log-probs, and the policy's evaluation (greedy exact match, then the
reward and KL of sampled answers to the held-out prompts)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from lmforge.checkpoint import load_checkpoint
from lmforge.config import option
from lmforge.data.chat_datasets import PromptDataset
from lmforge.data.templates import end_of_turn, pad_token_id
from lmforge.engine import Engine
from lmforge.errors import ConfigError
from lmforge.generate import GenerateConfig, Generation, generate
from lmforge.loss import IGNORE_INDEX
from lmforge.model import GPT, ModelConfig, num_params
from lmforge.prefs import model_token_logprobs
from lmforge.rl import entropy_from_logits, masked_mean
from lmforge.stage import accuracy_metrics, exact_match, stop_ids

if TYPE_CHECKING:
    from lmforge.speculative import Drafter

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


NGRAM = "ngram"


@dataclass
class RolloutConfig:
    """Speculative sampling of an RL stage's rollouts: a drafter proposes tokens and the policy
    checks them all in one forward pass. The rollouts are the tokens plain sampling gives (each
    row keeps its own seeded stream), so a drafter changes the speed of a step, never its result."""

    draft: str = option(
        "",
        "Drafter of the rollouts: a checkpoint or run directory (a smaller model with the "
        "policy's tokenizer; frozen), 'ngram' (prompt lookup), or empty = plain sampling.",
    )
    draft_tokens: int = option(4, "Tokens the drafter proposes per round; 0 = adaptive (1-12).")

    def validate(self, prefix: str = "rollout") -> None:
        """Reject a negative draft_tokens, naming the key."""
        if self.draft_tokens < 0:
            raise ConfigError(f"{prefix}.draft_tokens: must be >= 0, got {self.draft_tokens}")


@dataclass
class RolloutDraft:
    """The drafter of a stage's rollouts: a frozen draft model (whole on every rank, in eval
    mode, outside every engine) or, with `model` None, the n-gram matcher; k proposals a round."""

    k: int
    model: GPT | None = None

    def drafter(self, dtype: torch.dtype) -> Drafter:
        """A drafter for one rollout; the draft model first takes the policy's dtype (`dtype`,
        the replica's: bf16 under a bf16 engine), once."""
        from lmforge.speculative import model_drafter, ngram_drafter

        if self.model is None:
            return ngram_drafter(self.k)
        if next(self.model.parameters()).dtype != dtype:
            self.model.to(dtype)
        return model_drafter(self.model, self.k)

    def describe(self) -> str:
        """'n-gram drafter, k=4' or 'draft model 0.18M parameters, k=4' for the start-up line."""
        what = "n-gram drafter"
        if self.model is not None:
            what = f"draft model {num_params(self.model.cfg) / 1e6:.2f}M parameters"
        return f"{what}, k={self.k or 'adaptive'}"


def _vocab(tok: Any) -> dict[str, int]:
    return dict(tok.get_vocab())


def load_rollout_draft(
    cfg: RolloutConfig, tok: Any, policy: ModelConfig, device: torch.device
) -> RolloutDraft | None:
    """The drafter that rollout.draft names: None when empty, the n-gram matcher for 'ngram',
    else the checkpoint's model, frozen, on `device`. A draft model must share the policy's
    tokenizer (the same token ids) and vocabulary size: ConfigError otherwise, one line."""
    if not cfg.draft:
        return None
    if cfg.draft == NGRAM:
        return RolloutDraft(cfg.draft_tokens)
    model, draft_tok, _ = load_checkpoint(cfg.draft, device=device)
    if draft_tok is None:
        raise ConfigError(
            f"rollout.draft: {cfg.draft} has no tokenizer files, so it cannot be checked against "
            "the policy's tokenizer; save the draft model with the policy's tokenizer"
        )
    ours, theirs = _vocab(tok), _vocab(draft_tok)
    if ours != theirs or model.cfg.vocab_size != policy.vocab_size:
        differ = sum(1 for t, i in theirs.items() if ours.get(t) != i) + len(ours.keys() - theirs)
        raise ConfigError(
            f"rollout.draft: {cfg.draft} has another tokenizer than the policy ({len(theirs)} "
            f"tokens, {differ} differing from the policy's {len(ours)}; model vocabulary "
            f"{model.cfg.vocab_size} vs {policy.vocab_size}); a draft model needs the policy's "
            "tokenizer: pick one trained with it, or rollout.draft=ngram"
        )
    model.requires_grad_(False)  # never trained: it only proposes tokens
    return RolloutDraft(cfg.draft_tokens, model.eval())


def rollout_metrics(out: Generation) -> dict[str, float]:
    """A rollout's speculative decoding figures for the step metrics (empty without a drafter):
    the share of proposed tokens the policy accepted, and the tokens each row got per policy
    forward pass (plain decoding: 1)."""
    stats = out.stats
    if not stats.proposed:
        return {}
    per_row = float(out.lengths.float().mean())
    return {
        "rollout/acceptance": stats.acceptance,
        "rollout/tokens_per_forward": per_row / max(stats.forwards, 1),
    }


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
    draft: RolloutDraft | None = None,
) -> Generation:
    """Sampled completions of `prompts` from the policy in eval mode. Row i samples from its
    own stream, seeded by (seed, step, rows[i]) where rows[i] is its global position in the
    step's batch, so a rollout is the same on any number of processes and after a resume. With
    `draft`, speculative sampling: the same tokens, in fewer policy forwards (see
    lmforge.speculative); `rollout_metrics(out)` gives its acceptance."""
    engine.train(False)
    cfg = GenerateConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    base = (seed * 1_000_003 + step) * 1_000_033
    model = engine.inference_model()  # under ZeRO-3: gathered once for the whole rollout
    drafter = draft.drafter(next(model.parameters()).dtype) if draft is not None else None
    return generate(
        model,
        prompts,
        cfg,
        eos_ids=stop_ids(tok),
        pad_id=tok.pad_token_id,
        row_seeds=[base + row for row in rows],
        draft=drafter,
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
