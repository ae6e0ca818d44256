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
import time
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


ASSISTANT = {"role": "assistant", "content": "hello"}
CHAT_LINE = json.dumps({"messages": [{"role": "user", "content": "hi"}, ASSISTANT]}) + "\n"


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
    elif kind == "deep json":  # pyarrow's reader crashed the process on this (a segfault)
        deep = "[" * 100_000 + "]" * 100_000
        (path := folder / "data.jsonl").write_text('{"text": "fine"}\n{"text": ' + deep + "}\n")
    elif kind == "huge number":  # past Python's int digit limit: a ValueError in json.loads
        line = CHAT_LINE[:-2] + ', "n": ' + "7" * 5000 + "}\n"
        (path := folder / "data.jsonl").write_text(CHAT_LINE + line)
    elif kind == "chat role list":
        bad = {"messages": [{"role": ["user"], "content": "hi"}, ASSISTANT]}
        (path := folder / "data.jsonl").write_text(CHAT_LINE + json.dumps(bad) + "\n")
    elif kind == "chat content object":
        bad = {"messages": [{"role": "user", "content": {"text": "hi"}}, ASSISTANT]}
        (path := folder / "data.jsonl").write_text(CHAT_LINE + json.dumps(bad) + "\n")
    elif kind == "chat surrogate":
        bad_line = CHAT_LINE.replace('"hi"', '"a\\ud800"')  # half a surrogate pair
        (path := folder / "data.jsonl").write_text(CHAT_LINE + bad_line)
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
    ("deeply nested json", [], "deep json", "line 2: JSON nested more than"),
    ("seed past 64 bits", ["--train.seed=99999999999999999999999"], None, "train.seed"),
    ("negative seed", ["--data.seed=-1"], None, "data.seed"),
    ("int past 64 bits", ["--train.steps=" + "9" * 25], None, "train.steps: int 999"),
    (
        "model too large for memory",
        ["--model.dim=65536", "--model.n_heads=64", "--model.n_layers=64"],
        None,
        "memory: this run needs",
    ),
    (
        "micro-batch too large for memory",
        ["--train.micro_batch_size=4000000", "--train.global_batch_size=4000000"],
        None,
        "train.micro_batch_size=4000000",
    ),
    ("deepspeed top-level list", ["--engine.deepspeed='[1, 2]'"], None, "top level must be"),
    (
        "deepspeed section a number",
        ["--engine.deepspeed='{\"zero_optimization\": 2}'"],
        None,
        "'zero_optimization' must be an object",
    ),
    (
        "deepspeed section a string",
        ['--engine.deepspeed=\'{"bf16": "yes"}\''],
        None,
        "'bf16' must be an object",
    ),
    (
        "deepspeed stage a string",
        ['--engine.deepspeed=\'{"zero_optimization": {"stage": "two"}}\''],
        None,
        "'zero_optimization.stage' must be 0, 1, 2, 3",
    ),
    (
        "deepspeed offload a list",
        ['--engine.deepspeed=\'{"zero_optimization": {"offload_param": ["cpu"]}}\''],
        None,
        "'zero_optimization.offload_param' must be an object",
    ),
    (
        "mixture weight",
        ["--data.sources=[{source: builtin, weight: 0}]"],
        None,
        "sources[0].weight",
    ),
    (
        "mixture unknown key",
        ["--data.sources=[{source: builtin, wieght: 2}]"],
        None,
        "did you mean 'data.sources[0].weight'",
    ),
    ("mixture no source", ["--data.sources=[{weight: 2}]"], None, "data.sources[0].source"),
    ("source and sources", ["--data.sources=[builtin]"], "valid", "data.source and data.sources"),
    (
        "mixture missing file",
        ["--data.sources=[/nonexistent/corpus.jsonl, builtin]"],
        None,
        "data.sources[0].source '/nonexistent/corpus.jsonl': no such file",
    ),
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
    ("huge number", [], "huge number", "line 2: a value cannot be read"),
    ("role a list", [], "chat role list", "message 0 has a role that is a list"),
    ("content an object", [], "chat content object", "the content of message 0 is an object"),
    ("unpaired surrogate", [], "chat surrogate", "unpaired surrogate"),
    ("deeply nested json", [], "deep json", "line 2: JSON nested more than"),
    (
        "mixture weight",
        ["--data.sources=[{source: builtin, weight: -1}]"],
        None,
        "sources[0].weight",
    ),
    (
        "mixture missing file",
        ["--data.sources=[builtin, /nonexistent/chats.jsonl]"],
        None,
        "data.sources[1].source '/nonexistent/chats.jsonl': no such file",
    ),
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


