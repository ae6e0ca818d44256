"""The engine seam: what stages, the loop and the checkpointer may call on the object that wraps a
model for training, and its one implementation on DeepSpeed. This is the ONLY module that imports
deepspeed (design rule 2); the DeepSpeed JSON itself is read and checked in lmforge.ds_config.

Three protocols, each a superset of the one before, say who may call what:

- `Engine`: what a stage calls — forward, train/eval mode, the model to generate with, the
  learning rate, a one-phrase description and parameter counts. Stages never step an engine.
- `TrainEngine`: what the training loop adds (lmforge.loop) — backward, the guarded optimizer
  step, skipping a step, the peak learning rate and its scale.
- `StatefulEngine`: what the checkpointer adds (lmforge.checkpointer) — the engine's own state
  files for an exact resume on the same topology, the whole fp32 weights and optimizer state
  tensor by tensor for a resume on another one, and the consolidated weights of the model.

Another parallelism (FSDP2, tensor parallel) is one new module with a class that implements
`StatefulEngine` and a `build_engine` of the same signature; docs/decisions.md sketches it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import pickle
import re
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from lmforge.batching import BatchPlan
from lmforge.distributed import DistInfo, export_env
from lmforge.ds_config import AUTO as AUTO
from lmforge.ds_config import EngineConfig as EngineConfig
from lmforge.ds_config import Precision as Precision
from lmforge.ds_config import load_deepspeed_json as load_deepspeed_json
from lmforge.ds_config import resolve_deepspeed_config as resolve_deepspeed_config
from lmforge.ds_config import resolve_precision as resolve_precision
from lmforge.optim import OptimConfig, build_scheduler, param_groups

_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


@runtime_checkable
class Engine(Protocol):
    """What a stage may call on its engine."""

    info: DistInfo

    @property
    def module(self) -> nn.Module:
        """The wrapped model (its parameters may be partitioned)."""
        ...

    def __call__(self, **batch: Any) -> Any:
        """Forward pass through the engine."""
        ...

    def train(self, mode: bool = True) -> None:
        """Switch dropout on (or off)."""
        ...

    def inference_model(self) -> nn.Module:
        """A whole model in eval mode to generate with (collective where parameters are split)."""
        ...

    @property
    def lr(self) -> float:
        """The current learning rate."""
        ...

    def grad_norm(self) -> float | None:
        """Gradient norm of the last optimizer step, if known."""
        ...

    def describe(self) -> str:
        """How the model is split, in a few words for the start-up line (e.g. 'ZeRO-2')."""
        ...

    def num_parameters(self, trainable: bool = False) -> int:
        """Whole parameter count (of the trained parameters only, with `trainable`)."""
        ...


@runtime_checkable
class TrainEngine(Engine, Protocol):
    """What the training loop adds: backward, the guarded step and the learning rate."""

    last_step_skipped: bool

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of one micro-batch's loss."""
        ...

    def at_boundary(self) -> bool:
        """Whether the next `step` call ends an accumulation (applies an optimizer update)."""
        ...

    def step(self, skip: bool = False) -> None:
        """After every micro-batch; at a boundary applies the update, or drops it with skip."""
        ...

    def skip_step(self) -> None:
        """Count an optimizer step without computing it: only the schedule advances."""
        ...

    def set_lr_scale(self, scale: float) -> None:
        """Scale the schedule's peak learning rate (not cumulative)."""
        ...

    def set_hyperparameters(self, optim: OptimConfig) -> None:
        """Take the peak learning rate, betas, eps and weight decay of `optim` (after a resume
        restored the ones the run was saved with); the schedule continues from its step."""
        ...


