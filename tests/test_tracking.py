"""Weights & Biases for real, in offline mode: the run's own file read back record by record.

An offline run directory holds `run-<id>.wandb`, a log of `wandb_internal_pb2.Record` messages in
the LevelDB log layout (a 7-byte file header, then 32 KiB blocks of chunks, each with a 7-byte
header: crc32, length, type FULL/FIRST/MIDDLE/LAST). `read_wandb_run` decodes it, so the tests
see exactly what a later `wandb sync` would upload.
"""

from __future__ import annotations

import json
import struct
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from stagerun import launch_command, metrics, stage_env

from lmforge.tracking import Tracker, TrackingConfig, WandbConfig

REPO = Path(__file__).resolve().parents[1]
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # never valid, never to be seen
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path}: not a W&B run file"
    out, pos, chunks = [], 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding up to the end of the block
            pos += left
            continue
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(chunks)
            out.append(record)
            chunks = b""
    return out


def _finished_records(path: Path, timeout: float = 60.0) -> list[Any]:
    """The records of a finished run. wandb.finish() can return before wandb's service process
    has flushed the file, so wait (a bounded time) for the closing `exit` record."""
    deadline = time.monotonic() + timeout
    while True:
        records = _records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout}s"
        time.sleep(0.2)


def read_wandb_run(run_file: Path) -> dict[str, Any]:
    """id, project, config (top-level key -> value) and history (rows of key -> value)."""
    run: dict[str, Any] = {"config": {}, "history": []}
    for record in _finished_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"], run["project"] = record.run.run_id, record.run.project
            for item in record.run.config.update:
                run["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            run["history"].append(row)
    return run


def offline_runs(run_dir: Path) -> list[Path]:
    """The `run-<id>.wandb` files under run_dir/wandb, oldest first."""
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)


def wandb_env(root: Path) -> dict[str, str]:
    """Every directory wandb writes to inside `root`, and a fake API key to look for."""
    dirs = {name: root / name.lower() for name in ("WANDB_DIR", "WANDB_CACHE_DIR")}
    dirs.update({name: root / name.lower() for name in ("WANDB_DATA_DIR", "WANDB_CONFIG_DIR")})
    return {**{k: str(v) for k, v in dirs.items()}, "WANDB_API_KEY": FAKE_KEY}


def _all_text(root: Path) -> str:
    return "\n".join(
        p.read_bytes().decode("utf-8", errors="replace") for p in root.rglob("*") if p.is_file()
    )


