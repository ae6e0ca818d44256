"""Data and scoring of lmforge's shipped harness tasks (offline: everything is generated here).

- lmforge_corpus: the validation documents of the embedded corpus (Python's own documentation,
  held out by the same document hash and fraction as pretraining's default split), scored by
  rolling log-likelihood: word and byte perplexity, bits per byte.
- lmforge_chat_gen: held-out prompts of the builtin chat tasks, answered greedily and scored by
  the tasks' own exact-match check (what SFT's evaluation reports as eval/accuracy).
- lmforge_chat_mc: the held-out preference pairs of the same tasks as two-way multiple choice:
  the right answer against its rejected variant (what DPO's evaluation counts as the policy
  preferring the chosen answer).

The harness passes its task metadata as keyword arguments: `cache_dir` (the embedded corpus's
cache), `seed` and `examples` (the builtin tasks' seed and count), `validation_fraction`, and
`answer_suffix` (what the model's chat template writes after an assistant message, so that a
choice is scored up to its end of turn, as training scores it).
"""

from __future__ import annotations

from typing import Any

import datasets

from lmforge.data.builtin import builtin_documents
from lmforge.data.corpus import doc_hash, validation_mask
from lmforge.data.tasks import check_answer, preference_pairs, task_examples

DEFAULT_EXAMPLES = 200  # the demo's held-out set size (data.num_heldout)


def _splits(rows: list[dict[str, Any]]) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def corpus_validation(
    cache_dir: str = ".cache/lmforge", validation_fraction: float = 0.02, **_: Any
) -> datasets.DatasetDict:
    """The embedded corpus's validation documents, in corpus order."""
    import numpy as np

    docs = [d for d in builtin_documents(cache_dir) if d.strip()]
    hashes = np.array([doc_hash(d) for d in docs], dtype=np.uint64)
    keep = validation_mask(hashes, validation_fraction)
    return _splits([{"text": d} for d, k in zip(docs, keep, strict=True) if k])


def chat_generation(seed: int = 0, examples: int = DEFAULT_EXAMPLES, **_: Any) -> Any:
    """Held-out prompts of the builtin chat tasks with their reference answers."""
    rows = task_examples("heldout", int(examples), int(seed))
    return _splits(
        [
            {"task": r["task"], "prompt": r["messages"][0]["content"], "answer": r["answer"]}
            for r in rows
        ]
    )


def chat_choice(
    seed: int = 0, examples: int = DEFAULT_EXAMPLES, answer_suffix: str = "", **_: Any
) -> Any:
    """Held-out preference pairs as choices [chosen, rejected], each ended by answer_suffix."""
    rows = preference_pairs("heldout", int(examples), int(seed))
    return _splits(
        [
            {
                "task": r["task"],
                "prompt": r["prompt"][0]["content"],
                "choices": [r["chosen"] + answer_suffix, r["rejected"] + answer_suffix],
                "label": 0,
            }
            for r in rows
        ]
    )


def exact_match(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """1.0 when the completion passes the task's own check."""
    return {"exact_match": float(check_answer(doc["task"], results[0], doc["answer"]))}
