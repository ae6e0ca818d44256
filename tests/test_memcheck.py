"""The memory check at config load (lmforge.memcheck): the shipped configs always pass, a run is
refused only past MARGIN times what the machine has, and the refusal names the numbers and keys.
The machine's memory is given by hand where the boundary is the point (a test cannot change the
RAM it runs on); everything else is the real estimate of real configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge import memcheck
from lmforge.config import load_config
from lmforge.errors import ConfigError
from lmforge.memcheck import MARGIN, check_memory, estimate_need, host_available

REPO = Path(__file__).resolve().parents[1]


def _stage_class(config: Path) -> type:
    from finetune.dpo import DPOConfig
    from finetune.grpo import GRPOConfig
    from finetune.ppo import PPOConfig
    from finetune.reward import RewardConfig
    from finetune.sft import SFTConfig
    from pretrain.train import PretrainConfig

    if config.parent.name == "pretrain":
        return PretrainConfig
    stages = {"sft": SFTConfig, "dpo": DPOConfig, "grpo": GRPOConfig, "ppo": PPOConfig}
    return stages.get(config.stem, RewardConfig)


SHIPPED = sorted((REPO / "configs").glob("pretrain/*.yaml")) + sorted(
    (REPO / "configs").glob("finetune/*.yaml")
)


@pytest.mark.parametrize("config", SHIPPED, ids=[f"{p.parent.name}/{p.name}" for p in SHIPPED])
def test_shipped_configs_are_never_refused(config: Path, task_base: Path) -> None:
    """Every shipped config loads (the check runs inside), and its estimate is tiny; finetuning
    configs are measured on a real checkpoint as their init_from."""
    cls = _stage_class(config)
    overrides = [] if cls.__name__ == "PretrainConfig" else [f"--init_from={task_base}"]
    if cls.__name__ == "PPOConfig":
        overrides.append("--reward_model=")
    cfg = load_config(cls, config, overrides)
    need = estimate_need(cfg, cfg.train.micro_batch_size, 1, on_gpu=False)
    assert need is not None and need.host < 2**30, need
    assert need.host * MARGIN * 4 < host_available()  # far from the limit on any test machine


def _pretrain(*overrides: str) -> object:
    from pretrain.train import PretrainConfig

    args = ["--model=debug", "--data.seq_len=64", "--train.device=cpu", *overrides]
    return load_config(PretrainConfig, None, args)


def test_refused_only_past_the_margin(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _pretrain("--train.micro_batch_size=8", "--train.global_batch_size=8")
    need = estimate_need(cfg, 8, 1, on_gpu=False)
    assert need is not None and need.host > 0
    monkeypatch.setattr(memcheck, "host_available", lambda: int(need.host / MARGIN) + 1)
    check_memory(cfg, 8, 1)  # within the margin: a close call is left to the run
    monkeypatch.setattr(memcheck, "host_available", lambda: int(need.host / MARGIN / 2))
    with pytest.raises(ConfigError) as err:
        check_memory(cfg, 8, 1)
    line = str(err.value)
    assert "\n" not in line and line.startswith("memory: this run needs at least")
    for key in ("train.micro_batch_size=8", "data.seq_len=64", "model.dim", "engine.zero_stage"):
        assert key in line, line
    monkeypatch.setenv("LMFORGE_NO_MEMCHECK", "1")
    check_memory(cfg, 8, 1)  # the escape hatch


def test_processes_of_one_host_share_its_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Four processes on one host need four shares of its memory, one process per host one;
    ZeRO-3 over them shrinks each share's model states."""
    cfg = _pretrain("--train.micro_batch_size=1", "--train.global_batch_size=4")
    each = estimate_need(cfg, 1, 4, on_gpu=False)
    assert each is not None
    monkeypatch.setattr(memcheck, "host_available", lambda: int(each.host * 2))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # four hosts
    check_memory(cfg, 1, 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # one host
    with pytest.raises(ConfigError, match=r"of RAM \(4 processes × "):
        check_memory(cfg, 1, 4)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    zero3 = _pretrain("--train.micro_batch_size=1", "--train.global_batch_size=4",
                      "--engine.zero_stage=3")  # fmt: skip
    sharded = estimate_need(zero3, 1, 4, on_gpu=False)
    assert sharded is not None and sharded.states < each.states
    assert sharded.states == 16 * sharded.params / 4  # fp32 Adam: (4 + 4 + 8) bytes, in 4


def test_an_absurd_model_is_refused_without_being_built() -> None:
    """A model of 10⁸ layers is refused from its matrix weights at once (counting it exactly
    would build 10⁸ layers on the meta device)."""
    with pytest.raises(ConfigError) as err:
        _pretrain("--model.n_layers=100000000")
    assert "at least 4,915,200,032,768 parameters" in str(err.value)  # 10⁸ × 49152 + 512 × 64
