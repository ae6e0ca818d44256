"""The tools of the `lmforge` command: export to a Hugging Face directory, plot, estimate, the
config reference, --help of every command and --dry-run of every stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import small_config

from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.cli import main
from lmforge.config import load_preset
from lmforge.errors import ConfigError
from lmforge.estimate import (
    LAYOUTS,
    activation_memory,
    estimate,
    format_bytes,
    zero_memory,
)
from lmforge.model import ModelConfig, build_model, num_params
from lmforge.tokenizer import train_tokenizer
from lmforge.tracking import Tracker, TrackingConfig

REPO = Path(__file__).resolve().parents[1]
STAGES = ["pretrain", "sft", "reward", "dpo", "grpo", "ppo"]
TOOLS = ["export", "plot", "estimate", "config-reference", "report", "sample", "inspect"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with one random-weight checkpoint (vocabulary 300, chat tokens)."""
    root = tmp_path_factory.mktemp("tools") / "run"
    texts = [f"The value {i} is stored in slot {i % 7} of the table." for i in range(300)]
    tok = train_tokenizer(texts, vocab_size=300)
    model = build_model(small_config(vocab_size=300), seed=0)
    save_checkpoint(
        root / "step-000005", model, tok, update_latest=True, stage="sft", step=5, metrics={}
    )
    return root


# ------------------------------------------------------------------------------------ export

_HF_LOAD = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, ids = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(path).eval()
tok = AutoTokenizer.from_pretrained(path)
with torch.no_grad():
    logits = model(torch.tensor(ids)).logits
