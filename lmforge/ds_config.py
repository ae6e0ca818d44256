"""The DeepSpeed JSON a run trains with: read from a file or inline text, its "auto" values filled
from the run config, and any explicit value that contradicts the run config refused.

lmforge owns the optimizer and the learning-rate schedule: an `optimizer` / `scheduler` section
may be present only with values that are "auto" or agree with the run config. This module reads
and writes plain dicts only; importing DeepSpeed is lmforge.engine's alone.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lmforge.config import option
from lmforge.errors import ConfigError
from lmforge.optim import OptimConfig

Precision = Literal["auto", "bf16", "fp16", "fp32"]
AUTO = "auto"


@dataclass
class EngineConfig:
    """DeepSpeed settings. Values left null here come from the DeepSpeed JSON."""

    deepspeed: str = option(
        "configs/deepspeed/default.json",
        'DeepSpeed JSON: a file path or inline JSON text; its "auto" values come from this config.',
    )
    zero_stage: int | None = option(None, "ZeRO stage 0-3; null = the JSON's (2 if it says auto).")
    offload_optimizer: bool | None = option(
        None, "Keep optimizer state in CPU memory (ZeRO-Offload); null = the JSON's."
    )
    offload_params: bool | None = option(
        None, "Keep parameters in CPU memory (ZeRO-3 only); null = the JSON's."
    )
    precision: Precision = option(
        "auto", "bf16 | fp16 | fp32; auto = bf16 on a GPU that supports it, else fp32."
    )
    backend: str = option("", "torch.distributed backend; empty = nccl on GPUs, gloo on CPU.")
    compile: bool = option(
        False, "torch.compile the model inside the engine (DeepSpeed's engine.compile, inductor)."
    )
    activation_checkpointing: bool = option(
        False, "Recompute each block's activations in backward: less memory, ~1/3 more compute."
    )

    def validate(self, prefix: str = "engine") -> None:
        """Reject values outside their range, naming the key."""
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{prefix}.zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")


def resolve_precision(precision: Precision) -> str:
    """'auto' -> bf16 on a CUDA device with bf16 support, fp32 otherwise."""
    if precision != AUTO:
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def load_deepspeed_json(source: str) -> dict[str, Any]:
    """Parse the DeepSpeed config: inline JSON text or a path (relative paths also tried from
    the repository root, where configs/ lives). A file that is not a JSON object whose sections
    have the shapes DeepSpeed reads is a ConfigError naming the file and the key."""
    text = source.strip()
    if text.startswith(("{", "[")):
        return check_shape(_parse_json(text, "inline JSON"), "inline JSON")
    try:
        path = Path(source)
        if not path.exists() and not path.is_absolute():
            path = Path(__file__).resolve().parents[1] / source
        found = path.is_file()
    except (OSError, ValueError):  # a name the OS cannot hold (too long, a NUL byte)
        found = False
    if not found:
        raise ConfigError(
            f"engine.deepspeed: file {source[:200]!r} not found; give a path or inline JSON"
        )
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"engine.deepspeed: {path} cannot be read ({e.strerror})") from None
    try:
        body = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"engine.deepspeed: {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
            f"{e.start}); save it as UTF-8 JSON"
        ) from None
    return check_shape(_parse_json(body, str(path)), str(path))


def _parse_json(text: str, where: str) -> Any:
    """json.loads, every failure a ConfigError naming `where` (the file or inline JSON)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"engine.deepspeed: {where} is not valid JSON ({e.msg}: line {e.lineno} column "
            f"{e.colno})"
        ) from None
    except RecursionError:
        raise ConfigError(f"engine.deepspeed: {where}: values nested too deeply") from None
    except ValueError as e:  # an integer past Python's digit limit
        raise ConfigError(f"engine.deepspeed: {where} cannot be read ({e})") from None


