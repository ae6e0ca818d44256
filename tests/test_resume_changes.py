"""Resuming with changed settings: the SHORTHAND config sections (`resume: auto` and
`--resume.allow_changes=a,b`), comma-separated CLI lists, and lmforge.resume's comparison of a
run's saved config with the new one (applied, refused, allowed) and its config.yaml records."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from lmforge.config import describe, dump_config, dumps, from_dict, load_config, option
from lmforge.errors import ConfigError
from lmforge.faults import FaultConfig
from lmforge.optim import OptimConfig
from lmforge.resume import (
    APPLIED_KEYS,
    Change,
    ResumeConfig,
    config_changes,
    format_changes,
    previous_change_lines,
    record_changes,
)
from lmforge.runtime import TrainConfig
from lmforge.tracking import TrackingConfig


@dataclass
class ModelCfg:
    n_layers: int = option(2, "Blocks.")
    dim: int = option(64, "Width.")


@dataclass
class DataCfg:
    source: str = option("a.jsonl", "Training file.")
    mix: dict[str, float] = option(default_factory=dict, doc="Weight per corpus.")
    tags: str | list[str] = option("", "A name, or several.")


@dataclass
class RunCfg:
    """A stage-like tree: the real resume, optim, train, tracking and faults sections."""

    run_dir: str = option("runs/x", "Run directory.")
    resume: ResumeConfig = option(default_factory=ResumeConfig, doc="Resume.")
    init_from: str = option("", "Start weights.")
    beta: float = option(0.1, "A stage hyper-parameter.")
    model: ModelCfg = option(default_factory=ModelCfg, doc="Model.")
    data: DataCfg = option(default_factory=DataCfg, doc="Data.")
    optim: OptimConfig = option(default_factory=OptimConfig, doc="Optimizer.")
    train: TrainConfig = option(default_factory=TrainConfig, doc="Training.")
    tracking: TrackingConfig = option(default_factory=TrackingConfig, doc="Logging.")
    faults: FaultConfig = option(default_factory=FaultConfig, doc="Faults.")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def saved_config(cfg: Any) -> dict[str, Any]:
    """What a checkpoint's lmforge.json gives back: asdict, through JSON."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def refused(saved: Any, current: Any, allow: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        config_changes(saved, current, allow)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# --- SHORTHAND sections -----------------------------------------------------------------------


def test_resume_shorthand_from_yaml(tmp_path: Path) -> None:
    cfg = load_config(RunCfg, write(tmp_path / "c.yaml", "resume: never\n"))
    assert cfg.resume == ResumeConfig(checkpoint="never", allow_changes=[])
    assert load_config(RunCfg).resume.checkpoint == "auto"
    both = "resume:\n  checkpoint: never\n  allow_changes: [data, optim.betas]\n"
    cfg = load_config(RunCfg, write(tmp_path / "d.yaml", both))
    assert cfg.resume == ResumeConfig("never", ["data", "optim.betas"])
    assert load_config(RunCfg, write(tmp_path / "e.yaml", "resume:\n")).resume == ResumeConfig()


def test_resume_shorthand_from_cli() -> None:
    assert load_config(RunCfg, None, ["--resume=never"]).resume == ResumeConfig("never")
    cfg = load_config(RunCfg, None, ["--resume.allow_changes=a,b"])
    assert cfg.resume == ResumeConfig("auto", ["a", "b"])
    for args in (
        ["--resume=never", "--resume.allow_changes=a,b"],
        ["--resume.allow_changes=a,b", "--resume=never"],
        ["--resume", "never", "--resume.allow_changes", "a, b"],
    ):
        assert load_config(RunCfg, None, args).resume == ResumeConfig("never", ["a", "b"])


def test_shorthand_merges_across_yaml_and_cli(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "resume: never\n")
    cfg = load_config(RunCfg, path, ["--resume.allow_changes=data.source"])
    assert cfg.resume == ResumeConfig("never", ["data.source"])
    path = write(tmp_path / "d.yaml", "resume: {allow_changes: [model]}\n")
    assert load_config(RunCfg, path, ["--resume=never"]).resume == ResumeConfig("never", ["model"])


