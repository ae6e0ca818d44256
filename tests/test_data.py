"""Data pipeline: corpora, ingestion errors, token shards and their cache, packing, sampler."""

from __future__ import annotations

import inspect
import io
import json
import pickle
import random
import threading
import time
from pathlib import Path
from pydoc_data.topics import topics

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import lmforge.data.prepare as prepare_mod
from lmforge.config import from_dict
from lmforge.data import (
    DataConfig,
    GlobalSampler,
    PackedDataset,
    TokenShard,
    builtin_documents,
    collate,
    doc_hash,
    prepare_data,
    rank_slice,
    validation_mask,
)
from lmforge.data.builtin import MIN_CHARS, collect_builtin
from lmforge.data.corpus import load_corpus
from lmforge.data.sources import Source
from lmforge.errors import ConfigError, DataError
from lmforge.tokenizer import TokenizerConfig

TOK = TokenizerConfig(vocab_size=400)
WORDS = ["the", "a", "of", "to", "and", "river", "house", "people", "water", "light", "café"]


def texts(n: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))).capitalize() + "."
        for _ in range(n)
    ]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), "utf-8")
    return path


def config(tmp_path: Path, source: Path | str, **kw: object) -> DataConfig:
    base: dict = dict(source=str(source), cache_dir=str(tmp_path / "cache"))
    base["validation_fraction"] = 0.2
    return DataConfig(**{**base, **kw})  # type: ignore[arg-type]


