"""Disk: checkpoint retention (keep_last newest, plus every keep_every-th step, never the one
`latest` names nor the newest) and the free-space check before a save, which fails with one
clear line before anything is written and leaves the previous checkpoint intact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from stagerun import run_stage

from lmforge.checkpoint import verify_files
from lmforge.rundir import apply_retention, clean_leftovers, list_checkpoints, space_problem


def fake_run(root: Path, steps: list[int], latest: int) -> Path:
    for step in steps:
        ckpt = root / f"step-{step:06d}"
        ckpt.mkdir(parents=True)
        (ckpt / "lmforge.json").write_text(json.dumps({"step": step, "files": {}}))
        (ckpt / "config.json").write_text("{}")
    (root / "latest").write_text(f"step-{latest:06d}\n")
    return root


def names(run: Path) -> list[int]:
    return [step for step, _ in list_checkpoints(run)]


def test_keep_last_and_keep_every(tmp_path: Path) -> None:
    run = fake_run(tmp_path, list(range(1, 11)), latest=10)
    deleted = apply_retention(run, keep_last=2, keep_every=4, newest="step-000010")
    assert names(run) == [4, 8, 9, 10]
    assert deleted == [f"step-{s:06d}" for s in (1, 2, 3, 5, 6, 7)]
    assert not list(run.glob(".*"))  # nothing half-deleted left behind


def test_latest_and_newest_are_never_deleted(tmp_path: Path) -> None:
    # after a rollback `latest` names an older checkpoint than the newest directories
    run = fake_run(tmp_path, [2, 3, 4, 5, 6], latest=3)
    apply_retention(run, keep_last=1, keep_every=0, newest="step-000004")
    assert names(run) == [3, 4, 6]
    assert apply_retention(run, keep_last=0, keep_every=0, newest="step-000006") == []


def test_leftovers_of_interrupted_saves_are_removed(tmp_path: Path) -> None:
    run = fake_run(tmp_path, [2], latest=2)
    for name in (".step-000004.partial", ".step-000002.old", ".step-000001.deleting"):
        (run / name).mkdir()
        (run / name / "model.safetensors").write_bytes(b"half")
    (run / "critic" / ".step-000004.partial").mkdir(parents=True)
    (run / ".latest.tmp").write_text("step-000004")
    removed = clean_leftovers(run)
    assert len(removed) == 5 and not list(run.rglob(".*")) and names(run) == [2]


def test_space_problem_names_the_directory_and_the_bytes(tmp_path: Path) -> None:
    assert space_problem(tmp_path, 1000, 0) is None
    problem = space_problem(tmp_path / "not-yet" / "step-000001", 1000, 10**18)
    assert problem is not None and "\n" not in problem
    assert str(tmp_path / "not-yet") in problem and "1000 bytes" in problem and "free" in problem


BASE = [
    "--model=debug",
    "--tokenizer.vocab_size=512",
    "--data.source=builtin",
    "--data.max_documents=300",
    "--data.seq_len=64",
    "--train.global_batch_size=8",
    "--train.micro_batch_size=8",
    "--train.eval_every=0",
    "--train.eval_batches=1",
    "--train.save_every=1",
    "--train.samples=0",
    "--train.keep_last=2",
    "--train.keep_every=4",
    "--tracking.log_every=1",
]


@pytest.mark.slow
def test_retention_and_a_full_disk_in_a_real_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [*BASE, f"--run_dir={run}", f"--data.cache_dir={tmp_path / 'cache'}"]
    out = run_stage("pretrain/train.py", [*args, "--train.steps=10"]).stdout
    assert names(run) == [4, 8, 9, 10] and "deleted step-000001" in out
    assert (run / "latest").read_text().strip() == "step-000010"

    # Resume with a disk that is "too small": min_free_bytes (the margin a save must leave free)
    # larger than any disk. The save of step 11 is refused before anything is written.
    proc = run_stage(
        "pretrain/train.py",
        [*args, "--train.steps=12", "--train.min_free_bytes=1000000000000000000"],
        check=False,
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert str(run) in errors[0] and "needs about" in errors[0] and "free" in errors[0]
    assert not [p.name for p in run.glob(".*")]  # no partial checkpoint
    assert (run / "latest").read_text().strip() == "step-000010"
    meta = json.loads((run / "step-000010" / "lmforge.json").read_text())
    verify_files(run / "step-000010", meta, engine=True)  # the previous checkpoint is intact
    assert names(run) == [4, 8, 9, 10]