def test_shorthand_in_from_dict_and_old_saved_configs() -> None:
    # A config saved before resume was a section had `resume: "auto"`: it still loads.
    assert from_dict(RunCfg, {"resume": "auto"}).resume == ResumeConfig()
    assert from_dict(ResumeConfig, "never") == ResumeConfig("never")  # type: ignore[arg-type]


def test_shorthand_value_of_the_wrong_type_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^resume\.checkpoint: expected str, got int 3"):
        load_config(RunCfg, None, ["--resume=3"])
    with pytest.raises(ConfigError, match=r"^unknown key 'resume\.allow'"):
        load_config(RunCfg, None, ["--resume.allow=x"])


def test_resume_checkpoint_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as info:
        load_config(RunCfg, None, [f"--resume={missing}"])
    assert str(info.value) == (
        f"resume.checkpoint: {missing} does not exist; use auto, never or a path"
    )
    assert load_config(RunCfg, None, [f"--resume={tmp_path}"]).resume.checkpoint == str(tmp_path)
    with pytest.raises(ConfigError, match=r"resume\.allow_changes\[1\]: empty key"):
        load_config(RunCfg, None, ["--resume.allow_changes=[a, '']"])


def test_dump_load_round_trip(tmp_path: Path) -> None:
    cfg = load_config(RunCfg, None, ["--resume=never", "--resume.allow_changes=data,optim.lr"])
    assert load_config(RunCfg, write(tmp_path / "c.yaml", dumps(cfg))) == cfg
    dump_config(RunCfg(), tmp_path / "d.yaml")
    assert load_config(RunCfg, tmp_path / "d.yaml") == RunCfg()


@dataclass
class Both:
    PRESETS: ClassVar[str] = "model"
    SHORTHAND: ClassVar[str] = "x"
    x: str = option("a", "X.")


@dataclass
class HasBoth:
    both: Both = option(default_factory=Both, doc="Both.")


def test_presets_and_shorthand_do_not_mix() -> None:
    # `both: tiny` could mean a preset or x: a bug in the config class, not a user error.
    with pytest.raises(TypeError, match="both PRESETS and SHORTHAND"):
        from_dict(HasBoth, {"both": "b"})


# --- comma-separated lists on the command line ------------------------------------------------


def test_cli_lists_take_comma_separated_items() -> None:
    cfg = load_config(RunCfg, None, ["--resume.allow_changes=data.source,model.n_layers"])
    assert cfg.resume.allow_changes == ["data.source", "model.n_layers"]
    assert load_config(RunCfg, None, ["--resume.allow_changes=data"]).resume.allow_changes == [
        "data"
    ]
    assert load_config(RunCfg, None, ["--resume.allow_changes=[a, b]"]).resume.allow_changes == [
        "a",
        "b",
    ]
    assert load_config(RunCfg, None, ["--resume.allow_changes="]).resume.allow_changes == []
    # Items of a list[str] stay the text typed, even when YAML would read a number.
    strings = load_config(RunCfg, None, ["--tracking.wandb.tags=1e-3,true"]).tracking.wandb.tags
    assert strings == ["1e-3", "true"]
    # Other item types are read as YAML values and checked as usual.
    faults = load_config(RunCfg, None, ["--faults.inject_nan_at_steps=3,5"]).faults
    assert faults.inject_nan_at_steps == [3, 5]
    assert load_config(RunCfg, None, ["--optim.betas=0.8, 0.99"]).optim.betas == (0.8, 0.99)
    with pytest.raises(ConfigError, match=r"faults\.inject_nan_at_steps\[1\]: expected int"):
        load_config(RunCfg, None, ["--faults.inject_nan_at_steps=3,x"])
    with pytest.raises(ConfigError, match=r"optim\.betas: expected 2 items, got 3"):
        load_config(RunCfg, None, ["--optim.betas=0.8,0.9,0.9"])


def test_cli_comma_in_a_string_or_union_key_is_kept() -> None:
    assert load_config(RunCfg, None, ["--data.source=a,b.jsonl"]).data.source == "a,b.jsonl"
    assert load_config(RunCfg, None, ["--data.tags=a,b"]).data.tags == "a,b"


