"""Tokenised finetuning data: SFT rows (packed or padded), preference pairs, held-out prompts.

Chats are tokenised with the tokenizer's own chat template (`ChatEncoder`): the ids are exactly
`tokenizer.apply_chat_template(messages)`'s, and the mask is 1 on each assistant turn's content
and its end-of-turn token (lmforge's `<|end|>`, ChatML's `<|im_end|>`, ...). An SFT sample of L
ids gives inputs ids[:-1] and labels ids[1:], kept where mask[1:] is 1 and -100 elsewhere: the
model learns the assistant's tokens and the token that ends its turn, never the prompt, the role
headers or padding. A record that does not fit is skipped and counted (`.skipped`, `.summary()`),
never cut: a cut answer would teach the model to stop mid-answer, or not to stop at all. Rows
come out as int64 tensors: `ds[i]` -> dict of (T,), `ds.get_batch(indices)` -> dict of (B, T).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast

from lmforge.data.packing import Batch, collate
from lmforge.data.sampler import GlobalSampler
from lmforge.data.tasks import check_answer
from lmforge.data.templates import ChatEncoder, pad_token_id
from lmforge.errors import ConfigError, DataError

IGNORE = -100  # label of a position that is not learned


class _Ragged:
    """Variable-length int arrays stored back to back: item k is flat[offsets[k]:offsets[k+1]]."""

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        lengths = np.array([len(p) for p in parts], dtype=np.int64)  # (N,)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])  # (N + 1,)
        # int32 halves the memory of a large dataset; ids and -100 fit.
        self.flat = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)

    def __getitem__(self, k: int) -> np.ndarray:
        return self.flat[self.offsets[k] : self.offsets[k + 1]]


def _encode(
    encoder: ChatEncoder,
    messages: Sequence[Mapping[str, str]],
    i: int,
    *,
    last_turn_only: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) of a chat as (L,) int64 and (L,) bool arrays; errors name record i."""
    try:
        ids, mask = encoder.encode(messages, last_turn_only=last_turn_only)
    except (DataError, ConfigError) as err:
        raise type(err)(f"record {i}: {err}") from None
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)


def shift(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of a sample: (L,) ids and mask -> two (L - 1,) arrays, -100 unlearned."""
    return ids[:-1], np.where(mask[1:], ids[1:], IGNORE)


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: rows of sample indices whose lengths sum to <= capacity.

    Samples go longest first into the fullest row that still has room (a new row if none has);
    ties break by index, so the result is deterministic. Rows are at least ~half full on average
    (FFD/BFD use at most 11/9 of the optimal number of rows plus one; Johnson 1973).
    """
    order = sorted(range(len(lengths)), key=lambda k: (-lengths[k], k))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index) of rows with room, sorted
    for k in order:
        need = lengths[k]
        j = bisect.bisect_left(free, (need, -1))  # the row with the least room that fits
        if j == len(free):
            rows.append([k])
            room, row = capacity - need, len(rows) - 1
        else:
            room, row = free.pop(j)
            rows[row].append(k)
            room -= need
        if room > 0:
            bisect.insort(free, (room, row))
    return rows


