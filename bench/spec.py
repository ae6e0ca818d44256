"""Speculative decoding benchmark (`bench/generate.py --draft`): a large model and a drafter more
than 20x smaller, both pretrained on the embedded corpus with one tokenizer, decode the same
prompts greedily at batch 1 four ways: lmforge plain, lmforge with the model drafter (and with
the n-gram drafter), transformers' `generate` plain and with `assistant_model` (the Llama twins
of the same two models). Then GRPO's rollout step time with and without a drafter.

The pair is built once into a cache folder by `pretrain/train.py` (the demo's settings, shorter
rows and fewer steps) and reused; how it was built and how long that took is stored beside it
and printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import torch

REPO = common.BENCH_DIR.parent
DEFAULT_CACHE = REPO / ".cache" / "bench-spec"
VOCAB = 2048
# The two models: the drafter is one narrow layer, the large model six wider ones (27x the
# drafter's parameters). Depth matters as much as width for a CPU decode step, which is mostly
# per-layer overhead at these sizes: the drafter costs a small share of a large-model forward.
DRAFT_MODEL = {"dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2}
LARGE_MODEL = {"dim": 256, "n_layers": 6, "n_heads": 4, "n_kv_heads": 2}
# Pretraining steps of each (global batch 16 rows of 128 tokens, the demo's optimizer).
DRAFT_STEPS, LARGE_STEPS = 200, 100
# A smoke build: a few steps each, seconds long (tests).
SMOKE_STEPS = 3


def _stage_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu" if not torch.cuda.is_available() else env.get("DS_ACCELERATOR", ""),
        OMP_NUM_THREADS=str(max(threads, 1)),
        PYTHONPATH=str(REPO),
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="disabled",
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if not env["DS_ACCELERATOR"]:
        env.pop("DS_ACCELERATOR")
    return env


def _pretrain_args(run: Path, data_cache: Path, shape: dict[str, int], steps: int) -> list[str]:
    """Overrides of configs/pretrain/demo.yaml for one model of the pair."""
    args = [
        "--config",
        str(REPO / "configs" / "pretrain" / "demo.yaml"),
        "--model=tiny",
        f"--model.vocab_size={VOCAB}",
        "--model.max_seq_len=256",
        *(f"--model.{k}={v}" for k, v in shape.items()),
        f"--tokenizer.vocab_size={VOCAB}",
        "--data.seq_len=128",
        f"--data.cache_dir={data_cache}",
        f"--train.steps={steps}",
        f"--optim.warmup_steps={max(1, min(30, steps // 5))}",
        "--train.eval_every=0",
        f"--train.save_every={steps}",
        "--train.samples=0",
        "--tracking.log_every=50",
        f"--run_dir={run}",
    ]
    return args


def _start(name: str, args: list[str], cache: Path, threads: int) -> subprocess.Popen[bytes]:
    """Start pretrain/train.py with `args`, its output in cache/name.log."""
    with open(cache / f"{name}.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, str(REPO / "pretrain" / "train.py"), *args],
            env=_stage_env(threads),
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _finish(name: str, proc: subprocess.Popen[bytes], cache: Path) -> None:
    """Wait for one pretraining run; a failure stops the benchmark with its log's tail."""
    if proc.wait() != 0:
        tail = (cache / f"{name}.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"building the model pair ({name}) failed:\n{tail}")


def _tokenizer(data_cache: Path, proc: subprocess.Popen[bytes]) -> Path:
    """The tokenizer the drafter's run trains into its data cache, once it is there."""
    while True:
        found = sorted((data_cache / "tokenizers").glob("*/tokenizer.json"))
        if found:
            time.sleep(2)  # its other files are written right after
            return found[0].parent
        if proc.poll() is not None:
            raise SystemExit("building the model pair: the drafter's run trained no tokenizer")
        time.sleep(1)


def build_pair(cache: Path, *, smoke: bool, threads: int) -> dict[str, Any]:
    """The drafter and the large model under `cache` (draft/, large/), pretrained now unless a
    finished build is there; returns how they were built and how long that took (build.json)."""
    record_path = cache / "build.json"
    if record_path.exists() and all((cache / n / "latest").exists() for n in ("draft", "large")):
        return {**json.loads(record_path.read_text()), "reused": True}
    cache.mkdir(parents=True, exist_ok=True)
    data = cache / "data"
    steps = {"draft": DRAFT_STEPS, "large": LARGE_STEPS}
    if smoke:
        steps = {"draft": SMOKE_STEPS, "large": SMOKE_STEPS}
    # The drafter's run trains the tokenizer; the large model's run starts as soon as it is
    # there and reuses it (tokenizer.path), so the two share every token id and train at once.
    t0 = time.perf_counter()
    draft = _start(
        "draft", _pretrain_args(cache / "draft", data, DRAFT_MODEL, steps["draft"]), cache, threads
    )
    tokenizer = _tokenizer(data, draft)
    large_args = _pretrain_args(cache / "large", data, LARGE_MODEL, steps["large"])
    large = _start("large", [*large_args, f"--tokenizer.path={tokenizer}"], cache, threads)
    _finish("draft", draft, cache)
    draft_s = time.perf_counter() - t0
    _finish("large", large, cache)
    total = time.perf_counter() - t0
    record = {
        "how": (
            "pretrain/train.py --config configs/pretrain/demo.yaml (embedded corpus, causal "
            f"objective), rows of 128 tokens, global batch 16, a tokenizer of {VOCAB} tokens "
            "trained by the drafter's run and reused by the large model's; both runs at once"
        ),
        "draft": {"model": DRAFT_MODEL, "steps": steps["draft"], "seconds": round(draft_s, 1)},
        "large": {"model": LARGE_MODEL, "steps": steps["large"]},
        "seconds": round(total, 1),
        "threads_per_run": threads,
        "smoke": smoke,
    }
    tmp = record_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(record_path)
    return {**record, "reused": False}


# ------------------------------------------------------------------------------ measurement


def add_spec_args(parser: argparse.ArgumentParser) -> None:
    """Options of the speculative benchmark (with --draft; --prompt-len, --new-tokens and
    --repeats are the generation benchmark's)."""
    parser.add_argument("--draft", action="store_true", help="the speculative decoding benchmark")
    parser.add_argument("--draft-cache", default=str(DEFAULT_CACHE), help="where the pair is built")
    parser.add_argument(
        "--draft-pair", default="", help="DRAFT,MODEL checkpoints to use instead of building"
    )
    parser.add_argument("--draft-smoke", action="store_true", help="build with a few steps only")
    parser.add_argument("--draft-tokens", type=int, default=4, help="k proposed per round")
    parser.add_argument("--prompts", type=int, default=8, help="prompts, decoded one at a time")
    parser.add_argument(
        "--rollout-steps", type=int, default=4, help="GRPO steps per rollout timing; 0 = skip"
    )


def _pair(args: argparse.Namespace) -> tuple[Path, Path, dict[str, Any]]:
    """(drafter, large model) checkpoint paths and how they were made."""
    if args.draft_pair:
        draft, large = (Path(p) for p in args.draft_pair.split(","))
        return draft, large, {"how": "given on the command line", "seconds": 0.0}
    cache = Path(args.draft_cache)
    build = build_pair(cache, smoke=args.draft_smoke, threads=max(args.threads, 1))
    return cache / "draft", cache / "large", build


def _prompts(tok: Any, n: int, length: int, cache: str) -> list[list[int]]:
    """The first `length` tokens of n documents of the embedded corpus, taken from its end (the
    documents the pretraining runs held out, or saw least)."""
    from lmforge.data.builtin import builtin_documents

    docs = builtin_documents(cache)
    out: list[list[int]] = []
    for text in reversed(docs):
        ids = tok(text)["input_ids"]
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == n:
            break
    return out


def _hf_assisted_setup(assistant: Any, k: int) -> dict[str, Any]:
    """transformers' assisted generation with the same k: k assistant tokens per round, not
    changed between rounds, no early stop on the assistant's confidence."""
    gc = assistant.generation_config
    gc.num_assistant_tokens = k
    gc.num_assistant_tokens_schedule = "constant"
    gc.assistant_confidence_threshold = 0.0
    return {"num_assistant_tokens": k, "schedule": "constant", "confidence_threshold": 0.0}


class Sides:
    """The five ways to decode one prompt greedily at batch 1; each returns its tokens (N,)."""

    def __init__(self, large: Any, draft: Any, twins: tuple[Any, Any], new: int, k: int) -> None:
        self.large, self.draft, self.new, self.k = large, draft, new, k
        self.twin, self.twin_draft = twins
        self.stats: dict[str, list[Any]] = {"draft_model": [], "draft_ngram": [], "plain": []}

    def _ours(self, name: str, prompt: list[int], drafter: Any) -> torch.Tensor:
        from lmforge.generate import GenerateConfig, generate

        cfg = GenerateConfig(max_new_tokens=self.new, temperature=0.0)
        out = generate(self.large, [prompt], cfg, draft=drafter)
        self.stats[name].append(out.stats)
        return out.tokens[0]

    def plain(self, prompt: list[int]) -> torch.Tensor:
        return self._ours("plain", prompt, None)

    def draft_model(self, prompt: list[int]) -> torch.Tensor:
        from lmforge.speculative import model_drafter

        return self._ours("draft_model", prompt, model_drafter(self.draft, self.k))

    def draft_ngram(self, prompt: list[int]) -> torch.Tensor:
        from lmforge.speculative import ngram_drafter

        return self._ours("draft_ngram", prompt, ngram_drafter(self.k))

    def _hf(self, prompt: list[int], **extra: Any) -> torch.Tensor:
        ids = torch.tensor([prompt])  # (1, P)
        with torch.no_grad():
            out = self.twin.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=self.new,
                min_new_tokens=self.new,  # EOS masked: exactly `new` tokens, as ours
                pad_token_id=0,
                **extra,
            )
        return out[0, ids.shape[1] :]  # (N,)

    def hf_plain(self, prompt: list[int]) -> torch.Tensor:
        return self._hf(prompt)

    def hf_assisted(self, prompt: list[int]) -> torch.Tensor:
        return self._hf(prompt, assistant_model=self.twin_draft)


