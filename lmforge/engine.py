"""The DeepSpeed engine: the ONLY module that imports deepspeed (DESIGN rule 2).

The user's DeepSpeed JSON is used as written, except that values written "auto" are filled from
the run config (batch sizes, precision, clipping, ZeRO stage, offload) and that lmforge owns the
optimizer and learning-rate schedule: an `optimizer` / `scheduler` section may be present only
with values that are "auto" or agree with the run config. Any disagreement is a ConfigError that
names both keys.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import pickle
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lmforge.config import option
from lmforge.distributed import DistInfo, export_env
from lmforge.errors import ConfigError
from lmforge.optim import OptimConfig, build_scheduler, param_groups

Precision = Literal["auto", "bf16", "fp16", "fp32"]
AUTO = "auto"
_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


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
    the repository root, where configs/ lives)."""
    text = source.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"engine.deepspeed: inline JSON is invalid ({e})") from None
    path = Path(source)
    if not path.exists() and not path.is_absolute():
        path = Path(__file__).resolve().parents[1] / source
    if not path.is_file():
        raise ConfigError(f"engine.deepspeed: file {source} not found; give a path or inline JSON")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"engine.deepspeed: {path} is not valid JSON ({e})") from None


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
    except (TypeError, ValueError):
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
    """The DeepSpeed dict that `deepspeed.initialize` receives, "auto" values filled."""
    ds = copy.deepcopy(ds_in)
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(info: DistInfo, backend: str = "") -> None:
    """Start the process group (gloo on CPU, nccl on GPUs) from the launcher's environment."""
    import deepspeed

    if info.world == 1 and "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())  # parallel single-process runs coexist
    export_env(info)
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    import contextlib
    import io

    # DeepSpeed's CPU backend prints a notice that its shared-memory op was built, on every rank.
    with contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(dist_backend=backend, verbose=False)


def quiet_deepspeed() -> None:
    """DeepSpeed logs every config key at INFO on every rank: keep warnings only."""
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


class _StepGate:
    """Wraps the optimizer's step so that a step can be refused: while `skip` is set (or, when
    `check_grads`, a gradient is not finite) the update is not applied and `blocked` is set.

    DeepSpeed calls this optimizer's step once per ZeRO partition group; without ZeRO (and
    without a DeepSpeed mixed-precision wrapper) it calls it directly with whole, all-reduced
    gradients, which is when the gate checks them itself (they are the same on every rank)."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, check_grads: bool) -> None:
        self.skip = False
        self.blocked = False
        inner = optimizer.step

        @functools.wraps(inner)  # keeps the scheduler's marker on the wrapped step
        def step(*args: Any, **kwargs: Any) -> Any:
            if self.skip or (check_grads and not _grads_finite(optimizer)):
                self.blocked = True
                return None
            return inner(*args, **kwargs)

        optimizer.step = step  # type: ignore[method-assign]


def _grads_finite(optimizer: torch.optim.Optimizer) -> bool:
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())


def _ds_safe_globals() -> list[Any]:
    """DeepSpeed classes its engine-state files may hold, allowed for weights_only loading."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def _weights_only_loads(ds_engine: Any) -> Iterator[None]:
    """Make the engine's checkpoint reader use torch.load(weights_only=True) meanwhile."""
    reader = ds_engine.checkpoint_engine

    def load(path: str, map_location: Any = None) -> Any:
        try:
            with torch.serialization.safe_globals(_ds_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            from lmforge.errors import CheckpointError

            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{path}: refused to load: it holds more than tensors and plain values "
                f"({detail[:200]}); lmforge did not write it this way, so do not resume from it"
            ) from None

    reader.load = load
    try:
        yield
    finally:
        del reader.load  # back to the class's method


