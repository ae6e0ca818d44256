"""What a person watching or reviewing runs sees: the RL progress line (reward, KL, response
length, generation share), `lmforge plot` over several runs with each stage's panels, and
`lmforge report` naming the held-out set behind each number."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from stagerun import metrics, run_stage

from lmforge.cli import main
from lmforge.plot import plot_runs, save_plot
from lmforge.tracking import Tracker, TrackingConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _tracker(run_dir: Path, steps: int) -> Tracker:
    return Tracker(
        run_dir,
        TrackingConfig(),
        is_main=True,
        config={},
        total_steps=steps,
        flops_per_token=0,
        peak_flops=None,
    )


def _write_run(run_dir: Path, steps: int, train: dict, evals: dict, every: int = 2) -> None:
    """A run directory's metrics.jsonl written by the real Tracker: `train` metrics (value at
    step s = f(s)) every step, `evals` at step 0 and every `every` steps."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tracker = _tracker(run_dir, steps)
    tracker.log(0, {k: f(0) for k, f in evals.items()})
    for s in range(1, steps + 1):
        tracker.log(s, {k: f(s) for k, f in train.items()})
        if s % every == 0:
            tracker.log(s, {k: f(s) for k, f in evals.items()})


def _checkpoint(run_dir: Path, stage: str, meta: dict) -> Path:
    """A checkpoint directory as far as `report` and `plot` read it: lmforge.json (and a
    config.json marking it as one), named by the run's `latest`."""
    ckpt = run_dir / "step-000004"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "config.json").write_text("{}")
    (ckpt / "lmforge.json").write_text(json.dumps({"stage": stage, "step": 4, **meta}))
    (run_dir / "latest").write_text("step-000004\n")
    return ckpt


# ------------------------------------------------------------------------------ progress line


def test_rl_progress_line_shows_reward_kl_length_and_generation_share(tmp_path, capsys) -> None:
    tracker = _tracker(tmp_path, 10)
    rl = {
        "loss": 0.0123,
        "lr": 1e-3,
        "grad_norm": 0.5,
        "reward": 0.6251,
        "kl": 0.01234,
        "response_length": 12.345,
        "time/generation_share": 0.4149,
        "tokens_per_s": 2500.0,
    }
    tracker.progress(5, rl, 1.0)
    tracker.progress(6, {"loss": 2.0, "lr": 1e-3, "reward_chosen": 0.3}, 1.0)  # DPO: none
    first, second = capsys.readouterr().out.splitlines()
    assert " | reward 0.625 | KL 0.0123 | len 12.3 | gen 41% | 2.5k tok/s" in first
    assert not re.search(r"reward |KL |len |gen ", second)


# --------------------------------------------------------------------------------------- plot