def test_tracker_sends_config_metrics_and_each_evaluations_samples(tmp_path, monkeypatch) -> None:
    for key, value in wandb_env(tmp_path / "home").items():
        monkeypatch.setenv(key, value)
    cfg = TrackingConfig(wandb=WandbConfig(mode="offline", project="lmforge-test", tags=["t"]))
    config = {"train": {"steps": 3}, "model": {"dim": 8}}
    tracker = Tracker(
        tmp_path, cfg, is_main=True, config=config, total_steps=3, flops_per_token=0, peak_flops=0
    )
    for step in (1, 2):
        tracker.log(step, {"loss": 3.0 - step, "lr": 1e-3, **tracker.throughput(100, 0.5)})
    with open(tmp_path / "samples.jsonl", "a") as f:  # what SFT/GRPO/PPO evaluations append
        f.write(json.dumps({"step": 2, "prompt": "1+1?", "answer": "2", "completion": "2"}) + "\n")
    tracker.log(2, {"eval/loss": 1.5, "eval/accuracy": 1.0})
    tracker.log_samples([{"prompt": "The", "completion": " end"}], step=3)
    tracker.close()

    (run_file,) = offline_runs(tmp_path)
    run = read_wandb_run(run_file)
    assert run["id"] == tracker.run_id and run["project"] == "lmforge-test"
    assert run["config"]["train"] == {"steps": 3} and run["config"]["model"] == {"dim": 8}
    rows = {row["_step"]: row for row in run["history"]}
    assert {"loss", "lr", "tokens_per_s", "memory/rss_gb"} <= set(rows[1])
    assert rows[2]["eval/loss"] == 1.5 and rows[2]["samples/_type"] == "table-file"
    table = json.loads((run_file.parent / "files" / rows[2]["samples/path"]).read_text())
    assert table["columns"] == ["step", "prompt", "answer", "completion"]
    assert table["data"] == [[2, "1+1?", "2", "2"]]
    assert rows[3]["samples/nrows"] == 1
    assert FAKE_KEY not in _all_text(tmp_path)


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny pretraining run logged to offline W&B: 2 processes stopped at step 2, then
    resumed by 1 process to step 4 (ZeRO-0, whose engine state does not depend on the process
    count)."""
    import subprocess

    root = tmp_path_factory.mktemp("wandb_stage")
    run_dir = root / "run"
    args = [
        "--model=debug",
        "--tokenizer.vocab_size=512",
        "--data.source=builtin",
        "--data.max_documents=100",
        "--data.seq_len=32",
        f"--data.cache_dir={root / 'cache'}",
        "--train.steps=4",
        "--train.global_batch_size=4",
        "--train.micro_batch_size=2",
        "--train.eval_every=2",
        "--train.eval_batches=1",
        "--train.samples=1",
        "--train.sample_tokens=4",
        "--tracking.log_every=1",
        "--tracking.wandb.mode=offline",
        "--tracking.wandb.project=lmforge-test",
        "--engine.zero_stage=0",
        f"--run_dir={run_dir}",
    ]
    env = {**stage_env(), **wandb_env(root / "home")}
    env.pop("WANDB_SILENT", None)  # the tracker itself must keep wandb quiet
    procs = []
    for launcher, nproc, extra in (("torchrun", 2, ["--train.stop_at=2"]), ("python", 1, [])):
        cmd = launch_command(launcher, nproc, "pretrain/train.py", [*args, *extra])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        procs.append(proc)
    return {"run_dir": run_dir, "procs": procs}


def test_stage_logs_config_metrics_and_samples_to_wandb(wandb_run) -> None:
    run_dir = wandb_run["run_dir"]
    first = read_wandb_run(offline_runs(run_dir)[0])
    assert first["config"]["train"]["steps"] == 4 and first["config"]["model"]["dim"] == 64
    assert first["config"]["tracking"]["wandb"]["mode"] == "offline"
    keys = {k for row in first["history"] for k in row}
    wanted = {"loss", "loss/causal", "lr", "tokens_per_s", "memory/rss_gb", "eval/causal/loss"}
    assert wanted <= keys, wanted - keys
    assert "samples/_type" in keys  # the evaluation's generations, as a table
    assert [r["_step"] for r in first["history"] if "loss" in r] == [1, 2]
    logged = {k for r in metrics(run_dir) for k in r}
    assert "grad_norm" in logged  # null under ZeRO-0 (DeepSpeed reports none): kept off W&B


def test_resumed_run_continues_the_same_wandb_run(wandb_run) -> None:
    run_dir = wandb_run["run_dir"]
    first, second = (read_wandb_run(f) for f in offline_runs(run_dir))
    assert first["id"] == second["id"]
    for step in ("step-000002", "step-000004"):
        meta = json.loads((run_dir / step / "lmforge.json").read_text())
        assert meta["wandb_run_id"] == first["id"]
    assert [r["_step"] for r in second["history"] if "loss" in r] == [3, 4]


def test_console_is_rank_zero_and_the_key_never_shows(wandb_run) -> None:
    first, second = wandb_run["procs"]
    progress = [line for line in first.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in progress] == ["step 1/4 (25%)", "step 2/4 (50%)"]
    assert all("ETA" in line and "tok/s" in line for line in progress)
    assert first.stdout.count("pretrain: starting") == 1
    for proc in (first, second):
        assert "built successfully" not in proc.stdout
        repeated = [(line, n) for line, n in Counter(proc.stderr.splitlines()).items() if n > 1]
        assert not repeated, repeated
        assert FAKE_KEY not in proc.stdout + proc.stderr
    assert FAKE_KEY not in _all_text(wandb_run["run_dir"].parent)
