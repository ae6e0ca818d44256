"""GRPO run for real: a known-answer toy, held-out accuracy raised on a verifiable task,
greedy rollouts equal under ZeRO-3 and ZeRO-0, and reward functions that fail are one clear
line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from stagerun import final_metrics, metrics, run_stage

pytestmark = pytest.mark.slow

COMMON = [
    "--data.num_train=400",
    "--data.num_heldout=12",
    "--data.seq_len=64",
    "--group_size=4",
    "--train.global_batch_size=32",
    "--train.micro_batch_size=8",
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


def test_toy_reward_is_driven_to_its_maximum(policy: Path, tmp_path: Path) -> None:
    """Reward = how many times '9' appears in 8 generated tokens (digits are single tokens)."""
    run = tmp_path / "toy"
    run_stage(
        "finetune/grpo.py",
        [
            *COMMON,
            f"--init_from={policy}",
            f"--run_dir={run}",
            "--rewards=[{name: 'contains:9', weight: 1.0}]",
            "--beta=0",
            "--optim.lr=3e-3",
            "--train.steps=30",
        ],
    )
    rewards = [r["reward"] for r in metrics(run) if "reward" in r]
    assert rewards[0] < 2.0
    assert max(rewards[-3:]) >= 0.9 * 8, rewards


def test_raises_heldout_accuracy_on_a_verifiable_task(policy: Path, tmp_path: Path) -> None:
    """GRPO with the exact-answer reward on the counting task: the accuracy of sampled answers
    (the rollout temperature, a fixed seed) to held-out prompts rises well above the SFT
    policy's, and greedy accuracy does not fall."""
    run = tmp_path / "count"
    run_stage(
        "finetune/grpo.py",
        [
            *COMMON,
            f"--init_from={policy}",
            f"--run_dir={run}",
            "--data.tasks=[count]",
            "--data.num_train=1000",
            "--data.num_heldout=100",
            "--group_size=8",
            "--train.global_batch_size=64",
            "--train.micro_batch_size=64",
            "--train.steps=30",
            "--tracking.log_every=5",
            "--beta=0",
            "--optim.lr=1e-3",
        ],
    )
    end = final_metrics(run)
    before, after = end["eval_before/reward"], end["eval/reward"]
    print(f"held-out sampled accuracy {before:.3f} -> {after:.3f}")
    assert after > before + 0.08, (before, after)
    assert end["eval/accuracy"] >= end["eval_before/accuracy"] - 0.02


def _samples(run: Path) -> list[dict]:
    lines = (run / "samples.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["step"] == 0]


def test_greedy_rollouts_equal_under_zero3_and_zero0(policy: Path, tmp_path: Path) -> None:
    runs = {}
    for zero, nproc, launcher in ((0, 1, "python"), (3, 2, "torchrun")):
        run = tmp_path / f"zero{zero}"
        run_stage(
            "finetune/grpo.py",
            [
                *COMMON,
                f"--init_from={policy}",
                f"--run_dir={run}",
                f"--engine.zero_stage={zero}",
                "--train.steps=2",
                "--optim.lr=1e-3",
            ],
            nproc=nproc,
            launcher=launcher,
        )
        runs[zero] = run
    a, b = _samples(runs[0]), _samples(runs[3])
    assert len(a) == 12 and a == b
    end = [r for r in metrics(runs[3]) if "kl" in r]
    assert end and all(r["kl"] >= 0 for r in end)  # the reference is in use under ZeRO-3


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("return [1.0]", "returned 1 values for"),
        ("return [float('nan')] * len(completions)", "nan"),
        ("raise RuntimeError('boom')", "boom"),
    ],
)
def test_bad_reward_function_is_one_line(
    policy: Path, tmp_path: Path, body: str, needle: str
) -> None:
    module = tmp_path / "myreward.py"
    module.write_text(f"def score(prompts, completions, answers, tasks):\n    {body}\n")
    proc = run_stage(
        "finetune/grpo.py",
        [
            *COMMON,
            f"--init_from={policy}",
            f"--run_dir={tmp_path / 'run'}",
            "--train.steps=1",
            f"--rewards=[{{name: '{module}:score'}}]",
        ],
        check=False,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-2000:]
    assert "score" in errors[0] and needle in errors[0].lower(), errors[0]
    assert "Traceback" not in proc.stderr


def test_extra_record_fields_reach_the_reward_function(policy: Path, tmp_path: Path) -> None:
    """A user's prompt records carry a `tests` field; a reward function that names `tests`
    receives, for every completion, the tests of the record its prompt came from."""
    data = tmp_path / "prompts.jsonl"
    records = [
        {"prompt": f"Count to {i}.", "completion": str(i), "tests": [str(i)]} for i in range(40)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    seen = tmp_path / "seen.jsonl"
    module = tmp_path / "graded.py"
    module.write_text(
        "import json\n"
        "def passes(prompts, completions, answers, tasks, tests):\n"
        f"    with open({str(seen)!r}, 'a') as f:\n"
        "        f.write(json.dumps({'answers': answers, 'tests': tests}) + '\\n')\n"
        "    return [float(c.strip() in t) for c, t in zip(completions, tests)]\n"
    )
    run_stage(
        "finetune/grpo.py",
        [
            *COMMON,
            f"--init_from={policy}",
            f"--run_dir={tmp_path / 'run'}",
            f"--data.source={data}",
            "--data.tasks=[]",
            f"--rewards=[{{name: '{module}:passes'}}]",
            "--train.steps=2",
            "--optim.lr=1e-4",
        ],
    )
    calls = [json.loads(line) for line in seen.read_text().splitlines()]
    assert calls, "the reward function was never called"
    for call in calls:
        assert call["tests"] == [[a] for a in call["answers"]], call
