"""Speculative rollouts in GRPO, run for real: a run drafted by a small model, stopped and
resumed, ends bit-identical to an uninterrupted run drafted by n-gram lookup (the drafter changes
the speed of a rollout, never its tokens), trains, and logs its acceptance; under ZeRO-3 on two
processes a drafted rollout is the same as on one; a draft model with another tokenizer is one
line; the speculative benchmark runs in a smoke mode."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from stagerun import REPO, metrics, run_stage, stage_env

from lmforge.checkpoint import save_checkpoint
from lmforge.model import ModelConfig, build_model
from lmforge.rundir import latest_name

COMMON = [
    "--data.num_train=64",
    "--data.num_heldout=4",
    "--data.seq_len=64",
    "--group_size=4",
    "--train.global_batch_size=8",
    "--train.micro_batch_size=8",
    "--train.eval_every=0",
    "--optim.warmup_steps=0",
    "--optim.schedule=constant",
    "--optim.lr=3e-3",
    "--tracking.log_every=1",
    "--max_new_tokens=8",
    "--beta=0.04",
]


def _draft_model(where: Path, tok: object, vocab: int, seed: int) -> Path:
    """A one-layer model of `vocab` tokens saved with `tok`: a drafter much smaller than the
    policy (random weights: it proposes, the policy decides)."""
    cfg = ModelConfig(
        vocab_size=vocab, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=128
    )
    save_checkpoint(where, build_model(cfg, seed=seed), tok, stage="pretrain", step=0)
    return where


@pytest.fixture(scope="module")
def setup(task_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The policy (the shared random-weight task model), a small draft model with its tokenizer,
    and a reward function that tells completions apart (so that every step has a gradient)."""
    from lmforge.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("spec")
    policy = task_base / latest_name(task_base)
    tok = load_tokenizer(str(policy))
    reward = root / "lengthy.py"
    reward.write_text(
        "def score(prompts, completions, answers, tasks):\n"
        "    return [float(len(c) % 5) for c in completions]\n"
    )
    return {
        "policy": policy,
        "draft": _draft_model(root / "draft", tok, 400, seed=1),
        "reward": reward,
    }


def grpo_args(s: dict[str, Path], run: Path, *extra: str) -> list[str]:
    return [
        *COMMON,
        f"--init_from={s['policy']}",
        f"--run_dir={run}",
        f"--rewards=[{{name: '{s['reward']}:score'}}]",
        *extra,
    ]


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / f"step-{step:06d}" / "model.safetensors")


def step_records(run: Path) -> dict[int, dict]:
    """The last metrics record of each step that logged a loss."""
    return {r["step"]: r for r in metrics(run) if "loss" in r}


STEPS = ["--train.steps=2", "--train.save_every=2"]


