"""Reward functions: the built-ins on hand-made completions of every task, their weighted sum,
user functions loaded by module or file, and one-line errors that name the function."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from finetune.rewards import (
    ANSWER_FORMATS,
    RewardError,
    Rewards,
    RewardSpec,
    build_reward_fn,
    call_reward_fn,
    contains,
    load_reward_fn,
)
from lmforge.config import from_dict, option
from lmforge.data.tasks import CHATTER, TASKS, task_examples
from lmforge.errors import ConfigError

# (task, prompt, answer, completion, exact_answer, format) written out by hand.
CASES = [
    ("add", "What is 23 + 48?", "71", "71", 1.0, 1.0),
    ("add", "What is 23 + 48?", "71", " 71\n", 1.0, 1.0),  # surrounding whitespace is fine
    ("add", "What is 23 + 48?", "71", "72", 0.0, 1.0),  # wrong, but shaped like an answer
    ("add", "What is 23 + 48?", "71", "The answer is 71.", 0.0, 0.0),
    ("add", "What is 23 + 48?", "71", "71!", 0.0, 0.0),
    ("add", "What is 23 + 48?", "71", "71\n71", 0.0, 0.0),  # a second line
    ("add", "What is 23 + 48?", "71", "", 0.0, 0.0),
    ("compare", "Which is larger: 37 or 52?", "52", "52", 1.0, 1.0),
    ("compare", "Which is larger: 37 or 52?", "52", "37", 0.0, 1.0),
    ("compare", "Which is larger: 37 or 52?", "52", "52 is larger", 0.0, 0.0),
    ("reverse", "Reverse the word: cat", "tac", "tac", 1.0, 1.0),
    ("reverse", "Reverse the word: cat", "tac", "cat", 0.0, 1.0),
    ("reverse", "Reverse the word: cat", "tac", "Tac", 0.0, 0.0),  # capital letter
    ("reverse", "Reverse the word: cat", "tac", "t a c", 0.0, 0.0),
    ("reverse", "Reverse the word: cat", "tac", "42", 0.0, 0.0),
    ("sort", "Sort these digits: 3 1 2", "1 2 3", "1 2 3", 1.0, 1.0),
    ("sort", "Sort these digits: 3 1 2", "1 2 3", "1 3 2", 0.0, 1.0),
    ("sort", "Sort these digits: 3 1 2", "1 2 3", "123", 0.0, 0.0),
    ("sort", "Sort these digits: 3 1 2", "1 2 3", "1, 2, 3", 0.0, 0.0),
    ("sort", "Sort these digits: 3 1 2", "1 2 3", "1  2 3", 0.0, 0.0),  # double space
    ("count", "How many times does the letter a appear in banana?", "3", "3", 1.0, 1.0),
    ("count", "How many times does the letter a appear in banana?", "3", "2", 0.0, 1.0),
    ("count", "How many times does the letter a appear in banana?", "3", "three", 0.0, 0.0),
]


def columns(cases: list[tuple[str, str, str, str, float, float]]) -> dict[str, list]:
    """CASES-like rows as columns (the reward functions' four lists plus the expected values)."""
    task, prompt, answer, completion, exact, fmt = (list(c) for c in zip(*cases, strict=True))
    return dict(
        prompts=prompt, completions=completion, answers=answer, tasks=task, exact=exact, fmt=fmt
    )


def columns_of(completions: list[str]) -> dict[str, list]:
    """Columns for `completions` with placeholder prompts, answers and tasks."""
    n = len(completions)
    return dict(prompts=["p"] * n, completions=completions, answers=["x"] * n, tasks=["add"] * n)


def call(specs: list[RewardSpec], cols: dict[str, list]) -> Rewards:
    """Build the combined reward of `specs` and call it on `cols`."""
    fn = build_reward_fn(specs)
    return fn(cols["prompts"], cols["completions"], cols["answers"], cols["tasks"])


def one_line(error: pytest.ExceptionInfo[BaseException], *parts: str) -> str:
    """The error's message, checked to be one line that contains every part."""
    message = str(error.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)
    return message


# ---------------------------------------------------------------------------------- built-ins


def test_builtins_on_every_task() -> None:
    cols = columns(CASES)
    assert {task for task, *_ in CASES} == set(TASKS)
    out = call([RewardSpec("exact_answer"), RewardSpec("format")], cols)
    assert out.parts["exact_answer"] == cols["exact"]
    assert out.parts["format"] == cols["fmt"]


def test_format_accepts_every_generated_answer_and_rejects_chatter() -> None:
    assert set(ANSWER_FORMATS) == set(TASKS)
    examples = task_examples("train", 200, seed=3)
    answers = [e["answer"] for e in examples]
    tasks = [e["task"] for e in examples]
    fmt = load_reward_fn("format")
    assert fmt(["p"] * 200, answers, answers, tasks) == [1.0] * 200
    assert load_reward_fn("exact_answer")(["p"] * 200, answers, answers, tasks) == [1.0] * 200
    chatty = [template.format(a) for a, template in zip(answers, CHATTER * 40, strict=True)]
    assert fmt(["p"] * 200, chatty, answers, tasks) == [0.0] * 200


def test_format_on_an_unknown_task_is_a_reward_error() -> None:
    fn = build_reward_fn([RewardSpec("format")])
    with pytest.raises(RewardError) as e:
        fn(["p"], ["1"], ["1"], ["poetry"])
    one_line(e, "reward function 'format' raised ValueError", "'poetry'")


def test_contains_counts_the_configured_text() -> None:
    completions = ["banana", "xyz", "aaaa", "a"]  # "aa" is not in banana; twice in aaaa
    out = call([RewardSpec("contains:a"), RewardSpec("contains:aa")], columns_of(completions))
    assert out.parts == {"contains:a": [3.0, 0.0, 4.0, 1.0], "contains:aa": [0.0, 0.0, 2.0, 0.0]}
    assert contains("an")(["p"], ["banana"], ["x"], ["add"]) == [2.0]


def test_weighted_sum_by_hand() -> None:
    cols = columns(
        [
            ("add", "What is 70 + 1?", "71", "71", 1, 1),
            ("add", "What is 70 + 1?", "71", "72", 0, 1),
            ("add", "What is 70 + 1?", "71", "The answer is 77", 0, 0),
        ]
    )
    specs = [
        RewardSpec("exact_answer", 1.0),
        RewardSpec("format", 0.5),
        RewardSpec("contains:7", -0.25),
    ]
    total, parts = call(specs, cols)
    # exact, format, count of "7" per completion: (1, 1, 1), (0, 1, 1), (0, 0, 2).
    assert parts == {
        "exact_answer": [1.0, 0.0, 0.0],
        "format": [1.0, 1.0, 0.0],
        "contains:7": [1.0, 1.0, 2.0],
    }
    assert total == [1.0 + 0.5 - 0.25, 0.0 + 0.5 - 0.25, 0.0 + 0.0 - 0.5]


def test_combined_function_checks_its_inputs() -> None:
    fn = build_reward_fn([RewardSpec()])
    with pytest.raises(ValueError, match="differ in length"):
        fn(["p", "q"], ["1"], ["1"], ["add"])
    with pytest.raises(ValueError, match="differ in length"):
        fn(["p"], ["1"], ["1"], ["add"], tests=[[1], [2]])


def test_extra_record_fields_reach_the_functions_that_name_them(tmp_path: Path) -> None:
    """Every extra field of the prompt records arrives as a keyword list: a function naming
    `tests` gets it, one with **kwargs gets all, one with the four lists gets none."""
    module = tmp_path / "graded.py"
    module.write_text(
        "def passes(prompts, completions, answers, tasks, tests):\n"
        "    return [float(c in t) for c, t in zip(completions, tests)]\n"
        "def counts(prompts, completions, answers, tasks, **fields):\n"
        "    return [float(len(fields))] * len(completions)\n"
        "def plain(prompts, completions, answers, tasks):\n"
        "    return [1.0] * len(completions)\n"
    )
    specs = [RewardSpec(f"{module}:{name}", 1.0) for name in ("passes", "counts", "plain")]
    fn = build_reward_fn(specs)
    out = fn(["p", "q"], ["a", "b"], ["", ""], ["", ""], tests=[["a"], ["c"]], solution=["x", None])
    assert out.parts[f"{module}:passes"] == [1.0, 0.0]
    assert out.parts[f"{module}:counts"] == [2.0, 2.0]
    assert out.total == [4.0, 3.0]


# ------------------------------------------------------------------------------ user functions

USER_MODULE = """
import math

import numpy as np
import torch


def length(prompts, completions, answers, tasks):
    return [len(c) for c in completions]


class Scorer:
    @staticmethod
    def answer_in_prompt(prompts, completions, answers, tasks):
        return [float(a in p) for p, a in zip(prompts, answers)]


def as_numpy(prompts, completions, answers, tasks):
    return np.arange(len(completions), dtype=np.float32)


def as_tensor(prompts, completions, answers, tasks):
    return torch.ones(len(completions))


def three(prompts, completions, answers, tasks):
    return [1.0, 2.0, 3.0]


def fails(prompts, completions, answers, tasks):
    raise ZeroDivisionError("division by zero\\nsecond line of the message")


def nan(prompts, completions, answers, tasks):
    return [0.0, math.nan] + [0.0] * (len(completions) - 2)


def inf(prompts, completions, answers, tasks):
    return [-math.inf] * len(completions)


def text(prompts, completions, answers, tasks):
    return ["1.0"] * len(completions)


def nothing(prompts, completions, answers, tasks):
    return None


VALUE = 3
"""


@pytest.fixture
def mypkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A package `mypkg` with module `mod` (USER_MODULE) importable from tmp_path."""
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text(USER_MODULE)
    (package / "broken.py").write_text("import nosuchdependency_lmforge\n")
    (package / "boom.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
        del sys.modules[name]


FOUR = columns_of(["a", "bb", "ccc", ""])


def test_user_function_from_a_module(mypkg: Path) -> None:
    out = call([RewardSpec("mypkg.mod:length", 2.0), RewardSpec("exact_answer")], FOUR)
    assert out.parts["mypkg.mod:length"] == [1.0, 2.0, 3.0, 0.0]
    assert out.total == [2.0, 4.0, 6.0, 0.0]
    # A dotted attribute, numpy arrays and tensors are fine too.
    cols = columns_of(["2", "2"])
    cols.update(prompts=["What is 1 + 1?", "x"], answers=["1", "2"])
    assert call([RewardSpec("mypkg.mod:Scorer.answer_in_prompt")], cols).total == [1.0, 0.0]
    assert call([RewardSpec("mypkg.mod:as_numpy")], FOUR).total == [0.0, 1.0, 2.0, 3.0]
    assert call([RewardSpec("mypkg.mod:as_tensor")], FOUR).total == [1.0] * 4


def test_user_function_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_MODULE)
    out = call([RewardSpec(f"{path}:length")], FOUR)
    assert out.total == [1.0, 2.0, 3.0, 0.0]
    assert load_reward_fn(f"{path}:length") is load_reward_fn(f"{path}:length")  # run once


def test_call_errors_are_one_line_and_name_the_function(mypkg: Path) -> None:
    expected = {
        "three": "reward function 'mypkg.mod:three' returned 3 values for 4 completions",
        "fails": "reward function 'mypkg.mod:fails' raised ZeroDivisionError: division by zero",
        "nan": "reward function 'mypkg.mod:nan' returned nan at index 1 (completion 'bb')",
        "inf": "reward function 'mypkg.mod:inf' returned -inf at index 0",
        "text": "reward function 'mypkg.mod:text' returned a non-number at index 0: str '1.0'",
        "nothing": "reward function 'mypkg.mod:nothing' returned NoneType, expected a list of 4",
    }
    for function, message in expected.items():
        with pytest.raises(RewardError) as e:
            call([RewardSpec("exact_answer"), RewardSpec(f"mypkg.mod:{function}")], FOUR)
        one_line(e, message)
    assert e.value.__cause__ is None  # a bad value has no exception to chain
    with pytest.raises(RewardError) as e:
        call([RewardSpec("mypkg.mod:fails")], FOUR)
    assert isinstance(e.value.__cause__, ZeroDivisionError)  # kept for debugging


def test_load_errors_are_one_line_config_errors(mypkg: Path) -> None:
    cases = {
        "nosuchmodule_lmforge:score": ["rewards[1].name", "'nosuchmodule_lmforge:score'",
                                       "module 'nosuchmodule_lmforge' not found"],
        "mypkg.nothere:score": ["module 'mypkg.nothere' not found"],
        "mypkg.broken:score": ["importing 'mypkg.broken' failed",
                               "No module named 'nosuchdependency_lmforge'"],
        "mypkg.boom:score": ["importing 'mypkg.boom' failed (RuntimeError: boom at import)"],
        "mypkg.mod:missing": ["'mypkg.mod' has no attribute 'missing'"],
        "mypkg.mod:Scorer.missing": ["has no attribute 'Scorer.missing'"],
        "mypkg.mod:VALUE": ["'mypkg.mod:VALUE' is not callable (int 3)"],
        "nowhere/file.py:score": ["file 'nowhere/file.py' not found"],
        "exat_answer": ["unknown reward function 'exat_answer'", "did you mean 'exact_answer'?"],
        "contains:": ["'contains:' needs the text"],
        "mypkg.mod:": ["unknown reward function 'mypkg.mod:'"],
    }  # fmt: skip
    for name, parts in cases.items():
        with pytest.raises(ConfigError) as e:
            build_reward_fn([RewardSpec("format"), RewardSpec(name)])
        one_line(e, "rewards[1].name: ", *parts)


def test_spec_lists_are_checked() -> None:
    with pytest.raises(ConfigError) as e:
        build_reward_fn([])
    one_line(e, "rewards: no reward functions")
    with pytest.raises(ConfigError) as e:
        build_reward_fn([RewardSpec("format"), RewardSpec("format", 2.0)], key="grpo.rewards")
    one_line(e, "grpo.rewards[1].name: 'format' is listed twice")


@dataclass
class _Holder:
    rewards: list[RewardSpec] = option(default_factory=lambda: [RewardSpec()], doc="Rewards.")


def test_reward_specs_in_a_config() -> None:
    cfg = from_dict(_Holder, {"rewards": [{"name": "format", "weight": 0.5}, {"name": "m:f"}]})
    assert cfg.rewards == [RewardSpec("format", 0.5), RewardSpec("m:f", 1.0)]
    assert from_dict(_Holder, {}).rewards == [RewardSpec("exact_answer", 1.0)]
    with pytest.raises(ConfigError) as e:
        from_dict(_Holder, {"rewards": [{"name": "format"}, {"name": "fromat"}]})
    one_line(e, "rewards[1].name: unknown reward function 'fromat'", "did you mean 'format'?")
    with pytest.raises(ConfigError) as e:
        from_dict(_Holder, {"rewards": [{"name": "format", "weight": math.inf}]})
    one_line(e, "rewards[0].weight", "finite number")
    with pytest.raises(ConfigError) as e:
        from_dict(_Holder, {"rewards": [{"name": "format", "wieght": 1}]})
    one_line(e, "did you mean 'rewards[0].weight'?")


def test_numpy_scalars_ints_and_bools_count_as_numbers() -> None:
    def mixed(p: list[str], c: list[str], a: list[str], t: list[str]) -> list[object]:
        return [np.float64(0.5), np.int32(2), 1, True]

    four = ["x"] * 4
    assert call_reward_fn("mixed", mixed, four, four, four, four) == [0.5, 2.0, 1.0, 1.0]