def test_plot_overlays_runs_with_each_stages_panels(tmp_path) -> None:
    from PIL import Image

    def falling(start: float):
        return lambda s: start / (1 + s)

    def rising(start: float):
        return lambda s: start + 0.05 * s

    _write_run(
        tmp_path / "grpo",
        6,
        {
            "loss": falling(0.1),
            "reward": rising(0.3),
            "kl": rising(0.0),
            "response_length": falling(9),
            "time/generation_share": lambda s: 0.5,
            "lr": lambda s: 1e-3,
        },
        {"eval/accuracy": rising(0.2), "eval/reward": rising(0.25), "eval/kl": rising(0.0)},
    )
    _write_run(
        tmp_path / "dpo",
        4,
        {"loss": falling(0.7), "accuracy": rising(0.5), "margin": rising(0.1), "lr": falling(1)},
        {
            "eval/reward_accuracy": rising(0.5),
            "eval/reward_margin": rising(0),
            "eval/loss": falling(1),
        },
    )
    _checkpoint(tmp_path / "dpo", "dpo", {})  # the stage from the checkpoint, not guessed
    fig = plot_runs([tmp_path / "grpo", tmp_path / "dpo"])
    panels = {ax.get_title(): ax for ax in fig.get_axes()}
    assert list(panels) == [
        "loss",
        "reward",
        "KL to the reference",
        "response length",
        "held-out exact match",
        "generation share",
        "learning rate",
        "pair accuracy",
        "reward margin",
    ]

    def labels(title: str) -> list[str]:
        return [line.get_label() for line in panels[title].get_lines()]

    assert labels("loss") == ["grpo train", "dpo train", "dpo held-out"]
    assert labels("KL to the reference") == ["grpo train, per token", "grpo held-out"]
    assert labels("pair accuracy") == ["dpo train", "dpo held-out"]
    assert labels("learning rate") == ["grpo train", "dpo train"]
    colours = {line.get_label().split()[0]: line.get_color() for line in panels["loss"].get_lines()}
    assert colours["grpo"] != colours["dpo"]  # one colour per run, the same in every panel
    assert {line.get_color() for line in panels["pair accuracy"].get_lines()} == {colours["dpo"]}
    reward = panels["reward"].get_lines()
    assert list(reward[0].get_xdata()) == list(range(1, 7))  # training: every step
    assert list(reward[1].get_xdata()) == [0, 2, 4, 6]  # held-out: at each evaluation

    png = tmp_path / "both.png"
    assert main(["plot", str(tmp_path / "grpo"), str(tmp_path / "dpo"), "-o", str(png)]) == 0
    image = Image.open(png).convert("L")
    assert image.size == (1320, 1020)  # 3 × 3 panels
    dark = sum(1 for v in image.getdata() if v < 200)
    assert dark > 0.01 * image.size[0] * image.size[1]


def test_plot_names_runs_of_the_same_name_by_path(tmp_path) -> None:
    for where in ("a", "b"):
        _write_run(tmp_path / where / "sft", 2, {"loss": lambda s: 1.0}, {"eval/accuracy": float})
    fig = plot_runs([tmp_path / "a" / "sft", tmp_path / "b" / "sft"])
    names = [line.get_label() for line in fig.get_axes()[0].get_lines()]
    assert names == [f"{tmp_path / w / 'sft'} train" for w in ("a", "b")]
    assert [ax.get_title() for ax in fig.get_axes()] == ["loss", "held-out exact match"]


# ------------------------------------------------------------------------------------- report


def _sft_meta(tasks: list[str], num_heldout: int, accuracy: float) -> dict:
    data = {"source": "builtin", "heldout_source": "", "tasks": tasks, "seed": 0}
    data["num_heldout"] = num_heldout
    return {
        "config": {"data": data},
        "metrics": {"eval_before/accuracy": 0.0, "eval/accuracy": accuracy, "eval/loss": 1.0},
    }


def test_report_marks_numbers_of_different_heldout_sets(tmp_path, capsys) -> None:
    # Recorded by the stage (with its size), and rebuilt from the config of an older checkpoint.
    same = tmp_path / "sft_a"
    meta = _sft_meta(["count"], 8, 0.5)
    meta["heldout"] = {"set": "builtin tasks count (data.seed 0, data.num_heldout 8)", "count": 8}
    meta["heldout"]["unit"] = "prompts"
    _checkpoint(same, "sft", meta)
    _checkpoint(tmp_path / "sft_b", "sft", _sft_meta(["count"], 8, 0.6))
    _checkpoint(tmp_path / "sft_all", "sft", _sft_meta([], 200, 0.4))
    user = _sft_meta([], 200, 0.9)
    user["config"]["data"].update(source="mine.jsonl", heldout_fraction=0.05)
    _checkpoint(tmp_path / "sft_user", "sft", user)

    assert main(["report", str(same), str(tmp_path / "sft_b")]) == 0
    out = capsys.readouterr().out
    assert "not comparable" not in out and " *" not in out
    assert "  A  builtin tasks count (data.seed 0, data.num_heldout 8): 8 prompts" in out

    runs = [str(tmp_path / n) for n in ("sft_a", "sft_all", "sft_user")]
    assert main(["report", *runs]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("sft ")]
    exact = [r for r in rows if r[1:4] == ["held-out", "exact", "match"]]
    assert [r[6:8] for r in exact] == [["A", "*"], ["B", "*"], ["C", "*"]]
    assert "  B  builtin tasks all (data.seed 0, data.num_heldout 200): prompts, count not" in out
    assert "  C  0.05 of data.source mine.jsonl (split by prompt hash)" in out
    assert (
        "* not comparable: exact match was measured on different held-out sets: A (sft), "
        "B (sft), C (sft)" in out
    )