class SFTDataset(torch.utils.data.Dataset):
    """SFT rows of seq_len tokens: packed (doc_ids, position_ids) or one padded chat per row.

    Keys: input_ids, labels and, packed, doc_ids (one id per sample in the row; padding gets the
    next id) and position_ids (restarting at 0 at each sample), or, unpacked, attention_mask
    (1 on real tokens, 0 on padding). Padding has the pad id as input and -100 as label.
    """

    collate = staticmethod(collate)

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        tokenizer: PreTrainedTokenizerFast,
        seq_len: int,
        *,
        pack: bool = True,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.seq_len, self.pack = seq_len, pack
        self.pad_id = pad_token_id(tokenizer)
        self.num_records = len(records)
        encoder = ChatEncoder(tokenizer)
        inputs, labels, kept, longest = [], [], [], 0
        for i, record in enumerate(records):
            ids, mask = _encode(encoder, record["messages"], i)
            if not mask.any():
                raise DataError(
                    f"SFT record {i}: no assistant message, so no token to learn; "
                    "add the assistant's reply"
                )
            if len(ids) - 1 > seq_len:
                longest = max(longest, len(ids))
                continue
            x, y = shift(ids, mask)
            inputs.append(x)
            labels.append(y)
            kept.append(i)
        self.skipped = self.num_records - len(kept)
        if self.num_records and not kept:
            raise DataError(
                f"all {self.num_records} SFT records are longer than seq_len + 1 = {seq_len + 1} "
                f"tokens (up to {longest}); raise data.seq_len"
            )
        self.record_ids = kept  # sample k is records[record_ids[k]]
        self.inputs, self.labels = _Ragged(inputs), _Ragged(labels)
        lengths = [len(x) for x in inputs]
        self.rows = pack_rows(lengths, seq_len) if pack else [[k] for k in range(len(kept))]
        self.num_tokens = sum(lengths)  # real (non-padding) input tokens
        self.num_label_tokens = int((self.labels.flat != IGNORE).sum())

    def __len__(self) -> int:
        return len(self.rows)

    def sample_spans(self, i: int) -> list[tuple[int, int, int]]:
        """(record index, start, stop) of each sample in row i, in order; the rest is padding."""
        spans, start = [], 0
        for k in self.rows[i]:
            stop = start + len(self.inputs[k])
            spans.append((self.record_ids[k], start, stop))
            start = stop
        return spans

    def __getitem__(self, i: int) -> Batch:
        """Row i as (T,) int64 tensors."""
        return {key: value[0] for key, value in self.get_batch([i]).items()}

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> Batch:
        """Rows `indices` as (B, T) int64 tensors."""
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < len(self.rows)]
        if bad:
            raise IndexError(f"row {bad[0]} out of range for {len(self.rows)} rows")
        shape = (len(idx), self.seq_len)  # (B, T)
        out = {"input_ids": np.full(shape, self.pad_id), "labels": np.full(shape, IGNORE)}
        extra = ("doc_ids", "position_ids") if self.pack else ("attention_mask",)
        out.update({key: np.zeros(shape, dtype=np.int64) for key in extra})
        for b, row in enumerate(idx):
            start = 0
            for doc, k in enumerate(self.rows[row]):
                stop = start + len(self.inputs[k])
                out["input_ids"][b, start:stop] = self.inputs[k]
                out["labels"][b, start:stop] = self.labels[k]
                if self.pack:
                    out["doc_ids"][b, start:stop] = doc
                    out["position_ids"][b, start:stop] = np.arange(stop - start)
                else:
                    out["attention_mask"][b, start:stop] = 1
                start = stop
            if self.pack:  # padding is one more document, with positions of its own
                out["doc_ids"][b, start:] = len(self.rows[row])
                out["position_ids"][b, start:] = np.arange(self.seq_len - start)
        return {key: torch.from_numpy(value.astype(np.int64)) for key, value in out.items()}

    def summary(self) -> str:
        """One line for the log: samples, rows, fill, and how many records were skipped."""
        fill = self.num_tokens / max(1, len(self.rows) * self.seq_len)
        how = "packed" if self.pack else "padded"
        return (
            f"SFT data: {len(self.record_ids):,} samples in {len(self.rows):,} {how} rows of "
            f"{self.seq_len} tokens ({fill:.0%} real tokens, {self.num_label_tokens:,} learned); "
            f"{self.skipped:,} of {self.num_records:,} records skipped as longer than "
            f"{self.seq_len + 1} tokens"
        )


