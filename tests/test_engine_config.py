"""The DeepSpeed JSON: "auto" values filled from the run config, contradictions refused."""

from __future__ import annotations

import json

import pytest

from lmforge.engine import EngineConfig, load_deepspeed_json, resolve_deepspeed_config
from lmforge.errors import ConfigError
from lmforge.optim import OptimConfig


def _resolve(ds: dict, **engine: object) -> dict:
    return resolve_deepspeed_config(
        ds,
        cfg=EngineConfig(precision="fp32", **engine),
        optim=OptimConfig(lr=1e-3, grad_clip=0.5),
        micro_batch=4,
        grad_accum=3,
        world=2,
    )


def test_shipped_config_fills_every_auto_value() -> None:
    ds = _resolve(load_deepspeed_json("configs/deepspeed/default.json"), zero_stage=3)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 24
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 3
    assert "auto" not in json.dumps(ds)


def test_stage_comes_from_the_json_when_the_run_leaves_it_null() -> None:
    assert (
        _resolve(load_deepspeed_json("configs/deepspeed/zero1.json"))["zero_optimization"]["stage"]
        == 1
    )
    assert _resolve({})["zero_optimization"]["stage"] == 2  # nothing said anywhere


@pytest.mark.parametrize(
    ("ds", "engine", "needle"),
    [
        ({"train_micro_batch_size_per_gpu": 8}, {}, "train_micro_batch_size_per_gpu"),
        ({"train_batch_size": 32}, {}, "train_batch_size"),
        ({"gradient_clipping": 1.0}, {}, "gradient_clipping"),
        ({"bf16": {"enabled": True}}, {}, "bf16.enabled"),
        ({"zero_optimization": {"stage": 1}}, {"zero_stage": 3}, "zero_optimization.stage"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 5e-4}}}, {}, "optimizer.params.lr"),
        ({"optimizer": {"type": "Lamb"}}, {}, "optimizer.type"),
        ({"scheduler": {"type": "WarmupLR", "params": {}}}, {}, "scheduler"),
        ({}, {"offload_params": True, "zero_stage": 2}, "offload_params"),
    ],
)
def test_contradictions_name_the_key(ds: dict, engine: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")) as err:
        _resolve(ds, **engine)
    assert "\n" not in str(err.value)


def test_agreeing_and_auto_sections_are_accepted() -> None:
    ds = _resolve(
        {
            "train_micro_batch_size_per_gpu": 4,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": "auto"}},
            "scheduler": "auto",
        }
    )
    assert "optimizer" not in ds and "scheduler" not in ds  # lmforge builds both


def test_offload_sections() -> None:
    ds = _resolve(load_deepspeed_json("configs/deepspeed/zero3_offload.json"))
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    ds = _resolve(load_deepspeed_json("configs/deepspeed/zero3_offload.json"), offload_params=False)
    assert "offload_param" not in ds["zero_optimization"]


def test_inline_json_and_bad_paths() -> None:
    assert load_deepspeed_json('{"zero_optimization": {"stage": 1}}')["zero_optimization"] == {
        "stage": 1
    }
    with pytest.raises(ConfigError, match=r"engine\.deepspeed"):
        load_deepspeed_json("no/such/file.json")
    with pytest.raises(ConfigError, match=r"inline JSON"):
        load_deepspeed_json("{not json")
