"""Direct preference optimisation: parse config, load the SFT policy and a frozen reference,
build preference pairs, wrap the policy in the engine, train DPO / IPO / conservative DPO, save.

    python finetune/dpo.py --config configs/finetune/dpo.yaml --init_from=runs/sft

Sequence log-probs are summed over the answer tokens in fp32. The reference is a frozen copy of
the starting weights (`reference: model`) or its log-probs computed once before training
(`reference: precomputed`, no second model in memory while training).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.batching import eval_chunks
from lmforge.checkpoint import load_checkpoint
from lmforge.checkpointer import Checkpointer
from lmforge.config import option
from lmforge.data.chat import ChatDataConfig, SourceSums, chat_tokenizer, preference_data
from lmforge.data.chat_datasets import PreferenceDataset, pair_order
from lmforge.engine import build_engine
from lmforge.errors import ConfigError
from lmforge.loop import before_after, supervised_task, training_loop
from lmforge.lora import LoraSettings, apply_lora
from lmforge.model import GPT, num_params
from lmforge.prefs import dpo_loss, model_token_logprobs, sequence_logprobs
from lmforge.report import HELDOUT, chat_heldout
from lmforge.runtime import global_means, run_entry, set_seed
from lmforge.stage import StageConfig, launch, load_start, planned, start_run


@dataclass
class DPOConfig(StageConfig):
    """Preference optimisation without a reward model: common sections plus data, loss, LoRA."""

    run_dir: str = option("runs/dpo", "Directory for checkpoints, metrics and the config.")
    init_from: str = option("runs/sft", "The SFT checkpoint: the policy's start and reference.")
    data: ChatDataConfig = option(default_factory=ChatDataConfig, doc="Preference pairs.")
    lora: LoraSettings = option(default_factory=LoraSettings, doc="Low-rank adapters.")
    beta: float = option(0.1, "β: strength of the KL constraint to the reference (DPO paper).")
    kind: Literal["sigmoid", "ipo", "cdpo"] = option(
        "sigmoid", "sigmoid = DPO, ipo = IPO, cdpo = conservative DPO (label_smoothing)."
    )
    label_smoothing: float = option(0.0, "cdpo: probability that a preference label is flipped.")
    reference: Literal["model", "precomputed"] = option(
        "model", "model = frozen copy in memory; precomputed = its log-probs computed up front."
    )
    length_buckets: int = option(
        0,
        "Group pairs of like length into batches, within windows of this many global batches "
        "(0 = off): less padding, other batch mixes.",
    )

    def validate(self, prefix: str = "") -> None:
        """Checks that span sections."""
        super().validate(prefix)
        if self.beta <= 0:
            raise ConfigError(f"beta: must be positive, got {self.beta}")
        if self.kind == "cdpo" and not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if self.kind != "cdpo" and self.label_smoothing:
            raise ConfigError("label_smoothing: only kind cdpo uses it; set kind: cdpo or 0")
        if self.length_buckets < 0:
            raise ConfigError(f"length_buckets: must be 0 (off) or more, got {self.length_buckets}")


def _pairs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])  # (2B, T)
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])  # (2B, T)
    return ids, labels


def logprobs(model: Any, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Summed fp32 answer log-probs (2B,): chosen rows first, then rejected. Right padding is
    invisible to earlier tokens under causal attention, so no mask is needed. Computed from the
    hidden states and the output weight in chunks of rows (lmforge.prefs) where the model
    allows it, else from the whole logits."""
    ids, labels = _pairs(batch)
    ids, labels = ids.to(device), labels.to(device)
    lean = model_token_logprobs(model, ids, labels)
    if lean is not None:
        return lean[0].sum(-1)
    logits = model(input_ids=ids)  # (2B, T, V)
    return sequence_logprobs(logits, labels)


@torch.no_grad()
def reference_logprobs(
    reference: GPT, data: PreferenceDataset, micro: int, device: torch.device
) -> torch.Tensor:
    """Reference log-probs of every pair: (N, 2) columns chosen, rejected."""
    out = []
    for start in range(0, len(data), micro):
        rows = list(range(start, min(start + micro, len(data))))
        lp = logprobs(reference, data.get_batch(rows), device).cpu()
        out.append(torch.stack(lp.chunk(2), dim=1))  # (b, 2)
    return torch.cat(out) if out else torch.zeros(0, 2)


@torch.no_grad()
def evaluate(ctx: dict[str, Any]) -> dict[str, float]:
    """Held-out DPO loss, implicit-reward accuracy and margin, and how often the policy alone
    gives the chosen answer the higher log-prob (rows split across ranks)."""
    data, info, ref = ctx["heldout"], ctx["info"], ctx["heldout_ref"]
    if len(data) == 0:  # no held-out pairs: nothing to measure (the loop says so once)
        return {}
    sums = dict.fromkeys(("loss", "reward_accuracy", "reward_margin"), 0.0)
    sums.update(prefers_chosen=0.0, logp_margin=0.0)
    seen = 0
    by_source = SourceSums(ctx.get("sources"))  # a mixture's pairs: per source, same passes
    for idx, counted in eval_chunks(len(data), info.rank, info.world, ctx["micro"]):
        pi_c, pi_r = logprobs(ctx["engine"], data.get_batch(idx), ctx["device"]).cpu().chunk(2)
        if not counted:  # a stand-in pass that keeps ZeRO-3's collectives in step
            continue
        seen += len(idx)
        for name, at in by_source.groups(idx):
            rows = [idx[j] for j in at]
            part, pm = dpo_loss(pi_c[at], pi_r[at], ref[rows, 0], ref[rows, 1], **ctx["loss_args"])
            values = {"loss": part.item(), "reward_accuracy": pm["accuracy"].item()}
            by_source.add(name, values, len(at))
        loss, m = dpo_loss(pi_c, pi_r, ref[idx, 0], ref[idx, 1], **ctx["loss_args"])
        n = len(idx)
        sums["loss"] += loss.item() * n
        sums["reward_accuracy"] += m["accuracy"].item() * n
        sums["reward_margin"] += m["margin"].item() * n
        sums["prefers_chosen"] += (pi_c > pi_r).float().sum().item()
        sums["logp_margin"] += (pi_c - pi_r).sum().item()
    means = global_means(sums, seen, info.world)
    per_source = by_source.means(("loss", "reward_accuracy"), info.world)
    return {**{f"eval/{key}": value for key, value in means.items()}, **per_source}


