"""Weighted data mixtures (`data.sources`): the sampler's proportions, order and wrap-around, a
pretraining run on two sources of different record shapes that resumes exactly and logs
per-source validation losses, SFT and DPO runs on two-source mixtures that log their held-out
metrics per source, and dry runs of a pretraining mixture. One-line errors for bad entries are
in test_bad_input.py."""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from stagerun import metrics, tiny_pretrain_args

from lmforge.config import load_config
from lmforge.data.chat import ChatDataConfig, chat_records, chat_tokenizer
from lmforge.data.chat_datasets import SFTDataset
from lmforge.data.sampler import MixtureSampler, rank_slice
from lmforge.tokenizer import load_tokenizer

WEIGHTS = [0.5, 0.3, 0.2]


def test_sampler_matches_weights_for_any_process_count_and_wraps_small_sources() -> None:
    sizes = [5000, 800, 7]  # the last is used up ~290 times in 10,000 draws
    sampler = MixtureSampler(sizes, WEIGHTS, seed=11)
    stream = sampler.indices(0, 10_000)
    source = np.searchsorted(sampler.offsets, stream, side="right") - 1
    shares = np.bincount(source, minlength=3) / 10_000
    assert np.abs(shares - WEIGHTS).max() < 0.01, shares
    assert np.array_equal(source, sampler.choices(0, 10_000))

    # Each rank's slice of each global batch, concatenated, is the 1-process order; a fresh
    # sampler started at any cursor (a resume) continues it exactly.
    for world in (2, 4):
        fresh = MixtureSampler(sizes, WEIGHTS, seed=11)
        by_rank = [
            i
            for start in range(0, 2048, 64)
            for rank in range(world)
            for i in fresh.indices(*rank_slice(start, 64, rank, world))
        ]
        assert by_rank == stream[:2048]
    assert MixtureSampler(sizes, WEIGHTS, seed=11).indices(6143, 300) == stream[6143:6443]

    # Within a source, its own stream: each run of 7 draws of the small source is a
    # permutation of its samples (an epoch), reshuffled from one epoch to the next.
    small = np.asarray(stream)[source == 2] - sampler.offsets[2]
    epochs = small[: len(small) // 7 * 7].reshape(-1, 7)
    assert all(sorted(e) == list(range(7)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1
    big = np.asarray(stream)[source == 0]
    assert len(set(big.tolist())) == len(big)  # no repeats before the big source's epoch ends
    assert MixtureSampler(sizes, WEIGHTS, seed=12).indices(0, 100) != stream[:100]


def write_sources(folder: Path) -> tuple[Path, Path]:
    """Two small corpora of different shapes: JSON Lines with a `body` field, and a folder of
    .txt files (a document each), on different vocabularies."""
    rng = random.Random(0)
    animals = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "in", "sun"]
    numbers = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    folder.mkdir(parents=True, exist_ok=True)
    records = folder / "animals.jsonl"
    lines = [json.dumps({"body": " ".join(rng.choices(animals, k=50))}) for _ in range(240)]
    records.write_text("\n".join(lines) + "\n")
    texts = folder / "numbers"
    texts.mkdir(exist_ok=True)
    for i in range(80):
        (texts / f"doc{i:03d}.txt").write_text(" ".join(rng.choices(numbers, k=60)) + "\n")
    return records, texts


def pretrain_args(run_dir: Path, cache: Path, records: Path, texts: Path) -> list[str]:
    sources = (
        f"[{{source: '{records}', text_field: body, weight: 3}}, "
        f"{{source: '{texts}', weight: 1, name: num, validation_fraction: 0.1}}]"
    )
    # The seconds-long run of every pretraining test, on the mixture (later overrides win).
    return [
        *tiny_pretrain_args(run_dir, cache, steps=4, save_every=100),
        "--tokenizer.vocab_size=300",
        f"--data.sources={sources}",
        "--data.seq_len=32",
        "--train.eval_every=2",
    ]


@contextlib.contextmanager
def in_process() -> Iterator[None]:
    """Run a stage's main() here (no interpreter start-up and imports to pay for: most of a tiny
    run's time), then undo what it leaves: its 1-process group, DeepSpeed's groups made from it
    (destroyed through deepspeed.comm, which forgets them) and launcher variables."""
    env = dict(os.environ)
    os.environ.update(DS_ACCELERATOR="cpu", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    try:
        yield
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            from deepspeed import comm

            if comm.comm.cdb is not None:
                comm.destroy_process_group()
            else:
                dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(env)


def run_main(module: str, args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run a stage's main(args) in this process; its output."""
    main = __import__(module, fromlist=["main"]).main
    with in_process():
        code = main(args)
    out = capsys.readouterr()
    assert code == 0, (out.out + out.err)[-3000:]
    return out.out + out.err


def test_pretraining_mixture_resumes_exactly_and_logs_each_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records, texts = write_sources(tmp_path / "data")
    cache = tmp_path / "cache"
    full, split = tmp_path / "full", tmp_path / "split"
    out = run_main("pretrain.train", pretrain_args(full, cache, records, texts), capsys)
    assert "mixture: animals 75.0%" in out and "num 25.0%" in out, out
    run_main(
        "pretrain.train",
        [*pretrain_args(split, cache, records, texts), "--train.stop_at=2"],
        capsys,
    )
    assert "resuming from" in run_main(
        "pretrain.train", pretrain_args(split, cache, records, texts), capsys
    )

    def without_time(run: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "time"} for r in metrics(run)]

    losses = [
        {r["step"]: r["loss"] for r in without_time(run) if "loss" in r} for run in (split, full)
    ]
    assert losses[0] == losses[1]  # steps 3-4 after the resume equal the straight run's
    evals = [r for r in without_time(full) if "eval/causal/loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for record in evals:
        per_source = [record["val/animals/loss"], record["val/num/loss"]]
        # The overall loss is the weight-averaged per-source loss.
        assert record["eval/causal/loss"] == pytest.approx(
            0.75 * per_source[0] + 0.25 * per_source[1]
        )
    assert evals[-1]["val/num/loss"] < evals[0]["val/num/loss"]
    assert [r for r in without_time(split) if "val/num/loss" in r] == evals


def write_chats(folder: Path) -> Path:
    """Prompt/completion records (arithmetic in words) as JSON Lines."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "words.jsonl"
    rows = [
        {"prompt": f"What is {a} plus {b}?", "completion": f"It is {a + b}."}
        for a in range(12)
        for b in range(10)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chat_mixture_draws_by_weight_and_keeps_each_held_out_set(tmp_path: Path) -> None:
    chats = write_chats(tmp_path / "data")
    mix = f"--sources=[{{source: builtin, weight: 1}}, {{source: '{chats}', weight: 3}}]"
    cfg = load_config(ChatDataConfig, None, [mix, "--num_train=400", "--num_heldout=8"])
    train, heldout = chat_records(cfg, "sft")
    user = [r for r in train if r.get("task") is None]  # builtin records carry their task
    # As many training records as the sources hold together (builtin's 400, the file's 120
    # less its held-out share), drawn 1:3.
    assert len(train) == 400 + 120 - (len(heldout) - 8)
    assert abs(len(user) / len(train) - 0.75) < 0.05
    assert sum(r.get("task") is None for r in heldout) >= 1  # the file's own held-out share
    assert sum(r.get("task") is not None for r in heldout) == 8  # builtin's own held-out tasks

    # Preference data (reward, DPO) mixes the same way; a shared heldout_source is read once.
    pairs = tmp_path / "data" / "pairs.jsonl"
    rows = [{"prompt": f"Say {i}.", "chosen": f"{i}", "rejected": f"{i + 1}"} for i in range(60)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mix = f"--sources=[{{source: builtin, weight: 1}}, {{source: '{pairs}', weight: 1}}]"
    cfg = load_config(ChatDataConfig, None, [mix, "--num_train=60", f"--heldout_source={pairs}"])
    train, heldout = chat_records(cfg, "preference")
    assert len(train) == 120 and len(heldout) == 60
    assert abs(sum(r.get("task") is None for r in train) - 60) <= 6


def test_sft_runs_on_a_two_source_mixture_and_evaluates_each_source(
    task_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chats = write_chats(tmp_path / "data")
    run_dir = tmp_path / "sft"
    sources = f"[builtin, {{source: '{chats}', weight: 2, name: words}}]"
    out = run_main(
        "finetune.sft",
        [
            f"--init_from={task_base}",
            f"--data.sources={sources}",
            "--data.num_train=64",
            "--data.num_heldout=6",
            "--data.seq_len=64",
            "--train.steps=3",
            "--train.global_batch_size=8",
            "--train.micro_batch_size=8",
            "--train.eval_every=3",
            "--train.save_every=100",
            "--tracking.log_every=1",
            "--answer_tokens=4",
            f"--run_dir={run_dir}",
        ],
        capsys,
    )
    # builtin's 64 + the file's 115 (+5 held out)
    assert "SFT data: 179 samples" in out, out[-2000:]
    records = metrics(run_dir)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3], out[-2000:]
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 3]

    # The overall held-out loss is the per-source losses weighted by each source's assistant
    # tokens (the loss is per token); exact match is scored per source from the same answers.
    cfg = load_config(ChatDataConfig, None, [f"--sources={sources}", "--num_train=64"])
    cfg.num_heldout, cfg.seq_len = 6, 64
    tok = chat_tokenizer(load_tokenizer(task_base), cfg)
    heldout = chat_records(cfg, "sft")[1]
    tokens = {
        name: SFTDataset([r for r in heldout if r["source"] == name], tok, 64).num_label_tokens
        for name in ("builtin", "words")
    }
    assert all(tokens.values()), tokens
    for record in evals:
        mean = sum(record[f"eval/{k}/loss"] * n for k, n in tokens.items()) / sum(tokens.values())
        assert record["eval/loss"] == pytest.approx(mean, rel=1e-5)
        assert {"eval/builtin/accuracy", "eval/words/accuracy"} <= set(record)
    assert evals[-1]["eval/words/loss"] < evals[0]["eval/words/loss"]


def test_dry_run_of_a_pretraining_mixture_checks_every_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pretrain.train import main

    records, texts = write_sources(tmp_path / "data")
    args = pretrain_args(tmp_path / "run", tmp_path / "cache", records, texts)
    with in_process():
        assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = [line for line in out.splitlines() if line.startswith("# checked: data.sources")]
    assert len(listed) == 2, out[-2000:]
    assert "data.sources[0] (name animals, weight 3 = 75.0%)" in listed[0]
    assert "first records of each file have 'body'" in listed[0]
    assert "data.sources[1] (name num, weight 1 = 25.0%)" in listed[1]
    assert "readable UTF-8 text" in listed[1]

    # A missing file: one line naming its entry; the good entry is still listed.
    missing = tmp_path / "data" / "gone.jsonl"
    args[args.index(next(a for a in args if a.startswith("--data.sources")))] = (
        f"--data.sources=[{{source: '{records}', text_field: body}}, '{missing}']"
    )
    with in_process():
        assert main([*args, "--dry-run"]) == 2
    out, err = capsys.readouterr()
    problems = err.split("problem:\n", 1)[-1].splitlines()
    assert problems == [
        f"  data.sources[1].source '{missing}': no such file or directory; check the path"
    ], err[-2000:]
    assert "# checked: data.sources[0] (name animals, weight 1 = 50.0%)" in out
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_dpo_on_a_mixture_reports_each_source_from_the_same_passes(
    task_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Say {i}.", "chosen": f"{i}", "rejected": f"{i + 1}"} for i in range(60)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sources = f"[builtin, {{source: '{pairs}', name: says}}]"
    data = [f"--sources={sources}", "--num_train=32", "--num_heldout=6", "--heldout_fraction=0.2"]
    run_dir = tmp_path / "dpo"
    run_main(
        "finetune.dpo",
        [
            f"--init_from={task_base}",
            *(f"--data.{a[2:]}" for a in data),
            "--data.seq_len=64",
            "--train.steps=2",
            "--train.global_batch_size=8",
            "--train.micro_batch_size=4",
            "--train.eval_every=2",
            "--train.save_every=100",
            f"--run_dir={run_dir}",
        ],
        capsys,
    )
    heldout = chat_records(load_config(ChatDataConfig, None, data), "preference")[1]
    pairs_of = {n: sum(r["source"] == n for r in heldout) for n in ("builtin", "says")}
    assert pairs_of["builtin"] == 6 and pairs_of["says"] > 0
    evals = [r for r in metrics(run_dir) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 2]
    for record in evals:  # the overall numbers are the pair-weighted per-source ones
        for key in ("loss", "reward_accuracy"):
            mean = sum(record[f"eval/{n}/{key}"] * c for n, c in pairs_of.items())
            assert record[f"eval/{key}"] == pytest.approx(mean / sum(pairs_of.values()))


def test_dry_run_of_a_chat_mixture_lists_each_entry(
    task_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from finetune.sft import main

    chats, missing = write_chats(tmp_path / "data"), tmp_path / "data" / "gone.jsonl"
    sources = f"[builtin, {{source: '{chats}', weight: 3}}, '{missing}']"
    args = [f"--init_from={task_base}", f"--data.sources={sources}", "--data.num_train=40"]
    with in_process():
        assert main([*args, f"--run_dir={tmp_path / 'run'}", "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert "# checked: data.sources[0] (name builtin, weight 1 = 20.0%) builtin: 40 training" in out
    assert f"# checked: data.sources[1] (name words, weight 3 = 60.0%) {chats}: 115 training" in out
    problems = err.split("problem:\n", 1)[-1].splitlines()
    assert problems == [
        f"  data.sources[2].source '{missing}': no such file or directory; check the path"
    ], err[-2000:]
