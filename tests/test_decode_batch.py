"""How `generate` batches its work on a CPU without changing what it returns: rows that share a
prompt (an RL group) run the prompt once, and rows that stopped leave the decode batch.

Every check compares against decoding without a cache (`use_cache=False`: the whole sequence
every step, every row, no sharing) or through a static cache (fixed batch): same tokens, same
lengths, log-probs equal to float rounding."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import small_config

from lmforge.attention import KVCache
from lmforge.generate import GenerateConfig, Generation, generate
from lmforge.model import GPT, build_model

# Three prompts of different lengths, each four times, as GRPO lays out a group. The models
# have untied embeddings: a random tied one greedily repeats the last prompt token.
DISTINCT = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
GROUPED = [p for p in DISTINCT for _ in range(4)]
SEEDS = [1000 + 7 * i for i in range(len(GROUPED))]


def _batch_sizes(model: GPT) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """Record the batch size of every forward of `model` (prefill first)."""
    sizes: list[int] = []

    def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        sizes.append(int(args[0].shape[0]))

    return sizes, model.register_forward_pre_hook(hook)


def _stopping_ids(model: GPT, cfg: GenerateConfig) -> list[int]:
    """Two stop tokens that end rows at three or more different steps, none at the first: found
    in the rows' free decode (the tokens before a stop are the free decode's)."""
    free = generate(model, GROUPED, cfg, row_seeds=SEEDS).tokens  # (B, N)

    def lengths(eos: list[int]) -> list[int]:
        hit = torch.isin(free, torch.tensor(eos))  # (B, N)
        return [int(h.nonzero()[0]) + 1 if h.any() else free.shape[1] for h in hit]

    for pair in itertools.combinations(sorted(set(free.flatten().tolist())), 2):
        steps = lengths(list(pair))
        if min(steps) >= 2 and len(set(steps)) >= 3:
            return list(pair)
    raise AssertionError("no pair of stop tokens ends rows at three different steps")


def _assert_same(fast: Generation, slow: Generation) -> None:
    assert torch.equal(fast.lengths, slow.lengths)
    assert torch.equal(fast.tokens, slow.tokens)
    assert torch.equal(fast.stopped, slow.stopped)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_groups_prefill_once_and_stopped_rows_leave_the_batch(temperature: float) -> None:
    model = build_model(small_config(tie_embeddings=False), seed=4)
    cfg = GenerateConfig(max_new_tokens=10, temperature=temperature)
    eos = _stopping_ids(model, cfg)
    sizes, handle = _batch_sizes(model)
    fast = generate(model, GROUPED, cfg, eos_ids=eos, row_seeds=SEEDS)
    handle.remove()
    slow = generate(model, GROUPED, cfg, eos_ids=eos, row_seeds=SEEDS, use_cache=False)
    _assert_same(fast, slow)
    assert len(set(fast.lengths.tolist())) >= 3  # rows stop at different steps
    assert sizes[0] == len(DISTINCT)  # one prefill row per distinct prompt
    decode = sizes[1:]
    assert decode[0] == len(GROUPED) and decode == sorted(decode, reverse=True)
    still_running = [int((fast.lengths > i + 1).sum()) for i in range(len(decode))]
    assert decode[-1] < len(GROUPED) and all(
        n >= running for n, running in zip(decode, still_running, strict=True)
    )  # fewer rows once some stopped, never fewer than are still generating


def test_a_static_cache_shares_prompts_and_keeps_its_batch() -> None:
    model = build_model(small_config(tie_embeddings=False), seed=5)
    cfg = GenerateConfig(max_new_tokens=10, temperature=1.0, static_cache=True)
    eos = _stopping_ids(model, cfg)
    sizes, handle = _batch_sizes(model)
    static = generate(model, GROUPED, cfg, eos_ids=eos, row_seeds=SEEDS)
    handle.remove()
    cfg.static_cache = False
    _assert_same(static, generate(model, GROUPED, cfg, eos_ids=eos, row_seeds=SEEDS))
    assert sizes[0] == len(DISTINCT) and set(sizes[1:]) == {len(GROUPED)}


def test_a_shared_generator_keeps_the_whole_batch() -> None:
    """Sampling from one generator (no row seeds) draws for the whole batch at once, so rows
    stay in it to keep the draws (and tokens) of a batch that never shrinks."""
    model = build_model(small_config(tie_embeddings=False), seed=6)
    cfg = GenerateConfig(max_new_tokens=10, temperature=1.0, seed=2)
    eos = _stopping_ids(model, cfg)
    sizes, handle = _batch_sizes(model)
    out = generate(model, GROUPED, cfg, eos_ids=eos)
    handle.remove()
    assert sizes[0] == len(DISTINCT) and set(sizes[1:]) == {len(GROUPED)}
    cfg.static_cache = True
    _assert_same(out, generate(model, GROUPED, cfg, eos_ids=eos))


def test_cache_rows_are_copied_and_dropped_in_order() -> None:
    cfg = small_config()
    src = KVCache(cfg, 2, 8, dtype=torch.float32, device="cpu")
    for layer in range(cfg.n_layers):
        kv = torch.arange(2.0)[:, None, None, None].expand(2, cfg.kv_heads, 3, cfg.head_size)
        src.update(layer, kv, kv + 10)
    src.length, src.valid[:, :3] = 3, True
    dst = KVCache(cfg, 4, 8, dtype=torch.float32, device="cpu")
    dst.load_rows(src, torch.tensor([1, 0, 1, 1]))
    assert dst.length == 3 and dst.k[0][:, 0, 0, 0].tolist() == [1, 0, 1, 1]
    assert dst.v[1][:, 0, 2, 0].tolist() == [11, 10, 11, 11] and not dst.valid[:, 3:].any()
    dst.keep_rows(torch.tensor([False, True, True, False]))
    assert dst.k[1][:, 0, 0, 0].tolist() == [0, 1] and dst.valid.shape == (2, 8)
    dst.make_static()
    with pytest.raises(RuntimeError, match="static cache"):
        dst.keep_rows(torch.tensor([True, False]))
