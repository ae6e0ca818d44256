"""`lmforge eval`: lm-evaluation-harness in-process on lmforge models, the shipped local tasks
(their numbers equal lmforge's own evaluation of the same data), task YAML paths, a user's own
files, 1 and 2 processes, and the one-line message without the harness."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from stagerun import REPO, run_stage, stage_env

from lmforge.checkpoint import load_checkpoint, resolve_checkpoint
from lmforge.data.chat_datasets import PromptDataset
from lmforge.data.tasks import preference_pairs, task_examples
from lmforge.harness.files import evaluate_file, pair_scores
from lmforge.harness.run import run_harness
from lmforge.stage import exact_match

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
EXAMPLES = 24  # held-out examples of the shipped chat tasks in these tests


@pytest.fixture(scope="module")
def policy(task_policy: Path) -> tuple[torch.nn.Module, object]:
    model, tok, _ = load_checkpoint(task_policy)
    return model, tok


def test_shipped_chat_tasks_equal_lmforge_own_evaluation(policy) -> None:
    model, tok = policy
    got = run_harness(
        model,
        tok,
        ["lmforge_chat_gen", "lmforge_chat_mc"],
        chat=True,
        metadata={"examples": EXAMPLES},
    )
    # SFT's held-out exact match: greedy answers of the same prompts, the same check.
    prompts = PromptDataset(task_examples("heldout", EXAMPLES, 0), tok, model.cfg.max_seq_len)
    own = exact_match(model, prompts, tok, 16)
    assert got["lmforge_chat_gen"]["exact_match"] == pytest.approx(own["all"], abs=1e-12)
    # DPO's "policy prefers chosen": summed answer log-probs of both chats, end of turn included.
    pairs = pair_scores(model, tok, preference_pairs("heldout", EXAMPLES, 0))
    assert got["lmforge_chat_mc"]["acc"] == pytest.approx(pairs["logprob_accuracy"], abs=1e-12)
    assert own["all"] > 0.0 and pairs["logprob_accuracy"] > 0.5  # a tuned policy: not noise


def _documents(tmp_path: Path, tok) -> Path:
    """Text records, two of them longer than the model's 128 positions (several windows)."""
    sentence = "the quick brown fox jumps over the lazy dog while numbers 12 and 345 add up"
    words = sentence.split()
    docs = [" ".join(words[: 3 + i]) for i in range(5)]
    docs += [" ".join(words * 12), " ".join(reversed(words * 20))]
    assert max(len(tok.encode(d)) for d in docs) > 2 * 128
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def test_task_yaml_path_and_own_file_give_the_same_perplexity(policy, tmp_path: Path) -> None:
    model, tok = policy
    docs = _documents(tmp_path, tok)
    task = tmp_path / "mytasks" / "my_ppl.yaml"  # a user's task over a local JSON-lines file
    task.parent.mkdir()
    task.write_text(
        "task: my_ppl\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {docs}\n"
        "output_type: loglikelihood_rolling\ntest_split: test\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )
    harness = run_harness(model, tok, [str(task.parent)])["my_ppl"]
    # lmforge's own path: the model's own loss over the same windows, no harness involved.
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    own = evaluate_file(model, tok, str(docs), prefix_id=bos)
    for metric in ("word_perplexity", "bits_per_byte"):
        assert harness[metric] == pytest.approx(own[metric], rel=1e-5), metric


def test_shipped_corpus_task_equals_own_perplexity(policy, tmp_path: Path) -> None:
    from lmforge.harness.tasks.lmforge_tasks import corpus_validation

    model, tok = policy
    meta = {"cache_dir": str(tmp_path / "cache")}
    harness = run_harness(model, tok, ["lmforge_corpus"], limit=3, metadata=meta)
    docs = corpus_validation(**meta)["test"]["text"][:3]
    file = tmp_path / "val.jsonl"
    file.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    own = evaluate_file(model, tok, str(file), prefix_id=bos)
    got = harness["lmforge_corpus"]
    assert got["bits_per_byte"] == pytest.approx(own["bits_per_byte"], rel=1e-5)
    assert got["word_perplexity"] == pytest.approx(own["word_perplexity"], rel=1e-5)


def _eval(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess[str]:
    launcher = "torchrun" if nproc > 1 else "python"
    return run_stage("lmforge/cli.py", ["eval", *args], nproc=nproc, launcher=launcher)


def test_cli_on_one_and_two_processes_writes_results_into_the_checkpoint(
    task_policy: Path, tmp_path: Path
) -> None:
    args = [str(task_policy), "--tasks", "lmforge_chat_mc", "--chat", "--limit", "12"]
    one = _eval(args)
    ckpt = resolve_checkpoint(task_policy)
    written = ckpt / "eval" / "lmforge_chat_mc.json"
    first = json.loads(written.read_text())
    assert "eval done" in one.stdout and first["processes"] == 1
    _eval(args, nproc=2)
    second = json.loads(written.read_text())
    assert second["processes"] == 2
    assert second["results"] == first["results"]  # the same numbers however the work is split
    shown = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "inspect", str(task_policy)],
        env=stage_env(), capture_output=True, text=True, cwd=REPO, check=True,
    )  # fmt: skip
    listed = json.loads(shown.stdout)["eval"]["lmforge_chat_mc.json"]
    assert listed == first["results"]


