"""Numerical faults: non-finite losses and gradients are skipped without touching weights or
optimizer state on every ZeRO stage and precision (all ranks agreeing), N in a row roll back to
the last checkpoint with the offending batches skipped, loss spikes follow the same policy, and
every event is logged. The policy itself (lmforge.faults) is also tested without DeepSpeed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from stagerun import metrics, run_stage, spawn_group, wait_group

from lmforge.engine import EngineStateFiles
from lmforge.faults import DivergenceError, FaultConfig, FaultMonitor

pytestmark = pytest.mark.slow

PRETRAIN = [
    "--model=debug",
    "--tokenizer.vocab_size=512",
    "--data.source=builtin",
    "--data.max_documents=400",
    "--data.seq_len=64",
    "--train.steps=12",
    "--train.global_batch_size=8",
    "--train.micro_batch_size=4",
    "--train.eval_every=0",
    "--train.eval_batches=2",
    "--train.save_every=1",
    "--train.samples=0",
    "--optim.lr=3e-3",
    "--optim.warmup_steps=2",
    "--tracking.log_every=1",
    "--engine.zero_stage=2",
    "--faults.inject_nan_at_steps=[5, 6, 7]",
    "--faults.inject_spike_at_steps=[11]",
    "--faults.spike_window=4",
    "--faults.spike_warmup=8",
    "--faults.spike_zscore=8",
]


class Events:
    """The fault events of a run's metrics.jsonl."""

    def __init__(self, run: Path) -> None:
        self.records = metrics(run)
        self.all = [r for r in self.records if "event" in r]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.all if r["event"] == kind]


