"""Rollout throughput: lmforge's KV-cached generator against transformers' `generate`.

Both models hold the same weights (the Llama twin of an lmforge GPT), bf16 on a GPU and fp32 on
CPU. Each side samples (temperature 1, no top-k / top-p) exactly `--new-tokens` tokens for
`--batch` prompts of `--prompt-len` random tokens (transformers gets `min_new_tokens`, so its
EOS cannot end a row early). New tokens/s is the median over `--repeats` timed runs after one
warm-up run, the device synchronised before each timer read. A greedy check first: both sides
decode a few left-padded prompts greedily in fp32, and the share of equal tokens is printed.

    python bench/generate.py [--model tiny] [--batch 8] [--prompt-len 32] [--new-tokens 64]

Defaults: batch 64, prompt 64, 256 new tokens on a GPU; batch 8, prompt 32, 64 on CPU.

`--draft` runs the speculative decoding benchmark instead (bench/spec.py): a model pair built
once on the embedded corpus, greedy decoding plain and drafted (a draft model, n-gram lookup)
against transformers' plain and assisted generation, and GRPO's step time with and without a
drafter; results under "speculative" in bench/results/DEVICE-spec-pair.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import common
import spec
import torch
from train import add_common_args


def add_generate_args(parser: argparse.ArgumentParser) -> None:
    """Options of the generation benchmark."""
    parser.add_argument("--batch", type=int, default=None, help="prompts per batch (64 / 8)")
    parser.add_argument("--prompt-len", type=int, default=None, help="tokens per prompt (64 / 32)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated (256 / 64)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs per side (5; 3 with --draft)"
    )
    parser.add_argument("--greedy-prompts", type=int, default=4, help="prompts of the greedy check")
    parser.add_argument("--greedy-tokens", type=int, default=32, help="tokens per greedy prompt")


def _lmforge(
    model: Any, prompts: list[list[int]], new: int, *, sample: bool, compile: bool
) -> torch.Tensor:
    from lmforge.generate import GenerateConfig, generate

    temperature = 1.0 if sample else 0.0
    cfg = GenerateConfig(max_new_tokens=new, temperature=temperature, top_k=0, compile=compile)
    return generate(model, prompts, cfg).tokens  # (B, N)


def _hf(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, new: int, *, sample: bool, compile: bool
) -> torch.Tensor:
    extra: dict[str, Any] = {"temperature": 1.0, "top_k": 0, "top_p": 1.0} if sample else {}
    if compile:  # transformers' own fast path: static cache, forward compiled by generate
        from transformers import CompileConfig

        cuda = ids.device.type == "cuda"
        extra["cache_implementation"] = "static"
        extra["compile_config"] = CompileConfig(mode="reduce-overhead" if cuda else "default")
        extra["compile_config"]._compile_all_devices = not cuda  # it compiles on GPUs only
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=sample,
            max_new_tokens=new,
            min_new_tokens=new,  # its EOS is masked until the last token: exactly `new` tokens
            pad_token_id=0,
            **extra,
        )
    return out[:, ids.shape[1] :]  # (B, N)


def _timed(fn: Any, device: torch.device) -> float:
    common.synchronize(device)
    start = time.perf_counter()
    fn()
    common.synchronize(device)
    return time.perf_counter() - start


def greedy_check(ours: Any, twin: Any, args: argparse.Namespace, device: torch.device) -> dict:
    """Greedy tokens of both sides (fp32) for a few left-padded prompts of different lengths:
    the share of sequences and of tokens (up to each row's first difference) that are equal."""
    from lmforge.generate import left_pad

    n, p, new = args.greedy_prompts, args.prompt_len, args.greedy_tokens
    gen = torch.Generator().manual_seed(args.seed + 1)
    vocab = ours.cfg.vocab_size
    lengths = [max(1, p - (3 * i) % max(1, p)) for i in range(n)]
    prompts = [torch.randint(8, vocab, (k,), generator=gen).tolist() for k in lengths]
    ours.float()
    twin.float()
    ids, mask = left_pad(prompts, pad_id=0)  # (B, P) each
    a = _lmforge(ours, prompts, new, sample=False, compile=False).cpu()
    b = _hf(twin, ids.to(device), mask.to(device), new, sample=False, compile=False).cpu()
    agree = 0
    for row_a, row_b in zip(a.tolist(), b.tolist(), strict=True):
        same = next((i for i, (x, y) in enumerate(zip(row_a, row_b, strict=True)) if x != y), new)
        agree += same
    equal = int((a == b).all(dim=1).sum())
    return {
        "prompts": n,
        "prompt_lengths": lengths,
        "new_tokens": new,
        "dtype": "fp32",
        "sequences_equal": equal,
        "share_sequences_equal": equal / n,
        "share_tokens_equal": agree / (n * new),
        "passed": equal == n,
    }


def run(
    args: argparse.Namespace,
    *,
    show: bool = True,
    save: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Measure both generators; print their table (with `show`); return the results record.
    One side after the other (the default on a GPU), lmforge first, and `save` gets its record
    before the baseline starts (a run stopped in transformers' compile still leaves lmforge's
    figure); on a CPU the sides alternate run by run, as the load drifts."""
    common.setup()
    from lmforge.model import build_model

    device = common.bench_device()
    common.set_threads(device, args.threads)
    gpu = device.type == "cuda"
    cfg = common.model_config(args.model or common.default_preset(device))
    batch = args.batch or (64 if gpu else 8)
    args.prompt_len = args.prompt_len or (64 if gpu else 32)
    new = args.new_tokens or (256 if gpu else 64)
    args.repeats = args.repeats or 5
    if args.prompt_len + new > cfg.max_seq_len:
        raise SystemExit(
            f"prompt {args.prompt_len} + {new} new tokens exceed max_seq_len {cfg.max_seq_len}"
        )
    dtype = torch.bfloat16 if gpu else torch.float32
    ours = build_model(cfg, device=device, seed=args.seed).eval()
    twin = common.llama_twin(ours).eval()
    greedy = greedy_check(ours, twin, args, device)  # fp32, before the timed dtype
    ours.to(dtype)
    with common.fp32_buffers(twin):
        twin.to(dtype)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(8, cfg.vocab_size, (batch, args.prompt_len), generator=gen)  # (B, P)
    prompts = ids.tolist()
    ids = ids.to(device)
    mask = torch.ones_like(ids)
    runs = {
        "lmforge": lambda: _lmforge(ours, prompts, new, sample=True, compile=args.compile),
        "baseline": lambda: _hf(twin, ids, mask, new, sample=True, compile=args.compile),
    }
    header = _header(args, cfg, batch, new, dtype, device) | {"greedy_check": greedy}

    def saved(times: dict[str, list[float]], final: bool) -> dict[str, Any]:
        record = _filled(header, times)
        if save is not None:
            save(record if final else record | {"partial": True})
        return record

    sequential = header["shape"]["order"] == "sequential"
    times = _time_sides(
        runs, (batch, new), args.repeats, device, sequential, lambda t: saved(t, False)
    )
    record = saved(times, True)
    if show:
        print_table(record)
    return record


def _time_sides(
    runs: dict[str, Callable[[], torch.Tensor]],
    shape: tuple[int, int],
    repeats: int,
    device: torch.device,
    sequential: bool,
    after_side: Callable[[dict[str, list[float]]], object],
) -> dict[str, list[float]]:
    """Each side's timed runs after one checked warm-up run: side after side (after_side called
    after each), or alternating run by run so both see the same load."""
    times: dict[str, list[float]] = {name: [] for name in runs}

    def warm(name: str) -> None:
        got = tuple(runs[name]().shape)
        if got != shape:
            raise RuntimeError(f"{name} generated {got}, expected {shape}")

    if sequential:
        for name, fn in runs.items():
            warm(name)
            times[name] = [_timed(fn, device) for _ in range(repeats)]
            after_side({k: v for k, v in times.items() if v})
        return times
    for name in runs:
        warm(name)
    for r in range(repeats):  # alternate which goes first, so both see the same load
        for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            times[name].append(_timed(runs[name], device))
    return times


def _header(
    args: argparse.Namespace, cfg: Any, batch: int, new: int, dtype: torch.dtype, device: Any
) -> dict[str, Any]:
    """The record before any run: the shape and the device."""
    from lmforge.model import num_params

    return {
        "shape": {
            "preset": args.model or common.default_preset(device),
            "parameters": num_params(cfg),
            "batch": batch,
            "prompt_len": args.prompt_len,
            "new_tokens": new,
            "sampling": "temperature 1, top-k 0, top-p 1",
            "dtype": str(dtype).removeprefix("torch."),
            "compile": args.compile,
            "repeats": args.repeats,
            "order": args.order or ("sequential" if device.type == "cuda" else "interleaved"),
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
        },
        "device": common.device_label(device),
    }


def _filled(header: dict[str, Any], times: dict[str, list[float]]) -> dict[str, Any]:
    """The record with each timed side's rate, and the ratio when both are in."""
    shape = header["shape"]
    record = dict(header)
    for name in ("baseline", "lmforge"):
        if times.get(name):
            stats = common.summary(times[name])
            rate = shape["batch"] * shape["new_tokens"] / stats["median_s"]
            record[name] = {**stats, "new_tokens_per_s": rate}
    if "baseline" in record and "lmforge" in record:
        ours, base = record["lmforge"], record["baseline"]
        record["ratio"] = ours["new_tokens_per_s"] / base["new_tokens_per_s"]
        rounds = [b / o for b, o in zip(times["baseline"], times["lmforge"], strict=True)]
        record["ratio_per_round"] = {
            "median": statistics.median(rounds),
            "min": min(rounds),
            "max": max(rounds),
        }
    return record


def print_table(r: dict[str, Any]) -> None:
    """The generation table: one row per side, then the ratio and the greedy check."""
    s = r["shape"]
    threads = f", {s['threads']} thread(s)" if s["threads"] else ""
    print(
        f"\ngenerate: {s['preset']}, batch {s['batch']}, prompt {s['prompt_len']}, "
        f"{s['new_tokens']} new tokens, sampling, {s['dtype']}, "
        f"{'compiled' if s['compile'] else 'eager'}, {r['device']}{threads}"
    )
    print(f"{'':<22}{'run (median)':>14}{'new tokens/s':>14}")
    for name, label in (("baseline", "baseline (HF generate)"), ("lmforge", "lmforge")):
        e = r[name]
        print(f"{label:<22}{e['median_s'] * 1e3:>11.1f} ms{e['new_tokens_per_s']:>14,.0f}")
    p = r["ratio_per_round"]
    print(f"ratio lmforge / baseline: {r['ratio']:.2f}x (per-round {p['min']:.2f}-{p['max']:.2f})")
    g = r["greedy_check"]
    print(
        f"greedy check ({g['dtype']}): {g['sequences_equal']}/{g['prompts']} sequences equal, "
        f"{g['share_tokens_equal']:.1%} of tokens: {'ok' if g['passed'] else 'MISMATCH'}"
    )


def main() -> None:
    """Parse options, run, store the record under "generate" in the results file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    add_generate_args(parser)
    spec.add_spec_args(parser)
    args = parser.parse_args()
    if args.draft:
        _speculative(args)
        return
    device = common.bench_device()
    preset = args.model or common.default_preset(device)
    path = common.Path(args.out or common.results_path(device, preset))
    record = run(args, save=lambda r: common.write_section(path, "generate", r))
    print(f"results: {common.shown(path)}")
    sys.exit(0 if record["greedy_check"]["passed"] else 1)


def _speculative(args: argparse.Namespace) -> None:
    """The --draft benchmark: run it, store its record under "speculative", exit by its checks."""
    args.repeats = args.repeats or 3  # five sides over every prompt per pass
    record = spec.run(args)
    path = args.out or common.results_path(common.bench_device(), "spec-pair")
    common.write_section(common.Path(path), "speculative", record)
    print(f"results: {common.shown(common.Path(path))}")
    sys.exit(0 if record["checks"]["passed"] else 1)


if __name__ == "__main__":
    main()
