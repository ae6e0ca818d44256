"""Reward functions for PPO and GRPO: built-ins for the embedded tasks, or the user's own.

A reward function scores N completions at once; every list has one entry per completion::

    fn(prompts: list[str], completions: list[str], answers: list[str], tasks: list[str],
       **fields: list[Any]) -> list[float]  # N finite numbers (numpy array or 1-D tensor too)

- `prompts[i]`: the prompt completion i answers, as the model saw it: the chat template's text
  (special tokens included) of the record's prompt messages and the generation prompt;
- `completions[i]`: the generated answer, decoded without special tokens, up to the end of turn;
- `answers[i]`: the record's reference answer: its `answer` field, else the final assistant
  message (the `completion` of a prompt/completion record, `chosen` of a preference record);
- `tasks[i]`: the record's `task` field ("custom" when it has none; the built-in tasks' names
  for `data.source: builtin`);
- `fields`: every other field of the prompt records, one list per field name (None where a
  record lacks it), e.g. `tests=` or `solution=`. A function receives the fields its signature
  names, or all of them with `**kwargs`; GRPO repeats each record's values for its G samples.

Built-ins, for the tasks of `lmforge.data.tasks`:

    exact_answer     1.0 if check_answer(task, completion, answer), else 0.0
    format           1.0 if the stripped completion is one short line shaped like the task's
                     answers (digits; lowercase letters; digits between single spaces), else 0.0
    contains:<text>  the number of non-overlapping occurrences of <text> in the completion (a toy
                     reward with a known optimum, for tests: `contains:a` rewards writing a's)

Any other name is a user function: `package.module:function` (importable: installed, or its
directory on PYTHONPATH) or `path/to/file.py:function` (relative to the working directory). The
function part may be dotted (`module:Class.method`).

A config lists `RewardSpec`s ({name, weight}); `build_reward_fn(specs)` loads them once and returns
a function giving the weighted sum per completion and each function's values for logging. Every
user-fixable failure is one line naming the function: `ConfigError` when loading, `RewardError`
when a call raises, calls sys.exit, runs past the spec's `timeout_s` or returns something that is
not N finite numbers.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from lmforge.config import option
from lmforge.data.tasks import check_answer
from lmforge.errors import ConfigError, LmforgeError

RewardFn = Callable[[list[str], list[str], list[str], list[str]], Any]


class RewardError(LmforgeError):
    """A reward function raised, or returned something other than one finite number per
    completion."""


class Rewards(NamedTuple):
    """What a combined reward function returns for N completions."""

    total: list[float]  # (N,) Σ_k weight_k · values_k
    parts: dict[str, list[float]]  # spec name -> (N,) that function's unweighted values


CombinedRewardFn = Callable[..., Rewards]  # (prompts, completions, answers, tasks, **fields)


def accepted_fields(fn: Callable[..., Any], fields: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """The extra record fields `fn` takes: all of them when it has **kwargs, else those its
    signature names (so a function written for the four lists keeps working)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or C function: no signature to read
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return fields
    named = {p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL}
    return {k: v for k, v in fields.items() if k in named}


@dataclass
class RewardSpec:
    """One reward function and its weight in the sum."""

    name: str = option(
        "exact_answer",
        "exact_answer, format, contains:<text>, or a user 'package.module:function' or "
        "'path/file.py:function'.",
    )
    weight: float = option(1.0, "Multiplier of this function's values; 0 logs it without using it.")
    timeout_s: float = option(
        60.0, "Longest one call (all completions of a step) may run, in seconds; past it: error."
    )

    def validate(self, prefix: str = "") -> None:
        """The name has a valid form (built-in or `module:function`), the weight is finite and
        the time limit positive.

        Whether the module imports is checked by `build_reward_fn`, not while reading the config.
        """
        at = f"{prefix}." if prefix else ""
        _check_name(self.name, f"{at}name")
        if not math.isfinite(self.weight):
            raise ConfigError(f"{at}weight: must be a finite number, got {self.weight}")
        if not 0 < self.timeout_s < 10**7:  # setitimer's limit is far above a reasonable call
            raise ConfigError(
                f"{at}timeout_s: must be a positive number of seconds, got {self.timeout_s}"
            )


