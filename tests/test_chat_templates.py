"""Every chat stage trains with the model's own tokenizer and chat template: lmforge's, ChatML,
Llama-3 headers and a template with a default system prompt, each on a tokenizer trained here.

For each: the ids and assistant mask lmforge trains on equal transformers' own
(`apply_chat_template(..., return_assistant_tokens_mask=True)`), with or without {% generation %}
markers in the template; prompts are the template's; generation stops on the model's own ids;
a reward model scores `apply_chat_template` ids in transformers as lmforge does; and a real SFT
run from a ChatML checkpoint learns and saves that template."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import small_config
from stagerun import losses, run_stage
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast

from lmforge.checkpoint import save_checkpoint
from lmforge.data.chat import ChatDataConfig, chat_tokenizer
from lmforge.data.chat_datasets import IGNORE, PreferenceDataset, PromptDataset, SFTDataset
from lmforge.data.tasks import task_examples
from lmforge.data.templates import (
    CHATML_TEMPLATE,
    ChatEncoder,
    end_of_turn,
    has_generation_markers,
    stop_token_ids,
)
from lmforge.errors import ConfigError, DataError
from lmforge.model import build_model
from lmforge.reward import build_reward_model
from lmforge.stage import stop_ids
from lmforge.tokenizer import (
    CHAT_TEMPLATE,
    CHAT_TEMPLATE_V1,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)

CHATTER = [
    "You are a helpful assistant.",
    "Hello there! Sure, I can help. The capital of France is Paris. Thanks, bye.",
    "Let me think about it. First add the numbers, then check the result.",
]
TEXTS = [m["content"] for e in task_examples("train", 800, 3) for m in e["messages"]] + CHATTER * 20

# Test templates, written here (not lmforge's named ones) with {% generation %} around what an
# assistant turn learns: its content and its end-of-turn token.
CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- message['content'] + '<|im_end|>' -}}{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
LLAMA3 = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] | trim + '<|eot_id|>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- message['content'] | trim + '<|eot_id|>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)
DEFAULT_SYSTEM = (
    "{%- if messages[0] is not defined or messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}" + CHATML
)
# Earlier assistant turns lose their reasoning (as some reasoning models' templates do).
DROPS_REASONING = CHATML.replace(
    "message['content'] + '<|im_end|>' -}}{%- endgeneration",
    "(message['content'].split('</think>')[-1] if not loop.last else message['content'])"
    " + '<|im_end|>' -}}{%- endgeneration",
)


def without_markers(template: str) -> str:
    """The same template with its {% generation %} / {% endgeneration %} tags removed."""
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


def byte_bpe(specials: list[str], **kwargs: Any) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on TEXTS with `specials` first (ids 0..)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TEXTS, trainer=trainer)
    bos = kwargs.get("bos_token")
    if bos is not None:  # like Llama 3: plain encoding adds BOS; chat templates write their own
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, specials.index(bos))]
        )
    named = {v for k, v in kwargs.items() if k.endswith("_token")}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        additional_special_tokens=[s for s in specials if s not in named],
        clean_up_tokenization_spaces=False,
        **kwargs,
    )


def build_family(name: str) -> tuple[PreTrainedTokenizerFast, list[int]]:
    """(tokenizer with its marked template, the eos_token_id list of its generation config)."""
    if name == "lmforge":
        return train_tokenizer(TEXTS, 420), [1, 7]
    if name == "llama3":
        specials = [
            "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>",
        ]  # fmt: skip
        tok = byte_bpe(specials, bos_token=specials[0], eos_token=specials[1])
        tok.chat_template = LLAMA3
        return tok, [1, 4]  # stop on <|end_of_text|> and <|eot_id|>, like Llama 3 Instruct
    tok = byte_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos_token="<|endoftext|>")
    tok.chat_template = CHATML if name == "chatml" else DEFAULT_SYSTEM
    return tok, []


FAMILIES = ("lmforge", "chatml", "llama3", "default_system")
CHATS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a city."},
        {"role": "assistant", "content": "Paris, the capital of France."},
    ],
    [
        {"role": "user", "content": "Hello there!"},
        {"role": "assistant", "content": "Hello! Sure, I can help."},
        {"role": "user", "content": "  Reverse the word: cat \n"},
        {"role": "assistant", "content": "\n\ntac"},
        {"role": "user", "content": "Thanks, bye."},
        {"role": "assistant", "content": " Bye! "},
    ],
    [{"role": "assistant", "content": "I start."}, {"role": "user", "content": "Go on."}],
]


# These models are tiny: one intra-op thread is faster (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each family's tokenizer saved as a checkpoint keeps it (with its generation config)."""
    out = {}
    for name in FAMILIES:
        tok, eos = build_family(name)
        directory = tmp_path_factory.mktemp(name)
        save_tokenizer(tok, directory)
        if eos:
            (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
        out[name] = directory
    return out


def load(saved: dict[str, Path], name: str, *, markers: bool = True) -> PreTrainedTokenizerFast:
    tok = load_tokenizer(saved[name])
    if not markers:
        tok.chat_template = without_markers(tok.chat_template)
    return chat_tokenizer(tok, ChatDataConfig())


def hf_ids_and_mask(tok: PreTrainedTokenizerFast, messages: list, gen: bool = False) -> tuple:
    out = tok.apply_chat_template(
        messages, add_generation_prompt=gen, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(out["input_ids"]), list(out["assistant_masks"])


# ------------------------------------------------------------------------- ids and masks


@pytest.mark.parametrize("markers", [True, False], ids=["markers", "prefixes"])
@pytest.mark.parametrize("name", FAMILIES)
def test_sft_rows_equal_transformers_ids_and_assistant_mask(
    saved: dict[str, Path], name: str, markers: bool
) -> None:
    reference = load(saved, name)  # the saved tokenizer, with its {% generation %} markers
    tok = load(saved, name, markers=markers)
    assert has_generation_markers(tok.chat_template) == markers
    records = [{"messages": chat} for chat in CHATS]
    rows = SFTDataset(records, tok, 96, pack=False)
    assert rows.skipped == 0
    learned = 0
    for i, chat in enumerate(CHATS):
        ids, mask = hf_ids_and_mask(reference, chat)
        assert sum(mask) > 0 and ChatEncoder(tok).encode(chat) == (ids, mask)
        row = rows[i]
        n = int(row["attention_mask"].sum())
        assert row["input_ids"][:n].tolist() == ids[:-1]  # the last token only ever is a label
        want = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:], strict=True)]
        assert row["labels"][:n].tolist() == want
        learned += sum(mask)
    # the learned text is each assistant turn's content and its end-of-turn token
    turn_end = {"lmforge": "<|end|>", "llama3": "<|eot_id|>"}.get(name, "<|im_end|>")
    ids, mask = ChatEncoder(tok).encode(CHATS[1])
    assert tok.decode([t for t, m in zip(ids, mask, strict=True) if m]).endswith(
        "Paris, the capital of France." + turn_end
    )
    assert learned == rows.num_label_tokens  # no chat starts with a learned token


