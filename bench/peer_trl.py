"""One TRL run of the peer benchmark (bench/peer.py), in its own process like a TRL user's script:
the same stage config as lmforge's run (YAML + the same --section.key=value overrides), the same
starting weights (an lmforge checkpoint is a Hugging Face model directory), lmforge's own data
in lmforge's sample order, the same AdamW groups, schedule and clipping, one thread.

    python bench/peer_trl.py --stage dpo --config configs/finetune/dpo.yaml --out DIR \
        --result FILE.json --init_from=runs/sft --train.steps=40

What it writes to --result (JSON): `saved_at` (wall clock when the trained model was saved: the
process's work as a TRL user runs it), `train_seconds` (first optimizer step to last, as lmforge
counts it), GRPO's generation seconds and tokens, and `quality`: the trained model loaded back
as an lmforge model and scored by the lmforge stage's own evaluation function (after
`saved_at`, so not in the process's timed part).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = ("sft", "reward", "dpo", "grpo")


def _config(stage: str, path: str, overrides: list[str]) -> Any:
    """The stage's config object, parsed exactly as the lmforge stage parses it."""
    from lmforge.config import load_config

    if stage == "sft":
        from finetune.sft import SFTConfig as cls
    elif stage == "reward":
        from finetune.reward import RewardConfig as cls
    elif stage == "dpo":
        from finetune.dpo import DPOConfig as cls
    else:
        from finetune.grpo import GRPOConfig as cls
    return load_config(cls, path, overrides)


def _checkpoint_dir(init_from: str) -> Path:
    """The checkpoint directory init_from names (a run directory's latest)."""
    from lmforge.checkpoint import resolve_checkpoint

    return resolve_checkpoint(init_from)


def _tokenizer(ckpt: Path, cfg: Any) -> Any:
    """The tokenizer the lmforge stage trains with: the checkpoint's, with its chat template."""
    from lmforge.data.chat import chat_tokenizer
    from lmforge.tokenizer import load_tokenizer

    return chat_tokenizer(load_tokenizer(ckpt), cfg.data)


def _optimizers(model: torch.nn.Module, cfg: Any, total_steps: int) -> tuple[Any, Any]:
    """lmforge's AdamW groups and learning-rate schedule (lmforge.optim), for TRL's Trainer."""
    from lmforge.optim import build_scheduler, param_groups

    o = cfg.optim
    opt = torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps
    )
    return opt, build_scheduler(opt, o, total_steps)


def _common_args(cfg: Any, out: Path) -> dict[str, Any]:
    """TrainingArguments shared by every stage: steps, clipping, logging, no saving or eval."""
    return {
        "output_dir": str(out),
        "max_steps": cfg.train.steps,
        "max_grad_norm": cfg.optim.grad_clip or 1e9,
        "logging_steps": cfg.tracking.log_every,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": not torch.cuda.is_available(),
        "bf16": False,
        "fp16": False,
        "seed": cfg.train.seed,
        "dataloader_num_workers": 0,
        "train_sampling_strategy": "sequential",  # the dataset is already in lmforge's order
    }


class _StepTimer:
    """A TrainerCallback (built lazily: transformers imports it) timing the first optimizer
    step's start to the last one's end, as lmforge's step windows do."""

    def __new__(cls) -> Any:
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def __init__(self) -> None:
                self.start: float | None = None
                self.end = 0.0

            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if self.start is None:
                    self.start = time.perf_counter()

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                self.end = time.perf_counter()

            @property
            def seconds(self) -> float:
                return self.end - (self.start if self.start is not None else self.end)

        return Timer()


def _order(num_samples: int, seed: int, used: int) -> list[int]:
    """lmforge's sample order (its GlobalSampler) over at least one whole epoch: the steps use
    the first `used` samples, and TRL gets the whole training set as a user hands it over (what
    it prepares up front, such as DPO's reference log-probs, covers all of it, as lmforge's
    does)."""
    from lmforge.data import GlobalSampler

    return GlobalSampler(num_samples, seed).indices(0, max(used, num_samples))


# ------------------------------------------------------------------------------------ SFT


