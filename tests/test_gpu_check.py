"""The GPU check (`make gpu-check`, bench/gpu_check.py) before any GPU sees it: its CPU dry run
executes every step at the smallest sizes (the CUDA tests on the CPU), and its bounds hold (a
failed step skips what needs it, a hanging one is killed at its limit, the budget is never
overrun)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from stagerun import REPO, stage_env

sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # bench/ is not a package: imported from its folder
import steps


def test_cpu_dry_run_runs_every_step(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    job = subprocess.run(
        ["make", "-s", "gpu-check", f"GPU_CHECK_ARGS=--cpu-dry-run --out {out}"],
        cwd=REPO,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    names = [s.name for s in gpu_check.plan(out, dry=True)]
    assert list(summary["steps"]) == names and summary["dry_run"]
    assert all(r["status"] == "ok" for r in summary["steps"].values()), summary
    assert all((out / "logs" / f"{n}.log").stat().st_size > 0 for n in names)
    assert (
        (out / "check.log")
        .read_text()
        .splitlines()[-1]
        .startswith(f"gpu check: {len(names)}/{len(names)} steps ok")
    )
    # the CUDA tests ran their checks on the CPU, none skipped
    tests = (out / "logs" / "pytest_gpu.log").read_text().strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ passed in [\d.]+s", tests), tests
    env = json.loads((out / "env.json").read_text())
    assert env["device"] == "cpu" and env["torch"]
    loads = (out / "logs" / "hf_load.log").read_text()
    for stage in ("pretrain", "sft", "reward", "dpo", "grpo", "ppo"):
        assert f"{stage}: step-000002 loads in transformers" in loads
    train = json.loads((out / "bench" / "train_124m_zero2.json").read_text())["train"]
    assert train["loss_check"]["passed"]  # same first loss as transformers' Llama
    big = json.loads((out / "bench" / "train_7b_zero3_offload.json").read_text())["train"]
    assert big["shape"]["offload_optimizer"] and big["shape"]["activation_checkpointing"]
    assert "baseline" not in big and big["loss_check"]["passed"]  # every loss finite
    gen = json.loads((out / "bench" / "generate_124m.json").read_text())["generate"]
    assert gen["greedy_check"]["passed"] and gen["lmforge"]["new_tokens_per_s"] > 0
    # the verdict: every target has a measured row; the CPU meets no throughput target, the
    # 7b runs (debug-sized here) finish with finite losses
    report = json.loads((out / "report.json").read_text())
    met = {t["target"]: t["met"] for t in report["targets"]}
    assert list(met.values()) == [False, False, False, True, True], met
    assert "| target | goal | lmforge | baseline (same run) | met |" in job.stdout
    report_md = (out / "report.md").read_text()
    assert report_md.count("\n| ") >= 5 + len(names)
    assert "- train 124M, T=1024: lmforge profile (1 steps): device busy" in report_md
    profile = json.loads((out / "bench" / "train_124m_zero2.json").read_text())
    kinds = profile["train"]["lmforge"]["profile"]["kinds"]
    assert kinds["matmul"] > 0 and sum(kinds.values()) == pytest.approx(1.0)


def test_profile_kinds_name_gpu_kernels() -> None:
    import profiling

    names = {
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matmul",
        "nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_TNN": "matmul",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>": "attention",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop": "attention",
        "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>": "optimizer",
        "ncclDevKernel_AllReduce_Sum_bf16_RING_LL": "communication",
        "triton_poi_fused_add_mul_rsqrt_0": "other",
    }
    assert {n: profiling.kind(n) for n in names} == names


def test_report_names_what_was_not_measured_and_saves_records(tmp_path: Path) -> None:
    """A target whose step failed says so; --save copies every record under the device's
    name; a partial record (its step stopped after lmforge's side) gives lmforge's figure."""
    import gpu_report

    (tmp_path / "bench").mkdir()
    steps_ = {"train_1b_zero2_compile": {"status": "failed", "rc": 1}}
    (tmp_path / "summary.json").write_text(json.dumps({"steps": steps_}))
    record = {"device": "nvidia-h200", "shape": {}, "lmforge": {}, "baseline": {}}
    (tmp_path / "bench" / "train_124m_zero2.json").write_text(json.dumps({"train": record}))
    rows = {r.target: r for r in gpu_report.write_report(tmp_path)}
    assert rows["train 1B, T=2048"].met is None
    assert rows["train 1B, T=2048"].measured == "not measured (train_1b_zero2_compile: failed)"
    assert "unreadable record (KeyError" in rows["train 124M, T=1024"].measured
    assert rows["7b ZeRO-3 + optimizer offload, act. ckpt."].measured.startswith("not measured")
    results = tmp_path / "results"
    results.mkdir()
    saved = gpu_report.save(tmp_path, results)
    assert sorted(p.name for p in saved) == [
        "nvidia-h200-report.json",
        "nvidia-h200-train_124m_zero2.json",
    ]
    # a partial record (the step stopped after lmforge's side): lmforge's figure, no baseline
    steps_["train_1b_zero2_compile"] = {"status": "timeout", "rc": None}
    (tmp_path / "summary.json").write_text(json.dumps({"steps": steps_}))
    shape = {"compile": True, "preset": "1b", "seq_len": 2048, "micro_batch": 8, "zero_stage": 2}
    ours = {"mfu_measured": 0.64, "tokens_per_s": 75_000.0}
    partial = {"shape": shape, "lmforge": ours, "loss_check": {"passed": True}, "partial": True}
    (tmp_path / "bench" / "train_1b_zero2_compile.json").write_text(json.dumps({"train": partial}))
    row = {r.target: r for r in gpu_report.write_report(tmp_path)}["train 1B, T=2048"]
    assert row.met and row.measured.startswith("64.0% (75,000 tok/s; 1b, T=2048")
    assert row.baseline == "not measured (train_1b_zero2_compile: timeout)"
    gen_shape = {"compile": True, "preset": "gpt2-124m", "batch": 64, "prompt_len": 64}
    gen = {"shape": {**gen_shape, "new_tokens": 256}, "lmforge": {"new_tokens_per_s": 2e5}}
    gen |= {"greedy_check": {"passed": True}, "partial": True}
    (tmp_path / "bench" / "generate_124m_compile.json").write_text(json.dumps({"generate": gen}))
    row = {r.target: r for r in gpu_report.write_report(tmp_path)}[gpu_report.TARGETS[2][0]]
    assert row.met and row.baseline == "not measured (generate_124m_compile: not run)"


def test_steps_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(steps, "MIN_STEP_SECONDS", 1.0)
    py = [sys.executable, "-c"]
    plan = [
        steps.Step("fine", [*py, "print('hello')"], 30),
        steps.Step("broken", [*py, "raise SystemExit(3)"], 30),
        steps.Step("after_broken", [*py, "pass"], 30, needs=["broken"]),
        steps.Step("hangs", [*py, "import time; time.sleep(60)"], 30),
        steps.Step("too_late", [*py, "pass"], 30),
    ]
    summary = steps.run_all(plan, tmp_path, 3.0, dict(os.environ))["steps"]
    assert summary["fine"]["status"] == "ok" and summary["broken"] == {
        **summary["broken"],
        "status": "failed",
        "rc": 3,
    }
    assert summary["after_broken"] == {"status": "skipped", "why": "needs broken"}
    # killed when the budget ran out, long before its own limit
    assert summary["hangs"]["status"] == "timeout" and summary["hangs"]["limit"] < 3.0
    assert summary["too_late"]["status"] == "skipped" and "budget" in summary["too_late"]["why"]
    assert "hello" in (tmp_path / "logs" / "fine.log").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == summary


def test_background_steps_run_beside_the_next_and_are_waited_for(tmp_path: Path) -> None:
    """A background step runs while the steps after it do; a step waiting for it starts after
    it ended; one still running at the end is killed at its limit and recorded."""
    py = [sys.executable, "-c"]
    flag = tmp_path / "flag"
    write = f"import time, pathlib; time.sleep(1.5); pathlib.Path({str(flag)!r}).touch()"
    exists = f"import pathlib, sys; sys.exit(0 if pathlib.Path({str(flag)!r}).exists() else 4)"
    plan = [
        steps.Step("slow_writer", [*py, write], 30, background=True),
        steps.Step("beside", [*py, exists], 30),  # runs while the writer sleeps: no flag yet
        steps.Step("after", [*py, exists], 30, wait_for=["slow_writer"], needs=["slow_writer"]),
        steps.Step("forever", [*py, "import time; time.sleep(60)"], 2, background=True),
        steps.Step("last", [*py, "pass"], 30),
    ]
    start = time.monotonic()
    summary = steps.run_all(plan, tmp_path, 60.0, dict(os.environ))["steps"]
    assert time.monotonic() - start < 20  # the forever step was killed at its 2 s limit
    assert list(summary) == [s.name for s in plan]
    assert summary["beside"]["rc"] == 4 and summary["after"]["status"] == "ok"
    assert summary["slow_writer"]["status"] == "ok" and summary["last"]["status"] == "ok"
    assert summary["forever"]["status"] == "timeout" and summary["forever"]["limit"] == 2
    lines = (tmp_path / "check.log").read_text().splitlines()
    assert lines[0] == "[1/5] slow_writer: running, started in the background (limit 30 s)"
    assert lines[-1].startswith("[4/5] forever: timeout")


def test_arch_lists_reach_deepspeed_as_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a 10.0a+PTX")
    assert gpu_check.check_env(dry=False)["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0 10.0+PTX"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    assert "TORCH_CUDA_ARCH_LIST" not in gpu_check.check_env(dry=False)  # DeepSpeed probes


def test_an_unknown_step_is_named() -> None:
    job = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--only", "env,warp_drive"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert job.returncode == 2
    assert job.stderr.startswith("--only: no step warp_drive; steps: env, pytest_gpu, ")