def expected_split(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    docs = [d for d in docs if d.strip()]
    mask = validation_mask(np.array([doc_hash(d) for d in docs], dtype=np.uint64), fraction)
    pairs = list(zip(docs, mask, strict=True))
    return [d for d, m in pairs if not m], [d for d, m in pairs if m]


def decoded(shard: TokenShard, tokenizer) -> list[str]:
    """The documents of a shard: split after each EOS, BOS dropped, decoded."""
    ids = shard.tokens.tolist()
    ends = [i for i, t in enumerate(ids) if t == shard.eos_id]
    starts = [0] + [e + 1 for e in ends[:-1]]
    assert all(ids[s] == shard.bos_id for s in starts)
    return [tokenizer.decode(ids[s + 1 : e]) for s, e in zip(starts, ends, strict=True)]


def test_config_validation_names_the_key() -> None:
    assert from_dict(DataConfig, {"seq_len": 64}, prefix="data").seq_len == 64
    for key, bad in [
        ("validation_fraction", 1.0),
        ("seq_len", 0),
        ("num_proc", -1),
        ("max_documents", -1),
        ("source", " "),
    ]:
        with pytest.raises(ConfigError, match=f"data.{key}"):
            from_dict(DataConfig, {key: bad}, prefix="data")


def test_builtin_corpus_is_large_deterministic_and_split_by_hash(tmp_path: Path) -> None:
    docs = builtin_documents(tmp_path)
    assert sum(len(d.encode()) for d in docs) > 1.5e6 and len(docs) > 2000
    assert all(len(d) >= MIN_CHARS for d in docs) and len(set(docs)) == len(docs)
    assert inspect.cleandoc(topics["for"]).strip() in docs
    assert docs == tuple(collect_builtin())  # the on-disk cache == a fresh collection
    hashes = np.array([doc_hash(d) for d in docs], dtype=np.uint64)
    mask = validation_mask(hashes, 0.02)
    assert np.array_equal(mask, validation_mask(hashes.copy(), 0.02))
    assert 0.01 < mask.mean() < 0.03
    train, val = expected_split(list(docs), 0.02)
    assert len(val) == mask.sum() and set(val) == {d for d, m in zip(docs, mask, strict=True) if m}
    assert not set(train) & set(val) and len(train) + len(val) == len(docs)

    cfg = DataConfig(cache_dir=str(tmp_path), max_documents=150, validation_fraction=0.1)
    data = prepare_data(cfg, TOK)  # trains on 150 documents only
    assert data.train.num_documents + data.val.num_documents == 150
    assert decoded(data.train, data.tokenizer) == expected_split(list(docs[:150]), 0.1)[0]


@pytest.mark.parametrize("kind", ["jsonl", "json", "txt", "parquet", "jsonl_dir"])
def test_ingestion_round_trips_documents(tmp_path: Path, kind: str) -> None:
    docs = [*texts(40), "  ", "x <|end|> y\n\nsecond paragraph"]
    field = {"txt": "text", "parquet": "content"}.get(kind, "body")
    if kind == "jsonl":
        source = write_jsonl(
            tmp_path / "c.jsonl", [{field: d, "id": i} for i, d in enumerate(docs)]
        )
    elif kind == "json":
        source = tmp_path / "c.json"
        source.write_text(json.dumps([{field: d} for d in docs]), "utf-8")
    elif kind == "txt":
        source = tmp_path / "txt"
        source.mkdir()
        for i, d in enumerate(docs):  # one document per file, read in sorted name order
            (source / f"{i:03d}.txt").write_text(d, "utf-8")
    elif kind == "parquet":
        source = tmp_path / "c.parquet"
        pq.write_table(pa.table({field: docs, "n": list(range(len(docs)))}), source)
    else:  # files whose other columns differ (datasets cannot load them in one go)
        source = tmp_path / "dir"
        source.mkdir()
        write_jsonl(source / "a.jsonl", [{field: d} for d in docs[:20]])
        write_jsonl(source / "b.jsonl", [{field: d, "meta": 1} for d in docs[20:]])
    cfg = config(tmp_path, source, text_field=field)
    if kind == "jsonl_dir":  # a cache inside the source directory is not read as corpus
        cfg.cache_dir = str(source / "cache")
        assert prepare_data(cfg, TOK).cache_dir == prepare_data(cfg, TOK).cache_dir
    data = prepare_data(cfg, TOK)
    train, val = expected_split(docs, 0.2)
    assert decoded(data.train, data.tokenizer) == train
    assert decoded(data.val, data.tokenizer) == val
    assert data.train.tokens.dtype == np.uint16 and data.train.vocab_size <= 400
    meta = json.loads((data.cache_dir / "meta.json").read_text())
    assert meta["num_documents"] == {"train": len(train), "val": len(val)}
    assert (
        meta["num_tokens"]["train"] == data.train.num_tokens and len(meta["tokenizer_sha256"]) == 64
    )


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def parquet(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


GOOD = jsonl([{"text": t} for t in texts(3)])  # 3 lines


@pytest.mark.parametrize(
    "files, source, expected",
    [
        ({}, "nope.jsonl", ["nope.jsonl", "no such file"]),
        ({"e.jsonl": jsonl([{"text": ""}, {"text": " \n"}])}, "e.jsonl", ["e.jsonl", "empty"]),
        ({"d/README.md": b"hi"}, "d", ["has no .txt"]),
        ({"m/a.txt": b"hi", "m/b.jsonl": GOOD}, "m", ["mixes .jsonl and .txt"]),
        ({"bin.txt": b"abc\x00\x01"}, "bin.txt", ["bin.txt", "binary data"]),
        ({"l1.txt": "café au lait".encode("latin-1")}, "l1.txt", ["l1.txt", "UTF-8", "offset 3"]),
        ({"b.jsonl": GOOD + b'{"text": "x\n'}, "b.jsonl", ["b.jsonl line 4", "invalid JSON"]),
        (
            {"f.jsonl": jsonl([{"body": "x", "id": 1}])},
            "f.jsonl",
            ["f.jsonl line 1", "no text field 'text'", "body, id"],
        ),
        (
            {"p.parquet": parquet(pa.table({"body": ["a"], "id": [1]}))},
            "p.parquet",
            ["p.parquet", "no text field 'text'", "body, id"],
        ),
        ({"i.jsonl": GOOD + jsonl([{"text": 5}])}, "i.jsonl", ["i.jsonl line 4", "not a string"]),
        ({"n.jsonl": GOOD + jsonl([{"x": 1}])}, "n.jsonl", ["n.jsonl line 4", "'text'", ": x)"]),
    ],
)
def test_corpus_errors_are_one_line_naming_the_file(
    tmp_path: Path, files: dict[str, bytes], source: str, expected: list[str]
) -> None:
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    with pytest.raises(DataError) as err:
        prepare_data(config(tmp_path, tmp_path / source), TOK)
    assert "\n" not in str(err.value)
    for part in expected:
        assert part in str(err.value)


def test_hub_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    with pytest.raises(DataError, match=r"someone/nope.*hub dataset failed") as err:
        prepare_data(config(tmp_path, "someone/nope"), TOK)  # offline in tests
    assert "\n" not in str(err.value)
    # The hub code path, fed a local dataset directory (what load_dataset(name) also accepts).
    folder = tmp_path / "hub"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"body": t} for t in texts(5)])
    cfg = config(tmp_path, folder, text_field="body")
    ds = load_corpus(Source("hub", str(folder)), cfg, tmp_path / "hf")
    assert ds["text"] == texts(5)