class PreferenceDataset(torch.utils.data.Dataset):
    """Preference pairs: the chosen and the rejected chat, each right-padded to seq_len.

    Per side (chosen_*, rejected_*): ids (T,) the inputs: all of `apply_chat_template(prompt +
    [answer])`'s ids, ending where it ends (lmforge's template: with the newline after the
    answer's `<|end|>`); labels (T,) the next tokens on the answer (its content and end-of-turn
    token; -100 elsewhere, the prompt's earlier assistant turns and the last position included);
    mask (T,) attention 1/0; last () the index of the last token that is not the pad id, where a
    reward model reads its score. That is the token `AutoModelForSequenceClassification` reads
    of the same ids (the last non-pad one), so both give one score. A pair whose longer side has
    more than seq_len tokens is skipped. T is the longest chat of the pairs asked for (chosen and
    rejected alike), not seq_len: padding to the batch's longest pair computes 3-4x fewer
    positions on short pairs, and right padding changes no real position's result.
    """

    SIDES = ("chosen", "rejected")

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        tokenizer: PreTrainedTokenizerFast,
        seq_len: int,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.seq_len = seq_len
        self.pad_id = pad_token_id(tokenizer)
        self.num_records = len(records)
        encoder = ChatEncoder(tokenizer)
        parts: dict[str, list[np.ndarray]] = {f"{s}_{k}": [] for s in self.SIDES for k in "xy"}
        parts.update({f"{s}_last": [] for s in self.SIDES})
        kept, longest = [], 0
        for i, record in enumerate(records):
            sides = []
            for side in self.SIDES:
                chat = [*record["prompt"], {"role": "assistant", "content": record[side]}]
                # Only the final answer is learned: not the assistant turns inside the prompt.
                ids, mask = _encode(encoder, chat, i, last_turn_only=True)
                # Every id is an input (the last one too: the score is read there); the last
                # position predicts nothing.
                x, y = ids, np.append(shift(ids, mask)[1], IGNORE)
                real = np.flatnonzero(ids != self.pad_id)  # transformers pools at the last one
                sides.append((x, y, np.array([real[-1] if len(real) else len(ids) - 1])))
            if max(len(x) for x, _, _ in sides) > seq_len:
                longest = max([longest, *(len(x) for x, _, _ in sides)])
                continue
            for side, (x, y, last) in zip(self.SIDES, sides, strict=True):
                parts[f"{side}_x"].append(x)
                parts[f"{side}_y"].append(y)
                parts[f"{side}_last"].append(last)
            kept.append(i)
        self.skipped = self.num_records - len(kept)
        if self.num_records and not kept:
            raise DataError(
                f"all {self.num_records} preference pairs are longer than seq_len = {seq_len} "
                f"tokens (up to {longest}); raise data.seq_len"
            )
        self.record_ids = kept  # pair k is records[record_ids[k]]
        self.tokens = {key: _Ragged(value) for key, value in parts.items()}
        sides = [np.diff(self.tokens[f"{side}_x"].offsets) for side in self.SIDES]  # (N,) each
        self.lengths = np.maximum(*sides)  # (N,) the longer side of each pair: its row width
        self.num_tokens = int(sum(side.sum() for side in sides))  # real tokens, both sides

    def __len__(self) -> int:
        return len(self.record_ids)

    def __getitem__(self, i: int) -> Batch:
        """Pair i as (T,) int64 tensors (and the () tensors chosen_last, rejected_last)."""
        return {key: value[0] for key, value in self.get_batch([i]).items()}

    def collate(self, items: Sequence[Batch]) -> Batch:
        """Stack pairs from `ds[i]` (each as wide as its own longer chat) into what get_batch
        gives for the same pairs: (B, T) tensors right padded to the longest, and (B,) lasts."""
        if not items:
            raise ValueError("collate needs at least one item")
        width = max(int(item[f"{side}_ids"].shape[0]) for item in items for side in self.SIDES)
        fill = {"ids": self.pad_id, "labels": IGNORE, "mask": 0}
        out: Batch = {}
        for key in items[0]:
            kind = key.split("_", 1)[1]
            if kind == "last":  # () each
                out[key] = torch.stack([item[key] for item in items])
                continue
            rows = [
                F.pad(item[key], (0, width - item[key].shape[0]), value=fill[kind])
                for item in items
            ]
            out[key] = torch.stack(rows)  # (B, T)
        return out

    def get_batch(self, indices: Sequence[int] | np.ndarray, *, pad_to: int | None = None) -> Batch:
        """Pairs `indices` as (B, T) int64 tensors, and (B,) chosen_last / rejected_last.

        T is the longest chat among these pairs, chosen and rejected sides together, so that
        the 2B rows of a batch stack into one (2B, T) tensor; `pad_to` pads to that width
        instead (at least the longest; seq_len gives every batch one shape).
        """
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < len(self)]
        if bad:
            raise IndexError(f"pair {bad[0]} out of range for {len(self)} pairs")
        longest = int(self.lengths[idx].max()) if idx else 0
        if pad_to is not None and pad_to < longest:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest chat ({longest})")
        shape = (len(idx), longest if pad_to is None else pad_to)  # (B, T)
        out: dict[str, np.ndarray] = {}
        for side in self.SIDES:
            ids, labels = np.full(shape, self.pad_id), np.full(shape, IGNORE)
            mask, last = np.zeros(shape, dtype=np.int64), np.zeros(len(idx), dtype=np.int64)
            for b, k in enumerate(idx):
                n = len(self.tokens[f"{side}_x"][k])
                ids[b, :n] = self.tokens[f"{side}_x"][k]
                labels[b, :n] = self.tokens[f"{side}_y"][k]
                mask[b, :n] = 1
                last[b] = self.tokens[f"{side}_last"][k][0]
            out[f"{side}_ids"], out[f"{side}_labels"] = ids, labels
            out[f"{side}_mask"], out[f"{side}_last"] = mask, last
        return {key: torch.from_numpy(value.astype(np.int64)) for key, value in out.items()}

    def summary(self) -> str:
        """One line for the log: pairs kept and skipped."""
        return (
            f"preference data: {len(self):,} pairs of up to {self.seq_len} tokens (mean "
            f"{self.num_tokens / max(1, 2 * len(self)):.1f} per chat, padded to the longest "
            f"in each batch); {self.skipped:,} of {self.num_records:,} skipped as longer than "
            f"{self.seq_len} tokens"
        )


