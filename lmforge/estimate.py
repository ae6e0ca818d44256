"""How big a training run is before it runs: parameters, FLOPs per token, and memory per GPU.

Model states follow the ZeRO paper's accounting for mixed-precision Adam (Rajbhandari et al.
2020, section 3.1): per parameter 2 bytes of 16-bit weights, 2 bytes of 16-bit gradients and
K = 12 bytes of optimizer state (fp32 master weights, momentum, variance), 16 bytes in all. With
Ψ parameters on N data-parallel GPUs:

    stage 0: 2Ψ + 2Ψ + 12Ψ         = 16Ψ
    stage 1: 2Ψ + 2Ψ + 12Ψ/N       = 4Ψ + 12Ψ/N   (optimizer states partitioned)
    stage 2: 2Ψ + (2Ψ + 12Ψ)/N     = 2Ψ + 14Ψ/N   (gradients too)
    stage 3: (2Ψ + 2Ψ + 12Ψ)/N     = 16Ψ/N        (parameters too)

Optimizer offload (stages 1-3) moves this rank's optimizer-state partition to CPU memory;
parameter offload (stage 3) moves its parameter partition there too. fp32 training keeps 4-byte
weights and gradients and 8 bytes of Adam moments. Communication buckets, ZeRO-3's gathered
layers and allocator fragmentation are not counted.

Activations (per GPU, independent of N: ZeRO is data parallel) are the bytes autograd keeps for
the backward pass, counted as Korthikanti et al. 2022 ("Reducing activation recomputation")
count them, for this model's own tensors: SDPA keeps no T×T score matrix (flash and
memory-efficient kernels), keys and values have K heads, the feed-forward is SwiGLU or GELU,
RMSNorm computes in fp32, and the fused output layer computes its input gradient during the
forward. Per layer and token, with p bytes per value (2 for bf16/fp16, 4 for fp32):

    A = 2·(Nrm + p·D) + p·(2·H·E + 2·K·E + c·F) + 4·H        c = 4 (SwiGLU) or 2 (GELU)

(each norm's own tensors Nrm and its output, read by a linear layer; queries and attention
output, keys and values; c feed-forward intermediates; the fp32 log-sum-exp per head), where
Nrm = 4·D + p·D + 4 for RMSNorm (its fp32 input, normalised values, 1/rms) and p·D + 2·p for
LayerNorm (input, mean, 1/std); plus one byte per element of each residual dropout mask when
resid_dropout > 0. Outside the blocks, per token: the final norm's Nrm (pre-norm), the input
gradient p·D that the fused loss computes in its forward, the token id (8) and, with RoPE, the
cos/sin tables 2·E·p; and once per batch the fused loss's fp32 output-weight gradient 4·V·D.
With activation checkpointing per block only each block's input (D·p per token) is kept and
one block's activations are rebuilt at a time:

    without: tokens · (L·A + outside) + 4·V·D
    with:    tokens · (L·D·p + A + outside) + 4·V·D

where tokens = micro-batch size × sequence length. This matches the bytes autograd saves in
this implementation (tests/test_cli_tools.py measures it); the math SDPA kernel (ALiBi's float
masks, or a GPU without a fused kernel for the mask) adds a T×T matrix per head, not counted.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmforge.errors import ConfigError, LmforgeError
from lmforge.model import ModelConfig, flops_per_token, matmul_params, num_params

Offload = Literal["none", "optimizer", "params", "optimizer+params"]
# (parameter, gradient, optimizer-state) bytes per parameter
STATE_BYTES = {"bf16": (2, 2, 12), "fp16": (2, 2, 12), "fp32": (4, 4, 8)}
# Every valid (stage, offload) pair, in table order.
LAYOUTS: tuple[tuple[int, Offload], ...] = (
    (0, "none"),
    (1, "none"),
    (1, "optimizer"),
    (2, "none"),
    (2, "optimizer"),
    (3, "none"),
    (3, "optimizer"),
    (3, "params"),
    (3, "optimizer+params"),
)


@dataclass(frozen=True)
class ZeroMemory:
    """Model-state bytes one rank holds in one ZeRO layout."""

    stage: int
    offload: Offload
    gpu_bytes: float
    cpu_bytes: float


@dataclass(frozen=True)
class Estimate:
    """Size, cost and memory of training one model configuration."""

    params: int
    matmul_params: int
    flops_per_token: int
    seq_len: int
    micro_batch: int
    gpus: int
    precision: str
    zero: tuple[ZeroMemory, ...]
    activation_bytes: float
    activation_bytes_checkpointed: float

    def layout(self, stage: int, offload: Offload = "none") -> ZeroMemory:
        """The row for one ZeRO stage and offload choice."""
        for row in self.zero:
            if row.stage == stage and row.offload == offload:
                return row
        raise KeyError((stage, offload))


def zero_memory(
    params: int, gpus: int, stage: int, offload: Offload = "none", precision: str = "bf16"
) -> ZeroMemory:
    """Per-rank GPU and CPU bytes of parameters, gradients and Adam states (see module doc)."""
    if (stage, offload) not in LAYOUTS:
        raise ConfigError(
            f"ZeRO stage {stage} with offload '{offload}' does not exist: optimizer offload "
            "needs stage >= 1, parameter offload stage 3"
        )
    if gpus < 1:
        raise ConfigError(f"gpus: must be at least 1, got {gpus}")
    p, g, k = STATE_BYTES[precision]
    n = gpus
    weights = p * params / (n if stage >= 3 else 1)
    grads = g * params / (n if stage >= 2 else 1)
    optim = k * params / (n if stage >= 1 else 1)
    gpu, cpu = weights + grads + optim, 0.0
    if offload in ("optimizer", "optimizer+params"):
        gpu, cpu = gpu - optim, cpu + optim
    if offload in ("params", "optimizer+params"):
        gpu, cpu = gpu - weights, cpu + weights
    return ZeroMemory(stage, offload, gpu, cpu)


def activation_terms(cfg: ModelConfig, precision: str = "bf16") -> tuple[float, float, float]:
    """(bytes per token in one block, bytes per token outside the blocks, bytes per batch): the
    tensors autograd keeps for backward in this model (see the module doc)."""
    p = 2 if precision in ("bf16", "fp16") else 4
    d, e, h, k, f = cfg.dim, cfg.head_size, cfg.n_heads, cfg.kv_heads, cfg.hidden_dim
    c = 4 if cfg.mlp == "swiglu" else 2
    # a norm's own saved tensors, without its output (kept by the linear layer that reads it):
    # RMSNorm its fp32 input, normalised values and 1/rms; LayerNorm its input, mean and 1/std
    own = 4 * d + p * d + 4 if cfg.norm == "rmsnorm" else p * d + 2 * p
    block = 2 * (own + p * d) + p * (2 * h * e + 2 * k * e + c * f) + 4 * h
    if cfg.resid_dropout > 0:
        block += 2 * d  # one-byte masks of the two residual dropouts
    # the final norm, the input gradient the fused loss computes in forward, the token id
    outside = (own if cfg.norm_position == "pre" else 0) + p * d + 8
    if cfg.position == "rope":
        outside += 2 * e * p  # cos and sin tables, shared by the layers
    if cfg.embed_dropout > 0:
        outside += d
    return float(block), float(outside), float(4 * cfg.vocab_size * d)  # fp32 output-weight grad


def activation_memory(
    cfg: ModelConfig, tokens: int, precision: str = "bf16", *, checkpointing: bool = False
) -> float:
    """Activation bytes kept for backward for `tokens` tokens (micro-batch × sequence)."""
    block, outside, fixed = activation_terms(cfg, precision)
    p = 2 if precision in ("bf16", "fp16") else 4
    if checkpointing:
        return tokens * (cfg.n_layers * cfg.dim * p + block + outside) + fixed
    return tokens * (cfg.n_layers * block + outside) + fixed


def estimate(
    cfg: ModelConfig,
    *,
    seq_len: int,
    micro_batch: int = 1,
    gpus: int = 1,
    precision: str = "bf16",
) -> Estimate:
    """Parameters, matmul parameters, training FLOPs per token (PaLM: 6N + 12·L·H·E·T), ZeRO
    model-state memory for every stage and offload choice, and activation memory."""
    if precision not in STATE_BYTES:
        raise ConfigError(f"precision: expected bf16, fp16 or fp32, got '{precision}'")
    if seq_len < 1 or micro_batch < 1:
        raise ConfigError(f"seq_len and micro_batch must be positive, got {seq_len}, {micro_batch}")
    params = num_params(cfg)
    tokens = seq_len * micro_batch
    return Estimate(
        params=params,
        matmul_params=matmul_params(cfg),
        flops_per_token=flops_per_token(cfg, seq_len),
        seq_len=seq_len,
        micro_batch=micro_batch,
        gpus=gpus,
        precision=precision,
        zero=tuple(zero_memory(params, gpus, s, o, precision) for s, o in LAYOUTS),
        activation_bytes=activation_memory(cfg, tokens, precision),
        activation_bytes_checkpointed=activation_memory(cfg, tokens, precision, checkpointing=True),
    )


# ------------------------------------------------------------------------------- formatting


def format_bytes(n: float) -> str:
    """1.50 GiB, 12.0 MiB, 512 B."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


