"""Bad input, everywhere: configs, data files and checkpoints fed to the entry points
(pretrain/train.py and finetune/sft.py through their main(argv)) and to load_checkpoint. Each is
ONE clear error line naming the key, file or record, a non-zero exit, and nothing in the run
directory changed. The config loader and the data readers are fuzzed with hypothesis: any input
loads or raises LmforgeError, never another exception."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lmforge.checkpoint import load_checkpoint, sha256_file
from lmforge.config import from_dict, load_config, parse_overrides
from lmforge.data.chat import read_chat_records
from lmforge.data.config import DataConfig
from lmforge.data.corpus import load_corpus
from lmforge.data.sources import resolve_source
from lmforge.errors import LmforgeError

PRETRAIN_BASE = [
    "--model=debug",
    "--tokenizer.vocab_size=512",
    "--data.source=builtin",
    "--data.max_documents=300",
    "--data.seq_len=64",
    "--train.steps=2",
    "--train.global_batch_size=8",
    "--train.micro_batch_size=8",
    "--train.eval_every=0",
    "--train.eval_batches=1",
    "--train.samples=0",
]
SFT_BASE = [
    "--data.num_train=64",
    "--data.num_heldout=4",
    "--data.seq_len=64",
    "--train.steps=2",
    "--train.global_batch_size=8",
    "--train.micro_batch_size=8",
    "--train.eval_every=0",
]


@pytest.fixture(autouse=True)
def _clean_process_state() -> Iterator[None]:
    """The entry points start a (1-process) process group and export launcher variables: undo
    both after each test, so later tests start from a clean process."""
    env = dict(os.environ)
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under folder with its mtime and size."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run directory that already holds things a failed run must leave alone."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("run_dir: keep-me\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    (run / "notes.txt").write_text("mine\n")
    return run


def one_error(code: int, err: str, *needles: str) -> str:
    """The single `error:` line of a failed entry point, after checking what it must hold."""
    assert code != 0, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def write_data(folder: Path, kind: str) -> Path:
    """A bad data file of the given kind."""
    if kind == "empty":
        (path := folder / "data.jsonl").write_text("")
    elif kind == "binary":
        (path := folder / "corpus.txt").write_bytes(bytes(range(256)) * 40)
    elif kind == "chat binary":
        (path := folder / "data.jsonl").write_bytes(b'{"text": "a"}\n' + bytes(range(256)))
    elif kind == "invalid json":
        (path := folder / "data.jsonl").write_text('{"text": "fine"}\n{"text": "broken\n')
    elif kind == "valid":
        (path := folder / "data.jsonl").write_text('{"text": "hello world"}\n' * 50)
    elif kind == "missing field":
        (path := folder / "data.jsonl").write_text('{"body": "no text field"}\n' * 3)
    elif kind == "enormous line":
        path = folder / "data.jsonl"
        with open(path, "w") as f:
            f.write('{"text": "' + "x" * (50 * 2**20) + '"}\n')
    elif kind == "chat missing field":
        (path := folder / "data.jsonl").write_text('{"messages": [{"role": "user"}]}\n')
    elif kind == "chat enormous line":
        path = folder / "data.jsonl"
        big = "y" * (50 * 2**20)
        path.write_text(json.dumps({"prompt": "hi", "completion": big}) + "\n")
    else:
        raise ValueError(kind)
    return path


PRETRAIN_CASES = [
    # (id, extra arguments, data kind or None, text the error line must hold)
    ("unknown key", ["--train.stepz=3"], None, "did you mean 'train.steps'"),
    ("wrong type", ["--train.steps=four"], None, "train.steps: expected int"),
    ("zero size", ["--train.micro_batch_size=0"], None, "train.micro_batch_size"),
    ("negative size", ["--model.dim=-64"], None, "model.dim"),
    ("heads vs width", ["--model.n_heads=5"], None, "model.n_heads"),
    ("kv heads", ["--model.n_kv_heads=3"], None, "model.n_kv_heads"),
    ("position limit", ["--data.seq_len=512"], None, "data.seq_len"),
    ("bad fault policy", ["--faults.spike_policy=drop"], None, "faults.spike_policy"),
    (
        "deepspeed contradiction",
        ["--engine.deepspeed='{\"train_micro_batch_size_per_gpu\": 3}'"],
        None,
        "train_micro_batch_size_per_gpu",
    ),
    (
        "deepspeed offload",
        ["--engine.offload_params=true", "--engine.zero_stage=2"],
        None,
        "engine.offload_params",
    ),
    ("empty file", [], "empty", "data.jsonl"),
    ("binary file", [], "binary", "corpus.txt: binary data"),
    ("invalid json", [], "invalid json", "line 2"),
    ("missing field", [], "missing field", "'text'"),
    ("other text field", ["--data.text_field=body"], "valid", "'body'"),
    ("enormous line", [], "enormous line", "max_record_bytes"),
]


@pytest.mark.parametrize(
    ("extra", "data", "needle"), [c[1:] for c in PRETRAIN_CASES], ids=[c[0] for c in PRETRAIN_CASES]
)
def test_pretrain_bad_input(
    run_dir: Path,
    cache: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    data: str | None,
    needle: str,
) -> None:
    from pretrain.train import main

    args = [*PRETRAIN_BASE, f"--run_dir={run_dir}", f"--data.cache_dir={cache}", *extra]
    if data is not None:
        args.append(f"--data.source={write_data(tmp_path, data)}")
    before = snapshot(run_dir)
    code = main(args)
    one_error(code, capsys.readouterr().err, needle)
    assert snapshot(run_dir) == before


@pytest.fixture
def bad_checkpoint(task_base: Path, tmp_path: Path) -> Any:
    """Copies of the shared task model's checkpoint, broken one way each."""

    def make(kind: str) -> Path:
        ckpt = tmp_path / "ckpt" / "step-000000"
        shutil.copytree(task_base / "step-000000", ckpt)
        meta_file = ckpt / "lmforge.json"
        meta = json.loads(meta_file.read_text())
        weights = ckpt / "model.safetensors"
        if kind == "missing file":
            (ckpt / "generation_config.json").unlink()
        elif kind == "hash mismatch":
            data = bytearray(weights.read_bytes())
            data[-3] ^= 0xFF
            weights.write_bytes(bytes(data))
        elif kind in ("wrong shape", "pickle"):
            if kind == "wrong shape":
                from safetensors.torch import load_file

                tensors = load_file(weights)
                tensors["model.norm.weight"] = torch.ones(3)
                save_file(tensors, weights, metadata={"format": "pt"})
            else:  # a pickle that would run code if it were ever unpickled
                torch.save({"x": Boom()}, weights)
            meta["files"]["model.safetensors"] = {
                "size": weights.stat().st_size,
                "sha256": sha256_file(weights),
            }
            meta_file.write_text(json.dumps(meta))
        elif kind == "pickle only":
            for name in ("model.safetensors", "lmforge.json"):
                (ckpt / name).unlink()
            torch.save({"x": Boom()}, ckpt / "pytorch_model.bin")
        return ckpt

    return make


