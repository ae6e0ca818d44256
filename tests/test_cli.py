"""The `lmforge` command: sample and inspect a checkpoint; errors are one line."""

from __future__ import annotations

import json

import pytest
from conftest import small_config

from lmforge.checkpoint import save_checkpoint
from lmforge.cli import main
from lmforge.model import build_model
from lmforge.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("cli")
    texts = [f"The value {i} is stored in slot {i % 7} of the table." for i in range(300)]
    tok = train_tokenizer(texts, vocab_size=300)
    model = build_model(small_config(vocab_size=300), seed=0)
    save_checkpoint(
        root / "step-000007",
        model,
        tok,
        update_latest=True,
        stage="pretrain",
        step=7,
        metrics={"eval/causal/loss": 3.5},
    )
    return root


def test_inspect_reports_stage_step_and_verifies(run_dir, capsys) -> None:
    assert main(["inspect", str(run_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["stage"] == "pretrain" and info["step"] == 7 and info["verified"]
    assert info["metrics"]["eval/causal/loss"] == 3.5 and info["model_type"] == "llama"


def test_sample_is_seeded_and_greedy_is_deterministic(run_dir, capsys) -> None:
    args = ["sample", str(run_dir), "--prompt", "The value", "--max-new-tokens", "8"]
    assert main([*args, "--temperature", "0"]) == 0
    first = capsys.readouterr().out
    assert main([*args, "--temperature", "0"]) == 0
    assert capsys.readouterr().out == first and first.startswith("The value")


def test_missing_checkpoint_is_one_line(tmp_path, capsys) -> None:
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "nope" in err and "\n" not in err
