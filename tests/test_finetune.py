"""The finetuning stages run for real: SFT, reward model and DPO on 2 processes under ZeRO-2 and
ZeRO-3, chained through the checkpoint format, and each doing what it exists for."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from stagerun import final_metrics, losses, metrics, run_stage

from lmforge.checkpoint import load_checkpoint, load_reward_model

pytestmark = pytest.mark.slow

SHORT = [
    "--data.num_train=400",
    "--data.num_heldout=16",
    "--data.seq_len=64",
    "--train.steps=6",
    "--train.global_batch_size=8",
    "--train.micro_batch_size=4",
    "--train.eval_every=0",
    "--train.save_every=100",
    "--optim.lr=3e-3",
    "--optim.warmup_steps=2",
    "--optim.weight_decay=0",
    "--tracking.log_every=1",
]
LONG = [
    "--data.seq_len=64",
    "--train.global_batch_size=16",
    "--train.micro_batch_size=16",
    "--train.eval_every=0",
    "--train.save_every=1000",
    "--optim.warmup_steps=10",
    "--optim.weight_decay=0",
    "--tracking.log_every=50",
]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, task_base: Path) -> Path:
    """A directory for the runs, with the shared random-weight task model as `base`."""
    root = tmp_path_factory.mktemp("finetune")
    (root / "base").symlink_to(task_base, target_is_directory=True)
    return root


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in before if not torch.equal(before[k], after[k])]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path, with_tokenizer=False)[0].state_dict()


@pytest.fixture(scope="module")
def sft_run(root: Path) -> Path:
    run = root / "sft-zero2"
    run_stage(
        "finetune/sft.py",
        [*SHORT, f"--init_from={root / 'base'}", f"--run_dir={run}", "--engine.zero_stage=2"],
        nproc=2,
        launcher="torchrun",
    )
    return run


def _check_learned(run: Path, init: Path, *, reward: bool = False) -> None:
    curve = losses(run)
    assert curve[6] < curve[1], curve
    if reward:
        model, _, meta = load_reward_model(run)
        after = model.backbone.state_dict()
        assert meta["head"] == "reward"
    else:
        after = _weights(run)
    before = _weights(init)
    unchanged = sorted(set(before) - set(_changed(before, after)))
    assert not unchanged, f"parameters that did not train: {unchanged}"


def test_sft_on_two_processes_zero2(root: Path, sft_run: Path) -> None:
    _check_learned(sft_run, root / "base")


@pytest.mark.parametrize(
    ("stage", "zero"), [("sft", 3), ("reward", 2), ("reward", 3), ("dpo", 2), ("dpo", 3)]
)
def test_stage_on_two_processes(root: Path, sft_run: Path, stage: str, zero: int) -> None:
    init = root / "base" if stage == "sft" else sft_run  # the next stage starts from SFT's output
    run = root / f"{stage}-zero{zero}"
    proc = run_stage(
        f"finetune/{stage}.py",
        [*SHORT, f"--init_from={init}", f"--run_dir={run}", f"--engine.zero_stage={zero}"],
        nproc=2,
        launcher="torchrun",
    )
    _check_learned(run, init, reward=stage == "reward")
    if stage == "sft":  # counted whole, also when ZeRO-3 holds a shard of each on every rank
        counts = re.search(r"([\d.]+)M parameters \(([\d.]+)M trainable\)", proc.stdout)
        assert counts and float(counts[2]) == pytest.approx(float(counts[1]), rel=0.05), counts
    if stage == "reward":  # the score head trained too, and the file is a classifier
        assert (run / "step-000006" / "config.json").read_text().count("SequenceClassification")


@pytest.fixture(scope="module")
def tuned(root: Path) -> Path:
    """SFT long enough to learn the tasks' formats: the start of the quality tests."""
    run = root / "sft-long"
    run_stage(
        "finetune/sft.py",
        [
            *LONG,
            f"--init_from={root / 'base'}",
            f"--run_dir={run}",
            "--data.num_train=2000",
            "--data.num_heldout=60",
            "--train.steps=200",
            "--optim.lr=5e-3",
        ],
    )
    return run


