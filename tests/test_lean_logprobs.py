"""Lean log-probs: the RL and DPO log-probs (and PPO's entropy) computed in chunks from the
hidden states and the output weight equal the plain fp32 log_softmax over whole logits, values
and gradients, with a temperature, tied and untied output weights and LoRA adapters, without
ever holding logits for more than one chunk of rows; and GRPO without the old-policy pass (one
epoch: the old log-probs are the current ones) trains the same weights as with it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import small_config
from safetensors.torch import load_file
from stagerun import REPO, stage_env
from torch.utils._python_dispatch import TorchDispatchMode

import lmforge.prefs
from finetune.dpo import logprobs as dpo_logprobs
from finetune.grpo import GRPOConfig, old_logprobs_are_current
from lmforge.lora import LoraSettings, apply_lora
from lmforge.loss import IGNORE_INDEX
from lmforge.model import GPT, build_model
from lmforge.prefs import output_weight
from lmforge.rl import entropy_from_logits
from lmforge.rollout import logprobs_and_entropy, token_logprobs

V = 97  # small_config's vocabulary


class _LogitsWatch(TorchDispatchMode):
    """The most rows of any tensor produced whose last dimension is the vocabulary (views hold
    no memory of their own and are skipped)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.ndim >= 2 and t.shape[-1] == V:
                    self.largest = max(self.largest, t.numel() // V)
        return out


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> int:
    """Chunks of 5 rows at V = 97 (the default budget would take every row at once)."""
    monkeypatch.setattr(lmforge.prefs, "CHUNK_BYTES", 5 * 4 * V)
    return 5


def _seqs(n: int = 3, length: int = 12) -> dict[str, torch.Tensor]:
    """Rows with a prompt, a response of varying length and right padding, labelled as
    rollout.build_sequences labels them (-100 off the response)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (n, length), generator=gen)
    labels = torch.full((n, length), IGNORE_INDEX)
    for i in range(n):
        start, end = 3 + i, length - 1 - 2 * i
        labels[i, start - 1 : end - 1] = ids[i, start:end]
    return {"input_ids": ids, "labels": labels}


def _plain(model: GPT, seqs: dict[str, torch.Tensor], tau: float) -> tuple[torch.Tensor, ...]:
    """The computation before lean log-probs: fp32 log_softmax over all logits (N, L, V)."""
    labels, mask = seqs["labels"], (seqs["labels"] != IGNORE_INDEX).float()
    logits = model(input_ids=seqs["input_ids"]).float() / tau  # (N, L, V)
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return logp * (labels != IGNORE_INDEX), entropy_from_logits(logits, mask)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _lora_model(tied: bool) -> GPT:
    """A GPT with adapters on every projection, B nonzero (so the adapters change the output)."""
    model = apply_lora(build_model(small_config(tie_embeddings=tied), seed=3), LoraSettings(True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 0.05)
    return model


@pytest.mark.parametrize(
    ("tied", "tau", "lora"),
    [(True, 1.0, False), (False, 0.7, False), (True, 1.3, True)],
    ids=["tied", "untied-temperature", "tied-lora-temperature"],
)
def test_chunked_rl_logprobs_and_entropy_equal_plain(
    tied: bool, tau: float, lora: bool, small_chunks: int
) -> None:
    """Policy log-probs and PPO's entropy (values and gradients of a loss using both, through
    every trainable parameter: the tied embedding, the untied head, the adapters) equal the
    plain computation within 1e-5; no tensor ever held logits for more than one chunk."""
    model = _lora_model(tied) if lora else build_model(small_config(tie_embeddings=tied), seed=3)
    assert output_weight(model) is model.output.weight  # the chunked path is taken
    seqs = _seqs()
    mask = (seqs["labels"] != IGNORE_INDEX).float()
    upstream = torch.randn(mask.shape, generator=torch.Generator().manual_seed(2))

    logp, entropy = _plain(model, seqs, tau)
    ((logp * upstream).sum() - 0.3 * entropy).backward()
    plain_grads = _grads(model)

    with _LogitsWatch() as watch:
        lean, lean_entropy = logprobs_and_entropy(model, seqs, mask, tau)
        ((lean * upstream).sum() - 0.3 * lean_entropy).backward()
    lean_grads = _grads(model)
    assert watch.largest <= small_chunks

    assert (lean - logp).abs().max() < 1e-5 and (lean_entropy - entropy).abs() < 1e-5
    assert set(lean_grads) == set(plain_grads) and plain_grads
    for name, g in plain_grads.items():
        assert (lean_grads[name] - g).abs().max() < 1e-5, name
    with torch.no_grad():  # old policy and reference: the same values without a graph
        assert (token_logprobs(model, seqs, tau, torch.device("cpu")) - logp).abs().max() < 1e-5


def test_chunked_dpo_logprobs_equal_plain(small_chunks: int) -> None:
    """DPO's summed answer log-probs of chosen and rejected rows, values and gradients."""
    model = build_model(small_config(tie_embeddings=False), seed=4)
    s = _seqs(4)
    batch = {
        "chosen_ids": s["input_ids"][:2],
        "rejected_ids": s["input_ids"][2:],
        "chosen_labels": s["labels"][:2],
        "rejected_labels": s["labels"][2:],
    }
    upstream = torch.tensor([1.0, -2.0, 0.5, 1.5])  # a non-uniform upstream gradient
    plain = _plain(model, s, 1.0)[0].sum(-1)  # (4,): chosen rows first, then rejected
    (plain * upstream).sum().backward()
    plain_grads = _grads(model)
    with _LogitsWatch() as watch:
        lean = dpo_logprobs(model, batch, torch.device("cpu"))
        (lean * upstream).sum().backward()
    assert watch.largest <= small_chunks
    assert (lean - plain).abs().max() < 1e-5
    for name, g in _grads(model).items():
        assert (g - plain_grads[name]).abs().max() < 1e-5, name


