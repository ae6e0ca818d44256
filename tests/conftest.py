"""Shared fixtures: small model configs, determinism, CPU-only defaults."""

from __future__ import annotations

import os
from collections.abc import Iterator

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from lmforge.model import ModelConfig

torch.set_num_threads(min(2, torch.get_num_threads()))


def small_config(**overrides: object) -> ModelConfig:
    """A model small enough to train in a fraction of a second on CPU."""
    base: dict[str, object] = dict(
        vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64
    )
    base.update(overrides)
    cfg = ModelConfig(**base)  # type: ignore[arg-type]
    cfg.validate("model")
    return cfg


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def task_base(tmp_path_factory: pytest.TempPathFactory):
    """A random-weight 'pretrained' run directory whose tokenizer is trained on the chat tasks."""
    from lmforge.checkpoint import save_checkpoint
    from lmforge.data.tasks import task_examples
    from lmforge.model import build_model
    from lmforge.tokenizer import train_tokenizer

    base = tmp_path_factory.mktemp("task_base")
    texts = [m["content"] for ex in task_examples("train", 2000, 1) for m in ex["messages"]]
    tok = train_tokenizer(texts, vocab_size=400)
    cfg = ModelConfig(vocab_size=400, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)
    save_checkpoint(
        base / "step-000000",
        build_model(cfg, seed=0),
        tok,
        update_latest=True,
        stage="pretrain",
        step=0,
    )
    return base


@pytest.fixture(scope="session")
def task_policy(task_base, tmp_path_factory: pytest.TempPathFactory):
    """task_base tuned by 60 SFT steps: a policy that answers in the tasks' format (the start of
    the RL stage tests)."""
    from stagerun import run_stage

    run = tmp_path_factory.mktemp("policy") / "sft"
    run_stage(
        "finetune/sft.py",
        [
            f"--init_from={task_base}",
            f"--run_dir={run}",
            "--data.num_train=1000",
            "--data.num_heldout=12",
            "--data.seq_len=64",
            "--train.steps=60",
            "--train.global_batch_size=16",
            "--train.micro_batch_size=16",
            "--train.eval_every=0",
            "--train.save_every=1000",
            "--optim.lr=5e-3",
            "--optim.warmup_steps=5",
        ],
    )
    return run


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny models: faster, and immune to the stalls that
    OpenMP's spinning threads suffer when the cores are shared with other work. A module opts in
    with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