@pytest.mark.parametrize("name", FAMILIES)
def test_saved_tokenizer_renders_the_trained_ids(
    saved: dict[str, Path], name: str, tmp_path: Path
) -> None:
    tok = load(saved, name)
    rows = SFTDataset([{"messages": c} for c in CHATS], tok, 96, pack=False)
    save_tokenizer(tok, tmp_path)  # what a stage's checkpoint holds
    again = load_tokenizer(tmp_path)
    assert again.chat_template == tok.chat_template
    for i, chat in enumerate(CHATS):
        n = int(rows[i]["attention_mask"].sum())
        assert rows[i]["input_ids"][:n].tolist() == hf_ids_and_mask(again, chat)[0][:-1]


@pytest.mark.parametrize("name", FAMILIES)
def test_prompts_are_the_templates_generation_prompt_with_one_bos(
    saved: dict[str, Path], name: str
) -> None:
    tok = load(saved, name)
    records = [{"messages": c} for c in CHATS[:3]]
    prompts = PromptDataset(records, tok, 96)
    assert len(prompts) == 3
    for ids, chat in zip(prompts.prompt_ids, CHATS, strict=False):
        prompt = chat[:-1]
        assert ids == hf_ids_and_mask(tok, prompt, gen=True)[0]
        if tok.bos_token is not None:
            assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    if name == "llama3":  # plain encoding adds BOS, yet the template's own is the only one
        assert tok("hi")["input_ids"][0] == tok.bos_token_id


