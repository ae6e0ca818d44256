"""`--dry-run` checks what a run would read: the resume point, init_from and reward_model, the
data's first records, reward functions on a sample, the batch plan. Every failure is one line of
one list on stderr (exit 2); stdout stays the resolved config YAML that launch/slurm/job.sh
parses; nothing is written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from stagerun import stage_env

from lmforge.cli import main

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
QUICK = ["--data.num_train=40", "--data.num_heldout=8", "--data.seq_len=64"]


@pytest.fixture(scope="module", autouse=True)
def _absent_run_dir(tmp_path_factory: pytest.TempPathFactory):
    """Where `dry` points run_dir when a test does not."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTEST_TMP_RUNS", str(tmp_path_factory.mktemp("absent")))
        yield


@pytest.fixture(scope="module")
def runs(task_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """task_base (a run directory whose checkpoint has a chat tokenizer), a reward checkpoint
    made from it, and an SFT run directory whose latest checkpoint is at step 5 of its run."""
    from lmforge.checkpoint import load_checkpoint, load_reward_model, save_checkpoint

    root = tmp_path_factory.mktemp("dry_run")
    model, tok, _ = load_checkpoint(task_base)
    reward, _, _ = load_reward_model(task_base, seed=0)
    save_checkpoint(root / "reward" / "step-000001", reward, tok, update_latest=True, step=1)
    save_checkpoint(root / "sft" / "step-000005", model, tok, update_latest=True, step=5)
    save_checkpoint(root / "bare" / "step-000001", model, update_latest=True, step=1)
    return {
        "base": task_base,
        "reward": root / "reward",
        "sft": root / "sft",
        "bare": root / "bare",
    }


def dry(capsys, stage: str, *args: str) -> tuple[int, str, list[str]]:
    """(exit code, stdout, the problem lines of stderr) of `lmforge STAGE --dry-run ARGS`; a
    run_dir that does not exist unless ARGS set one (the default may hold a real run)."""
    if not any(arg.startswith("--run_dir=") for arg in args):
        args = (f"--run_dir={Path(os.environ['PYTEST_TMP_RUNS']) / 'absent'}", *args)
    code = main([stage, "--dry-run", *args])
    out, err = capsys.readouterr()
    problems = [line.strip() for line in err.splitlines() if line.startswith("  ")]
    if code:
        assert re.search(r"^error: --dry-run found \d+ problems?:$", err, re.M), err
    return code, out, problems


def tree(path: Path) -> list[str]:
    """Every file under `path`, with its size and mtime: what 'nothing written' compares."""
    return sorted(
        f"{p.relative_to(path)} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in path.rglob("*")
    )


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ------------------------------------------------------------------------------ what passes


@pytest.mark.parametrize("stage", ["sft", "dpo", "grpo", "ppo"])
def test_a_valid_finetuning_config_passes_and_writes_nothing(stage, runs, tmp_path, capsys) -> None:
    target = tmp_path / "run"
    before = tree(runs["base"])
    args = [f"--init_from={runs['base']}", f"--run_dir={target}", *QUICK]
    args += [f"--reward_model={runs['reward']}"] if stage == "ppo" else []
    code, out, problems = dry(capsys, stage, *args)
    assert code == 0 and problems == []
    config = yaml.safe_load(out)  # the report is comments: stdout is still the config
    assert config["run_dir"] == str(target) and config["init_from"] == str(runs["base"])
    assert (
        re.search(r"^# batch: global 32 (\w+ )?= 1 process", out, re.M) and "# parameters:" in out
    )
    assert f"# checked: init_from {runs['base']} -> " in out
    assert "tokenizer" in out and "training and 8 held-out" in out
    if stage == "grpo":
        assert "# checked: rewards: a sample completion scores exact_answer 1" in out
    if stage == "ppo":
        assert f"# checked: reward_model {runs['reward']} -> " in out and "reward head" in out
    assert not target.exists() and tree(runs["base"]) == before


def test_user_reward_function_gets_a_sample_call(runs, tmp_path, capsys) -> None:
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text(
        "def length(prompts, completions, answers, tasks):\n"
        "    assert prompts[0].endswith('<|assistant|>\\n'), prompts\n"
        "    return [float(len(c)) for c in completions]\n"
    )
    code, out, problems = dry(
        capsys, "grpo", f"--init_from={runs['base']}", f"--run_dir={tmp_path / 'run'}", *QUICK,
        f"--rewards=[{{name: '{rewards}:length'}}]",
    )  # fmt: skip
    assert (code, problems) == (0, [])
    assert re.search(rf"# checked: rewards: a sample completion scores {rewards}:length \d", out)


# ----------------------------------------------------------------------- each failure alone


def test_missing_data_source(runs, tmp_path, capsys) -> None:
    missing = tmp_path / "chats.jsonl"
    code, _, problems = dry(
        capsys, "sft", f"--init_from={runs['base']}", f"--data.source={missing}", *QUICK[2:]
    )
    assert code == 2 and len(problems) == 1
    assert problems[0].startswith("data.source") and str(missing) in problems[0]
    assert "no such file" in problems[0]


def test_data_that_does_not_parse_names_the_record(runs, tmp_path, capsys) -> None:
    data = write_jsonl(
        tmp_path / "chats.jsonl",
        ['{"prompt": "Hi", "completion": "Hello"}', '{"prompt": "Hi", "completion": 3}'],
    )
    code, _, problems = dry(
        capsys, "sft", f"--init_from={runs['base']}", f"--data.source={data}", *QUICK[2:]
    )
    assert code == 2 and len(problems) == 1
    assert problems[0].startswith("data.source") and "record 1 (line 2)" in problems[0]


def test_pretraining_corpus_without_the_text_field(tmp_path, capsys) -> None:
    data = write_jsonl(tmp_path / "corpus.jsonl", ['{"body": "some text"}'])
    code, _, problems = dry(
        capsys, "pretrain", "--model=debug", "--data.seq_len=64", f"--data.source={data}"
    )
    assert code == 2 and len(problems) == 1
    assert "no text field 'text'" in problems[0] and "data.text_field" in problems[0]


def test_missing_init_from(tmp_path, capsys) -> None:
    code, out, problems = dry(capsys, "sft", f"--init_from={tmp_path / 'moved'}", *QUICK)
    assert code == 2 and len(problems) == 1
    assert problems[0].startswith("init_from: ") and "moved" in problems[0]
    assert "# parameters: unknown" in out and yaml.safe_load(out)["init_from"].endswith("moved")


def test_tokenizers_that_do_not_load(runs, tmp_path, capsys) -> None:
    code, _, problems = dry(capsys, "sft", f"--init_from={runs['bare']}", *QUICK)
    assert code == 2 and len(problems) == 1
    assert problems[0].startswith("init_from: ") and "no tokenizer files" in problems[0]
    code, _, problems = dry(
        capsys, "pretrain", "--model=debug", "--data.seq_len=64", f"--tokenizer.path={tmp_path}"
    )
    assert code == 2 and len(problems) == 1
    assert problems[0].startswith("tokenizer.path: ") and "no tokenizer in" in problems[0]


def test_missing_reward_model(runs, tmp_path, capsys) -> None:
    code, _, problems = dry(
        capsys, "ppo", f"--init_from={runs['base']}", f"--reward_model={tmp_path / 'rm'}", *QUICK
    )
    assert code == 2 and len(problems) == 1 and problems[0].startswith("reward_model: ")


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, offline (huggingface_hub read the variable at import: its
    copy is pointed there too)."""
    import huggingface_hub

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_hub_name_in_the_local_cache_resolves(runs, hub_cache, capsys) -> None:
    from test_architectures import add_to_hub_cache

    snapshot = add_to_hub_cache(hub_cache, "someone/tiny-chat", runs["base"] / "step-000000")
    code, out, problems = dry(capsys, "sft", "--init_from=someone/tiny-chat", *QUICK)
    assert (code, problems) == (0, [])
    assert f"# checked: init_from someone/tiny-chat -> {snapshot}: lm head" in out
    assert "# parameters: unknown" not in out


def test_hub_name_not_in_the_cache(runs, hub_cache, capsys) -> None:
    before = tree(hub_cache)
    hub = "--data.source=nobody/no-such-chats"
    code, _, problems = dry(capsys, "sft", f"--init_from={runs['base']}", hub, *QUICK[2:])
    assert code == 2 and len(problems) == 1
    assert problems[0].startswith("data.source: 'nobody/no-such-chats'")
    assert "not in the local Hugging Face cache" in problems[0]
    assert tree(hub_cache) == before  # looked only: nothing downloaded or created
    code, _, problems = dry(capsys, "sft", "--init_from=someone/not-cached", *QUICK)
    assert code == 2 and len(problems) == 1 and problems[0].startswith("init_from: ")
    assert "not in the local Hugging Face cache" in problems[0] and "hf download" in problems[0]


def test_reward_function_that_does_not_import(runs, capsys) -> None:
    code, _, problems = dry(
        capsys, "grpo", f"--init_from={runs['base']}", *QUICK,
        "--rewards=[{name: no_such_module:score}]",
    )  # fmt: skip
    assert code == 2 and len(problems) == 1
    assert problems[0].startswith("rewards[0].name: ") and "not found" in problems[0]


def test_reward_function_with_a_bad_result(runs, tmp_path, capsys) -> None:
    rewards = tmp_path / "bad_rewards.py"
    rewards.write_text(
        "def one(prompts, completions, answers, tasks):\n    print('chatter')\n    return 1.0\n"
    )
    spec = f"--rewards=[{{name: '{rewards}:one'}}]"
    code, out, problems = dry(capsys, "grpo", f"--init_from={runs['base']}", *QUICK, spec)
    assert code == 2 and len(problems) == 1
    assert "returned float, expected a list of 1 numbers" in problems[0]
    assert "chatter" not in out  # what the function printed stays off the YAML


def test_a_reward_function_that_hangs_is_stopped(runs, tmp_path, capsys) -> None:
    rewards = tmp_path / "slow_rewards.py"
    rewards.write_text(
        "import time\n\ndef slow(prompts, completions, answers, tasks):\n"
        "    time.sleep(60)\n    return [0.0] * len(completions)\n"
    )
    spec = f"--rewards=[{{name: '{rewards}:slow', timeout_s: 1}}]"
    code, _, problems = dry(capsys, "grpo", f"--init_from={runs['base']}", *QUICK, spec)
    assert code == 2 and len(problems) == 1
    assert problems[0].startswith("rewards: ") and "slow" in problems[0], problems


def test_several_failures_in_one_list(tmp_path, capsys) -> None:
    code, out, problems = dry(
        capsys, "grpo", f"--init_from={tmp_path / 'sft'}", f"--data.source={tmp_path / 'p.jsonl'}",
        "--rewards=[{name: no_such_module:score}]", "--train.global_batch_size=24",
        "--train.micro_batch_size=8",
    )  # fmt: skip
    assert code == 2
    assert [p.split(":")[0].split(" ")[0] for p in problems] == [
        "init_from",
        "data.source",
        "rewards[0].name",
    ], problems
    assert yaml.safe_load(out)["train"]["global_batch_size"] == 24


def test_a_run_too_large_for_this_machine_is_listed_with_the_rest(tmp_path, capsys) -> None:
    missing = tmp_path / "corpus.jsonl"
    code, _, problems = dry(
        capsys, "pretrain", "--model=7b", "--model.n_layers=320", "--data.seq_len=64",
        f"--data.source={missing}",
    )  # fmt: skip
    assert code == 2 and [p.split(" ")[0] for p in problems] == ["memory:", "data.source"]
    assert "this run needs at least" in problems[0] and "no such file" in problems[1]


# -------------------------------------------------------------------------- resumed runs


def test_a_resumed_run_does_not_read_a_moved_init_from(runs, tmp_path, capsys) -> None:
    """SFT resumes from run_dir/latest only; DPO also reads init_from (its reference model),
    so there a moved init_from is a problem even when resuming, and says why."""
    run = tmp_path / "sft"
    shutil.copytree(runs["sft"], run)
    before = tree(run)
    moved = tmp_path / "moved"
    code, out, problems = dry(
        capsys, "sft", f"--run_dir={run}", f"--init_from={moved}", "--train.steps=10", *QUICK
    )
    assert (code, problems) == (0, [])
    assert "# checked: resume: from" in out and "at step 5 of 10" in out
    assert "# checked: init_from: not read; the run resumes from" in out
    assert "# parameters: " in out and "unknown" not in out  # the run_dir's own checkpoint
    code, _, problems = dry(
        capsys, "dpo", f"--run_dir={run}", f"--init_from={moved}", "--train.steps=10", *QUICK
    )
    assert code == 2 and len(problems) == 1
    assert problems[0].startswith("init_from: ") and "reference model" in problems[0]
    assert tree(run) == before
    # PPO resumes its critic from the same step under critic/: missing, then there
    ppo = [f"--run_dir={run}", f"--init_from={runs['base']}", f"--reward_model={runs['reward']}"]
    code, _, problems = dry(capsys, "ppo", *ppo, "--train.steps=10", *QUICK)
    assert code == 2 and len(problems) == 1
    assert problems[0].startswith(f"resume: {run / 'critic' / 'step-000005'}: missing")
    shutil.copytree(runs["reward"] / "step-000001", run / "critic" / "step-000005")
    code, out, problems = dry(capsys, "ppo", *ppo, "--train.steps=10", *QUICK)
    assert (code, problems) == (0, [])
    assert f"# checked: resume {run / 'critic' / 'step-000005'}: reward head" in out


def test_a_finished_run_passes_and_job_sh_reads_it(runs, tmp_path) -> None:
    """What launch/slurm/job.sh's run_finished does: the stage's --dry-run in a subprocess,
    its stdout parsed as YAML by the script's own Python, for a finished run whose init_from
    has moved and for an unfinished one."""
    run = tmp_path / "sft"
    shutil.copytree(runs["sft"], run)
    script = (REPO / "launch" / "slurm" / "job.sh").read_text()
    body = script.split("\nrun_finished() {\n", 1)[1]
    assert "--dry-run)" in body.split("<<'EOF'", 1)[0]  # the function still reads a dry run
    reader = body.split("<<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    env = stage_env()
    for steps, finished in ((5, True), (8, False)):
        cmd = [sys.executable, "finetune/sft.py", f"--run_dir={run}", f"--train.steps={steps}"]
        cmd += [f"--init_from={tmp_path / 'moved'}", "--dry-run"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        parsed = subprocess.run(
            [sys.executable, "-"], input=reader, capture_output=True, text=True, cwd=REPO,
            env={**env, "LMFORGE_RESOLVED": proc.stdout}, timeout=120,
        )  # fmt: skip
        assert parsed.stdout.strip() == f"lmforge: {run} is at step 5 of {steps}", parsed.stderr
        assert parsed.returncode == (0 if finished else 1)
        if finished:
            assert "the run is finished and would only report it" in proc.stdout


def test_resume_never_with_checkpoints_is_a_problem(runs, tmp_path, capsys) -> None:
    run = tmp_path / "sft"
    shutil.copytree(runs["sft"], run)
    code, _, problems = dry(
        capsys, "sft", f"--run_dir={run}", f"--init_from={runs['base']}", "--resume=never", *QUICK
    )
    assert code == 2 and len(problems) == 1 and problems[0].startswith("resume: never")
