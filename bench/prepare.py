"""Corpus preparation throughput: lmforge's prepare_data against datasets.map(num_proc=N).

Writes a synthetic JSON Lines corpus of `--mb` megabytes (seeded, Zipf-distributed pseudo-words
in documents of random length), trains one 4096-token tokenizer on its first megabytes, then
tokenises the whole corpus both ways with that same fast tokenizer and N processes (default:
every core), each side in its own fresh process and cache:

- baseline: `datasets.load_dataset("json")` then `Dataset.map(batched=True, num_proc=N)` calling
  the tokenizer (`tokenizer(texts)["input_ids"]`), the usual recipe;
- lmforge: `prepare_data` with `tokenizer.path` set (hash check of the file, reading it as it
  is tokenised, split by document hash, token shards on disk). `--streaming` also times it with
  `data.streaming` (for local files the same reader: a check that the setting costs nothing).

With `--rounds R` each side runs R times, the order alternating, and its best rate counts.
Prints tokens/s of each (content tokens, the same count on both sides: it is checked), the
ratio lmforge / baseline, and the peak memory of each side: the largest proportional resident
size (PSS) summed over its process tree, sampled every 50 ms, and the main process's own peak
resident size; and the CPU seconds of each side's process tree in its timed part (summed
over its processes, sampled every 50 ms: less moved by other load than the rate). A benchmark,
not a test: it never fails on timing, only when the two sides disagree on the token count.

    python bench/prepare.py [--mb 100] [--procs N] [--rounds R] [--streaming] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """A JSON Lines corpus of about `megabytes` MB; returns its document count."""
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "tu", "re", "san", "dor", "vel", "quo", "bri", "en", "ath"]
    words = np.array(
        ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(20_000)]
    )
    target, written, docs = int(megabytes * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < target:
            n = int(rng.lognormal(5.5, 0.8)) + 5  # words in this document (median ~250)
            ids = np.minimum(rng.zipf(1.2, size=n), len(words)) - 1
            text = " ".join(words[ids].tolist()).capitalize() + "."
            line = json.dumps({"text": text, "id": docs}) + "\n"
            fh.write(line)
            written += len(line.encode("utf-8"))
            docs += 1
    return docs


def train_tokenizer_on(corpus: Path, out: Path, chars: int = 5_000_000) -> None:
    """lmforge's 4096-token BPE trained on the corpus's first `chars` characters."""
    from lmforge.tokenizer import save_tokenizer, train_tokenizer

    def texts() -> Any:
        with open(corpus, encoding="utf-8") as fh:
            for line in fh:
                yield json.loads(line)["text"]

    save_tokenizer(train_tokenizer(texts(), 4096, max_chars=chars), out)


def _cpu_s() -> float:
    """CPU seconds (user + system) this process has used so far: its imports, before timing."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def side_datasets(corpus: Path, tokenizer: Path, procs: int, work: Path) -> dict[str, Any]:
    """The baseline: load_dataset + Dataset.map(batched=True, num_proc) with the tokenizer."""
    import datasets
    import pyarrow.compute as pc
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    cpu_before = _cpu_s()
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    ds = datasets.load_dataset(
        "json", data_files=[str(corpus)], split="train", cache_dir=str(work / "hf")
    )

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        return {"input_ids": tok(batch["text"], add_special_tokens=False)["input_ids"]}

    encoded = ds.map(encode, batched=True, num_proc=procs, remove_columns=ds.column_names)
    lengths = pc.list_value_length(encoded.data.column("input_ids"))
    tokens = int(pc.sum(lengths).as_py())
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "tokens": tokens,
        "documents": len(encoded),
        "cpu_before_s": cpu_before,
    }


def side_lmforge(
    corpus: Path, tokenizer: Path, procs: int, work: Path, streaming: bool
) -> dict[str, Any]:
    """lmforge: prepare_data with the given tokenizer, from the file to token shards on disk."""
    from lmforge.data import DataConfig, prepare_data
    from lmforge.tokenizer import TokenizerConfig

    cpu_before = _cpu_s()
    start = time.perf_counter()
    cfg = DataConfig(
        source=str(corpus), cache_dir=str(work / "cache"), num_proc=procs, streaming=streaming
    )
    data = prepare_data(cfg, TokenizerConfig(path=str(tokenizer)))
    seconds = time.perf_counter() - start
    docs = data.train.num_documents + data.val.num_documents
    per_doc = 1 + (data.train.bos_id is not None)  # EOS, and BOS when the tokenizer has one
    tokens = data.train.num_tokens + data.val.num_tokens - per_doc * docs
    return {"seconds": seconds, "tokens": tokens, "documents": docs, "cpu_before_s": cpu_before}


