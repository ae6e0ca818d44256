"""Generation: the KV cache equals full recomputation, padding is invisible, sampling is seeded."""

from __future__ import annotations

import pytest
import torch
from conftest import small_config

from lmforge.errors import ConfigError
from lmforge.generate import GenerateConfig, filter_logits, generate
from lmforge.model import build_model

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
GREEDY = GenerateConfig(max_new_tokens=12, temperature=0)


def _full_recompute_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy decoding by running the whole sequence every step, no cache, no padding."""
    seq, logps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[0, -1].float()
            token = int(logits.argmax())
            logps.append(float(torch.log_softmax(logits, -1)[token]))
            seq.append(token)
    return seq[len(prompt) :], logps


@pytest.mark.parametrize("position", ["rope", "alibi", "learned", "sinusoidal"])
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_cached_greedy_equals_full_recomputation(position: str, kv_heads: int) -> None:
    model = build_model(small_config(position=position, n_kv_heads=kv_heads), seed=7)
    out = generate(model, PROMPTS, GREEDY)
    for row, prompt in enumerate(PROMPTS):
        tokens, logps = _full_recompute_greedy(model, prompt, 12)
        assert out.tokens[row].tolist() == tokens
        assert out.logprobs[row].tolist() == pytest.approx(logps, abs=1e-5)
    uncached = generate(model, PROMPTS, GREEDY, use_cache=False)
    assert torch.equal(uncached.tokens, out.tokens)


def test_left_padding_is_invisible() -> None:
    model = build_model(small_config(), seed=8)
    batch = generate(model, PROMPTS, GREEDY)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], GREEDY)
        assert torch.equal(alone.tokens[0], batch.tokens[row])
        torch.testing.assert_close(alone.logprobs[0], batch.logprobs[row], atol=1e-5, rtol=0)
    assert batch.prompt_mask.sum(1).tolist() == [len(p) for p in PROMPTS]


def test_eos_stops_a_row_and_pads_the_rest() -> None:
    model = build_model(small_config(), seed=9)
    free = generate(model, PROMPTS, GREEDY)
    eos = int(free.tokens[1, 2])  # the third token of row 1 becomes the stop token
    out = generate(model, PROMPTS, GREEDY, eos_ids=[eos], pad_id=0)
    first = free.tokens[1].tolist().index(eos)
    assert out.lengths[1] == first + 1
    assert out.tokens[1, first] == eos and out.stopped[1]
    assert torch.all(out.tokens[1, first + 1 :] == 0)
    assert torch.all(out.logprobs[1, first + 1 :] == 0)
    assert out.response_mask[1].sum() == first + 1


class _CharTokenizer:
    """Decodes token t as chr(ord('a') + t % 26): enough to test stop strings."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(ord("a") + t % 26) for t in ids)


def test_stop_strings_end_rows() -> None:
    model = build_model(small_config(), seed=10)
    tok = _CharTokenizer()
    free = generate(model, PROMPTS, GREEDY)
    text = tok.decode(free.tokens[0].tolist())
    stop = text[3:5]  # two characters generated at steps 4-5 of row 0
    out = generate(
        model,
        PROMPTS,
        GenerateConfig(max_new_tokens=12, temperature=0, stop_strings=[stop]),
        tokenizer=tok,
    )
    assert out.lengths[0] == text.index(stop) + len(stop)
    assert stop in out.texts(tok)[0] and out.stopped[0]
    with pytest.raises(ConfigError, match="stop_strings"):
        generate(model, PROMPTS, GenerateConfig(stop_strings=["x"]))


def test_sampling_is_seeded() -> None:
    model = build_model(small_config(), seed=11)
    cfg = GenerateConfig(max_new_tokens=16, temperature=1.2, top_k=20, top_p=0.9, seed=3)
    a, b = generate(model, PROMPTS, cfg), generate(model, PROMPTS, cfg)
    assert torch.equal(a.tokens, b.tokens)
    cfg.seed = 4
    assert not torch.equal(generate(model, PROMPTS, cfg).tokens, a.tokens)


