"""End to end with someone else's model: a random Llama-3-style model (llama3 RoPE scaling,
grouped-query attention, untied embeddings, a vocabulary padded past the tokenizer) and a
Llama-3-style tokenizer (header template, no pad token, two end ids), both made here with
transformers and tokenizers, go through SFT -> reward -> DPO -> GRPO -> PPO in lmforge. Every
output loads in a process that never imports lmforge: it is a `LlamaFor...` class, renders the
ids lmforge trained on, scores (reward) and answers greedily (policies) exactly as lmforge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from stagerun import final_metrics, losses, plain_transformers, run_stage
from test_chat_templates import LLAMA3, byte_bpe
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from lmforge.checkpoint import load_checkpoint, load_reward_model
from lmforge.data.chat import ChatDataConfig, chat_records, chat_tokenizer
from lmforge.data.chat_datasets import PreferenceDataset, PromptDataset
from lmforge.generate import GenerateConfig, generate
from lmforge.stage import stop_ids

pytestmark = pytest.mark.slow

SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>",
]  # fmt: skip
DATA = ["--data.num_train=400", "--data.num_heldout=8", "--data.seq_len=96"]
RUN = [
    "--train.eval_every=0",
    "--train.save_every=1000",
    "--optim.warmup_steps=2",
    "--optim.weight_decay=0",
    "--tracking.log_every=1",
]


def llama3_model(directory: Path) -> Path:
    """A random LlamaForCausalLM with Llama 3's shape choices and tokenizer, saved by
    transformers (no lmforge involved)."""
    tok = byte_bpe(SPECIALS, bos_token=SPECIALS[0], eos_token=SPECIALS[1])
    tok.chat_template = LLAMA3
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    cfg = LlamaConfig(
        vocab_size=448,  # padded past the tokenizer's 420, as real checkpoints are
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        rope_theta=500000.0,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, eot],
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    ends = [tok.eos_token_id, eot]  # Llama 3 Instruct stops on <|end_of_text|> and <|eot_id|>
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=ends).save_pretrained(directory)
    return directory


OUTSIDE = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
job = json.loads(sys.argv[1])
path, kind, messages, answer = job["path"], job["kind"], job["messages"], job["answer"]
tok = AutoTokenizer.from_pretrained(path)
out = {"class": None}
if kind == "lm":
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    ids = rendered["input_ids"]
    gen = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    out.update(prompt=list(ids), answer=gen[0, len(ids):].tolist())
else:
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    chat = messages + [{"role": "assistant", "content": answer}]
    ids = tok.apply_chat_template(chat, return_dict=True)["input_ids"]
    out.update(ids=list(ids), score=model(torch.tensor([ids])).logits[0, 0].item())
out["class"] = type(model).__name__
out["lmforge_imported"] = "lmforge" in sys.modules
print(json.dumps(out))
"""


def outside(run: Path, kind: str, messages: list, answer: str = "") -> dict:
    """What plain transformers does with the run's latest checkpoint folder, in a process
    without lmforge."""
    path = run / (run / "latest").read_text().strip()
    job = {"path": str(path), "kind": kind, "messages": messages, "answer": answer}
    return plain_transformers(OUTSIDE, job, run)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama3")
    hf = llama3_model(root / "hf")
    out = {"hf": hf, **{k: root / k for k in ("sft", "reward", "dpo", "grpo", "ppo")}}
    base = [*DATA, *RUN, "--train.global_batch_size=16", "--train.micro_batch_size=16"]
    run_stage("finetune/sft.py", [*base, f"--init_from={hf}", f"--run_dir={out['sft']}",
                                  "--train.steps=40", "--optim.lr=3e-3"])  # fmt: skip
    sft = out["sft"]
    run_stage("finetune/reward.py", [*base, f"--init_from={sft}", f"--run_dir={out['reward']}",
                                     "--train.steps=20", "--optim.lr=1e-3"])  # fmt: skip
    run_stage("finetune/dpo.py", [*base, f"--init_from={sft}", f"--run_dir={out['dpo']}",
                                  "--train.steps=6", "--optim.lr=1e-4"])  # fmt: skip
    rl = [*DATA, *RUN, "--max_new_tokens=8", "--train.steps=2", "--optim.lr=1e-4"]
    run_stage("finetune/grpo.py", [*rl, f"--init_from={sft}", f"--run_dir={out['grpo']}",
                                   "--group_size=4", "--train.global_batch_size=16",
                                   "--train.micro_batch_size=8"])  # fmt: skip
    run_stage("finetune/ppo.py", [*rl, f"--init_from={sft}", f"--run_dir={out['ppo']}",
                                  f"--reward_model={out['reward']}",
                                  "--train.global_batch_size=8",
                                  "--train.micro_batch_size=8"])  # fmt: skip
    return out


def test_sft_learns_and_every_output_stays_a_llama(runs: dict[str, Path]) -> None:
    sft = losses(runs["sft"])
    assert sft[max(sft)] < 0.6 * sft[1], sft
    for name in ("sft", "dpo", "grpo", "ppo"):
        step = (runs[name] / "latest").read_text().strip()
        config = json.loads((runs[name] / step / "config.json").read_text())
        assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
        rope = config.get("rope_parameters") or config.get("rope_scaling")  # transformers 5 or 4
        assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0, rope
        assert config["tie_word_embeddings"] is False and config["num_key_value_heads"] == 2


@pytest.mark.parametrize("name", ["sft", "dpo", "grpo", "ppo"])
def test_policies_render_and_answer_outside_as_in_lmforge(runs: dict[str, Path], name: str):
    model, tok, _ = load_checkpoint(runs[name])
    tok = chat_tokenizer(tok, ChatDataConfig())
    messages = [{"role": "user", "content": "Count the letter a in banana."}]
    prompts = PromptDataset([{"messages": [*messages, {"role": "assistant", "content": "3"}],
                              "answer": "3"}], tok, 96)  # fmt: skip
    ids = prompts.prompt_ids[0]
    cfg = GenerateConfig(max_new_tokens=8, temperature=0)
    ours = generate(model, [ids], cfg, eos_ids=stop_ids(tok), pad_id=tok.pad_token_id)
    theirs = outside(runs[name], "lm", messages)
    assert theirs["class"] == "LlamaForCausalLM"
    assert theirs["prompt"] == ids and ids.count(tok.bos_token_id) == 1
    answer = ours.tokens[0, : int(ours.lengths[0])].tolist()
    assert theirs["answer"] == answer, (theirs["answer"], answer)


def test_reward_model_scores_outside_as_in_lmforge(runs: dict[str, Path]) -> None:
    model, tok, _ = load_reward_model(runs["reward"])
    tok = chat_tokenizer(tok, ChatDataConfig())
    cfg = ChatDataConfig(num_train=400, num_heldout=8, seq_len=96)
    record = chat_records(cfg, "preference")[1][0]
    batch = PreferenceDataset([record], tok, 96).get_batch([0])
    last = int(batch["chosen_last"][0])
    with torch.no_grad():
        ours = model(batch["chosen_ids"], last_index=batch["chosen_last"]).item()
    theirs = outside(runs["reward"], "reward", record["prompt"], record["chosen"])
    assert theirs["class"] == "LlamaForSequenceClassification"
    assert theirs["ids"] == batch["chosen_ids"][0, : last + 1].tolist()
    assert abs(theirs["score"] - ours) < 1e-4, (theirs["score"], ours)
    end = final_metrics(runs["reward"])
    assert end["eval/accuracy"] >= end["eval_before/accuracy"], end
