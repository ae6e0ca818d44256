"""PPO run for real: a known-answer toy, a learned reward model raising held-out reward under a
KL bound, two processes under ZeRO-2 and ZeRO-3 with loadable actor and critic checkpoints, and
an exact stop/resume."""

from __future__ import annotations

from pathlib import Path

import pytest
from stagerun import final_metrics, metrics, run_stage

from lmforge.checkpoint import load_checkpoint, load_reward_model
from lmforge.reward import RewardModel

pytestmark = pytest.mark.slow

COMMON = [
    "--data.num_train=400",
    "--data.num_heldout=12",
    "--data.seq_len=64",
    "--train.global_batch_size=32",
    "--train.micro_batch_size=16",
    "--train.eval_every=0",
    "--train.save_every=1000",
    "--optim.warmup_steps=0",
    "--optim.weight_decay=0",
    "--optim.schedule=constant",
    "--tracking.log_every=1",
    "--max_new_tokens=8",
]


@pytest.fixture(scope="module")
def policy(task_policy: Path) -> Path:
    """The shared short-SFT policy (tests/conftest.py)."""
    return task_policy


def _toy(policy: Path, run: Path, *extra: str) -> list[str]:
    return [
        *COMMON,
        f"--init_from={policy}",
        f"--run_dir={run}",
        "--reward_model=",
        f"--critic_from={policy}",
        "--rewards=[{name: 'contains:9', weight: 1.0}]",
        "--kl_coef=0.001",
        *extra,
    ]


def test_toy_reward_is_driven_to_its_maximum(policy: Path, tmp_path: Path) -> None:
    """Reward = how many times '9' appears in 8 generated tokens (digits are single tokens)."""
    run = tmp_path / "toy"
    run_stage("finetune/ppo.py", _toy(policy, run, "--optim.lr=3e-3", "--train.steps=30"))
    rewards = [r["reward"] for r in metrics(run) if "reward" in r]
    assert rewards[0] < 2.0
    assert max(rewards[-3:]) >= 0.9 * 8, rewards


@pytest.fixture(scope="module")
def reward_model(policy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reward model trained for 40 steps on the preference pairs, from the policy."""
    reward = tmp_path_factory.mktemp("reward") / "rm"
    run_stage(
        "finetune/reward.py",
        [
            f"--init_from={policy}",
            f"--run_dir={reward}",
            "--data.num_train=400",
            "--data.num_heldout=16",
            "--data.seq_len=64",
            "--train.steps=40",
            "--train.global_batch_size=16",
            "--train.micro_batch_size=16",
            "--train.eval_every=0",
            "--train.save_every=1000",
            "--optim.lr=1e-3",
        ],
    )
    return reward


def test_learned_reward_raises_heldout_reward_within_kl_bound(
    policy: Path, reward_model: Path, tmp_path: Path
) -> None:
    """PPO against the learned reward model: the mean reward of sampled answers to held-out
    prompts rises, and their KL to the SFT model stays under the adaptive controller's target."""
    run = tmp_path / "ppo"
    run_stage(
        "finetune/ppo.py",
        [
            *COMMON,
            f"--init_from={policy}",
            f"--run_dir={run}",
            f"--reward_model={reward_model}",
            "--data.num_train=1000",
            "--data.num_heldout=100",
            "--train.steps=30",
            "--train.global_batch_size=64",
            "--train.micro_batch_size=32",
            "--tracking.log_every=5",
            "--optim.lr=1e-3",
            "--adaptive_kl=true",
            "--kl_coef=0.2",
            "--kl_target=2",
            "--kl_horizon=500",
        ],
    )
    end = final_metrics(run)
    before, after, kl = end["eval_before/reward"], end["eval/reward"], end["eval/kl"]
    print(f"held-out reward {before:.3f} -> {after:.3f}, KL {kl:.3f}")
    assert after > before + 0.15, (before, after)
    assert 0 < kl < 2.0, kl


@pytest.mark.parametrize("zero", [2, 3])
def test_learned_reward_model_two_processes(
    zero: int, policy: Path, reward_model: Path, tmp_path: Path
) -> None:
    """Actor, critic, reference and scorer on 2 processes under ZeRO-2 and ZeRO-3: every step
    logs finite KL and value loss, and both checkpoints load in their formats."""
    reward = reward_model
    run = tmp_path / "ppo"
    run_stage(
        "finetune/ppo.py",
        [
            *COMMON,
            f"--init_from={policy}",
            f"--run_dir={run}",
            f"--reward_model={reward}",
            f"--engine.zero_stage={zero}",
            "--train.steps=3",
            "--optim.lr=1e-4",
        ],
        nproc=2,
        launcher="torchrun",
    )
    rows = [r for r in metrics(run) if "reward" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["kl"] == r["kl"] and r["value_loss"] >= 0 for r in rows)
    actor, tok, meta = load_checkpoint(run)
    assert actor.cfg.vocab_size == 400 and tok is not None
    assert meta["stage"] == "ppo" and meta["step"] == 3
    assert "kl_controller" in meta and "reward_moments" in meta
    critic, _, cmeta = load_reward_model(run / "critic")
    assert isinstance(critic, RewardModel) and cmeta["head"] == "reward"
    assert cmeta["step"] == 3


def test_stop_and_resume_is_exact(policy: Path, tmp_path: Path) -> None:
    extra = (
        "--optim.lr=1e-3",
        "--train.steps=4",
        "--normalise_rewards=true",
        "--adaptive_kl=true",
        "--train.seed=7",
    )
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_stage("finetune/ppo.py", _toy(policy, whole, *extra))
    run_stage("finetune/ppo.py", _toy(policy, split, *extra, "--train.stop_at=2"))
    assert not (split / "step-000004").exists() and (split / "critic" / "step-000002").is_dir()
    run_stage("finetune/ppo.py", _toy(policy, split, *extra))
    a = {r["step"]: r for r in metrics(whole) if "reward" in r}
    b = {r["step"]: r for r in metrics(split) if "reward" in r}
    for step in (3, 4):
        for key in ("reward", "loss", "value_loss", "kl", "kl_coef"):
            assert b[step][key] == pytest.approx(a[step][key], abs=1e-6), (step, key)
    # the resumed run's final checkpoint still holds the before-training evaluation
    before = {k: v for k, v in final_metrics(whole).items() if k.startswith("eval_before/")}
    assert before and final_metrics(split).items() >= before.items()