def test_plain_path_where_the_head_is_not_a_plain_weight() -> None:
    """A replaced output layer (here: a wrapper module) makes the log-probs take the plain path,
    with the same values."""
    model = build_model(small_config(), seed=5)
    seqs = _seqs()
    with torch.no_grad():
        expected = token_logprobs(model, seqs, 1.0, torch.device("cpu"))
        head = model.output
        model.output = torch.nn.Sequential(head)  # type: ignore[assignment]
        assert output_weight(model) is None
        assert (token_logprobs(model, seqs, 1.0, torch.device("cpu")) - expected).abs().max() < 1e-6
        model.output = head
        assert output_weight(model) is head.weight


# Three optimizer steps of a 1-process ZeRO-3 engine (the output weight partitioned outside its
# module's forward) on -mean(log p(label) / T), the log-probs computed in chunks inside the head's
# forward, then from plain logits; prints both runs' losses.
_ZERO3_RUN = """
import json, torch
from lmforge.config import load_preset
from lmforge.distributed import DistInfo
from lmforge.engine import EngineConfig, build_engine, init_distributed
from lmforge.model import ModelConfig, build_model
from lmforge.optim import OptimConfig
init_distributed(DistInfo())
cfg = load_preset(ModelConfig, "tiny")
gen = torch.Generator().manual_seed(0)
batches = [torch.randint(0, cfg.vocab_size, (2, 33), generator=gen) for _ in range(3)]
out = {}
for name in ("chunked", "plain"):
    engine = build_engine(
        build_model(cfg, seed=0), EngineConfig(precision="fp32", zero_stage=3),
        OptimConfig(lr=3e-3, warmup_steps=0), micro_batch=2, grad_accum=1, total_steps=3,
        info=DistInfo(),
    )
    losses = []
    for b in batches:
        ids, labels = b[:, :-1], b[:, 1:]
        if name == "chunked":
            logp, _ = engine(input_ids=ids, logprob_labels=labels, temperature=0.7)
        else:
            logits = engine(input_ids=ids).float() / 0.7
            logp = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
        loss = -logp.mean()
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    out[name] = losses
    engine.ds.destroy()
print(json.dumps(out))
"""