# ------------------------------------------------------------------------------- built-ins


def exact_answer(
    prompts: list[str], completions: list[str], answers: list[str], tasks: list[str]
) -> list[float]:
    """1.0 where the completion is the answer (the tasks' own metric, `check_answer`), else 0.0."""
    return [
        float(check_answer(t, c, a)) for c, a, t in zip(completions, answers, tasks, strict=True)
    ]


# The shape of each task's answers (see lmforge.data.tasks), with room to spare but short: a sum
# of two numbers below 100 has at most 3 digits, a word at most 6 letters, a sort 5 digits.
ANSWER_FORMATS: dict[str, re.Pattern[str]] = {
    "add": re.compile(r"\d{1,4}"),
    "compare": re.compile(r"\d{1,4}"),
    "count": re.compile(r"\d{1,4}"),
    "reverse": re.compile(r"[a-z]{1,16}"),
    "sort": re.compile(r"\d(?: \d){0,15}"),
}


def answer_format(
    prompts: list[str], completions: list[str], answers: list[str], tasks: list[str]
) -> list[float]:
    """1.0 where the stripped completion is one short line shaped like the task's answers (no
    chatter, no punctuation, no second line), else 0.0; right or wrong does not matter."""
    out = []
    for completion, task in zip(completions, tasks, strict=True):
        pattern = ANSWER_FORMATS.get(task)
        if pattern is None:
            known = ", ".join(sorted(ANSWER_FORMATS))
            raise ValueError(f"no answer format for task {task!r} (known: {known})")
        out.append(1.0 if pattern.fullmatch(completion.strip()) else 0.0)
    return out


def contains(text: str) -> RewardFn:
    """The reward `contains:<text>`: how many times `text` occurs in each completion."""

    def count(
        prompts: list[str], completions: list[str], answers: list[str], tasks: list[str]
    ) -> list[float]:
        return [float(c.count(text)) for c in completions]

    return count


BUILTINS: dict[str, RewardFn] = {"exact_answer": exact_answer, "format": answer_format}
CONTAINS = "contains:"


# --------------------------------------------------------------------------------- loading