def test_sampled_logprobs_are_those_of_the_tempered_distribution() -> None:
    model = build_model(small_config(), seed=12)
    cfg = GenerateConfig(max_new_tokens=6, temperature=0.7, seed=1)
    out = generate(model, [PROMPTS[0]], cfg)
    seq = PROMPTS[0] + out.tokens[0].tolist()
    with torch.no_grad():
        logits = model(torch.tensor([seq]))[0, len(PROMPTS[0]) - 1 : -1].float() / 0.7
    expected = torch.log_softmax(logits, -1).gather(1, out.tokens[0][:, None]).squeeze(1)
    torch.testing.assert_close(out.logprobs[0], expected, atol=1e-5, rtol=0)


def test_top_k_and_top_p_filters() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    # nucleus 0.7: 0.5 + 0.25 already reaches it, so the tail goes
    assert torch.isinf(filter_logits(logits, 0, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, 0, 0.3)).tolist() == [[False, True, True, True]]


def test_too_long_a_request_names_the_limit() -> None:
    model = build_model(small_config(max_seq_len=16), seed=0)
    with pytest.raises(ConfigError, match="max_seq_len=16"):
        generate(model, [[1] * 10], GenerateConfig(max_new_tokens=10))


def test_generation_leaves_training_mode_alone() -> None:
    model = build_model(small_config(resid_dropout=0.5), seed=0)
    model.train()
    a = generate(model, PROMPTS, GREEDY)
    b = generate(model, PROMPTS, GREEDY)
    assert torch.equal(a.tokens, b.tokens)  # dropout was off while generating
    assert model.training


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8)]
)
def test_row_seeded_sampling_draws_from_the_filtered_distribution(
    temperature: float, top_k: int, top_p: float
) -> None:
    """Per-row counter-based sampling (Gumbel-max on hashed noise) is exact: over 60,000 rows
    the token counts pass a chi-square test against softmax(filter(logits / T)), and tokens the
    filter removed never appear."""
    from lmforge.generate import _pick_token

    vocab, n = 8, 60_000
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    cfg = GenerateConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    batch = logits.expand(n, 1, vocab)  # (N, 1, V)
    token, _ = _pick_token(batch, cfg, torch.Generator(), torch.arange(n) * 7919, step=3)
    observed = torch.bincount(token, minlength=vocab).double()
    probs = torch.softmax(filter_logits(logits[None] / temperature, top_k, top_p), -1)[0]
    kept = probs > 0
    assert observed[~kept].sum() == 0
    expected = probs[kept].double() * n
    chi2 = float(((observed[kept] - expected) ** 2 / expected).sum())
    # 99.9% quantile of chi-square with (kept - 1) <= 7 degrees of freedom is under 24.4
    assert chi2 < 24.4, (chi2, observed.tolist(), expected.tolist())


def test_row_seeded_rows_do_not_depend_on_their_batch() -> None:
    """A row's sampled tokens depend on its seed only: the same prompts split into two batches,
    reordered, or padded next to longer prompts sample the same tokens (what makes RL rollouts
    equal on any number of processes)."""
    model = build_model(small_config(), seed=3)
    cfg = GenerateConfig(max_new_tokens=10, temperature=1.0, top_k=20)
    prompts = [*PROMPTS, [7, 7, 7], [21]]
    seeds = [101, 202, 303, 404, 505]
    whole = generate(model, prompts, cfg, row_seeds=seeds)
    first = generate(model, prompts[:2], cfg, row_seeds=seeds[:2])
    rest = generate(model, prompts[2:][::-1], cfg, row_seeds=seeds[2:][::-1])

    def rows(out):
        return [out.tokens[i, : out.lengths[i]].tolist() for i in range(len(out.lengths))]

    assert rows(first) + rows(rest)[::-1] == rows(whole)
    other = generate(model, prompts, cfg, row_seeds=[s + 1 for s in seeds])
    assert rows(other) != rows(whole)