class Engine:
    """A DeepSpeed engine with what the stages need around it: full weights, state files."""

    def __init__(
        self,
        ds_engine: Any,
        ds_config: dict[str, Any],
        info: DistInfo,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        self.ds = ds_engine
        self.config = ds_config
        self.info = info
        self.zero_stage = int(ds_config["zero_optimization"]["stage"])
        self.precision = next(
            (k for k in ("bf16", "fp16") if ds_config.get(k, {}).get("enabled")), "fp32"
        )
        # The optimizer lmforge built (under ZeRO its parameters are this rank's flat partitions).
        self.optimizer = optimizer if optimizer is not None else ds_engine.optimizer
        self._gate = _StepGate(self.optimizer, check_grads=ds_engine.optimizer is self.optimizer)
        self.last_step_skipped = False
        # Run state kept beside the engine: restored from the resumed checkpoint's lmforge.json
        # and written into every checkpoint (the fault monitor's, under "faults").
        self.run_state: dict[str, Any] = {}
        self._replica: nn.Module | None = None

    @property
    def module(self) -> nn.Module:
        """The wrapped model (parameters are partitioned under ZeRO-3)."""
        return self.ds.module

    def __call__(self, **batch: Any) -> Any:
        """Forward through the engine (ZeRO-3 gathers parameters layer by layer)."""
        return self.ds(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward, scaled for gradient accumulation and loss scaling by DeepSpeed."""
        self.ds.backward(loss)

    def step(self, skip: bool = False) -> None:
        """Call after every micro-batch; the optimizer steps at accumulation boundaries.

        With skip (at a boundary) the update is not applied: weights and optimizer state stay as
        they are and the gradients are dropped. A step DeepSpeed refuses by itself (a non-finite
        gradient norm; fp16 loss-scale overflows aside) counts as skipped too. A skipped step still
        advances the learning-rate schedule, so the schedule follows the step count.
        `last_step_skipped` tells what happened at the last boundary.
        """
        boundary = bool(self.ds.is_gradient_accumulation_boundary())
        self._gate.skip, self._gate.blocked = skip and boundary, False
        try:
            self.ds.step()
        finally:
            self._gate.skip = False
        if not boundary:
            return
        refused = not getattr(self.ds, "_step_applied", True)  # DeepSpeed's overflow check
        self.last_step_skipped = (
            skip or self._gate.blocked or (refused and self.precision != "fp16")
        )
        if self.last_step_skipped and refused and self.ds.lr_scheduler is not None:
            self.ds.lr_scheduler.step()  # DeepSpeed does not advance the schedule on overflow

    def skip_step(self) -> None:
        """Count an optimizer step without computing it (a batch known to be bad): only the
        learning-rate schedule advances."""
        if self.ds.lr_scheduler is not None:
            self.ds.lr_scheduler.step()

    def set_lr_scale(self, scale: float) -> None:
        """Scale the schedule's peak learning rate by `scale` relative to the configured one
        (idempotent: it is not cumulative over calls)."""
        sched = self.ds.lr_scheduler
        if sched is None:
            return
        groups = sched.optimizer.param_groups
        sched.base_lrs = [g["initial_lr"] * scale for g in groups]
        for group, base, fn in zip(groups, sched.base_lrs, sched.lr_lambdas, strict=True):
            group["lr"] = base * fn(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in groups]

    def train(self, mode: bool = True) -> None:
        """Switch dropout on (or off)."""
        self.ds.train(mode)

    @property
    def lr(self) -> float:
        """Current learning rate of the first parameter group."""
        return float(self.ds.get_lr()[0])

    def grad_norm(self) -> float | None:
        """Global gradient norm of the last optimizer step (before clipping), if known."""
        value = self.ds.get_global_grad_norm()
        return None if value is None else float(value)

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped by the fp16 loss scaler."""
        return int(getattr(self.ds, "skipped_steps", 0))

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Every parameter, whole, on CPU, on rank 0 (None on other ranks). Collective: all ranks
        must call it. Under ZeRO-3 each parameter is gathered one at a time."""
        if self.zero_stage < 3:
            if not self.info.is_main:
                return None
            return {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}
        import deepspeed

        state: dict[str, torch.Tensor] = {}
        for name, param in self.module.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if self.info.is_main:
                    state[name] = param.data.detach().to("cpu", copy=True)
        return state if self.info.is_main else None

    @torch.no_grad()
    def inference_model(self) -> nn.Module:
        """The model to generate with, in eval mode. Under ZeRO-3, a whole replica on every rank,
        refreshed by gathering all parameters once per call (once per rollout batch, not once
        per generated token); otherwise the engine's own module. Collective under ZeRO-3."""
        module = self.module
        if self.zero_stage < 3:
            return module
        import deepspeed

        from lmforge.model import GPT, build_model

        if not isinstance(module, GPT) or any(".lora_" in n for n, _ in module.named_parameters()):
            return module.eval()  # adapters: generate through ZeRO-3's per-layer gathering
        params = dict(module.named_parameters())
        if self._replica is None:
            first = next(iter(params.values()))
            device = first.device
            self._replica = build_model(module.cfg, device="meta").to_empty(device=device)
            self._replica.tie_weights()
            self._replica.to(first.dtype)
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            for name, param in self._replica.named_parameters():
                param.copy_(params[name].data)
        return self._replica.eval()

    def save_state(self, directory: Path, client_state: dict[str, Any]) -> None:
        """Write optimizer, scheduler and partitioned weights for exact resume. Collective."""
        self.ds.save_checkpoint(
            str(directory), tag="state", client_state=client_state, save_latest=False
        )

    def load_state(self, directory: Path) -> dict[str, Any]:
        """Restore what save_state wrote; returns its client_state. Collective. The pickled
        DeepSpeed files are read with torch.load(weights_only=True): tensors, containers and a
        short list of DeepSpeed's own plain classes, never arbitrary code."""
        with _weights_only_loads(self.ds):
            path, client = self.ds.load_checkpoint(
                str(directory),
                tag="state",
                load_module_strict=True,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
        self.ds.optimizer._lmforge_linked = False  # new state tensors: views must be remade
        if path is None:
            from lmforge.errors import CheckpointError

            raise CheckpointError(f"{directory}: no DeepSpeed engine state to resume from")
        return client or {}

    # -- whole (process-count independent) training state, for resuming on another topology --

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of every trained parameter, in module order."""
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    def optimizer_state_ready(self) -> bool:
        """Whether the optimizer holds state (it does after its first applied step)."""
        return len(self.optimizer.state) > 0

    def full_tensor(self, param: nn.Parameter, key: str | None = None) -> torch.Tensor:
        """The whole fp32 master weight (key None) or optimizer state `key` ("exp_avg",
        "exp_avg_sq") of a parameter, on CPU, on every rank. Collective under ZeRO."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if key is not None:
            self._link_optimizer_state()
        value = (
            safe_get_full_fp32_param(param)
            if key is None
            else safe_get_full_optimizer_state(param, key)
        )
        if value is None:  # no ZeRO: a flat master copy (bf16/fp16), or our optimizer's own
            value = self._master_view(param, key)
        return value.detach().float().cpu().reshape(getattr(param, "ds_shape", param.shape))

    def _master_view(self, param: nn.Parameter, key: str | None) -> torch.Tensor:
        """Without ZeRO: the parameter's slice of DeepSpeed's flat fp32 master copy (or of its
        optimizer state), or with no master copy the parameter itself (or its state)."""
        wrapper = self.ds.optimizer
        lows = getattr(wrapper, "fp16_groups", [])
        for i, group in enumerate(lows):
            offset = 0
            for j, p in enumerate(group):
                if p is not param:
                    offset += p.numel()
                    continue
                if hasattr(wrapper, "fp32_groups_flat"):  # fused: one flat master per group
                    flat = wrapper.fp32_groups_flat[i]
                    source = flat if key is None else self.optimizer.state[flat][key]
                    return source.narrow(0, offset, p.numel()).view(p.shape)
                master = wrapper.fp32_groups[i][j]  # unfused: one master per parameter
                return master.data if key is None else self.optimizer.state[master][key]
        return param.data if key is None else self.optimizer.state[param][key]

    def set_full_tensor(self, param: nn.Parameter, value: torch.Tensor, key: str | None) -> None:
        """Write this rank's share of a whole master weight or optimizer state (see full_tensor).
        Call prepare_optimizer_state first. Local: no communication."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        if hasattr(param, "ds_id"):  # ZeRO-3: this rank holds a padded slice of the flat tensor
            zero3 = self.ds.optimizer
            part, _ = zero3._get_fp32_opt_state_partition(
                param, release_swap_buffers=False, optim_state_key=key
            )
            rank = torch.distributed.get_rank(group=zero3._get_param_partition_group(param))
            chunk = value.flatten()[rank * part.numel() : (rank + 1) * part.numel()]
            part.data.zero_()
            part.data[: chunk.numel()].copy_(chunk)
        elif hasattr(param, "_hp_mapping"):  # ZeRO-1/2 or a bf16 master copy: a fragment
            if key is None:
                safe_set_full_fp32_param(param, value.to(param.device))
            else:
                safe_set_full_optimizer_state(param, value.to(param.device), key)
        else:
            self._master_view(param, key).copy_(value)
            if key is None:
                param.data.copy_(value)  # the low-precision copy the forward pass uses

    def optimizer_step_count(self) -> int:
        """The optimizer's step counter (the same for every parameter)."""
        for state in self.optimizer.state.values():
            if "step" in state:
                return int(state["step"])
        return 0

    def prepare_optimizer_state(self, step: int) -> None:
        """Give a fresh optimizer zero AdamW state at `step` (what its first update would create),
        so that set_full_tensor can write into it."""
        cpu_adam = hasattr(self.optimizer, "ds_opt_adam")  # DeepSpeedCPUAdam counts in an int
        groups = self.optimizer.param_groups
        on_device = any(g.get("fused") or g.get("capturable") for g in groups)
        params = [p for g in groups for p in g["params"]]
        # ZeRO-3 hands its flat partitions to the optimizer only while stepping.
        params += list(getattr(self.ds.optimizer, "fp32_partitioned_groups_flat", []))
        for p in params:
            state = self.optimizer.state[p]
            if not state:
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            device = p.device if on_device else torch.device("cpu")
            state["step"] = step if cpu_adam else torch.tensor(float(step), device=device)
        self._link_optimizer_state(force=True)

    def _link_optimizer_state(self, force: bool = False) -> None:
        """Point DeepSpeed's per-parameter views (ZeRO-1/2, bf16) at the optimizer's current
        state tensors; a state loaded or created after they were made leaves them stale."""
        wrapper = self.ds.optimizer
        if not hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):
            return
        if force or not getattr(wrapper, "_lmforge_linked", False):
            wrapper._hp_optimizer_states_linked = False
            wrapper._lazy_init_hp_params_optimizer_state()
            wrapper._lmforge_linked = True

    def schedule_state(self) -> dict[str, Any]:
        """The learning-rate schedule's state and DeepSpeed's step counters, as plain values."""
        sched = self.ds.lr_scheduler
        state = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"} if sched else {}
        counters = {k: int(getattr(self.ds, k, 0)) for k in _COUNTERS}
        return {"scheduler": state, "counters": counters}

    def load_schedule_state(self, state: dict[str, Any]) -> None:
        """Restore what schedule_state returned."""
        sched = self.ds.lr_scheduler
        if sched is not None and state.get("scheduler"):
            sched.load_state_dict(
                {**state["scheduler"], "lr_lambdas": sched.state_dict()["lr_lambdas"]}
            )
            for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr(), strict=True):
                group["lr"] = lr
        for key, value in state.get("counters", {}).items():
            setattr(self.ds, key, int(value))


def build_engine(
    model: nn.Module,
    cfg: EngineConfig,
    optim: OptimConfig,
    *,
    micro_batch: int,
    grad_accum: int,
    total_steps: int,
    info: DistInfo,
) -> Engine:
    """Wrap `model` in DeepSpeed with our AdamW groups and learning-rate schedule."""
    import deepspeed

    quiet_deepspeed()
    ds_cfg = resolve_deepspeed_config(
        load_deepspeed_json(cfg.deepspeed),
        cfg=cfg,
        optim=optim,
        micro_batch=micro_batch,
        grad_accum=grad_accum,
        world=info.world,
    )
    if cfg.activation_checkpointing:
        from lmforge.model import checkpoint_layers

        checkpoint_layers(model)
    groups = param_groups(model, optim.weight_decay)
    if "offload_optimizer" in ds_cfg["zero_optimization"]:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer: torch.optim.Optimizer = DeepSpeedCPUAdam(
            groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, adamw_mode=True
        )
    else:
        optimizer = torch.optim.AdamW(
            groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, fused=torch.cuda.is_available()
        )
    scheduler = build_scheduler(optimizer, optim, total_steps)
    ds_engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg
    )
    if cfg.compile:
        ds_engine.compile()  # compiles the module in place: state-dict names are unchanged
    return Engine(ds_engine, ds_cfg, info, optimizer)
