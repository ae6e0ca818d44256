"""Corpus preparation at scale: worker processes, streaming, bounded memory, progress lines.

The shards must be byte-identical whatever the number of tokenising processes and whether the
corpus is read through datasets' streaming mode; jobs are small here so that a tiny corpus goes
through many of them (and through the worker pool).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest

import lmforge.data.prepare as prepare_mod
import lmforge.data.shards as shards_mod
from lmforge.data import DataConfig, doc_hash, prepare_data, validation_mask
from lmforge.data.corpus import open_corpus
from lmforge.data.shards import StreamStats, write_shards
from lmforge.data.sources import Source
from lmforge.errors import DataError
from lmforge.tokenizer import TokenizerConfig, train_tokenizer

TOK = TokenizerConfig(vocab_size=400)
WORDS = ["the", "a", "of", "river", "house", "people", "water", "light", "café", "naïve", "7"]


def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 120))) for _ in range(n)]


def write_corpus(folder: Path, docs: list[str]) -> Path:
    """Two JSON Lines files whose other columns differ, and a blank document in each."""
    folder.mkdir()
    half = len(docs) // 2
    lines_a = [{"text": d} for d in docs[:half]] + [{"text": "  "}]
    lines_b = [{"text": d, "id": i} for i, d in enumerate(docs[half:])] + [{"text": "", "id": -1}]
    for name, lines in (("a.jsonl", lines_a), ("b.jsonl", lines_b)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in lines), "utf-8")
    return folder


def shard_bytes(data: prepare_mod.PreparedData) -> tuple[bytes, bytes, dict]:
    meta = json.loads((data.cache_dir / "meta.json").read_text())
    counts = {k: meta[k] for k in ("num_tokens", "num_documents", "dtype", "tokenizer_sha256")}
    return data.train.tokens.tobytes(), data.val.tokens.tobytes(), counts


@pytest.fixture()
def small_jobs(monkeypatch: pytest.MonkeyPatch) -> list[StreamStats]:
    """Jobs of ~4k characters (many jobs for a small corpus); collects each build's stats."""
    monkeypatch.setattr(shards_mod, "JOB_CHARS", 4000)
    monkeypatch.setattr(prepare_mod, "PROGRESS_EVERY_S", 0.0)  # a progress line per job
    built: list[StreamStats] = []
    write = prepare_mod.write_shards

    def recording(*args: object, **kwargs: object) -> StreamStats:
        built.append(write(*args, **kwargs))  # type: ignore[arg-type]
        return built[-1]

    monkeypatch.setattr(prepare_mod, "write_shards", recording)
    return built


def test_shards_equal_for_any_worker_count_and_streaming(
    tmp_path: Path, small_jobs: list[StreamStats], capsys: pytest.CaptureFixture[str]
) -> None:
    docs = documents(1200)
    source = write_corpus(tmp_path / "corpus", docs)
    runs = {}
    for name, kw in {
        "one": {"num_proc": 1},
        "two": {"num_proc": 2},
        "stream": {"num_proc": 2, "streaming": True},
    }.items():
        cfg = DataConfig(
            source=str(source), cache_dir=str(tmp_path / name), validation_fraction=0.1, **kw
        )
        runs[name] = prepare_data(cfg, TOK)  # each trains its own tokenizer, too
    out = capsys.readouterr().out
    # Same tokenizer (trained on the same train split), same bytes, whatever the path.
    assert shard_bytes(runs["one"]) == shard_bytes(runs["two"]) == shard_bytes(runs["stream"])
    assert runs["one"].cache_dir.name == runs["stream"].cache_dir.name  # one cache entry
    train, val = split(docs, 0.1)
    assert runs["one"].train.num_documents == len(train) and runs["one"].val.num_documents == len(
        val
    )
    # The format, independent of how the work was shared: each document's own encoding
    # between its BOS and EOS, in corpus order.
    for name, texts in (("train", train), ("val", val)):
        shard = getattr(runs["two"], name)
        assert shard.tokens.tolist() == reference_tokens(runs["two"], texts)

    # Bounded memory: the corpus went through many jobs, never more than a few in flight.
    chars = sum(len(d) for d in docs)
    for stats in small_jobs:
        assert stats.jobs > 20
        assert stats.peak_chars_in_flight <= 5 * (4000 + 1000)  # 2 per worker + 1, each < 5k
        assert stats.peak_chars_in_flight < chars / 4
    assert "tokenising with 2 process(es)" in out and "streaming corpus" in out