def test_own_answer_file_scores_exact_match_and_a_reward_function(policy, tmp_path: Path) -> None:
    model, tok = policy
    records = task_examples("heldout", 10, 3)
    file = tmp_path / "answers.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in records))
    got = evaluate_file(model, tok, str(file), max_new_tokens=16, reward_fn="exact_answer")
    own = exact_match(model, PromptDataset(records, tok, model.cfg.max_seq_len), tok, 16)
    assert got["exact_match"] == pytest.approx(own["all"])
    assert got["records"] == 10 and "reward" in got


def test_without_the_harness_one_line_says_how_to_install_it(task_policy: Path) -> None:
    code = (
        "import sys; sys.modules['lm_eval'] = None\n"  # makes `import lm_eval` fail
        "from lmforge.cli import main\n"
        f"sys.exit(main(['eval', {str(task_policy)!r}, '--tasks', 'lmforge_chat_mc']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=stage_env(), capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install" in lines[0] and "lmforge[eval]" in lines[0], lines


def test_own_preference_file_scores_pairs_by_a_reward_model(task_policy: Path, tmp_path) -> None:
    from lmforge.checkpoint import load_reward_model, save_checkpoint
    from lmforge.data.chat_datasets import PreferenceDataset
    from lmforge.errors import ConfigError

    model, tok, _ = load_checkpoint(task_policy)
    records = preference_pairs("heldout", 8, 5)
    file = tmp_path / "pairs.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ConfigError, match="not a reward model"):  # a language model: refused
        evaluate_file(model, tok, str(file), reward_model=str(task_policy))
    reward = tmp_path / "reward" / "step-000001"  # a reward checkpoint: the policy + a score head
    scorer = load_reward_model(task_policy, seed=3)[0]
    save_checkpoint(reward, scorer, tok, update_latest=True, stage="reward", step=1, head="reward")
    got = evaluate_file(model, tok, str(file), reward_model=str(reward.parent))
    # The same reward model on one pair at a time: padding and batching change no score.
    data = PreferenceDataset(records, tok, model.cfg.max_seq_len)
    wins = 0
    for i in range(len(data)):
        b = data.get_batch([i])
        with torch.no_grad():
            chosen = scorer(input_ids=b["chosen_ids"], last_index=b["chosen_last"])
            rejected = scorer(input_ids=b["rejected_ids"], last_index=b["rejected_last"])
        wins += int(chosen.item() > rejected.item())
    assert got["pairs"] == 8 and got["reward_accuracy"] == pytest.approx(wins / 8)
