"""Where a training step's time goes: a few steps under torch.profiler, summarised as the
device's busy share of the wall time, the share of that busy time per kind of kernel (matmul,
attention, optimizer, communication, the rest) and the top kernels. On a GPU the device time of
CUDA kernels counts; on a CPU the self time of the operators.

Not a package: bench/train.py imports it as a sibling module.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import torch

# Kernel (GPU) or operator (CPU) names by kind, first match wins.
KINDS = (
    ("attention", re.compile(r"flash|fmha|cudnn.*(attn|attention)|scaled_dot_product|sdpa", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|aten::(mm|addmm|bmm|matmul)$", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.I)),
    ("communication", re.compile(r"nccl|all_?reduce|all_?gather|reduce_?scatter", re.I)),
)


def kind(name: str) -> str:
    """The kind of a kernel or operator name (see KINDS); 'other' when none matches."""
    return next((k for k, pattern in KINDS if pattern.search(name)), "other")


def _self_time_us(event: Any, cuda: bool) -> float:
    """An averaged event's own time in microseconds: on a GPU the device time of kernels (an
    operator's device time is its kernels' again: not counted twice), CPU time otherwise."""
    if not cuda:
        return float(event.self_cpu_time_total)
    if event.device_type == torch.autograd.DeviceType.CPU:
        return 0.0
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, attr, None)
        if value is not None:
            return float(value)
    return 0.0


def profile_steps(step: Callable[[int], object], steps: int, device: torch.device) -> dict:
    """Run step(i) for i < `steps` under the profiler; the busy share, the kinds' shares of the
    busy time and the ten costliest kernels (ms per step)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for i in range(steps):
            step(i)
        if cuda:
            torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    events = [(e.key, _self_time_us(e, cuda)) for e in prof.key_averages()]
    events = [(name, us) for name, us in events if us > 0]
    busy = sum(us for _, us in events)
    shares: dict[str, float] = {}
    for name, us in events:
        shares[kind(name)] = shares.get(kind(name), 0.0) + us / busy
    top = sorted(events, key=lambda e: -e[1])[:10]
    return {
        "steps": steps,
        "wall_ms_per_step": wall * 1e3 / steps,
        # CPU operators nest (self times are exclusive but threads overlap): indicative only
        "busy_share": min(busy / 1e6 / wall, 1.0),
        "kinds": dict(sorted(shares.items(), key=lambda kv: -kv[1])),
        "top": [{"name": n[:120], "ms_per_step": us / 1e3 / steps} for n, us in top],
    }


def describe(p: dict[str, Any]) -> str:
    """One line: busy share and the kinds' shares."""
    kinds = ", ".join(f"{k} {v:.0%}" for k, v in p["kinds"].items())
    return f"profile ({p['steps']} steps): device busy {p['busy_share']:.0%} of the wall; {kinds}"