def test_hub_path_gives_the_same_shards_streamed_or_downloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub code path fed a local dataset directory (load_dataset(name) accepts one):
    downloaded into the datasets cache and read from Arrow, or streamed as it is tokenised."""
    monkeypatch.setattr(shards_mod, "JOB_CHARS", 4000)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    docs = documents(500, seed=1)
    folder = tmp_path / "hub"
    folder.mkdir()
    lines = [{"text": d, "n": i} for i, d in enumerate(docs)] + [{"text": " ", "n": -1}]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines), "utf-8")
    tokenizer = train_tokenizer(docs, 400)
    got = []
    for streaming in (False, True):
        cfg = DataConfig(source=str(folder), streaming=streaming, max_documents=450)
        stream = open_corpus(Source("hub", str(folder)), cfg, tmp_path / f"hf{streaming}")
        assert stream.total == (None if streaming else len(lines))
        out = tmp_path / f"shards{streaming}"
        stats = write_shards(stream, tokenizer, out, fraction=0.1, num_proc=2, meta={})
        assert stats.jobs > 10 and sum(stats.documents.values()) == 450
        got.append([(out / f"{split}.bin").read_bytes() for split in ("train", "val")])
    assert got[0] == got[1]
    train, _ = split(docs[:450], 0.1)
    flat = np.frombuffer(got[0][0], dtype=np.uint16)
    assert tokenizer.decode(flat[1 : 1 + len(tokenizer.encode(train[0]))].tolist()) == train[0]


def reference_tokens(data: prepare_mod.PreparedData, texts: list[str]) -> list[int]:
    """What a shard of `texts` holds, built one document at a time."""
    head = [] if data.train.bos_id is None else [data.train.bos_id]
    out: list[int] = []
    for text in texts:
        out += head + data.tokenizer.encode(text, add_special_tokens=False) + [data.train.eos_id]
    return out


def split(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    docs = [d for d in docs if d.strip()]
    mask = validation_mask(np.array([doc_hash(d) for d in docs], dtype=np.uint64), fraction)
    return [d for d, m in zip(docs, mask, strict=True) if not m], [
        d for d, m in zip(docs, mask, strict=True) if m
    ]


def test_progress_closing_and_reuse_lines(
    tmp_path: Path, small_jobs: list[StreamStats], capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_corpus(tmp_path / "corpus", documents(400))
    cfg = DataConfig(source=str(source), cache_dir=str(tmp_path / "c"), seq_len=32, num_proc=2)
    data = prepare_data(cfg, TOK)
    lines = capsys.readouterr().out.splitlines()
    assert all(line.startswith("data: ") for line in lines)
    assert any(re.search(r"tokenizer training: read [\d,]+ documents", line) for line in lines)
    progress = [line for line in lines if line.startswith("data: tokenising: ")]
    assert progress and all(
        re.search(r"documents/s, .* tokens/s\), \d+%, ETA \d+:\d\d:\d\d$", line)
        for line in progress
    )
    closing = lines[-1]
    docs, tokens = data.train.num_documents + data.val.num_documents, data.train.num_tokens
    windows = data.train.num_tokens // 33
    assert closing.startswith("data: built token shards in ") and f"{docs:,} documents" in closing
    assert f"{windows:,} train" in closing and "windows of 32 tokens" in closing
    assert str(data.cache_dir) in closing and tokens > 0

    again = prepare_data(cfg, TOK)
    reuse = capsys.readouterr().out.splitlines()
    assert len(reuse) == 1 and reuse[0].startswith("data: reusing cached token shards")
    assert f"{docs:,} documents" in reuse[0] and again.cache_dir == data.cache_dir
    shutil.rmtree(data.cache_dir)  # shards gone, tokenizer cached: rebuilt, and said so
    prepare_data(cfg, TOK)
    closing = capsys.readouterr().out.splitlines()[-1]
    assert "(cached tokenizer reused)" in closing and f"{docs:,} documents" in closing

    # data.streaming changes nothing for local files (always read as they come): same entry.
    stream_cfg = DataConfig(
        source=str(source), cache_dir=str(tmp_path / "s"), seq_len=32, streaming=True
    )
    tokenizer = next((tmp_path / "c" / "tokenizers").iterdir())
    streamed = prepare_data(stream_cfg, TokenizerConfig(path=str(tokenizer)))
    lines = capsys.readouterr().out.splitlines()
    progress = [line for line in lines if line.startswith("data: tokenising: ")]
    assert progress and all("ETA" in line for line in progress)  # records counted
    assert lines[-1].startswith("data: built token shards") and f"{docs:,} documents" in lines[-1]
    assert streamed.cache_dir.name == data.cache_dir.name


def test_small_corpus_holds_out_its_smallest_hash_in_both_modes(tmp_path: Path) -> None:
    docs = documents(6, seed=3)
    fraction = 1e-9  # no hash falls below it: the document with the smallest hash is held out
    train, val = split(docs, fraction)
    assert len(val) == 1
    source = write_corpus(tmp_path / "corpus", docs)
    got = []
    for streaming in (False, True):
        cfg = DataConfig(
            source=str(source),
            cache_dir=str(tmp_path / f"c{streaming}"),
            validation_fraction=fraction,
            streaming=streaming,
        )
        data = prepare_data(cfg, TOK)
        assert data.val.num_documents == 1 and data.train.num_documents == len(train)
        ids = data.val.tokens.tolist()
        assert data.tokenizer.decode(ids[1:-1]) == val[0]
        got.append(shard_bytes(data))
    assert got[0] == got[1]


def test_streaming_errors_name_the_file_and_line(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    lines = [{"text": d} for d in documents(5)] + [{"text": 5}]
    (folder / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines), "utf-8")
    cfg = DataConfig(source=str(folder), cache_dir=str(tmp_path / "c"), streaming=True)
    with pytest.raises(DataError, match=r"a\.jsonl line 6.*not a string") as err:
        prepare_data(cfg, TOK)
    assert "\n" not in str(err.value)
    (folder / "a.jsonl").write_text('{"text": " "}\n', "utf-8")
    with pytest.raises(DataError, match="the corpus is empty"):
        prepare_data(cfg, TOK)