class LengthBuckets:
    """A GlobalSampler's order regrouped so that each global batch holds pairs of like length.

    The stream is cut into windows of `window` global batches (positions [w·S, (w+1)·S), S =
    window × global_batch); a window's samples are sorted by length (ties by position), cut into
    global batches, and those batches are shuffled by a generator seeded by (seed, w). Position p
    maps to one sample whatever the number of processes, and the map is a function of p alone,
    so resuming at any cursor gives the uninterrupted run's batches. Each window holds exactly
    the samples the plain order has there: only which pairs share a batch changes.
    """

    def __init__(
        self,
        sampler: GlobalSampler,
        lengths: np.ndarray,
        global_batch: int,
        window: int,
        seed: int,
    ) -> None:
        if window < 1 or global_batch < 1:
            raise ValueError(f"window and global_batch must be positive: {window}, {global_batch}")
        self.sampler, self.lengths = sampler, lengths  # lengths (N,): a pair's row width
        self.global_batch, self.window, self.seed = global_batch, window, seed
        self._cache: tuple[int, np.ndarray] | None = None

    def _window(self, w: int) -> np.ndarray:
        """The samples of window w in their regrouped order: (window × global_batch,) int64."""
        if self._cache is None or self._cache[0] != w:
            span = self.window * self.global_batch
            idx = np.asarray(self.sampler.indices(w * span, span))  # (S,)
            order = np.argsort(self.lengths[idx], kind="stable")  # shortest first, ties by place
            groups = order.reshape(self.window, self.global_batch)  # (window, global_batch)
            # Shuffled so that the steps of a window do not run from short pairs to long ones;
            # the third seed word keeps this stream apart from the sampler's (seed, epoch) ones.
            rng = np.random.Generator(np.random.PCG64([self.seed, w, 1]))
            self._cache = (w, idx[groups[rng.permutation(self.window)].reshape(-1)])
        return self._cache[1]

    def indices(self, start: int, count: int) -> list[int]:
        """Sample indices at global positions start .. start + count - 1."""
        if start < 0 or count < 0:
            raise ValueError(f"start and count must be >= 0, got {start} and {count}")
        span = self.window * self.global_batch
        out: list[int] = []
        pos, end = start, start + count
        while pos < end:  # one slice per window touched
            w, offset = divmod(pos, span)
            take = min(end - pos, span - offset)
            out += self._window(w)[offset : offset + take].tolist()
            pos += take
        return out