SIDES = ("plain", "draft_model", "draft_ngram", "hf_plain", "hf_assisted")


def _decode_all(sides: Sides, prompts: list[list[int]], repeats: int) -> dict[str, Any]:
    """Every side over every prompt: one warm-up pass, then `repeats` timed passes (sides
    interleaved, their order alternating); the tokens of the warm-up pass."""
    tokens = {name: [getattr(sides, name)(p) for p in prompts] for name in SIDES}
    for stats in sides.stats.values():
        stats.clear()  # figures of the timed passes only
    times: dict[str, list[float]] = {name: [] for name in SIDES}
    for r in range(repeats):
        for name in SIDES if r % 2 == 0 else SIDES[::-1]:
            start = time.perf_counter()
            for p in prompts:
                getattr(sides, name)(p)
            times[name].append(time.perf_counter() - start)
    return {"tokens": tokens, "times": times}


def _checks(tokens: dict[str, list[torch.Tensor]]) -> dict[str, Any]:
    """Speculative greedy output equals plain greedy output token for token (lmforge with either
    drafter; transformers assisted against its own plain); lmforge against transformers too."""

    def equal(a: str, b: str) -> int:
        return sum(bool(torch.equal(x, y)) for x, y in zip(tokens[a], tokens[b], strict=True))

    n = len(tokens["plain"])
    out = {
        "prompts": n,
        "draft_model_equals_plain": equal("draft_model", "plain"),
        "draft_ngram_equals_plain": equal("draft_ngram", "plain"),
        "hf_assisted_equals_hf_plain": equal("hf_assisted", "hf_plain"),
        "lmforge_equals_hf": equal("plain", "hf_plain"),
    }
    out["passed"] = out["draft_model_equals_plain"] == n == out["draft_ngram_equals_plain"]
    return out


