"""Training state that does not depend on the process count: resuming on another topology.

DeepSpeed's own engine state (`deepspeed/state/`) is partitioned for the number of processes and
the ZeRO stage that wrote it. Beside it every stage checkpoint holds the same state whole, in
`deepspeed/consolidated/`: the fp32 master weights (`master.safetensors`), AdamW's moments
(`optimizer.safetensors`, keys `<parameter>.exp_avg` / `.exp_avg_sq`) and `state.json` (the
optimizer's step count, the learning-rate schedule, DeepSpeed's counters, and the topology that
wrote it). A resume on another process count or ZeRO stage builds its engine as usual and then
writes each rank's share of these tensors into it (`load_consolidated`), so the run continues
with the same weights, moments and schedule. Rank 0 writes the files; gathering them is
collective (one parameter at a time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def save_consolidated(engine: StatefulEngine, directory: Path) -> None:
    """Write the whole master weights, moments and schedule of `engine` into `directory` (rank 0
    writes; every rank must call it)."""
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


def load_consolidated(engine: StatefulEngine, directory: Path) -> dict[str, Any]:
    """Write each rank's share of the state in `directory` into a freshly built `engine` (every
    rank calls it; no communication). Returns the recorded state.json."""
    state = read_json(directory / STATE_FILE)
    names = [name for name, _ in engine.trainable()]
    if list(state.get("parameters", [])) != names:
        missing = sorted(set(names) - set(state.get("parameters", [])))
        what = f"parameter {missing[0]!r} is missing" if missing else "parameters differ"
        raise CheckpointError(
            f"{directory / STATE_FILE}: {what}; the checkpoint was trained with another model "
            "or LoRA setting"
        )
    engine.prepare_optimizer_state(int(state.get("optimizer_step", 0)))
    with _open(directory / MASTER_FILE) as weights, _open(directory / MOMENTS_FILE) as moments:
        stored = {"": set(weights.keys()), "moments": set(moments.keys())}
        for name, param in engine.trainable():
            shape = list(engine.full_shape(param))
            sources = [(weights, stored[""], None, name)]
            sources += [(moments, stored["moments"], k, f"{name}.{k}") for k in MOMENTS]
            for file, keys, key, tensor in sources:
                if tensor not in keys:
                    raise CheckpointError(f"{directory}: tensor {tensor!r} is missing")
                value = file.get_tensor(tensor)
                if list(value.shape) != shape:
                    raise CheckpointError(
                        f"{directory}: tensor {tensor!r} has shape {list(value.shape)}, the model "
                        f"needs {shape}; the checkpoint belongs to another model"
                    )
                engine.set_full_tensor(param, value, key)
    engine.load_schedule_state(state)
    return state