def run_side(args: argparse.Namespace) -> None:
    """Child mode: run one side and print its result as JSON on the last line."""
    corpus, tokenizer, work = Path(args.corpus), Path(args.tokenizer), Path(args.work)
    if args.side == "datasets":
        result = side_datasets(corpus, tokenizer, args.procs, work)
    else:
        result = side_lmforge(corpus, tokenizer, args.procs, work, args.side == "streaming")
    result["main_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result), flush=True)


def _tree_pss(proc: Any, cpu: dict[int, float]) -> int:
    """Proportional resident bytes of a process and all its descendants now (0 once gone);
    records each one's CPU seconds so far (user + system) in `cpu`, by pid.

    PSS, not RSS: forked workers share their parent's pages, which a sum of RSS would count
    once per process.
    """
    import psutil

    total = 0
    with contextlib.suppress(psutil.Error):
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += p.memory_full_info().pss
                times = p.cpu_times()
                cpu[p.pid] = times.user + times.system
    return total


def measure(side: str, corpus: Path, tokenizer: Path, procs: int, root: Path) -> dict[str, Any]:
    """Run one side in a fresh process (fresh caches); its result and peak tree PSS."""
    import psutil

    work = root / side
    work.mkdir()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--corpus", str(corpus)]
    cmd += ["--tokenizer", str(tokenizer), "--procs", str(procs), "--work", str(work)]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, text=True)
        proc, peak, cpu = psutil.Process(child.pid), 0, {}
        while child.poll() is None:
            peak = max(peak, _tree_pss(proc, cpu))
            time.sleep(0.05)
        log.seek(0)
        output = log.read()
    if child.returncode != 0:
        raise SystemExit(f"{side} side failed (exit {child.returncode}):\n{output[-4000:]}")
    result = json.loads(output.strip().splitlines()[-1])
    result["tree_peak_pss_mb"] = peak / 2**20
    # CPU seconds of the whole tree (each process's last sample: a slight undercount). On a
    # loaded machine they move far less than the wall-clock rate does.
    result["tree_cpu_s"] = sum(cpu.values())
    result["timed_cpu_s"] = result["tree_cpu_s"] - result["cpu_before_s"]  # imports left out
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    shutil.rmtree(work, ignore_errors=True)
    return result


def _best(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """The faster of two timings of a side, with the larger of their memory peaks."""
    if old is None:
        return new
    best = dict(old if old["tokens_per_s"] >= new["tokens_per_s"] else new)
    for key in ("tree_peak_pss_mb", "main_peak_rss_mb"):
        best[key] = max(old[key], new[key])
    best["timed_cpu_s"] = min(old["timed_cpu_s"], new["timed_cpu_s"])
    return best


def main() -> None:
    """Build the corpus and tokenizer, run both sides, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0, help="corpus size in megabytes")
    parser.add_argument("--procs", type=int, default=0, help="processes; 0 = every core")
    parser.add_argument("--streaming", action="store_true", help="also time data.streaming")
    parser.add_argument(
        "--rounds", type=int, default=1, help="time each side this often (order alternating)"
    )
    parser.add_argument("--out", default="", help="also write the results to this JSON file")
    parser.add_argument("--side", default="", help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--corpus", default="", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", default="", help=argparse.SUPPRESS)
    parser.add_argument("--work", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return run_side(args)
    procs = args.procs or len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-prepare-") as tmp:
        root = Path(tmp)
        corpus = root / "corpus.jsonl"
        t0 = time.perf_counter()
        docs = write_corpus(corpus, args.mb)
        size = corpus.stat().st_size / 1e6
        print(f"corpus: {docs:,} documents, {size:.1f} MB ({time.perf_counter() - t0:.1f} s)")
        train_tokenizer_on(corpus, root / "tokenizer")
        sides = ["datasets", "lmforge"] + (["streaming"] if args.streaming else [])
        results: dict[str, dict[str, Any]] = {}
        for round_ in range(args.rounds):
            # Alternate the order each round: load that drifts during a run favours no side.
            for side in sides if round_ % 2 == 0 else sides[::-1]:
                r = measure(side, corpus, root / "tokenizer", procs, root)
                results[side] = _best(results.get(side), r)
                print(
                    f"{side}: {r['tokens']:,} tokens in {r['seconds']:.1f} s, "
                    f"{r['tokens_per_s']:,.0f} tokens/s, peak PSS {r['tree_peak_pss_mb']:,.0f} "
                    f"MB (process tree), {r['main_peak_rss_mb']:,.0f} MB (main process), "
                    f"{r['timed_cpu_s']:.1f} CPU s (process tree, timed part)",
                    flush=True,
                )
    base = results["datasets"]
    for side in sides[1:]:
        if results[side]["tokens"] != base["tokens"]:
            raise SystemExit(
                f"token counts differ: {side} {results[side]['tokens']:,}, datasets "
                f"{base['tokens']:,}"
            )
    print(
        "\n| corpus | procs | side | tokens/s | ratio lmforge / baseline "
        "| peak PSS tree / RSS main | CPU s (timed, tree) |"
    )
    print("|---|---|---|---|---|---|---|")
    for side in sides:
        r = results[side]
        name = {"datasets": "datasets.map", "streaming": "lmforge streaming"}.get(side, side)
        ratio = r["tokens_per_s"] / base["tokens_per_s"]
        print(
            f"| {size:.0f} MB | {procs} | {name} | {r['tokens_per_s']:,.0f} | {ratio:.2f} | "
            f"{r['tree_peak_pss_mb']:,.0f} / {r['main_peak_rss_mb']:,.0f} MB | "
            f"{r['timed_cpu_s']:.1f} |"
        )
    if args.out:
        record = {"mb": size, "documents": docs, "procs": procs, "results": results}
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n", "utf-8")


if __name__ == "__main__":
    main()