@dataclass(frozen=True)
class Layout:
    """What a stage config's engine section resolves to."""

    stage: int
    offload: Offload
    precision: str
    checkpointing: bool


def format_estimate(est: Estimate, *, layout: Layout | None = None) -> str:
    """A readable table of `est`; `layout` marks the configured ZeRO row and activation line."""
    state = "2+2+12" if est.precision != "fp32" else "4+4+8"
    lines = [
        f"parameters: {est.params:,} ({_count(est.params)}); matmul parameters (N of 6N): "
        f"{est.matmul_params:,}",
        f"training FLOPs per token at seq_len {est.seq_len}: {est.flops_per_token:.3e} "
        "(6N + 12·L·H·E·T)",
        f"model states per GPU, {est.gpus} GPU(s), {est.precision} Adam ({state} bytes per "
        "parameter):",
    ]
    rows = [("", "stage", "offload", "GPU", "CPU")]
    for r in est.zero:
        mark = "*" if layout and (layout.stage, layout.offload) == (r.stage, r.offload) else ""
        rows.append(
            (mark, str(r.stage), r.offload, format_bytes(r.gpu_bytes), format_bytes(r.cpu_bytes))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        pairs = enumerate(zip(row, widths, strict=True))
        cells = [c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in pairs]
        lines.append("  " + "  ".join(cells).rstrip())
    marks = ["", ""]
    if layout is not None:
        marks[layout.checkpointing] = " *"
    lines += [
        f"activations per GPU (micro-batch {est.micro_batch} × {est.seq_len} tokens):",
        f"    without activation checkpointing  {format_bytes(est.activation_bytes):>11}"
        + marks[0],
        "    with activation checkpointing     "
        f"{format_bytes(est.activation_bytes_checkpointed):>11}" + marks[1],
    ]
    if layout is not None:
        lines.append("* = this config's setting")
    return "\n".join(lines)


# --------------------------------------------------------------------- from a stage config


def stage_model(cfg: Any) -> ModelConfig:
    """The architecture a stage config trains: its `model` section, else `init_from`'s
    lmforge.json or config.json (no weights are read). ConfigError when neither is there."""
    model = getattr(cfg, "model", None)
    if isinstance(model, ModelConfig):
        return model
    source = str(getattr(cfg, "init_from", "") or "")
    if not source:
        raise ConfigError("init_from: not set, so the model is unknown")
    from lmforge.checkpoint import read_json, resolve_checkpoint
    from lmforge.hf import from_hf_config
    from lmforge.preflight import cached_hub_model, is_hub_name

    if is_hub_name(source):  # an estimate reads the local cache only: it downloads nothing
        folder = cached_hub_model(source)
        if folder is None:
            raise ConfigError(
                f"init_from: {source} is not in the local Hugging Face cache, so its size is "
                f"unknown; download it first (`hf download {source}`)"
            )
        source = str(folder)
    try:
        ckpt = resolve_checkpoint(source)
        meta_file = ckpt / "lmforge.json"
        meta = read_json(meta_file) if meta_file.exists() else {}
        if isinstance(meta.get("model"), dict):
            try:
                return ModelConfig(**meta["model"])
            except TypeError:
                pass  # an older lmforge.json: config.json still describes the architecture
        return from_hf_config(read_json(ckpt / "config.json"), str(ckpt / "config.json"))
    except LmforgeError as e:
        raise ConfigError(f"init_from: {e}") from None


def stage_seq_len(cfg: Any, model: ModelConfig) -> int:
    """Tokens per training row: the config's data.seq_len, else the model's context length."""
    data = getattr(cfg, "data", None)
    seq = getattr(data, "seq_len", None)
    return int(seq) if isinstance(seq, int) else model.max_seq_len


def planned_batch(cfg: Any, world: int = 1) -> tuple[int, int]:
    """(micro-batch, accumulation) a stage config runs with on `world` processes: its batch
    plan's (which may lower train.micro_batch_size so it divides each process's share), else the
    configured micro-batch."""
    train = cfg.train
    plan_of = getattr(cfg, "batch_plan", None)
    if callable(plan_of):
        try:
            plan = plan_of(world)
            return int(plan.micro), int(plan.accum)
        except LmforgeError:
            pass  # an impossible split: the dry run lists it; estimate the configured sizes
    return train.micro_batch_size, max(
        1, train.global_batch_size // (train.micro_batch_size * world)
    )


def configured_layout(cfg: Any, world: int = 1) -> Layout | None:
    """The ZeRO stage, offload, precision and activation checkpointing that a stage config's
    engine section resolves to (its DeepSpeed JSON included), or None without one. Precision
    auto counts as bf16: what it means on a GPU."""
    engine = getattr(cfg, "engine", None)
    if engine is None:
        return None
    from lmforge.engine import load_deepspeed_json, resolve_deepspeed_config

    micro, accum = planned_batch(cfg, world)
    ds = resolve_deepspeed_config(
        load_deepspeed_json(engine.deepspeed),
        cfg=engine,
        optim=cfg.optim,
        micro_batch=micro,
        grad_accum=accum,
        world=world,
    )
    zero = ds["zero_optimization"]
    opt, par = "offload_optimizer" in zero, "offload_param" in zero
    offload: Offload = (
        "optimizer+params" if opt and par else "optimizer" if opt else "params" if par else "none"
    )
    precision = "bf16" if engine.precision == "auto" else engine.precision
    checkpointing = bool(getattr(engine, "activation_checkpointing", False))
    return Layout(int(zero["stage"]), offload, precision, checkpointing)


def _resumed_model(cfg: Any) -> ModelConfig | None:
    """The architecture of run_dir's latest checkpoint (a run that resumes reads no init_from),
    or None."""
    run_dir = getattr(cfg, "run_dir", "")
    if not run_dir or not (Path(run_dir) / "latest").is_file():
        return None
    try:
        return stage_model(dataclasses.replace(cfg, init_from=str(run_dir)))
    except (LmforgeError, TypeError):
        return None


def dry_run_report(cfg: Any, gpus: int | None = None) -> str:
    """The lines --dry-run prints after the config, each starting with '# ' so the output stays
    valid YAML: parameter count, FLOPs and the memory estimate, or why they are unknown. `gpus`
    defaults to the launcher's WORLD_SIZE (1 without a launcher)."""
    try:
        model = stage_model(cfg)
    except LmforgeError as e:
        model = _resumed_model(cfg)
        if model is None:
            return f"# parameters: unknown ({e})"
    world = gpus or max(1, int(os.environ.get("WORLD_SIZE", "1")))
    layout = configured_layout(cfg, world)
    micro = planned_batch(cfg, world)[0] if hasattr(cfg, "train") else 1
    est = estimate(
        model,
        seq_len=stage_seq_len(cfg, model),
        micro_batch=micro,
        gpus=world,
        precision=layout.precision if layout else "bf16",
    )
    text = format_estimate(est, layout=layout)
    return "\n".join("# " + line for line in text.splitlines())