class Boom:
    """Unpickling this creates a marker file: proof that a pickle was loaded."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(os.environ.get("BOOM_MARKER", "/nonexistent/boom")),))


CHECKPOINT_CASES = [
    ("missing file", "generation_config.json"),
    ("hash mismatch", "sha256"),
    ("wrong shape", "norm.weight"),
    ("pickle", "model.safetensors"),
    ("pickle only", "pickle weights are never loaded"),
]


@pytest.mark.parametrize(("kind", "needle"), CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_bad_checkpoints(
    bad_checkpoint: Any,
    run_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    needle: str,
) -> None:
    marker = tmp_path / "unpickled"
    monkeypatch.setenv("BOOM_MARKER", str(marker))
    ckpt = bad_checkpoint(kind)
    with pytest.raises(LmforgeError) as err:  # the library call
        load_checkpoint(ckpt)
    assert needle in str(err.value) and "\n" not in str(err.value)
    from finetune.sft import main

    before = snapshot(run_dir)
    code = main([*SFT_BASE, f"--init_from={ckpt}", f"--run_dir={run_dir}"])
    one_error(code, capsys.readouterr().err, needle)
    assert snapshot(run_dir) == before
    assert not marker.exists(), "a pickle was unpickled"


SFT_CASES = [
    ("position limit", ["--data.seq_len=4096"], None, "data.seq_len"),
    ("empty file", [], "empty", "data.jsonl"),
    ("binary file", [], "chat binary", "binary data"),
    ("invalid json", [], "invalid json", "line 2"),
    ("missing field", [], "chat missing field", "content"),
    ("enormous line", [], "chat enormous line", "max_record_bytes"),
    ("unknown key", ["--data.sorce=x"], None, "did you mean 'data.source'"),
]


@pytest.mark.parametrize(
    ("extra", "data", "needle"), [c[1:] for c in SFT_CASES], ids=[c[0] for c in SFT_CASES]
)
def test_sft_bad_input(
    task_base: Path,
    run_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    data: str | None,
    needle: str,
) -> None:
    from finetune.sft import main

    args = [*SFT_BASE, f"--init_from={task_base}", f"--run_dir={run_dir}", *extra]
    if data is not None:
        args.append(f"--data.source={write_data(tmp_path, data)}")
    before = snapshot(run_dir)
    code = main(args)
    one_error(code, capsys.readouterr().err, needle)
    assert snapshot(run_dir) == before


# -- fuzzing --------------------------------------------------------------------------------

FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def _keys() -> list[str]:
    from lmforge.config import describe
    from pretrain.train import PretrainConfig

    return [key for key, *_ in describe(PretrainConfig)]


KEYS = _keys()


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=10), values, max_size=4))
def test_fuzz_from_dict(flat: dict[str, Any]) -> None:
    from pretrain.train import PretrainConfig

    nested: dict[str, Any] = {}
    for key, value in flat.items():  # "train.steps" -> {"train": {"steps": ...}}
        *parents, leaf = key.split(".")
        node: Any = nested
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                break
        else:
            node[leaf] = value
    with contextlib.suppress(LmforgeError):
        from_dict(PretrainConfig, nested)


override_text = st.text(alphabet=string.printable, max_size=30)


@FUZZ
@given(st.lists(override_text | st.sampled_from(KEYS).map(lambda k: f"--{k}="), max_size=4))
def test_fuzz_overrides(args: list[str]) -> None:
    from pretrain.train import PretrainConfig

    try:
        parse_overrides(args)
        load_config(PretrainConfig, None, args)
    except LmforgeError:
        pass


@FUZZ
@given(st.text(max_size=200) | st.sampled_from(KEYS).map(lambda k: f"{k}: [1, {{a: b}}]"))
def test_fuzz_yaml_file(tmp_path: Path, text: str) -> None:
    from pretrain.train import PretrainConfig

    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    with contextlib.suppress(LmforgeError):
        load_config(PretrainConfig, path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "messages",
                    "role",
                    "content",
                    "prompt",
                    "completion",
                    "chosen",
                    "rejected",
                    "text",
                    "answer",
                ]
            )
            | st.text(max_size=5),
            inner,
            max_size=4,
        )
    ),
    max_leaves=10,
)
lines = st.lists(
    json_values.map(lambda v: json.dumps(v))
    | st.text(max_size=30)
    | st.binary(max_size=20).map(lambda b: b.decode("latin-1")),
    min_size=0,
    max_size=5,
)


def _write_lines(folder: Path, items: list[str]) -> Path:
    path = folder / "data.jsonl"
    path.write_bytes("\n".join(items).encode("utf-8", errors="surrogatepass"))
    return path


@FUZZ
@given(lines, st.sampled_from(["sft", "preference"]))
def test_fuzz_chat_reader(tmp_path: Path, items: list[str], kind: str) -> None:
    path = _write_lines(tmp_path, items)
    with contextlib.suppress(LmforgeError):
        read_chat_records(str(path), "auto", kind)  # type: ignore[arg-type]


records = st.dictionaries(
    st.sampled_from(["text", "body", "id"]), json_values, min_size=1, max_size=3
)
corpus_lines = st.lists(
    records.map(json.dumps) | records.map(json.dumps) | st.text(max_size=20), min_size=1, max_size=5
)


@FUZZ
@given(corpus_lines, st.sampled_from(["text", "body"]))
def test_fuzz_corpus_reader(tmp_path: Path, items: list[str], field: str) -> None:
    path = _write_lines(tmp_path, items)
    cfg = DataConfig(source=str(path), text_field=field, cache_dir=str(tmp_path / "cache"))
    with contextlib.suppress(LmforgeError):
        load_corpus(resolve_source(cfg), cfg, tmp_path / "hf")