assert not [m for m in sys.modules if m.split(".")[0] == "lmforge"], "lmforge was imported"
print(json.dumps({"logits": logits.tolist(), "ids": tok("The value 42")["input_ids"]}))
"""


def test_export_loads_in_plain_transformers_with_the_same_logits(run_dir, tmp_path) -> None:
    out = tmp_path / "hf"
    assert main(["export", str(run_dir), str(out), "--max-shard-size", "20KB"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= names
    assert "model.safetensors.index.json" in names
    assert len([n for n in names if n.endswith(".safetensors")]) > 1  # sharded at 20 KB
    assert not list(tmp_path.glob(".*"))  # no partial directory left beside it

    model, tok, _ = load_checkpoint(run_dir)
    ids = [[0, 5, 17, 42, 99, 3, 250, 7]]
    with torch.no_grad():
        ours = model(torch.tensor(ids))  # (1, T, V)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", _HF_LOAD, str(out), json.dumps(ids)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # nowhere near the repository
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    theirs = torch.tensor(result["logits"])
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() < 1e-4
    assert result["ids"] == tok("The value 42")["input_ids"]


def test_export_refuses_a_non_empty_target_and_replaces_it_with_force(
    run_dir, tmp_path, capsys
) -> None:
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(run_dir), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and str(out) in err and "--force" in err and "\n" not in err
    assert (out / "keep.txt").read_text() == "mine"

    assert main(["export", str(run_dir), str(out), "--force", "--dtype", "bf16"]) == 0
    assert not (out / "keep.txt").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config.get("dtype", config.get("torch_dtype")) == (
        "bfloat16"
    )
    assert (out / "model.safetensors").stat().st_mode & 0o044 == 0o044  # readable by others


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["--max-shard-size", "2XB"], "--max-shard-size"), ([], "nope")],
)
def test_export_errors_are_one_line_and_write_nothing(
    run_dir, tmp_path, capsys, args, needle
) -> None:
    source = str(tmp_path / "nope") if needle == "nope" else str(run_dir)
    assert main(["export", source, str(tmp_path / "hf"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------- plot


def _log_run(run_dir: Path) -> None:
    """Metrics of a 6-step two-objective run, written by the real Tracker."""
    tracker = Tracker(
        run_dir,
        TrackingConfig(),
        is_main=True,
        config={},
        total_steps=6,
        flops_per_token=0,
        peak_flops=None,
    )
    for step in range(1, 7):
        name = "causal" if step % 2 else "mlm"
        loss = 5.0 - 0.5 * step
        lr = 1e-3 * step / 6
        tracker.log(step, {"loss": loss, f"loss/{name}": loss, "lr": lr, "tokens_per_s": 1e3})
        if step % 3 == 0:
            tracker.log(step, {"eval/causal/loss": loss + 0.1, "eval/mlm/loss": loss + 0.2})


def test_plot_draws_loss_per_objective_lr_and_throughput(tmp_path) -> None:
    from PIL import Image

    from lmforge.plot import plot_run

    _log_run(tmp_path)
    fig = plot_run(tmp_path)
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["loss", "learning rate", "throughput"]
    assert [ax.get_ylabel() for ax in axes] == ["loss", "learning rate", "tokens/s"]
    assert all(ax.get_xlabel() == "step" for ax in axes)
    labels = [line.get_label() for line in axes[0].get_lines()]
    assert labels == ["train causal", "train mlm", "held-out causal", "held-out mlm"]
    causal = axes[0].get_lines()[0]
    assert list(causal.get_xdata()) == [1, 3, 5] and list(causal.get_ydata()) == [4.5, 3.5, 2.5]
    assert list(axes[1].get_lines()[0].get_ydata()) == pytest.approx([i / 6e3 for i in range(1, 7)])

    png = tmp_path / "curves.png"
    assert main(["plot", str(tmp_path), "-o", str(png)]) == 0
    image = Image.open(png).convert("L")
    assert image.size == (1320, 340)
    dark = sum(1 for v in image.getdata() if v < 200)
    assert dark > 0.01 * image.size[0] * image.size[1]  # curves, axes and text, not a blank page


def test_plot_without_metrics_is_one_clear_line(tmp_path, capsys) -> None:
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "metrics.jsonl" in err and "\n" not in err
    assert not (tmp_path / "curves.png").exists()


# ---------------------------------------------------------------------------------- estimate

PSI = 33_984  # parameters of small_config(): see test_estimate_counts_by_hand
# (stage, offload) -> (GPU, CPU) bytes in units of Ψ, for N = 1 and N = 4 (ZeRO paper, K = 12)
BY_HAND = {
    1: {
        (0, "none"): (16, 0),
        (1, "none"): (16, 0),
        (1, "optimizer"): (4, 12),
        (2, "none"): (16, 0),
        (2, "optimizer"): (4, 12),
        (3, "none"): (16, 0),
        (3, "optimizer"): (4, 12),
        (3, "params"): (14, 2),
        (3, "optimizer+params"): (2, 14),
    },
    4: {
        (0, "none"): (16, 0),
        (1, "none"): (4 + 12 / 4, 0),
        (1, "optimizer"): (4, 12 / 4),
        (2, "none"): (2 + 14 / 4, 0),
        (2, "optimizer"): (2 + 2 / 4, 12 / 4),
        (3, "none"): (16 / 4, 0),
        (3, "optimizer"): (4 / 4, 12 / 4),
        (3, "params"): (14 / 4, 2 / 4),
        (3, "optimizer+params"): (2 / 4, 14 / 4),
    },
}


def test_estimate_counts_by_hand() -> None:
    cfg = small_config()  # V 97, D 32, L 2, H 4, K 2, E 8, F 128 (8/3·32 rounded up to 64)
    layer = 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 128 + 2 * 32  # wq wo, wk wv, w1 w2 w3, norms
    assert 97 * 32 + 2 * layer + 32 == PSI  # tied embedding, layers, final norm
    est = estimate(cfg, seq_len=64, micro_batch=2, gpus=4)
    assert est.params == PSI == num_params(cfg)
    assert est.matmul_params == 2 * (layer - 64) + 97 * 32
    assert est.flops_per_token == 6 * est.matmul_params + 12 * 2 * 4 * 8 * 64
    # activations in bf16 (p = 2), bytes per token: an RMSNorm keeps 4D + pD + 4 of its own
    # and pD of output; a block two norms + p(2HE + 2KE + 4F) + 4H; outside: the final norm's
    # own, the loss's input gradient pD, the token id 8, the RoPE tables 2Ep; per batch 4VD
    own = 4 * 32 + 2 * 32 + 4
    block = 2 * (own + 2 * 32) + 2 * (2 * 32 + 2 * 16 + 4 * 128) + 4 * 4
    outside, fixed, tokens = own + 2 * 32 + 8 + 2 * 8 * 2, 4 * 97 * 32, 64 * 2
    assert (block, outside) == (1752, 300)
    assert est.activation_bytes == tokens * (2 * block + outside) + fixed
    assert est.activation_bytes_checkpointed == tokens * (2 * 32 * 2 + block + outside) + fixed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "variant",
    [{}, {"mlp": "gelu", "norm": "layernorm", "position": "learned", "n_kv_heads": 4}],
)
def test_activation_estimate_matches_what_autograd_saves(dtype, variant) -> None:
    cfg = small_config(**variant)
    model = build_model(cfg, seed=0, dtype=dtype).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()  # views of one tensor count once
        saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    ids = torch.randint(0, cfg.vocab_size, (2, 64))  # (B, T)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids)
    measured = sum(n for ptr, n in saved.items() if ptr not in weights)
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    assert measured == pytest.approx(activation_memory(cfg, 2 * 64, precision), rel=0.03)


@pytest.mark.parametrize("gpus", [1, 4])
def test_zero_memory_follows_the_zero_paper(gpus: int) -> None:
    est = estimate(small_config(), seq_len=64, gpus=gpus)
    assert [(r.stage, r.offload) for r in est.zero] == list(LAYOUTS) == list(BY_HAND[gpus])
    for (stage, offload), (gpu, cpu) in BY_HAND[gpus].items():
        row = est.layout(stage, offload)
        assert row.gpu_bytes == pytest.approx(gpu * PSI), (stage, offload)
        assert row.cpu_bytes == pytest.approx(cpu * PSI), (stage, offload)


def test_zero_memory_fp32_and_impossible_layouts() -> None:
    fp32 = zero_memory(1000, 4, 2, precision="fp32")  # 4 + (4 + 8)/N bytes per parameter
    assert fp32.gpu_bytes == pytest.approx(1000 * (4 + 12 / 4)) and fp32.cpu_bytes == 0
    with pytest.raises(ConfigError, match="stage 0"):
        zero_memory(1000, 1, 0, "optimizer")
    with pytest.raises(ConfigError, match="stage 2"):
        zero_memory(1000, 1, 2, "params")


def test_estimate_of_the_7b_preset() -> None:
    est = estimate(load_preset(ModelConfig, "7b"), seq_len=4096, gpus=8)
    assert est.params == 6_738_415_616  # Llama-2-7B
    assert est.layout(0).gpu_bytes == 16 * est.params
    assert est.layout(2).gpu_bytes == pytest.approx(2 * est.params + 14 * est.params / 8)


def test_estimate_command_prints_the_table(capsys) -> None:
    assert main(["estimate", "--model", "debug", "--gpus", "4"]) == 0
    out = capsys.readouterr().out
    psi = num_params(load_preset(ModelConfig, "debug"))
    assert f"parameters: {psi:,}" in out and "4 GPU(s)" in out
    row = next(line.split() for line in out.splitlines() if line.split()[:2] == ["3", "none"])
    assert " ".join(row[2:4]) == format_bytes(16 * psi / 4)
    demo = str(REPO / "configs" / "pretrain" / "demo.yaml")
    assert main(["estimate", "--config", demo, "--engine.zero_stage=3", "--gpus", "2"]) == 0
    marked = [line.split() for line in capsys.readouterr().out.splitlines() if "*" in line]
    assert marked[0][:3] == ["*", "3", "none"]


def test_estimate_reads_a_finetuning_config_and_its_init_checkpoint(
    run_dir, tmp_path, capsys
) -> None:
    mine = tmp_path / "my_run.yaml"  # not named after a stage: the first stage that accepts it
    mine.write_text((REPO / "configs" / "finetune" / "sft.yaml").read_text())
    assert main(["estimate", "--config", str(mine), f"--init_from={run_dir}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"sft: {mine}\n")
    assert f"parameters: {num_params(small_config(vocab_size=300)):,}" in out
    assert main(["estimate", "--config", str(mine), f"--init_from={tmp_path / 'nope'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: init_from:") and "nope" in err and "\n" not in err


def test_dry_run_without_the_init_checkpoint_still_shows_the_config(tmp_path, capsys) -> None:
    args = ["sft", "--dry-run", f"--init_from={tmp_path / 'later'}", f"--run_dir={tmp_path}/r"]
    assert main(args) == 2  # the missing checkpoint is a problem, listed on stderr
    out, err = capsys.readouterr()
    assert "# parameters: unknown (init_from:" in out and "later" in out
    assert yaml.safe_load(out)["init_from"] == str(tmp_path / "later")
    assert "\n  init_from: " in err and "later" in err


def test_estimate_without_a_model_is_one_line(capsys) -> None:
    assert main(["estimate"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--model" in err and "\n" not in err


# ----------------------------------------------------------------- --help and --dry-run


@pytest.mark.parametrize("command", STAGES + TOOLS)
def test_every_command_has_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: lmforge {command}")
    if command in STAGES:
        assert "--dry-run" in out and "--section.key=value" in out and "docs/config.md" in out
    assert len(out.splitlines()) >= 4


@pytest.mark.parametrize("stage", STAGES)
def test_dry_run_prints_config_parameters_and_estimate(stage, run_dir, tmp_path, capsys) -> None:
    target = tmp_path / "run"
    args = [stage, "--dry-run", f"--run_dir={target}"]
    args += ["--model=debug", "--data.seq_len=64"] if stage == "pretrain" else []
    args += [f"--init_from={run_dir}"] if stage != "pretrain" else []
    args += [f"--reward_model={run_dir}"] if stage == "ppo" else []  # the default is not there
    assert main(args) == 0
    out = capsys.readouterr().out
    expected = num_params(
        load_preset(ModelConfig, "debug") if stage == "pretrain" else small_config(vocab_size=300)
    )
    assert f"# parameters: {expected:,}" in out
    assert "# activations per GPU" in out and "optimizer+params" in out
    config = yaml.safe_load(out)  # the estimate lines are comments: still a config file
    assert config["run_dir"] == str(target) and "train" in config
    assert not target.exists()


# -------------------------------------------------------------------------- config reference


def test_config_reference_is_current() -> None:
    from lmforge.config_reference import REFRESH, render

    committed = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    if committed != render():
        pytest.fail(f"docs/config.md is out of date; refresh it with: {REFRESH}", pytrace=False)


def test_config_reference_covers_every_stage_and_key(tmp_path, capsys) -> None:
    from lmforge.config import describe
    from lmforge.config_reference import stage_config_class

    out = tmp_path / "config.md"
    assert main(["config-reference", "-o", str(out)]) == 0
    text = out.read_text()
    for stage in STAGES:
        assert f"\n## {stage}\n" in text
        for key, *_ in describe(stage_config_class(stage)):
            assert f"`{key}`" in text or f"**{key}**" in text
    assert "| `train.steps` | `int` | `1000` | Optimizer steps to train. |" in text
    assert main(["config-reference", "-o", str(out), "--check"]) == 0
    out.write_text(text + "stale\n")
    assert main(["config-reference", "-o", str(out), "--check"]) == 1
    assert "python -m lmforge.config_reference" in capsys.readouterr().err