def _alias_bomb() -> str:
    """A "billion laughs" YAML: nine aliases of nine aliases ... (9**9 values once expanded),
    under a key that exists, so nothing refuses it before its values are looked at."""
    layers = ["&a0 [x, x, x, x, x, x, x, x, x]"]
    layers += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    return f"resume:\n  allow_changes: [{', '.join(layers)}]\n"


CONFIG_FILES = [
    ("not utf-8", b"train:\n  steps: 2\n# caf\xe9\n", "not UTF-8 text (byte 0xe9 at offset"),
    ("alias bomb", _alias_bomb().encode(), "aliases expand to more than 100,000 values"),
    ("alias loop", b"train: &t {steps: 2, more: *t}\n", "an alias refers to the value that"),
    ("nested too deep", b"train: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested too deeply"),
    ("number past the digit limit", b"train: {steps: " + b"9" * 5000 + b"}\n", "Exceeds the limit"),
]


@pytest.mark.parametrize(
    ("text", "needle"), [c[1:] for c in CONFIG_FILES], ids=[c[0] for c in CONFIG_FILES]
)
def test_bad_config_file(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: bytes, needle: str
) -> None:
    from pretrain.train import main

    config = tmp_path / "run.yaml"
    config.write_bytes(text)
    before = snapshot(run_dir)
    start = time.perf_counter()
    code = main([f"--config={config}", f"--run_dir={run_dir}"])
    elapsed = time.perf_counter() - start
    one_error(code, capsys.readouterr().err, str(config), needle)
    assert snapshot(run_dir) == before
    assert elapsed < 30, f"took {elapsed:.1f} s"  # the alias bomb took 68 s to be refused


DEEPSPEED_FILES = [
    ("top-level list", [{"zero_optimization": {"stage": 2}}], "the top level must be an object"),
    ("optimizer a string", {"optimizer": "adamw"}, "'optimizer' must be an object"),
    ("params a list", {"optimizer": {"params": [0.001]}}, "'optimizer.params' must be an object"),
    ("fp16 a number", {"fp16": 1}, "'fp16' must be an object"),
    ("stage a bool", {"zero_optimization": {"stage": True}}, "'zero_optimization.stage'"),
]


@pytest.mark.parametrize(
    ("content", "needle"), [c[1:] for c in DEEPSPEED_FILES], ids=[c[0] for c in DEEPSPEED_FILES]
)
def test_bad_deepspeed_file(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: Any, needle: str
) -> None:
    """A DeepSpeed JSON file whose sections have the wrong shape: one line naming the file and
    the key, at config load."""
    from pretrain.train import main

    ds = tmp_path / "my_deepspeed.json"
    ds.write_text(json.dumps(content))
    before = snapshot(run_dir)
    code = main([*PRETRAIN_BASE, f"--run_dir={run_dir}", f"--engine.deepspeed={ds}"])
    one_error(code, capsys.readouterr().err, f"engine.deepspeed: {ds}: ", needle)
    assert snapshot(run_dir) == before


REWARDS = """
import os, sys, time

def leave(prompts, completions, answers, tasks):
    sys.exit(0)

def fail(prompts, completions, answers, tasks):
    raise KeyError("no score for this")

def stall(prompts, completions, answers, tasks):
    while True:  # swallowing every Exception must not keep it alive past its timeout_s
        try:
            time.sleep(0.05)
        except Exception:
            pass

def fail_on_rank_one(prompts, completions, answers, tasks):
    if os.environ.get("RANK") == "1":
        raise ValueError("rank one cannot score")
    return [0.0] * len(completions)
"""
GRPO_BASE = [
    "--train.steps=2",
    "--train.global_batch_size=4",
    "--train.micro_batch_size=4",
    "--group_size=2",
    "--max_new_tokens=4",
    "--data.num_train=16",
    "--data.num_heldout=2",
    "--train.eval_every=0",
]
REWARD_CASES = [  # a function that raises: tests/test_rewards.py
    ("sys.exit(0)", "leave", 60, "called sys.exit(0)"),
    ("never returns", "stall", 1, "did not return within 1 s"),
]


