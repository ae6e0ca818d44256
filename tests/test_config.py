"""The typed config tree: from_dict validation, overrides, precedence, presets, YAML, describe."""

from __future__ import annotations

import dataclasses
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import pytest
import yaml

from lmforge.config import (
    describe,
    dump_config,
    dumps,
    from_dict,
    load_config,
    load_preset,
    merge,
    option,
    parse_overrides,
    to_dict,
)
from lmforge.errors import ConfigError, LmforgeError


@dataclass
class ModelCfg:
    PRESETS: ClassVar[str] = "model"

    n_layers: int = option(4, "Number of blocks.")
    n_heads: int = option(2, "Attention heads.")
    dim: int = option(64, "Width.")
    norm: Literal["rmsnorm", "layernorm"] = option("rmsnorm", "Normalisation layer.")
    dropout: float = option(0.0, "Dropout probability.")
    bias: bool = option(False, "Use biases in linear layers.")

    def validate(self, prefix: str) -> None:
        if self.dim % self.n_heads:
            raise ConfigError(f"{prefix}.n_heads: {self.n_heads} does not divide dim {self.dim}")


@dataclass
class DataCfg:
    paths: list[str] = option(doc="Training files.", default_factory=list)
    mix: str | dict[str, float] = option("uniform", "Mixture name or weights per corpus.")
    seq_len: int | None = option(None, "Sequence length; None means the model's context.")
    shape: tuple[int, ...] = option((1, 2), "Any number of ints.")


@dataclass
class OptimCfg:
    lr: float = option(3e-4, "Peak learning rate.")
    betas: tuple[float, float] = option((0.9, 0.95), "Adam betas.")
    warmup: int = option(100, "Warmup steps.")


@dataclass
class RunCfg:
    name: str = option("run", "Run name.")
    seed: int = option(0, "Random seed.")
    model: ModelCfg = option(default_factory=ModelCfg, doc="The model.")
    data: DataCfg = option(default_factory=DataCfg, doc="The data.")
    optim: OptimCfg = option(default_factory=OptimCfg, doc="The optimizer.")


@dataclass
class Undocumented:
    good: int = option(1, "Has a doc.")
    bad: int = option(2)
    plain: str = "x"


@dataclass
class Outer:
    inner: Undocumented = option(default_factory=Undocumented, doc="Nested.")