# ------------------------------------------------------------------------- a real GRPO run


def test_grpo_run_shows_rl_progress_plots_and_reports_its_heldout_set(
    task_base, tmp_path, capsys
) -> None:
    run = tmp_path / "grpo"
    proc = run_stage(
        "finetune/grpo.py",
        [
            f"--init_from={task_base}",
            f"--run_dir={run}",
            "--data.tasks=[count]",
            "--data.num_train=40",
            "--data.num_heldout=6",
            "--data.seq_len=64",
            "--group_size=2",
            "--train.steps=3",
            "--train.global_batch_size=8",
            "--train.micro_batch_size=8",
            "--train.eval_every=0",
            "--train.save_every=1000",
            "--tracking.log_every=1",
            "--max_new_tokens=4",
        ],
    )
    progress = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(progress) == 3
    pattern = r"reward -?\d+\.\d{3} \| KL -?\d+\.\d{4} \| len \d+\.\d \| gen \d+%"
    assert all(re.search(pattern, line) for line in progress), progress
    logged = [m for m in metrics(run) if "loss" in m]
    shares = [m["time/generation_share"] for m in logged]
    assert all(0 < s < 1 for s in shares), shares
    assert all(0 < m["time/generation_seconds"] < m["step_seconds"] * 1.5 for m in logged)

    meta = json.loads((run / "step-000003" / "lmforge.json").read_text())
    assert meta["heldout"] == {
        "set": "builtin tasks count (data.seed 0, data.num_heldout 6)",
        "count": 6,
        "unit": "prompts",
    }
    # An SFT run on every builtin task: its exact match is not comparable with GRPO's.
    sft = tmp_path / "sft"
    _write_run(sft, 4, {"loss": lambda s: 2.0 / (1 + s)}, {"eval/accuracy": lambda s: s / 8})
    _checkpoint(sft, "sft", _sft_meta([], 6, 0.5))
    assert main(["report", str(sft), str(run)]) == 0
    out = capsys.readouterr().out
    assert "  B  builtin tasks count (data.seed 0, data.num_heldout 6): 6 prompts" in out
    assert (
        "* not comparable: exact match was measured on different held-out sets: A (sft), B" in out
    )

    png = save_plot([run, sft], tmp_path / "curves.png")
    assert png.stat().st_size > 20_000
    titles = [ax.get_title() for ax in plot_runs([run, sft]).get_axes()]
    for panel in ("loss", "reward", "KL to the reference", "response length", "generation share"):
        assert panel in titles
    assert "held-out exact match" in titles  # both runs evaluated it


# ------------------------------------------------------------------- configs with one's own data


def test_grpo_config_with_ones_own_data_names_the_fix(tmp_path) -> None:
    from finetune.grpo import GRPOConfig
    from lmforge.config import load_config
    from lmforge.errors import ConfigError

    config = Path(__file__).resolve().parents[1] / "configs" / "finetune" / "grpo.yaml"
    assert "--data.tasks=[]" in config.read_text()  # the config's comments say it first
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"prompt": "2+2?", "completion": "4"}) + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(GRPOConfig, config, [f"--data.source={data}"])
    message = str(err.value)
    assert message.startswith("data.tasks: selects builtin tasks (count), but data.source is")
    assert "set --data.tasks=[]" in message and "\n" not in message
    cfg = load_config(GRPOConfig, config, [f"--data.source={data}", "--data.tasks=[]"])
    assert cfg.data.tasks == [] and cfg.data.source == str(data)
