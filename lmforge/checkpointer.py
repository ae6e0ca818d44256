"""The run's state on disk: one object that saves, restores and rolls back everything a run is.

A run registers its engines (`add_engine`: the model every stage trains, plus PPO's critic saved
under `run_dir/critic/`) and its stateful parts (`add_state`: the fault monitor, the KL
controller, the reward statistics), each of which saves and loads its own state through
`state_dict` / `load_state_dict`. Then:

- `save(step, cursor, metrics)` writes one checkpoint per engine in the shared format
  (lmforge.checkpoint): every rank writes its engine state files (DeepSpeed's partitioned
  optimizer state: the one copy of it) and RNG, rank 0 the consolidated weights, the tokenizer
  and lmforge.json, whose manifest covers every file. With train.save_optimizer=false only the
  weights, the tokenizer and lmforge.json are written. A disk that fills during a save is a
  CheckpointError; the partial checkpoint is removed and `latest` stays where it was. The main
  engine's checkpoint is committed last and only then does `latest` move, so a kill anywhere
  inside a save leaves every engine on the previous checkpoint. The parts' states go into the
  main lmforge.json under their names (`faults`, `kl_controller`, `reward_moments`), where
  earlier versions put them.
- `restore(point)` loads every engine (the engine's own state files on the same topology, else
  the whole fp32 state read from them and re-sharded: lmforge.elastic), this rank's RNG and
  every part, checking each file it reads against the manifest read once at start
  (`open_point`).
- `rollback(before_step)` goes back to the newest checkpoint saved before a run of bad steps.

With train.keep_best the checkpointer also keeps a `BestKeeper` (a part saved as `best`): the
best value of that evaluation metric so far, its step and the early-stop count. A save at the
best step points `run_dir/best` at it after `latest` moved and before retention runs, so
retention never deletes it; a restore or rollback points `best` back at what the restored state
says, so the file never names a step from a timeline the run abandoned.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from lmforge.checkpoint import (
    BEST_FILE,
    ENGINE_DIR,
    META_FILE,
    commit,
    load_checkpoint,
    load_reward_model,
    partial_dir,
    read_json,
    read_pointer,
    resolve_checkpoint,
    verify_files,
    write_latest,
    write_model_files,
    write_pointer,
)
from lmforge.distributed import DistInfo
from lmforge.elastic import (
    CONSOLIDATED_DIR,
    STATE_FILE,
    load_consolidated,
    load_whole,
    save_consolidated,
)
from lmforge.engine import StatefulEngine
from lmforge.errors import CheckpointError, ConfigError
from lmforge.rundir import (
    apply_retention,
    checkpoint_bytes,
    format_bytes,
    latest_name,
    rollback_target,
    space_problem,
)
from lmforge.runtime import TrainConfig, barrier

SAVE_PAUSE_ENV = "LMFORGE_TEST_SAVE_PAUSE"  # testing aid: seconds to hold a save before commit
MAIN = "model"  # the name of the engine every stage trains; its checkpoint is the run's


class Stateful(Protocol):
    """A part of the run whose state a checkpoint keeps (plain JSON values)."""

    def state_dict(self) -> dict[str, Any]:
        """The state to save."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take back what state_dict returned."""
        ...


@dataclass
class Slot:
    """One engine of the run: where its checkpoints go and what they record."""

    name: str
    engine: StatefulEngine
    subdir: str  # "" = run_dir itself; else run_dir/<subdir>/step-N
    stage: str  # lmforge.json "stage"
    parent: str  # lmforge.json "parent": the weights it started from
    lora_scaling: float | None  # merge LoRA adapters into the saved weights with this scaling


