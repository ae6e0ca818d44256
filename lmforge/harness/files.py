"""`lmforge eval --file`: a user's own held-out file scored without writing a harness task.

The records decide what is measured:
- text records (`{"text": ...}`, or any .txt file): perplexity, every token predicted once by
  the harness's rolling-window rule (windows of the model's length, the first read from the
  prefix token, the last shorter one with a full window of context), through the model's own
  loss rather than the harness adapter's scoring, so each checks the other;
- prompt/answer records (chat or prompt/completion records with an answer): greedy exact match
  as SFT evaluates it, and the mean of a user reward function when one is given;
- preference records (prompt, chosen, rejected): pair accuracy of a reward model when one is
  given, else how often the model itself gives the chosen answer the higher log-probability.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import ConfigError, DataError
from lmforge.model import GPT


def read_texts(path: Path, field: str = "text") -> list[str] | None:
    """The documents of a .txt file, or of a JSON-lines file whose records hold `field`;
    None when the records are chat or preference records instead."""
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    texts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{n}: not a JSON record ({e.msg}); fix the line") from None
            if not isinstance(record, dict) or field not in record:
                return None
            if not isinstance(record[field], str):
                raise DataError(f"{path}:{n}: '{field}' is not a string; fix the record")
            texts.append(record[field])
    if not texts:
        raise DataError(f"{path}: has no records")
    return texts


@torch.no_grad()
def text_perplexity(
    model: GPT, tokenizer: Any, texts: list[str], max_length: int, prefix_id: int
) -> dict[str, float]:
    """Token, word and byte perplexity and bits per byte of `texts` (summed over documents)."""
    nll, tokens = 0.0, 0
    for text in texts:
        seq = [prefix_id, *tokenizer.encode(text, add_special_tokens=False)]
        for inputs, labels in _windows(seq, max_length):
            loss = model(inputs.to(_device(model)), labels=labels.to(_device(model)))
            count = int((labels != -100).sum())
            nll += float(loss.double()) * count
            tokens += count
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    size = sum(len(t.encode("utf-8")) for t in texts)
    return {
        "documents": float(len(texts)),
        "tokens": float(tokens),
        "loss": nll / max(1, tokens),
        "perplexity": math.exp(nll / max(1, tokens)),
        "word_perplexity": math.exp(nll / max(1, words)),
        "byte_perplexity": math.exp(nll / max(1, size)),
        "bits_per_byte": nll / max(1, size) / math.log(2),
    }


def _windows(seq: list[int], length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs (1, W), labels (1, W)) windows predicting seq[1:] once each: up to `length`
    tokens per window, each window reading the `length` tokens before its last prediction
    (the last, shorter window keeps a full context), earlier positions unlabelled (-100)."""
    out = []
    for done in range(0, len(seq) - 1, length):
        end = min(done + length, len(seq) - 1)  # predict seq[done + 1 : end + 1]
        start = max(0, end - length)
        inputs = torch.tensor(seq[start:end])[None]  # (1, W)
        labels = torch.tensor(seq[start + 1 : end + 1])[None]  # (1, W)
        labels[:, : done - start] = -100  # context only: predicted by an earlier window
        out.append((inputs, labels))
    return out


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def answer_scores(
    model: GPT,
    tokenizer: Any,
    records: list[dict[str, Any]],
    max_new_tokens: int,
    reward_fn: str = "",
) -> dict[str, float]:
    """Greedy exact match of prompt/answer records (overall and per task), and the mean score
    of `reward_fn` (a reward-function name as GRPO takes them) over the same completions."""
    from lmforge.data.chat_datasets import PromptDataset
    from lmforge.stage import greedy_completions

    prompts = PromptDataset(records, tokenizer, model.cfg.max_seq_len)
    if len(prompts) == 0:
        raise DataError("--file: no record has a prompt that leaves room to answer")
    completions = greedy_completions(model, prompts, tokenizer, max_new_tokens)
    scores = prompts.exact_match(completions)
    result = {"records": float(len(prompts)), "exact_match": scores.pop("all")}
    result.update({f"exact_match/{task}": v for task, v in scores.items()})
    if reward_fn:
        from finetune.rewards import call_reward_fn, load_reward_fn

        fn = load_reward_fn(reward_fn, "--reward-fn")
        texts = [p[-1]["content"] for p in prompts.prompts]
        values = call_reward_fn(
            reward_fn, fn, texts, completions, prompts.answers, prompts.tasks, _fields(prompts)
        )
        result["reward"] = sum(values) / len(values)
    return result


