"""Training by epochs, the best checkpoint (train.keep_best), early stopping (train.early_stop)
and validation splits of one window or none: real stage runs on CPU, checked against their
metrics.jsonl, their checkpoints and an interrupted-and-resumed twin."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
from stagerun import metrics, run_stage

from lmforge.checkpoint import load_checkpoint, resolve_checkpoint
from lmforge.config import load_config
from lmforge.errors import CheckpointError, ConfigError
from lmforge.report import format_report, report_rows
from lmforge.rundir import apply_retention

PLANNED = re.compile(r"train\.epochs=(\S+): (\d+) training samples, (\d+) per step: (\d+) steps")
EARLY = re.compile(r"early stop: eval/loss has not improved for 2 evaluations .* at step (\d+)")


def _corpus(path: Path, docs: int = 40, words: int = 70) -> Path:
    """`docs` documents of `words` words drawn from 30 words: with a tokenizer trained on them,
    a word is one token, so a document is one window of 64 tokens and a held-out document one
    validation window."""
    rng = random.Random(0)
    vocab = [f"w{c}{d}" for c in "abcde" for d in "abcdef"]
    with open(path, "w") as f:
        for _ in range(docs):
            f.write(json.dumps({"text": " ".join(rng.choices(vocab, k=words))}) + "\n")
    return path


def _pretrain(run: Path, corpus: Path, cache: Path, *extra: str) -> str:
    args = [
        "--model=debug",
        "--tokenizer.vocab_size=512",
        f"--data.source={corpus}",
        "--data.seq_len=64",
        f"--data.cache_dir={cache}",
        "--train.steps=4",
        "--train.global_batch_size=8",
        "--train.micro_batch_size=8",
        "--train.eval_every=2",
        "--train.eval_batches=1",
        "--train.save_every=100",
        "--train.samples=2",
        "--train.sample_tokens=4",
        "--tracking.log_every=2",
        f"--run_dir={run}",
        *extra,
    ]
    proc = run_stage("pretrain/train.py", args)
    return proc.stdout + proc.stderr


def test_one_window_and_empty_validation_splits_train_and_save(tmp_path: Path) -> None:
    corpus, cache = _corpus(tmp_path / "corpus.jsonl"), tmp_path / "cache"
    # A tiny fraction holds out exactly one document: one window, fewer than train.samples=2.
    one = tmp_path / "one"
    out = _pretrain(one, corpus, cache, "--data.validation_fraction=1e-6")
    meta = json.loads((one / "step-000004" / "lmforge.json").read_text())
    assert meta["heldout"]["count"] == 1, meta["heldout"]
    evals = [r for r in metrics(one) if "eval/causal/loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(math.isfinite(r["eval/causal/loss"]) for r in evals)
    assert out.count("  sample: ") == 2  # one sample (the one window) per evaluation
    # No validation at all: training runs, saves, and says once that evaluation is skipped.
    none = tmp_path / "none"
    out = _pretrain(none, corpus, cache, "--data.validation_fraction=0")
    assert (none / "latest").read_text().strip() == "step-000004"
    assert out.count("no held-out data, so evaluation is skipped") == 1, out[-2000:]
    assert not any(k.startswith("eval/") for r in metrics(none) for k in r)


def _sft(run: Path, base: Path, *extra: str, check: bool = True) -> str:
    args = [
        f"--init_from={base}",
        f"--run_dir={run}",
        "--data.num_train=64",
        "--data.num_heldout=4",
        "--data.seq_len=64",
        "--answer_tokens=2",
        "--train.epochs=12",
        "--train.global_batch_size=8",
        "--train.micro_batch_size=8",
        "--train.eval_every=2",
        "--train.save_every=1000",
        "--train.keep_last=1",
        "--train.keep_best=eval/loss",
        "--train.early_stop=2",
        "--optim.lr=1e-2",  # high for tiny data: held-out loss falls, then rises
        "--optim.warmup_steps=2",
        "--tracking.log_every=1",
        *extra,
    ]
    proc = run_stage("finetune/sft.py", args, check=check)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _evals(run: Path) -> dict[int, float]:
    return {r["step"]: r["eval/loss"] for r in metrics(run) if "eval/loss" in r and r["step"] > 0}


def test_epochs_keep_best_early_stop_and_exact_resume(task_base: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    out = _sft(full, task_base)
    epochs, samples, per_step, steps = PLANNED.search(out).groups()  # type: ignore[union-attr]
    assert int(steps) == math.ceil(float(epochs) * int(samples) / int(per_step))
    logged = [r for r in metrics(full) if "epoch" in r]
    assert logged and all(r["epoch"] == pytest.approx(r["step"] * 8 / int(samples)) for r in logged)
    stopped = int(EARLY.search(out).group(1))  # type: ignore[union-attr]
    assert stopped < int(steps)  # stopped early, with its own checkpoint
    assert (full / "latest").read_text().strip() == f"step-{stopped:06d}"
    evals = _evals(full)
    best = min(evals, key=lambda s: evals[s])
    assert evals[stopped] > evals[best] and sorted(evals)[-3] == best  # two evaluations worse
    assert (full / "best").read_text().strip() == f"step-{best:06d}"
    # keep_last=1 deleted every other checkpoint but kept the best one.
    kept = sorted(p.name for p in full.glob("step-*"))
    assert kept == [f"step-{best:06d}", f"step-{stopped:06d}"]

    # The same run stopped right after the first evaluation without improvement, then resumed:
    # the patience count and best value carry over, so it stops at the same step, equally.
    first_bad = min(s for s in evals if s > best)
    twin = tmp_path / "twin"
    _sft(twin, task_base, f"--train.stop_at={first_bad}")
    assert (twin / "latest").read_text().strip() == f"step-{first_bad:06d}"
    out = _sft(twin, task_base)
    assert f"saved at step {stopped}" in out
    assert (twin / "best").read_text() == (full / "best").read_text()
    assert _evals(twin) == pytest.approx(evals, rel=1e-6, abs=0)
    # A run that stopped early is finished: starting it again trains nothing.
    out = _sft(twin, task_base)
    assert f"stopped early at step {stopped}" in out
    assert (twin / "latest").read_text().strip() == f"step-{stopped:06d}"

    # init_from: <run>/best is that step's checkpoint, weights and all.
    assert resolve_checkpoint(f"{full}/best") == full / f"step-{best:06d}"
    ours, _, _ = load_checkpoint(full / "best", with_tokenizer=False)
    ref, _, _ = load_checkpoint(full / f"step-{best:06d}", with_tokenizer=False)
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # lmforge report shows which step was best.
    assert f"step {best} (eval/loss {evals[best]:.3f})" in format_report(report_rows([full]))


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"../other/step-000001\n", "is a path"),
        (b".step-000001.partial", "hidden name"),
        (b"\xff\xfe", "binary bytes"),
        (b"step-000009", "not a checkpoint in"),
    ],
)
def test_bad_best_pointer_is_one_checkpoint_error(
    task_base: Path, tmp_path: Path, content: bytes, says: str
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "step-000000").symlink_to(task_base / "step-000000")
    (run / "best").write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape(says)) as err:
        load_checkpoint(run / "best")
    assert "\n" not in str(err.value) and str(run / "best") in str(err.value)


def test_missing_best_pointer_and_config_errors(task_base: Path) -> None:
    with pytest.raises(CheckpointError, match=r"best: no such file \(that run did not set"):
        resolve_checkpoint(task_base / "best")
    from finetune.sft import SFTConfig

    bad = {
        "--train.epochs=2": "train.epochs and train.steps: both set (2 epochs, 50 steps)",
        "--train.early_stop=3": "train.early_stop: needs train.keep_best",
        "--train.keep_best=loss": "train.keep_best: 'loss' is not an evaluation metric",
    }
    for arg, says in bad.items():
        with pytest.raises(ConfigError, match=re.escape(says)):
            load_config(SFTConfig, None, [arg, "--train.steps=50"])


def test_retention_never_deletes_the_best(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        ckpt = tmp_path / f"step-{step:06d}"
        ckpt.mkdir()
        (ckpt / "lmforge.json").write_text("{}")
        (ckpt / "config.json").write_text("{}")
    deleted = apply_retention(tmp_path, 1, 0, "step-000004", ("step-000002",))
    assert deleted == ["step-000001", "step-000003"]


@pytest.mark.parametrize("stage", ["dpo", "reward"])
def test_finetuning_without_held_out_records_trains_and_says_so(
    stage: str, task_base: Path, tmp_path: Path
) -> None:
    run = tmp_path / stage
    args = [f"--init_from={task_base}", f"--run_dir={run}", "--data.num_train=32"]
    args += ["--data.num_heldout=0", "--data.seq_len=64", "--train.steps=2", "--train.epochs=0"]
    args += ["--train.global_batch_size=8", "--train.micro_batch_size=8"]
    out = run_stage(f"finetune/{stage}.py", [*args, "--train.eval_every=1"])
    text = out.stdout + out.stderr
    assert text.count("no held-out data, so evaluation is skipped") == 1, text[-2000:]
    assert "not measured" in text
    assert (run / "step-000002" / "lmforge.json").is_file()
    assert not any(k.startswith("eval/") for m in metrics(run) for k in m)
