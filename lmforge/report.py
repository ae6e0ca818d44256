"""`lmforge report`: what each stage measured, before and after training, and on which held-out
set, as one table.

Every stage records in its checkpoint's lmforge.json the held-out set its evaluation ran on
(`heldout`: the set in words and how many records, prompts, pairs or windows it holds). The
report names that set beside each number and marks numbers of one quantity (exact match, reward,
...) measured on different sets as not comparable. A checkpoint written before stages recorded
their set gets a description rebuilt from its resolved config, without a count.

Light on imports: the `lmforge` command loads this module only when it reports.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HELDOUT = "heldout"  # the lmforge.json field holding a stage's held-out set


@dataclass(frozen=True)
class Measure:
    """One number a stage exists for: its label, its lmforge.json metric keys before and after
    training, and the quantity it measures (numbers of one quantity are compared across runs)."""

    label: str
    before: str | None
    after: str
    quantity: str


MEASURES: dict[str, list[Measure]] = {
    "pretrain": [Measure("validation loss", None, "eval/causal/loss", "causal loss")],
    "sft": [
        Measure("held-out exact match", "eval_before/accuracy", "eval/accuracy", "exact match"),
        Measure("held-out loss", "eval_before/loss", "eval/loss", "answer loss"),
    ],
    "reward": [
        Measure("held-out pair accuracy", "eval_before/accuracy", "eval/accuracy", "pair accuracy"),
    ],
    "dpo": [
        Measure("held-out implicit-reward accuracy", None, "eval/reward_accuracy", "pair accuracy"),
        Measure(
            "policy prefers chosen",
            "eval_before/prefers_chosen",
            "eval/prefers_chosen",
            "prefers chosen",
        ),
        Measure(
            "mean log-prob margin", "eval_before/logp_margin", "eval/logp_margin", "logp margin"
        ),
    ],
    "grpo": [
        Measure(
            "held-out exact match (greedy)", "eval_before/accuracy", "eval/accuracy", "exact match"
        ),
        Measure("held-out sampled reward", "eval_before/reward", "eval/reward", "reward"),
        Measure("held-out KL to the start (nats)", None, "eval/kl", "KL"),
    ],
    "ppo": [
        Measure("held-out reward (sampled)", "eval_before/reward", "eval/reward", "reward"),
        Measure("held-out KL to the start (nats)", None, "eval/kl", "KL"),
        Measure(
            "held-out exact match (greedy)", "eval_before/accuracy", "eval/accuracy", "exact match"
        ),
    ],
}


# ---------------------------------------------------------------- the held-out set of a stage


def _fields(data: Any) -> Mapping[str, Any]:
    """A data config section as a mapping (the dataclass, or its dict in lmforge.json)."""
    return dataclasses.asdict(data) if dataclasses.is_dataclass(data) else dict(data or {})


def describe_chat_heldout(data: Any) -> str:
    """The held-out set of a finetuning stage's `data` section in words: builtin tasks with
    their seed and size, data.heldout_source, or the share of data.source held out."""
    d = _fields(data)
    source = str(d.get("source", "builtin")).strip()
    held = str(d.get("heldout_source", "")).strip()
    if held == "builtin" or (not held and source == "builtin"):
        tasks = ",".join(d.get("tasks") or []) or "all"
        return (
            f"builtin tasks {tasks} (data.seed {d.get('seed', 0)}, "
            f"data.num_heldout {d.get('num_heldout', '?')})"
        )
    if held:
        return f"data.heldout_source {held}"
    return f"{d.get('heldout_fraction', '?')} of data.source {source} (split by prompt hash)"


def describe_corpus_heldout(data: Any) -> str:
    """Pretraining's validation split in words: the share of which corpus (and its limits)."""
    d = _fields(data)
    words = f"validation {d.get('validation_fraction', '?')} of data.source {d.get('source')}"
    if d.get("max_documents"):
        words += f" (data.max_documents {d['max_documents']})"
    return words


def heldout_record(description: str, count: int, unit: str) -> dict[str, Any]:
    """The `heldout` entry of lmforge.json: the set in words, its size and what it counts."""
    return {"set": description, "count": int(count), "unit": unit}


def chat_heldout(data: Any, count: int, unit: str) -> dict[str, Any]:
    """`heldout_record` of a finetuning stage's data section (unit: records, prompts, pairs)."""
    return heldout_record(describe_chat_heldout(data), count, unit)