def _side_record(name: str, times: list[float], tokens: int, stats: list[Any]) -> dict[str, Any]:
    record = {**common.summary(times), "new_tokens_per_s": tokens / statistics.median(times)}
    if stats:  # the figures of every timed pass together
        forwards = sum(s.forwards for s in stats)
        record["model_forwards_per_pass"] = forwards / len(times)
        record["tokens_per_forward"] = tokens * len(times) / forwards
        if name != "plain":
            proposed, accepted = sum(s.proposed for s in stats), sum(s.accepted for s in stats)
            record["acceptance"] = accepted / max(proposed, 1)
            record["draft_forwards"] = sum(s.draft_forwards for s in stats)
    return record


def _grpo_rollouts(
    draft: Path, large: Path, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    """GRPO steps on the large model as the policy (the builtin tasks, 4 prompts x G=4, 32 new
    tokens, sampling at temperature 1) without a drafter, with the n-gram one and with the
    draft model (k as given, and adaptive): the median step and rollout (sampling) seconds over
    the steps after the first."""
    k = f"--rollout.draft_tokens={args.draft_tokens}"
    runs = {
        "none": [],
        "ngram": ["--rollout.draft=ngram", k],
        "model": [f"--rollout.draft={draft}", k],
        "model_adaptive": [f"--rollout.draft={draft}", "--rollout.draft_tokens=0"],
    }
    steps = args.rollout_steps
    out: dict[str, Any] = {"steps": steps, "prompts": 4, "group_size": 4, "new_tokens": 32}
    for name, extra in runs.items():
        run = work / f"grpo-{name}"
        cmd = [
            sys.executable, str(REPO / "finetune" / "grpo.py"), f"--init_from={large}",
            f"--run_dir={run}", "--data.num_train=200", "--data.num_heldout=4",
            "--group_size=4", "--train.global_batch_size=16", "--train.micro_batch_size=16",
            f"--train.steps={steps}", "--train.eval_every=0", "--train.save_every=1000",
            "--tracking.log_every=1", "--max_new_tokens=32", "--beta=0", "--optim.lr=1e-4",
            *extra,
        ]  # fmt: skip
        proc = subprocess.run(
            cmd, env=_stage_env(max(args.threads, 1)), cwd=REPO, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise SystemExit(f"GRPO ({name}) failed:\n{proc.stderr[-3000:]}")
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        recs = [r for r in recs if "loss" in r and r["step"] > 1] or [
            r for r in recs if "loss" in r
        ]
        out[name] = {
            "step_s": statistics.median(r["generate_seconds"] + r["train_seconds"] for r in recs),
            "rollout_s": statistics.median(r["time/generation_seconds"] for r in recs),
            "rewards": [r["reward"] for r in recs],
        }
        if "rollout/acceptance" in recs[-1]:
            out[name]["acceptance"] = statistics.mean(r["rollout/acceptance"] for r in recs)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build (or reuse) the pair, decode with every side, time GRPO's rollouts; print the table."""
    common.setup()
    from lmforge.checkpoint import load_checkpoint
    from lmforge.model import num_params

    device = common.bench_device()
    common.set_threads(device, args.threads)
    draft_path, large_path, build = _pair(args)
    print(f"model pair: {build['how']}; built in {build['seconds']:.0f} s"
          + (" (reused)" if build.get("reused") else ""))  # fmt: skip
    draft, _, _ = load_checkpoint(draft_path)
    large, tok, _ = load_checkpoint(large_path)
    if draft.cfg.vocab_size != large.cfg.vocab_size or tok is None:
        raise SystemExit("the drafter and the model need one tokenizer")
    prompt_len, new = args.prompt_len or 32, args.new_tokens or 64
    prompts = _prompts(tok, args.prompts, prompt_len, str(Path(args.draft_cache) / "data"))
    twins = (common.llama_twin(large).eval(), common.llama_twin(draft).eval())
    hf_settings = _hf_assisted_setup(twins[1], args.draft_tokens)
    sides = Sides(large, draft, twins, new, args.draft_tokens)
    result = _decode_all(sides, prompts, args.repeats)
    tokens = len(prompts) * new
    record: dict[str, Any] = {
        "pair": {
            "draft_parameters": num_params(draft.cfg),
            "model_parameters": num_params(large.cfg),
            "ratio": num_params(large.cfg) / num_params(draft.cfg),
            "build": build,
        },
        "shape": {
            "prompts": len(prompts),
            "batch": 1,
            "prompt_len": prompt_len,
            "new_tokens": new,
            "draft_tokens": args.draft_tokens,
            "decoding": "greedy",
            "dtype": "float32",
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
            "hf_assisted": hf_settings,
        },
        "device": common.device_label(device),
    }
    for name in SIDES:
        record[name] = _side_record(name, result["times"][name], tokens, sides.stats.get(name, []))
    speed = {n: record[n]["new_tokens_per_s"] for n in SIDES}
    record["speedup"] = {
        "draft_model_vs_plain": speed["draft_model"] / speed["plain"],
        "draft_ngram_vs_plain": speed["draft_ngram"] / speed["plain"],
        "draft_model_vs_hf_assisted": speed["draft_model"] / speed["hf_assisted"],
        "hf_assisted_vs_hf_plain": speed["hf_assisted"] / speed["hf_plain"],
    }
    record["checks"] = _checks(result["tokens"])
    if args.rollout_steps > 0:
        with tempfile.TemporaryDirectory() as work:
            record["grpo"] = _grpo_rollouts(draft_path, large_path, args, Path(work))
    print_table(record)
    return record


def print_table(r: dict[str, Any]) -> None:
    """The speculative table: one row per side, the speed-ups, the checks, the GRPO steps."""
    s, p = r["shape"], r["pair"]
    print(
        f"\nspeculative greedy decoding: model {p['model_parameters'] / 1e6:.2f}M, drafter "
        f"{p['draft_parameters'] / 1e6:.2f}M ({p['ratio']:.1f}x), {s['prompts']} prompts of "
        f"{s['prompt_len']} tokens at batch 1, {s['new_tokens']} new tokens, k={s['draft_tokens']}"
        f", {s['dtype']}, {r['device']}, {s['threads']} thread(s)"
    )
    print(f"{'':<32}{'run (median)':>14}{'new tokens/s':>14}{'accepted':>10}{'tok/forward':>13}")
    labels = {
        "plain": "lmforge plain",
        "draft_model": "lmforge + draft model",
        "draft_ngram": "lmforge + n-gram drafter",
        "hf_plain": "transformers plain",
        "hf_assisted": "transformers assisted (model)",
    }
    for name, label in labels.items():
        e = r[name]
        acc = f"{e['acceptance']:.1%}" if "acceptance" in e else "-"
        tpf = f"{e['tokens_per_forward']:.2f}" if "tokens_per_forward" in e else "-"
        print(
            f"{label:<32}{e['median_s'] * 1e3:>11.0f} ms{e['new_tokens_per_s']:>14,.0f}"
            f"{acc:>10}{tpf:>13}"
        )
    x = r["speedup"]
    print(
        f"speed-up: draft model {x['draft_model_vs_plain']:.2f}x plain, "
        f"{x['draft_model_vs_hf_assisted']:.2f}x transformers assisted; n-gram "
        f"{x['draft_ngram_vs_plain']:.2f}x plain; transformers assisted "
        f"{x['hf_assisted_vs_hf_plain']:.2f}x its plain"
    )
    c = r["checks"]
    n = c["prompts"]
    print(
        f"checks: draft model {c['draft_model_equals_plain']}/{n}, n-gram "
        f"{c['draft_ngram_equals_plain']}/{n} equal to plain greedy; transformers assisted "
        f"{c['hf_assisted_equals_hf_plain']}/{n} equal to its plain; lmforge = transformers "
        f"{c['lmforge_equals_hf']}/{n}: {'ok' if c['passed'] else 'MISMATCH'}"
    )
    g = r.get("grpo")
    if g:
        print(
            f"GRPO step ({g['prompts']} prompts x G={g['group_size']}, {g['new_tokens']} new "
            f"tokens, median of steps 2-{g['steps']}):"
        )
        for name, label in (
            ("none", "no drafter"),
            ("ngram", "n-gram"),
            ("model", "draft model"),
            ("model_adaptive", "model, k adaptive"),
        ):
            e = g[name]
            acc = f", acceptance {e['acceptance']:.1%}" if "acceptance" in e else ""
            print(
                f"  {label:<18} step {e['step_s']:.2f} s, rollout {e['rollout_s']:.2f} s "
                f"({g['none']['rollout_s'] / e['rollout_s']:.2f}x){acc}"
            )


if __name__ == "__main__":  # build the pair alone: python bench/spec.py [CACHE]
    parser = argparse.ArgumentParser()
    parser.add_argument("cache", nargs="?", default=str(DEFAULT_CACHE))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true")
    ns = parser.parse_args()
    print(json.dumps(build_pair(Path(ns.cache), smoke=ns.smoke, threads=ns.threads), indent=2))