def test_zero3_computes_chunked_log_probs_inside_the_head() -> None:
    """Under ZeRO-3 the chunks run in the output layer's own forward, where the weight is whole
    (and again in backward): the same losses, hence the same gradients, step after step."""
    result = subprocess.run(
        [sys.executable, "-c", _ZERO3_RUN], capture_output=True, text=True, cwd=REPO,
        env=stage_env(), timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["chunked"] == pytest.approx(out["plain"], rel=1e-5)
    assert out["chunked"][2] < out["chunked"][0]  # the weights moved: gradients flowed


def test_old_pass_is_skipped_only_where_it_cannot_differ() -> None:
    """One epoch and no dropout: skipped. More epochs (the weights move between them), or any
    dropout (train mode differs from the rollout's eval mode): the pass runs."""
    one, two = GRPOConfig(), GRPOConfig(epochs=2)
    plain = SimpleNamespace(module=build_model(small_config(), seed=0))  # what grpo reads
    assert old_logprobs_are_current(one, plain)
    assert not old_logprobs_are_current(two, plain)
    for dropout in ({"attn_dropout": 0.1}, {"resid_dropout": 0.1}):
        model = build_model(small_config(**dropout), seed=0)
        assert not old_logprobs_are_current(one, SimpleNamespace(module=model))
    lora = apply_lora(build_model(small_config(), seed=0), LoraSettings(True, dropout=0.1))
    assert not old_logprobs_are_current(one, SimpleNamespace(module=lora))


# GRPO from task_base (random weights, the chat tasks' tokenizer): 2 micro-batches per step, a
# reference (β > 0), a reward most groups vary in ('e' is in many of the 400 tokens).
GRPO_ARGS = [
    "--data.num_train=64",
    "--data.num_heldout=4",
    "--data.seq_len=64",
    "--group_size=4",
    "--train.global_batch_size=16",
    "--train.micro_batch_size=8",
    "--train.steps=3",
    "--train.eval_every=0",
    "--train.save_every=1000",
    "--max_new_tokens=6",
    "--rewards=[{name: 'contains:e', weight: 1.0}]",
    "--beta=0.04",
    "--optim.lr=1e-2",
    "--optim.warmup_steps=0",
    "--tracking.log_every=1",
]
# The stage as a user runs it, with the old-policy pass forced or not (grpo_step's old_pass).
RUN_GRPO = (
    "import functools, sys; import finetune.grpo as g; "
    "g.grpo_step = functools.partial(g.grpo_step, old_pass=sys.argv[1] == 'pass'); "
    "sys.exit(g.main(sys.argv[2:]))"
)


def _grpo(runs: dict[str, Path], base: Path) -> dict[str, list[dict]]:
    """Run the variants side by side (one thread each) and return each one's metrics."""
    procs = {}
    for variant, run in runs.items():
        cmd = [sys.executable, "-c", RUN_GRPO, variant, f"--init_from={base}", f"--run_dir={run}"]
        procs[variant] = subprocess.Popen(
            cmd + GRPO_ARGS, env=stage_env(), cwd=REPO, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
    for proc in procs.values():
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-5000:]
    return {
        v: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for v, run in runs.items()
    }


def test_grpo_without_the_old_policy_pass_trains_the_same_weights(
    task_base: Path, tmp_path: Path
) -> None:
    """One epoch: the old log-probs are the current ones detached. The same run with the extra
    no-grad pass forced gives the same losses, metrics and final weights."""
    logs = _grpo({v: tmp_path / v for v in ("skip", "pass")}, task_base)
    skip, forced = logs["skip"], logs["pass"]
    steps = [(a, b) for a, b in zip(skip, forced, strict=True) if "loss" in a]
    assert len(steps) == 3
    keys = ("loss", "kl", "clip_fraction", "sample_entropy", "reward", "grad_norm")
    for a, b in steps:
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    assert any(a["grad_norm"] > 0 for a, _ in steps)  # the rewards varied: the policy moved
    start = load_file(str(task_base / "step-000000" / "model.safetensors"))
    ws, wp = (
        load_file(str(tmp_path / v / "step-000003" / "model.safetensors")) for v in ("skip", "pass")
    )
    assert set(ws) == set(wp)
    assert any(not torch.equal(ws[k], start[k]) for k in ws)
    for k in ws:
        assert torch.allclose(ws[k], wp[k], rtol=1e-5, atol=1e-6), k