def sft_rows(cfg: Any, tok: Any) -> tuple[list[dict[str, Any]], Any, int]:
    """lmforge's packed SFT rows in lmforge's sample order, as TRL's packed examples: per row
    the ids of its samples back to back, labels in Hugging Face's convention (label t is the
    target of position t-1) and seq_lengths (TRL's packing column: position ids restart per
    sample). Returns (examples, held-out records, real tokens trained on)."""
    from lmforge.data.chat import load_sft_data

    train, heldout = load_sft_data(cfg.data, tok)
    pad = train.pad_id
    order = _order(len(train), cfg.data.seed, cfg.train.steps * cfg.train.global_batch_size)
    used = cfg.train.steps * cfg.train.global_batch_size  # rows the steps train on
    examples, tokens = [], 0
    for n, row in enumerate(order):
        ids: list[int] = []
        labels: list[int] = []
        lengths: list[int] = []
        for k in train.rows[row]:
            x = train.inputs[k].tolist()  # (n,) lmforge's inputs
            y = train.labels[k].tolist()  # (n,) target of each input position, -100 unlearned
            # Hugging Face shifts inside the model: inputs x + one more id, labels [-100] + y.
            ids += [*x, y[-1] if y[-1] != -100 else pad]
            labels += [-100, *y]
            lengths.append(len(x) + 1)
            tokens += len(x) if n < used else 0
        examples.append({"input_ids": ids, "labels": labels, "seq_lengths": lengths})
    return examples, heldout, tokens


def run_sft(cfg: Any, out: Path, timer: Any) -> tuple[dict[str, Any], Path]:
    """TRL's SFTTrainer on lmforge's packed rows (padding-free, as TRL packs)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    ckpt = _checkpoint_dir(cfg.init_from)
    tok = _tokenizer(ckpt, cfg)
    examples, _, tokens = sft_rows(cfg, tok)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    args = SFTConfig(
        **_common_args(cfg, out),
        per_device_train_batch_size=cfg.train.micro_batch_size,
        gradient_accumulation_steps=cfg.train.global_batch_size // cfg.train.micro_batch_size,
        packing=False,  # already packed, by lmforge
        padding_free=True,
        max_length=None,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(examples),
        processing_class=tok,
        optimizers=_optimizers(model, cfg, cfg.train.steps),
        callbacks=[timer],
    )
    trainer.train()
    return {"tokens": tokens}, _save(trainer, tok, out)


# ---------------------------------------------------------------------------- preferences


def preference_examples(cfg: Any, tok: Any, with_prompt: bool) -> tuple[list[dict], Any, int]:
    """lmforge's training pairs in lmforge's order: chosen / rejected ids as lmforge encodes them
    (and, for DPO, split into the prompt and the answer tokens lmforge learns). Returns
    (examples, held-out PreferenceDataset, real tokens trained on)."""
    from lmforge.data.chat import load_preference_data
    from lmforge.data.templates import ChatEncoder

    train, heldout = load_preference_data(cfg.data, tok)
    used = cfg.train.steps * cfg.train.global_batch_size  # pairs the steps train on
    order = _order(len(train), cfg.data.seed, used)
    from lmforge.data.chat import chat_records

    records = chat_records(cfg.data, "preference")[0] if with_prompt else None
    encoder = ChatEncoder(tok) if with_prompt else None
    examples, tokens = [], 0
    for n, k in enumerate(order):
        chosen = train.tokens["chosen_x"][k].tolist()
        rejected = train.tokens["rejected_x"][k].tolist()
        tokens += len(chosen) + len(rejected) if n < used else 0
        if not with_prompt:
            examples.append({"chosen_ids": chosen, "rejected_ids": rejected})
            continue
        prompt = encoder.prompt_ids(records[train.record_ids[k]]["prompt"])
        example = {"prompt_ids": prompt}
        for side, ids in (("chosen", chosen), ("rejected", rejected)):
            y = train.tokens[f"{side}_y"][k]  # (n,) target of each position
            learned = [t + 1 for t in range(len(y)) if y[t] != -100]  # ids lmforge learns
            assert ids[: len(prompt)] == prompt and learned == list(
                range(len(prompt), learned[-1] + 1)
            ), f"pair {k}: the answer is not one span after the prompt"
            example[f"{side}_ids"] = ids[len(prompt) : learned[-1] + 1]
        examples.append(example)
    return examples, heldout, tokens


def run_reward(cfg: Any, out: Path, timer: Any) -> tuple[dict[str, Any], Path]:
    """TRL's RewardTrainer from the SFT weights with lmforge's fresh score head (same seed)."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from lmforge.checkpoint import load_reward_model

    ckpt = _checkpoint_dir(cfg.init_from)
    tok = _tokenizer(ckpt, cfg)
    examples, _, tokens = preference_examples(cfg, tok, with_prompt=False)
    model = AutoModelForSequenceClassification.from_pretrained(
        ckpt, num_labels=1, dtype=torch.float32
    )
    model.config.pad_token_id = tok.pad_token_id
    start, _, _ = load_reward_model(ckpt, with_tokenizer=False, seed=cfg.train.seed)
    with torch.no_grad():
        model.score.weight.copy_(start.score.weight)  # lmforge's initial head: same start
    args = RewardConfig(
        **_common_args(cfg, out),
        per_device_train_batch_size=cfg.train.micro_batch_size,
        gradient_accumulation_steps=cfg.train.global_batch_size // cfg.train.micro_batch_size,
        max_length=None,
        center_rewards_coefficient=None,
    )
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(examples),
        processing_class=tok,
        optimizers=_optimizers(model, cfg, cfg.train.steps),
        callbacks=[timer],
    )
    trainer.train()
    return {"tokens": tokens}, _save(trainer, tok, out)


