"""The checkpoint format: round trip, manifest, corruption, atomic writes, overwrite, dtypes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import small_config

from lmforge import checkpoint as ckpt_mod
from lmforge.checkpoint import (
    commit,
    load_checkpoint,
    partial_dir,
    resolve_checkpoint,
    save_checkpoint,
    staging,
    verify_files,
    write_model_files,
)
from lmforge.errors import CheckpointError
from lmforge.model import GPT, ModelConfig, build_model
from lmforge.tokenizer import train_tokenizer

TEXTS = [f"the quick brown fox {i} jumps over the lazy dog, again and again." for i in range(40)]


# These models are tiny: one intra-op thread is faster (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def one_line_error(err: pytest.ExceptionInfo[CheckpointError], *names: str) -> str:
    """The message of a raised CheckpointError, after checking it is one line naming `names`."""
    msg = str(err.value)
    assert "\n" not in msg, msg
    for name in names:
        assert name in msg, msg
    return msg


def assert_same_weights(a: GPT, b: GPT) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def payload_offset(file: Path) -> tuple[str, int]:
    """(key, byte offset) of the first tensor payload byte in a safetensors file."""
    data = file.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    key = next(k for k, v in header.items() if k != "__metadata__" and v["data_offsets"][0] == 0)
    return key, 8 + header_len


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, GPT]:
    """A small fp32 Llama-compatible checkpoint (no tokenizer) and the model it holds."""
    model = build_model(small_config(), seed=3)
    path = save_checkpoint(tmp_path / "step-10", model, stage="pretrain", step=10)
    return path, model


# ------------------------------------------------------------------------------ round trip


def test_round_trip_keeps_meta_weights_tokenizer_and_manifest(tmp_path: Path) -> None:
    # Training-only fields (dropouts, init) have no place in a Llama config.json: lmforge.json
    # keeps them.
    cfg = small_config(tie_embeddings=False, embed_dropout=0.1, init_std=0.05, rope_theta=500.0)
    model = build_model(cfg, seed=1)
    tokenizer = train_tokenizer(TEXTS, 300)
    run_config = {
        "model": dataclasses.asdict(cfg),
        "optim": {"lr": 3e-4, "betas": [0.9, 0.95], "schedule": {"warmup": 10}},
        "data": {"path": Path("data/corpus")},
    }
    path = save_checkpoint(
        tmp_path / "step-000500",
        model,
        tokenizer,
        stage="sft",
        step=500,
        tokens_seen=123_456,
        metrics={"loss": torch.tensor(1.25), "accuracy": 0.5, "per_task": {"a": 1, "b": 2}},
        config=run_config,
        parent="runs/pre/step-000400",
    )
    assert path == tmp_path / "step-000500"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000500"]  # no partial, no latest

    loaded, tok, meta = load_checkpoint(path)
    assert loaded.cfg == cfg
    assert not loaded.training
    assert_same_weights(loaded, model)
    assert tok is not None
    assert tok("jumps over 42")["input_ids"] == tokenizer("jumps over 42")["input_ids"]

    assert meta["stage"] == "sft"
    assert meta["step"] == 500
    assert meta["tokens_seen"] == 123_456
    assert meta["metrics"] == {"loss": 1.25, "accuracy": 0.5, "per_task": {"a": 1, "b": 2}}
    assert meta["config"]["optim"] == run_config["optim"]
    assert meta["config"]["model"] == dataclasses.asdict(cfg)
    assert meta["config"]["data"] == {"path": "data/corpus"}
    assert meta["parent"] == "runs/pre/step-000400"
    assert meta["model"] == dataclasses.asdict(cfg)
    assert meta["format_version"] == ckpt_mod.FORMAT_VERSION
    assert meta["path"] == str(path)

    # The manifest lists every file but itself, with the true size and sha256.
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {
        "lmforge.json"
    }
    manifest = json.loads((path / "lmforge.json").read_text())["files"]
    assert set(manifest) == on_disk
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= on_disk
    for rel, info in manifest.items():
        assert info["size"] == (path / rel).stat().st_size, rel
        assert info["sha256"] == sha256(path / rel), rel


def test_latest_names_the_newest_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    models = {step: build_model(small_config(), seed=step) for step in (1, 2, 3)}
    save_checkpoint(run / "step-1", models[1], update_latest=True, step=1)
    save_checkpoint(run / "step-2", models[2], update_latest=True, step=2)
    save_checkpoint(run / "step-3", models[3], step=3)  # not published
    assert (run / "latest").read_text().strip() == "step-2"
    assert resolve_checkpoint(run) == run / "step-2"
    loaded, _, meta = load_checkpoint(run)
    assert meta["step"] == 2
    assert_same_weights(loaded, models[2])


# ------------------------------------------------------------------------------ corruption


def _truncate(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def _flip_payload_byte(file: Path) -> None:
    _, offset = payload_offset(file)
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x01
    file.write_bytes(bytes(data))


def _edit_json(file: Path, **changes: object) -> None:
    obj = json.loads(file.read_text())
    obj.update(changes)
    file.write_text(json.dumps(obj))


def _shape_mismatch_everywhere(ckpt: Path) -> None:
    """Change the MLP width in config.json and lmforge.json consistently, manifest included."""
    _edit_json(ckpt / "config.json", intermediate_size=96)
    meta = json.loads((ckpt / "lmforge.json").read_text())
    meta["model"]["ffn_dim"] = 96
    meta["files"]["config.json"] = {
        "size": (ckpt / "config.json").stat().st_size,
        "sha256": sha256(ckpt / "config.json"),
    }
    (ckpt / "lmforge.json").write_text(json.dumps(meta))


# name: (corrupt the checkpoint dir, verify, file the message names, what it says)
CORRUPTIONS: dict[str, tuple[Callable[[Path], None], bool, str, str]] = {
    "truncated_weights": (
        lambda c: _truncate(c / "model.safetensors"),
        True,
        "model.safetensors",
        "truncated",
    ),
    "missing_weights": (
        lambda c: (c / "model.safetensors").unlink(),
        True,
        "model.safetensors",
        "missing",
    ),
    "flipped_byte": (
        lambda c: _flip_payload_byte(c / "model.safetensors"),
        True,
        "model.safetensors",
        "sha256",
    ),
    "missing_config": (lambda c: (c / "config.json").unlink(), True, "config.json", ""),
    "edited_config_hash": (
        lambda c: _edit_json(c / "config.json", intermediate_size=96),
        True,
        "config.json",
        "lmforge.json",  # size or hash differs from what the manifest records
    ),
    "edited_config_disagrees": (
        lambda c: _edit_json(c / "config.json", intermediate_size=96),
        False,
        "config.json",
        "disagree",
    ),
    "config_does_not_match_weights": (
        _shape_mismatch_everywhere,
        True,
        "model.safetensors",
        "config does not match the weights",
    ),
    "invalid_json_config": (
        lambda c: (c / "config.json").write_text('{"model_type": "llama",'),
        False,
        "config.json",
        "not valid JSON",
    ),
    "invalid_json_manifest": (
        lambda c: (c / "lmforge.json").write_text("{{"),
        True,
        "lmforge.json",
        "not valid JSON",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_checkpoint_is_one_line_naming_the_file(saved: tuple[Path, GPT], case: str) -> None:
    ckpt, _ = saved
    corrupt, verify, name, says = CORRUPTIONS[case]
    corrupt(ckpt)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt, verify=verify)
    one_line_error(err, name, says)


def _as_hf_dir(ckpt: Path) -> Path:
    """A plain Hugging Face directory: the same files without lmforge.json (no manifest)."""
    (ckpt / "lmforge.json").unlink()
    return ckpt


def test_hf_dir_without_manifest_loads(saved: tuple[Path, GPT]) -> None:
    ckpt, model = saved
    loaded, _, meta = load_checkpoint(_as_hf_dir(ckpt))
    assert_same_weights(loaded, model)
    assert "step" not in meta


def test_hf_dir_config_shape_mismatch(saved: tuple[Path, GPT]) -> None:
    ckpt = _as_hf_dir(saved[0])
    _edit_json(ckpt / "config.json", intermediate_size=96)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt)
    msg = one_line_error(err, "model.safetensors", "config.json")
    assert "does not match the weights" in msg
    assert "[96, 32]" in msg  # what config.json implies for the MLP input projection


@pytest.mark.parametrize("keep", [4, 20, 0.5, 0.999], ids=["len", "header", "half", "last_byte"])
def test_hf_dir_truncated_safetensors(saved: tuple[Path, GPT], keep: float) -> None:
    # No manifest, so the safetensors reader itself meets the damage and must fail cleanly.
    ckpt = _as_hf_dir(saved[0])
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: int(keep) if keep >= 1 else int(len(data) * keep)])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt)
    one_line_error(err, "model.safetensors", "unreadable safetensors")


def test_hf_dir_missing_shard(tmp_path: Path) -> None:
    model = build_model(small_config(), seed=0)
    ckpt = _as_hf_dir(save_checkpoint(tmp_path / "c", model, max_shard_bytes=8192))
    shards = sorted(ckpt.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3
    shards[1].unlink()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt)
    one_line_error(err, shards[1].name, "missing")


def test_pickle_weights_are_never_loaded(
    saved: tuple[Path, GPT], monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt, model = saved
    # A Hugging Face directory of the pickle era: config.json + pytorch_model.bin only.
    for name in ("lmforge.json", "model.safetensors"):
        (ckpt / name).unlink()
    torch.save(model.state_dict(), ckpt / "pytorch_model.bin")

    def no_unpickling(*args: object, **kwargs: object) -> None:
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt)
    one_line_error(err, "pytorch_model.bin", "never loaded")

    # Only the pickle, nothing else: still refused with one line naming what is missing.
    (ckpt / "config.json").unlink()
    (ckpt / "generation_config.json").unlink()
    assert [p.name for p in ckpt.iterdir()] == ["pytorch_model.bin"]
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt)
    one_line_error(err, str(ckpt), "config.json")


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}},
            "rope_type 'yarn' is not supported",
        ),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
    ids=["model_type", "rope_scaling", "hidden_act"],
)
def test_hf_config_we_cannot_compute_is_refused(
    saved: tuple[Path, GPT], changes: dict[str, object], says: str
) -> None:
    ckpt = _as_hf_dir(saved[0])
    _edit_json(ckpt / "config.json", **changes)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt)
    one_line_error(err, "config.json", says)


def test_latest_naming_a_missing_directory(saved: tuple[Path, GPT]) -> None:
    run = saved[0].parent
    (run / "latest").write_text("step-99\n")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(run)
    one_line_error(err, "latest", "step-99")


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "nope")
    one_line_error(err, "nope")


def test_verify_false_skips_the_hash_check(saved: tuple[Path, GPT]) -> None:
    ckpt, model = saved
    file = ckpt / "model.safetensors"
    key, _ = payload_offset(file)
    _flip_payload_byte(file)  # same size: only the hash can tell

    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt)
    one_line_error(err, "model.safetensors", "sha256")

    loaded, _, _ = load_checkpoint(ckpt, verify=False)
    flipped = ckpt_mod.from_llama_key(key)
    new, old = dict(loaded.named_parameters()), dict(model.named_parameters())
    changed = {name: int((new[name] != old[name]).sum()) for name in old}
    assert {name: n for name, n in changed.items() if n} == {flipped: 1}  # that byte, only it


# ------------------------------------------------------------------------------- atomicity


def _only_step_1(run: Path, step1: GPT) -> None:
    """The run directory holds step-1, published by latest, and nothing of step-2."""
    assert sorted(p.name for p in run.iterdir()) == ["latest", "step-1"]
    assert (run / "latest").read_text().strip() == "step-1"
    loaded, _, meta = load_checkpoint(run)
    assert meta["step"] == 1
    assert_same_weights(loaded, step1)


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
def test_failed_save_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sharded: bool, error: type[BaseException]
) -> None:
    run = tmp_path / "run"
    step1 = build_model(small_config(), seed=1)
    save_checkpoint(run / "step-1", step1, update_latest=True, step=1)

    real_save_file = ckpt_mod.save_file
    calls: list[str] = []

    def failing_save_file(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        calls.append(str(filename))
        real_save_file(tensors, filename, metadata=metadata)
        if len(calls) == (2 if sharded else 1):
            _truncate(Path(filename), 0.3)  # half-written, then the disk fills up
            raise error("No space left on device")

    monkeypatch.setattr(ckpt_mod, "save_file", failing_save_file)
    step2 = build_model(small_config(dim=64, n_heads=4), seed=2)
    with pytest.raises(error):
        save_checkpoint(
            run / "step-2",
            step2,
            update_latest=True,
            step=2,
            max_shard_bytes=8192 if sharded else ckpt_mod.DEFAULT_SHARD_BYTES,
        )
    assert len(calls) == (2 if sharded else 1)
    assert all(".step-2.partial" in c for c in calls)  # it wrote into the hidden directory
    assert not partial_dir(run / "step-2").exists()
    _only_step_1(run, step1)


_KILLED_SAVER = r"""
import json, sys, time
from pathlib import Path