def error(fn, *args, **kwargs) -> str:
    """The message of the ConfigError that fn raises; it must be a single line."""
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def presets(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "configs"
    write(root / "model" / "tiny.yaml", "n_layers: 2\ndim: 32\nn_heads: 4\n")
    write(root / "model" / "small.yaml", "include: tiny.yaml\nn_layers: 6\n")
    monkeypatch.setenv("LMFORGE_CONFIG_DIR", str(root))
    return root


# --- option -------------------------------------------------------------------------------------


def test_option_keeps_doc_and_defaults():
    f = {f.name: f for f in dataclasses.fields(RunCfg)}
    assert f["seed"].metadata["doc"] == "Random seed." and f["seed"].default == 0
    assert RunCfg().data.paths == [] and RunCfg().data.paths is not RunCfg().data.paths


# --- from_dict ----------------------------------------------------------------------------------


def test_from_dict_defaults_and_nested_values():
    assert from_dict(RunCfg, None) == RunCfg()
    cfg = from_dict(RunCfg, {"model": {"n_layers": 8}, "data": {"paths": ["a", "b"]}})
    assert cfg.model == ModelCfg(n_layers=8)
    assert cfg.data.paths == ["a", "b"]


def test_unknown_key_suggests_closest():
    msg = error(from_dict, RunCfg, {"model": {"n_layer": 3}})
    assert msg == "unknown key 'model.n_layer'; did you mean 'model.n_layers'?"
    assert "did you mean 'seed'" in error(from_dict, RunCfg, {"sed": 1})


def test_unknown_key_without_close_match_lists_valid_keys():
    msg = error(from_dict, RunCfg, {"optim": {"zzz": 1}})
    assert "'optim.zzz'" in msg and "lr, betas, warmup" in msg


def test_prefix_is_used_in_messages():
    assert "'run.model.n_layer'" in error(from_dict, ModelCfg, {"n_layer": 1}, prefix="run.model")


def test_wrong_type_names_key_and_expected_type():
    msg = error(from_dict, RunCfg, {"model": {"n_layers": "four"}})
    assert msg == "model.n_layers: expected int, got str 'four'"
    assert "data.paths[1]: expected str, got int 3" in error(
        from_dict, RunCfg, {"data": {"paths": ["a", 3]}}
    )
    assert "model: expected a mapping" in error(from_dict, RunCfg, {"model": [1]})


@pytest.mark.parametrize(
    ("section", "value"),
    [("model.n_layers", True), ("model.dropout", False), ("model.bias", 1), ("model.bias", "yes")],
)
def test_bool_is_strict(section, value):
    top, key = section.split(".")
    msg = error(from_dict, RunCfg, {top: {key: value}})
    assert msg.startswith(f"{section}: expected ")


def test_bool_accepts_real_bools():
    assert from_dict(ModelCfg, {"bias": True}).bias is True


def test_int_is_coerced_to_float_but_float_is_not_int():
    cfg = from_dict(RunCfg, {"optim": {"lr": 1, "betas": [1, 0.5]}})
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1.0
    assert cfg.optim.betas == (1.0, 0.5) and isinstance(cfg.optim.betas[0], float)
    assert "optim.warmup: expected int, got float 1.5" in error(
        from_dict, RunCfg, {"optim": {"warmup": 1.5}}
    )


def test_literal_lists_choices():
    msg = error(from_dict, ModelCfg, {"norm": "layernrm"}, prefix="model")
    assert "model.norm: expected one of 'rmsnorm', 'layernorm'" in msg
    assert "did you mean 'layernorm'" in msg


def test_optional_accepts_none_and_value():
    assert from_dict(DataCfg, {"seq_len": None}).seq_len is None
    assert from_dict(DataCfg, {"seq_len": 128}).seq_len == 128
    assert "seq_len: expected int | None" in error(from_dict, DataCfg, {"seq_len": "long"})


def test_tuples_fixed_and_variadic():
    assert from_dict(DataCfg, {"shape": [3, 4, 5]}).shape == (3, 4, 5)
    assert "optim.betas: expected 2 items, got 3" in error(
        from_dict, RunCfg, {"optim": {"betas": [0.9, 0.9, 0.9]}}
    )


def test_union_tries_each_member():
    assert from_dict(DataCfg, {"mix": "wiki"}).mix == "wiki"
    mix = from_dict(DataCfg, {"mix": {"wiki": 1, "code": 0.5}}).mix
    assert mix == {"wiki": 1.0, "code": 0.5} and isinstance(mix["wiki"], float)
    # A dict with a bad weight reports the weight, not "expected str".
    assert "data.mix.code: expected float, got str 'x'" in error(
        from_dict, RunCfg, {"data": {"mix": {"code": "x"}}}
    )
    assert "data.mix: expected str | dict[str, float], got list" in error(
        from_dict, RunCfg, {"data": {"mix": [1]}}
    )


def test_validate_runs_with_section_prefix():
    msg = error(from_dict, RunCfg, {"model": {"n_heads": 3}})
    assert msg == "model.n_heads: 3 does not divide dim 64"


def test_config_error_is_an_lmforge_error():
    with pytest.raises(LmforgeError):
        from_dict(RunCfg, {"nope": 1})


# --- presets ------------------------------------------------------------------------------------


def test_preset_by_name_and_with_overrides(presets):
    assert from_dict(RunCfg, {"model": "tiny"}).model == ModelCfg(n_layers=2, dim=32, n_heads=4)
    cfg = from_dict(RunCfg, {"model": {"preset": "tiny", "n_layers": 3}})
    assert cfg.model == ModelCfg(n_layers=3, dim=32, n_heads=4)


def test_preset_include_and_load_preset(presets):
    assert load_preset(ModelCfg, "small") == ModelCfg(n_layers=6, dim=32, n_heads=4)
    with pytest.raises(ValueError, match="PRESETS"):
        load_preset(DataCfg, "x")


def test_preset_given_as_yaml_path(presets, tmp_path):
    path = write(tmp_path / "mine.yml", "dim: 48\nn_heads: 3\n")
    assert from_dict(RunCfg, {"model": str(path)}).model == ModelCfg(dim=48, n_heads=3)


def test_unknown_preset_lists_available(presets):
    msg = error(from_dict, RunCfg, {"model": "huge"})
    assert msg == "model: unknown preset 'huge'; available: small, tiny"


def test_preset_values_are_validated_with_file_keys(presets):
    write(presets / "model" / "broken.yaml", "n_layer: 2\n")
    assert "'model.n_layer'; did you mean 'model.n_layers'" in error(
        from_dict, RunCfg, {"model": "broken"}
    )


def test_preset_in_yaml_combines_with_cli_keys(presets, tmp_path):
    path = write(tmp_path / "run.yaml", "model: tiny\n")
    cfg = load_config(RunCfg, path, ["--model.n_layers=5"])
    assert cfg.model == ModelCfg(n_layers=5, dim=32, n_heads=4)
    cfg = load_config(RunCfg, None, ["--model=tiny", "--model.dim=64"])
    assert cfg.model == ModelCfg(n_layers=2, dim=64, n_heads=4)


# --- overrides and merge ------------------------------------------------------------------------


def test_parse_overrides_both_forms_and_types():
    args = ["--model.n_layers=4", "--model.bias", "true", "--data.paths=[a, b]", "--optim.lr=1e-3"]
    args += ["--optim.warmup", "0.1", "--data.seq_len=null", "--name=", "--seed", "-3"]
    out = parse_overrides(args)
    assert out == {
        "model": {"n_layers": 4, "bias": True},
        "data": {"paths": ["a", "b"], "seq_len": None},
        "optim": {"lr": 1e-3, "warmup": 0.1},
        "name": "",
        "seed": -3,
    }
    assert isinstance(out["optim"]["lr"], float)


@pytest.mark.parametrize("text", ["1e-3", "1E3", "-2.5e+4", "1.0e5"])
def test_exponent_numbers_are_floats(text):
    value = parse_overrides([f"--x={text}"])["x"]
    assert isinstance(value, float) and value == float(text)


def test_parse_overrides_keeps_dates_and_words_as_strings():
    assert parse_overrides(["--a=2024-01-01", "--b", "hello"]) == {"a": "2024-01-01", "b": "hello"}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["model.n_layers=4"], "'model.n_layers=4'"),
        (["--model.n_layers"], "'--model.n_layers' has no value"),
        (["--a", "--b=1"], "'--a' has no value"),
        (["--=3"], "'--=3'"),
        (["--a..b=1"], "'--a..b=1'"),
        (["--a=[1, 2"], "'--a=[1, 2'"),
    ],
)
def test_parse_overrides_errors_name_the_argument(args, needle):
    assert needle in error(parse_overrides, args)