@dataclass
class ResumePoint:
    """A checkpoint to continue from, with its manifest (read and verified once), and the same
    step's checkpoints of the run's other engines (opened once, when first asked for)."""

    path: Path
    meta: dict[str, Any]
    siblings: dict[str, ResumePoint] = dataclasses.field(default_factory=dict)

    @property
    def step(self) -> int:
        """The step it was saved after."""
        return int(self.meta.get("step", 0))

    @property
    def cursor(self) -> int:
        """Global samples consumed when it was saved."""
        return int(self.meta.get("data_cursor", 0))

    def sibling(self, subdir: str) -> Path:
        """The same step's checkpoint of the engine saved under `subdir` ("" = this one)."""
        return self.path.parent / subdir / self.path.name if subdir else self.path

    def open_sibling(self, subdir: str) -> ResumePoint:
        """The checkpoint of `sibling(subdir)` with its manifest, read and verified once."""
        if not subdir:
            return self
        if subdir not in self.siblings:
            ckpt = self.sibling(subdir)
            if not (ckpt / META_FILE).is_file():
                raise CheckpointError(
                    f"{ckpt}: missing: the {subdir} checkpoint of {self.path}; restore it or "
                    "resume from an earlier step"
                )
            self.siblings[subdir] = open_point(ckpt)
        return self.siblings[subdir]


def open_point(path: str | Path) -> ResumePoint:
    """Read a checkpoint's lmforge.json and verify its weights and tokenizer files against it
    (engine state files are verified by `restore`, each rank its own)."""
    ckpt = resolve_checkpoint(path)
    meta = read_json(ckpt / META_FILE)
    verify_files(ckpt, meta)
    refuse_weights_only(ckpt, meta)
    return ResumePoint(ckpt, meta)


def saved_optimizer(meta: Mapping[str, Any]) -> bool:
    """Whether a checkpoint was saved with its optimizer state (train.save_optimizer)."""
    train = meta.get("config", {}).get("train", {}) if isinstance(meta, Mapping) else {}
    return bool(train.get("save_optimizer", True)) if isinstance(train, Mapping) else True


def refuse_weights_only(ckpt: Path, meta: Mapping[str, Any]) -> None:
    """A run does not resume from a checkpoint saved with train.save_optimizer=false: without
    the optimizer state and schedule it could not continue the run it claims to continue."""
    if not saved_optimizer(meta):
        raise CheckpointError(
            f"{ckpt}: saved with train.save_optimizer=false (weights only), so training cannot "
            f"resume from it exactly; start a new run from its weights with init_from={ckpt} "
            "and a new run_dir, or keep train.save_optimizer=true in runs you mean to resume"
        )


