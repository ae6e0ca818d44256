"""lm-evaluation-harness tasks during training (eval.harness_tasks): logged at every evaluation
on 1 and 2 processes with the same numbers, followed by train.keep_best, refused in one line
when unknown, and listed by `lmforge report` with a checkpoint's `lmforge eval` results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from stagerun import metrics, run_stage

from lmforge.checkpoint import read_pointer
from lmforge.config import load_config
from lmforge.errors import ConfigError
from lmforge.report import format_report, report_rows
from lmforge.stage import StageConfig

pytestmark = pytest.mark.slow
KEY = "harness/lmforge_chat_mc/acc"


PPL = "harness/my_ppl/word_perplexity"


@pytest.fixture(scope="module")
def own_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's task YAML over a local file of texts: perplexity, a number that moves with every
    weight (multiple-choice accuracy of a few examples saturates)."""
    folder = tmp_path_factory.mktemp("own_task")
    texts = ["Sort the digits of 4721.", "Reverse the word lamp.", "Add 12 and 30.", "4 < 9"]
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (folder / "my_ppl.yaml").write_text(
        "task: my_ppl\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
        "output_type: loglikelihood_rolling\ntest_split: test\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n"
    )
    return folder / "my_ppl.yaml"


def _args(base: Path, run: Path, *extra: str) -> list[str]:
    return [
        f"--init_from={base}",
        f"--run_dir={run}",
        "--data.num_train=32",
        "--data.num_heldout=4",
        "--data.seq_len=64",
        "--train.steps=2",
        "--train.global_batch_size=8",
        "--train.micro_batch_size=4",
        "--train.eval_every=1",
        "--train.save_every=1000",
        "--optim.lr=5e-3",
        "--optim.warmup_steps=1",
        "--eval.harness_tasks=[lmforge_chat_mc]",
        "--eval.harness_limit=8",
        "--eval.harness_batch_size=4",
        *extra,
    ]


def _harness(run: Path, key: str = KEY) -> dict[int, float]:
    return {r["step"]: r[key] for r in metrics(run) if key in r}


@pytest.fixture(scope="module")
def one(task_base: Path, own_task: Path, tmp_path_factory) -> tuple[Path, str]:
    run = tmp_path_factory.mktemp("harness") / "sft1"
    tasks = f"--eval.harness_tasks=[lmforge_chat_mc,{own_task}]"
    proc = run_stage("finetune/sft.py", _args(task_base, run, tasks, f"--train.keep_best={KEY}"))
    return run, proc.stdout + proc.stderr


def test_harness_metrics_at_every_evaluation_and_keep_best(one: tuple[Path, str]) -> None:
    run, out = one
    got = _harness(run)
    assert sorted(got) == [0, 1, 2], got  # before training, eval_every, the end
    assert all(0.0 <= v <= 1.0 for v in got.values())
    assert "harness lmforge_chat_mc/acc" in out  # the evaluation's console line
    # keep_best follows the harness metric, higher is better (auto: not a loss).
    best = read_pointer(run, "best")
    assert best is not None
    step = int(best.split("-")[1])
    assert got[step] == max(got[s] for s in (1, 2))
    meta = json.loads((run / best / "lmforge.json").read_text())
    assert meta["best"]["metric"] == KEY and meta["best"]["value"] == got[step]


def test_two_processes_give_the_same_numbers(task_base, own_task, one, tmp_path: Path) -> None:
    run = tmp_path / "sft2"
    tasks = f"--eval.harness_tasks=[lmforge_chat_mc,{own_task}]"
    run_stage("finetune/sft.py", _args(task_base, run, tasks), nproc=2, launcher="torchrun")
    assert _harness(run) == _harness(one[0])
    single, split = _harness(one[0], PPL), _harness(run, PPL)
    assert sorted(single) == [0, 1, 2] and single[2] < single[0], single  # it learns
    # Two processes sum the same gradients in another order: equal up to rounding.
    assert split == pytest.approx(single, rel=1e-4), (single, split)


def test_unknown_task_or_no_harness_is_refused_at_config_load(monkeypatch) -> None:
    # Every stage's config is a StageConfig: its eval section is checked as the config loads,
    # before a process group, data or a run directory exist (one line through run_entry).
    with pytest.raises(ConfigError, match=r"^eval\.harness_tasks: unknown task lmforge_chat_mcq;"):
        load_config(StageConfig, overrides=["--eval.harness_tasks=[lmforge_chat_mcq]"])
    with pytest.raises(ConfigError, match=r"^eval\.harness_tasks: nope/x\.yaml: no such task file"):
        load_config(StageConfig, overrides=["--eval.harness_tasks=[nope/x.yaml]"])
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # the harness not installed
    with pytest.raises(ConfigError, match=r"needs lm-evaluation-harness.*pip install"):
        load_config(StageConfig, overrides=["--eval.harness_tasks=[lmforge_chat_mc]"])


def test_report_lists_training_and_checkpoint_results(one: tuple[Path, str]) -> None:
    run = one[0]
    latest = run / read_pointer(run, "latest")
    record = {"tasks": ["lmforge_chat_gen"], "limit": 4, "chat": True,
              "results": {"lmforge_chat_gen": {"exact_match": 0.25}}}  # fmt: skip
    (latest / "eval").mkdir(exist_ok=True)
    (latest / "eval" / "lmforge_chat_gen.json").write_text(json.dumps(record))
    lines = format_report(report_rows([run])).splitlines()  # what `lmforge report RUN` prints
    trained = [ln for ln in lines if "harness lmforge_chat_mc acc" in ln]
    got = _harness(run)
    assert trained and f"{got[0]:.3f}" in trained[0] and f"{got[2]:.3f}" in trained[0], lines
    evaluated = [ln for ln in lines if "eval lmforge_chat_gen exact_match" in ln]
    assert evaluated and "0.250" in evaluated[0] and "eval/lmforge_chat_gen.json" in evaluated[0]
