"""The batch plan: train.micro_batch_size is the most one process runs at once, the accumulation
follows from train.global_batch_size and the process count, and only an impossible split is an
error (naming the keys and a working value) raised while the config loads, before any data is
prepared. Every stage plans the same way (GRPO in whole groups, PPO in prompts), and a resume
on another process count changes the plan, not the run's global batch."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from stagerun import losses, run_stage, spawn_group, stage_env, tiny_pretrain_args, wait_group

from lmforge.batching import BatchPlan, eval_chunks, plan_batch
from lmforge.config import load_config
from lmforge.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("global_batch", "micro_max", "world", "micro", "accum"),
    [
        (16, 16, 1, 16, 1),  # the demo config on one process
        (16, 16, 2, 8, 1),  # ... on two: the micro-batch is lowered, nothing to compute
        (16, 8, 2, 8, 1),
        (16, 4, 2, 4, 2),  # a smaller ceiling: accumulation makes up the rest
        (16, 5, 1, 4, 4),  # the largest micro-batch at most 5 that divides the share of 16
        (24, 16, 3, 8, 1),
        (12, 16, 4, 3, 1),
        (7, 3, 1, 1, 7),  # a prime share: one row per pass
    ],
)
def test_the_plan_splits_the_global_batch(
    global_batch: int, micro_max: int, world: int, micro: int, accum: int
) -> None:
    plan = plan_batch(global_batch, micro_max, world)
    assert (plan.micro, plan.accum) == (micro, accum)
    assert plan.world * plan.micro * plan.accum == global_batch
    assert plan.micro <= micro_max


def test_the_plan_in_words() -> None:
    plan = plan_batch(16, 16, 2)
    assert plan.describe() == "batch: global 16 = 2 processes × micro 8 × accum 1"
    one = BatchPlan(64, 1, 32, 2, unit="prompts")
    assert one.describe() == "batch: global 64 prompts = 1 process × micro 32 × accum 2"


def test_an_impossible_split_names_the_key_and_a_working_value() -> None:
    with pytest.raises(ConfigError) as err:
        plan_batch(16, 8, 3)
    assert str(err.value) == (
        "train.global_batch_size: 16 does not split over 3 processes; use a multiple of 3, "
        "e.g. train.global_batch_size=15"
    )
    with pytest.raises(ConfigError, match="group_size=8"):
        plan_batch(60, 32, 1, group=8, group_key="group_size")
    with pytest.raises(ConfigError) as err:  # 8 groups of 8 do not split over 3 processes
        plan_batch(64, 32, 3, group=8, group_key="group_size")
    assert str(err.value) == (
        "train.global_batch_size: 64 does not split over 3 processes × group_size=8; use a "
        "multiple of 24, e.g. train.global_batch_size=72"
    )


def stage_config(script: str, world: int, monkeypatch: pytest.MonkeyPatch, *overrides: str):
    """The example config of a stage, loaded (and validated) as `world` processes would."""
    from finetune import dpo, grpo, ppo, reward, sft
    from pretrain import train

    classes = {
        "pretrain": (train.PretrainConfig, "configs/pretrain/demo.yaml"),
        "sft": (sft.SFTConfig, "configs/finetune/sft.yaml"),
        "reward": (reward.RewardConfig, "configs/finetune/reward.yaml"),
        "dpo": (dpo.DPOConfig, "configs/finetune/dpo.yaml"),
        "grpo": (grpo.GRPOConfig, "configs/finetune/grpo.yaml"),
        "ppo": (ppo.PPOConfig, "configs/finetune/ppo.yaml"),
    }
    cls, path = classes[script]
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    return load_config(cls, REPO / path, list(overrides))


@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "dpo", "grpo", "ppo"])
@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_every_example_config_plans_on_common_process_counts(
    stage: str, world: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = stage_config(stage, world, monkeypatch)
    plan = cfg.batch_plan(world)
    train = cfg.train
    assert plan.world * plan.micro * plan.accum == train.global_batch_size
    assert plan.micro <= train.micro_batch_size
    if stage == "grpo":  # whole groups on every process
        assert plan.per_rank % cfg.group_size == 0
    assert plan.unit == {"grpo": "sequences", "ppo": "prompts"}.get(stage, "")


def test_grpo_and_ppo_refuse_what_does_not_split(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"× group_size=8; use a multiple of 24, e\.g\. "):
        stage_config("grpo", 3, monkeypatch)
    with pytest.raises(ConfigError, match=r"global_batch_size: 64 does not split over 3 "):
        stage_config("ppo", 3, monkeypatch)
    with pytest.raises(ConfigError, match=r"not a multiple of group_size=8"):
        stage_config("grpo", 1, monkeypatch, "--train.global_batch_size=60")


def test_an_impossible_split_fails_before_any_data_is_prepared(tmp_path: Path) -> None:
    """Three processes cannot share the demo's 16 sequences: one error line at once, nothing
    written (no run directory, no data cache), whatever the launcher would have started."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    env = {**stage_env(), "WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "pretrain/train.py"),
            "--config",
            "configs/pretrain/demo.yaml",
            f"--run_dir={run_dir}",
            f"--data.cache_dir={cache}",
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "error: train.global_batch_size: 16 does not split over 3 processes; use a multiple "
        "of 3, e.g. train.global_batch_size=15"
    ]
    assert not run_dir.exists() and not cache.exists()


@pytest.mark.slow
def test_resume_on_more_processes_changes_the_plan_not_the_global_batch(tmp_path: Path) -> None:
    """micro_batch_size = global_batch_size = 8: one process runs 8 at once; resumed on two,
    each runs 4 (the plan is printed, no setting is reported changed) and the losses continue
    where the uninterrupted one-process run's go: the same 8 sequences make every step."""
    cache = tmp_path / "cache"

    def args(run_dir: Path) -> list[str]:
        base = tiny_pretrain_args(run_dir, cache, steps=4, save_every=2)
        return [*base, "--train.micro_batch_size=8", "--engine.zero_stage=2"]

    full = tmp_path / "full"
    out = run_stage("pretrain/train.py", args(full)).stdout
    assert "batch: global 8 = 1 process × micro 8 × accum 1" in out
    grown = tmp_path / "grown"
    extra = [f"--resume={full / 'step-000002'}"]
    procs = spawn_group("pretrain/train.py", args(grown) + extra, nproc=2, log_dir=tmp_path / "l")
    codes = wait_group(procs)
    log = (tmp_path / "l" / "rank0.log").read_text()
    assert codes == [0, 0], log[-3000:]
    assert "batch: global 8 = 2 processes × micro 4 × accum 1" in log
    assert log.count("batch: global") == 1  # rank 0 only
    assert not re.search(r"resume: train\.", log)  # the config did not change
    ours, ref = losses(grown), losses(full)
    assert max(abs(ours[s] - ref[s]) for s in (3, 4)) < 1e-4, (ours, ref)


@pytest.mark.parametrize(
    ("rows", "world", "micro"), [(33, 2, 16), (1, 2, 8), (10, 3, 2), (0, 2, 4)]
)
def test_held_out_passes_are_the_same_on_every_rank(rows: int, world: int, micro: int) -> None:
    """Under ZeRO-3 every forward pass is collective: every rank runs as many as the busiest
    (stand-ins not counted), and every held-out row is counted exactly once."""
    chunks = [eval_chunks(rows, rank, world, micro) for rank in range(world)]
    assert len({len(c) for c in chunks}) == 1
    counted = sorted(i for c in chunks for idx, real in c if real for i in idx)
    assert counted == list(range(rows))
    assert all(0 < len(idx) <= micro for c in chunks for idx, _ in c)
