"""Finetuning data: builtin tasks, user chat / preference files, their errors, tokenised rows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lmforge.config import describe, from_dict
from lmforge.data.chat import (
    ChatDataConfig,
    load_preference_data,
    load_sft_data,
    read_chat_records,
    split_records,
)
from lmforge.data.chat_datasets import (
    IGNORE,
    PreferenceDataset,
    PromptDataset,
    SFTDataset,
    pack_rows,
)
from lmforge.data.tasks import (
    TASKS,
    check_answer,
    preference_pairs,
    prompt_split,
    task_examples,
)
from lmforge.errors import ConfigError, DataError
from lmforge.tokenizer import END, train_tokenizer

CHATTER = "Hello there! Sure, I can help. The capital of France is Paris. Thanks, bye."


@pytest.fixture(scope="module")
def tok():
    texts = [m["content"] for e in task_examples("train", 1500, 7) for m in e["messages"]]
    return train_tokenizer([*texts, CHATTER] * 2, vocab_size=400)


def user_sft(n: int = 12) -> list[dict]:
    """Mixed user chats: a system prompt, multi-turn, plain question and answer."""
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": f"What is {i} + 1?"}]
        messages.append({"role": "assistant", "content": str(i + 1)})
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "Be brief."})
        if i % 4 == 1:
            messages += [
                {"role": "user", "content": "Thanks, bye."},
                {"role": "assistant", "content": "Sure, bye!"},
            ]
        out.append({"messages": messages})
    return out


def write(path: Path, records: list) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records), "utf-8")
    return path


def solve(prompt: str) -> str:
    """The answer to a task prompt, worked out independently of the generators."""
    if m := re.fullmatch(r"What is (\d+) \+ (\d+)\?", prompt):
        return str(int(m[1]) + int(m[2]))
    if m := re.fullmatch(r"Which is larger: (\d+) or (\d+)\?", prompt):
        return str(max(int(m[1]), int(m[2])))
    if m := re.fullmatch(r"Reverse the word: ([a-z]{3,6})", prompt):
        return "".join(reversed(m[1]))
    if m := re.fullmatch(r"Sort these digits: (\d( \d){2,4})", prompt):
        return " ".join(sorted(m[1].split()))
    if m := re.fullmatch(
        r"How many times does the letter ([a-z]) appear in ([a-z]{3,6})\?", prompt
    ):
        return str(m[2].count(m[1]))
    raise AssertionError(f"unknown prompt {prompt!r}")


# --- builtin tasks --------------------------------------------------------------------------------


def test_task_examples_are_deterministic_verifiable_and_balanced() -> None:
    examples = task_examples("train", 500, seed=3)
    assert examples == task_examples("train", 500, seed=3)
    assert examples != task_examples("train", 500, seed=4)
    assert [e["task"] for e in examples[:5]] == list(TASKS)
    for e in examples:
        user, assistant = e["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert assistant["content"] == e["answer"] == solve(user["content"])
        assert check_answer(e["task"], e["answer"], e["answer"])
    assert len({e["messages"][0]["content"] for e in examples}) == 500  # distinct prompts
    # A task's examples do not depend on which other tasks are asked for.
    adds = [e for e in examples if e["task"] == "add"]
    assert task_examples("train", 100, seed=3, tasks=["add"]) == adds
    with pytest.raises(ValueError, match="unknown task"):
        task_examples("train", 5, 0, tasks=["divide"])


def test_train_and_heldout_prompts_are_disjoint() -> None:
    train = {e["messages"][0]["content"] for e in task_examples("train", 3000, seed=0)}
    heldout = task_examples("heldout", 300, seed=0)
    prompts = {e["messages"][0]["content"] for e in heldout}
    assert len(prompts) == 300
    assert not train & prompts
    assert all(prompt_split(p) == "heldout" for p in prompts)
    assert all(prompt_split(p) == "train" for p in train)
    # Another seed draws other held-out examples from the same held-out prompt space.
    other = {e["messages"][0]["content"] for e in task_examples("train", 3000, seed=9)}
    assert not other & prompts


def test_check_answer_is_exact_match_after_strip() -> None:
    assert check_answer("add", " 71\n", "71")
    assert not check_answer("add", "71.", "71")
    assert not check_answer("add", "I think it is 71.", "71")
    assert not check_answer("sort", "1 2  3", "1 2 3")


def test_preference_pairs() -> None:
    pairs = preference_pairs("train", 400, seed=1)
    assert pairs == preference_pairs("train", 400, seed=1)
    examples = task_examples("train", 400, seed=1)
    assert [p["prompt"] for p in pairs] == [e["messages"][:1] for e in examples]
    near_miss = chatter = 0
    for p in pairs:
        assert p["chosen"] == p["answer"] == solve(p["prompt"][0]["content"])
        assert p["rejected"] != p["chosen"]
        assert check_answer(p["task"], p["chosen"], p["answer"])
        assert not check_answer(p["task"], p["rejected"], p["answer"])
        if p["answer"] in p["rejected"]:
            chatter += 1
        else:
            near_miss += 1
    assert near_miss > 100 and chatter > 100
    heldout = {p["prompt"][0]["content"] for p in preference_pairs("heldout", 100, seed=1)}
    assert not heldout & {p["prompt"][0]["content"] for p in pairs}


# --- tokenised SFT rows ---------------------------------------------------------------------------


def labelled_text(tok, labels: torch.Tensor) -> str:
    return tok.decode(labels[labels != IGNORE].tolist())


def expected_labels(record: dict) -> str:
    return "".join(m["content"] + END for m in record["messages"] if m["role"] == "assistant")


@pytest.mark.parametrize("pack", [False, True])
def test_sft_labels_cover_exactly_the_assistant_tokens(tok, pack: bool) -> None:
    records = task_examples("train", 60, seed=0) + user_sft()
    ds = SFTDataset(records, tok, 64, pack=pack)
    assert ds.skipped == 0
    seen = []
    for i in range(len(ds)):
        row = ds[i]
        assert all(v.shape == (64,) and v.dtype == torch.int64 for v in row.values())
        for record_id, start, stop in ds.sample_spans(i):
            seen.append(record_id)
            labels = row["labels"][start:stop]
            assert labelled_text(tok, labels) == expected_labels(records[record_id])
            # labels are the next inputs; the sample's last label (the newline after <|end|>)
            # is not learned, so no label reaches into the next sample
            ids = row["input_ids"][start:stop]
            learned = (labels != IGNORE).nonzero().flatten()
            assert torch.equal(labels[learned[:-1]], ids[learned[:-1] + 1])
            assert labels[-1] == IGNORE and ids[-1] == tok.convert_tokens_to_ids(END)
        stop = ds.sample_spans(i)[-1][2]
        assert (row["labels"][stop:] == IGNORE).all()
        assert (row["input_ids"][stop:] == tok.pad_token_id).all()
        if not pack:
            assert row["attention_mask"].tolist() == [1] * stop + [0] * (64 - stop)
    assert sorted(seen) == list(range(len(records)))


def test_packing_keeps_samples_intact(tok) -> None:
    records = task_examples("train", 200, seed=2) + user_sft(30)
    packed = SFTDataset(records, tok, 96, pack=True)
    padded = SFTDataset(records, tok, 96, pack=False)
    assert len(packed) < len(padded) / 2  # short chats share rows
    assert packed.num_label_tokens == padded.num_label_tokens
    by_record = {padded.sample_spans(i)[0][0]: padded[i] for i in range(len(padded))}
    batch = packed.get_batch(range(len(packed)))  # (B, T)
    total_labels = 0
    for i in range(len(packed)):
        row = {key: value[i] for key, value in batch.items()}
        assert all(torch.equal(row[key], packed[i][key]) for key in row)
        spans = packed.sample_spans(i)
        for doc, (record_id, start, stop) in enumerate(spans):
            alone = by_record[record_id]
            n = stop - start
            assert torch.equal(row["input_ids"][start:stop], alone["input_ids"][:n])
            assert torch.equal(row["labels"][start:stop], alone["labels"][:n])
            assert (row["doc_ids"][start:stop] == doc).all()
            assert torch.equal(row["position_ids"][start:stop], torch.arange(n))
        stop = spans[-1][2]
        assert (row["doc_ids"][stop:] == len(spans)).all()  # padding is a document of its own
        assert (row["labels"][stop:] == IGNORE).all()
        total_labels += int((row["labels"] != IGNORE).sum())
    assert total_labels == packed.num_label_tokens
    assert "packed" in packed.summary() and "0 of 230 records skipped" in packed.summary()


def test_pack_rows_fits_every_sample_once() -> None:
    lengths = [5, 9, 3, 10, 1, 7, 7, 2, 10, 4]
    rows = pack_rows(lengths, 10)
    assert sorted(k for row in rows for k in row) == list(range(10))
    assert all(sum(lengths[k] for k in row) <= 10 for row in rows)
    assert len(rows) == 6  # sum 58 -> at least 6 rows of 10
    assert pack_rows(lengths, 10) == rows


def test_long_records_are_counted_skips(tok) -> None:
    records = task_examples("train", 20, seed=0)
    long = {"messages": [{"role": "user", "content": "a " * 200}, *records[0]["messages"][1:]]}
    ds = SFTDataset([*records, long], tok, 40, pack=True)
    assert ds.skipped == 1 and len(ds.record_ids) == 20
    assert "1 of 21 records skipped as longer than 41 tokens" in ds.summary()
    with pytest.raises(DataError, match="all 1 SFT records are longer than seq_len") as err:
        SFTDataset([long], tok, 40, pack=False)
    assert "\n" not in str(err.value)
    pairs = preference_pairs("train", 10, seed=0)
    pairs.append({**pairs[0], "rejected": "no " * 100})
    pref = PreferenceDataset(pairs, tok, 40)
    assert (pref.skipped, len(pref)) == (1, 10)
    assert "1 of 11 skipped" in pref.summary()
    prompts = PromptDataset([*records, long], tok, 40)
    assert (prompts.skipped, len(prompts)) == (1, 20)


def test_sft_record_without_answer_is_an_error(tok) -> None:
    with pytest.raises(DataError, match="SFT record 1: no assistant message"):
        no_answer = {"messages": [{"role": "user", "content": "x"}]}
        SFTDataset([*task_examples("train", 1, 0), no_answer], tok, 64)


# --- preference rows and prompts ------------------------------------------------------------------


def test_preference_rows(tok) -> None:
    pairs = preference_pairs("train", 30, seed=0)
    multi = {  # the prompt has an assistant turn of its own, which is not learned
        "prompt": [
            {"role": "user", "content": "Hello there!"},
            {"role": "assistant", "content": "Sure, I can help."},
            {"role": "user", "content": "What is 2 + 2?"},
        ],
        "chosen": "4",
        "rejected": "I think it is 4.",
    }
    ds = PreferenceDataset([*pairs, multi], tok, 64)
    end_id = tok.convert_tokens_to_ids(END)
    for i, record in enumerate([*pairs, multi]):
        row = ds[i]
        for side in ("chosen", "rejected"):
            ids, labels = row[f"{side}_ids"], row[f"{side}_labels"]
            mask, last = row[f"{side}_mask"], int(row[f"{side}_last"])
            width = int(ds.lengths[i])  # a pair alone is as wide as its longer chat
            assert (
                ids.shape == labels.shape == mask.shape == (width,)
                and row[f"{side}_last"].ndim == 0
            )
            assert labelled_text(tok, labels) == record[side] + END
            # The row ends where apply_chat_template ends: with the newline after <|end|>, which
            # is the token a reward model (and transformers' classifier) reads.
            assert ids[last - 1] == end_id and tok.decode([int(ids[last])]) == "\n"
            assert mask.sum() == last + 1
            assert (ids[last + 1 :] == tok.pad_token_id).all() and (labels[last:] == IGNORE).all()
    batch = ds.get_batch([0, 30])  # padded to the longest chat of the two pairs
    assert batch["chosen_ids"].shape == (2, max(ds.lengths[[0, 30]])) == batch["rejected_ids"].shape
    assert batch["chosen_last"].shape == (2,)
    assert ds.get_batch([0, 30], pad_to=64)["chosen_ids"].shape == (2, 64)


def test_prompt_dataset(tok) -> None:
    records = task_examples("heldout", 10, seed=0) + user_sft(4)
    prompts = PromptDataset(records, tok, 64)
    assert len(prompts) == 14
    assert prompts.tasks[:5] == list(TASKS) and prompts.tasks[-1] == "custom"
    for ids, record, answer in zip(prompts.prompt_ids, records, prompts.answers, strict=True):
        text = tok.decode(ids)
        assert text.endswith("<|assistant|>\n")
        last = [m for m in record["messages"] if m["role"] == "assistant"][-1]["content"]
        assert answer == record.get("answer", last)
        assert last not in text.split("<|assistant|>")[-1]
    scores = prompts.exact_match([f" {a}\n" for a in prompts.answers[:-1]] + ["wrong"])
    assert scores["add"] == 1.0 and scores["custom"] == 0.75 and scores["all"] == 13 / 14


# --- user files -----------------------------------------------------------------------------------


PROMPT_COMPLETION = [{"prompt": f"What is {i} + 1?", "completion": str(i + 1)} for i in range(10)]
PREFERENCE = [
    {"prompt": f"What is {i} + 1?", "chosen": str(i + 1), "rejected": f"I think it is {i + 1}."}
    for i in range(10)
]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_user_files_load_in_each_format(tok, tmp_path: Path, suffix: str) -> None:
    sft_file = write(tmp_path / f"chats{suffix}", user_sft(20))
    pc_file = write(tmp_path / f"pc{suffix}", PROMPT_COMPLETION)
    pref_file = write(tmp_path / f"pref{suffix}", PREFERENCE)
    assert read_chat_records(str(sft_file), "auto", "sft") == [
        {**r, "answer": None} for r in user_sft(20)
    ]
    assert read_chat_records(str(pc_file), "auto", "sft") == [
        {"messages": [{"role": "user", "content": r["prompt"]},
                      {"role": "assistant", "content": r["completion"]}], "answer": None}
        for r in PROMPT_COMPLETION
    ]  # fmt: skip
    assert read_chat_records(str(pref_file), "preference", "preference") == [
        {**r, "prompt": [{"role": "user", "content": r["prompt"]}], "answer": None}
        for r in PREFERENCE
    ]
    for source in (sft_file, pc_file, pref_file):
        cfg = ChatDataConfig(source=str(source), seq_len=64, heldout_fraction=0.3)
        train, heldout = load_sft_data(cfg, tok)
        assert len(train.record_ids) + len(heldout) in (10, 20) and heldout
        assert labelled_text(tok, train[0]["labels"]).endswith(END)
    cfg = ChatDataConfig(source=str(pref_file), heldout_source=str(pref_file), seq_len=64)
    train, heldout = load_preference_data(cfg, tok)
    assert len(train) == len(heldout) == 10
    with pytest.raises(DataError, match="preference training needs 'prompt', 'chosen' and"):
        load_preference_data(ChatDataConfig(source=str(pc_file)), tok)


def test_user_split_is_by_prompt_hash(tok, tmp_path: Path) -> None:
    records = [
        *PROMPT_COMPLETION * 3,
        *({"prompt": f"Hi {i}", "completion": "Hi"} for i in range(60)),
    ]
    source = write(tmp_path / "data.jsonl", records)
    train, heldout = split_records(read_chat_records(str(source), "auto", "sft"), 0.25, "data")
    assert len(train) + len(heldout) == 90 and 5 < len(heldout) < 45

    def prompts(rs: list[dict]) -> set[str]:
        return {r["messages"][0]["content"] for r in rs}

    assert not prompts(train) & prompts(heldout)  # the 3 copies of a prompt stay together
    cfg = ChatDataConfig(source=str(source), heldout_fraction=0.25, pack=False)
    ds, loaded = load_sft_data(cfg, tok)
    assert loaded == heldout and len(ds) == len(train)


def test_preference_forms(tmp_path: Path) -> None:
    chat = [{"role": "user", "content": "Hi"}]
    records = [
        {"prompt": chat, "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": "Hi."},
        {"chosen": [*chat, {"role": "assistant", "content": "Hello!"}],
         "rejected": [*chat, {"role": "assistant", "content": "Go away."}]},
    ]  # fmt: skip
    source = tmp_path / "pref.json"
    source.write_text(json.dumps(records), "utf-8")  # a .json array; mixed forms per field
    assert read_chat_records(str(source), "auto", "preference") == [
        {"prompt": chat, "chosen": "Hello!", "rejected": "Hi.", "answer": None},
        {"prompt": chat, "chosen": "Hello!", "rejected": "Go away.", "answer": None},
    ]
    records[1]["rejected"][0] = {"role": "user", "content": "Hey"}
    source.write_text(json.dumps(records), "utf-8")
    with pytest.raises(DataError, match=r"record 1: 'chosen' and 'rejected' answer different"):
        read_chat_records(str(source), "auto", "preference")


# --- errors ---------------------------------------------------------------------------------------

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
BAD = [
    ({"prompt": "Hi"}, "auto", "missing field 'completion' (its fields: prompt)"),
    ({"messages": []}, "auto", "'messages' is an empty list"),
    (
        {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
        "auto",
        "message 1 has unknown role 'bot'; use system, user or assistant",
    ),
    (
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "b"}]},
        "auto",
        "the content of message 0 is a number, not a string",
    ),
    ({"messages": [{"role": "user", "content": "a"}]}, "auto", "no assistant message"),
    (
        {
            "messages": [
                {"role": "user", "content": "a<|end|>"},
                {"role": "assistant", "content": "b"},
            ]
        },
        "auto",
        "contains the special token <|end|>",
    ),
    ({"prompt": "a", "chosen": "b", "rejected": "b"}, "preference", "are the same text"),
    ({"prompt": "a", "chosen": "b"}, "preference", "missing field 'rejected' (its fields: prompt"),
]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize(("bad", "fmt", "message"), BAD)
def test_bad_record_names_file_and_record(
    tmp_path: Path, suffix: str, bad: dict, fmt: str, message: str
) -> None:
    if fmt == "preference":
        good = {"prompt": "a", "chosen": "b", "rejected": "c"}
        kind = "preference"
    else:
        good, kind = (GOOD if "messages" in bad else PROMPT_COMPLETION[0]), "sft"
    if suffix == ".parquet" and "a number" in message:
        pytest.skip("a parquet column has one type")
    path = write(tmp_path / f"data{suffix}", [good, good, bad, good])
    if suffix == ".jsonl":  # a blank line: record 2 is on line 4
        lines = path.read_text("utf-8").splitlines(keepends=True)
        path.write_text("".join([*lines[:2], "\n", *lines[2:]]), "utf-8")
    with pytest.raises(DataError) as err:
        read_chat_records(str(path), fmt, kind)
    text = str(err.value)
    assert "\n" not in text
    where = f"{path} record 2" + (" (line 4)" if suffix == ".jsonl" else "")
    assert text.startswith(f"{where}: "), text
    assert message in text, text


def test_file_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", "utf-8")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n", "utf-8")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(GOOD) + "\n{not json\n", "utf-8")
    odd = write(tmp_path / "odd.jsonl", [{"text": "hello"}])
    cases = [
        (empty, f"{empty}: the file is empty"),
        (blank, f"{blank}: the file has no records"),
        (broken, f"{broken} line 2: invalid JSON"),
        (odd, f"{odd} record 0 (line 1): cannot tell the record format from the fields (text)"),
        (tmp_path / "missing.jsonl", "data.source '"),
    ]
    for path, message in cases:
        with pytest.raises(DataError) as err:
            read_chat_records(str(path), "auto", "sft")
        assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)
    folder = tmp_path / "dir"
    folder.mkdir()
    write(folder / "a.jsonl", [GOOD] * 3)
    (folder / "b.json").write_text(json.dumps([GOOD, {"messages": "hi"}]), "utf-8")
    with pytest.raises(DataError) as err:  # record 1 of the second file, a JSON array
        read_chat_records(str(folder), "auto", "sft")
    assert str(err.value).startswith(f"{folder / 'b.json'} record 1: 'messages' is a string")
    with pytest.raises(DataError, match=r"data.heldout_source '.*no such file"):
        load_sft_data(ChatDataConfig(heldout_source=str(tmp_path / "nope.jsonl")), None)


def test_config() -> None:
    assert len(describe(ChatDataConfig)) == 13  # every field documented
    cfg = from_dict(ChatDataConfig, {"tasks": ["add", "sort"], "seq_len": 64}, prefix="data")
    assert cfg.tasks == ["add", "sort"] and cfg.format == "auto"
    with pytest.raises(ConfigError, match=r"data.tasks: unknown task 'divide'"):
        from_dict(ChatDataConfig, {"tasks": ["divide"]}, prefix="data")
    with pytest.raises(ConfigError, match=r"data.format: expected one of"):
        from_dict(ChatDataConfig, {"format": "sharegpt"}, prefix="data")
    with pytest.raises(ConfigError, match=r"data.tasks: selects builtin tasks"):
        from_dict(ChatDataConfig, {"tasks": ["add"], "source": "x.jsonl"}, prefix="data")


def test_builtin_entry_points(tok) -> None:
    cfg = ChatDataConfig(num_train=300, num_heldout=40, tasks=["add", "count"], seq_len=64)
    train, heldout = load_sft_data(cfg, tok)
    assert len(train.record_ids) == 300 and len(heldout) == 40
    assert {r["task"] for r in heldout} == {"add", "count"}
    prompts = PromptDataset(heldout, tok, cfg.seq_len)
    assert prompts.answers == [r["answer"] for r in heldout]
    pref_train, pref_heldout = load_preference_data(cfg, tok)
    assert (len(pref_train), len(pref_heldout)) == (300, 40)