import lmforge.checkpoint as ck
from lmforge.model import ModelConfig, build_model

run, marker = Path(sys.argv[1]), Path(sys.argv[2])
small, big = (ModelConfig(**json.loads(arg)) for arg in sys.argv[3:5])
ck.save_checkpoint(run / "step-1", build_model(small, seed=1), update_latest=True, step=1)
real_save_file = ck.save_file


def stalled_save_file(tensors, filename, metadata=None):
    # Half of the weights reach the disk, then the process hangs until it is killed.
    real_save_file(tensors, filename, metadata=metadata)
    data = Path(filename).read_bytes()
    Path(filename).write_bytes(data[: len(data) // 2])
    marker.write_text(str(filename))
    time.sleep(300)


ck.save_file = stalled_save_file
ck.save_checkpoint(run / "step-2", build_model(big, seed=2), update_latest=True, step=2)
"""


def test_sigkill_while_saving_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    run, marker, log = tmp_path / "run", tmp_path / "writing", tmp_path / "saver.log"
    small, big = small_config(), small_config(dim=64, n_layers=3)
    args = [json.dumps(dataclasses.asdict(c)) for c in (small, big)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILLED_SAVER, str(run), str(marker), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, f"saver exited early:\n{log.read_text()}"
            assert time.monotonic() < deadline, "saver never reached step-2's weights"
            time.sleep(0.05)
        # The saver is now inside save_file of step-2, with a half-written file on disk.
        assert (run / "latest").read_text().strip() == "step-1"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    stale = partial_dir(run / "step-2")
    assert Path(marker.read_text()).parent == stale  # killed mid-write in the hidden directory
    assert stale.is_dir()
    assert not (run / "step-2").exists()
    assert (run / "latest").read_text().strip() == "step-1"
    step1 = build_model(small, seed=1)
    loaded, _, meta = load_checkpoint(run)
    assert meta["step"] == 1
    assert_same_weights(loaded, step1)

    # The next attempt at step-2 succeeds and sweeps away the stale partial directory.
    step2 = build_model(big, seed=2)
    save_checkpoint(run / "step-2", step2, update_latest=True, step=2)
    assert not stale.exists()
    assert sorted(p.name for p in run.iterdir()) == ["latest", "step-1", "step-2"]
    loaded, _, meta = load_checkpoint(run)
    assert meta["step"] == 2
    assert loaded.cfg == big
    assert_same_weights(loaded, step2)


# ------------------------------------------------------------------------------- overwrite


def test_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "final"
    first = build_model(small_config(), seed=1)
    save_checkpoint(path, first, train_tokenizer(TEXTS, 300), step=1)
    assert (path / "tokenizer.json").exists()
    manifest_before = (path / "lmforge.json").read_text()

    second = build_model(small_config(tie_embeddings=False), seed=2)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(path, second, step=2)
    one_line_error(err, str(path), "overwrite=True")
    assert (path / "lmforge.json").read_text() == manifest_before  # untouched
    assert not partial_dir(path).exists()

    save_checkpoint(path, second, step=2, overwrite=True)
    assert not (path / "tokenizer.json").exists()  # the old content is gone, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no .old, no .partial
    loaded, tok, meta = load_checkpoint(path)
    assert tok is None
    assert meta["step"] == 2
    assert_same_weights(loaded, second)


def test_overwrite_after_a_crash_left_the_old_copy(tmp_path: Path) -> None:
    # A crash after an earlier overwrite renamed the new checkpoint in, before it removed
    # `.final.old`: the next overwrite must still work.
    path = tmp_path / "final"
    save_checkpoint(path, build_model(small_config(), seed=1), step=1)
    stale = tmp_path / ".final.old"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"stale")
    second = build_model(small_config(), seed=2)
    save_checkpoint(path, second, step=2, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    loaded, _, meta = load_checkpoint(path)
    assert meta["step"] == 2
    assert_same_weights(loaded, second)


# ------------------------------------------------------------------------------ engine state


def test_deepspeed_files_are_optional(tmp_path: Path) -> None:
    cfg = small_config()
    model = build_model(cfg, seed=4)
    path = tmp_path / "step-7"
    with staging(path) as tmp:
        write_model_files(tmp, cfg, model.state_dict())
        engine = tmp / "deepspeed" / "global_step7"
        engine.mkdir(parents=True)
        (engine / "mp_rank_00_model_states.pt").write_bytes(b"engine state " * 100)
        (tmp / "deepspeed" / "latest").write_text("global_step7")
        commit(tmp, path, {"model": dataclasses.asdict(cfg), "step": 7}, update_latest=True)
    assert (tmp_path / "latest").read_text().strip() == "step-7"

    meta = json.loads((path / "lmforge.json").read_text())
    engine_files = sorted(k for k in meta["files"] if k.startswith("deepspeed/"))
    assert engine_files == ["deepspeed/global_step7/mp_rank_00_model_states.pt", "deepspeed/latest"]
    verify_files(path, meta, engine=True)

    # Damaged engine state: loading the model does not look at it; an exact resume would.
    state_file = path / "deepspeed" / "global_step7" / "mp_rank_00_model_states.pt"
    _truncate(state_file)
    loaded, _, _ = load_checkpoint(tmp_path)
    assert_same_weights(loaded, model)
    with pytest.raises(CheckpointError) as err:
        verify_files(path, meta, engine=True)
    one_line_error(err, "mp_rank_00_model_states.pt", "truncated")

    # Removed engine state: removable without harm.
    (path / "deepspeed" / "latest").unlink()
    state_file.unlink()
    (path / "deepspeed" / "global_step7").rmdir()
    (path / "deepspeed").rmdir()
    loaded, _, loaded_meta = load_checkpoint(path)
    assert loaded_meta["step"] == 7
    assert_same_weights(loaded, model)
    verify_files(path, meta, engine=True)


# ----------------------------------------------------------------------------------- dtypes


def test_load_dtype(tmp_path: Path) -> None:
    cfg = small_config(tie_embeddings=False)
    model = build_model(cfg, seed=5)
    fp32 = save_checkpoint(tmp_path / "fp32", model)
    as_bf16, _, _ = load_checkpoint(fp32, dtype=torch.bfloat16)
    assert {p.dtype for p in as_bf16.parameters()} == {torch.bfloat16}
    assert_same_weights(as_bf16, model.to(torch.bfloat16))

    bf16_model = build_model(cfg, seed=6, dtype=torch.bfloat16)
    bf16 = save_checkpoint(tmp_path / "bf16", bf16_model)
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    kept, _, _ = load_checkpoint(bf16, dtype=None)
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    assert_same_weights(kept, bf16_model)
    ids = torch.randint(0, cfg.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.equal(kept(ids), bf16_model(ids))
    default, _, _ = load_checkpoint(bf16)  # fp32 unless told otherwise
    assert {p.dtype for p in default.parameters()} == {torch.float32}
    assert_same_weights(default, bf16_model.float())  # (Module.float() converts in place)


def test_config_dataclass_is_written_from_model(saved: tuple[Path, GPT]) -> None:
    ckpt, model = saved
    meta = json.loads((ckpt / "lmforge.json").read_text())
    assert ModelConfig(**meta["model"]) == model.cfg
    assert meta["stage"] == "pretrain"
    assert meta["step"] == 10


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_weight_files_follow_the_umask_like_every_other_file(tmp_path: Path, umask: int) -> None:
    """A team reading a shared run directory can read the weights whenever it can read the
    config: safetensors files get the umask's mode, not owner-only, sharded or not."""
    from lmforge.config import file_mode

    model = build_model(small_config(), seed=0)
    before = os.umask(umask)
    try:
        save_checkpoint(tmp_path / "one", model, None)
        save_checkpoint(tmp_path / "sharded", model, None, max_shard_bytes=20_000)
        expected = file_mode()
    finally:
        os.umask(before)
    assert expected == 0o666 & ~umask
    for folder in ("one", "sharded"):
        files = [p for p in (tmp_path / folder).iterdir() if p.is_file()]
        assert any(p.suffix == ".safetensors" for p in files)
        modes = {p.name: p.stat().st_mode & 0o777 for p in files}
        assert set(modes.values()) == {expected}, modes