# --- config_changes ---------------------------------------------------------------------------


def base() -> RunCfg:
    """The resumed run: the values these tests compare against, spelled out (not defaults)."""
    return RunCfg(
        optim=OptimConfig(lr=3e-3, betas=(0.9, 0.95)),
        train=TrainConfig(steps=1000, eval_every=200, global_batch_size=32, seed=1234),
    )


def changed(values: dict[str, Any]) -> RunCfg:
    """base() with dotted keys set: changed({"optim.lr": 1e-4})."""
    cfg = base()
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node: Any = cfg
        for name in parents:
            node = getattr(node, name)
        setattr(node, leaf, value)
    return cfg


def test_applied_keys_are_returned_as_changes() -> None:
    new = changed({"optim.lr": 1e-4, "train.steps": 2000, "train.eval_every": 50})
    changes = config_changes(saved_config(base()), new, [])
    assert changes == [
        Change("optim.lr", 3e-3, 1e-4),
        Change("train.steps", 1000, 2000),
        Change("train.eval_every", 200, 50),
    ]
    assert format_changes(changes) == [
        "resume: optim.lr 0.003 -> 0.0001",
        "resume: train.steps 1000 -> 2000",
        "resume: train.eval_every 200 -> 50",
    ]
    # A dict of the config works too.
    assert config_changes(saved_config(base()), saved_config(new), []) == changes


def test_sections_and_tuples_are_applied() -> None:
    new = changed(
        {
            "optim.betas": (0.9, 0.99),
            "train.micro_batch_size": base().train.micro_batch_size * 2,
            "tracking.wandb.mode": "offline",
            "faults.spike_zscore": base().faults.spike_zscore + 1,
        }
    )
    changes = config_changes(saved_config(base()), new, [])
    assert [c.key for c in changes] == [
        "optim.betas",
        "train.micro_batch_size",
        "tracking.wandb.mode",
        "faults.spike_zscore",
    ]
    assert changes[0] == Change("optim.betas", [0.9, 0.95], [0.9, 0.99])


@pytest.mark.parametrize(
    ("key", "value", "values"),
    [
        ("data.source", "b.jsonl", "('a.jsonl' -> 'b.jsonl')"),
        ("model.n_layers", 4, "(2 -> 4)"),
        ("train.global_batch_size", 64, "(32 -> 64)"),
        ("train.seed", 7, "(1234 -> 7)"),
        ("init_from", "w", "('' -> 'w')"),
        ("beta", 0.2, "(0.1 -> 0.2)"),
    ],
)
def test_other_changes_are_refused_naming_the_key(key: str, value: Any, values: str) -> None:
    msg = refused(saved_config(base()), changed({key: value, "optim.lr": 1e-4}))
    assert msg == (
        f"resume: {key} differs from the run being resumed {values}; it cannot change mid-run: "
        f"start a new run_dir, or allow it with --resume.allow_changes={key}"
    )


def test_refusal_names_the_first_key_and_counts_the_rest() -> None:
    new = changed({"model.n_layers": 4, "model.dim": 32, "optim.lr": 1e-4})
    msg = refused(saved_config(base()), new)
    assert msg.startswith("resume: model.n_layers differs from the run being resumed (2 -> 4)")
    assert "(and 1 more: model.dim)" in msg
    assert msg.endswith("allow them with --resume.allow_changes=model.n_layers,model.dim")


def test_allow_changes_exact_and_prefix() -> None:
    saved = saved_config(base())
    new = changed({"model.n_layers": 4, "data.source": "b.jsonl"})
    msg = refused(saved, new, ("data.source",))
    assert msg.startswith("resume: model.n_layers differs")
    changes = config_changes(saved, new, ["data.source", "model"])
    assert changes == [Change("model.n_layers", 2, 4), Change("data.source", "a.jsonl", "b.jsonl")]
    assert config_changes(saved, new, ["data", "model.n_layers"]) == changes
    # A prefix covers whole dotted parts only: `model.n` is no key.
    with pytest.raises(ConfigError, match=r"'model\.n' is not a config key"):
        config_changes(saved, new, ["model.n"])
    with pytest.raises(ConfigError, match=r"did you mean 'data\.source'"):
        config_changes(saved, new, ["data.sorce"])


