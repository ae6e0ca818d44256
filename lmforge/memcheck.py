"""Refuse a run that cannot fit in memory, at config load: before any data, model or file.

The memory estimate (lmforge.estimate: ZeRO model states, activations for the micro-batch and
sequence length) is compared with what this machine has: on a GPU its total memory (what other
processes hold there may be freed; the device's size cannot change), in CPU memory what
/proc/meminfo calls available plus free swap. Every process of this host needs its own share.
The estimate leaves things out (communication buckets, a reference model or critic, the
allocator's slack), so it is a lower bound; a run is refused only when even that is more than
MARGIN times what there is: clearly impossible, never a close call. A run the estimate cannot
describe (no model section and an `init_from` that is not a local checkpoint) is not checked.

`LMFORGE_NO_MEMCHECK=1` skips the check (for a machine whose memory this module misjudges).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError, LmforgeError

MARGIN = 1.25  # refuse only when the (lower-bound) estimate is 25% above what there is
SKIP_ENV = "LMFORGE_NO_MEMCHECK"


@dataclass(frozen=True)
class Need:
    """Bytes one process needs, split by where they live, with what they are made of."""

    device: float  # on its GPU (0 when training on CPU)
    host: float  # in CPU memory (everything, when training on CPU)
    states: float  # parameters, gradients and optimizer states, wherever they live
    activations: float
    params: int
    precision: str
    stage: int
    offload: str
    exact: bool = True  # False: the analytic size of a model too large to count exactly


def host_available() -> int:
    """Bytes of CPU memory a new allocation can get: MemAvailable + SwapFree from
    /proc/meminfo, else the free physical pages (os.sysconf)."""
    try:
        fields = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            fields[name] = int(rest.split()[0]) * 1024  # kB
        return fields["MemAvailable"] + fields.get("SwapFree", 0)
    except (OSError, KeyError, ValueError, IndexError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_total(index: int) -> int | None:
    """Total bytes of this process's CUDA device: `index` (the local rank) among the visible
    ones, or the only one visible (a launcher that gives each process one device); None when
    none is visible. Read from the device's properties, without allocating on it."""
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        return None
    return int(torch.cuda.get_device_properties(index if index < count else 0).total_memory)


def _rough_params(model: Any) -> float:
    """The weights of the model's matrix multiplies, from its shape alone: never more than its
    parameters (embeddings, norms and biases come on top), so refusing on it is safe, and
    cheap where the exact count builds the model (on the meta device, but layer by layer)."""
    from lmforge.model import matmul_params

    return float(matmul_params(model))


def _model(cfg: Any) -> Any:
    """The architecture the run trains, or None when it cannot be known without side effects
    (an init_from that is a hub name or missing: its own check reports it later)."""
    from lmforge.config import from_dict, to_dict
    from lmforge.estimate import stage_model
    from lmforge.model import ModelConfig

    if isinstance(getattr(cfg, "model", None), ModelConfig):
        return cfg.model
    source = str(getattr(cfg, "init_from", "") or "")
    if not source or not Path(source).expanduser().is_dir():
        return None
    try:  # read back as a config section: a checkpoint's odd values are its loader's to report
        return from_dict(ModelConfig, to_dict(stage_model(cfg)), prefix="model")
    except LmforgeError:
        return None


def _on_gpu(cfg: Any) -> bool:
    device = getattr(getattr(cfg, "train", None), "device", "auto")
    if device == "cpu":
        return False
    import torch

    return device == "cuda" or torch.cuda.is_available()