def pretrain(run: Path, cache: Path, *extra: str) -> Path:
    args = [*PRETRAIN, f"--data.cache_dir={cache}", f"--run_dir={run}", *extra]
    procs = spawn_group("pretrain/train.py", args, nproc=2, log_dir=run.parent / f"{run.name}-logs")
    assert wait_group(procs) == [0, 0], (run.parent / f"{run.name}-logs/rank0.log").read_text()
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two 2-process ZeRO-2 pretraining runs with NaN losses injected (on rank 0 only) at steps
    5-7 and a loss spike at step 11: one that only skips, one that rolls back after 3."""
    root = tmp_path_factory.mktemp("faults")
    return {
        "skip": pretrain(root / "skip", root / "cache", "--faults.max_consecutive=0"),
        "rollback": pretrain(root / "rollback", root / "cache", "--faults.max_consecutive=3"),
    }


def test_engine_skips_on_every_zero_stage_and_precision(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    procs = spawn_group(
        "tests/fault_engine_worker.py", [str(report)], nproc=2, log_dir=tmp_path / "logs"
    )
    assert wait_group(procs) == [0, 0], (tmp_path / "logs/rank0.log").read_text()[-4000:]
    results = json.loads(report.read_text())
    assert len(results) == 8
    for name, result in results.items():
        assert not result["normal1_skipped"] and not result["normal2_skipped"], name
        for mode in ("nan_loss", "nan_grad", "refuse"):
            assert result[mode] == {"skipped": True, "unchanged": True, "lr_advanced": True}, (
                name,
                mode,
            )
        assert result["after_skips_trains"], name
        assert result["consolidated_roundtrip"] and result["lr_restored"], name
        assert result["deepspeed_roundtrip"], name


def _same_files(a: Path, b: Path, name: str) -> bool:
    x, y = load_file(a / name), load_file(b / name)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_skipped_steps_leave_weights_and_optimizer_state_unchanged(runs: dict[str, Path]) -> None:
    run = runs["skip"]
    events = Events(run)
    assert [(e["step"], e["event"]) for e in events.all] == [
        (5, "skip"),
        (6, "skip"),
        (7, "skip"),
        (11, "skip"),
    ]
    assert "non-finite loss" in events.all[0]["detail"]
    assert "loss spike" in events.all[3]["detail"]
    for before, after in ((4, 5), (5, 6), (6, 7), (10, 11)):
        a, b = run / f"step-{before:06d}", run / f"step-{after:06d}"
        assert _same_files(a, b, "model.safetensors"), (before, after)
        # The optimizer state, read whole from each checkpoint's DeepSpeed shards.
        x, y = (EngineStateFiles(c / "deepspeed") for c in (a, b))
        for key in (None, "exp_avg", "exp_avg_sq"):
            assert all(torch.equal(x.tensor(n, key), y.tensor(n, key)) for n in x.names), key
        assert x.optimizer_step() == y.optimizer_step()
    assert not _same_files(run / "step-000007", run / "step-000008", "model.safetensors")
    last = [r for r in events.records if "loss" in r][-1]
    assert math.isfinite(last["loss"]) and last["faults/skipped"] == 4
    lrs = {r["step"]: r["lr"] for r in events.records if "lr" in r}
    assert lrs[5] < lrs[4] and lrs[6] < lrs[5]  # the schedule advances over skipped steps


def test_rollback_resumes_from_the_checkpoint_with_the_batches_skipped(
    runs: dict[str, Path],
) -> None:
    run = runs["rollback"]
    events = Events(run)
    kinds = [(e["step"], e["event"]) for e in events.all]
    assert kinds == [
        (5, "skip"),
        (6, "skip"),
        (7, "skip"),
        (7, "rollback"),
        (5, "skip"),
        (6, "skip"),
        (7, "skip"),
        (11, "skip"),
    ]
    rollback = events.of("rollback")[0]
    assert rollback["to_step"] == 4 and rollback["checkpoint"].endswith("step-000004")
    replay = events.all[4:7]
    assert all("skip list" in e["detail"] for e in replay)
    assert [e["cursor"] for e in replay] == [32, 40, 48]  # the offending batches, passed over
    meta = json.loads((run / "step-000012" / "lmforge.json").read_text())
    assert meta["faults"]["skip_batches"] == [32, 40, 48]
    assert meta["faults"]["rollbacks"] == 1 and meta["metrics"]["faults/rollbacks"] == 1
    # Going back and passing over the bad batches ends where skipping them did.
    assert _same_files(run / "step-000012", runs["skip"] / "step-000012", "model.safetensors")
    assert math.isfinite(meta["metrics"]["loss"])


def test_sft_rolls_back_with_a_lower_learning_rate_and_skips_a_spike(
    task_base: Path, tmp_path: Path
) -> None:
    run = tmp_path / "sft"
    run_stage(
        "finetune/sft.py",
        [
            f"--init_from={task_base}",
            f"--run_dir={run}",
            "--data.num_train=400",
            "--data.num_heldout=8",
            "--data.seq_len=64",
            "--train.steps=14",
            "--train.global_batch_size=8",
            "--train.micro_batch_size=4",
            "--train.eval_every=0",
            "--train.save_every=2",
            "--optim.lr=3e-3",
            "--optim.warmup_steps=0",
            "--optim.schedule=constant",
            "--tracking.log_every=1",
            "--faults.inject_nan_at_steps=[5, 6]",
            "--faults.max_consecutive=2",
            "--faults.lr_factor_on_rollback=0.5",
            "--faults.inject_spike_at_steps=[13]",
            "--faults.spike_window=4",
            "--faults.spike_warmup=8",
            "--faults.spike_zscore=8",
        ],
    )
    events = Events(run)
    assert [(e["step"], e["event"]) for e in events.all] == [
        (5, "skip"),
        (6, "skip"),
        (6, "rollback"),
        (5, "skip"),
        (6, "skip"),
        (13, "skip"),
    ]
    assert events.of("rollback")[0]["to_step"] == 4 and events.of("rollback")[0]["lr_scale"] == 0.5
    lrs = {r["step"]: r["lr"] for r in events.records if "lr" in r}
    assert lrs[4] == pytest.approx(3e-3) and lrs[14] == pytest.approx(1.5e-3)
    assert "loss spike" in events.all[-1]["detail"]
    final = [r for r in events.records if "loss" in r][-1]
    assert final["step"] == 14 and math.isfinite(final["loss"])


# -- the policy without DeepSpeed -----------------------------------------------------------


class Log:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)

    def log(self, step: int, record: dict[str, Any]) -> None:
        self.records.append({"step": step, **record})


def monitor(**cfg: Any) -> tuple[FaultMonitor, Log]:
    log = Log()
    return FaultMonitor(FaultConfig(**cfg), rank=0, world=1, tracker=log), log


def test_spike_needs_a_full_window_and_the_warmup() -> None:
    mon, _ = monitor(spike_window=4, spike_warmup=6, spike_zscore=3)
    for step in range(1, 7):  # noisy but spike-free; a spike before the warm-up passes
        loss = 5.0 + 0.1 * (-1) ** step if step != 2 else 50.0
        verdict = mon.judge(step, [loss])
        assert not verdict.skip, step
        mon.after_step(step, 8 * step, verdict, False)
    verdict = mon.judge(7, [9.0])
    assert verdict.skip and "spike" in verdict.reason and not verdict.rollback
    assert not mon.judge(8, [5.1]).skip


@pytest.mark.parametrize(
    ("policy", "skip", "rollback"), [("rollback", True, True), ("ignore", False, False)]
)
def test_spike_policies(policy: str, skip: bool, rollback: bool) -> None:
    mon, log = monitor(spike_window=3, spike_warmup=0, spike_zscore=3, spike_policy=policy)
    for step, loss in enumerate([5.0, 5.1, 4.9], start=1):
        mon.after_step(step, 0, mon.judge(step, [loss]), False)
    verdict = mon.judge(4, [20.0])
    assert (verdict.skip, verdict.rollback) == (skip, rollback)
    if policy == "ignore":
        assert log.records[-1]["event"] == "spike" and "ignored" in log.records[-1]["detail"]


def test_streak_rollback_skip_list_and_divergence() -> None:
    mon, log = monitor(max_consecutive=2, max_rollbacks=1, lr_factor_on_rollback=0.5)
    nan = mon.judge(3, [float("nan")])
    assert nan.skip and nan.reason == "non-finite loss"
    assert not mon.after_step(3, 16, nan, True)
    assert mon.after_step(4, 24, mon.judge(4, [float("inf")]), True)  # 2 in a row
    assert mon.streak_start(4) == 3
    mon.rolled_back(4, 2, "run/step-000002", {"window": [5.0]})
    assert mon.state.skip_batches == [16, 24] and mon.state.lr_scale == 0.5
    assert mon.known_bad(16) and mon.known_bad(24) and not mon.known_bad(32)
    saved = mon.state_dict()
    again = FaultMonitor(FaultConfig(), rank=0, world=1, tracker=Log(), state=saved)
    assert again.state_dict() == saved
    mon.after_step(5, 32, mon.judge(5, [float("nan")]), True)
    mon.after_step(6, 40, mon.judge(6, [float("nan")]), True)
    with pytest.raises(DivergenceError, match=r"faults\.max_rollbacks"):
        mon.rolled_back(6, 2, "run/step-000002", {})
    assert [r["event"] for r in log.records] == ["skip", "skip", "rollback", "skip", "skip"]


def test_injection_is_a_testing_aid_on_rank_zero() -> None:
    mon, _ = monitor(inject_nan_at_steps=[2], inject_spike_at_steps=[3])
    loss = torch.tensor(2.0)
    assert (
        mon.inject(1, loss) == 2.0
        and math.isnan(mon.inject(2, loss))
        and mon.inject(3, loss) == 20.0
    )
    other = FaultMonitor(FaultConfig(inject_nan_at_steps=[2]), rank=1, world=1, tracker=Log())
    assert other.inject(2, loss) == 2.0