def test_equal_numbers_and_sequences_are_no_change() -> None:
    saved = saved_config(base())
    saved["train"]["steps"] = 1000.0  # 1 == 1.0
    saved["optim"]["betas"] = [0.9, 0.95]  # the config holds a tuple
    saved["model"]["n_layers"] = 2.0
    assert config_changes(saved, base(), []) == []
    saved["train"]["elastic_state"] = int(base().train.elastic_state)  # a bool is not a number
    assert [c.key for c in config_changes(saved, base(), [])] == ["train.elastic_state"]


def test_resume_run_dir_and_one_sided_keys_are_ignored() -> None:
    saved = saved_config(base())
    saved["resume"] = "auto"  # an older version's string
    saved["run_dir"] = "/elsewhere"
    saved["removed_option"] = 3  # a key the current version no longer has
    del saved["model"]["dim"]  # a key the older version did not have
    new = changed({"resume": ResumeConfig("never", ["data"]), "model.dim": 8, "run_dir": "r"})
    assert config_changes(saved, new, new.resume.allow_changes) == []


def test_dict_settings_compare_whole() -> None:
    saved = saved_config(RunCfg(data=DataCfg(mix={"a": 1.0})))
    new = RunCfg(data=DataCfg(mix={"a": 1.0, "b": 1.0}))  # a corpus added is a change
    assert "data.mix differs" in refused(saved, new)
    assert config_changes(saved, new, ["data.mix"]) == [
        Change("data.mix", {"a": 1.0}, {"a": 1.0, "b": 1.0})
    ]


def test_applied_keys_name_real_stage_keys() -> None:
    from lmforge.config_reference import STAGES, stage_config_class

    # Some train keys (eval_batches, samples) belong to one stage's train section only.
    keys = {key for stage in STAGES for key, *_ in describe(stage_config_class(stage))}
    assert set(APPLIED_KEYS) <= keys, set(APPLIED_KEYS) - keys
    optim = {f"optim.{f.name}" for f in dataclasses.fields(OptimConfig)}
    assert optim <= set(APPLIED_KEYS)  # every optimizer setting is read afresh each step


# --- config.yaml records ----------------------------------------------------------------------


def test_record_changes_keeps_yaml_and_previous_lines(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    first = RunCfg(optim=OptimConfig(lr=1e-4))
    dump_config(first, path)
    record_changes(path, [Change("optim.lr", 3e-3, 1e-4)], step=3)
    assert previous_change_lines(path) == ["# resumed at step 3: optim.lr 0.003 -> 0.0001"]
    assert load_config(RunCfg, path) == first
    # The next resume reads the old records before writing config.yaml afresh.
    previous = previous_change_lines(path)
    second = RunCfg(optim=OptimConfig(lr=1e-4), train=TrainConfig(steps=50))
    dump_config(second, path)
    record_changes(path, [Change("train.steps", 1000, 50)], step=9, previous=previous)
    text = path.read_text()
    assert text.endswith(
        "# resumed at step 3: optim.lr 0.003 -> 0.0001\n"
        "# resumed at step 9: train.steps 1000 -> 50\n"
    )
    assert yaml.safe_load(text) == saved_config(second)
    assert load_config(RunCfg, path) == second


def test_record_changes_writes_a_line_once_and_nothing_without_changes(tmp_path: Path) -> None:
    path = write(tmp_path / "config.yaml", "seed: 1\n")
    record_changes(path, [], step=5)
    assert path.read_text() == "seed: 1\n"
    line = "# resumed at step 5: optim.lr 0.003 -> 0.0001"
    record_changes(path, [Change("optim.lr", 3e-3, 1e-4)], step=5, previous=[line])
    assert path.read_text().count(line) == 1
    assert previous_change_lines(tmp_path / "missing.yaml") == []
