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


def test_peer_benchmark_smoke_has_both_sides_numbers(tmp_path: Path, task_base: Path) -> None:
    """bench/peer.py on one SFT pair of 2 steps: lmforge's and TRL's runs both finish, and the
    results file holds both sides' training time, wall time and quality (lmforge's own
    evaluation of each trained model), with the ratios."""
    out = tmp_path / "peer.json"
    data = ["--data.num_train=64", "--data.num_heldout=4", "--data.seq_len=64"]
    batch = ["--train.global_batch_size=4", "--train.micro_batch_size=4"]
    cmd = [sys.executable, str(REPO / "bench" / "peer.py"), "--stages", "sft", "--pairs", "1"]
    cmd += ["--steps", "2", "--noise", "0", "--init", str(task_base)]
    cmd += ["--work", str(tmp_path / "work"), "--out", str(out), *data, *batch]
    job = subprocess.run(cmd, cwd=REPO, env=stage_env(), capture_output=True, text=True)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "training time lmforge / TRL" in job.stdout
    sft = json.loads(out.read_text())["stages"]["sft"]
    assert len(sft["runs"]) == 1 and sft["train_ratio_median"] > 0
    for side in ("lmforge", "trl"):
        run = sft["runs"][0][side]
        assert run["train_seconds"] > 0 and run["wall_seconds"] > run["train_seconds"]
        assert run["cpu_seconds"] > 0
        assert 0 < run["quality"]["eval/loss"] < 20 and "eval/accuracy" in run["quality"]
    assert sft["trl"]["tokens_per_s_median"] > 0


def test_peer_benchmark_without_trl_says_how_to_install(tmp_path: Path) -> None:
    """Without TRL the peer benchmark prints one line naming the extra to install, exit 2."""
    shim = tmp_path / "trl"
    shim.mkdir()
    (shim / "__init__.py").write_text("raise ImportError('no trl here')\n")
    env = {**stage_env(), "PYTHONPATH": f"{tmp_path}:{REPO}"}
    job = subprocess.run(
        [sys.executable, str(REPO / "bench" / "peer.py"), "--out", str(tmp_path / "x.json")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert job.returncode == 2
    assert job.stderr.strip() == "bench/peer.py needs TRL: pip install lmforge[peer]"
    assert not (tmp_path / "x.json").exists()


# A benchmark (train or generate) run one side after the other with its baseline broken by
# `breaks`: prints the error and the records `save` got.
_BROKEN_BASELINE = """
import argparse, json, sys
sys.path.insert(0, "bench")
import generate, train
{breaks}
parser = argparse.ArgumentParser()
train.add_common_args(parser)
{module}.add_{module}_args(parser)
args = parser.parse_args(sys.argv[1:])
saved = []
try:
    {module}.run(args, show=False, save=saved.append)
except RuntimeError as err:
    print(json.dumps({{"error": str(err), "saved": saved}}))
"""


def _broken_baseline(module: str, breaks: str, args: list[str]) -> tuple[str, dict]:
    """The error and the one record saved before it: lmforge's side only, marked partial."""
    script = _BROKEN_BASELINE.format(module=module, breaks=breaks)
    job = subprocess.run(
        [sys.executable, "-c", script, *COMMON, *args, "--order", "sequential"],
        cwd=REPO,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert job.returncode == 0, job.stderr[-3000:]
    out = json.loads(job.stdout.strip().splitlines()[-1])
    (record,) = out["saved"]
    assert record["partial"] and "baseline" not in record and "ratio" not in record
    return out["error"], record


def test_one_side_after_the_other_saves_lmforge_before_the_baseline() -> None:
    """On a GPU the sides run one after the other, lmforge first, and its figures are saved
    before the baseline starts: a run stopped in the baseline still leaves them."""
    breaks = """
def broken(*args, **kwargs):
    raise RuntimeError("the baseline's compile ran out of time")
train.build_baseline = broken
"""
    error, record = _broken_baseline("train", breaks, TRAIN)
    assert error == "the baseline's compile ran out of time"
    assert record["lmforge"]["tokens_per_s"] > 0 and len(record["lmforge"]["all_s"]) == 2
    assert record["loss_check"] == {
        "lmforge": record["lmforge"]["first_loss"],
        "baseline": None,
        "passed": True,
    }


def test_generation_one_side_after_the_other_saves_lmforge_first() -> None:
    breaks = """
calls = []
def broken(*args, **kwargs):
    calls.append(1)
    if len(calls) > 2:  # the greedy check and the warm-up pass; the first timed run fails
        raise RuntimeError("transformers' compile ran out of time")
    return real(*args, **kwargs)
real, generate._hf = generate._hf, broken
"""
    error, record = _broken_baseline("generate", breaks, GENERATE)
    assert error == "transformers' compile ran out of time"
    assert record["lmforge"]["new_tokens_per_s"] > 0 and record["greedy_check"]["passed"]
    assert record["shape"]["order"] == "sequential"