def test_stop_ids_are_the_models_own(saved: dict[str, Path]) -> None:
    lm, chatml, llama = (load(saved, n) for n in ("lmforge", "chatml", "llama3"))
    assert stop_ids(lm) == [1, 7]  # <|eos|>, <|end|>: as before
    assert stop_ids(train_tokenizer(TEXTS, 420)) == [1, 7]  # without a generation config too
    assert stop_ids(chatml) == [chatml.eos_token_id, chatml.convert_tokens_to_ids("<|im_end|>")]
    eot = llama.convert_tokens_to_ids("<|eot_id|>")
    assert stop_token_ids(llama) == [llama.eos_token_id, eot]  # from generation_config.json
    # what each template writes after the end-of-turn token: lmforge / ChatML a newline
    for tok, end, suffix in (
        (lm, "<|end|>", "\n"),
        (chatml, "<|im_end|>", "\n"),
        (llama, "<|eot_id|>", ""),
    ):
        ends, after = end_of_turn(tok)
        assert tok.convert_ids_to_tokens(ends) == [end] and tok.decode(after) == suffix


def test_lmforge_template_keeps_its_ids_and_gains_markers(saved: dict[str, Path]) -> None:
    tok = load(saved, "lmforge")
    assert tok.chat_template == CHAT_TEMPLATE and has_generation_markers(CHAT_TEMPLATE)
    old = load(saved, "lmforge")
    old.chat_template = CHAT_TEMPLATE_V1  # a checkpoint saved before the markers
    for chat in CHATS:
        for gen in (False, True):
            ids = tok.apply_chat_template(chat, add_generation_prompt=gen)["input_ids"]
            assert ids == old.apply_chat_template(chat, add_generation_prompt=gen)["input_ids"]
        assert ChatEncoder(old).encode(chat) == ChatEncoder(tok).encode(chat)


# ----------------------------------------------------------------------------- errors


def test_a_template_that_rewrites_earlier_turns_is_one_line(saved: dict[str, Path]) -> None:
    tok = load(saved, "chatml")
    chat = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "Let me think.</think>4"},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "Add them.</think>6"},
    ]
    tok.chat_template = without_markers(DROPS_REASONING)
    with pytest.raises(ConfigError, match="renders assistant message 1 differently") as err:
        SFTDataset([{"messages": chat}], tok, 96)
    message = str(err.value)
    assert "\n" not in message and "record 0" in message and "data.chat_template" in message
    # With markers the same template works: transformers' mask needs no prefix to agree.
    tok.chat_template = DROPS_REASONING
    ids, mask = ChatEncoder(tok).encode(chat)
    assert (ids, mask) == hf_ids_and_mask(tok, chat)
    assert tok.decode([t for t, m in zip(ids, mask, strict=True) if m]) == "4<|im_end|>" + (
        "Add them.</think>6<|im_end|>"
    )


def test_a_tokenizer_without_template_names_data_chat_template(
    saved: dict[str, Path], tmp_path: Path
) -> None:
    tok = load_tokenizer(saved["chatml"])
    tok.chat_template = None
    for build in (
        lambda: chat_tokenizer(tok, ChatDataConfig()),
        lambda: SFTDataset([{"messages": CHATS[0]}], tok, 64),
        lambda: PromptDataset([{"messages": CHATS[0]}], tok, 64),
    ):
        with pytest.raises(
            ConfigError, match=r"has no chat template: set data\.chat_template"
        ) as e:
            build()
        assert "\n" not in str(e.value)
    # A named template (or a Jinja file) gives it one, which it then saves.
    chat_tokenizer(tok, ChatDataConfig(chat_template="chatml"))
    assert tok.chat_template == CHATML_TEMPLATE
    save_tokenizer(tok, tmp_path / "named")
    assert (
        json.loads((tmp_path / "named" / "tokenizer_config.json").read_text())["chat_template"]
        == CHATML_TEMPLATE
    )
    jinja = tmp_path / "mine.jinja"
    jinja.write_text(DEFAULT_SYSTEM)
    chat_tokenizer(tok, ChatDataConfig(chat_template=str(jinja)))
    assert load_tokenizer(save_tokenizer(tok, tmp_path / "file")[0].parent).chat_template == (
        DEFAULT_SYSTEM
    )
    # lmforge's template needs lmforge's tokens; a name or file that does not exist is refused
    with pytest.raises(ConfigError, match=r"data.chat_template: template 'lmforge' writes <\|bos"):
        chat_tokenizer(tok, ChatDataConfig(chat_template="lmforge"))
    with pytest.raises(ConfigError, match=r"data\.chat_template: 'vicuna' is neither a named"):
        ChatDataConfig(chat_template="vicuna").validate()