def pair_order(
    data: PreferenceDataset, seed: int, global_batch: int, window: int
) -> GlobalSampler | LengthBuckets:
    """The training order of a reward / DPO stage: the plain GlobalSampler order, or with
    `window` > 0 that order regrouped by length within windows of `window` global batches."""
    sampler = GlobalSampler(len(data), seed)
    if window == 0:
        return sampler
    return LengthBuckets(sampler, data.lengths, global_batch, window, seed)


class PromptDataset:
    """Prompts to generate from, with reference answers: the exact-match evaluation set.

    From SFT records (the chat up to its last assistant message; the answer is the record's
    "answer", else that message) or preference records (the prompt; "answer", else chosen).
    prompt_ids[i] is `apply_chat_template(prompt, add_generation_prompt=True)`'s ids, so it ends
    with the template's generation prompt (lmforge's: `<|assistant|>\\n`) and holds one BOS when
    the template writes one. A prompt of seq_len tokens or more (no room to answer) is skipped
    and counted.
    """

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        tokenizer: PreTrainedTokenizerFast,
        seq_len: int,
    ) -> None:
        self.seq_len = seq_len
        self.num_records = len(records)
        self.prompt_ids: list[list[int]] = []
        self.prompts: list[list[dict[str, str]]] = []
        self.answers: list[str] = []
        self.tasks: list[str] = []
        self.fields: list[dict[str, Any]] = []  # each prompt's other record fields
        self.record_ids: list[int] = []
        encoder = ChatEncoder(tokenizer)
        for i, record in enumerate(records):
            if "prompt" in record:
                prompt, reference = list(record["prompt"]), record["chosen"]
            else:
                messages = record["messages"]
                last = max(j for j, m in enumerate(messages) if m["role"] == "assistant")
                prompt, reference = list(messages[:last]), messages[last]["content"]
            if not prompt:
                continue  # a chat that opens with the assistant has nothing to prompt with
            try:
                ids = encoder.prompt_ids(prompt)
            except (DataError, ConfigError) as err:
                raise type(err)(f"record {i}: {err}") from None
            if len(ids) >= seq_len:
                continue
            self.prompt_ids.append(ids)
            self.prompts.append(prompt)
            answer = record.get("answer")
            self.answers.append(reference if answer is None else answer)
            self.tasks.append(record.get("task") or "custom")
            self.fields.append(dict(record.get("fields") or {}))
            self.record_ids.append(i)
        self.skipped = self.num_records - len(self.record_ids)
        # Every field any record has, so each batch hands reward functions the same keywords.
        self.field_names = sorted({name for fields in self.fields for name in fields})

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """{"prompt_ids": list of ids, "answer": str, "task": str} of prompt i."""
        return {"prompt_ids": self.prompt_ids[i], "answer": self.answers[i], "task": self.tasks[i]}

    def field_lists(self, rows: Sequence[int]) -> dict[str, list[Any]]:
        """The other record fields of prompts `rows`, one list per field name (None where a
        record lacks it): the keyword lists reward functions receive."""
        return {name: [self.fields[i].get(name) for i in rows] for name in self.field_names}

    def hits(self, completions: Sequence[str]) -> list[bool]:
        """Whether each completion equals its prompt's answer (check_answer), in row order."""
        if len(completions) != len(self):
            raise ValueError(f"got {len(completions)} completions for {len(self)} prompts")
        rows = zip(self.tasks, completions, self.answers, strict=True)
        return [check_answer(task, completion, answer) for task, completion, answer in rows]

    def scores(self, hits: Sequence[bool]) -> dict[str, float]:
        """Share of hits (one per row): "all" and per task."""
        by_task: dict[str, list[bool]] = {}
        for task, hit in zip(self.tasks, hits, strict=True):
            by_task.setdefault(task, []).append(hit)
        per_task = {task: sum(h) / len(h) for task, h in sorted(by_task.items())}
        return {"all": sum(hits) / max(1, len(self)), **per_task}

    def exact_match(self, completions: Sequence[str]) -> dict[str, float]:
        """Share of completions equal to their answer (check_answer): "all" and per task."""
        return self.scores(self.hits(completions))

    def summary(self) -> str:
        """One line for the log."""
        return (
            f"prompts: {len(self):,} of {self.num_records:,} records ({self.skipped:,} skipped: "
            f"no room to answer in {self.seq_len} tokens, or no prompt)"
        )