@pytest.mark.parametrize(
    ("function", "timeout", "needle"),
    [c[1:] for c in REWARD_CASES],
    ids=[c[0] for c in REWARD_CASES],
)
def test_reward_function_failures(
    task_base: Path, tmp_path: Path, function: str, timeout: int, needle: str
) -> None:
    """A reward function that exits or hangs ends the GRPO run (a real process: DeepSpeed keeps
    per-process state) with one line naming it and a non-zero exit, before any step is saved."""
    from stagerun import run_stage

    (tmp_path / "my_rewards.py").write_text(REWARDS)
    name = f"{tmp_path / 'my_rewards.py'}:{function}"
    run = tmp_path / "grpo"
    proc = run_stage(
        "finetune/grpo.py",
        [*GRPO_BASE, f"--init_from={task_base}", f"--run_dir={run}",
         f"--rewards=[{{name: '{name}', timeout_s: {timeout}}}]"],
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    one_error(proc.returncode, proc.stderr, f"reward function '{name}'", needle)
    assert not (run / "latest").exists()  # nothing trained, nothing saved


def test_reward_failure_on_one_rank_stops_every_rank(task_base: Path, tmp_path: Path) -> None:
    """Two ranks (srun-style, no launcher to tear them down): the function fails on rank 1
    only, and rank 0 stops with the same one line instead of waiting for rank 1 forever."""
    from stagerun import spawn_group, wait_group

    (tmp_path / "my_rewards.py").write_text(REWARDS)
    name = f"{tmp_path / 'my_rewards.py'}:fail_on_rank_one"
    args = [*GRPO_BASE, f"--init_from={task_base}", f"--run_dir={tmp_path / 'grpo'}",
            f"--rewards=[{{name: '{name}'}}]"]  # fmt: skip
    procs = spawn_group("finetune/grpo.py", args, nproc=2, log_dir=tmp_path / "logs")
    try:
        codes = wait_group(procs, timeout=300)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    logs = [(tmp_path / "logs" / f"rank{r}.log").read_text() for r in range(2)]
    assert codes == [2, 2], logs
    one_error(1, logs[0], "raised ValueError: rank one cannot score (on rank 1)")
    one_error(1, logs[1].replace("error (rank 1):", "error:"), "rank one cannot score")


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


def _latin1(raw: bytes) -> str:
    return raw.decode("latin-1")  # one character per byte: encoded back, the same bytes


yaml_pieces = st.sampled_from(
    ["&a [x, x]\n", "*a\n", "[*a, *a, *a]\n", "train:\n", "  steps: ", "seed: ", "<<: *a\n",
     "{", "}", "[", "]", "\xff", "9" * 30, "\n", "model: debug\n", "- "]
)  # fmt: skip


@FUZZ
@given(st.lists(yaml_pieces | st.binary(max_size=8).map(_latin1), max_size=12))
def test_fuzz_yaml_bytes(tmp_path: Path, pieces: list[str]) -> None:
    """YAML files of any bytes (not UTF-8 too) built from aliases, merges, brackets and keys."""
    from pretrain.train import PretrainConfig

    path = tmp_path / "config.yaml"
    path.write_bytes("".join(pieces).encode("latin-1"))  # "\xff" pieces: bytes not UTF-8
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


# Lines that broke the readers before: nesting past any parser's depth, an integer past
# Python's digit limit, half a surrogate pair, roles and contents of every JSON type.
odd_lines = st.sampled_from(
    [
        '{"text": ' + "[" * 3000 + "]" * 3000 + "}",
        '{"text": "a", "n": ' + "9" * 5000 + "}",
        '{"text": "a\\ud800b"}',
        '{"messages": [{"role": "user", "content": "x\\udfff"}]}',
        "[" * 800 + "]" * 800,
        '{"text": NaN, "x": Infinity}',
    ]
)
message = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["user", "assistant", "system", "bot"]) | json_values,
        "content": st.text(max_size=8) | json_values,
    },
)
chat_record = st.fixed_dictionaries(
    {},
    optional={
        "messages": st.lists(message, max_size=3) | json_values,
        "prompt": st.text(max_size=8) | st.lists(message, max_size=2) | json_values,
        "completion": st.text(max_size=8) | st.lists(message, max_size=2),
        "chosen": st.text(max_size=8) | st.lists(message, max_size=2),
        "rejected": st.text(max_size=8) | json_values,
        "answer": st.text(max_size=4) | json_values,
    },
)