# Sections DeepSpeed reads as objects. Those lmforge fills (or drops) may also be "auto" or null.
_FILLED_SECTIONS = ("zero_optimization", "bf16", "fp16", "optimizer", "scheduler")
_OBJECT_SECTIONS = (
    "amp",
    "activation_checkpointing",
    "aio",
    "autotuning",
    "checkpoint",
    "comms_logger",
    "compression_training",
    "csv_monitor",
    "curriculum_learning",
    "data_efficiency",
    "data_types",
    "elasticity",
    "flops_profiler",
    "pipeline",
    "sparse_attention",
    "tensorboard",
    "wandb",
)


def _json_kind(value: Any) -> str:
    """How a JSON value reads in an error message: `a number (5)`, `a list`, `null`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a bool ({str(value).lower()})"
    if isinstance(value, (int, float)):
        text = repr(value) if not isinstance(value, int) or value.bit_length() < 200 else "..."
        return f"a number ({text})"
    if isinstance(value, str):
        return f"a string ({value[:40]!r})"
    return "a list" if isinstance(value, list) else "an object"


def _shape_error(where: str, key: str, wanted: str, value: Any) -> ConfigError:
    return ConfigError(
        f"engine.deepspeed: {where}: '{key}' must be {wanted}, got {_json_kind(value)}; "
        "see the DeepSpeed config documentation or configs/deepspeed/default.json"
    )


def check_shape(ds: Any, where: str = "the DeepSpeed config") -> dict[str, Any]:
    """`ds` itself when it is a JSON object whose sections have the shapes DeepSpeed and
    lmforge read: objects where a section belongs (or "auto" / null for the sections lmforge
    fills), a ZeRO stage 0-3, offload settings as objects. Otherwise a ConfigError naming
    `where` (the file) and the key."""
    if not isinstance(ds, dict):
        raise ConfigError(
            f"engine.deepspeed: {where}: the top level must be an object "
            f'({{"zero_optimization": {{...}}, ...}}), got {_json_kind(ds)}'
        )
    for key in _FILLED_SECTIONS:
        value = ds.get(key)
        if value is not None and value != AUTO and not isinstance(value, dict):
            raise _shape_error(where, key, 'an object or "auto"', value)
    for key in _OBJECT_SECTIONS:
        if key in ds and not isinstance(ds[key], dict):
            raise _shape_error(where, key, "an object", ds[key])
    zero = ds.get("zero_optimization")
    if isinstance(zero, dict):
        stage = zero.get("stage", AUTO)
        if stage != AUTO and (type(stage) is not int or stage not in (0, 1, 2, 3)):
            raise _shape_error(where, "zero_optimization.stage", '0, 1, 2, 3 or "auto"', stage)
        for name in ("offload_optimizer", "offload_param"):
            value = zero.get(name)
            if value is None or value == AUTO or isinstance(value, bool):
                continue
            if not isinstance(value, dict):
                raise _shape_error(where, f"zero_optimization.{name}", "an object", value)
            device = value.get("device", "none")
            if not isinstance(device, str):
                key = f"zero_optimization.{name}.device"
                raise _shape_error(where, key, '"cpu", "nvme" or "none"', device)
    for key in ("optimizer", "scheduler"):
        section = ds.get(key)
        if not isinstance(section, dict):
            continue
        if not isinstance(section.get("type", AUTO), str):
            raise _shape_error(where, f"{key}.type", "a name", section["type"])
        if not isinstance(section.get("params", {}), dict):
            raise _shape_error(where, f"{key}.params", "an object", section["params"])
    return ds


class _Filler:
    """Fill "auto" (or missing) keys of a DeepSpeed dict; reject explicit disagreements."""

    def __init__(self, ds: dict[str, Any]) -> None:
        self.ds = ds

    def __call__(self, dotted: str, value: Any, source: str) -> None:
        *parents, leaf = dotted.split(".")
        node = self.ds
        for key in parents:
            child = node.get(key)
            if child is None or child == AUTO:
                child = node[key] = {}
            node = child
        current = node.get(leaf, AUTO)
        if current == AUTO:
            node[leaf] = value
        elif current != value and not _same_number(current, value):
            raise ConfigError(
                f"deepspeed config '{dotted}' is {current!r} but {source} gives {value!r}; "
                'write "auto" in the DeepSpeed JSON or make them agree'
            )


def _same_number(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return all(_same_number(x, y) for x, y in zip(a, b, strict=True))
    try:
        return float(a) == float(b)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int past float's range
        return False


def _zero_setting(ds: dict[str, Any], wanted: Any, dotted: str, default: Any) -> Any:
    """The run config's value when set; else the JSON's own value; else `default`."""
    if wanted is not None:
        return wanted
    node: Any = ds
    for key in dotted.split("."):
        node = node.get(key, AUTO) if isinstance(node, dict) else AUTO
    return default if node == AUTO else node


def resolve_deepspeed_config(
    ds_in: dict[str, Any],
    *,
    cfg: EngineConfig,
    optim: OptimConfig,
    micro_batch: int,
    grad_accum: int,
    world: int,
) -> dict[str, Any]:
    """The DeepSpeed dict that `deepspeed.initialize` receives, "auto" values filled. A dict
    of the wrong shape (see `check_shape`) or contradicting the run config is a ConfigError."""
    ds = copy.deepcopy(check_shape(ds_in))
    fill = _Filler(ds)
    fill("train_micro_batch_size_per_gpu", micro_batch, "train.micro_batch_size")
    fill("gradient_accumulation_steps", grad_accum, "train.global_batch_size")
    fill("train_batch_size", micro_batch * grad_accum * world, "train.global_batch_size")
    fill("gradient_clipping", optim.grad_clip, "optim.grad_clip")
    precision = resolve_precision(cfg.precision)
    fill("bf16.enabled", precision == "bf16", f"engine.precision={precision}")
    fill("fp16.enabled", precision == "fp16", f"engine.precision={precision}")
    stage = _zero_setting(ds, cfg.zero_stage, "zero_optimization.stage", 2)
    fill("zero_optimization.stage", stage, "engine.zero_stage")
    off_opt = _zero_setting(ds, cfg.offload_optimizer, "zero_optimization.offload_optimizer", False)
    if isinstance(off_opt, dict):
        off_opt = off_opt.get("device", "none") != "none"
    off_par = _zero_setting(ds, cfg.offload_params, "zero_optimization.offload_param", False)
    if isinstance(off_par, dict):
        off_par = off_par.get("device", "none") != "none"
    if off_par and stage != 3:
        raise ConfigError("engine.offload_params: parameter offload needs zero_stage 3")
    if off_opt and stage == 0:
        raise ConfigError("engine.offload_optimizer: optimizer offload needs zero_stage >= 1")
    zero = ds["zero_optimization"]
    if off_opt:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    else:
        zero.pop("offload_optimizer", None)
    if off_par:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    else:
        zero.pop("offload_param", None)
    _check_optimizer_section(ds.pop("optimizer", None), optim)
    _check_scheduler_section(ds.pop("scheduler", None))
    ds.setdefault("zero_allow_untested_optimizer", True)  # ours is torch's AdamW
    ds.setdefault("steps_per_print", 10**9)  # progress is ours to print
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _check_optimizer_section(section: Any, optim: OptimConfig) -> None:
    if section in (None, AUTO):
        return
    kind = str(section.get("type", AUTO))
    if kind != AUTO and kind.lower() not in ("adam", "adamw"):
        raise ConfigError(
            f"deepspeed config 'optimizer.type' is {kind!r}; lmforge trains with AdamW: "
            'remove the section or write "auto"'
        )
    check = _Filler({"optimizer": section})
    params = section.get("params", {})
    ours = {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps}
    ours["weight_decay"] = optim.weight_decay
    for key, value in ours.items():
        if key in params:
            check(f"optimizer.params.{key}", value, f"optim.{key}")


def _check_scheduler_section(section: Any) -> None:
    if section in (None, AUTO):
        return
    params = section.get("params", {}) if isinstance(section, dict) else {}
    if section.get("type", AUTO) != AUTO or any(v != AUTO for v in params.values()):
        raise ConfigError(
            "deepspeed config 'scheduler': lmforge schedules the learning rate from "
            'optim.schedule; remove the section or write "auto" values'
        )
