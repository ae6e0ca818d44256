"""Packed SFT rows compute exactly what one padded chat per row computes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import small_config

from lmforge.data.chat_datasets import SFTDataset
from lmforge.data.tasks import task_examples
from lmforge.model import build_model
from lmforge.tokenizer import train_tokenizer


def _token_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs)  # (B, T, V)
    losses = F.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")
    return losses  # (B, T), 0 where labels are -100


def test_packed_and_unpacked_give_the_same_per_sample_loss() -> None:
    records = task_examples("train", 40, seed=3)
    texts = [m["content"] for r in records for m in r["messages"]]
    tok = train_tokenizer(texts * 5, vocab_size=300)
    for position in ("rope", "learned"):
        model = build_model(small_config(vocab_size=300, max_seq_len=64, position=position), seed=1)
        packed = SFTDataset(records, tok, 64, pack=True)
        padded = SFTDataset(records, tok, 64, pack=False)
        assert len(packed) < len(padded) == len(records)
        assert packed.num_label_tokens == padded.num_label_tokens
        per_sample: dict[int, float] = {}
        for row in range(len(packed)):
            losses = _token_losses(model, packed.get_batch([row]))[0]
            for record, start, stop in packed.sample_spans(row):
                per_sample[record] = losses[start:stop].sum().item()
        row_losses = _token_losses(model, padded.get_batch(list(range(len(padded)))))
        for row, record in enumerate(padded.record_ids):
            assert abs(row_losses[row].sum().item() - per_sample[record]) < 1e-4, record