def test_cache_is_reused_then_invalidated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts()])
    first = prepare_data(config(tmp_path, source), TOK)
    stamp = (first.cache_dir / "meta.json").stat().st_mtime_ns

    def rebuilt(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(prepare_mod, "write_shards", rebuilt)
    monkeypatch.setattr(prepare_mod, "build_tokenizer", rebuilt)
    again = prepare_data(config(tmp_path, source), TOK)
    assert again.cache_dir == first.cache_dir
    assert (again.cache_dir / "meta.json").stat().st_mtime_ns == stamp
    monkeypatch.undo()
    write_jsonl(source, [{"text": t} for t in texts()[:-1]])
    changed = prepare_data(config(tmp_path, source), TOK)
    assert changed.cache_dir != first.cache_dir
    total = changed.train.num_documents + changed.val.num_documents
    assert total == len(texts()) - 1
    assert not list((tmp_path / "cache" / ".tmp").iterdir())  # workspaces are cleaned up


def test_num_proc_gives_the_same_shards(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts(200)])
    one = prepare_data(config(tmp_path, source), TOK)
    tok = TokenizerConfig(path=str(next((tmp_path / "cache" / "tokenizers").iterdir())))
    two = prepare_data(config(tmp_path, source, num_proc=2, cache_dir=str(tmp_path / "c2")), tok)
    assert np.array_equal(one.train.tokens, two.train.tokens)
    assert np.array_equal(one.val.tokens, two.val.tokens)


def test_non_main_waits_for_the_main_process(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts()])
    cfg = config(tmp_path, source)
    with pytest.raises(DataError, match="timed out waiting for rank 0"):
        prepare_data(cfg, TOK, is_main=False, timeout_s=0.2)
    result: dict[str, object] = {}

    def main() -> None:
        time.sleep(0.5)
        result["main"] = prepare_data(cfg, TOK)

    thread = threading.Thread(target=main)
    thread.start()
    other = prepare_data(cfg, TOK, is_main=False, timeout_s=60)
    thread.join()
    assert other.cache_dir == result["main"].cache_dir  # type: ignore[attr-defined]
    assert np.array_equal(other.train.tokens, result["main"].train.tokens)  # type: ignore[attr-defined]