def _check_name(name: str, key: str) -> None:
    """Raise ConfigError unless `name` is a built-in, `contains:<text>` or `<module>:<function>`."""
    if name in BUILTINS:
        return
    if name.startswith(CONTAINS):
        if not name[len(CONTAINS) :]:
            raise ConfigError(f"{key}: 'contains:' needs the text to count, e.g. 'contains:a'")
        return
    module, _, function = name.rpartition(":")
    if module and function:
        return
    close = difflib.get_close_matches(name, list(BUILTINS), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ConfigError(
        f"{key}: unknown reward function '{name}'; {hint}use exact_answer, format, "
        "contains:<text>, or 'package.module:function' / 'path/file.py:function'"
    )


def _clip(text: str, limit: int = 40) -> str:
    """`text`, cut to `limit` characters with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(e: BaseException) -> str:
    """`Type: first line of the message`, for a one-line error."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _import_file(path: str, key: str, name: str) -> Any:
    """Execute a .py file as a module (once per process; registered in sys.modules so that
    pickling and dataclasses inside it work)."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise ConfigError(f"{key}: reward function '{name}': file '{path}' not found")
    digest = hashlib.blake2b(str(file).encode(), digest_size=6).hexdigest()
    stem = re.sub(r"\W", "_", file.stem)
    module_name = f"_lmforge_rewards_{stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{key}: reward function '{name}': cannot load '{path}' as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # a script that exits when imported
        del sys.modules[module_name]
        raise ConfigError(
            f"{key}: reward function '{name}': running '{path}' failed ({_first_line(e)})"
        ) from e
    return module


def _import_module(module: str, key: str, name: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise ConfigError(
                f"{key}: reward function '{name}': module '{module}' not found; install it, "
                "add its directory to PYTHONPATH, or name the file ('path/file.py:function')"
            ) from None
        raise ConfigError(
            f"{key}: reward function '{name}': importing '{module}' failed ({_first_line(e)})"
        ) from e
    except (Exception, SystemExit) as e:  # the module itself raised (or exited) importing
        raise ConfigError(
            f"{key}: reward function '{name}': importing '{module}' failed ({_first_line(e)})"
        ) from e


def load_reward_fn(name: str, key: str = "name") -> RewardFn:
    """The reward function called `name` (a built-in, `contains:<text>`, `module:function` or
    `file.py:function`). `key` is the config key named in errors."""
    _check_name(name, key)
    if name in BUILTINS:
        return BUILTINS[name]
    if name.startswith(CONTAINS):
        return contains(name[len(CONTAINS) :])
    module_name, _, attr = name.rpartition(":")
    if module_name.endswith(".py"):
        obj = _import_file(module_name, key, name)
    else:
        obj = _import_module(module_name, key, name)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(
                f"{key}: reward function '{name}': '{module_name}' has no attribute '{attr}'"
            ) from None
    if not callable(obj):
        what = f"{type(obj).__name__} {_clip(repr(obj))}"
        raise ConfigError(f"{key}: reward function '{name}' is not callable ({what})")
    return obj


# ---------------------------------------------------------------------------------- calling


def _checked_values(name: str, out: Any, completions: list[str]) -> list[float]:
    """`out` as N finite floats, or a one-line RewardError naming the function."""
    n = len(completions)
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):
        out = out.tolist()  # numpy array or tensor
    if not isinstance(out, (list, tuple)):
        raise RewardError(
            f"reward function '{name}' returned {type(out).__name__}, expected a list of {n} "
            "numbers (one per completion)"
        )
    if len(out) != n:
        raise RewardError(
            f"reward function '{name}' returned {len(out)} values for {n} completions"
        )
    values = []
    for i, v in enumerate(out):
        if not isinstance(v, numbers.Real):
            raise RewardError(
                f"reward function '{name}' returned a non-number at index {i}: "
                f"{type(v).__name__} {_clip(repr(v))}"
            )
        value = float(v)
        if not math.isfinite(value):
            raise RewardError(
                f"reward function '{name}' returned {value} at index {i} "
                f"(completion {_clip(repr(completions[i]))})"
            )
        values.append(value)
    return values


class _Overrun(BaseException):
    """Raised inside a reward function when its time is up. A BaseException, so that the
    function's own `except Exception` cannot swallow it."""


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise _Overrun in this (the main) thread after `seconds`: SIGALRM interrupts Python code
    and blocking calls such as sleep or socket reads. The previous handler comes back after."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise _Overrun

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _call_limited(fn: Callable[[], Any], seconds: float) -> Any:
    """fn() with a time limit (_Overrun past it). In the main thread a SIGALRM timer stops the
    function itself; elsewhere (no signals there) it runs in a daemon thread that is abandoned
    when it overruns, and the run ends with the error."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        with _alarm(seconds):
            return fn()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["out"] = fn()
        except BaseException as e:  # handed to the caller, as in the main-thread path
            box["error"] = e

    worker = threading.Thread(target=run, name="lmforge-reward", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise _Overrun
    if "error" in box:
        raise box["error"]
    return box["out"]


def call_reward_fn(
    name: str,
    fn: RewardFn,
    prompts: list[str],
    completions: list[str],
    answers: list[str],
    tasks: list[str],
    fields: dict[str, list[Any]] | None = None,
    timeout_s: float = 60.0,
) -> list[float]:
    """fn(prompts, completions, answers, tasks, **fields it accepts) as N finite floats; any
    failure of the function (an exception, sys.exit, running past `timeout_s` seconds) becomes
    a one-line RewardError naming it (the original exception is chained)."""
    extra = {k: list(v) for k, v in accepted_fields(fn, fields or {}).items()}
    args = (list(prompts), list(completions), list(answers), list(tasks))  # theirs to change
    try:
        out = _call_limited(lambda: fn(*args, **extra), timeout_s)
    except _Overrun:
        raise RewardError(
            f"reward function '{name}' did not return within {timeout_s:g} s for "
            f"{len(completions)} completions; make it faster or raise its timeout_s"
        ) from None
    except SystemExit as e:
        raise RewardError(
            f"reward function '{name}' called sys.exit({e.code!r}); it must return one score "
            "per completion (raise an exception to report a problem)"
        ) from None
    except Exception as e:
        raise RewardError(f"reward function '{name}' raised {_first_line(e)}") from e
    return _checked_values(name, out, list(completions))


def agree_on_failure(error: RewardError | None) -> None:
    """Raise `error`, or the error of another rank, on every rank at once. Each rank scores its
    own completions; without this, a rank whose function failed would exit while the others
    wait for it in the next collective (gloo then fails with a traceback, NCCL waits for its
    timeout). Every rank calls the reward function the same number of times, so every rank
    reaches this; without a process group it just raises `error`."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        if error is not None:
            raise error
        return
    on_gpu = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    failed = torch.tensor([0.0 if error is None else 1.0], device=device)
    dist.all_reduce(failed)
    if failed.item() == 0:
        return
    if error is not None:
        dist.all_gather_object([None] * dist.get_world_size(), str(error))
        raise error
    messages: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None)
    rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
    raise RewardError(f"{message} (on rank {rank})")