def train(cfg: DPOConfig) -> dict[str, Any]:
    """Run (or resume) DPO; returns the final metrics."""
    place, done = launch(cfg, "dpo")
    if done is not None:
        return done
    info, device = place.info, place.device
    if not cfg.init_from:
        raise ConfigError("init_from: DPO starts from an SFT checkpoint; set init_from")
    set_seed(cfg.train.seed, info.rank)
    policy, tok, _ = load_start(place, cfg.init_from, load_checkpoint)
    if tok is None:
        raise ConfigError(f"init_from: {cfg.init_from} has no tokenizer files; DPO needs it")
    tok = chat_tokenizer(tok, cfg.data)  # its own template (or data.chat_template): trained, saved
    reference, _, _ = load_checkpoint(cfg.init_from, with_tokenizer=False, device=device)
    reference.requires_grad_(False)
    policy.train()
    train_data, heldout, sources = preference_data(cfg.data, tok)
    micro = cfg.train.micro_batch_size
    precomputed = cfg.reference == "precomputed"
    train_ref = reference_logprobs(reference, train_data, micro, device) if precomputed else None
    heldout_ref = reference_logprobs(reference, heldout, micro, device)
    if precomputed:
        del reference  # the frozen copy is not needed while training
    if cfg.lora.enabled:
        policy = apply_lora(policy, cfg.lora)
    plan = cfg.batch_plan(info.world)
    engine = build_engine(
        policy,
        cfg.engine,
        cfg.optim,
        micro_batch=plan.micro,
        grad_accum=plan.accum,
        total_steps=cfg.train.steps,
        info=info,
    )
    checkpointer = Checkpointer(place.run_dir, info, cfg, "dpo", tok)
    checkpointer.record[HELDOUT] = chat_heldout(cfg.data, len(heldout), "pairs")
    scaling = cfg.lora.alpha / cfg.lora.rank if cfg.lora.enabled else None
    checkpointer.add_engine("model", engine, parent=cfg.init_from, lora_scaling=scaling)
    run = start_run(cfg, place, checkpointer, model_cfg=policy.cfg, seq_len=cfg.data.seq_len)
    loss_args = {"beta": cfg.beta, "kind": cfg.kind, "label_smoothing": cfg.label_smoothing}
    ctx = {
        "engine": engine,
        "heldout": heldout,
        "heldout_ref": heldout_ref,
        "sources": sources,
        "info": info,
        "micro": micro,
        "device": device,
        "loss_args": loss_args,
    }
    run.tracker.message(
        f"dpo ({cfg.kind}, β={cfg.beta}): from {place.resume_from or cfg.init_from}, reference "
        f"{cfg.init_from} ({cfg.reference}); {num_params(policy.cfg) / 1e6:.2f}M parameters; "
        f"{train_data.summary()}; {engine.describe()}, {info.world} process(es)"
    )
    run.tracker.message(plan.describe())
    # Batches are padded to their longest pair (PreferenceDataset.get_batch), in this order.
    sampler = pair_order(train_data, cfg.data.seed, cfg.train.global_batch_size, cfg.length_buckets)

    def micro_step(step: int, start: int, count: int) -> tuple[torch.Tensor, dict[str, float]]:
        idx = sampler.indices(start, count)
        batch = train_data.get_batch(idx)
        pi_c, pi_r = logprobs(engine, batch, device).chunk(2)
        if train_ref is not None:
            ref_c, ref_r = train_ref[idx, 0].to(device), train_ref[idx, 1].to(device)
        else:
            with torch.no_grad():
                ref_c, ref_r = logprobs(reference, batch, device).chunk(2)
        loss, metrics = dpo_loss(pi_c, pi_r, ref_c, ref_r, **loss_args)
        return loss, {k: v.item() for k, v in metrics.items()}

    def summary(last: dict[str, Any]) -> str:
        accuracy = last.get("eval/reward_accuracy", float("nan"))
        prefers = before_after(last, "prefers_chosen", "policy prefers chosen")
        return f"held-out implicit-reward accuracy {accuracy:.3f}; {prefers}"

    task = supervised_task(
        micro_step,
        lambda step: evaluate(ctx),
        planned(cfg.train, plan),
        info,
        num_samples=len(train_data),
        tokens_per_sample=round(train_data.num_tokens / len(train_data)),  # real, both sides
        summary=summary,
    )
    return training_loop(run, task)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: --config FILE, --dry-run, and --section.key=value overrides."""
    return run_entry(DPOConfig, train, argv, "dpo")


if __name__ == "__main__":
    sys.exit(main())