class BestKeeper:
    """train.keep_best and train.early_stop: the best value of one evaluation metric so far, the
    step it was reached at and how many evaluations since brought no improvement. Saved in
    every checkpoint (part `best`), so a resumed run judges and stops exactly as an
    uninterrupted one. Step 0 (the evaluation before training) is never a candidate: it has no
    checkpoint of its own."""

    def __init__(self, train: TrainConfig) -> None:
        self.metric = train.keep_best
        self.lower = train.best_is_lower()
        self.patience = train.early_stop
        self.value: float | None = None
        self.step = 0  # 0: no best yet
        self.waited = 0  # evaluations since the last improvement
        self.stopped = 0  # the step the run stopped early at (0: it did not)

    def judge(self, step: int, result: Mapping[str, Any]) -> bool:
        """Take evaluation `result` of `step`; True when it is a new best. An evaluation
        without the metric is a ConfigError naming train.keep_best and the metrics there are."""
        if step <= 0:
            return False
        if self.metric not in result:
            names = ", ".join(sorted(result)) or "none: this run has no held-out data"
            raise ConfigError(
                f"train.keep_best: {self.metric} is not a metric of this stage's evaluation "
                f"(it reports {names}); name one of those"
            )
        value = float(result[self.metric])
        better = math.isfinite(value) and (
            self.value is None or (value < self.value if self.lower else value > self.value)
        )
        if better:
            self.value, self.step, self.waited = value, step, 0
        else:
            self.waited += 1
        return better

    def exhausted(self) -> bool:
        """Whether train.early_stop evaluations in a row brought no new best."""
        return self.patience > 0 and self.waited >= self.patience

    def describe(self) -> str:
        """'eval/loss 1.2345 at step 300' (or that there is none yet)."""
        if self.value is None:
            return f"{self.metric}: no best yet"
        return f"{self.metric} {self.value:.4f} at step {self.step}"

    def state_dict(self) -> dict[str, Any]:
        """The state to save (plain JSON values)."""
        return {
            "metric": self.metric,
            "value": self.value,
            "step": self.step,
            "waited": self.waited,
            "stopped": self.stopped,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take back what state_dict returned; a state kept for another metric starts afresh."""
        if state.get("metric") != self.metric:
            return
        value = state.get("value")
        self.value = None if value is None else float(value)
        self.step = int(state.get("step", 0))
        self.waited = int(state.get("waited", 0))
        self.stopped = int(state.get("stopped", 0))


class Checkpointer:
    """Save, restore and roll back a run's engines and stateful parts (see the module)."""

    def __init__(self, run_dir: Path, info: DistInfo, config: Any, stage: str, tokenizer: Any):
        self.run_dir = run_dir
        self.info = info
        self.config = config  # the stage's resolved config dataclass
        self.stage = stage
        self.tokenizer = tokenizer
        self.slots: list[Slot] = []
        self.parts: dict[str, Stateful] = {}
        self.record: dict[str, Any] = {}  # extra lmforge.json fields (W&B run id, ...)
        train = getattr(config, "train", None)
        self.best: BestKeeper | None = None
        if isinstance(train, TrainConfig) and train.keep_best:
            self.best = BestKeeper(train)
            self.add_state(BEST_FILE, self.best)

    def add_engine(
        self,
        name: str,
        engine: StatefulEngine,
        *,
        parent: str | Path = "",
        subdir: str = "",
        stage: str = "",
        lora_scaling: float | None = None,
    ) -> None:
        """Register an engine; the first one is the run's main model (saved in run_dir)."""
        if not self.slots and subdir:
            raise ValueError("the first engine is the run's own and is saved in run_dir")
        tag = stage or (self.stage if not subdir else f"{self.stage}-{subdir}")
        self.slots.append(Slot(name, engine, subdir, tag, str(parent or ""), lora_scaling))

    def add_state(self, name: str, part: Stateful) -> None:
        """Register a stateful part, saved in lmforge.json under `name`."""
        self.parts[name] = part

    def engines(self) -> dict[str, StatefulEngine]:
        """Every registered engine by name."""
        return {slot.name: slot.engine for slot in self.slots}

    # -- save -------------------------------------------------------------------------------

    def save(self, step: int, cursor: int, metrics: Mapping[str, Any], **extra: Any) -> Path:
        """Checkpoint every engine at `step` (collective); returns the main checkpoint's path.
        `extra` fields (e.g. tokens_seen) go into every lmforge.json."""
        name = f"step-{step:06d}"
        common = self._record(step, cursor, metrics, extra)
        states = {key: part.state_dict() for key, part in self.parts.items()}
        main, *others = self.slots
        for slot in [*others, main]:  # the main one last: `latest` moves only when all are in
            meta = {**common, "stage": slot.stage, "parent": slot.parent or None}
            if slot is main:
                meta.update(states)
            save_engine(
                slot.engine,
                self.run_dir / slot.subdir / name,
                tokenizer=self.tokenizer,
                meta=meta,
                lora_scaling=slot.lora_scaling,
            )
        if self.info.is_main:
            if self.best is not None and self.best.step == step:
                write_pointer(self.run_dir, BEST_FILE, name)  # after `latest`, before retention
            self._retain(name)
        barrier()
        return self.run_dir / name

    def _record(
        self, step: int, cursor: int, metrics: Mapping[str, Any], extra: Mapping[str, Any]
    ) -> dict[str, Any]:
        return {
            "step": step,
            "data_cursor": cursor,
            "seed": self.config.train.seed,
            "world_size": self.info.world,
            "config": dataclasses.asdict(self.config),
            "metrics": {k: v for k, v in metrics.items() if v is not None},
            **self.record,
            **extra,
        }

    def _retain(self, newest: str) -> None:
        """Retention (train.keep_last / keep_every) on the main directory; the other engines'
        directories lose the same steps."""
        train = self.config.train
        best = (f"step-{self.best.step:06d}",) if self.best is not None and self.best.step else ()
        deleted = apply_retention(self.run_dir, train.keep_last, train.keep_every, newest, best)
        for slot in self.slots[1:]:
            for name in deleted:
                doomed = self.run_dir / slot.subdir / name
                if doomed.is_dir():
                    hidden = doomed.parent / f".{name}.deleting"
                    os.replace(doomed, hidden)
                    shutil.rmtree(hidden, ignore_errors=True)
        if deleted:
            print(
                f"deleted {', '.join(deleted)} (train.keep_last={train.keep_last}, "
                f"keep_every={train.keep_every})",
                flush=True,
            )

    # -- restore ----------------------------------------------------------------------------

    def restore(self, point: ResumePoint, *, skip_parts: tuple[str, ...] = ()) -> str:
        """Load every engine, this rank's RNG and the parts (except `skip_parts`) from `point`
        (collective); returns how the main engine was read."""
        hows = []
        for slot in self.slots:
            saved = point.open_sibling(slot.subdir)
            mine = self._owns(saved.path)
            hows.append(restore_engine(slot.engine, saved.path, saved.meta, own=mine))
            # The optimizer state brought back the hyper-parameters it was saved with; the run's
            # current ones win (a resume may have changed the learning rate since).
            slot.engine.set_hyperparameters(self.config.optim)
        load_rng(point.path / ENGINE_DIR, self.info.rank)  # the main engine's RNG is the run's
        for key, part in self.parts.items():
            if key not in skip_parts and isinstance(point.meta.get(key), Mapping):
                part.load_state_dict(point.meta[key])
        self._sync_best()
        return hows[0]

    def _sync_best(self) -> None:
        """Point `best` at the step the restored state names (rank 0): a kill between a save
        and its `best` update, or a rollback past the best step, leaves the file behind the
        state or ahead of it. With no best yet, a `best` file (from an abandoned timeline) goes."""
        if self.best is None or not self.info.is_main:
            return
        file = self.run_dir / BEST_FILE
        if not self.best.step:
            file.unlink(missing_ok=True)
            return
        name = f"step-{self.best.step:06d}"
        try:
            current = read_pointer(self.run_dir, BEST_FILE)
        except CheckpointError:
            current = None  # unreadable: rewritten below
        if current != name and (self.run_dir / name / META_FILE).is_file():
            write_pointer(self.run_dir, BEST_FILE, name)

    def _owns(self, ckpt: Path) -> bool:
        return ckpt.resolve().is_relative_to(self.run_dir.resolve())

    def rollback(self, before_step: int) -> ResumePoint | None:
        """Restore the newest checkpoint saved before `before_step` (collective; the fault
        monitor's own state is left to the caller) and point `latest` back at it."""
        target = rollback_target(self.run_dir, before_step)
        if target is None:
            return None
        point = ResumePoint(target, read_json(target / META_FILE))
        self.restore(point, skip_parts=("faults",))
        barrier()
        if self.info.is_main:
            write_latest(self.run_dir, target.name)
        return point


def save_engine(
    engine: StatefulEngine,
    path: Path,
    *,
    tokenizer: Any,
    meta: dict[str, Any],
    lora_scaling: float | None = None,
) -> Path:
    """Collective save of one engine into checkpoint `path`: every rank writes its engine state
    files and RNG into the partial directory (unless train.save_optimizer is false; with
    train.elastic_state also a consolidated copy of the whole fp32 state); rank 0 writes the
    consolidated weights (LoRA merged) and the tokenizer, then renames the directory into place
    and points `latest` at it. The train settings come from meta["config"]["train"]. Too little
    free disk space on any rank is a CheckpointError on every rank before anything is written;
    a disk that fills during the save is one too, after the partial directory is removed."""
    info = engine.info
    train = dict(meta.get("config", {}).get("train", {}))
    with_state = bool(train.get("save_optimizer", True))
    elastic = with_state and bool(train.get("elastic_state", False))
    need = _check_space(engine, path, int(train.get("min_free_bytes", 0)), with_state, elastic)
    topology = engine.topology()
    meta = {**meta, "world_size": topology["world_size"], "engine": topology}
    tmp = partial_dir(path)
    if info.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    try:
        if with_state:
            # The weights file holds the module's weights as they are unless LoRA is merged
            # into it: then DeepSpeed's copy of the module is the only one of the adapters.
            omitted = engine.save_state(
                tmp / ENGINE_DIR,
                client_state={"step": meta.get("step")},
                without_module=lora_scaling is None,
            )
            meta["engine"] = {**topology, "module_in_weights": omitted}
            save_rng(tmp / ENGINE_DIR, info.rank)
            if elastic:
                save_consolidated(engine, tmp / ENGINE_DIR / CONSOLIDATED_DIR)
        state = engine.full_state_dict()
        barrier()
        if info.is_main:
            assert state is not None
            if lora_scaling is not None:
                state = merge_lora_state(state, lora_scaling)
            model_cfg = engine.module.cfg
            write_model_files(tmp, model_cfg, state, tokenizer)
            pause = float(os.environ.get(SAVE_PAUSE_ENV, "0") or 0)
            if pause > 0:
                time.sleep(pause)
            commit(tmp, path, {"model": dataclasses.asdict(model_cfg), **meta}, update_latest=True)
    except Exception as e:  # the tokenizers library reports a full disk as a plain Exception
        if not _disk_full(e, path.parent, need):
            raise
        raise CheckpointError(_abandon_save(tmp, path, need)) from None
    barrier()
    return path


def _disk_full(error: Exception, parent: Path, need: int) -> bool:
    """Whether a write failed because the disk (or quota) is full. torch.save reports it as a
    RuntimeError without an errno (then the free space decides), the tokenizers library as an
    Exception whose text has the OS message."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    if "No space left" in text:
        return True
    if isinstance(error, RuntimeError) and "write" in text.lower():
        return shutil.disk_usage(_existing(parent)).free < need
    return False


def _existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _abandon_save(tmp: Path, path: Path, need: int) -> str:
    """Remove what a failed save left (the partial directory; the new checkpoint too if it was
    renamed into place but `latest` could not move to it) and say what happened."""
    shutil.rmtree(tmp, ignore_errors=True)
    parent = path.parent
    latest = latest_name(parent)
    if path.is_dir() and latest != path.name:
        shutil.rmtree(path, ignore_errors=True)
    (parent / ".latest.tmp").unlink(missing_ok=True)
    free = shutil.disk_usage(_existing(parent)).free
    kept = f"`latest` still names {latest}" if latest else "no earlier checkpoint exists"
    return (
        f"{parent}: the disk filled up while saving {path.name}: it needs about "
        f"{format_bytes(need)} ({need} bytes) and {format_bytes(free)} ({free} bytes) are free; "
        f"the partial checkpoint was removed and {kept}; free disk space (or keep fewer "
        "checkpoints: train.keep_last) and resume"
    )


def restore_engine(engine: StatefulEngine, ckpt: Path, meta: Mapping[str, Any], own: bool) -> str:
    """Load the training state of checkpoint `ckpt` into `engine` (collective); returns how.
    The engine's own state files are read as they are on the same topology when the checkpoint
    is the run's own (`own`) or has no consolidated copy; an older checkpoint's consolidated
    copy is re-sharded otherwise; else the whole fp32 state is read from the old shards and
    re-sharded. Each file is checked against the manifest before it is read."""
    saved = {"world_size": meta.get("world_size"), **meta.get("engine", {})}
    state_dir, whole = ckpt / ENGINE_DIR, ckpt / ENGINE_DIR / CONSOLIDATED_DIR
    was = engine.topology_text(saved)
    has_state = (state_dir / "state").is_dir()
    weights = _module_weights(ckpt, meta) if saved.get("module_in_weights") and has_state else None
    if engine.resumes_natively(saved) and (own or not whole.is_dir()) and has_state:
        verify_files(ckpt, meta, engine=True, select=engine.owns_state_file)
        engine.load_state(state_dir, weights)
        return f"DeepSpeed engine state ({was})"
    now = engine.topology_text()
    if (whole / STATE_FILE).is_file():
        verify_files(ckpt, meta, engine=True, select=lambda rel: f"/{CONSOLIDATED_DIR}/" in rel)
        load_consolidated(engine, whole)
        return f"whole fp32 weights and optimizer state, re-sharded from {was} to {now}"
    if has_state:
        # Every rank may need a piece of every old shard: check them all before reading.
        verify_files(ckpt, meta, engine=True, select=lambda rel: "/state/" in rel)
        load_whole(engine, engine.read_state_files(state_dir, weights))
        return (
            f"whole fp32 weights and optimizer state, re-sharded from {was} to {now} "
            "(read from the engine shards)"
        )
    refuse_weights_only(ckpt, meta)
    return "weights only: the checkpoint has no optimizer state"


def _module_weights(ckpt: Path, meta: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The checkpoint's weights under the engine module's parameter names, in their stored
    precision (the engine state left the module's weights to this file)."""
    loader = load_reward_model if meta.get("head") == "reward" else load_checkpoint
    model, _, _ = loader(ckpt, dtype=None, verify=False, with_tokenizer=False, meta=meta)
    return dict(model.state_dict())


def merge_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Fold LoRA adapters into their base weights in a gathered state dict:
    W = W0 + scaling·B·A (Hu et al. 2021), keys back to the plain model's names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if ".base_layer." in key:
            prefix, _, leaf = key.partition(".base_layer.")
            if leaf == "weight":
                a = state[f"{prefix}.lora_A.default.weight"].float()  # (r, in)
                b = state[f"{prefix}.lora_B.default.weight"].float()  # (out, r)
                value = (value.float() + scaling * (b @ a)).to(value.dtype)  # (out, in)
            key = f"{prefix}.{leaf}"
        out[key] = value
    return out


def save_rng(directory: Path, rank: int) -> None:
    """This rank's torch RNG state (dropout) as JSON in `directory`."""
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"rng-rank{rank}.json").write_text(json.dumps(state))


