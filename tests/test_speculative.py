"""Speculative decoding: the model's own tokens (greedy, row-seeded), its own distribution
(modified rejection sampling), its own log-probs, and a batch that stops early stops decoding."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from conftest import small_config

import lmforge.speculative as spec
from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.generate import GenerateConfig, filter_logits, generate
from lmforge.model import GPT, build_model
from lmforge.speculative import model_drafter, ngram_drafter

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16, 5, 6, 7]]


class _CharTokenizer:
    """Decodes token t as chr(ord('a') + t % 26): enough for stop strings."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(ord("a") + t % 26) for t in ids)


def _model(seed: int, **overrides: object) -> GPT:
    # init_std 0.5: peaked, varied next-token distributions (the default init gives a near-
    # uniform model that repeats one token, which any drafter guesses).
    return build_model(small_config(init_std=0.5, **overrides), seed=seed)


def _perturbed(model: GPT, std: float, seed: int) -> GPT:
    """A copy of `model` with Gaussian noise on every weight: a drafter that often agrees."""
    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return draft


def _drafters(model: GPT) -> dict[str, object]:
    small = dict(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, position=model.cfg.position)
    return {
        "small model": lambda: model_drafter(_model(3, **small), 4),
        "near copy, adaptive k": lambda: model_drafter(_perturbed(model, 0.05, 4), 0),
        "same model": lambda: model_drafter(copy.deepcopy(model), 3),
        "ngram": lambda: ngram_drafter(4, 2),
    }


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_greedy_is_plain_greedy_token_for_token(position: str, monkeypatch) -> None:
    """Rows of different lengths that accept different numbers of tokens, stop at EOS or a stop
    string at different steps, or run into max_new_tokens: the tokens and lengths of plain
    greedy decoding, log-probs equal. The cache compacts its holes away: every round for ALiBi
    (its biases count slots), when it is full otherwise (made as small as works here: the
    prompt and max_new_tokens; k shrinks when a round does not fit)."""
    if position == "rope":
        monkeypatch.setattr(spec, "cache_capacity", lambda p, new, k, limit: p + new + 1)
    model = _model(7, position=position)
    tok = _CharTokenizer()
    free = generate(model, PROMPTS, GenerateConfig(max_new_tokens=24, temperature=0))
    eos = int(free.tokens[1, 3])  # row 1 stops at its fourth token, the others maybe later
    stop = tok.decode(free.tokens[0, 5:7].tolist())
    cases = [
        (GenerateConfig(max_new_tokens=24, temperature=0), []),
        (GenerateConfig(max_new_tokens=2, temperature=0), []),
        (GenerateConfig(max_new_tokens=7, temperature=0), [eos]),
        (GenerateConfig(max_new_tokens=20, temperature=0, stop_strings=[stop]), [eos]),
    ]
    compactions = 0
    for cfg, eos_ids in cases:
        plain = generate(model, PROMPTS, cfg, eos_ids=eos_ids, tokenizer=tok)
        for name, make in _drafters(model).items():
            out = generate(model, PROMPTS, cfg, eos_ids=eos_ids, tokenizer=tok, draft=make())
            where = f"{name}, {cfg.max_new_tokens} tokens, eos {eos_ids}"
            assert torch.equal(out.tokens, plain.tokens), where
            assert torch.equal(out.lengths, plain.lengths), where
            assert torch.equal(out.stopped, plain.stopped), where
            torch.testing.assert_close(out.logprobs, plain.logprobs, atol=1e-5, rtol=1e-5)
            assert out.stats.forwards <= plain.stats.forwards, where
            compactions += out.stats.compactions
    assert compactions > 0  # holes filled the cache at least once


def _teacher_forced_logprobs(model: GPT, prompt: list[int], tokens: list[int], t: float):
    """log p of each generated token under softmax(logits / t) from one full forward."""
    seq = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(seq)[0, len(prompt) - 1 : -1].float() / t  # (N, V)
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens)[:, None]).squeeze(1)


