"""Preference pairs padded to the longest chat of their batch instead of data.seq_len: a batch is
as wide as its longest pair; a DPO step and a reward step give the losses, accuracies and
gradients of full padding; the length-bucketed order is a per-position map that keeps each
window's samples whatever the process count; and a DPO run in that order resumes exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_config
from stagerun import losses, run_stage

from finetune.dpo import logprobs
from finetune.reward import pair_scores
from lmforge.checkpoint import load_checkpoint
from lmforge.data import GlobalSampler, preference_pairs
from lmforge.data.chat import ChatDataConfig, chat_tokenizer
from lmforge.data.chat_datasets import IGNORE, LengthBuckets, PreferenceDataset
from lmforge.model import build_model
from lmforge.prefs import bradley_terry_loss, dpo_loss
from lmforge.reward import build_reward_model

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ_LEN = 64
ROWS = [0, 5, 9, 14, 17, 22]  # one micro-batch of pairs of several lengths
VOCAB = 400  # the task tokenizer's


@pytest.fixture(scope="module")
def pairs(task_base: Path) -> PreferenceDataset:
    """Builtin preference pairs in the task tokenizer's chat template."""
    tok = chat_tokenizer(load_checkpoint(task_base)[1], ChatDataConfig())
    data = PreferenceDataset(preference_pairs("train", 24, seed=0), tok, SEQ_LEN)
    assert len(data) == 24 and max(data.tokens[f"{s}_x"].flat.max() for s in data.SIDES) < VOCAB
    return data


def _both(data: PreferenceDataset, rows: list[int]) -> list[dict[str, torch.Tensor]]:
    """The same rows padded to their longest chat, and to seq_len (as before)."""
    return [data.get_batch(rows), data.get_batch(rows, pad_to=SEQ_LEN)]


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_equal_steps(steps: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]):
    (values, grads), (full_values, full_grads) = steps
    assert grads and grads.keys() == full_grads.keys()
    for key in values:  # fp32 sums over fewer padded positions: equal to rounding
        torch.testing.assert_close(values[key], full_values[key], atol=1e-5, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], full_grads[name], atol=1e-5, rtol=1e-5)


def test_a_batch_is_as_wide_as_its_longest_pair(pairs: PreferenceDataset) -> None:
    for rows in ([3], ROWS, list(range(len(pairs)))):
        batch, full = _both(pairs, rows)
        real = {s: batch[f"{s}_mask"].sum(1) for s in pairs.SIDES}  # (B,) tokens per chat
        longest = int(torch.maximum(real["chosen"], real["rejected"]).max())
        assert longest < SEQ_LEN
        for key, value in batch.items():  # both sides one width: DPO stacks them into (2B, T)
            assert value.shape == ((len(rows), longest) if value.ndim == 2 else (len(rows),))
            t = value.shape[-1] if value.ndim == 2 else None
            assert torch.equal(value, full[key][:, :t] if t else full[key]), key
        for side in pairs.SIDES:  # what full padding adds is padding only
            assert (full[f"{side}_ids"][:, longest:] == pairs.pad_id).all()
            assert (full[f"{side}_labels"][:, longest:] == IGNORE).all()
            # the reward model's token is each chat's last, inside the width
            assert torch.equal(batch[f"{side}_last"], real[side] - 1)
        collated = pairs.collate([pairs[i] for i in rows])  # a DataLoader's way: the same batch
        assert all(torch.equal(collated[key], batch[key]) for key in batch)
    with pytest.raises(ValueError, match="shorter than the longest chat"):
        pairs.get_batch(ROWS, pad_to=10)