def _fields(prompts: Any) -> dict[str, list[Any]]:
    """The records' extra fields as keyword lists (what reward functions may ask for)."""
    names = sorted({k for f in prompts.fields for k in f})
    return {k: [f.get(k) for f in prompts.fields] for k in names}


@torch.no_grad()
def pair_scores(
    model: GPT, tokenizer: Any, records: list[dict[str, Any]], reward_model: str = ""
) -> dict[str, float]:
    """Share of preference records where the chosen answer wins: by a reward model's score
    when `reward_model` names one, else by the model's own summed answer log-probability."""
    from lmforge.data.chat_datasets import PreferenceDataset
    from lmforge.prefs import sequence_logprobs

    data = PreferenceDataset(records, tokenizer, model.cfg.max_seq_len)
    if len(data) == 0:
        raise DataError("--file: no preference record fits the model's length")
    scorer = _reward_scorer(reward_model) if reward_model else None
    wins, margin = 0, 0.0
    for start in range(0, len(data), 16):
        rows = list(range(start, min(start + 16, len(data))))
        batch = data.get_batch(rows)
        if scorer is not None:
            chosen, rejected = scorer(batch)
        else:
            ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])  # (2B, T)
            labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])  # (2B, T)
            logp = sequence_logprobs(model(ids.to(_device(model))), labels.to(_device(model)))
            chosen, rejected = logp.chunk(2)  # (B,) each
        wins += int((chosen > rejected).sum())
        margin += float((chosen - rejected).sum())
    key = "reward_accuracy" if scorer is not None else "logprob_accuracy"
    return {"pairs": float(len(data)), key: wins / len(data), "margin": margin / len(data)}


def _reward_scorer(path: str) -> Any:
    """A function batch -> (chosen scores, rejected scores) of the reward model at `path`."""
    from lmforge.checkpoint import load_reward_model

    model, _, meta = load_reward_model(path)
    if meta.get("head") != "reward":  # a language model would get an untrained score head
        raise ConfigError(
            f"--reward-model: {path} is not a reward model (no trained score head); give a "
            "reward stage's checkpoint or run directory"
        )

    def score(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        b = batch["chosen_ids"].shape[0]
        ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])  # (2B, T)
        last = torch.cat([batch["chosen_last"], batch["rejected_last"]])  # (2B,)
        scores = model(input_ids=ids, last_index=last)  # (2B,)
        return scores[:b], scores[b:]

    return score


def evaluate_file(
    model: GPT,
    tokenizer: Any,
    path: str,
    *,
    max_new_tokens: int = 64,
    reward_fn: str = "",
    reward_model: str = "",
    prefix_id: int = 0,
) -> dict[str, float]:
    """Score the records of `path` by what they are (see the module docstring)."""
    from lmforge.data.chat import detect_format, read_chat_records, read_records

    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"--file: {path}: no such file")
    texts = read_texts(file) if file.suffix in (".txt", ".jsonl") else None
    if texts is not None:
        return text_perplexity(model, tokenizer, texts, model.cfg.max_seq_len, prefix_id)
    fmt = detect_format(read_records(str(file), "--file"))
    if fmt == "preference":
        records = read_chat_records(str(file), "auto", "preference", key="--file")
        return pair_scores(model, tokenizer, records, reward_model)
    records = read_chat_records(str(file), "auto", "sft", key="--file")
    return answer_scores(model, tokenizer, records, max_new_tokens, reward_fn)
