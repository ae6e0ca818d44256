"""The run's state on disk: one object that saves, restores and rolls back everything a run is.

A run registers its engines (`add_engine`: the model every stage trains, plus PPO's critic saved
under `run_dir/critic/`) and its stateful parts (`add_state`: the fault monitor, the KL
controller, the reward statistics), each of which saves and loads its own state through
`state_dict` / `load_state_dict`. Then:

- `save(step, cursor, metrics)` writes one checkpoint per engine in the shared format
  (lmforge.checkpoint): every rank writes its engine state files and RNG, the whole fp32 state
  for a resume on another topology (lmforge.elastic), rank 0 the consolidated weights, the
  tokenizer and lmforge.json, whose manifest covers every file. The main engine's checkpoint is
  committed last and only then does `latest` move, so a kill anywhere inside a save leaves every
  engine on the previous checkpoint. The parts' states go into the main lmforge.json under their
  names (`faults`, `kl_controller`, `reward_moments`), where earlier versions put them.
- `restore(point)` loads every engine (the engine's own state files on the same topology, else
  the whole fp32 state re-sharded), this rank's RNG and every part, checking each file it reads
  against the manifest read once at start (`open_point`).
- `rollback(before_step)` goes back to the newest checkpoint saved before a run of bad steps.
"""

from __future__ import annotations

import dataclasses
import json
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
    ENGINE_DIR,
    META_FILE,
    commit,
    partial_dir,
    read_json,
    resolve_checkpoint,
    verify_files,
    write_latest,
    write_model_files,
)
from lmforge.distributed import DistInfo
from lmforge.elastic import CONSOLIDATED_DIR, STATE_FILE, load_consolidated, save_consolidated
from lmforge.engine import StatefulEngine
from lmforge.errors import CheckpointError
from lmforge.rundir import (
    apply_retention,
    checkpoint_bytes,
    latest_name,
    rollback_target,
    space_problem,
)
from lmforge.runtime import barrier

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
    return ResumePoint(ckpt, meta)


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
        deleted = apply_retention(self.run_dir, train.keep_last, train.keep_every, newest)
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
        return hows[0]

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
    files and RNG into the partial directory (and, with train.elastic_state, the whole fp32
    state); rank 0 writes the consolidated weights (LoRA merged) and the tokenizer, then renames
    the directory into place and points `latest` at it. The train settings come from
    meta["config"]["train"]. Too little free disk space on any rank is a CheckpointError on
    every rank before anything is written."""
    info = engine.info
    train = dict(meta.get("config", {}).get("train", {}))
    elastic = bool(train.get("elastic_state", True))
    _check_space(engine, path, int(train.get("min_free_bytes", 0)), elastic)
    topology = engine.topology()
    meta = {**meta, "world_size": topology["world_size"], "engine": topology}
    tmp = partial_dir(path)
    if info.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    engine.save_state(tmp / ENGINE_DIR, client_state={"step": meta.get("step")})
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
    barrier()
    return path


def restore_engine(engine: StatefulEngine, ckpt: Path, meta: Mapping[str, Any], own: bool) -> str:
    """Load the training state of checkpoint `ckpt` into `engine` (collective); returns how.
    The engine's own state files are read on the same topology when the checkpoint is the run's
    own (`own`) or has no whole state; otherwise the whole fp32 state is re-sharded. Each file
    is checked against the manifest before it is read."""
    saved = {"world_size": meta.get("world_size"), **meta.get("engine", {})}
    state_dir, whole = ckpt / ENGINE_DIR, ckpt / ENGINE_DIR / CONSOLIDATED_DIR
    was = engine.topology_text(saved)
    if (
        engine.resumes_natively(saved)
        and (own or not whole.is_dir())
        and (state_dir / "state").is_dir()
    ):
        verify_files(ckpt, meta, engine=True, select=engine.owns_state_file)
        engine.load_state(state_dir)
        return f"DeepSpeed engine state ({was})"
    if (whole / STATE_FILE).is_file():
        verify_files(ckpt, meta, engine=True, select=lambda rel: f"/{CONSOLIDATED_DIR}/" in rel)
        load_consolidated(engine, whole)
        now = engine.topology_text()
        return f"whole fp32 weights and optimizer state, re-sharded from {was} to {now}"
    if state_dir.is_dir():
        raise CheckpointError(
            f"{ckpt}: written by {was} without the whole optimizer state (train.elastic_state); "
            f"resume it on the same setup ({was})"
        )
    return "weights only: the checkpoint has no optimizer state"


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


def _space_needed(engine: StatefulEngine, parent: Path, elastic: bool) -> int:
    """Bytes the next checkpoint in `parent` will take: the last one's size, or an estimate
    from the parameter count (weights twice, fp32 master and moments, the whole state again)."""
    name = latest_name(parent)
    previous = checkpoint_bytes(parent / name) if name and (parent / name).is_dir() else 0
    if previous:
        return int(previous * 1.1)
    low = 4 if engine.topology().get("precision") == "fp32" else 2
    return int(engine.num_parameters() * (2 * low + 12 + (12 if elastic else 0)) * 1.1)


def _check_space(engine: StatefulEngine, path: Path, margin: int, elastic: bool) -> None:
    problem = space_problem(path.parent, _space_needed(engine, path.parent, elastic), margin)
    if _any_rank(problem is not None, engine.info):
        raise CheckpointError(problem or f"{path.parent}: another rank has too little disk space")