@runtime_checkable
class StatefulEngine(TrainEngine, Protocol):
    """What the checkpointer adds: state files, the whole state, the consolidated weights."""

    def topology(self) -> dict[str, Any]:
        """What the engine's own state files depend on, recorded in lmforge.json."""
        ...

    def resumes_natively(self, saved: Mapping[str, Any]) -> bool:
        """Whether state files written under topology `saved` load into this engine as they are."""
        ...

    def topology_text(self, saved: Mapping[str, Any] | None = None) -> str:
        """A topology (this engine's, or a saved one) in words for messages."""
        ...

    def save_state(
        self, directory: Path, client_state: dict[str, Any], *, without_module: bool = False
    ) -> bool:
        """Write the engine's own state files into `directory`. Collective. With
        without_module the module's weights may be left out (the checkpoint's weights file
        holds them exactly); returns whether they were."""
        ...

    def load_state(
        self, directory: Path, weights: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, Any]:
        """Load what save_state wrote (`weights`: the module's, where it left them out).
        Collective."""
        ...

    def owns_state_file(self, rel: str) -> bool:
        """Whether state file `rel` (relative to the checkpoint) is read by this rank."""
        ...

    def read_state_files(
        self, directory: Path, weights: Mapping[str, torch.Tensor] | None = None
    ) -> Any:
        """What save_state wrote into `directory`, under any topology, as whole tensors
        (`names`, `tensor(name, key)`, `optimizer_step()`, `schedule_state()`); `weights` are
        the module's weights where the state files leave them out."""
        ...

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Every parameter, whole, on CPU, on rank 0 (None elsewhere). Collective."""
        ...

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of every trained parameter, in module order."""
        ...

    def full_shape(self, param: nn.Parameter) -> tuple[int, ...]:
        """The whole shape of a (possibly partitioned) parameter."""
        ...

    def full_tensor(self, param: nn.Parameter, key: str | None = None) -> torch.Tensor:
        """The whole fp32 master weight or optimizer state `key` of a parameter. Collective."""
        ...

    def set_full_tensor(self, param: nn.Parameter, value: torch.Tensor, key: str | None) -> None:
        """Write this rank's share of a whole master weight or optimizer state."""
        ...

    def optimizer_state_ready(self) -> bool:
        """Whether the optimizer holds state yet."""
        ...

    def optimizer_step_count(self) -> int:
        """The optimizer's step counter."""
        ...

    def prepare_optimizer_state(self, step: int) -> None:
        """Give a fresh optimizer zero state at `step`, ready for set_full_tensor."""
        ...

    def schedule_state(self) -> dict[str, Any]:
        """The learning-rate schedule and step counters, as plain values."""
        ...

    def load_schedule_state(self, state: dict[str, Any]) -> None:
        """Restore what schedule_state returned."""
        ...


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
    if not torch.cuda.is_available():
        _skip_shm_op()
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def _skip_shm_op() -> None:
    """Keep DeepSpeed's CPU backend from compiling its shared-memory all-reduce op.

    On CPU, DeepSpeed JIT-compiles a C++ op (a compiler, 30 s to minutes) at every process
    group start whose build flags do not match the cached one, and only its inference
    all-reduce uses it; training collectives go through gloo either way. Marking the op
    incompatible (its own switch, probed once per process) makes the backend skip it.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


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


def _safe_load(path: str | Path, map_location: Any = None, *, mmap: bool = False) -> Any:
    """torch.load of one of DeepSpeed's pickled state files with weights_only loading plus the
    allow-list of DeepSpeed's plain classes; anything else in it is one CheckpointError line."""
    try:
        with torch.serialization.safe_globals(_ds_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        from lmforge.errors import CheckpointError

        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused to load: it holds more than tensors and plain values "
            f"({detail[:200]}); lmforge did not write it this way, so do not resume from it"
        ) from None


@contextlib.contextmanager
def _weights_only_loads(ds_engine: Any) -> Iterator[None]:
    """Make the engine's checkpoint reader use `_safe_load` meanwhile."""
    reader = ds_engine.checkpoint_engine
    reader.load = lambda path, map_location=None: _safe_load(path, map_location)
    try:
        yield
    finally:
        del reader.load  # back to the class's method


def _load_state_file(path: Path) -> Any:
    """One of DeepSpeed's state files read with `_safe_load`, memory-mapped (tensors are read
    only where they are used); an unreadable file is one CheckpointError line."""
    from lmforge.errors import CheckpointError

    try:
        return _safe_load(path, "cpu", mmap=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path}: unreadable ({e}); restore the file") from None


