"""Elastic resume: a checkpoint written by 2 processes under ZeRO-2 or ZeRO-3 resumes on 1
process, and a 1-process checkpoint on 2, through the whole fp32 weights and optimizer state
read back from DeepSpeed's partitioned state (the checkpoint's one copy of it); the loss
continues where the uninterrupted run's goes (the global batches do not depend on the process
count)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from stagerun import losses, run_stage, spawn_group, tiny_pretrain_args, wait_group

pytestmark = pytest.mark.slow

STEPS = 6


def base(run_dir: Path, cache: Path) -> list[str]:
    return tiny_pretrain_args(run_dir, cache, steps=STEPS, save_every=3)


def run(run_dir: Path, cache: Path, *extra: str, nproc: int) -> str:
    """Run pretraining on nproc processes; its rank-0 output."""
    args = [*base(run_dir, cache), *extra]
    if nproc == 1:
        return run_stage("pretrain/train.py", args).stdout
    logs = run_dir.parent / f"{run_dir.name}-logs-{len(list(run_dir.parent.glob('*-logs-*')))}"
    procs = spawn_group("pretrain/train.py", args, nproc=nproc, log_dir=logs)
    assert wait_group(procs) == [0] * nproc, (logs / "rank0.log").read_text()[-3000:]
    return (logs / "rank0.log").read_text()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("elastic")


@pytest.fixture(scope="module")
def uninterrupted(root: Path) -> Path:
    """One process, ZeRO-2, all steps (checkpoints at 3 and 6)."""
    out = root / "full"
    run(out, root / "cache", "--engine.zero_stage=2", nproc=1)
    return out


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / f"step-{STEPS:06d}" / "model.safetensors")


def check_continues(resumed: Path, reference: Path) -> list[float]:
    ours, ref = losses(resumed), losses(reference)
    diffs = [abs(ours[step] - ref[step]) for step in range(4, STEPS + 1)]
    assert max(diffs) < 1e-4, (ours, ref)
    a, b = weights(resumed), weights(reference)
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=0)
    return diffs


@pytest.mark.parametrize(("saved", "resumed"), [(2, 2), (3, 1)])
def test_two_process_checkpoint_resumes_on_one(
    root: Path, uninterrupted: Path, saved: int, resumed: int
) -> None:
    out = root / f"zero{saved}"
    run(out, root / "cache", f"--engine.zero_stage={saved}", "--train.stop_at=3", nproc=2)
    assert (out / "latest").read_text().strip() == "step-000003"
    assert not list(out.rglob("consolidated")), "the optimizer state is stored once"
    log = run(out, root / "cache", f"--engine.zero_stage={resumed}", nproc=1)
    assert (
        f"resume: step 3 from {out / 'step-000003'} via whole fp32 weights and optimizer state, "
        f"re-sharded from 2 process(es), ZeRO-{saved} to 1 process(es), ZeRO-{resumed} "
        "(read from the engine shards)"
    ) in log
    diffs = check_continues(out, uninterrupted)
    print(f"ZeRO-{saved} x2 -> ZeRO-{resumed} x1: |loss - uninterrupted| at steps 4-6 = {diffs}")


def test_one_process_checkpoint_resumes_on_two(root: Path, uninterrupted: Path) -> None:
    out = root / "grow"
    source = uninterrupted / "step-000003"
    log = run(out, root / "cache", "--engine.zero_stage=3", f"--resume={source}", nproc=2)
    assert (
        f"resume: step 3 from {source} via whole fp32 weights and optimizer state, re-sharded "
        "from 1 process(es), ZeRO-2 to 2 process(es), ZeRO-3 (read from the engine shards)"
    ) in log
    diffs = check_continues(out, uninterrupted)
    print(f"ZeRO-2 x1 -> ZeRO-3 x2: |loss - uninterrupted| at steps 4-6 = {diffs}")
