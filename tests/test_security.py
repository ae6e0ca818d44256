"""Security: no pickle is loaded from a user's model or data file (safetensors and JSON only; the
DeepSpeed engine state of our own run directories is read with weights_only loading),
trust_remote_code is never on, a W&B key never reaches logs or config dumps, and run directories
honour the user's umask."""

from __future__ import annotations

import ast
import json
import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from stagerun import REPO, launch_command, stage_env

from lmforge.checkpoint import sha256_file

SOURCES = [p for d in ("lmforge", "pretrain", "finetune") for p in sorted((REPO / d).rglob("*.py"))]
SECRET = "wandb-test-key-0123456789abcdef0123456789abcdef"


def _unpickling_calls(path: Path) -> list[str]:
    """Source of every call in `path` that can unpickle: torch/pickle/joblib/dill load(s), and
    numpy's load with allow_pickle=True."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
        name = node.func.attr
        pickle_like = owner in ("torch", "pickle", "joblib", "dill", "cloudpickle")
        numpy = owner in ("np", "numpy") and any(
            k.arg == "allow_pickle" and getattr(k.value, "value", False) for k in node.keywords
        )
        if (pickle_like and name in ("load", "loads")) or (numpy and name == "load"):
            found.append(ast.unparse(node))
    return found


def test_no_pickle_loader_in_the_sources() -> None:
    calls = {p.relative_to(REPO).as_posix(): _unpickling_calls(p) for p in SOURCES}
    calls = {p: c for p, c in calls.items() if c}
    # The one reads DeepSpeed's files of our own engine state (for the engine's own reader and
    # for the shard reader that re-shards them), forced to weights_only loading.
    assert calls == {
        "lmforge/engine.py": [
            "torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)"
        ]
    }, calls


def test_trust_remote_code_is_never_on() -> None:
    found = []
    for path in SOURCES:
        for line in path.read_text().splitlines():
            for match in re.finditer(r"trust_remote_code\s*=\s*(\w+)", line):
                found.append(match.group(1))
    assert found and set(found) == {"False"}, found


class Boom:
    """Unpickling this creates a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def run_pretrain(run: Path, cache: Path, *extra: str, env: dict[str, str] | None = None) -> Any:
    args = [
        "--model=debug",
        "--tokenizer.vocab_size=512",
        "--data.source=builtin",
        "--data.max_documents=300",
        "--data.seq_len=64",
        f"--data.cache_dir={cache}",
        "--train.global_batch_size=8",
        "--train.micro_batch_size=8",
        "--train.eval_every=0",
        "--train.eval_batches=1",
        "--train.save_every=2",
        "--train.samples=0",
        "--tracking.log_every=1",
        f"--run_dir={run}",
        *extra,
    ]
    return subprocess.run(
        launch_command("python", 1, "pretrain/train.py", args),
        env={**stage_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        preexec_fn=lambda: os.umask(0o027),  # the user's umask: nothing for others
    )


@pytest.mark.slow
def test_a_run_honours_umask_keeps_the_wandb_key_out_and_refuses_pickled_state(
    tmp_path: Path,
) -> None:
    run, cache = tmp_path / "run", tmp_path / "cache"
    proc = run_pretrain(
        run,
        cache,
        "--train.steps=2",
        "--tracking.wandb.mode=offline",
        env={"WANDB_API_KEY": SECRET, "WANDB_MODE": "offline"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # umask 027: no file or directory the run made is open to others, none writable by the group
    loose = []
    for path in [run, cache, *run.rglob("*"), *cache.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if not path.is_symlink() and mode & 0o027:
            loose.append((str(path.relative_to(tmp_path)), oct(mode)))
    assert not loose, loose
    # ... and the group reads every weight file, as it reads the configs (safetensors alone
    # would make them owner-only)
    weights = [p for p in run.rglob("*.safetensors")]
    assert weights and all(stat.S_IMODE(p.stat().st_mode) == 0o640 for p in weights), [
        (str(p.relative_to(run)), oct(stat.S_IMODE(p.stat().st_mode))) for p in weights
    ]
    # the W&B key is in no log line, no config dump, no file of the run
    assert SECRET not in proc.stdout + proc.stderr
    for path in run.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path

    # A pickle planted in the engine state (manifest updated to match) is refused on resume.
    ckpt = run / "step-000002"
    meta = json.loads((ckpt / "lmforge.json").read_text())
    marker = tmp_path / "unpickled"
    state = ckpt / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    torch.save({"module": Boom(marker)}, state)
    rel = state.relative_to(ckpt).as_posix()
    meta["files"][rel] = {"size": state.stat().st_size, "sha256": sha256_file(state)}
    (ckpt / "lmforge.json").write_text(json.dumps(meta))
    proc = run_pretrain(run, cache, "--train.steps=4")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "mp_rank_00_model_states.pt" in errors[0] and "refused" in errors[0]
    assert not marker.exists(), "a pickle was unpickled"


def test_config_dump_has_no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge.config import dumps
    from pretrain.train import PretrainConfig

    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    assert SECRET not in dumps(PretrainConfig()) and "api_key" not in dumps(PretrainConfig())