@pytest.fixture(scope="module")
def bench_smoke(
    setup: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """bench/generate.py --draft in a smoke mode, started here and left running beside the
    one-process GRPO runs (a core each); its test collects it. Yields (process, results file)."""
    out = tmp_path_factory.mktemp("bench") / "spec.json"
    cmd = [
        sys.executable, str(REPO / "bench" / "generate.py"), "--draft",
        f"--draft-pair={setup['draft']},{setup['policy']}", "--rollout-steps=0",
        "--threads=1", "--prompts=2", "--prompt-len=8", "--new-tokens=6",
        "--repeats=1", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    yield proc, out
    if proc.poll() is None:  # its test was deselected or failed early
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def ngram_run(
    setup: dict[str, Path],
    bench_smoke: tuple[subprocess.Popen[str], Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """Two uninterrupted GRPO steps on one process, rollouts drafted by n-gram lookup (the
    benchmark's smoke run goes on meanwhile)."""
    run = tmp_path_factory.mktemp("ngram") / "run"
    run_stage("finetune/grpo.py", grpo_args(setup, run, *STEPS, "--rollout.draft=ngram"))
    return run


def test_drafted_run_resumes_to_the_uninterrupted_run(
    setup: dict[str, Path], ngram_run: Path, tmp_path: Path
) -> None:
    """Model-drafted, stopped after step 1 and resumed, against n-gram-drafted in one go: the same
    rollouts (rewards, lengths), losses and final weights bit for bit; the weights moved; every
    step logs the acceptance rate and the tokens per policy forward."""
    whole, split, steps = ngram_run, tmp_path / "model", STEPS
    drafted = [*steps, f"--rollout.draft={setup['draft']}", "--rollout.draft_tokens=3"]
    first = run_stage("finetune/grpo.py", grpo_args(setup, split, *drafted, "--train.stop_at=1"))
    assert "rollouts drafted by" in first.stdout + first.stderr
    run_stage("finetune/grpo.py", grpo_args(setup, split, *drafted))

    a, b = step_records(whole), step_records(split)
    assert sorted(a) == sorted(b) == [1, 2]
    for step in (1, 2):
        for key in ("loss", "reward", "response_length", "tokens"):
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])
        for rec in (a[step], b[step]):
            assert math.isfinite(rec["loss"])
            assert 0.0 <= rec["rollout/acceptance"] <= 1.0
            assert 1.0 <= rec["rollout/tokens_per_forward"] <= 4.0  # at most k + 1 = 4
    end_a, end_b = weights(whole, 2), weights(split, 2)
    assert all(torch.equal(end_a[k], end_b[k]) for k in end_a), "resumed run differs"
    start = load_file(setup["policy"] / "model.safetensors")
    assert any(not torch.equal(start[k], end_a[k]) for k in start), "nothing trained"


def test_zero3_two_processes_draft_the_same_rollout(
    setup: dict[str, Path], ngram_run: Path, tmp_path: Path
) -> None:
    """Step 1 of a ZeRO-3 run on two processes, rollouts drafted by the small model (a whole
    frozen copy on each rank beside the policy's replica, gathered once per rollout), samples the
    same completions as one process under ZeRO-0 drafting by n-gram lookup."""
    run = tmp_path / "zero3"
    args = grpo_args(
        setup, run, "--train.steps=1", "--train.save_every=1000", "--engine.zero_stage=3",
        f"--rollout.draft={setup['draft']}",
    )  # fmt: skip
    run_stage("finetune/grpo.py", args, nproc=2, launcher="torchrun")
    one, zero3 = step_records(ngram_run)[1], step_records(run)[1]
    for key in ("reward", "response_length", "tokens"):
        assert one[key] == zero3[key], (key, one[key], zero3[key])
    assert 0.0 <= zero3["rollout/acceptance"] <= 1.0


def test_draft_with_another_tokenizer_is_one_line(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from finetune.grpo import main
    from lmforge.tokenizer import train_tokenizer

    other = train_tokenizer([f"record {i} of another corpus" for i in range(200)], vocab_size=300)
    draft = _draft_model(tmp_path / "other", other, 300, seed=2)
    run = tmp_path / "run"
    code = main(grpo_args(setup, run, "--train.steps=1", f"--rollout.draft={draft}"))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "rollout.draft" in lines[0] and "tokenizer" in lines[0], lines[0]
    assert not list(run.glob("step-*")), "a checkpoint was written"


def test_speculative_benchmark_smoke(bench_smoke: tuple[subprocess.Popen[str], Path]) -> None:
    """bench/generate.py --draft on a given pair (the task policy and the small draft model),
    without the GRPO timing: it writes its record and its equality checks pass."""
    proc, out = bench_smoke
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    record = json.loads(out.read_text())["speculative"]
    assert record["checks"]["passed"], record["checks"]
    for side in ("plain", "draft_model", "draft_ngram", "hf_plain", "hf_assisted"):
        assert record[side]["new_tokens_per_s"] > 0
    assert 0.0 <= record["draft_model"]["acceptance"] <= 1.0
