"""Smoke test of the benchmarks: bench/train.py and bench/generate.py run on the debug preset,
write their results file, and their correctness checks pass. Timings are not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from stagerun import REPO, stage_env

COMMON = ["--model", "debug", "--threads", "1", "--peak-size", "256"]
TRAIN = ["--seq-len", "32", "--micro-batch", "2", "--steps", "2", "--warmup", "1"]
GENERATE = ["--batch", "2", "--prompt-len", "8", "--new-tokens", "8", "--repeats", "1"]
GENERATE += ["--greedy-prompts", "2", "--greedy-tokens", "8"]


def test_benchmarks_write_their_figures_and_pass_their_checks(tmp_path: Path) -> None:
    jobs = {  # in parallel, each with its own results file
        name: subprocess.Popen(
            [
                sys.executable,
                str(REPO / "bench" / f"{name}.py"),
                *COMMON,
                *args,
                "--out",
                str(tmp_path / f"{name}.json"),
            ],
            cwd=REPO,
            env=stage_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, args in (("train", TRAIN), ("generate", GENERATE))
    }
    for name, job in jobs.items():
        log, _ = job.communicate(timeout=300)
        assert job.returncode == 0, f"{name}:\n{log[-3000:]}"
        assert "ratio lmforge / baseline" in log
    record = json.loads((tmp_path / "train.json").read_text())
    assert {"torch", "deepspeed", "transformers"} <= set(record["versions"])
    assert record["date"]

    train = record["train"]
    assert train["shape"]["preset"] == "debug" and train["shape"]["seq_len"] == 32
    assert train["shape"]["flops_per_token"] > 6 * train["shape"]["matmul_parameters"]
    for side in ("baseline", "lmforge"):
        assert train[side]["tokens_per_s"] > 0 and len(train[side]["all_s"]) == 2
        assert train[side]["mfu_measured"] > 0
    assert train["ratio"] > 0 and train["peak_flops"]["measured"] > 0
    check = train["loss_check"]
    assert check["passed"] and check["abs_diff"] <= check["tolerance"]

    gen = json.loads((tmp_path / "generate.json").read_text())["generate"]
    assert (gen["shape"]["batch"], gen["shape"]["new_tokens"]) == (2, 8)
    for side in ("baseline", "lmforge"):
        assert gen[side]["new_tokens_per_s"] > 0
    assert gen["ratio"] > 0
    assert gen["greedy_check"]["passed"] and gen["greedy_check"]["share_tokens_equal"] == 1.0
