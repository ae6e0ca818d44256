"""Training throughput: lmforge's training path against transformers' Llama, same process.

lmforge: the GPT through `lmforge.engine.build_engine` (DeepSpeed, the configured ZeRO stage,
bf16 with fp32 master weights on a GPU, fp32 on CPU, the fused chunked loss). Baseline:
`transformers.LlamaForCausalLM` of the same shape holding the same weights, through
`deepspeed.initialize` with the same DeepSpeed config, AdamW groups and schedule. Both train on
the same random-token batches; the first step's losses must agree before any speed means
anything. Tokens/s is the median over measured steps (warm-up excluded, the device
synchronised before each timer read); MFU uses PaLM's FLOPs per token, 6·N + 12·L·d·T, against
the matmul peak measured in this run and, on a known GPU, its datasheet peak.

    python bench/train.py [--model tiny] [--seq-len 256] [--micro-batch 8] [--zero 2]
                          [--steps 10] [--compile] [--offload] [--order interleaved]

A benchmark, not a test: it fails only when the two first-step losses disagree.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import common
import profiling
import torch


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by the training and generation benchmarks."""
    parser.add_argument("--model", default=None, help="preset in configs/model/ (tiny on CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both sides")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads; 0 = torch's default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="results JSON (bench/results/DEVICE-PRESET)")
    parser.add_argument(
        "--peak-size", type=int, default=0, help="matmul size of the peak (8192 GPU, 2048 CPU)"
    )
    parser.add_argument(
        "--order",
        choices=("interleaved", "sequential"),
        default=None,
        help="interleaved: alternate one step (or run) each, the default on CPU where the load "
        "drifts; sequential: one side after the other, lmforge first, the default on GPUs",
    )


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """Options of the training benchmark."""
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (256 / 1024)")
    parser.add_argument("--micro-batch", type=int, default=8, help="rows per step")
    parser.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3), help="ZeRO stage")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (10 CPU, 20 GPU)")
    parser.add_argument("--warmup", type=int, default=3, help="steps run before timing")
    parser.add_argument("--offload", action="store_true", help="optimizer state in CPU memory")
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="lmforge only (a preset whose check is its memory and finite losses, not a ratio)",
    )
    parser.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="after timing, this many lmforge steps under torch.profiler (where the time goes)",
    )
    parser.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute each block in backward, both sides (transformers' gradient checkpointing)",
    )


@dataclass
class Side:
    """One side of the comparison: its step function and how to free it."""

    name: str
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids, labels) -> loss
    close: Callable[[], None]


def _settings(args: argparse.Namespace, steps: int) -> tuple[Any, Any]:
    from lmforge.engine import EngineConfig
    from lmforge.optim import OptimConfig

    engine = EngineConfig(
        zero_stage=args.zero,
        offload_optimizer=args.offload,
        compile=args.compile,
        activation_checkpointing=args.activation_checkpointing,
    )
    return engine, OptimConfig()


