"""What `--dry-run` checks beyond the keys: everything a run will read before it trains.

A stage's dry run resolves its config (lmforge.config), then `preflight(cfg, stage)` walks what
the run would touch, in the order the run touches it, without training, writing a file, starting
a process group or downloading anything:

- the resume point: run_dir's `latest` (resume: auto), a path (resume: PATH), or none; a run that
  already reached train.steps only reports that, so nothing else is checked (what the run does);
- the start weights (the resume point, else `init_from`), the reference model that DPO, GRPO
  (beta > 0) and PPO read from `init_from` even when they resume, and PPO's `reward_model` and
  `critic_from`: each must resolve (checkpoint directory, run directory with `latest`, Hugging
  Face directory, or a hub name already in the local Hugging Face cache), its config.json and
  lmforge.json must load and agree, and the weight files the manifest lists must be there with
  their recorded sizes (sizes only: hashing every weight file is the real load's job);
- the tokenizer (a checkpoint's, or pretraining's tokenizer.path) loads, and a chat stage's chat
  template renders;
- the data: pretraining sources resolve and their files pass the encoding checks, and the first
  records of each file hold the text field; chat sources are read and checked by the stage's own
  reader and their first records are tokenised with the stage's tokenizer;
- reward functions (GRPO, PPO without reward_model) import and return one finite number for a
  sample completion (the first prompt record, answered with its own reference answer);
- the batch plan (processes × micro-batch × accumulation) and the memory check of
  lmforge.memcheck, which the config load defers to the dry run (`memory_check_deferred`) so
  that it is listed with the rest.

Every failure is collected, not raised: `Findings.problems` holds one line per failure, each
starting with the config key it is about and saying what to do.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from lmforge.errors import LmforgeError

T = TypeVar("T")
FIRST_RECORDS = 4  # records read from the start of each data file, and tokenised
# Stages whose reference model is loaded from init_from even when they resume.
REFERENCE_FROM_INIT = ("dpo", "grpo", "ppo")


@dataclass
class Findings:
    """What a dry run found: lines about what was checked, warnings and problems."""

    checked: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    plan: str = ""  # the batch plan, one line

    def attempt(self, key: str, check: Callable[[], T], hint: str = "") -> T | None:
        """Run `check`; a user error (LmforgeError) becomes one problem line about `key`
        (with `hint`, what to do, when the message has none) and None is returned."""
        try:
            return check()
        except LmforgeError as e:
            self.problem(key, str(e), hint)
            return None

    def problem(self, key: str, message: str, hint: str = "") -> None:
        """Record one failure: `key: message[; hint]` on one line."""
        text = " ".join(message.split())  # one line, whatever the message held
        if not text.startswith(key):
            text = f"{key}: {text}"
        self.problems.append(f"{text}; {hint}" if hint else text)

    def lines(self) -> list[str]:
        """The report's lines (what was checked, then warnings), for YAML comments."""
        return [f"checked: {c}" for c in self.checked] + [f"warning: {w}" for w in self.warnings]


# ----------------------------------------------------------------------------- checkpoints


def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def cached_hub_model(name: str) -> Path | None:
    """The local snapshot of hub model `name` in the Hugging Face cache, or None; never
    downloads."""
    from huggingface_hub import snapshot_download

    from lmforge.checkpoint import _HUB_FILES  # the files a real load asks for

    try:
        return Path(snapshot_download(name, local_files_only=True, allow_patterns=_HUB_FILES))
    except Exception:  # not cached (huggingface_hub raises several types for it)
        return None


def is_hub_name(source: str) -> bool:
    """Whether a run would read `source` from the Hugging Face hub (no such local path)."""
    from lmforge.checkpoint import _HUB_NAME

    return not Path(source).expanduser().exists() and bool(_HUB_NAME.match(source))