def test_merge_is_deep_and_does_not_mutate():
    base = {"a": {"x": 1, "y": 2}, "b": 1}
    out = merge(base, {"a": {"y": 3}, "c": 4})
    assert out == {"a": {"x": 1, "y": 3}, "b": 1, "c": 4}
    assert base == {"a": {"x": 1, "y": 2}, "b": 1}
    assert merge({"a": {"x": 1}}, {"a": 5}) == {"a": 5}


# --- load_config --------------------------------------------------------------------------------


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    path = write(
        tmp_path / "run.yaml",
        """
        seed: 1          # set in YAML and on the CLI
        model:
          n_layers: 6    # set in YAML only
        optim:
          lr: 0.01       # set in YAML and on the CLI
        """,
    )
    cfg = load_config(RunCfg, path, ["--seed=2", "--optim.lr", "1e-3"])
    assert cfg.seed == 2 and cfg.optim.lr == 1e-3  # CLI wins over YAML
    assert cfg.model.n_layers == 6  # YAML wins over default
    assert cfg.name == "run" and cfg.optim.warmup == 100  # defaults where nothing is set
    assert load_config(RunCfg) == RunCfg()


def test_yaml_exponent_is_float(tmp_path):
    path = write(tmp_path / "run.yaml", "optim:\n  lr: 3e-4\n")
    assert load_config(RunCfg, path).optim.lr == 3e-4


def test_missing_file_is_named(tmp_path):
    msg = error(load_config, RunCfg, tmp_path / "nope.yaml")
    assert "nope.yaml" in msg and "not found" in msg


