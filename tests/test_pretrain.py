"""The pretraining stage run for real: DeepSpeed ZeRO 0-3 with 1 and 2 processes on gloo,
exact resume, gradient accumulation, launchers, the objective mixture, and the dry run (user
errors are in test_bad_input.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from stagerun import launch_command, stage_env

from lmforge.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "pretrain" / "train.py")

pytestmark = pytest.mark.slow


class Runs:
    """Runs the stage in subprocesses, once per distinct configuration."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache = root / "cache"

    def base(self, run_dir: Path) -> list[str]:
        return [
            "--model=debug",
            "--tokenizer.vocab_size=512",
            "--data.source=builtin",
            "--data.max_documents=400",
            "--data.seq_len=64",
            f"--data.cache_dir={self.cache}",
            "--train.steps=6",
            "--train.global_batch_size=8",
            "--train.micro_batch_size=8",
            "--train.eval_every=0",
            "--train.eval_batches=2",
            "--train.save_every=100",
            "--train.samples=0",
            "--optim.lr=3e-3",
            "--optim.warmup_steps=2",
            "--tracking.log_every=1",
            f"--run_dir={run_dir}",
        ]

    def run(
        self, name: str, *extra: str, nproc: int = 1, launcher: str = "python", check: bool = True
    ) -> Path:
        run_dir = self.root / name
        cmd = launch_command(launcher, nproc, "pretrain/train.py", [*self.base(run_dir), *extra])
        proc = subprocess.run(
            cmd, env=stage_env(), capture_output=True, text=True, timeout=600, cwd=REPO
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("pretrain"))


@pytest.fixture(scope="module")
def reference(runs: Runs) -> Path:
    """One process, ZeRO-0, micro-batch 8: the run every other is compared with."""
    return runs.run("ref", "--engine.zero_stage=0")


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    model, _, _ = load_checkpoint(run_dir)
    return model.state_dict()


def test_reference_run_learns_and_writes_the_format(reference: Path) -> None:
    curve = losses(reference)
    assert sorted(curve) == [1, 2, 3, 4, 5, 6]
    assert curve[6] < curve[1] - 0.3
    ckpt = reference / "step-000006"
    assert (reference / "latest").read_text().strip() == "step-000006"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "lmforge.json"):
        assert (ckpt / name).exists(), name
    meta = json.loads((ckpt / "lmforge.json").read_text())
    assert meta["stage"] == "pretrain" and meta["step"] == 6 and meta["data_cursor"] == 48
    assert meta["tokens_seen"] == 6 * 8 * 64
    assert "eval/causal/loss" in meta["metrics"]
    assert (ckpt / "deepspeed").is_dir()


@pytest.mark.parametrize(
    ("stage", "launcher"), [(1, "deepspeed"), (2, "torchrun"), (3, "deepspeed")]
)
def test_two_processes_match_one(runs: Runs, reference: Path, stage: int, launcher: str) -> None:
    run_dir = runs.run(
        f"zero{stage}",
        f"--engine.zero_stage={stage}",
        "--train.micro_batch_size=4",
        nproc=2,
        launcher=launcher,
    )
    ours, ref = losses(run_dir), losses(reference)
    assert ours[6] < ours[1] - 0.3
    # Same global batches with 2 processes as with 1: the loss trajectories coincide.
    for step in ref:
        assert ours[step] == pytest.approx(ref[step], abs=1e-4), step
    if stage == 3:  # consolidated ZeRO-3 weights equal the ZeRO-0 run's
        a, b = weights(run_dir), weights(reference)
        for key in b:
            torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=0)
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(run_dir / "step-000006")
        ids = torch.randint(0, 512, (1, 16))
        ours_model, _, _ = load_checkpoint(run_dir)
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, ours_model(ids), atol=1e-4, rtol=0)


def test_optimizer_offload_matches(runs: Runs, reference: Path) -> None:
    """ZeRO-Offload: AdamW state and step on the CPU (DeepSpeedCPUAdam), same trajectory."""
    run_dir = runs.run("offload", "--engine.zero_stage=2", "--engine.offload_optimizer=true")
    ours, ref = losses(run_dir), losses(reference)
    for step in ref:
        assert ours[step] == pytest.approx(ref[step], abs=1e-4), step


def test_gradient_accumulation_matches_a_big_micro_batch(runs: Runs, reference: Path) -> None:
    run_dir = runs.run("accum", "--engine.zero_stage=0", "--train.micro_batch_size=2")
    ours, ref = losses(run_dir), losses(reference)
    for step in ref:
        assert ours[step] == pytest.approx(ref[step], abs=1e-4), step


@pytest.mark.parametrize("nproc", [1, 2])
def test_resume_reaches_exactly_the_uninterrupted_loss(runs: Runs, nproc: int) -> None:
    extra = ["--engine.zero_stage=2", f"--train.micro_batch_size={8 // nproc}"]
    launcher = "torchrun" if nproc == 2 else "python"
    full = runs.run(f"full{nproc}", *extra, nproc=nproc, launcher=launcher)
    split = runs.run(f"split{nproc}", *extra, "--train.stop_at=3", nproc=nproc, launcher=launcher)
    assert (split / "latest").read_text().strip() == "step-000003"
    assert max(losses(split)) == 3
    runs.run(f"split{nproc}", *extra, nproc=nproc, launcher=launcher)  # resume: auto
    resumed, uninterrupted = losses(split), losses(full)
    for step in (4, 5, 6):
        assert resumed[step] == uninterrupted[step], (step, resumed[step], uninterrupted[step])
    a, b = weights(split), weights(full)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_objective_mixture_in_bf16_logs_and_evaluates_each(runs: Runs) -> None:
    run_dir = runs.run(
        "mixture",
        "--engine.zero_stage=1",
        "--objective.mix={causal: 0.4, mlm: 0.3, prefix: 0.3}",
        "--train.steps=10",
        "--engine.precision=bf16",
        "--tracking.wandb.mode=offline",
        launcher="accelerate",
    )
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seen = {key for r in records for key in r if key.startswith("loss/")}
    assert seen == {"loss/causal", "loss/mlm", "loss/prefix"}
    final = {k for r in records for k in r if k.startswith("eval/")}
    assert {"eval/causal/loss", "eval/mlm/loss", "eval/prefix/loss"} <= final
    curve = losses(run_dir)
    assert all(v == v for v in curve.values()) and curve[10] < curve[1]
    ckpt = run_dir / "step-000010"
    assert json.loads((ckpt / "config.json").read_text())["dtype"] == "bfloat16"
    meta = json.loads((ckpt / "lmforge.json").read_text())
    assert meta["wandb_run_id"]
    assert list((run_dir / "wandb").glob(f"offline-run-*-{meta['wandb_run_id']}"))


def _run_script(runs: Runs, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, TRAIN, *runs.base(runs.root / name), *extra]
    return subprocess.run(
        cmd, env=stage_env(), capture_output=True, text=True, timeout=300, cwd=REPO
    )


def test_dry_run_prints_the_resolved_config(runs: Runs) -> None:
    proc = _run_script(runs, "dry", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "seq_len: 64" in proc.stdout and "# parameters:" in proc.stdout
    assert not (runs.root / "dry").exists()