def run_dpo(cfg: Any, out: Path, timer: Any) -> tuple[dict[str, Any], Path]:
    """TRL's DPOTrainer, sigmoid loss, reference log-probs precomputed (lmforge's config)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    ckpt = _checkpoint_dir(cfg.init_from)
    tok = _tokenizer(ckpt, cfg)
    examples, _, tokens = preference_examples(cfg, tok, with_prompt=True)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    args = DPOConfig(
        **_common_args(cfg, out),
        per_device_train_batch_size=cfg.train.micro_batch_size,
        gradient_accumulation_steps=cfg.train.global_batch_size // cfg.train.micro_batch_size,
        beta=cfg.beta,
        loss_type=[{"sigmoid": "sigmoid", "ipo": "ipo", "cdpo": "sigmoid"}[cfg.kind]],
        label_smoothing=cfg.label_smoothing,
        precompute_ref_log_probs=cfg.reference == "precomputed",
        max_length=None,
    )

    class Tokenized(DPOTrainer):
        """DPOTrainer on pairs lmforge already tokenised (TRL's own output columns)."""

        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            return dataset

    trainer = Tokenized(
        model=model,
        ref_model=ref,
        args=args,
        train_dataset=Dataset.from_list(examples),
        processing_class=tok,
        optimizers=_optimizers(model, cfg, cfg.train.steps),
        callbacks=[timer],
    )
    trainer.train()
    return {"tokens": tokens}, _save(trainer, tok, out)


# ------------------------------------------------------------------------------------ GRPO


def run_grpo(cfg: Any, out: Path, timer: Any) -> tuple[dict[str, Any], Path]:
    """TRL's GRPOTrainer: lmforge's prompts in lmforge's order, lmforge's reward functions, G
    completions per prompt, one optimizer update per rollout batch, k3 KL to the SFT model."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from finetune.rewards import build_reward_fn
    from lmforge.data.chat import chat_records
    from lmforge.data.chat_datasets import PromptDataset

    ckpt = _checkpoint_dir(cfg.init_from)
    tok = _tokenizer(ckpt, cfg)
    records = chat_records(cfg.data, "sft")[0]
    prompts = PromptDataset(records, tok, cfg.data.seq_len)
    groups = cfg.train.global_batch_size // cfg.group_size  # prompts per step
    order = _order(len(prompts), cfg.data.seed, cfg.train.steps * groups)
    rows = [
        {"prompt": prompts.prompts[i], "answer": prompts.answers[i], "task": prompts.tasks[i]}
        for i in order
    ]
    lmforge_reward = build_reward_fn(cfg.rewards, key="rewards")

    def reward(prompts: list, completions: list, answer: list, task: list, **_: Any) -> list:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        shown = [tok.apply_chat_template(p, tokenize=False) for p in prompts]
        return list(lmforge_reward(shown, texts, answer, task).total)

    reward.__name__ = "lmforge_rewards"
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    gen = _GenerationTimer(model, tok)
    micro = min(cfg.train.micro_batch_size, cfg.train.global_batch_size)
    args = GRPOConfig(
        **_common_args(cfg, out),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=cfg.train.global_batch_size // micro,
        num_generations=cfg.group_size,
        num_iterations=cfg.epochs,
        beta=cfg.beta,
        epsilon=cfg.clip,
        temperature=cfg.temperature,
        top_k=0,
        top_p=1.0,
        max_completion_length=cfg.max_new_tokens,
        loss_type="grpo",  # token mean per sequence, then the batch: lmforge's grpo_loss
        scale_rewards="group" if cfg.scale_advantages else "none",
        shuffle_dataset=False,  # the prompts are already in lmforge's order
        log_completions=False,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        optimizers=_optimizers(model, cfg, cfg.train.steps * cfg.epochs),
        callbacks=[timer],
    )
    trainer.train()
    extra = {"generate_seconds": gen.seconds, "generated_tokens": gen.tokens}
    return {**extra, "log": _history(trainer, GRPO_LOGGED)}, _save(trainer, tok, out)


# TRL's logged GRPO figures kept in the result, by the name of lmforge's metric beside them
# in its metrics.jsonl (both are means over the step's sampled completions; TRL's
# learning_rate is the rate the step used, lmforge's lr the rate of the next step).
GRPO_LOGGED = {
    "loss": "loss",
    "kl": "kl",
    "reward": "reward",
    "learning_rate": "lr",
    "grad_norm": "grad_norm",
    "completions/mean_length": "response_length",
    "entropy": "sample_entropy",
}


def _history(trainer: Any, keys: dict[str, str]) -> list[dict[str, float]]:
    """The trainer's logged records (every tracking.log_every steps), `keys` renamed to
    lmforge's metric names, for a step-by-step comparison with lmforge's metrics.jsonl."""
    rows = []
    for entry in trainer.state.log_history:
        if "loss" not in entry or "step" not in entry:
            continue  # the closing summary (train_runtime, ...)
        row = {"step": entry["step"]}
        row.update({ours: float(entry[k]) for k, ours in keys.items() if k in entry})
        rows.append(row)
    return rows


class _GenerationTimer:
    """Wraps the model's `generate` to time every call and count the tokens it generated (up to
    and including each row's first stop token)."""

    def __init__(self, model: Any, tok: Any) -> None:
        from lmforge.data.templates import stop_token_ids

        self.seconds, self.tokens = 0.0, 0
        self._stops = set(stop_token_ids(tok))
        inner = model.generate

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            result = inner(*args, **kwargs)
            self.seconds += time.perf_counter() - t0
            seqs = result if isinstance(result, torch.Tensor) else result.sequences
            prompt_len = (kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape[1]
            self.tokens += self._count(seqs[:, prompt_len:])
            return result

        model.generate = timed

    def _count(self, new: torch.Tensor) -> int:
        """Generated tokens of (B, N) new ids: up to each row's first stop token, inclusive."""
        total = 0
        for row in new.tolist():
            n = len(row)
            for j, t in enumerate(row):
                if t in self._stops:
                    n = j + 1
                    break
            total += n
        return total


# ---------------------------------------------------------------------------------- common


def _save(trainer: Any, tok: Any, out: Path) -> Path:
    """Save the trained model as a TRL user does (save_model + the tokenizer)."""
    path = out / "model"
    trainer.save_model(str(path))
    tok.save_pretrained(str(path))
    return path


def score(stage: str, cfg: Any, model_dir: Path) -> dict[str, float]:
    """The trained model loaded back as an lmforge model and scored by the stage's own
    evaluation function, on the stage's held-out data."""
    from lmforge.checkpoint import load_checkpoint, load_reward_model
    from lmforge.data.chat import chat_records, load_preference_data, load_sft_data
    from lmforge.data.chat_datasets import PromptDataset, SFTDataset
    from lmforge.distributed import dist_info

    info, device = dist_info(), torch.device("cpu")
    ckpt = _checkpoint_dir(cfg.init_from)
    tok = _tokenizer(ckpt, cfg)
    micro = cfg.train.micro_batch_size
    if stage == "reward":
        from finetune.reward import pair_accuracy

        model, _, _ = load_reward_model(model_dir, with_tokenizer=False)
        return pair_accuracy(model, load_preference_data(cfg.data, tok)[1], info, micro, device)
    model, _, _ = load_checkpoint(model_dir, with_tokenizer=False)
    if stage == "sft":
        from finetune.sft import Heldout, evaluator
        from lmforge.stage import Launch

        records = load_sft_data(cfg.data, tok)[1]
        rows = SFTDataset(records, tok, cfg.data.seq_len, pack=cfg.data.pack)
        held = Heldout(rows, PromptDataset(records, tok, cfg.data.seq_len), tok)
        place = Launch(info, device, model_dir, None)
        return evaluator(cfg, _Plain(model, info), held, place)(cfg.train.steps)
    if stage == "dpo":
        from finetune.dpo import evaluate, reference_logprobs

        heldout = load_preference_data(cfg.data, tok)[1]
        reference, _, _ = load_checkpoint(ckpt, with_tokenizer=False)
        ctx = {
            "engine": model,
            "heldout": heldout,
            "heldout_ref": reference_logprobs(reference, heldout, micro, device),
            "info": info,
            "micro": micro,
            "device": device,
            "loss_args": {"beta": cfg.beta, "kind": cfg.kind, "label_smoothing": 0.0},
        }
        return evaluate(ctx)
    from finetune.rewards import build_reward_fn
    from lmforge.rollout import evaluate_policy

    heldout = PromptDataset(chat_records(cfg.data, "sft")[1], tok, cfg.data.seq_len)
    reward_fn = build_reward_fn(cfg.rewards, key="rewards")
    reference = None
    if cfg.beta > 0:
        reference, _, _ = load_checkpoint(ckpt, with_tokenizer=False)

    def scorer(b: list, answers: list, tasks: list, out: Any, _: Any, **fields: list) -> Any:
        texts = [tok.decode(p) for p in b]
        return torch.tensor(reward_fn(texts, out.texts(tok), answers, tasks, **fields).total)

    return evaluate_policy(
        _Plain(model, info), reference, heldout, tok, scorer, cfg, model_dir, cfg.train.steps
    )


class _Plain:
    """The parts of an lmforge Engine the evaluation functions use, around a plain module."""

    def __init__(self, module: torch.nn.Module, info: Any) -> None:
        self.module, self.info = module.eval(), info

    def __call__(self, **batch: Any) -> Any:
        return self.module(**batch)

    def inference_model(self) -> torch.nn.Module:
        return self.module.eval()


RUNNERS = {"sft": run_sft, "reward": run_reward, "dpo": run_dpo, "grpo": run_grpo}


def main(argv: list[str] | None = None) -> int:
    """Train one stage with TRL, save, then score the result with lmforge's evaluation."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=STAGES, required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, help="directory for TRL's output")
    parser.add_argument("--result", required=True, help="JSON file to write")
    known, overrides = parser.parse_known_args(argv)
    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = _config(known.stage, known.config, overrides)
    out = Path(known.out)
    out.mkdir(parents=True, exist_ok=True)
    timer = _StepTimer()
    extra, model_dir = RUNNERS[known.stage](cfg, out, timer)
    record: dict[str, Any] = {
        "saved_at": time.time(),
        "saved_cpu_seconds": time.process_time(),
        "train_seconds": timer.seconds,
        "steps": cfg.train.steps,
        **extra,
    }
    t0 = time.perf_counter()
    with torch.no_grad():
        record["quality"] = score(known.stage, cfg, model_dir)
    record["score_seconds"] = time.perf_counter() - t0
    Path(known.result).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