def test_bad_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.yaml", "seed: 1\nmodel:\n  n_layers: [1, 2\nname: x\n")
    msg = error(load_config, RunCfg, path)
    assert str(path) in msg and "line " in msg and "invalid YAML" in msg


def test_duplicate_yaml_key_is_an_error(tmp_path):
    path = write(tmp_path / "dup.yaml", "seed: 1\nseed: 2\n")
    msg = error(load_config, RunCfg, path)
    assert str(path) in msg and "line 2" in msg and "duplicate key 'seed'" in msg


def test_yaml_top_level_must_be_mapping(tmp_path):
    path = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    assert "top level must be a mapping" in error(load_config, RunCfg, path)
    assert load_config(RunCfg, write(tmp_path / "empty.yaml", "")) == RunCfg()


def test_unknown_key_in_yaml_and_cli(tmp_path):
    path = write(tmp_path / "run.yaml", "optim:\n  lr_: 0.1\n")
    assert "did you mean 'optim.lr'" in error(load_config, RunCfg, path)
    assert "did you mean 'model.dim'" in error(load_config, RunCfg, None, ["--model.dims=3"])


def test_include_is_overridden_by_including_file(tmp_path):
    write(tmp_path / "base" / "common.yaml", "seed: 7\nname: base\nmodel:\n  n_layers: 3\n")
    path = write(tmp_path / "run.yaml", "include: base/common.yaml\nname: child\n")
    cfg = load_config(RunCfg, path)
    assert (cfg.seed, cfg.name, cfg.model.n_layers) == (7, "child", 3)


def test_include_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "include: b.yaml\nseed: 1\n")
    write(tmp_path / "b.yaml", "include: a.yaml\nseed: 2\n")
    msg = error(load_config, RunCfg, tmp_path / "a.yaml")
    assert "include cycle" in msg and "a.yaml" in msg and "b.yaml" in msg
    write(tmp_path / "self.yaml", "include: self.yaml\n")
    assert "include cycle" in error(load_config, RunCfg, tmp_path / "self.yaml")


def test_missing_include_is_named(tmp_path):
    path = write(tmp_path / "run.yaml", "include: gone.yaml\n")
    assert "gone.yaml" in error(load_config, RunCfg, path)


# --- output -------------------------------------------------------------------------------------


def test_to_dict_is_plain():
    d = to_dict(RunCfg())
    assert d["optim"]["betas"] == [0.9, 0.95] and d["data"]["shape"] == [1, 2]
    assert list(d) == ["name", "seed", "model", "data", "optim"]
    assert yaml.safe_load(yaml.safe_dump(d)) == d


def test_dump_and_load_round_trip(tmp_path):
    cfg = from_dict(
        RunCfg,
        {
            "name": "exp",
            "model": {"n_layers": 3, "norm": "layernorm", "bias": True, "dropout": 0.1},
            "data": {"paths": ["x.bin"], "mix": {"a": 0.25}, "seq_len": 256, "shape": [7]},
            "optim": {"lr": 1e-10, "betas": [0.8, 0.99]},
        },
    )
    text = dumps(cfg)
    assert text.index("name:") < text.index("model:") < text.index("optim:")
    path = tmp_path / "out" / "config.yaml"
    dump_config(cfg, path)
    assert load_config(RunCfg, path) == cfg
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]  # no temp left


def test_number_like_strings_round_trip(tmp_path):
    cfg = RunCfg(name="1e-3", data=DataCfg(paths=["2024-01-01", "true", "null", "1.5"]))
    assert "'1e-3'" in dumps(cfg)
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(RunCfg, tmp_path / "c.yaml") == cfg
    assert (tmp_path / "c.yaml").stat().st_mode & 0o777 == 0o644


def test_dump_config_replaces_existing_file(tmp_path):
    path = write(tmp_path / "config.yaml", "old: true\n")
    dump_config(RunCfg(seed=5), path)
    assert load_config(RunCfg, path).seed == 5


def test_describe_lists_every_field():
    rows = {key: (tp, default, doc) for key, tp, default, doc in describe(RunCfg)}
    assert rows["model"] == ("ModelCfg", "", "The model.")
    assert rows["model.n_layers"] == ("int", "4", "Number of blocks.")
    assert rows["model.norm"][0] == "Literal['rmsnorm', 'layernorm']"
    assert rows["data.mix"][:2] == ("str | dict[str, float]", "'uniform'")
    assert rows["data.paths"][1] == "[]"
    assert "PRESETS" not in rows and len(rows) == 2 + (1 + 6) + (1 + 4) + (1 + 3)


def test_describe_finds_undocumented_fields():
    with pytest.raises(ValueError, match=r"inner\.bad, inner\.plain") as info:
        describe(Outer)
    assert "inner.good" not in str(info.value)