def test_sft_raises_exact_match(tuned: Path) -> None:
    final = final_metrics(tuned)
    assert final["eval_before/accuracy"] == 0.0
    assert final["eval/accuracy"] >= 0.15, final
    assert final["eval/loss"] < final["eval_before/loss"] - 2.0


def test_reward_model_separates_pairs_and_loads_in_transformers(root: Path, tuned: Path) -> None:
    run = root / "reward-long"
    run_stage(
        "finetune/reward.py",
        [
            *LONG,
            f"--init_from={tuned}",
            f"--run_dir={run}",
            "--data.num_train=3000",
            "--data.num_heldout=100",
            "--train.steps=300",
            "--optim.lr=1e-3",
        ],
    )
    final = final_metrics(run)
    assert final["eval/accuracy"] >= 0.9, final
    from transformers import AutoModelForSequenceClassification

    ours, _, _ = load_reward_model(run)
    hf = AutoModelForSequenceClassification.from_pretrained(run / "step-000300").eval()
    ids = torch.randint(8, 400, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits.squeeze(-1), ours(ids), atol=1e-4, rtol=0)


def test_dpo_prefers_chosen_answers(root: Path, tuned: Path) -> None:
    run = root / "dpo-long"
    run_stage(
        "finetune/dpo.py",
        [
            *LONG,
            f"--init_from={tuned}",
            f"--run_dir={run}",
            "--data.num_train=1600",
            "--data.num_heldout=100",
            "--train.steps=100",
            "--optim.lr=1e-3",
            "--beta=0.2",
        ],
    )
    final = final_metrics(run)
    assert final["eval/reward_accuracy"] > 0.8, final
    assert final["eval/logp_margin"] > final["eval_before/logp_margin"], final
    before = next(r for r in metrics(run) if r["step"] == 0)
    assert before["eval/reward_accuracy"] == 0.0  # policy == reference at the start


@pytest.mark.parametrize("kind", ["ipo", "cdpo"])
def test_dpo_variants_run(root: Path, sft_run: Path, kind: str) -> None:
    run = root / f"dpo-{kind}"
    # cDPO also runs with LoRA adapters (merged into the saved weights)
    extra = ["--label_smoothing=0.1", "--lora.enabled=true"] if kind == "cdpo" else []
    run_stage(
        "finetune/dpo.py",
        [
            *SHORT,
            f"--init_from={sft_run}",
            f"--run_dir={run}",
            f"--kind={kind}",
            "--reference=model",
            *extra,
        ],
    )
    curve = losses(run)
    assert curve[6] < curve[1], curve
    if kind == "cdpo":  # adapters merged: only the adapted matrices moved
        before, after = _weights(sft_run), _weights(run)
        assert {k.rsplit(".", 2)[-2] for k in _changed(before, after)} <= set(ADAPTED)


ADAPTED = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def test_lora_sft_trains_only_adapted_layers(root: Path) -> None:
    run = root / "sft-lora"
    run_stage(
        "finetune/sft.py",
        [
            *SHORT,
            f"--init_from={root / 'base'}",
            f"--run_dir={run}",
            "--lora.enabled=true",
            "--lora.rank=4",
            "--lora.target_modules=[wq, wv, w2]",
        ],
    )
    before, after = _weights(root / "base"), _weights(run)
    changed = set(_changed(before, after))
    adapted = {k for k in before if k.rsplit(".", 2)[-2] in ("wq", "wv", "w2")}
    assert changed == adapted  # merged adapters moved exactly the targeted weights


def test_malformed_records_are_one_line(root: Path, tmp_path: Path) -> None:
    data = tmp_path / "chats.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}\n'
    )
    proc = run_stage(
        "finetune/sft.py",
        [
            *SHORT,
            f"--init_from={root / 'base'}",
            f"--run_dir={tmp_path / 'run'}",
            f"--data.source={data}",
        ],
        check=False,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-2000:]
    assert "chats.jsonl" in errors[0] and "bot" in errors[0] and "Traceback" not in proc.stderr