def build_reward_fn(specs: Sequence[RewardSpec], key: str = "rewards") -> CombinedRewardFn:
    """Load every spec's function once and return `reward(prompts, completions, answers, tasks,
    **fields)` -> Rewards(total, parts): total[i] = Σ_k weight_k · value_k[i] and parts =
    {name: values}.

    `key` is where the list sits in the config, for errors (`rewards[1].name: ...`). An empty list
    or a name listed twice is a ConfigError.
    """
    if not specs:
        raise ConfigError(f"{key}: no reward functions; list one, e.g. [{{name: exact_answer}}]")
    loaded: list[tuple[str, float, RewardFn]] = []
    limits: dict[str, float] = {}  # name -> seconds one call may take
    for i, spec in enumerate(specs):
        at = f"{key}[{i}].name"
        if any(spec.name == name for name, _, _ in loaded):
            raise ConfigError(f"{at}: '{spec.name}' is listed twice; give it one entry and weight")
        loaded.append((spec.name, float(spec.weight), load_reward_fn(spec.name, at)))
        limits[spec.name] = float(spec.timeout_s)

    def reward(
        prompts: list[str],
        completions: list[str],
        answers: list[str],
        tasks: list[str],
        **fields: list[Any],
    ) -> Rewards:
        n = len(completions)
        sizes = [len(prompts), len(answers), len(tasks), *(len(v) for v in fields.values())]
        if any(size != n for size in sizes):
            raise ValueError(f"the lists differ in length: {n} completions, others {sizes}")
        parts: dict[str, list[float]] = {}
        failure: RewardError | None = None
        try:
            for name, _, fn in loaded:
                parts[name] = call_reward_fn(
                    name, fn, prompts, completions, answers, tasks, fields, limits[name]
                )
        except RewardError as e:
            failure = e
        agree_on_failure(failure)
        total = [0.0] * n
        for name, weight, _ in loaded:
            total = [t + weight * v for t, v in zip(total, parts[name], strict=True)]
        return Rewards(total, parts)

    return reward