def _not_cached(key: str, name: str, what: str, found: Findings) -> None:
    """A hub name missing from the local cache: a problem offline, else a warning (the run will
    download it, which a dry run does not)."""
    text = (
        f"{key}: '{name}' is not a local path and the {what} is not in the local Hugging Face cache"
    )
    if _offline():
        found.problem(key, text, f"HF_HUB_OFFLINE is set: download it first (`hf download {name}`)")
    else:
        found.warnings.append(f"{text}; the run will download it (not checked)")


def resolve_local(source: str, key: str, found: Findings) -> Path | None:
    """The checkpoint directory `source` names (as lmforge.checkpoint.resolve_checkpoint, but a
    hub name only from the local cache), or None with a problem or warning recorded."""
    from lmforge.checkpoint import resolve_checkpoint

    hint = "give a checkpoint directory, a run directory with a 'latest' file, or a hub name"
    if is_hub_name(source):
        folder = cached_hub_model(source)
        if folder is None and Path(source.split("/")[0]).expanduser().is_dir():
            # `runs/sft` beside a `runs/` directory: a local path that is missing, not a model
            # of a hub user called "runs" (the run would ask the hub, and fail there)
            found.problem(key, f"{source}: no such checkpoint directory", hint)
            return None
        if folder is None:
            _not_cached(key, source, "model", found)
            return None
        return found.attempt(key, lambda: resolve_checkpoint(folder))
    return found.attempt(key, lambda: resolve_checkpoint(Path(source).expanduser()), hint)


def check_weight_files(ckpt: Path, meta: dict[str, Any]) -> None:
    """The weight files lmforge.json lists exist with their recorded sizes (a Hugging Face
    directory without a manifest: some safetensors file exists). CheckpointError otherwise."""
    from lmforge.checkpoint import ENGINE_DIR, META_FILE
    from lmforge.errors import CheckpointError

    listed = meta.get("files") or {}
    for rel, info in listed.items():
        if rel.startswith(ENGINE_DIR + "/"):
            continue  # optimizer state: optional, read only on resume of the same topology
        file = ckpt / rel
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {META_FILE}); restore it")
        if isinstance(info, dict) and "size" in info and file.stat().st_size != info["size"]:
            raise CheckpointError(
                f"{file}: {file.stat().st_size} bytes but {META_FILE} records {info['size']}; "
                "the file is truncated or was modified"
            )
    if not listed and not any(ckpt.glob("*.safetensors")):
        raise CheckpointError(f"{ckpt}: no *.safetensors weight files")


@dataclass
class Checkpoint:
    """A checkpoint a dry run resolved: its directory, manifest, head and architecture."""

    path: Path
    meta: dict[str, Any]
    head: str
    model: Any  # ModelConfig

    @property
    def has_tokenizer(self) -> bool:
        """Whether the directory holds a tokenizer."""
        return (self.path / "tokenizer.json").is_file() or (
            self.path / "tokenizer_config.json"
        ).is_file()


def read_checkpoint(source: str, key: str, found: Findings, why: str = "") -> Checkpoint | None:
    """Resolve `source` and load its configs (no weights): a Checkpoint, or None with the
    failure recorded against `key` (`why` says what the run needs it for)."""
    from lmforge.checkpoint import META_FILE, _model_config, read_json
    from lmforge.hf import head_of

    problems = len(found.problems)
    ckpt = resolve_local(source, key, found)
    if ckpt is None:
        if why and len(found.problems) > problems:
            found.problems[-1] += f" ({why})"
        return None

    def load() -> Checkpoint:
        meta = read_json(ckpt / META_FILE) if (ckpt / META_FILE).exists() else {}
        head = head_of(read_json(ckpt / "config.json"), str(ckpt / "config.json"))
        model = _model_config(ckpt, {**meta, "head": head})  # what loading reads and compares
        check_weight_files(ckpt, meta)
        return Checkpoint(ckpt, meta, head, model)

    point = found.attempt(key, load)
    if point is not None:
        where = "" if str(ckpt) == source else f" -> {ckpt}"
        found.checked.append(
            f"{key} {source}{where}: {point.head} head, {point.model.n_layers} layers, "
            f"dim {point.model.dim}, vocabulary {point.model.vocab_size}"
        )
    return point