@FUZZ
@given(
    st.lists(chat_record.map(json.dumps) | odd_lines, min_size=1, max_size=4),
    st.sampled_from(["sft", "preference"]),
    st.sampled_from([".jsonl", ".json"]),
)
def test_fuzz_chat_records(tmp_path: Path, items: list[str], kind: str, suffix: str) -> None:
    """Chat files (JSON Lines, or a .json array of the same records) with odd records."""
    path = tmp_path / f"chat{suffix}"
    text = "\n".join(items) if suffix == ".jsonl" else "[\n" + ",\n".join(items) + "\n]"
    path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
    with contextlib.suppress(LmforgeError):
        read_chat_records(str(path), "auto", kind)  # type: ignore[arg-type]


@settings(FUZZ, max_examples=30)
@given(st.lists(records.map(json.dumps) | odd_lines, min_size=1, max_size=4))
def test_fuzz_corpus_odd_lines(tmp_path: Path, items: list[str]) -> None:
    """Corpus files whose records nest deeply, hold huge numbers or broken escapes: `datasets`
    (pyarrow) must never see a record that crashes the process."""
    path = _write_lines(tmp_path, items)
    cfg = DataConfig(source=str(path), cache_dir=str(tmp_path / "cache"))
    with contextlib.suppress(LmforgeError):
        load_corpus(resolve_source(cfg), cfg, tmp_path / "hf")


DS_KEYS = [
    "zero_optimization", "stage", "offload_optimizer", "offload_param", "device", "bf16", "fp16",
    "enabled", "optimizer", "scheduler", "type", "params", "lr", "betas", "eps", "weight_decay",
    "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
    "gradient_clipping", "activation_checkpointing", "amp",
]  # fmt: skip
ds_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.sampled_from(["auto", "cpu", "none", "adamw", "WarmupLR"])
    | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(DS_KEYS) | st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)


@FUZZ
@given(
    ds_values | st.dictionaries(st.sampled_from(DS_KEYS), ds_values, max_size=5),
    st.sampled_from([None, 0, 1, 2, 3]),
    st.sampled_from([None, True, False]),
    st.sampled_from([None, True, False]),
    st.sampled_from(["auto", "bf16", "fp16", "fp32"]),
)
def test_fuzz_deepspeed_json(
    tmp_path: Path,
    value: Any,
    stage: int | None,
    offload_optimizer: bool | None,
    offload_params: bool | None,
    precision: str,
) -> None:
    """Any JSON as the DeepSpeed config (inline, in a file, or a dict handed to the resolver):
    it resolves or raises LmforgeError."""
    from lmforge.engine import EngineConfig, load_deepspeed_json, resolve_deepspeed_config
    from lmforge.optim import OptimConfig

    text = json.dumps(value)
    engine = EngineConfig(
        deepspeed=text,
        zero_stage=stage,
        offload_optimizer=offload_optimizer,
        offload_params=offload_params,
        precision=precision,  # type: ignore[arg-type]
    )
    path = tmp_path / "ds.json"
    path.write_text(text)
    for source in (text, str(path)):
        with contextlib.suppress(LmforgeError):
            ds = load_deepspeed_json(source)
            resolve_deepspeed_config(
                ds, cfg=engine, optim=OptimConfig(), micro_batch=4, grad_accum=2, world=2
            )
    with contextlib.suppress(LmforgeError):  # a dict built in code takes the same checks
        resolve_deepspeed_config(
            value, cfg=engine, optim=OptimConfig(), micro_batch=4, grad_accum=2, world=2
        )


@settings(FUZZ, max_examples=25)
@given(st.lists(chat_record, max_size=3), st.sampled_from(["sft", "preference", "corpus"]))
def test_fuzz_parquet_records(tmp_path: Path, items: list[dict[str, Any]], kind: str) -> None:
    """Parquet files of odd records (whatever pyarrow can store: one type per column, maybe no
    rows at all), read as chats or as a corpus."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from hypothesis import assume

    path = tmp_path / "data.parquet"
    try:
        table = pa.Table.from_pylist(items) if items else pa.table({"text": pa.array([], "string")})
        pq.write_table(table, path)
    except (pa.ArrowException, OverflowError):
        assume(False)  # pyarrow cannot store these records: no such parquet file exists
        return
    with contextlib.suppress(LmforgeError):
        if kind == "corpus":
            cfg = DataConfig(source=str(path), cache_dir=str(tmp_path / "cache"))
            load_corpus(resolve_source(cfg), cfg, tmp_path / "hf")
        else:
            read_chat_records(str(path), "auto", kind)  # type: ignore[arg-type]