def load_rng(directory: Path, rank: int) -> None:
    """Restore what save_rng wrote, if this rank has a file (the process count may differ)."""
    file = directory / f"rng-rank{rank}.json"
    if not file.exists():
        return
    state = json.loads(file.read_text())
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if `flag` is true on any."""
    value = torch.tensor([1.0 if flag else 0.0])
    if info.world > 1 and dist.is_initialized():
        if dist.get_backend() == "nccl":
            value = value.cuda()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def _space_needed(engine: StatefulEngine, parent: Path, with_state: bool, elastic: bool) -> int:
    """Bytes the next checkpoint in `parent` will take: the last one's size, or an estimate
    from the parameter count: the weights, plus (with the optimizer state) DeepSpeed's copy of
    the module and the fp32 master and moments, plus the consolidated copy with elastic_state."""
    name = latest_name(parent)
    previous = checkpoint_bytes(parent / name) if name and (parent / name).is_dir() else 0
    if previous:
        return int(previous * 1.1)
    low = 4 if engine.topology().get("precision") == "fp32" else 2
    per = low + ((low + 12) if with_state else 0) + (12 if elastic else 0)
    return int(engine.num_parameters() * per * 1.1)


def _check_space(
    engine: StatefulEngine, path: Path, margin: int, with_state: bool, elastic: bool
) -> int:
    """Refuse (on every rank) a save that would not fit; returns the bytes it needs."""
    need = _space_needed(engine, path.parent, with_state, elastic)
    problem = space_problem(path.parent, need, margin)
    if _any_rank(problem is not None, engine.info):
        raise CheckpointError(problem or f"{path.parent}: another rank has too little disk space")
    return need