def load_tokenizer_from(path: str | Path, key: str, found: Findings) -> Any:
    """The tokenizer at `path` (a directory, or a hub name already cached), or None with the
    failure recorded against `key`."""
    from lmforge.tokenizer import load_tokenizer

    source = str(path)
    if is_hub_name(source):
        folder = cached_hub_model(source)
        if folder is None:
            _not_cached(key, source, "tokenizer", found)
            return None
        path = folder
    tok = found.attempt(key, lambda: load_tokenizer(path))
    if tok is not None:
        found.checked.append(f"{key}: tokenizer {source} loads ({len(tok)} tokens)")
    return tok


# ------------------------------------------------------------------------------ the resume


@dataclass
class Resume:
    """Where a run would continue from: a checkpoint (or None) and whether it is finished."""

    point: Checkpoint | None
    finished: bool = False


def resume_of(cfg: Any, found: Findings) -> Resume:
    """The resume point the run would take (as lmforge.stage.resume_point, without reading
    weights), and the settings changes it would refuse."""
    from lmforge.checkpoint import LATEST_FILE

    run_dir = Path(cfg.run_dir)
    how = cfg.resume.checkpoint
    has_latest = (run_dir / LATEST_FILE).exists()
    if how == "never":
        if has_latest:
            found.problem(
                "resume",
                f"never, but run_dir {run_dir} already holds checkpoints",
                "use resume: auto to continue or choose a new run_dir",
            )
        return Resume(None)
    if how == "auto" and not has_latest:
        found.checked.append(f"run_dir {run_dir}: no checkpoint yet; the run starts fresh")
        return Resume(None)
    source, key = (str(run_dir), "run_dir") if how == "auto" else (how, "resume")
    point = read_checkpoint(source, key, found)
    if point is None:
        return Resume(None)
    step = int(point.meta.get("step", 0))
    # A run by epochs records the steps it planned; one that stopped early is finished too.
    planned = point.meta.get("planned_steps")
    steps = planned if isinstance(planned, int) and planned > 0 else cfg.train.steps
    best = point.meta.get("best")
    if step >= steps or (isinstance(best, dict) and best.get("stopped")):
        found.checked.append(
            f"resume: {point.path} is at step {step} (train.steps={steps}"
            f"{', stopped early' if step < steps else ''}); the run is finished and would only "
            "report it, so nothing else is read"
        )
        return Resume(point, finished=True)
    found.checked.append(f"resume: from {point.path} at step {step} of {steps}")
    saved = point.meta.get("config")
    if isinstance(saved, dict):
        from lmforge.resume import config_changes

        found.attempt("resume", lambda: config_changes(saved, cfg, cfg.resume.allow_changes))
    return Resume(point)


# ------------------------------------------------------------------------- start weights


def check_start(cfg: Any, stage: str, resume: Resume, found: Findings) -> Any:
    """Check the weights and tokenizer a stage starts from; returns the stage's tokenizer (chat
    template applied) or None."""
    if stage == "pretrain":
        return check_pretrain_start(cfg, resume, found)
    init_from = str(cfg.init_from or "")
    start = resume.point
    needs_reference = stage in REFERENCE_FROM_INIT and (stage != "grpo" or cfg.beta > 0)
    if not init_from and (start is None or stage in REFERENCE_FROM_INIT):
        found.problem("init_from", f"not set; {stage} starts from a checkpoint", "set init_from")
    elif start is None or needs_reference:
        why = "the reference model is read from init_from even when the run resumes"
        init = read_checkpoint(init_from, "init_from", found, why if start is not None else "")
        start = start or init
    else:
        found.checked.append(
            f"init_from: not read; the run resumes from {start.path} (its own checkpoint)"
        )
    if start is None:
        return None
    key = "init_from" if start is not resume.point else "resume"
    if not start.has_tokenizer:
        found.problem(key, f"{start.path} has no tokenizer files; {stage} needs its tokenizer")
        return None
    tok = load_tokenizer_from(start.path, key, found)
    if tok is None:
        return None
    from lmforge.data.chat import chat_tokenizer

    return found.attempt("data.chat_template", lambda: chat_tokenizer(tok, cfg.data))