def build_lmforge(args: argparse.Namespace, cfg: Any, device: torch.device, steps: int) -> Side:
    """The GPT in lmforge's engine (the real training path)."""
    from lmforge.distributed import DistInfo
    from lmforge.engine import build_engine
    from lmforge.model import build_model

    engine_cfg, optim = _settings(args, steps)
    model = build_model(cfg, device=device, seed=args.seed)
    engine = build_engine(
        model,
        engine_cfg,
        optim,
        micro_batch=args.micro_batch,
        grad_accum=1,
        total_steps=steps,
        info=DistInfo(),
    )
    engine.train(True)

    def step(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = engine(input_ids=ids, labels=labels)
        engine.backward(loss)
        engine.step()
        return loss.detach()

    def close() -> None:
        engine.ds.destroy()

    return Side("lmforge", step, close)


def build_baseline(args: argparse.Namespace, cfg: Any, device: torch.device, steps: int) -> Side:
    """transformers' LlamaForCausalLM with the GPT's weights, through deepspeed.initialize with
    what lmforge's engine gives it: the same DeepSpeed dict, AdamW groups and schedule."""
    import deepspeed

    from lmforge.engine import load_deepspeed_json, resolve_deepspeed_config
    from lmforge.model import build_model
    from lmforge.optim import build_scheduler, param_groups

    engine_cfg, optim = _settings(args, steps)
    twin = common.llama_twin(build_model(cfg, device=device, seed=args.seed))
    if args.activation_checkpointing:
        twin.gradient_checkpointing_enable()
    common.free_memory(device)
    ds_cfg = resolve_deepspeed_config(
        load_deepspeed_json(engine_cfg.deepspeed),
        cfg=engine_cfg,
        optim=optim,
        micro_batch=args.micro_batch,
        grad_accum=1,
        world=1,
    )
    groups = param_groups(twin, optim.weight_decay)
    if "offload_optimizer" in ds_cfg["zero_optimization"]:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer: torch.optim.Optimizer = DeepSpeedCPUAdam(
            groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, adamw_mode=True
        )
    else:
        optimizer = torch.optim.AdamW(
            groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, fused=torch.cuda.is_available()
        )
    scheduler = build_scheduler(optimizer, optim, steps)
    with common.fp32_buffers(twin):  # older DeepSpeed casts buffers (RoPE) to bf16
        ds, _, _, _ = deepspeed.initialize(
            model=twin, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg
        )
    if args.compile:
        ds.compile()
    ds.train(True)

    def step(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # shift_labels: labels are already aligned with positions, as lmforge's are
        loss = ds(input_ids=ids, labels=labels, shift_labels=labels).loss
        ds.backward(loss)
        ds.step()
        return loss.detach()

    return Side("baseline", step, ds.destroy)


def _batches(
    vocab: int, batch: int, seq: int, count: int, seed: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen)  # (B, T+1)
        out.append((tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)))
    return out


def _timed(
    side: Side, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device, losses: list
) -> float:
    """Seconds of one step, the device synchronised around it; its loss appended to `losses`."""
    common.synchronize(device)
    start = time.perf_counter()
    losses.append(side.step(*batch))
    common.synchronize(device)
    return time.perf_counter() - start


def _losses(losses: list[torch.Tensor]) -> dict[str, Any]:
    """The first and last loss of a side's steps, and whether every one was finite."""
    values = [float(x) for x in losses]
    finite = all(math.isfinite(v) for v in values)
    return {"first_loss": values[0], "last_loss": values[-1], "losses_finite": finite}


def _measure(
    builders: list[Callable[[], Side]],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    warmup: int,
    steps: int,
    device: torch.device,
    interleaved: bool,
    profile: int = 0,
    on_side: Callable[[dict[str, dict[str, Any]]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per side: first and last loss (and whether all were finite), measured step times, peak
    memory; for lmforge, with `profile`, that many more steps under the profiler. Interleaved
    runs one step of each side in turn (alternating which goes first), so both see the same
    machine load; otherwise one side after the other, `on_side` called after each."""
    out: dict[str, dict[str, Any]] = {}

    def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return batches[i % len(batches)]

    def profiled(side: Side) -> None:  # after the timed steps, before the side is freed
        if profile and side.name == "lmforge":
            first = warmup + steps
            run = profiling.profile_steps(lambda i: side.step(*batch(first + i)), profile, device)
            out[side.name]["profile"] = run

    if interleaved:
        sides = [build() for build in builders]
        losses: dict[str, list[torch.Tensor]] = {s.name: [] for s in sides}
        for i in range(warmup):
            for s in sides:
                losses[s.name].append(s.step(*batch(i)))
        times: dict[str, list[float]] = {s.name: [] for s in sides}
        for r in range(steps):
            for s in sides if r % 2 == 0 else sides[::-1]:
                times[s.name].append(_timed(s, batch(warmup + r), device, losses[s.name]))
        for s in sides:
            out[s.name] = {**_losses(losses[s.name]), "times": times[s.name]}
            out[s.name]["peak_memory_bytes"] = common.peak_memory(device)
            profiled(s)
            s.close()
        return out
    for build in builders:
        common.reset_peak_memory(device)
        side = build()
        seen = [side.step(*batch(i)) for i in range(warmup)]  # read after: no sync per step
        times_one = [_timed(side, batch(warmup + r), device, seen) for r in range(steps)]
        out[side.name] = {**_losses(seen), "times": times_one}
        out[side.name]["peak_memory_bytes"] = common.peak_memory(device)
        profiled(side)
        side.close()
        del side
        common.free_memory(device)
        if on_side is not None:
            on_side(out)
    return out


def run(
    args: argparse.Namespace,
    *,
    show: bool = True,
    save: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Measure both sides; print their table (with `show`); return the results record. One
    side after the other (on a GPU), `save` gets the record of the sides measured so far after
    each, lmforge's first: a run stopped in the baseline's compile still leaves lmforge's."""
    common.setup()
    from lmforge.distributed import DistInfo
    from lmforge.engine import init_distributed

    device = common.bench_device()
    common.set_threads(device, args.threads)
    cfg = common.model_config(args.model or common.default_preset(device))
    if args.zero == 0 and args.offload:
        raise SystemExit("--offload needs --zero 1, 2 or 3")
    init_distributed(DistInfo())
    record = _header(args, cfg, device)
    shape = record["shape"]
    warmup, steps = shape["warmup_steps"], shape["measured_steps"]
    torch.manual_seed(args.seed)
    batches = _batches(cfg.vocab_size, args.micro_batch, shape["seq_len"], 4, args.seed, device)
    total = warmup + steps + args.profile_steps
    builders = [lambda: build_lmforge(args, cfg, device, total)]
    if not args.no_baseline:
        builders.append(lambda: build_baseline(args, cfg, device, total))
    interleaved = shape["order"] == "interleaved"

    def partial(sides: dict[str, dict[str, Any]]) -> None:
        if save is not None and not interleaved:
            save(_filled(record, sides, record["peak_flops"]["measured"]) | {"partial": True})

    sides = _measure(
        builders, batches, warmup, steps, device, interleaved, args.profile_steps, partial
    )
    # The peak is measured before and after the steps and the higher kept: on a shared machine
    # one reading can land in a busy moment (MFU on CPU is indicative only).
    peak = max(record["peak_flops"]["measured"], common.matmul_peak(device, args.peak_size)[0])
    record = _filled(record, sides, peak)
    if show:
        print_table(record)
    if save is not None:
        save(record)
    return record


def _header(args: argparse.Namespace, cfg: Any, device: torch.device) -> dict[str, Any]:
    """The record before any step: the shape of the run, the device, the matmul peak."""
    from lmforge.engine import resolve_precision
    from lmforge.model import flops_per_token, matmul_params, num_params

    seq = args.seq_len or min(cfg.max_seq_len, 1024 if device.type == "cuda" else 256)
    order = args.order or ("sequential" if device.type == "cuda" else "interleaved")
    peak, peak_label = common.matmul_peak(device, args.peak_size)
    record: dict[str, Any] = {
        "shape": {
            "preset": args.model or common.default_preset(device),
            "seq_len": seq,
            "micro_batch": args.micro_batch,
            "grad_accum": 1,
            "processes": 1,
            "zero_stage": args.zero,
            "offload_optimizer": args.offload,
            "activation_checkpointing": args.activation_checkpointing,
            "precision": resolve_precision("auto"),
            "compile": args.compile,
            "order": order,
            "warmup_steps": max(1, args.warmup),
            "measured_steps": args.steps or (20 if device.type == "cuda" else 10),
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "parameters": num_params(cfg),
            "matmul_parameters": matmul_params(cfg),
            "flops_per_token": flops_per_token(cfg, seq),
            "tokens_per_step": args.micro_batch * seq,
        },
        "device": common.device_label(device),
        "peak_flops": {"measured": peak, "measured_label": peak_label},
    }
    sheet = common.datasheet_peak(device)
    if sheet:
        record["peak_flops"].update(datasheet=sheet[0], datasheet_label=sheet[1])
    return record


def _filled(record: dict[str, Any], sides: dict[str, dict[str, Any]], peak: float) -> dict:
    """A copy of `record` with each measured side's figures against `peak`, and the checks:
    the ratio and the first-loss check with both sides, finite losses with lmforge alone."""
    shape, sheet = record["shape"], record["peak_flops"].get("datasheet")
    fpt, tokens = shape["flops_per_token"], shape["tokens_per_step"]
    out = {**record, "peak_flops": {**record["peak_flops"], "measured": peak}}
    for name in ("baseline", "lmforge"):
        if name not in sides:
            continue
        data = sides[name]
        stats = common.summary(data["times"])
        rate = tokens / stats["median_s"]
        entry = {**stats, "tokens_per_s": rate, "mfu_measured": rate * fpt / peak}
        entry.update({k: data[k] for k in ("first_loss", "last_loss", "losses_finite")})
        entry["peak_memory_bytes"] = data["peak_memory_bytes"]
        if sheet:
            entry["mfu_datasheet"] = rate * fpt / sheet
        if "profile" in data:
            entry["profile"] = data["profile"]
        out[name] = entry
    if "baseline" in out:
        compare(out, shape["order"] == "interleaved", shape["precision"])
    else:
        out["loss_check"] = finite_check(out["lmforge"])
    return out


def compare(record: dict[str, Any], interleaved: bool, precision: str) -> None:
    """The ratio of the two sides (per round when interleaved) and their first-loss check."""
    base, ours = record["baseline"], record["lmforge"]
    record["ratio"] = ours["tokens_per_s"] / base["tokens_per_s"]
    if interleaved:  # same-round ratios: the spread the machine's load leaves on the ratio
        rounds = [b / o for b, o in zip(base["all_s"], ours["all_s"], strict=True)]
        record["ratio_per_round"] = {
            "median": statistics.median(rounds),
            "min": min(rounds),
            "max": max(rounds),
        }
    record["loss_check"] = loss_check(ours["first_loss"], base["first_loss"], precision)


def finite_check(ours: dict[str, Any]) -> dict[str, Any]:
    """Without a baseline the check is that every loss of lmforge's steps was finite."""
    return {"lmforge": ours["first_loss"], "baseline": None, "passed": ours["losses_finite"]}


def loss_check(ours: float, base: float, precision: str) -> dict[str, Any]:
    """First-step losses (same weights, same batch) must agree: relative 1e-5 in fp32, 1e-2 in
    bf16/fp16 (different kernels round differently)."""
    rel = 1e-5 if precision == "fp32" else 1e-2
    tolerance = rel * max(1.0, abs(base))
    diff = abs(ours - base)
    return {
        "lmforge": ours,
        "baseline": base,
        "abs_diff": diff,
        "tolerance": tolerance,
        "passed": diff <= tolerance,
    }


def print_table(r: dict[str, Any]) -> None:
    """The training table: one row per side, then the ratio and the loss check."""
    s = r["shape"]
    how = "compiled" if s["compile"] else "eager"
    threads = f", {s['threads']} thread(s)" if s["threads"] else ""
    print(
        f"\ntrain: {s['preset']} ({s['parameters'] / 1e6:.1f}M params), seq {s['seq_len']} x "
        f"micro-batch {s['micro_batch']}, ZeRO-{s['zero_stage']}"
        f"{' + optimizer offload' if s['offload_optimizer'] else ''}"
        f"{' + activation checkpointing' if s.get('activation_checkpointing') else ''}, "
        f"{s['precision']}, {how}, "
        f"{r['device']}{threads}, "
        f"{s['measured_steps']} measured steps ({s['order']})"
    )
    sheet = "datasheet_label" in r["peak_flops"]
    header = f"{'':<22}{'step (median)':>14}{'tokens/s':>12}{'MFU meas.':>11}"
    memory = r["lmforge"]["peak_memory_bytes"] is not None
    header += (f"{'MFU sheet':>11}" if sheet else "") + f"{'first loss':>13}{'last loss':>12}"
    print(header + (f"{'peak memory':>14}" if memory else ""))
    for name, label in (("baseline", "baseline (HF Llama)"), ("lmforge", "lmforge")):
        if name not in r:
            continue
        e = r[name]
        line = f"{label:<22}{e['median_s'] * 1e3:>11.1f} ms{e['tokens_per_s']:>12,.0f}"
        line += f"{e['mfu_measured']:>10.1%} " + (f"{e['mfu_datasheet']:>10.1%} " if sheet else "")
        line += f"{e['first_loss']:>13.6f}{e['last_loss']:>12.6f}"
        print(line + (f"{e['peak_memory_bytes'] / 2**30:>10.2f} GiB" if memory else ""))
        if not e["losses_finite"]:
            print(f"{label}: a loss was not finite")
    spread = r.get("ratio_per_round")
    extra = f" (per-round {spread['min']:.2f}-{spread['max']:.2f})" if spread else ""
    if "ratio" in r:
        print(f"ratio lmforge / baseline: {r['ratio']:.2f}x{extra}")
    p = r["peak_flops"]
    print(f"MFU against {p['measured']:.3g} FLOP/s ({p['measured_label']})", end="")
    print(f" and {p['datasheet']:.3g} FLOP/s ({p['datasheet_label']})" if sheet else "")
    if "profile" in r["lmforge"]:
        print("lmforge " + profiling.describe(r["lmforge"]["profile"]))
    c = r["loss_check"]
    if c["baseline"] is None:
        print(f"no baseline: every loss finite: {'yes' if c['passed'] else 'NO'}")
        return
    verdict = "ok" if c["passed"] else "MISMATCH"
    print(
        f"first-step loss: lmforge {c['lmforge']:.6f}, baseline {c['baseline']:.6f}, "
        f"|diff| {c['abs_diff']:.2e} (tolerance {c['tolerance']:.1e}): {verdict}"
    )


def main() -> None:
    """Parse options, run, store the record under "train" in the results file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    add_train_args(parser)
    args = parser.parse_args()
    device = common.bench_device()
    preset = args.model or common.default_preset(device)
    path = common.Path(args.out or common.results_path(device, preset))
    record = run(args, save=lambda r: common.write_section(path, "train", r))
    print(f"results: {common.shown(path)}")
    sys.exit(0 if record["loss_check"]["passed"] else 1)


if __name__ == "__main__":
    main()