def test_a_missing_pad_token_reuses_an_existing_one(saved: dict[str, Path]) -> None:
    tok = load_tokenizer(saved["chatml"])
    size = len(tok)
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"  # no token added: same vocabulary
    rows = SFTDataset([{"messages": c} for c in CHATS], tok, 96, pack=False)
    assert len(tok) == size and rows.pad_id == tok.eos_token_id


@pytest.mark.parametrize("markers", [True, False], ids=["markers", "prefixes"])
@pytest.mark.parametrize("name", FAMILIES)
def test_preference_rows_learn_only_the_answer_and_end_where_the_template_ends(
    saved: dict[str, Path], name: str, markers: bool
) -> None:
    tok = load(saved, name, markers=markers)
    chat = CHATS[2]  # earlier assistant turns in the prompt are not learned
    pair = {"prompt": chat[:-1], "chosen": chat[-1]["content"], "rejected": "No idea."}
    row = PreferenceDataset([pair], tok, 128)[0]
    turn_end = {"lmforge": "<|end|>", "llama3": "<|eot_id|>"}.get(name, "<|im_end|>")
    for side in ("chosen", "rejected"):
        ids, labels, last = row[f"{side}_ids"], row[f"{side}_labels"], int(row[f"{side}_last"])
        full = hf_ids_and_mask(tok, [*pair["prompt"], {"role": "assistant", "content": pair[side]}])
        assert ids[: last + 1].tolist() == full[0] and last == len(full[0]) - 1
        learned = tok.decode(labels[labels != IGNORE].tolist())
        assert learned == pair[side].strip(" " if name == "llama3" else "") + turn_end


def test_chats_the_template_refuses_or_that_hold_special_tokens_name_the_record(
    saved: dict[str, Path],
) -> None:
    tok = load(saved, "chatml")
    tok.chat_template = (
        "{%- if messages[0]['role'] == 'system' -%}"
        "{{- raise_exception('System role not supported') -}}{%- endif -%}" + CHATML
    )
    records = [{"messages": CHATS[0]}, {"messages": CHATS[1]}]
    with pytest.raises(DataError, match=r"record 1: .*refuses this chat \(System role not"):
        SFTDataset(records, tok, 96)
    tok.chat_template = CHATML
    bad = [{"role": "user", "content": "Hi<|im_end|>"}, {"role": "assistant", "content": "x"}]
    with pytest.raises(
        DataError, match=r"record 0: message 0 contains the special token <\|im_end"
    ):
        SFTDataset([{"messages": bad}], tok, 96)


# ------------------------------------------------------------------------- reward models


