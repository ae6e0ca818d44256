"""Settings changed on resume, run for real: a new learning rate takes effect from the next
step (console line, config.yaml records when), and a change that would make the run another run
(data, model shape, global batch) is refused in one line, the run directory untouched, unless
it is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from stagerun import metrics, run_stage, tiny_pretrain_args

from lmforge.rundir import latest_name

pytestmark = pytest.mark.slow


def pretrain(run: Path, cache: Path, *extra: str, check: bool = True):
    args = tiny_pretrain_args(run, cache, steps=6, save_every=3)
    return run_stage("pretrain/train.py", [*args, "--optim.schedule=constant", *extra], check=check)


def test_new_learning_rate_applies_from_the_next_step(tmp_path: Path) -> None:
    run, cache = tmp_path / "run", tmp_path / "cache"
    pretrain(run, cache, "--train.stop_at=3")
    out = pretrain(run, cache, "--optim.lr=1e-3").stdout
    assert "resume: optim.lr 0.003 -> 0.001" in out, out
    lrs = {r["step"]: r["lr"] for r in metrics(run) if "lr" in r}
    assert [lrs[s] for s in (1, 2, 3)] == [pytest.approx(3e-3)] * 3
    assert [lrs[s] for s in (4, 5, 6)] == [pytest.approx(1e-3)] * 3
    text = (run / "config.yaml").read_text()
    assert "# resumed at step 3: optim.lr 0.003 -> 0.001" in text
    assert yaml.safe_load(text)["optim"]["lr"] == pytest.approx(1e-3)


def test_refused_change_is_one_line_and_touches_nothing(tmp_path: Path) -> None:
    run, cache = tmp_path / "run", tmp_path / "cache"
    pretrain(run, cache, "--train.stop_at=3")
    before = sorted(p.name for p in run.iterdir())
    proc = pretrain(run, cache, "--train.global_batch_size=16", check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.global_batch_size" in lines[0], proc.stderr
    assert "--resume.allow_changes=train.global_batch_size" in lines[0]
    assert sorted(p.name for p in run.iterdir()) == before and latest_name(run) == "step-000003"
    proc = pretrain(run, cache, "--data.seq_len=32", "--resume.allow_changes=data", check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resume: data.seq_len 64 -> 32" in proc.stdout
