"""Training state that does not depend on the process count: resuming on another topology.

A checkpoint keeps the optimizer state once: DeepSpeed's own partitioned engine state
(`deepspeed/state/`), written by every rank in parallel for the process count and ZeRO stage of
the run. A resume on the same topology loads it as it is (bitwise exact). A resume on another
process count or ZeRO stage builds its engine as usual and then writes each rank's share of the
whole fp32 master weights, AdamW moments, step count and schedule into it (`load_whole`),
reading them from the old shards one parameter at a time (`StatefulEngine.read_state_files`).

Checkpoints written before that (and runs with `train.elastic_state`) also hold the same state
whole in `deepspeed/consolidated/`: `master.safetensors`, `optimizer.safetensors` (keys
`<parameter>.exp_avg` / `.exp_avg_sq`) and `state.json`; they still load (`ConsolidatedFiles`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open

from lmforge.checkpoint import read_json, save_safetensors, write_json
from lmforge.engine import StatefulEngine
from lmforge.errors import CheckpointError

CONSOLIDATED_DIR = "consolidated"
MASTER_FILE = "master.safetensors"
MOMENTS_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
MOMENTS = ("exp_avg", "exp_avg_sq")


class WholeState(Protocol):
    """A training state readable whole, one parameter at a time, whatever wrote it."""

    where: Path

    @property
    def names(self) -> list[str]:
        """The trained parameters it holds."""
        ...

    def tensor(self, name: str, key: str | None = None) -> torch.Tensor:
        """The whole fp32 master weight (key None) or moment `key` of parameter `name`."""
        ...

    def optimizer_step(self) -> int:
        """The optimizer's step counter."""
        ...

    def schedule_state(self) -> dict[str, Any]:
        """The learning-rate schedule and step counters (engine.schedule_state's form)."""
        ...


def save_consolidated(engine: StatefulEngine, directory: Path) -> None:
    """Write the whole master weights, moments and schedule of `engine` into `directory` (rank 0
    writes; every rank must call it). Only with train.elastic_state: a second copy of the state
    as safetensors, not needed to resume on another topology."""
    ready = engine.optimizer_state_ready()  # the same on every rank: they step together
    master: dict[str, torch.Tensor] = {}
    moments: dict[str, torch.Tensor] = {}
    for name, param in engine.trainable():
        weight = engine.full_tensor(param)
        master[name] = weight.contiguous()
        for key in MOMENTS:
            value = engine.full_tensor(param, key) if ready else torch.zeros_like(weight)
            moments[f"{name}.{key}"] = value.contiguous()
    if not engine.info.is_main:
        return
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(master, directory / MASTER_FILE)
    save_safetensors(moments, directory / MOMENTS_FILE)
    state = {
        "optimizer_step": engine.optimizer_step_count(),
        **engine.topology(),
        "parameters": list(master),
        **engine.schedule_state(),
    }
    write_json(directory / STATE_FILE, state)


def _open(file: Path) -> Any:
    try:
        return safe_open(file, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors ({e}); restore the file") from None


class ConsolidatedFiles:
    """The whole state in `deepspeed/consolidated/` (safetensors and JSON)."""

    def __init__(self, directory: Path) -> None:
        self.where = directory
        self.state = read_json(directory / STATE_FILE)
        self.files = {
            None: _open(directory / MASTER_FILE),
            "moments": _open(directory / MOMENTS_FILE),
        }

    @property
    def names(self) -> list[str]:
        """The trained parameters it holds."""
        return list(self.state.get("parameters", []))

    def tensor(self, name: str, key: str | None = None) -> torch.Tensor:
        """One whole tensor (see WholeState)."""
        file = self.files[None if key is None else "moments"]
        tensor = name if key is None else f"{name}.{key}"
        if tensor not in set(file.keys()):
            raise CheckpointError(f"{self.where}: tensor {tensor!r} is missing")
        return file.get_tensor(tensor)

    def optimizer_step(self) -> int:
        """The optimizer's step counter."""
        return int(self.state.get("optimizer_step", 0))

    def schedule_state(self) -> dict[str, Any]:
        """The schedule and counters as recorded."""
        return self.state


def load_whole(engine: StatefulEngine, whole: WholeState) -> None:
    """Write each rank's share of the whole state `whole` into a freshly built `engine` (every
    rank calls it; no communication), one parameter at a time. The module's own (low-precision)
    parameters are not refreshed under ZeRO-1/2/3: the engine must be built from the same
    checkpoint's weights, as every stage does on resume; this writes the fp32 master copy, the
    moments and the schedule."""
    names = [name for name, _ in engine.trainable()]
    if sorted(whole.names) != sorted(names):
        missing = sorted(set(names) - set(whole.names))
        what = f"parameter {missing[0]!r} is missing" if missing else "parameters differ"
        raise CheckpointError(
            f"{whole.where}: {what}; the checkpoint was trained with another model or LoRA setting"
        )
    step = whole.optimizer_step()
    engine.prepare_optimizer_state(step)
    for name, param in engine.trainable():
        shape = list(engine.full_shape(param))
        for key in (None, *MOMENTS):
            if key is not None and step == 0:
                continue  # no update yet: the moments are the zeros just prepared
            value = whole.tensor(name, key)
            if list(value.shape) != shape:
                label = name if key is None else f"{name}.{key}"
                raise CheckpointError(
                    f"{whole.where}: tensor {label!r} has shape {list(value.shape)}, the model "
                    f"needs {shape}; the checkpoint belongs to another model"
                )
            engine.set_full_tensor(param, value, key)
    engine.load_schedule_state(whole.schedule_state())


def load_consolidated(engine: StatefulEngine, directory: Path) -> dict[str, Any]:
    """Load the whole state of a `deepspeed/consolidated/` folder into `engine` (every rank
    calls it); returns the recorded state.json."""
    whole = ConsolidatedFiles(directory)
    load_whole(engine, whole)
    return whole.state
