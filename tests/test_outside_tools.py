"""lmforge's outputs opened the way outside tools open them: DeepSpeed's own zero_to_fp32.py
runs on a checkpoint's engine state with no extra flags and gives the checkpoint's weights."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from stagerun import run_stage, stage_env, tiny_pretrain_args

from lmforge.hf import to_llama_key

pytestmark = pytest.mark.slow


def test_zero_to_fp32_runs_on_the_engine_state_as_it_is(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = tiny_pretrain_args(run, tmp_path / "cache", steps=2, save_every=2)
    run_stage("pretrain/train.py", [*args, "--engine.zero_stage=2"], nproc=2, launcher="torchrun")
    state = run / "step-000002" / "deepspeed"
    assert (state / "latest").read_text() == "state"
    out = tmp_path / "fp32"
    script = state / "zero_to_fp32.py"  # DeepSpeed copies it into every ZeRO checkpoint
    subprocess.run(
        [sys.executable, str(script), str(state), str(out)],  # no --tag: `latest` names it
        env=stage_env(),
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # Its default output is a torch pickle (the tied embedding and output share one tensor,
    # which its safetensors option refuses); read it with tensors only.
    recovered = {}
    for file in sorted(out.glob("*.bin")):
        recovered.update(torch.load(file, map_location="cpu", weights_only=True))
    saved = load_file(run / "step-000002" / "model.safetensors")
    assert saved, "no weights saved"
    for name, tensor in recovered.items():
        key = to_llama_key(name)
        if key not in saved:  # the tied output matrix is stored once, as the embedding
            assert name == "output.weight", name
            continue
        assert torch.equal(tensor.float(), saved[key].float()), name
    assert {to_llama_key(n) for n in recovered} >= set(saved)


def test_sample_chat_renders_the_template_with_one_bos(
    task_base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`lmforge sample --chat --system` renders the checkpoint's own chat template (one BOS) and
    prints the greedy answer lmforge's generate gives for those ids; a plain prompt that already
    starts with BOS gets no second one."""
    from lmforge.checkpoint import load_checkpoint
    from lmforge.cli import _prompt_ids, main
    from lmforge.generate import GenerateConfig, generate
    from lmforge.stage import stop_ids

    model, tok, _ = load_checkpoint(task_base)
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort 312."}]
    rendered = tok.apply_chat_template(turns, add_generation_prompt=True, return_dict=True)
    ids = _prompt_ids(tok, "Sort 312.", True, "Be brief.")
    assert ids == list(rendered["input_ids"]) and ids.count(tok.bos_token_id) == 1
    assert _prompt_ids(tok, tok.bos_token + "Hello", False, None).count(tok.bos_token_id) == 1
    argv = ["sample", str(task_base), "--chat", "--system", "Be brief.", "--prompt", "Sort 312."]
    assert main([*argv, "--temperature", "0", "--max-new-tokens", "6"]) == 0
    cfg = GenerateConfig(max_new_tokens=6, temperature=0)
    out = generate(model, [ids], cfg, eos_ids=stop_ids(tok), pad_id=tok.pad_token_id)
    assert capsys.readouterr().out == out.texts(tok)[0] + "\n"


def test_trl_assistant_only_sft_learns_the_tokens_lmforge_learns(
    task_base: Path, tmp_path: Path
) -> None:
    """TRL's SFTTrainer with assistant_only_loss accepts lmforge's chat template (it has
    {% generation %} markers), marks exactly the tokens lmforge's SFT learns, and trains."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from lmforge.checkpoint import resolve_checkpoint
    from lmforge.data.chat_datasets import IGNORE, SFTDataset
    from lmforge.data.tasks import task_examples
    from lmforge.tokenizer import load_tokenizer

    ckpt = resolve_checkpoint(task_base)
    examples = task_examples("train", 8, 1)
    args = SFTConfig(
        output_dir=str(tmp_path / "trl"), assistant_only_loss=True, max_steps=2, max_length=64,
        per_device_train_batch_size=4, learning_rate=1e-3, report_to=[], use_cpu=True,
        logging_steps=1, save_strategy="no", dataloader_num_workers=0,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(ckpt),
        args=args,
        train_dataset=Dataset.from_list([{"messages": e["messages"]} for e in examples]),
        processing_class=AutoTokenizer.from_pretrained(ckpt),
    )
    ours = SFTDataset([dict(e) for e in examples], load_tokenizer(ckpt), 64, pack=False)
    for i in range(len(examples)):
        row = trainer.train_dataset[i]
        batch = ours.get_batch([i])
        n = len(row["input_ids"])  # lmforge's inputs are the chat's ids less the last one
        assert batch["input_ids"][0, : n - 1].tolist() == list(row["input_ids"])[:-1]
        learned = [t + 1 for t in range(n - 1) if batch["labels"][0, t] != IGNORE]
        # TRL keeps the assistant mask as labels: the ids themselves (unshifted), -100 elsewhere
        assert learned == [t for t, label in enumerate(row["labels"]) if label != -100], i
    result = trainer.train()
    assert trainer.state.global_step == 2 and math.isfinite(result.training_loss)
