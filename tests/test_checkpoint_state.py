"""A checkpoint stores each state once: the weights (model.safetensors) plus DeepSpeed's own
partitioned optimizer state, from which a resume on the same topology is exact and a resume on
another process count or ZeRO stage reads the whole state back (lmforge.elastic); weight-only
checkpoints (`train.save_optimizer=false`); a disk that fills during a save.

The 2 -> 1 and 1 -> 2 process resumes across ZeRO stages are in tests/test_elastic.py; here the
engine-level reader is checked on every ZeRO stage and precision, and the files of a real run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from stagerun import REPO, losses, run_stage, spawn_group, stage_env, tiny_pretrain_args, wait_group

from lmforge.checkpoint import load_checkpoint, load_reward_model, verify_files
from lmforge.engine import EngineStateFiles

pytestmark = pytest.mark.slow


def files_of(ckpt: Path) -> dict[str, int]:
    """Every file of a checkpoint (relative path -> bytes)."""
    return {
        p.relative_to(ckpt).as_posix(): p.stat().st_size for p in ckpt.rglob("*") if p.is_file()
    }


def test_engine_state_reads_back_whole_on_every_zero_stage_and_precision(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    procs = spawn_group(
        "tests/state_files_worker.py", [str(report)], nproc=2, log_dir=tmp_path / "logs"
    )
    assert wait_group(procs) == [0, 0], (tmp_path / "logs/rank0.log").read_text()[-4000:]
    results = json.loads(report.read_text())
    assert len(results) == 8
    for name, result in results.items():
        assert result["read_equal"] and result["schedule_equal"], name
        assert result["other_stage_equal"] and result["lr_equal"], name


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


def pretrain(run: Path, cache: Path, *extra: str, steps: int = 4, check: bool = True) -> str:
    args = [*tiny_pretrain_args(run, cache, steps=steps, save_every=2), *extra]
    proc = run_stage("pretrain/train.py", args, check=check)
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def uninterrupted(root: Path) -> Path:
    """Four ZeRO-0 steps in one go."""
    pretrain(root / "full0", root / "cache", "--engine.zero_stage=0")
    return root / "full0"


@pytest.mark.parametrize("zero", [0, 2])
def test_checkpoint_holds_each_state_once_and_resumes_exactly(
    root: Path, uninterrupted: Path, zero: int
) -> None:
    split = root / f"split{zero}"
    pretrain(split, root / "cache", f"--engine.zero_stage={zero}", "--train.stop_at=2")
    ckpt = split / "step-000002"
    files = files_of(ckpt)
    weights = files["model.safetensors"]
    assert not any("consolidated" in f for f in files), sorted(files)
    # DeepSpeed's model-states file keeps no second copy of the weights (only buffers, if any).
    state = EngineStateFiles(ckpt / "deepspeed")
    assert sum(v.numel() for v in state.model["module"].values()) < 1000, state.model["module"]
    engine = sum(size for f, size in files.items() if f.startswith("deepspeed/"))
    # fp32: the master copy and AdamW's two moments are 3x the weights; the rest is small
    # (DeepSpeed's recovery scripts, the RNG, the schedule).
    assert engine < 3 * weights + 200_000, (engine, weights)
    meta = json.loads((ckpt / "lmforge.json").read_text())
    assert set(meta["files"]) == set(files) - {"lmforge.json"}
    assert meta["engine"]["module_in_weights"] is True

    log = pretrain(split, root / "cache", f"--engine.zero_stage={zero}")
    assert f"via DeepSpeed engine state (1 process(es), ZeRO-{zero})" in log
    if zero == 0:  # ZeRO-2's exact resume is checked after every kill in tests/test_crash.py
        a = load_file(uninterrupted / "step-000004" / "model.safetensors")
        b = load_file(split / "step-000004" / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise


def test_zero_stage_change_reads_the_shards(root: Path, uninterrupted: Path) -> None:
    """A ZeRO-0 checkpoint (whose fp32 master is the weights file) resumes under ZeRO-3."""
    run = root / "z0to3"
    pretrain(run, root / "cache", "--engine.zero_stage=0", "--train.stop_at=2")
    log = pretrain(run, root / "cache", "--engine.zero_stage=3")
    assert (
        "re-sharded from 1 process(es), ZeRO-0 to 1 process(es), ZeRO-3 (read from the engine "
        "shards)"
    ) in log
    ours, ref = losses(run), losses(uninterrupted)
    assert max(abs(ours[s] - ref[s]) for s in (3, 4)) < 1e-4, (ours, ref)


def test_weight_only_checkpoints(root: Path) -> None:
    run = root / "weights"
    pretrain(run, root / "cache", "--train.save_optimizer=false", "--train.stop_at=2")
    ckpt = run / "step-000002"
    files = files_of(ckpt)
    assert not any(f.startswith("deepspeed/") for f in files), sorted(files)
    assert sum(files.values()) < files["model.safetensors"] + 100_000  # + config and tokenizer
    meta = json.loads((ckpt / "lmforge.json").read_text())
    verify_files(ckpt, meta, engine=True)

    # A valid init_from: what every stage loads (language model, or reward model start).
    model, tokenizer, _ = load_checkpoint(run)
    assert tokenizer is not None and model.cfg.n_layers > 0
    reward, _, _ = load_reward_model(run, seed=0)
    assert reward.score.weight.shape[0] == 1
    # ... and loadable by transformers as it is.
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ckpt)
    with torch.no_grad():
        logits = hf(torch.tensor([[1, 5, 9, 11]])).logits
    assert logits.shape[-1] == model.cfg.vocab_size and torch.isfinite(logits).all()

    # Resuming from it is one line naming the key, and changes nothing.
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    out = pretrain(run, root / "cache", "--train.save_optimizer=false", check=False)
    errors = [line for line in out.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
    assert "train.save_optimizer=false" in errors[0] and "init_from" in errors[0]
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing rewritten
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000002"]

    # A new run starts from it with init_from.
    pretrain(root / "from-weights", root / "cache", f"--init_from={run}", steps=2)
    assert (root / "from-weights" / "step-000002" / "deepspeed").is_dir()


# ------------------------------------------------------------------------- a disk that fills

_FILL = r"""
set -u
mount -t tmpfs -o size=$SIZE tmpfs "$RUN" || exit 97
"$PY" "$REPO/pretrain/train.py" "$@" > "$LOG" 2>&1 &
stage=$!
# Fill the disk while the second save holds before its commit (LMFORGE_TEST_SAVE_PAUSE).
partial="$RUN/.step-000004.partial"
for _ in $(seq 1 1200); do
  [ -e "$partial/tokenizer.json" ] && [ -e "$partial/tokenizer_config.json" ] \
    && [ -e "$partial/special_tokens_map.json" ] && break
  sleep 0.05