def test_dpo_step_equals_full_padding(pairs: PreferenceDataset) -> None:
    cfg = small_config(vocab_size=VOCAB, max_seq_len=SEQ_LEN, init_std=0.2)
    policy, reference = build_model(cfg, seed=0), build_model(cfg, seed=1)
    steps = []
    for batch in _both(pairs, ROWS):
        policy.zero_grad()
        pi_c, pi_r = logprobs(policy, batch, torch.device("cpu")).chunk(2)  # (B,) each
        with torch.no_grad():
            ref_c, ref_r = logprobs(reference, batch, torch.device("cpu")).chunk(2)
        loss, m = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.2, kind="sigmoid")
        loss.backward()
        values = {"loss": loss.detach(), "pi": torch.cat([pi_c, pi_r]).detach(), **m}
        steps.append((values, _grads(policy)))
    assert 0.0 < float(steps[0][0]["accuracy"]) < 1.0  # random weights: a mixed verdict
    _assert_equal_steps(steps)


def test_reward_step_equals_full_padding(pairs: PreferenceDataset) -> None:
    cfg = small_config(vocab_size=VOCAB, max_seq_len=SEQ_LEN, init_std=0.2)
    model = build_reward_model(build_model(cfg, seed=0), seed=1)
    steps = []
    for batch in _both(pairs, ROWS):
        model.zero_grad()
        chosen, rejected = pair_scores(model, batch, torch.device("cpu"))  # (B,) each
        loss, accuracy = bradley_terry_loss(chosen, rejected)
        loss.backward()
        values = {"loss": loss.detach(), "accuracy": accuracy, "chosen": chosen.detach()}
        steps.append(({**values, "rejected": rejected.detach()}, _grads(model)))
    assert "score.weight" in steps[0][1]
    _assert_equal_steps(steps)


def test_length_buckets_regroup_each_window_alone() -> None:
    lengths = np.random.default_rng(0).integers(18, 42, size=50)  # (N,) pair widths
    g, window = 8, 4
    plain = GlobalSampler(50, seed=3)
    order = LengthBuckets(GlobalSampler(50, seed=3), lengths, g, window, seed=3)
    span = g * window
    stream = order.indices(0, 5 * span)  # five windows, across epoch boundaries
    for w in range(5):  # the same samples as the plain order's window, batched by length
        ours, theirs = stream[w * span : (w + 1) * span], plain.indices(w * span, span)
        assert sorted(ours) == sorted(theirs)
        spread = [np.ptp(lengths[ours[b : b + g]]) for b in range(0, span, g)]
        assert sum(spread) < sum(np.ptp(lengths[theirs[b : b + g]]) for b in range(0, span, g))
    # A function of the position alone: any process count, any resume point, a fresh object.
    for world in (1, 2, 4):
        fresh = LengthBuckets(GlobalSampler(50, seed=3), lengths, g, window, seed=3)
        shares = [
            fresh.indices(cursor + rank * (g // world), g // world)
            for cursor in range(3 * g, 5 * span, g)
            for rank in range(world)
        ]
        assert [i for share in shares for i in share] == stream[3 * g :]


DPO = [
    "--data.num_train=48",
    "--data.num_heldout=4",
    f"--data.seq_len={SEQ_LEN}",
    "--train.steps=4",
    "--train.global_batch_size=4",
    "--train.micro_batch_size=2",  # two micro-batches of their own widths per step
    "--train.eval_every=0",
    "--train.save_every=100",
    "--optim.lr=3e-3",
    "--optim.warmup_steps=1",
    "--tracking.log_every=1",
    "--reference=precomputed",
    "--length_buckets=3",  # the stop at step 2 falls inside a window of 3 steps
]


def test_bucketed_dpo_resumes_exactly(task_base: Path, tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    first = [*DPO, f"--init_from={task_base}"]
    run_stage("finetune/dpo.py", [*first, f"--run_dir={straight}", "--train.save_every=2"])
    # The second run continues the first one's step-2 checkpoint in a directory of its own.
    middle = f"--resume.checkpoint={straight / 'step-000002'}"
    out = run_stage("finetune/dpo.py", [*first, f"--run_dir={resumed}", middle]).stdout
    assert "resume: step 2 from" in out
    done = losses(straight)
    assert sorted(done) == [1, 2, 3, 4] and losses(resumed) == {3: done[3], 4: done[4]}
    weights = [
        load_checkpoint(r, with_tokenizer=False)[0].state_dict() for r in (straight, resumed)
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
