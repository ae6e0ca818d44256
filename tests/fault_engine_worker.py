"""One rank of the engine-level fault checks that tests/test_faults.py runs on 2 processes.

For every ZeRO stage 0-3 in fp32 and bf16 it builds a real DeepSpeed engine and checks that
(1) a NaN loss on rank 0 alone, (2) a finite loss with NaN gradients on rank 0 alone, and (3) a
step refused by the monitor with finite numbers leave the weights and the optimizer state of
every rank untouched, that every rank reports the skip, and that the learning rate advanced; then
that the whole (consolidated) state written from this engine loads into an engine of another
ZeRO stage unchanged, and that DeepSpeed's own state files reload with weights_only loading.
Rank 0 writes a JSON report to argv[1].
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.distributed import dist_info
from lmforge.elastic import load_consolidated, save_consolidated
from lmforge.engine import EngineConfig, build_engine, init_distributed
from lmforge.faults import FaultConfig, FaultMonitor
from lmforge.model import ModelConfig, build_model
from lmforge.optim import OptimConfig
from lmforge.runtime import barrier

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
OPTIM = OptimConfig(lr=1e-2, warmup_steps=0, schedule="linear", weight_decay=0.1)


class NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


class Silent:
    """A tracker that keeps events instead of printing them."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def message(self, text: str) -> None:
        pass

    def log(self, step: int, record: dict) -> None:
        self.events.append({"step": step, **record})


def engine_for(stage: int, precision: str, info: Any) -> Any:
    model = build_model(CFG, seed=0)
    model.train()
    return build_engine(
        model,
        EngineConfig(zero_stage=stage, precision=precision),  # type: ignore[arg-type]
        OPTIM,
        micro_batch=2,
        grad_accum=2,
        total_steps=20,
        info=info,
    )


def snapshot(engine: Any) -> dict[str, torch.Tensor]:
    """Every rank's view of the whole weights and moments (collective)."""
    out = {}
    ready = engine.optimizer_state_ready()
    for name, param in engine.trainable():
        out[name] = engine.full_tensor(param)
        if ready:
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{name}.{key}"] = engine.full_tensor(param, key)
    out["step"] = torch.tensor(engine.optimizer_step_count())
    return out


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train_step(engine: Any, monitor: FaultMonitor, step: int, mode: str, info: Any) -> bool:
    """One optimizer step of 2 micro-batches; mode: ok | nan_loss | nan_grad | refuse."""
    gen = torch.Generator().manual_seed(100 * step + info.rank)
    losses = []
    verdict = None
    for micro in range(2):
        ids = torch.randint(0, CFG.vocab_size, (2, 16), generator=gen)
        loss = engine(input_ids=ids, labels=ids)
        if micro == 1 and info.rank == 0:
            if mode == "nan_loss":
                loss = loss * float("nan")
            elif mode == "nan_grad":
                loss = NanGrad.apply(loss)
        engine.backward(loss)
        losses.append(loss.item())
        skip = False
        if micro == 1:
            verdict = monitor.judge(step, losses)
            skip = verdict.skip or mode == "refuse"
        engine.step(skip=skip)
    assert verdict is not None
    return engine.last_step_skipped


def check(stage: int, precision: str, info: Any, scratch: Path) -> dict[str, Any]:
    engine = engine_for(stage, precision, info)
    monitor = FaultMonitor(FaultConfig(), rank=info.rank, world=info.world, tracker=Silent())
    result: dict[str, Any] = {}
    for step in (1, 2):
        result[f"normal{step}_skipped"] = train_step(engine, monitor, step, "ok", info)
    for step, mode in ((3, "nan_loss"), (4, "nan_grad"), (5, "refuse")):
        before, lr = snapshot(engine), engine.lr
        skipped = train_step(engine, monitor, step, mode, info)
        after = snapshot(engine)
        result[mode] = {
            "skipped": skipped,
            "unchanged": same(before, after),
            "lr_advanced": engine.lr != lr,
        }
    result["after_skips_trains"] = not train_step(engine, monitor, 6, "ok", info)
    # The whole state written here loads into another ZeRO stage unchanged.
    state = scratch / f"z{stage}-{precision}"
    save_consolidated(engine, state)
    barrier()
    written = snapshot(engine)
    other = engine_for((stage + 2) % 4, precision, info)
    load_consolidated(other, state)
    result["consolidated_roundtrip"] = same(written, snapshot(other))
    result["lr_restored"] = other.lr == engine.lr
    # DeepSpeed's own state, read back with weights_only loading.
    engine.save_state(scratch / f"ds{stage}-{precision}", {"step": 6})
    barrier()
    again = engine_for(stage, precision, info)
    again.load_state(scratch / f"ds{stage}-{precision}")
    result["deepspeed_roundtrip"] = same(written, snapshot(again))
    return result


def run_matrix(check: Callable[..., dict[str, Any]]) -> None:
    """Run `check(stage, precision, info, scratch)` on every ZeRO stage and precision on this
    rank; rank 0 writes the results as JSON to the file named by argv[1]."""
    info = dist_info()
    init_distributed(info)
    report: dict[str, Any] = {}
    scratch = Path(sys.argv[1]).with_suffix(".scratch")  # the same directory on every rank
    if info.rank == 0:
        scratch.mkdir(parents=True, exist_ok=True)
    barrier()
    for stage in (0, 1, 2, 3):
        for precision in ("fp32", "bf16"):
            print(f"checking ZeRO-{stage} {precision}", flush=True)
            report[f"zero{stage}-{precision}"] = check(stage, precision, info, scratch)
    if info.rank == 0:
        Path(sys.argv[1]).write_text(json.dumps(report, indent=1))


def main() -> None:
    run_matrix(check)


if __name__ == "__main__":
    main()