def _recorded_set(meta: Mapping[str, Any]) -> tuple[str, int | None, str]:
    """(words, count, unit) of a checkpoint's held-out set: recorded, else from its config."""
    held = meta.get(HELDOUT)
    if isinstance(held, Mapping) and held.get("set"):
        count = held.get("count")
        return str(held["set"]), count if isinstance(count, int) else None, str(held.get("unit"))
    data = (meta.get("config") or {}).get("data") or {}
    stage = meta.get("stage")
    if stage == "pretrain":
        return describe_corpus_heldout(data), None, "windows"
    return describe_chat_heldout(data), None, "pairs" if stage in ("reward", "dpo") else "prompts"


def _scorer(meta: Mapping[str, Any]) -> str:
    """What scored a reward number: PPO's reward model, or the reward functions' names."""
    cfg = meta.get("config") or {}
    if meta.get("stage") == "ppo" and cfg.get("reward_model"):
        return f"reward model {cfg['reward_model']}"
    specs = cfg.get("rewards") or []
    names = [r.get("name", "?") if isinstance(r, Mapping) else str(r) for r in specs]
    return "rewards " + ",".join(names)


# ------------------------------------------------------------------------------------ report


@dataclass
class Row:
    """One line of the report."""

    stage: str
    label: str
    before: float | None
    after: float | None
    checkpoint: str
    quantity: str
    heldout: tuple[str, int | None, str]  # (words, count, unit)
    set_id: str = ""  # the held-out set's letter in the report
    comparable: bool = True  # False: another row of its quantity ran on another set
    best: str = ""  # the run's best step by train.keep_best ('step 300 (eval/loss 1.021)')


def report_rows(runs: Sequence[str | Path]) -> list[Row]:
    """The measures of each run's latest (or given) checkpoint, with their held-out sets
    lettered in order of appearance and rows of one quantity on different sets marked."""
    from lmforge.checkpoint import META_FILE, read_json, resolve_checkpoint

    rows: list[Row] = []
    for run in runs:
        ckpt = resolve_checkpoint(run)
        meta = read_json(ckpt / META_FILE)
        stage, metrics = meta.get("stage", "?"), meta.get("metrics", {})
        heldout = _recorded_set(meta)
        for m in MEASURES.get(stage, []):
            quantity = f"{m.quantity} ({_scorer(meta)})" if m.quantity == "reward" else m.quantity
            old = metrics.get(m.before) if m.before else None
            new = metrics.get(m.after)
            rows.append(Row(stage, m.label, old, new, str(ckpt), quantity, heldout))
            rows[-1].best = best_step(meta)
        rows += harness_rows(ckpt, meta)
    _letter_sets(rows)
    return rows


def harness_rows(ckpt: Path, meta: Mapping[str, Any]) -> list[Row]:
    """Rows of lm-evaluation-harness numbers of a run: those its evaluations logged during
    training (eval.harness_tasks; before and after, from the checkpoint's metrics), then the
    `lmforge eval` results written into its checkpoint and into its best checkpoint (if
    another)."""
    stage, metrics = str(meta.get("stage", "?")), meta.get("metrics", {})
    limit = ((meta.get("config") or {}).get("eval") or {}).get("harness_limit")
    limited = f", eval.harness_limit {limit:g}" if isinstance(limit, (int, float)) and limit else ""
    rows = []
    for key, value in metrics.items():
        if not key.startswith("harness/") or key.count("/") < 2:
            continue
        task, metric = key[len("harness/") :].rsplit("/", 1)
        before = metrics.get("harness_before/" + key[len("harness/") :])
        words = f"harness task {task} during training{limited}"
        row = Row(stage, f"harness {task} {metric}", before, value, str(ckpt), f"harness {task}/"
                  f"{metric}", (words, None, "examples"), best=best_step(meta))  # fmt: skip
        rows.append(row)
    for where in _checkpoints_with_best(ckpt):
        rows += _eval_file_rows(where, stage)
    return rows


def _checkpoints_with_best(ckpt: Path) -> list[Path]:
    """The checkpoint and, when its run keeps a different best one, that one."""
    from lmforge.checkpoint import BEST_FILE, read_pointer

    found = [ckpt]
    name = read_pointer(ckpt.parent, BEST_FILE) if (ckpt.parent / BEST_FILE).is_file() else None
    if name and (ckpt.parent / name).is_dir() and (ckpt.parent / name) != ckpt:
        found.append(ckpt.parent / name)
    return found