done
dd if=/dev/zero of="$RUN/filler" bs=64k 2>/dev/null
wait $stage
echo "rc=$?" >> "$LOG"
ls -a "$RUN" >> "$LOG"
cat "$RUN/latest" >> "$LOG"
"""


def _user_namespaces() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = ["unshare", "--user", "--map-root-user", "--mount", "true"]
    return subprocess.run(probe, capture_output=True).returncode == 0


@pytest.mark.skipif(
    not _user_namespaces(), reason="needs unprivileged user namespaces (unshare) for a tmpfs"
)
def test_disk_that_fills_during_a_save(root: Path, tmp_path: Path) -> None:
    """The run directory is a small tmpfs (in a private mount namespace); a filler takes its
    last bytes while the step-4 save holds before its commit, so that save's writes really fail
    with ENOSPC."""
    run, log = tmp_path / "run", tmp_path / "stage.log"
    run.mkdir()
    args = tiny_pretrain_args(run, root / "cache", steps=4, save_every=2)
    env = {
        **stage_env(),
        "SIZE": "24m",
        "RUN": str(run),
        "PY": sys.executable,
        "REPO": str(REPO),
        "LOG": str(log),
        "LMFORGE_TEST_SAVE_PAUSE": "2",
    }
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", _FILL, "fill", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    out = log.read_text() if log.exists() else proc.stdout + proc.stderr
    if proc.returncode == 97:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {proc.stderr.strip()}")
    lines = out.splitlines()
    rc = int(next(line for line in lines if line.startswith("rc="))[3:])
    errors = [line for line in lines if line.startswith("error")]
    assert rc != 0 and len(errors) == 1 and "Traceback" not in out, out[-4000:]
    assert str(run) in errors[0] and "disk filled up" in errors[0], errors[0]
    assert "bytes" in errors[0] and "free disk space" in errors[0], errors[0]
    listing = lines[lines.index(f"rc={rc}") + 1 :]
    assert not [n for n in listing if n.endswith(".partial") or n == ".latest.tmp"], listing
    assert "step-000002" in listing and "step-000004" not in listing, listing
    assert listing[-1] == "step-000002"  # latest


def test_weights_only_restore_message_names_the_key(tmp_path: Path) -> None:
    """The refusal also comes from --resume=PATH (outside the run), before anything is written."""
    from lmforge.checkpointer import refuse_weights_only
    from lmforge.errors import CheckpointError

    meta = {"config": {"train": {"save_optimizer": False}}}
    with pytest.raises(CheckpointError) as err:
        refuse_weights_only(tmp_path / "step-000002", meta)
    assert "train.save_optimizer=false" in str(err.value) and "\n" not in str(err.value)
    refuse_weights_only(tmp_path, {"config": {"train": {}}})  # older checkpoints: allowed