def estimate_need(
    cfg: Any, micro_batch: int, world: int, on_gpu: bool, beyond: float = float("inf")
) -> Need | None:
    """What one process of this run needs (see the module doc), or None if unknown. A model
    whose matrix weights alone take more than `beyond` bytes is not counted exactly (that builds
    it, layer by layer, on the meta device): that lower bound is the need."""
    from lmforge.ds_config import resolve_precision
    from lmforge.estimate import configured_layout, estimate, stage_seq_len

    model = _model(cfg)
    layout = configured_layout(cfg, world) if model is not None else None
    if model is None or layout is None:
        return None
    precision = resolve_precision(cfg.engine.precision) if on_gpu else "fp32"
    rough = _rough_params(model)
    rough_bytes = 16 * rough / (world if layout.stage >= 3 else 1)
    if rough_bytes > beyond:
        return Need(rough_bytes, rough_bytes, rough_bytes, 0.0, int(rough), precision,
                    layout.stage, layout.offload, exact=False)  # fmt: skip
    seq_len = stage_seq_len(cfg, model)
    est = estimate(model, seq_len=seq_len, micro_batch=micro_batch, gpus=world, precision=precision)
    row = est.layout(layout.stage, layout.offload)
    acts = est.activation_bytes_checkpointed if layout.checkpointing else est.activation_bytes
    states = row.gpu_bytes + row.cpu_bytes
    if on_gpu:
        return Need(row.gpu_bytes + acts, row.cpu_bytes, states, acts, est.params, precision,
                    layout.stage, layout.offload)  # fmt: skip
    return Need(0.0, states + acts, states, acts, est.params, precision, layout.stage,
                layout.offload)  # fmt: skip


def _advice(cfg: Any, need: Need, on_gpu: bool) -> str:
    """What to change, the larger part of the need first."""
    acts = "lower train.micro_batch_size or data.seq_len"
    if not getattr(cfg.engine, "activation_checkpointing", False):
        acts += " (or set engine.activation_checkpointing=true)"
    if hasattr(cfg, "model"):
        states = "use a smaller model (model.dim, model.n_layers, model.vocab_size)"
    else:
        states = "start from a smaller model (init_from)"
    states += ", or " + (
        "engine.zero_stage=3 over more processes" if need.stage < 3 else "more processes"
    )
    if on_gpu:
        states += ", or engine.offload_optimizer=true / engine.offload_params=true"
    order = [acts, states] if need.activations > need.states else [states, acts]
    return "; or ".join(order)


def _env_int(name: str, default: int) -> int:
    """A launcher's integer variable, `default` when unset or not a number."""
    try:
        return int(os.environ.get(name, ""))
    except ValueError:
        return default


def check_memory(cfg: Any, micro_batch: int, world: int) -> None:
    """ConfigError when one process of this run clearly cannot fit in this machine's memory,
    naming the numbers and the keys to lower. Reads the config and the machine only."""
    from lmforge.estimate import format_bytes

    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        return
    on_gpu = _on_gpu(cfg)
    local = max(1, _env_int("LOCAL_WORLD_SIZE", world))  # processes on this host
    checks = [("RAM", host_available(), local)]  # (where, bytes there, processes sharing it)
    total = device_total(_env_int("LOCAL_RANK", 0)) if on_gpu else None
    if total is not None:
        checks.insert(0, ("GPU memory", total, 1))
    beyond = MARGIN * max(have for _, have, _ in checks)
    try:
        need = estimate_need(cfg, micro_batch, world, on_gpu, beyond)
    except LmforgeError:
        return  # the engine check or the stage reports a config it cannot resolve
    if need is None:
        return
    for where, have, procs in checks:
        needed = (need.device if where != "RAM" else need.host) * procs
        if needed > MARGIN * have:
            each = f" ({procs} processes × {format_bytes(needed / procs)})" if procs > 1 else ""
            raise ConfigError(
                f"memory: this run needs at least {format_bytes(needed)} of {where}{each} but "
                f"{format_bytes(have)} is there: {_parts(cfg, need, micro_batch)}; "
                f"{_advice(cfg, need, on_gpu)} ({SKIP_ENV}=1 skips this check)"
            )


def _parts(cfg: Any, need: Need, micro_batch: int) -> str:
    """What the need is made of, for the error line."""
    from lmforge.estimate import format_bytes

    about = "" if need.exact else "at least "
    offload = "" if need.offload == "none" else f" (offload {need.offload})"
    text = (
        f"{about}{need.params:,} parameters with their gradients and {need.precision} Adam "
        f"states at ZeRO stage {need.stage}{offload} take {format_bytes(need.states)}"
    )
    if need.exact:
        text += (
            f", activations for train.micro_batch_size={micro_batch} × {_seq_len(cfg)} tokens "
            f"{format_bytes(need.activations)}"
        )
    return text


def _seq_len(cfg: Any) -> str:
    seq = getattr(getattr(cfg, "data", None), "seq_len", None)
    return f"data.seq_len={seq}" if isinstance(seq, int) else "the model's context"