def check_pretrain_start(cfg: Any, resume: Resume, found: Findings) -> Any:
    """Pretraining: init_from (when set and not resuming) and the tokenizer it will use (its
    tokenizer.path, else the start checkpoint's, else one trained on the corpus)."""
    start = resume.point
    if start is None and cfg.init_from:
        start = read_checkpoint(str(cfg.init_from), "init_from", found)
    if cfg.tokenizer.path:
        return load_tokenizer_from(cfg.tokenizer.path, "tokenizer.path", found)
    if start is not None and (start.path / "tokenizer.json").is_file():
        return load_tokenizer_from(start.path, "init_from", found)
    found.checked.append(
        f"tokenizer: trained on the corpus at the start ({cfg.tokenizer.vocab_size} tokens)"
    )
    return None


def check_ppo_models(cfg: Any, resume: Resume, found: Findings) -> None:
    """PPO's reward model (read even on resume) and the critic's start: the resumed step's
    critic saved beside the actor (run_dir/critic/step-N), else critic_from or reward_model."""
    if cfg.reward_model:
        point = read_checkpoint(cfg.reward_model, "reward_model", found)
        if point is not None and point.head != "reward":
            found.warnings.append(
                f"reward_model: {point.path} is a language model, not a trained reward model; "
                "its score head would start random"
            )
    if not (cfg.critic_from or cfg.reward_model):
        found.problem(
            "critic_from", "without a reward_model the critic needs a checkpoint", "set critic_from"
        )
    elif resume.point is not None:
        critic = resume.point.path.parent / "critic" / resume.point.path.name
        if (critic / "config.json").is_file():
            read_checkpoint(str(critic), "resume", found)
        else:
            found.problem(
                "resume",
                f"{critic}: missing: the critic checkpoint of {resume.point.path}",
                "restore it or resume from an earlier step",
            )
    elif cfg.critic_from:
        read_checkpoint(cfg.critic_from, "critic_from", found)


# ------------------------------------------------------------------------------------ data