def hand_shard(tmp_path: Path, docs: list[list[int]]) -> TokenShard:
    """A shard of documents [0] + ids + [1] (BOS 0, EOS 1), written by hand."""
    tokens = np.array([t for d in docs for t in [0, *d, 1]], dtype=np.uint16)
    tokens.tofile(tmp_path / "train.bin")
    (tmp_path / "val.bin").write_bytes(b"")
    meta = {
        "dtype": "uint16",
        "vocab_size": 64,
        "bos_id": 0,
        "eos_id": 1,
        "num_tokens": {"train": len(tokens), "val": 0},
        "num_documents": {"train": len(docs), "val": 0},
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return TokenShard(tmp_path, "train")


def test_packing_windows_labels_doc_ids_and_positions(tmp_path: Path) -> None:
    rng = random.Random(0)
    docs = [[rng.randint(2, 63) for _ in range(rng.randint(0, 12))] for _ in range(40)]
    shard = hand_shard(tmp_path, docs)
    ds = PackedDataset(shard, 8, eos_id=1, document_mask=True, reset_positions=True)
    assert len(ds) == shard.num_tokens // 9 and TokenShard(tmp_path, "val").num_tokens == 0
    flat = shard.tokens.tolist()
    for i in range(len(ds)):
        item, window = ds[i], flat[i * 9 : (i + 1) * 9]
        assert item["input_ids"].tolist() == window[:-1] and item["labels"].tolist() == window[1:]
        doc, pos, docs_ref, pos_ref = 0, 0, [], []
        for t in window[:-1]:
            docs_ref.append(doc)
            pos_ref.append(pos)
            doc, pos = (doc + 1, 0) if t == 1 else (doc, pos + 1)
        assert item["doc_ids"].tolist() == docs_ref and item["position_ids"].tolist() == pos_ref
        assert all(v.dtype == torch.int64 and v.shape == (8,) for v in item.values())
    for mask, reset in [(True, True), (True, False), (False, False)]:
        ds = PackedDataset(shard, 8, eos_id=1, document_mask=mask, reset_positions=reset)
        idx = [5, 0, len(ds) - 1, 5]
        fast, slow = ds.get_batch(idx), collate([ds[i] for i in idx])
        assert (
            fast.keys()
            == slow.keys()
            == (
                {"input_ids", "labels", "doc_ids", "position_ids"}
                if mask
                else {"input_ids", "labels"}
            )
        )
        for key in fast:
            assert fast[key].shape == (4, 8) and torch.equal(fast[key], slow[key])
        if mask and not reset:
            assert fast["position_ids"].tolist() == [list(range(8))] * 4
    with pytest.raises(IndexError):
        ds.get_batch([len(ds)])
    blob = pickle.dumps(ds)  # for spawned DataLoader workers: the path, not the tokens
    assert len(blob) < 1000 and torch.equal(
        pickle.loads(blob).get_batch(idx)["labels"], fast["labels"]
    )
    (tmp_path / "train.bin").write_bytes(b"\x00")
    with pytest.raises(DataError, match="delete"):
        TokenShard(tmp_path, "train")


def test_sampler_epochs_are_seeded_permutations() -> None:
    sampler = GlobalSampler(10, seed=7)
    stream = sampler.indices(0, 35)
    for e in range(3):
        assert sorted(stream[e * 10 : (e + 1) * 10]) == list(range(10))
    assert stream[:10] != stream[10:20] and sampler.epoch(35) == 3
    assert GlobalSampler(10, seed=7).indices(0, 35) == stream
    assert GlobalSampler(10, seed=8).indices(0, 10) != stream[:10]
    assert sampler.indices(13, 9) == stream[13:22]  # resume at a cursor mid-epoch
    with pytest.raises(DataError, match="no training samples"):
        GlobalSampler(0, seed=7)


def test_world_size_does_not_change_global_batches() -> None:
    sampler, batch = GlobalSampler(23, seed=1), 6
    for step in range(10):  # crosses epoch boundaries
        cursor = step * batch
        one = sampler.indices(*rank_slice(cursor, batch, 0, 1))
        two = [i for r in range(2) for i in sampler.indices(*rank_slice(cursor, batch, r, 2))]
        three = [i for r in range(3) for i in sampler.rank_indices(cursor, batch, r, 3)]
        assert one == two == three == sampler.indices(cursor, batch)
    with pytest.raises(ConfigError, match="multiple of 4"):
        rank_slice(0, 6, 0, 4)
