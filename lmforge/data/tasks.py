"""The embedded default finetuning data: small chat tasks with short, verifiable answers.

Five tasks, each with one fixed prompt phrasing, so that a model of about a million parameters
can learn them from a few thousand examples, and an exact-match check scores a completion::

    add       What is 23 + 48?                                    -> 71
    compare   Which is larger: 37 or 52?                          -> 52
    reverse   Reverse the word: cat                               -> tac
    sort      Sort these digits: 3 1 2                            -> 1 2 3
    count     How many times does the letter a appear in banana?  -> 3

Everything is generated from a seed, nothing is downloaded. A prompt's split is decided by a hash
of its text (HELDOUT_SHARE of all prompts are held out), so a held-out prompt never appears in
training data, whatever the seed or the number of examples asked for.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

from lmforge.data.corpus import doc_hash

Split = Literal["train", "heldout"]
TASKS: tuple[str, ...] = ("add", "compare", "reverse", "sort", "count")
HELDOUT_SHARE = 0.1  # share of each task's prompt space reserved for held-out examples
# Lowercase words of 3-6 letters for `reverse` and `count` (half the draws are random letters).
WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "map", "cup", "pen", "box", "hat", "egg", "owl", "fox", "bee",
    "tree", "fish", "bird", "milk", "rain", "snow", "book", "door", "moon", "star", "frog",
    "lamp", "apple", "house", "river", "water", "light", "bread", "chair", "table", "grass",
    "cloud", "stone", "horse", "lemon", "piano", "tiger", "sheep", "banana", "garden",
    "yellow", "rabbit", "pepper", "letter", "butter", "coffee", "window", "summer",
)  # fmt: skip
LETTERS = "abcdefghijklmnopqrstuvwxyz"
# Badly formatted answers for preference data: right content, wrong form ({} is the answer).
CHATTER = ("I think it is {}.", "The answer is {}.", "{}.", "{}!", "Sure! {}")

Example = tuple[str, str]  # (user prompt, answer)


def _word(rng: random.Random) -> str:
    """A lowercase word of 3-6 letters: from WORDS or random letters, half and half."""
    if rng.random() < 0.5:
        return rng.choice(WORDS)
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"What is {a} + {b}?", str(a + b)


def _compare(rng: random.Random) -> Example:
    a, b = rng.sample(range(100), 2)  # two different numbers: "larger" is well defined
    return f"Which is larger: {a} or {b}?", str(max(a, b))


def _reverse(rng: random.Random) -> Example:
    word = _word(rng)
    return f"Reverse the word: {word}", word[::-1]


def _sort(rng: random.Random) -> Example:
    digits = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    return f"Sort these digits: {' '.join(map(str, digits))}", " ".join(map(str, sorted(digits)))


def _count(rng: random.Random) -> Example:
    word = _word(rng)
    # Mostly a letter of the word; sometimes any letter, so that 0 is an answer too.
    letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(LETTERS)
    prompt = f"How many times does the letter {letter} appear in {word}?"
    return prompt, str(word.count(letter))


GENERATORS: dict[str, Callable[[random.Random], Example]] = {
    "add": _add,
    "compare": _compare,
    "reverse": _reverse,
    "sort": _sort,
    "count": _count,
}


def prompt_split(prompt: str) -> Split:
    """The split a prompt belongs to: "heldout" when its hash / 2**64 < HELDOUT_SHARE."""
    return "heldout" if (doc_hash(prompt) >> 11) * 2.0**-53 < HELDOUT_SHARE else "train"


def _check(split: str, n: int, tasks: Sequence[str]) -> list[str]:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    names = list(tasks)
    unknown = [t for t in names if t not in GENERATORS]
    if unknown or not names:
        raise ValueError(f"unknown task(s) {unknown or names}; choose from {', '.join(TASKS)}")
    return names


def _draw(split: str, n: int, seed: int, tasks: Sequence[str]) -> Iterator[tuple[str, str, str]]:
    """n (task, prompt, answer) triples of `split`, the tasks taking turns.

    Each task has its own generator seeded by (seed, task, split), so asking for other tasks or
    more examples does not change the examples a task gets. Draws of the other split are thrown
    away; a prompt already given is drawn again (up to a limit, for tasks with few prompts).
    """
    names = _check(split, n, tasks)
    rngs = {t: random.Random(f"lmforge-tasks|{seed}|{t}|{split}") for t in names}
    seen: set[str] = set()
    for i in range(n):
        task = names[i % len(names)]
        for attempt in range(10_000):
            prompt, answer = GENERATORS[task](rngs[task])
            if prompt_split(prompt) == split and (prompt not in seen or attempt >= 100):
                break
        else:  # unreachable: every task has thousands of prompts in each split
            raise RuntimeError(f"task {task!r} found no {split} prompt in 10,000 draws")
        seen.add(prompt)
        yield task, prompt, answer


def task_examples(
    split: Split, n: int, seed: int, tasks: Sequence[str] = TASKS
) -> list[dict[str, Any]]:
    """n chat examples of `split`, the tasks interleaved (example i is of tasks[i % len(tasks)]).

    Each is {"task", "messages": [user, assistant], "answer"}; the same arguments give the same
    list on every machine. Prompts of one call are distinct while the task has unused prompts.
    """
    return [
        {
            "task": task,
            "messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": answer},
            ],
            "answer": answer,
        }
        for task, prompt, answer in _draw(split, n, seed, tasks)
    ]


# Share of rejected answers that are near misses (the rest are the right answer badly formatted).
# Telling 57 from 58 needs the arithmetic itself; a 1M-parameter model trained for a minute
# learns formats reliably and arithmetic partly, so near misses are the hard minority.
NEAR_MISS_SHARE = 0.3


def _near_miss(task: str, prompt: str, answer: str, rng: random.Random) -> str:
    """A wrong answer in the right format: off by one, the wrong order, one letter off."""
    if task in ("add", "count"):
        value = int(answer)
        return str(value + 1 if value == 0 or rng.random() < 0.5 else value - 1)
    if task == "compare":
        a, b = prompt.removeprefix("Which is larger: ").removesuffix("?").split(" or ")
        return a if b == answer else b  # the smaller one
    if task == "sort":
        digits = answer.split()
        given = prompt.removeprefix("Sort these digits: ").split()
        if given != digits and rng.random() < 0.5:
            return " ".join(given)  # left unsorted
        if len(set(digits)) > 1:  # swap two neighbours that differ
            i = rng.choice([k for k in range(len(digits) - 1) if digits[k] != digits[k + 1]])
            digits[i], digits[i + 1] = digits[i + 1], digits[i]
        else:  # all equal: one digit off by one
            digits[-1] = str((int(digits[-1]) + 1) % 10)
        return " ".join(digits)
    # reverse: the word not reversed (unless a palindrome), or one letter changed
    word = answer[::-1]
    if word != answer and rng.random() < 0.5:
        return word
    i = rng.randrange(len(answer))
    letter = rng.choice([c for c in LETTERS if c != answer[i]])
    return answer[:i] + letter + answer[i + 1 :]


def preference_pairs(
    split: Split, n: int, seed: int, tasks: Sequence[str] = TASKS
) -> list[dict[str, Any]]:
    """n preference pairs of `split` over the same prompts as `task_examples(split, n, seed)`.

    Each is {"task", "prompt": [user message], "chosen": the correct answer, "rejected", "answer"};
    rejected is a near miss (NEAR_MISS_SHARE of the pairs) or the right answer badly formatted
    (wrapped in chatter or with trailing punctuation), and never equals chosen.
    """
    rng = random.Random(f"lmforge-pairs|{seed}|{split}")
    pairs = []
    for task, prompt, answer in _draw(split, n, seed, tasks):
        if rng.random() < NEAR_MISS_SHARE:
            rejected = _near_miss(task, prompt, answer, rng)
        else:
            rejected = rng.choice(CHATTER).format(answer)
        assert rejected != answer, (task, prompt, rejected)  # by construction
        pairs.append(
            {
                "task": task,
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": answer,
                "rejected": rejected,
                "answer": answer,
            }
        )
    return pairs


def check_answer(task: str, completion: str, answer: str) -> bool:
    """Exact match after stripping surrounding whitespace: the metric of every task.

    `task` is taken so that a task may get a laxer check one day; none has one now.
    """
    return completion.strip() == answer.strip()