_SHARD = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
_GROUPS_KEY = "lmforge_param_groups"  # client_state: parameter names per optimizer group
_MODULE_KEY = "lmforge_module_in_weights"  # client_state: the module was left to the weights


class EngineStateFiles:
    """DeepSpeed's partitioned engine state of one checkpoint (`save_state`'s folder), read back
    as whole fp32 tensors one parameter at a time, whatever process count and ZeRO stage wrote
    it: how a resume on another topology gets the master weights and AdamW moments without a
    second, consolidated copy on disk. Files are memory-mapped, so only the slices of each old
    rank's shard that a parameter occupies are read when it is asked for.

    Layouts (DeepSpeed 0.19): ZeRO-1/2 keep one flat fp32 partition per optimizer group and
    rank (`single_partition_of_fp32_groups`, moments in `base_optimizer_state`) with each
    parameter's fragment in `param_slice_mappings`; ZeRO-3 partitions every parameter on its own
    (ceil(numel / ranks) elements per rank, in `param_shapes` order) in `fp32_flat_groups`;
    without ZeRO the optimizer state sits in the model-states file, keyed by parameter index,
    the master copy in `fp32_groups` (bf16/fp16) or the module's own weights (fp32)."""

    def __init__(self, directory: Path, weights: Mapping[str, torch.Tensor] | None = None):
        from lmforge.errors import CheckpointError

        self.where = directory
        folder = directory / "state"
        shards = sorted(
            (int(m.group(1)), f) for f in folder.glob("*.pt") if (m := _SHARD.search(f.name))
        )
        first = folder / "mp_rank_00_model_states.pt"
        if not first.is_file():
            first = folder / "zero_pp_rank_0_mp_rank_00_model_states.pt"
        if not first.is_file():
            raise CheckpointError(f"{folder}: no DeepSpeed model-states file; restore the folder")
        self.model = _load_state_file(first)
        self.shards = [_load_state_file(f)["optimizer_state_dict"] for _, f in shards]
        self.shapes: dict[str, tuple[int, ...]] = {}
        # name -> [(shard, group, start, numel), ...] in rank order (ZeRO) or (group, index)
        self.pieces: dict[str, list[tuple[int, int, int, int]]] = {}
        self.weights = weights  # the module's weights when the state files leave them out
        if not self.shards:
            self.layout = "zero0"
            self._index_zero0()
        elif "fp32_flat_groups" in self.shards[0]:
            self.layout = "zero3"
            self._index_zero3()
        else:
            self.layout = "zero12"
            self._index_zero12()

    @property
    def names(self) -> list[str]:
        """The trained parameters the state holds."""
        return list(self.pieces)

    def _index_zero12(self) -> None:
        for groups in self.model["param_shapes"]:
            self.shapes.update({k: tuple(v) for k, v in groups.items()})
        for rank, shard in enumerate(self.shards):
            for group, mapping in enumerate(shard["param_slice_mappings"]):
                for name, frag in mapping.items():
                    self.pieces.setdefault(name, []).append((rank, group, frag.start, frag.numel))

    def _index_zero3(self) -> None:
        ranks = len(self.shards)
        for group, shapes in enumerate(self.model["param_shapes"]):
            offset = 0
            for name, shape in shapes.items():
                self.shapes[name] = tuple(shape)
                part = -(-math.prod(shape) // ranks)  # each rank's (padded) share
                self.pieces[name] = [(r, group, offset, part) for r in range(ranks)]
                offset += part

    def _index_zero0(self) -> None:
        from lmforge.errors import CheckpointError

        groups = self.model.get(_GROUPS_KEY)
        optimizer = self.model.get("optimizer") or {}
        if groups is None or "fp32_groups_flat" in optimizer:
            raise CheckpointError(
                f"{self.where}: this ZeRO-0 engine state cannot be re-sharded (no parameter "
                "list, or a fused fp16 master copy); resume it on the setup that wrote it"
            )
        index = 0
        for group, names in enumerate(groups):
            for j, name in enumerate(names):
                self.pieces[name] = [(0, group, j, index)]
                index += 1

    def _zero0_tensor(self, name: str, key: str | None) -> torch.Tensor:
        from lmforge.errors import CheckpointError

        ((_, group, j, index),) = self.pieces[name]
        optimizer = self.model["optimizer"]
        inner = optimizer.get("optimizer_state_dict", optimizer)
        if key is not None:
            return inner["state"][index][key]
        if "fp32_groups" in optimizer:
            return optimizer["fp32_groups"][group][j]
        module = self.model.get("module") or {}
        if name in module:
            return module[name]
        if self.weights is not None and name in self.weights:
            return self.weights[name]
        raise CheckpointError(f"{self.where}: no weights for {name!r}; restore the checkpoint")

    def tensor(self, name: str, key: str | None = None) -> torch.Tensor:
        """The whole fp32 master weight (key None) or AdamW moment `key` of parameter `name`,
        shaped like the parameter."""
        if self.layout == "zero0":
            value = self._zero0_tensor(name, key)
            return value.detach().float().clone()
        numel = math.prod(self.shapes[name])
        parts = []
        for rank, group, start, count in self.pieces[name]:
            flat = self._flat(self.shards[rank], group, key)
            parts.append(flat.narrow(0, start, min(count, flat.numel() - start)))
        whole = torch.cat(parts)[:numel]  # (numel,): ZeRO-3 pads each parameter's last share
        return whole.float().reshape(self.shapes[name]).clone()

    def _flat(self, shard: Mapping[str, Any], group: int, key: str | None) -> torch.Tensor:
        """One rank's flat fp32 partition of optimizer group `group` (key None) or of its
        moment `key`: (partition numel,)."""
        if self.layout == "zero3":
            master, state = shard["fp32_flat_groups"], shard["optimizer_state_dict"]["state"]
        else:
            master = shard["single_partition_of_fp32_groups"]
            state = shard["base_optimizer_state"]["state"]
        return master[group] if key is None else state[group][key]

    def optimizer_step(self) -> int:
        """AdamW's step counter (0 before the first applied step)."""
        if self.layout == "zero0":
            optimizer = self.model["optimizer"]
            state = optimizer.get("optimizer_state_dict", optimizer)["state"]
        elif self.layout == "zero3":
            state = self.shards[0]["optimizer_state_dict"]["state"]
        else:
            state = self.shards[0]["base_optimizer_state"]["state"]
        for value in state.values():
            if "step" in value:
                return int(value["step"])
        return 0

    def has_moments(self) -> bool:
        """Whether the optimizer had state yet (it has after its first applied step)."""
        return self.optimizer_step() > 0

    def schedule_state(self) -> dict[str, Any]:
        """The learning-rate schedule and DeepSpeed's step counters, as `schedule_state` of
        the engine that wrote the files returned them."""
        sched = self.model.get("lr_scheduler") or {}
        return {
            "scheduler": {k: v for k, v in sched.items() if k != "lr_lambdas"},
            "counters": {k: int(self.model.get(k) or 0) for k in _COUNTERS},
        }


class DeepSpeedEngine:
    """`StatefulEngine` on DeepSpeed ZeRO 0-3 (with optimizer and parameter offload)."""

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
        self._replica: nn.Module | None = None

    @property
    def module(self) -> nn.Module:
        """The wrapped model (parameters are partitioned under ZeRO-3)."""
        return self.ds.module

    def __call__(self, **batch: Any) -> Any:
        """Forward through the engine (ZeRO-3 gathers parameters layer by layer)."""
        return self.ds(**batch)

    def describe(self) -> str:
        """'ZeRO-N' plus the offloads in use."""
        zero = self.config["zero_optimization"]
        offload = [k.split("_")[1] for k in ("offload_optimizer", "offload_param") if k in zero]
        return f"ZeRO-{self.zero_stage}" + (f" ({', '.join(offload)} offload)" if offload else "")

    def num_parameters(self, trainable: bool = False) -> int:
        """Whole parameter count; ZeRO-3 keeps each parameter's whole size in ds_numel."""
        params = self.module.parameters()
        return sum(
            int(getattr(p, "ds_numel", p.numel()))
            for p in params
            if p.requires_grad or not trainable
        )

    def backward(self, loss: torch.Tensor) -> None:
        """Backward, scaled for gradient accumulation and loss scaling by DeepSpeed."""
        self.ds.backward(loss)

    def at_boundary(self) -> bool:
        """Whether the next `step` applies an optimizer update."""
        return bool(self.ds.is_gradient_accumulation_boundary())

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

    def set_hyperparameters(self, optim: OptimConfig) -> None:
        """Peak learning rate, betas, eps and weight decay from `optim`, replacing the values a
        resume restored with the optimizer state; call set_lr_scale after it. The group that
        decays is the first of two (lmforge.optim.param_groups builds them in that order)."""
        groups = self.optimizer.param_groups
        for i, group in enumerate(groups):
            group["initial_lr"] = optim.lr
            group["betas"] = tuple(optim.betas)
            group["eps"] = optim.eps
            if group.get("weight_decay", 0.0) > 0 or (i == 0 and len(groups) == 2):
                group["weight_decay"] = optim.weight_decay
        self.set_lr_scale(1.0)

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

    def topology(self) -> dict[str, Any]:
        """Process count, ZeRO stage and precision: what DeepSpeed's state files depend on."""
        return {
            "world_size": self.info.world,
            "zero_stage": self.zero_stage,
            "precision": self.precision,
        }

    def resumes_natively(self, saved: Mapping[str, Any]) -> bool:
        """DeepSpeed's partitioned state loads on the same process count and ZeRO stage."""
        world = int(saved.get("world_size") or self.info.world)
        return world == self.info.world and int(saved.get("zero_stage", -1)) == self.zero_stage

    def topology_text(self, saved: Mapping[str, Any] | None = None) -> str:
        """'2 process(es), ZeRO-3' for this engine or a saved topology."""
        saved = self.topology() if saved is None else saved
        world = saved.get("world_size") or self.info.world
        return f"{world} process(es), ZeRO-{saved.get('zero_stage')}"

    def owns_state_file(self, rel: str) -> bool:
        """Whether `rel` is read by this rank: its own ZeRO shard and RNG file, or a shared
        file (the whole-state folder is the checkpointer's business)."""
        name = rel.rsplit("/", 1)[-1]
        if "/consolidated/" in rel:
            return False
        for prefix in ("zero_pp_rank_", "rng-rank"):
            if name.startswith(prefix):
                digits = name[len(prefix) :].split("_", 1)[0].split(".", 1)[0]
                return digits == str(self.info.rank)
        return True

    def full_shape(self, param: nn.Parameter) -> tuple[int, ...]:
        """ZeRO-3 keeps a partitioned parameter's whole shape in ds_shape."""
        return tuple(getattr(param, "ds_shape", param.shape))

    def save_state(
        self, directory: Path, client_state: dict[str, Any], *, without_module: bool = False
    ) -> bool:
        """Write optimizer, scheduler and partitioned weights for exact resume. Collective. The
        folder also gets DeepSpeed's own `latest` tag file (and, under ZeRO, its recovery
        scripts), so DeepSpeed's `zero_to_fp32.py` runs on it with no extra flags.

        With without_module (the checkpoint's weights file holds the module's weights as they
        are), ZeRO-0/1/2 leave the module's parameters out of `mp_rank_00_model_states.pt`
        (its buffers stay): DeepSpeed would store a second copy of the weights there. Under
        ZeRO-3 that file holds only placeholders anyway. Returns whether they were left out."""
        omit = without_module and self.zero_stage < 3
        client_state = {**client_state, _GROUPS_KEY: self._group_names(), _MODULE_KEY: omit}
        if omit:
            # Every name a parameter has, a tied one's second name (output.weight) included.
            params = {n for n, _ in self.module.named_parameters(remove_duplicate=False)}
            full = self.ds.module_state_dict

            def buffers_only(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
                state = full(*args, **kwargs) or {}
                return {k: v for k, v in state.items() if k not in params}

            self.ds.module_state_dict = buffers_only
        try:
            self.ds.save_checkpoint(
                str(directory), tag="state", client_state=client_state, save_latest=True
            )
        finally:
            if omit:
                del self.ds.module_state_dict  # back to the class's method
        return omit

    def _group_names(self) -> list[list[str]]:
        """The names of the optimizer's parameters per group, in its order (without ZeRO the
        state files key the optimizer state by position; under ZeRO they name parameters)."""
        if self.zero_stage > 0:
            return []
        names = {id(p): n for n, p in self.module.named_parameters()}
        wrapper = self.ds.optimizer
        groups = getattr(wrapper, "fp16_groups", None) or [
            g["params"] for g in self.optimizer.param_groups
        ]
        return [[names[id(p)] for p in group] for group in groups]

    def read_state_files(
        self, directory: Path, weights: Mapping[str, torch.Tensor] | None = None
    ) -> EngineStateFiles:
        """The engine state `save_state` wrote into `directory` (by any topology), whole."""
        return EngineStateFiles(directory, weights)

    def load_state(
        self, directory: Path, weights: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, Any]:
        """Restore what save_state wrote; returns its client_state. Collective. The pickled
        DeepSpeed files are read with torch.load(weights_only=True): tensors, containers and a
        short list of DeepSpeed's own plain classes, never arbitrary code. `weights` (every
        parameter by name, as the checkpoint's weights file holds them) stand in for the
        module's parameters where save_state left them out."""
        with _weights_only_loads(self.ds):
            path, client = self.ds.load_checkpoint(
                str(directory),
                tag="state",
                load_module_strict=weights is None,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
        if weights is not None and self.zero_stage < 3:
            self._copy_weights(directory, weights)
        self.ds.optimizer._lmforge_linked = False  # new state tensors: views must be remade
        if path is None:
            from lmforge.errors import CheckpointError

            raise CheckpointError(f"{directory}: no DeepSpeed engine state to resume from")
        return client or {}

    @torch.no_grad()
    def _copy_weights(self, directory: Path, weights: Mapping[str, torch.Tensor]) -> None:
        """Put the module's parameters back from the weights file. ZeRO-1/2 already rebuilt
        them from the fp32 master partitions (the same values); without ZeRO (fp32) they are
        the only copy of the weights."""
        from lmforge.errors import CheckpointError

        for name, param in self.module.named_parameters():
            if name not in weights or tuple(weights[name].shape) != tuple(param.shape):
                raise CheckpointError(
                    f"{directory}: the checkpoint's weights lack {name!r} (or its shape "
                    "differs), and the engine state left the module's weights to them"
                )
            param.data.copy_(weights[name])

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
        return value.detach().float().cpu().reshape(self.full_shape(param))

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


def check_engine_config(cfg: EngineConfig, optim: OptimConfig, plan: BatchPlan) -> None:
    """Find contradictions between the engine's own config file and the run config (the batch
    plan's sizes included) before any data is read: a ConfigError naming both keys."""
    resolve_deepspeed_config(
        load_deepspeed_json(cfg.deepspeed),
        cfg=cfg,
        optim=optim,
        micro_batch=plan.micro,
        grad_accum=plan.accum,
        world=plan.world,
    )


def build_engine(
    model: nn.Module,
    cfg: EngineConfig,
    optim: OptimConfig,
    *,
    micro_batch: int,
    grad_accum: int,
    total_steps: int,
    info: DistInfo,
) -> DeepSpeedEngine:
    """Wrap `model` in DeepSpeed with our AdamW groups and learning-rate schedule. The batch
    arguments are a stage's `BatchPlan` (`micro_batch=plan.micro, grad_accum=plan.accum`): rows
    per forward pass on one process and forward passes per optimizer step."""
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
    return DeepSpeedEngine(ds_engine, ds_cfg, info, optimizer)
