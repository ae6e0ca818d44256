"""One rank of the engine-state checks that tests/test_checkpoint_state.py runs on 2 processes.

For every ZeRO stage 0-3 in fp32 and bf16 it trains a real DeepSpeed engine two steps, writes
DeepSpeed's own (partitioned) engine state, and checks that the whole fp32 master weights, AdamW
moments, step count and schedule read back from those shards equal the live engine's, and that
loading them into an engine of another ZeRO stage reproduces them exactly (what a resume on
another topology does; tests/test_elastic.py checks that such runs continue like uninterrupted
ones). Rank 0 writes a JSON report to argv[1].
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fault_engine_worker import Silent, engine_for, run_matrix, same, snapshot, train_step

from lmforge.elastic import MOMENTS, load_whole
from lmforge.faults import FaultConfig, FaultMonitor
from lmforge.runtime import barrier


def read_back(engine: Any, directory: Path) -> dict[str, torch.Tensor]:
    """What the shards in `directory` hold, in snapshot()'s form."""
    files = engine.read_state_files(directory)
    out = {}
    for name, _ in engine.trainable():
        out[name] = files.tensor(name)
        for key in MOMENTS:
            out[f"{name}.{key}"] = files.tensor(name, key)
    out["step"] = torch.tensor(files.optimizer_step())
    return out


def check(stage: int, precision: str, info: Any, scratch: Path) -> dict[str, Any]:
    engine = engine_for(stage, precision, info)
    monitor = FaultMonitor(FaultConfig(), rank=info.rank, world=info.world, tracker=Silent())
    for step in (1, 2):
        train_step(engine, monitor, step, "ok", info)
    written = snapshot(engine)
    folder = scratch / f"z{stage}-{precision}"
    engine.save_state(folder, {"step": 2})
    barrier()
    files = engine.read_state_files(folder)
    result = {
        "read_equal": same(written, read_back(engine, folder)),
        "schedule_equal": files.schedule_state() == json.loads(json.dumps(engine.schedule_state())),
    }
    other = engine_for((stage + 2) % 4, precision, info)
    load_whole(other, files)
    result["other_stage_equal"] = same(written, snapshot(other))
    result["lr_equal"] = other.lr == engine.lr
    return result


def main() -> None:
    run_matrix(check)


if __name__ == "__main__":
    main()
