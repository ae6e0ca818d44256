"""Shared pieces of the training and generation benchmarks: device, presets, the Hugging Face
Llama twin of an lmforge GPT (same weights), peak FLOP/s, timing statistics and the results file.

Not a package: the scripts in bench/ import it as a sibling module.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (FLOP/s), by a substring of the name.
DATASHEET_BF16 = (
    ("H100 PCIe", 756e12, "H100 PCIe datasheet, dense bf16"),
    ("H100 NVL", 835e12, "H100 NVL datasheet, dense bf16"),
    ("H100", 989e12, "H100 SXM datasheet, dense bf16"),
    ("H200", 989e12, "H200 datasheet, dense bf16 (same tensor cores as H100 SXM)"),
    ("A100", 312e12, "A100 datasheet, dense bf16"),
)


def setup() -> None:
    """Offline, quiet, and DeepSpeed's CPU accelerator when there is no GPU. Call before
    importing deepspeed (directly or through lmforge.engine)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    from lmforge.runtime import quiet_libraries

    quiet_libraries()


def bench_device() -> torch.device:
    """The first GPU, else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def device_label(device: torch.device) -> str:
    """'cpu', or the GPU's name made file-safe ('nvidia-h100-80gb-hbm3')."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def default_preset(device: torch.device) -> str:
    """tiny on CPU (runs in a minute), gpt2-124m on a GPU."""
    return "gpt2-124m" if device.type == "cuda" else "tiny"


def set_threads(device: torch.device, threads: int) -> None:
    """On CPU, use `threads` intra-op threads (0 = torch's default)."""
    if device.type == "cpu" and threads > 0:
        torch.set_num_threads(threads)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that a timer read afterwards covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_config(preset: str) -> Any:
    """The lmforge ModelConfig of configs/model/<preset>.yaml."""
    from lmforge.config import load_preset
    from lmforge.model import ModelConfig

    return load_preset(ModelConfig, preset)


def llama_twin(model: torch.nn.Module) -> torch.nn.Module:
    """transformers' LlamaForCausalLM of the same shape as the lmforge GPT `model`, on the same
    device, holding a copy of its weights (fp32, SDPA attention)."""
    import transformers

    from lmforge.hf import is_llama_compatible, to_hf_config, to_llama_key

    cfg = model.cfg
    if not is_llama_compatible(cfg):
        raise SystemExit("the baseline is Llama: pick a Llama-compatible preset")
    hf_cfg = to_hf_config(cfg, dtype=torch.float32)
    hf_cfg._attn_implementation = "sdpa"
    device = next(model.parameters()).device
    with torch.device(device):
        twin = transformers.LlamaForCausalLM(hf_cfg)
    state = {to_llama_key(k): v for k, v in model.state_dict().items()}
    result = twin.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if "rotary" not in k]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"weight mapping: missing {missing}, unexpected {result.unexpected_keys}"
        )
    if cfg.tie_embeddings:
        twin.tie_weights()
    return twin.to(torch.float32)


@contextlib.contextmanager
def fp32_buffers(model: torch.nn.Module) -> Iterator[None]:
    """Keep the floating-point buffers of `model` (Llama's RoPE inverse frequencies) in fp32
    across a cast to bf16 inside the block (`model.to`, DeepSpeed's bf16 setup), as transformers
    keeps them: bf16 frequencies would turn position 1000 by a wrong angle."""
    saved = {n: b.detach().clone() for n, b in model.named_buffers() if b.is_floating_point()}
    yield
    for name, value in saved.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        current = module._buffers[leaf]
        if current is not None and current.dtype != value.dtype:
            module._buffers[leaf] = value.to(current.device)


def matmul_peak(device: torch.device, size: int = 0) -> tuple[float, str]:
    """Matmul FLOP/s measured now: bf16 8192³ on a GPU (lmforge.tracking's measurement, the one
    training runs report MFU against); fp32 2048³ on CPU with the current number of threads.
    `size` overrides the matrix size. Returns (FLOP/s, label): the best of a few runs."""
    cuda = device.type == "cuda"
    if cuda and not size:
        from lmforge.tracking import measure_peak_flops

        flops = measure_peak_flops(device)
        assert flops is not None
        return flops, "measured bf16 8192³ matmul"
    n = size or 2048
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    times = []
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    where = "GPU" if cuda else f"CPU, {torch.get_num_threads()} thread(s)"
    label = f"measured {'bf16' if cuda else 'fp32'} {n}³ matmul on {where}"
    return 2 * n**3 / min(times), label


def datasheet_peak(device: torch.device) -> tuple[float, str] | None:
    """The datasheet dense bf16 peak of this GPU, when it is one we know; None otherwise."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops, label in DATASHEET_BF16:
        if key in name:
            return flops, label
    return None


def summary(times: list[float]) -> dict[str, Any]:
    """Median, min and max of a list of durations (seconds), and the list itself."""
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "all_s": [round(t, 6) for t in times],
    }


def versions() -> dict[str, str]:
    """Library versions and the machine, for the results file."""
    import deepspeed
    import transformers

    out = {
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cuda": str(torch.version.cuda),
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    else:
        out["cpu_threads"] = str(torch.get_num_threads())
    return out


def results_path(device: torch.device, preset: str) -> Path:
    """bench/results/<device>-<preset>.json."""
    return RESULTS_DIR / f"{device_label(device)}-{preset}.json"


def shown(path: Path) -> str:
    """`path` relative to the working directory when it lies below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def write_section(path: Path, section: str, data: dict[str, Any]) -> None:
    """Store `data` under `section` in the JSON file at `path` (other sections are kept), with
    the versions and the date."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {}
    if path.exists():
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            record = {}
    record[section] = data
    record["versions"] = versions()
    record["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)


def peak_memory(device: torch.device) -> int | None:
    """Most device memory allocated since the last reset (bytes); None on CPU."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (GPU only)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def free_memory(device: torch.device) -> None:
    """Return cached blocks after a model was dropped."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