def first_records(path: Path, builder: str, n: int = FIRST_RECORDS) -> list[tuple[str, Any]]:
    """(where, record) of the first `n` records of a local data file, read without `datasets`:
    JSON lines one by one, a JSON array whole, parquet's first row batch. DataError when they
    do not parse."""
    from lmforge.errors import DataError

    out: list[tuple[str, Any]] = []
    if builder == "parquet":
        import pyarrow.parquet as pq

        try:
            batch = next(pq.ParquetFile(path).iter_batches(batch_size=n), None)
        except Exception as e:  # pyarrow raises several types on a bad file
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(f"{path}: cannot read it as parquet ({detail}); re-export it") from None
        rows = batch.to_pylist() if batch is not None else []
        return [(f"{path} row {i}", row) for i, row in enumerate(rows)]
    with open(path, encoding="utf-8") as fh:
        if path.suffix.lower() == ".json" and fh.read(1 << 16).lstrip().startswith("["):
            fh.seek(0)
            try:
                records = json.load(fh)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path} line {e.lineno}: invalid JSON ({e.msg}); fix the file"
                ) from None
            return [(f"{path} record {i}", r) for i, r in enumerate(records[:n])]
        fh.seek(0)
        for lineno, line in enumerate(fh, 1):
            if len(out) >= n:
                break
            if not line.strip():
                continue
            try:
                out.append((f"{path} line {lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path} line {lineno}: invalid JSON ({e.msg}, column {e.colno}); "
                    "fix or remove that line"
                ) from None
    return out


def check_hub_dataset(name: str, key: str, found: Findings) -> None:
    """A hub dataset: in the local Hugging Face cache (its records are not read), else reported."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(name, repo_type="dataset", local_files_only=True)
    except Exception:  # not cached
        _not_cached(key, name, "dataset", found)
        return
    found.checked.append(f"{key} {name}: a hub dataset in the local cache (records not read)")


def _retold(check: Callable[[], T], words: dict[str, str]) -> Callable[[], T]:
    """`check` with each key of `words` in its DataError retold as the value, once (the
    single-source readers name `data.source`; a mixture entry's problem names its own key)."""
    from lmforge.errors import DataError

    if not words:  # not a mixture: the reader's own words
        return check

    def run() -> T:
        try:
            return check()
        except DataError as err:
            text = str(err)
            for said, meant in words.items():
                text = text.replace(f"{said} ", f"{meant} ", 1)
            raise DataError(text) from None

    return run


def _entries(data: Any) -> list[tuple[int, str, str]]:
    """(index, key, what) of each mixture entry: `data.sources[i]`, and the same with its name
    and share of the weight, for the checked lines."""
    total = sum(s.weight for s in data.sources)
    out = []
    for i, src in enumerate(data.sources):
        key = f"data.sources[{i}]"
        share = f"weight {src.weight:g} = {src.weight / total:.1%}"
        out.append((i, key, f"{key} (name {src.label()}, {share})"))
    return out


def check_corpus(data: Any, found: Findings) -> None:
    """Pretraining data: each source (one, or every entry of a mixture) resolves, its files pass
    the reader's encoding checks, and the first records of each file hold its text_field."""
    if not data.sources:
        check_one_corpus(data, "data.source", "data.source", found)
        return
    for i, key, what in _entries(data):
        check_one_corpus(data.for_source(i), key, what, found)


def check_one_corpus(data: Any, key: str, what: str, found: Findings) -> None:
    """One pretraining source: `key` names it in problems, `what` in the checked line."""
    from lmforge.data.diagnose import record_problem
    from lmforge.data.sources import resolve_source

    if data.source.strip() == "builtin":
        found.checked.append(f"{what} builtin: the embedded corpus")
        return
    words = {} if key == "data.source" else {"data.source": f"{key}.source"}
    source = found.attempt(key, _retold(lambda: resolve_source(data), words))
    if source is None:
        return
    if source.kind == "hub":
        check_hub_dataset(source.name, key, found)
        return

    def first() -> int:
        count = 0
        for path in source.files:
            records = first_records(path, source.builder) if source.builder != "text" else []
            for where, record in records:
                problem = record_problem(record, data.text_field, where)
                if problem is not None:
                    raise problem
            count += len(records)
        return count

    count = found.attempt(key, _retold(first, words))
    if count is not None:
        found.checked.append(
            f"{what} {source.describe()}: readable; first records of each file have "
            f"'{data.text_field}'" if source.builder != "text" else
            f"{what} {source.describe()}: readable UTF-8 text"
        )  # fmt: skip


def _chat_kind(stage: str) -> str:
    return "preference" if stage in ("reward", "dpo") else "sft"


def check_chat_data(data: Any, stage: str, tok: Any, found: Findings) -> list[dict[str, Any]]:
    """Chat data: read and checked by the stage's reader (every record: the reader checks them
    all before training too), the first records tokenised with the stage's tokenizer; a mixture
    entry by entry (each listed, each problem its own line). Returns the first training records
    (for the reward-function sample; a mixture's first source's)."""
    if not data.sources:
        return check_chat_source(data, stage, tok, "data", "data.source", found)
    first: list[dict[str, Any]] = []
    for i, key, what in _entries(data):
        records = check_chat_source(data.for_source(i), stage, tok, key, what, found)
        first = first or records
    return first


def check_chat_source(
    data: Any, stage: str, tok: Any, prefix: str, what: str, found: Findings
) -> list[dict[str, Any]]:
    """One chat source (`data` a single-source config): problems name `prefix.key`, the checked
    line starts with `what`."""
    from lmforge.data.chat import chat_records
    from lmforge.data.config import DataConfig
    from lmforge.data.sources import resolve_source

    hub, before = False, len(found.problems)
    for key in ("source", "heldout_source"):
        value = str(getattr(data, key)).strip()
        if not value or value == "builtin":
            continue
        name = value.partition(":")[0]
        probe = DataConfig(source=value, max_record_bytes=data.max_record_bytes)
        # the probe reads `value` as its data.source, so its errors say data.source
        probe_words = {} if prefix == "data" else {"data.source": f"{prefix}.{key}"}
        check = _retold(lambda probe=probe: resolve_source(probe), probe_words)
        resolved = found.attempt(f"{prefix}.{key}", check)
        if resolved is not None and resolved.kind == "hub":
            hub = True
            check_hub_dataset(name, f"{prefix}.{key}", found)
    if hub or len(found.problems) > before:  # a source is missing or remote: nothing to read
        return []
    kind = _chat_kind(stage)
    key = f"{prefix}.source"
    words = (
        {}
        if prefix == "data"
        else {
            "data.source": f"{prefix}.source",
            "data.heldout_source": f"{prefix}.heldout_source",
        }
    )
    read = _retold(lambda: chat_records(data, kind), words)  # type: ignore[arg-type]
    pair = found.attempt(key, read)
    if pair is None:
        return []
    train, heldout = pair
    found.checked.append(
        f"{what} {data.source}: {len(train):,} training and {len(heldout):,} held-out "
        f"{kind} records"
    )
    if tok is not None:
        found.attempt(key, lambda: encode_first(train, heldout, kind, tok, data))
    return train[:FIRST_RECORDS]


def encode_first(
    train: list[dict[str, Any]], heldout: list[dict[str, Any]], kind: str, tok: Any, data: Any
) -> None:
    """Tokenise the first records as the stage will (its dataset classes and template)."""
    from lmforge.data.chat_datasets import PreferenceDataset, PromptDataset, SFTDataset

    for records in (train[:FIRST_RECORDS], heldout[:FIRST_RECORDS]):
        if not records:
            continue
        if kind == "preference":
            PreferenceDataset(records, tok, data.seq_len)
        else:
            SFTDataset(records, tok, data.seq_len, pack=data.pack)
            PromptDataset(records, tok, data.seq_len)


# --------------------------------------------------------------------------------- rewards


def sample_call(records: list[dict[str, Any]], tok: Any, seq_len: int) -> dict[str, Any]:
    """One (prompts, completions, answers, tasks, fields) call of a single completion: the first
    prompt record answered with its own reference answer, as the stages render it; a made-up
    `add` task when no record was read."""
    if records and tok is not None:
        from lmforge.data.chat_datasets import PromptDataset

        prompts = PromptDataset(records, tok, seq_len)
        if len(prompts):
            return {
                "prompts": [tok.decode(prompts.prompt_ids[0])],
                "completions": [prompts.answers[0]],
                "answers": [prompts.answers[0]],
                "tasks": [prompts.tasks[0]],
                "fields": prompts.field_lists([0]),
            }
    return {
        "prompts": ["What is 2 + 3? Answer with the number only."],
        "completions": ["5"],
        "answers": ["5"],
        "tasks": ["add"],
        "fields": {},
    }


def check_rewards(specs: Any, records: list[dict[str, Any]], tok: Any, seq_len: int,
                  found: Findings) -> None:  # fmt: skip
    """Reward functions load, and each returns one finite number for a sample completion."""
    from finetune.rewards import build_reward_fn

    reward = found.attempt("rewards", lambda: build_reward_fn(specs, key="rewards"))
    if reward is None:
        return
    call = found.attempt("rewards", lambda: sample_call(records, tok, seq_len))
    if call is None:
        return
    fields = call.pop("fields")
    result = found.attempt("rewards", lambda: reward(*call.values(), **fields))
    if result is not None:
        values = ", ".join(f"{name} {v[0]:g}" for name, v in result.parts.items())
        found.checked.append(f"rewards: a sample completion scores {values}")


# ---------------------------------------------------------------------------------- batch


def batch_plan(cfg: Any, stage: str, world: int, found: Findings) -> None:
    """The batch plan line (processes × micro-batch × accumulation), or the problem with it.
    Every stage config has `batch_plan` (StageConfig's; GRPO splits whole groups, PPO prompts)."""
    plan = found.attempt("train.global_batch_size", lambda: cfg.batch_plan(world))
    if plan is not None:
        found.plan = plan.describe()
    found.checked.append(cfg.train.describe_length())


# --------------------------------------------------------------------------------- memory


@contextlib.contextmanager
def memory_check_deferred() -> Iterator[None]:
    """Load a config without its memory check (lmforge.memcheck, run by StageConfig.validate):
    a dry run makes it one of its checks, so a run too large for this machine is listed with
    the other problems instead of hiding them."""
    from lmforge.memcheck import SKIP_ENV

    before = os.environ.get(SKIP_ENV)
    os.environ[SKIP_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[SKIP_ENV]
        else:
            os.environ[SKIP_ENV] = before


def check_memory_fit(cfg: Any, world: int, found: Findings) -> None:
    """The memory check the config load skipped (see `memory_check_deferred`), for the batch
    plan's micro-batch; skipped when the user skips it or the plan is impossible (listed)."""
    from lmforge.memcheck import SKIP_ENV, check_memory

    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        found.checked.append(f"memory: not compared with this machine ({SKIP_ENV} is set)")
        return
    try:
        micro = cfg.batch_plan(world).micro
    except LmforgeError:
        return  # the batch plan's problem is listed already
    before = len(found.problems)
    found.attempt("memory", lambda: check_memory(cfg, micro, world))
    if len(found.problems) == before:
        found.checked.append("memory: compared with this machine's, no problem found")


# ---------------------------------------------------------------------------------- driver


def preflight(cfg: Any, stage: str, world: int = 1) -> Findings:
    """Check what a run of `stage` with `cfg` will read (see the module doc); never raises a
    user error: every failure is one line of the returned Findings.problems."""
    found = Findings()
    resume = resume_of(cfg, found)
    if resume.finished:
        return found
    batch_plan(cfg, stage, world, found)
    check_memory_fit(cfg, world, found)
    tok = check_start(cfg, stage, resume, found)
    if stage == "ppo":
        check_ppo_models(cfg, resume, found)
    if stage == "pretrain":
        check_corpus(cfg.data, found)
        return found
    records = check_chat_data(cfg.data, stage, tok, found)
    uses_functions = stage == "grpo" or (stage == "ppo" and not cfg.reward_model)
    if uses_functions:
        check_rewards(cfg.rewards, records, tok, cfg.data.seq_len, found)
    return found


def dry_run(cfg: Any, stage: str) -> int:
    """`--dry-run`: run `preflight`, print the resolved config followed by the report as `# `
    comment lines on stdout (so stdout stays a valid config YAML, which launch/slurm/job.sh
    parses), and every problem on stderr, one line each. Returns the exit code: 0, or 2 when
    anything failed. The process count is the launcher's WORLD_SIZE (1 without a launcher)."""
    import sys

    from lmforge.config import dumps
    from lmforge.estimate import dry_run_report

    world = max(1, int(os.environ.get("WORLD_SIZE", "1")))
    # Whatever a check prints (a user's reward function, a library) goes to stderr: stdout is
    # the YAML that scripts read.
    with contextlib.redirect_stdout(sys.stderr):
        found = preflight(cfg, stage, world)
        report = [line.removeprefix("# ") for line in dry_run_report(cfg, world).splitlines()]
    print(dumps(cfg), end="")
    head = [found.plan] if found.plan else []
    print("\n".join("# " + line for line in [*head, *report, *found.lines()]))
    sys.stdout.flush()
    if not found.problems:
        return 0
    count = len(found.problems)
    rank = os.environ.get("RANK", "0")
    where = "" if rank == "0" else f" (rank {rank})"
    text = f"error{where}: --dry-run found {count} problem{'s' if count > 1 else ''}:\n"
    text += "".join(f"  {p}\n" for p in found.problems)
    sys.stderr.write(text)  # one write: ranks' lists never interleave
    sys.stderr.flush()
    return 2