def _eval_file_rows(ckpt: Path, stage: str) -> list[Row]:
    """One row per task and metric of each <checkpoint>/eval/*.json (`lmforge eval`)."""
    from lmforge.harness.run import EVAL_DIR, listed_results

    rows = []
    for name, record in listed_results(ckpt).items():
        if not isinstance(record, Mapping):
            continue
        limit = record.get("limit")
        shown = f"{limit:g}" if isinstance(limit, (int, float)) else "none"
        chat = ", chat" if record.get("chat") else ""
        for task, values in (record.get("results") or {}).items():
            values = values if isinstance(values, Mapping) else {}
            count = values.get("sample_len")  # the harness's count of examples, no measure
            size = int(count) if isinstance(count, (int, float)) else None
            held = (f"lmforge eval {task} (limit {shown}{chat})", size, "examples")
            for metric, value in values.items():
                if metric == "sample_len" or not isinstance(value, (int, float)):
                    continue
                where = f"{ckpt} ({EVAL_DIR}/{name})"
                rows.append(Row(stage, f"eval {task} {metric}", None, float(value), where,
                                f"eval {task}/{metric}", held))  # fmt: skip
    return rows


def best_step(meta: Mapping[str, Any]) -> str:
    """'step 300 (eval/loss 1.021)': the best evaluation a checkpoint's run had reached by
    train.keep_best (the `best` pointer names that step), or '' without keep_best."""
    best = meta.get("best")
    if not isinstance(best, Mapping) or not best.get("step"):
        return ""
    value = best.get("value")
    shown = f" ({best.get('metric')} {value:.3f})" if isinstance(value, (int, float)) else ""
    return f"step {best['step']}{shown}"


def _same_set(a: tuple[str, int | None, str], b: tuple[str, int | None, str]) -> bool:
    """Equal descriptions of the same kind of item (the builtin tasks give prompts and
    preference pairs), and equal counts where both are known."""
    same_kind = a[2].split()[:1] == b[2].split()[:1]  # 'windows of 256 tokens' -> 'windows'
    return a[0] == b[0] and same_kind and (a[1] is None or b[1] is None or a[1] == b[1])


def _letter_sets(rows: list[Row]) -> None:
    """Give each distinct held-out set a letter; mark quantities measured on several sets."""
    sets: list[tuple[str, int | None, str]] = []
    for row in rows:
        found = next((i for i, s in enumerate(sets) if _same_set(s, row.heldout)), None)
        if found is None:
            sets.append(row.heldout)
            found = len(sets) - 1
        row.set_id = chr(ord("A") + found) if found < 26 else str(found + 1)
    for row in rows:
        row.comparable = all(
            other.set_id == row.set_id for other in rows if other.quantity == row.quantity
        )


def _number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else ""


def format_report(rows: list[Row]) -> str:
    """The table, the held-out sets by letter, and a line per quantity that is not comparable."""
    header: tuple[str, ...] = ("stage", "measure", "before", "after", "held-out", "checkpoint")
    cells = [
        (
            r.stage,
            r.label,
            _number(r.before),
            _number(r.after),
            r.set_id + ("" if r.comparable else " *"),
            r.checkpoint,
        )
        for r in rows
    ]
    if any(r.best for r in rows):  # a run kept its best checkpoint (train.keep_best)
        header += ("best",)
        cells = [(*c, r.best) for c, r in zip(cells, rows, strict=True)]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, tuple("-" * w for w in widths), *cells]
    ]
    seen: dict[str, tuple[str, int | None, str]] = {}
    for r in rows:
        seen.setdefault(r.set_id, r.heldout)
    if seen:
        lines += ["", "held-out sets:"]
    for set_id, (words, count, unit) in seen.items():
        size = f"{count} {unit}" if count is not None else f"{unit}, count not recorded"
        lines.append(f"  {set_id}  {words}: {size}")
    quantities: dict[str, dict[str, list[str]]] = {}
    for r in rows:
        if not r.comparable:
            quantities.setdefault(r.quantity, {}).setdefault(r.set_id, []).append(r.stage)
    for quantity, by_set in quantities.items():
        where = ", ".join(f"{s} ({'/'.join(dict.fromkeys(st))})" for s, st in by_set.items())
        lines.append(
            f"* not comparable: {quantity} was measured on different held-out sets: {where}"
        )
    return "\n".join(lines)