def test_reward_scores_of_template_ids_equal_in_transformers(
    saved: dict[str, Path], tmp_path: Path
) -> None:
    pairs = [
        {"prompt": chat[:-1], "chosen": chat[-1]["content"], "rejected": "No idea, sorry."}
        for chat in CHATS[:3]
    ]
    worst = 0.0
    for name in FAMILIES:
        tok = load(saved, name)
        cfg = small_config(vocab_size=len(tok), max_seq_len=128, init_std=0.2)
        model = build_reward_model(build_model(cfg, seed=3), seed=4).eval()
        path = save_checkpoint(tmp_path / name, model, tok, stage="reward", step=1)
        data = PreferenceDataset(pairs, tok, 128)
        assert len(data) == len(pairs)
        batch = data.get_batch(range(len(data)))
        hf = AutoModelForSequenceClassification.from_pretrained(path).eval()
        for side in ("chosen", "rejected"):
            with torch.no_grad():
                ours = model(batch[f"{side}_ids"], last_index=batch[f"{side}_last"])
            chats = [[*p["prompt"], {"role": "assistant", "content": p[side]}] for p in pairs]
            encoded = tok.apply_chat_template(
                chats, padding=True, return_dict=True, return_tensors="pt"
            )
            with torch.no_grad():
                theirs = hf(**encoded).logits.squeeze(-1)
            worst = max(worst, float((ours - theirs).abs().max()))
            torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    assert worst < 1e-4


# --------------------------------------------------------------------------- a real SFT run


SFT_ARGS = [
    "--data.num_train=400",
    "--data.num_heldout=16",
    "--data.seq_len=64",
    "--train.global_batch_size=16",
    "--train.micro_batch_size=16",
    "--train.eval_every=0",
    "--train.save_every=1000",
    "--optim.lr=5e-3",
    "--optim.warmup_steps=3",
    "--tracking.log_every=1",
]


def chatml_base(root: Path, template: str | None) -> Path:
    """A random-weight checkpoint whose tokenizer is the ChatML one (no lmforge tokens)."""
    tok, _ = build_family("chatml")
    tok.chat_template = template
    cfg = small_config(vocab_size=len(tok), dim=64, max_seq_len=128)
    save_checkpoint(
        root / "step-000000", build_model(cfg, seed=0), tok, update_latest=True,
        stage="pretrain", step=0,
    )  # fmt: skip
    return root


@pytest.mark.slow
def test_sft_from_a_chatml_checkpoint_learns_and_keeps_its_template(tmp_path: Path) -> None:
    base = chatml_base(tmp_path / "base", CHATML)
    run = tmp_path / "sft"
    run_stage("finetune/sft.py", [*SFT_ARGS, f"--init_from={base}", f"--run_dir={run}",
                                  "--train.steps=30"])  # fmt: skip
    curve = losses(run)
    assert curve[30] < curve[1] - 0.5, curve
    latest = run / (run / "latest").read_text().strip()
    out = load_tokenizer(latest)
    assert out.chat_template == CHATML
    assert out.convert_tokens_to_ids("<|im_end|>") in stop_ids(out)  # answers stop at its turn end
    # the output renders exactly the ids the run trained on (rows built as the stage builds them)
    records = [{"messages": c} for c in CHATS[:3]]
    start = chat_tokenizer(load_tokenizer(base / "step-000000"), ChatDataConfig())
    trained = SFTDataset(records, start, 96, pack=False)
    for i, record in enumerate(records):
        ids, mask = hf_ids_and_mask(out, record["messages"])
        n = int(trained[i]["attention_mask"].sum())
        assert trained[i]["input_ids"][:n].tolist() == ids[:-1]
        assert trained[i]["labels"][:n].tolist() == [
            t if m else IGNORE for t, m in zip(ids[1:], mask[1:], strict=True)
        ]


@pytest.mark.slow
def test_sft_from_a_checkpoint_without_template_needs_data_chat_template(tmp_path: Path) -> None:
    base = chatml_base(tmp_path / "base", None)
    proc = run_stage(
        "finetune/sft.py",
        [*SFT_ARGS, f"--init_from={base}", f"--run_dir={tmp_path / 'run'}", "--train.steps=2"],
        check=False,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-2000:]
    assert "data.chat_template" in errors[0] and "Traceback" not in proc.stderr
    # Naming a template trains with it and saves it into the output's tokenizer.
    run = tmp_path / "named"
    args = [f"--init_from={base}", f"--run_dir={run}", "--train.steps=2"]
    run_stage("finetune/sft.py", [*SFT_ARGS, *args, "--data.chat_template=chatml"])
    assert load_tokenizer(run / (run / "latest").read_text().strip()).chat_template == (
        CHATML_TEMPLATE
    )
