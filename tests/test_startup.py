"""Start-up: the help paths and --version import nothing heavy (checked in sys.modules of a fresh
process, not timed: bench/startup.py measures the time), `import lmforge` stays cheap yet still
registers lmforge's classes with transformers, the stage help printed from the generated index
is what the stage itself prints, and the constraints file pins every dependency installably."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ["pretrain", "sft", "reward", "dpo", "grpo", "ppo"]
TOOLS = ["export", "plot", "estimate", "report", "sample", "inspect", "config-reference"]
HEAVY = ["torch", "transformers", "deepspeed", "datasets", "numpy", "safetensors", "matplotlib"]

# Runs `lmforge ARGS...` in this process, then prints which heavy modules got imported.
PROBE = """
import json, sys
from lmforge.cli import main
try:
    code = main(sys.argv[2:])
except SystemExit as e:
    code = e.code
sys.stdout.flush()
heavy = [m for m in json.loads(sys.argv[1]) if m in sys.modules]
print("\\nPROBE", json.dumps({"code": code, "heavy": heavy}))
"""


def run_cli(*args: str) -> tuple[str, dict]:
    """`lmforge ARGS` in a fresh interpreter: (its output, {"code", "heavy"})."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(HEAVY), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out, _, probe = proc.stdout.rpartition("\nPROBE ")
    return out, json.loads(probe)


@pytest.mark.parametrize(
    "args",
    [["--help"], ["--version"], ["--version", "--verbose"]]
    + [[stage, "--help"] for stage in STAGES]
    + [[tool, "--help"] for tool in TOOLS],
    ids=" ".join,
)
def test_help_and_version_import_nothing_heavy(args: list[str]) -> None:
    out, probe = run_cli(*args)
    assert probe == {"code": 0, "heavy": []}, f"lmforge {' '.join(args)}: {probe}"
    if args[-1] == "--help":
        assert out.startswith("usage: lmforge"), out


def test_version_is_the_installed_package_version() -> None:
    out, _ = run_cli("--version")
    assert out.strip() == f"lmforge {metadata.version('lmforge')}"
    verbose, _ = run_cli("-V", "--verbose")
    lines = dict(line.split(" ", 1) for line in verbose.strip().splitlines())
    for lib in ("torch", "deepspeed", "transformers"):
        assert lines[lib] == metadata.version(lib)


def test_stage_help_comes_from_the_index() -> None:
    out, _ = run_cli("dpo", "--config", "x.yaml", "--help")
    index = json.loads((REPO / "lmforge" / "stage_index.json").read_text())
    assert out == index["dpo"]["help"]
    assert "top-level keys: run_dir, " in out and "docs/config.md" in out


def test_stage_index_is_current() -> None:
    """The index holds each stage's own --help text (run_entry's parser, the config's top-level
    keys); it is regenerated with docs/config.md."""
    from lmforge.config_reference import INDEX, REFRESH, render_index

    if INDEX.read_text(encoding="utf-8") != render_index():
        pytest.fail(f"{INDEX.name} is out of date; refresh it with: {REFRESH}", pytrace=False)


# Importing lmforge and then transformers, and the other way round: the lmforge model type
# loads through transformers' Auto classes either way, and `import lmforge` alone loads no torch.
REGISTRATION = """
import sys
order = sys.argv[1]
if order == "transformers-first":
    import transformers
import lmforge
light = "torch" not in sys.modules
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
config = AutoConfig.for_model("lmforge")
assert type(config).__name__ == "LmforgeConfig", type(config)
assert AutoModelForCausalLM._model_mapping[type(config)].__name__ == "LmforgeForCausalLM"
assert lmforge.GPT.__name__ == "GPT" and callable(lmforge.load_checkpoint)
assert lmforge.hf.LmforgeConfig is type(config)  # submodules are attributes, as before
assert not hasattr(lmforge, "no_such_name")
print(light)
"""


@pytest.mark.parametrize("order", ["lmforge-first", "transformers-first"])
def test_import_lmforge_registers_with_transformers(order: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", REGISTRATION, order],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(order == "lmforge-first")


# ---------------------------------------------------------------------------- constraints


def _lock_module():
    spec = importlib.util.spec_from_file_location("lock", REPO / ".ci" / "lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_constraints_pin_every_dependency_without_local_labels() -> None:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==" and "+" not in spec.version, line
            pins[canonicalize_name(req.name)] = req
    assert "lmforge" not in pins
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["dev"]
    for text in declared:
        req = Requirement(text)
        pin = pins[canonicalize_name(req.name)]  # every direct dependency is pinned
        (spec,) = pin.specifier
        assert req.specifier.contains(spec.version, prereleases=True), (text, str(pin))


def test_lock_markers_only_where_a_supported_python_is_excluded() -> None:
    lock = _lock_module()
    assert lock.python_marker(None) == ""
    assert lock.python_marker(">=3.8") == "" and lock.python_marker(">=3.10.0") == ""
    assert lock.python_marker("!=3.0.*,>=3.6") == ""
    assert lock.python_marker(">=3.11") == 'python_full_version >= "3.11"'
    assert lock.python_marker("!=3.14.1,>=3.11") == (
        'python_full_version != "3.14.1" and python_full_version >= "3.11"'
    )