def test_sampled_logprobs_are_the_models_own() -> None:
    """Rejection sampling (the batch's generator) with top-k and top-p: each returned log-prob
    is the model's, from a teacher-forced forward of the row alone."""
    model = _model(11)
    cfg = GenerateConfig(max_new_tokens=20, temperature=0.8, top_k=20, top_p=0.95, seed=3)
    out = generate(model, PROMPTS, cfg, draft=model_drafter(_perturbed(model, 0.05, 5), 3))
    assert out.stats.accepted > 0 and out.stats.accepted < out.stats.proposed
    for row, prompt in enumerate(PROMPTS):
        n = int(out.lengths[row])
        want = _teacher_forced_logprobs(model, prompt, out.tokens[row, :n].tolist(), 0.8)
        torch.testing.assert_close(out.logprobs[row, :n], want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------- the distribution test

V, NEW, N_SAMPLES = 8, 4, 8000


def _tiny(seed: int) -> GPT:
    return _model(seed, vocab_size=V, dim=16, n_layers=1, n_heads=2, n_kv_heads=1)


def _exact(model: GPT, prompt: list[int], cfg: GenerateConfig) -> torch.Tensor:
    """The model's probability of every continuation of NEW tokens (V**NEW,), in the order of
    itertools.product: the product of its top-k / top-p filtered next-token probabilities."""
    seqs = torch.tensor([prompt + list(x) for x in itertools.product(range(V), repeat=NEW)])
    with torch.no_grad():
        logits = model(seqs).float()
    logp = torch.zeros(len(seqs))
    for j in range(NEW):
        at = len(prompt) - 1 + j
        scores = filter_logits(logits[:, at] / cfg.temperature, cfg.top_k, cfg.top_p)
        logp += torch.log_softmax(scores, -1).gather(1, seqs[:, at + 1, None]).squeeze(1)
    return logp.exp()


def _chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of sampled continuations (n, NEW) against probs, cells expecting
    fewer than 5 pooled, and its degrees of freedom; inf when a sample has probability 0."""
    n = tokens.shape[0]
    index = (tokens * V ** torch.arange(NEW - 1, -1, -1)).sum(1)
    counts = torch.bincount(index, minlength=V**NEW).double()
    expected = probs.double() * n
    if bool((counts[probs == 0] > 0).any()):
        return math.inf, 1
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    stat = ((obs - exp) ** 2 / exp)[keep].sum()
    return float(stat), int(keep.sum()) - 1


def _critical(df: int) -> float:
    """The chi-square quantile at 1 - 1e-3 (Wilson-Hilferty; z = 3.090)."""
    a = 2 / (9 * df)
    return df * (1 - a + 3.090 * math.sqrt(a)) ** 3


def _lookup_prompt(model: GPT, cfg: GenerateConfig) -> list[int]:
    """A prompt holding the model's own likely continuations, so prompt lookup proposes tokens
    it often accepts: three times, prepend the most likely continuation."""
    prompt = [1, 2, 3]
    for _ in range(3):
        best = int(_exact(model, prompt, cfg).argmax())
        prompt = [best // V ** (NEW - 1 - j) % V for j in range(NEW)] + prompt
    return prompt


@pytest.mark.parametrize("drafter", ["model", "ngram"])
def test_sampled_continuations_have_the_models_distribution(drafter: str, monkeypatch) -> None:
    """N_SAMPLES rows of one prompt, NEW tokens each, by speculative rejection sampling; their
    joint distribution over the V**NEW continuations is the model's (computed exactly), by
    Pearson's chi-square at level 1e-3.

    Power: for a sampler whose distribution over the cells is at total-variation distance d
    from the model's, the statistic is about noncentral chi-square with df degrees of freedom
    and noncentrality λ = n·Σ(p'-p)²/p ≥ 4·n·d² (Cauchy-Schwarz, Σp = 1). With n = 8000 and
    d = 0.06, λ ≥ 115. Here df ≤ 80 (top-k 3: at most 81 continuations), where the critical
    value is ≤ 125 while the statistic has mean df + λ ≥ 195 and standard deviation
    sqrt(2(df + 2λ)) ≈ 25: it falls under the critical value with probability < 0.01 (2.8
    standard deviations; more with fewer cells). Cells expecting fewer than 5 samples are
    pooled into one; they hold under 1% of the mass (asserted). The seeds are fixed, so the
    test is deterministic. A deliberately wrong rule (after a rejection, draw from p instead of
    norm(max(0, p - q))) fails it, so it can fail.
    """
    model = _tiny(1)
    if drafter == "model":  # a stochastic drafter q: ratio tests and residual draws
        cfg = GenerateConfig(max_new_tokens=NEW, temperature=1.0, top_k=3, seed=1)
        prompt = [1, 2, 3]

        def make():
            return model_drafter(_perturbed(model, 0.05, 5), 3)
    else:  # a deterministic drafter: q is a point mass
        cfg = GenerateConfig(max_new_tokens=NEW, temperature=0.7, top_k=3, top_p=0.95, seed=2)
        prompt = _lookup_prompt(model, cfg)

        def make():
            return ngram_drafter(3, 2)

    probs = _exact(model, prompt, cfg)
    assert int((probs > 0).sum()) <= 81 and float(probs[probs * N_SAMPLES < 5].sum()) < 0.01
    out = generate(model, [prompt] * N_SAMPLES, cfg, draft=make())
    assert out.stats.accepted > 0.05 * out.stats.proposed  # proposals were tested and kept
    stat, df = _chi_square(out.tokens, probs)
    assert stat < _critical(df), (stat, df)

    monkeypatch.setattr(spec, "residual", lambda p, q: p)  # the wrong rule
    wrong = generate(model, [prompt] * (N_SAMPLES // 4), cfg, draft=make())
    stat, df = _chi_square(wrong.tokens, probs)
    assert stat > _critical(df), (stat, df)


# ------------------------------------------------------------------------------ row seeds


def test_row_seeded_samples_are_plain_row_seeded_samples_in_any_batch() -> None:
    """With row seeds a drafter draws with the noise plain decoding would use at that output
    index, and a proposal is kept when it is the model's own pick: the tokens are plain
    decoding's, a function of (row seed, model), whatever the batch, drafter or k."""
    model = _model(13)
    cfg = GenerateConfig(max_new_tokens=16, temperature=1.0, top_p=0.9)
    seeds = [101, 202, 303]
    plain = generate(model, PROMPTS, cfg, row_seeds=seeds)
    for name, make in _drafters(model).items():
        out = generate(model, PROMPTS, cfg, row_seeds=seeds, draft=make())
        assert torch.equal(out.tokens, plain.tokens), name
        torch.testing.assert_close(out.logprobs, plain.logprobs, atol=1e-5, rtol=1e-5)
    # Row 2 alone, and beside other prompts, with a drafter: its plain tokens again.
    near = model_drafter(_perturbed(model, 0.05, 4), 4)
    alone = generate(model, [PROMPTS[2]], cfg, row_seeds=[303], draft=near)
    other = generate(model, [[40, 41], PROMPTS[2]], cfg, row_seeds=[7, 303], draft=near)
    n = int(plain.lengths[2])
    assert alone.tokens[0, :n].tolist() == plain.tokens[2, :n].tolist()
    assert other.tokens[1, :n].tolist() == plain.tokens[2, :n].tolist()
    assert near.forwards > 0  # type: ignore[attr-defined]


def test_a_draft_model_that_cannot_serve_is_one_clear_error() -> None:
    model = _model(19)
    cfg = GenerateConfig(max_new_tokens=4, temperature=0)
    with pytest.raises(ConfigError, match="vocabulary of 50 tokens"):
        generate(model, PROMPTS, cfg, draft=model_drafter(_model(1, vocab_size=50), 2))
    with pytest.raises(ConfigError, match="max_seq_len=8"):
        generate(model, PROMPTS, cfg, draft=model_drafter(_model(1, max_seq_len=8), 2))
    with pytest.raises(ConfigError, match="static_cache"):
        static = GenerateConfig(max_new_tokens=4, temperature=0, static_cache=True)
        generate(model, PROMPTS, static, draft=ngram_drafter(2))


# ------------------------------------------------------------------------ stop decision


def test_a_batch_stopping_after_two_tokens_runs_two_decode_steps_on_cpu() -> None:
    """Every row stops at its second token: on CPU the finished batch is seen at once, so the
    model runs the prompt and one decode step (not 8), and the tokens are unchanged."""
    model = _model(17)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    free = generate(model, prompts, GenerateConfig(max_new_tokens=8, temperature=0))
    second = set(free.tokens[:, 1].tolist())
    assert not second & set(free.tokens[:, 0].tolist())  # no row stops at its first token
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = generate(
            model, prompts, GenerateConfig(max_new_tokens=8, temperature=0), eos_ids=second
        )
    finally:
        hook.remove()
    assert len(calls) == 2 and out.stats.forwards == 2
    assert torch.equal(out.tokens, free.tokens[:, :2]) and out.lengths.tolist() == [2, 2, 2]


# -------------------------------------------------------------------------------- the CLI


def test_cli_sample_with_ngram_draft_prints_the_plain_text(task_base, capsys) -> None:
    prompt = "Sort the digits of 4721."
    args = ["sample", str(task_base), "--prompt", prompt, "--max-new-tokens", "12"]
    assert main([*args, "--temperature", "0"]) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--temperature", "0", "--draft", "ngram", "--draft-tokens", "0"]) == 0
    assert capsys.readouterr().out == plain
    assert main([*args, "--draft", str(task_base)]) == 0  # a checkpoint drafts (itself here)
    assert capsys.readouterr().out.startswith(prompt)


def test_cli_bad_draft_is_one_line(task_base, tmp_path, capsys) -> None:
    assert main(["sample", str(task_base), "--draft", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: draft model:") and "nope" in err and "\n" not in err
