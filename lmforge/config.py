"""Typed config tree: dataclasses with documented defaults, YAML files, CLI overrides, presets.

Precedence is CLI > YAML > dataclass defaults. Every user mistake (unknown key, wrong type, bad
file) raises `ConfigError` with one line that names the full dotted key or file and what to do.

A nested section whose class sets `PRESETS: ClassVar[str] = "model"` may be given as a preset
name (`model: tiny`), a path (`model: my/model.yaml`) or a mapping with a `preset` key whose other
keys override the preset's values (`model: {preset: tiny, n_layers: 4}`). Presets live in
`configs/<PRESETS>/<name>.yaml`; `LMFORGE_CONFIG_DIR` points elsewhere. A preset is the base of
its section: keys set for that section anywhere (YAML or CLI) override it.

A nested section whose class sets `SHORTHAND: ClassVar[str] = "checkpoint"` may be given as a
single value that stands for that one field: `resume: auto` (or `--resume=auto`) means
`resume: {checkpoint: auto}`, and it combines with the section's other keys given elsewhere
(`--resume.allow_changes=optim.betas`). A section sets PRESETS or SHORTHAND, not both.

On the command line a key whose type is a list or tuple also takes comma-separated items:
`--data.paths=a.bin,b.bin` is `--data.paths=[a.bin, b.bin]` (an empty value is the empty list;
write the YAML list, quoted, for items that hold a comma).

YAML is read with PyYAML's safe loader, changed in three ways: `1e-3` is a float (YAML 1.2, as
users expect), dates stay strings, and a key repeated in one mapping is an error.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
import tempfile
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from lmforge.errors import ConfigError

T = TypeVar("T")


def option(
    default: Any = dataclasses.MISSING, doc: str = "", *, default_factory: Any = dataclasses.MISSING
) -> Any:
    """A dataclass field with a default and a one-line docstring (kept in the field's metadata)."""
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


class _Loader(yaml.SafeLoader):
    """Safe loader with YAML 1.2 floats (`1e-3`), no timestamps and no duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key '{key_node.value}'", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """Safe dumper that quotes the strings `_Loader` would read as floats (`'1e-3'`)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
# PyYAML (YAML 1.1) wants a dot in a float, so `1e-3` would otherwise load as a string.
for _yaml_cls in (_Loader, _Dumper):
    _yaml_cls.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )


# Most values a YAML text may stand for once its aliases are expanded. A config holds hundreds;
# an alias bomb ("billion laughs": nine aliases of nine aliases of ...) stands for billions, and
# every later pass (merging, checking types, printing a value in an error) would expand it.
MAX_YAML_VALUES = 100_000


def _expanded_size(root: yaml.Node) -> int:
    """How many values `root` stands for with every alias expanded, stopping early past
    MAX_YAML_VALUES (a node reached through an alias counts each time it is reached). A node
    that contains itself (`&a [*a]`) has no finite expansion: ComposerError."""
    sizes: dict[int, int] = {}  # id(node) -> expanded size, each node computed once
    active: set[int] = set()  # nodes whose children are being counted (a cycle passes one)
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]  # iterative: no recursion limit
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if children_done:
            active.discard(key)
            total = 1 + sum(sizes[id(c)] for c in children)
            sizes[key] = min(total, MAX_YAML_VALUES + 1)
            continue
        if key in active:
            raise yaml.composer.ComposerError(
                None, None, "an alias refers to the value that contains it", node.start_mark
            )
        active.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in active and id(child) not in sizes:
                raise yaml.composer.ComposerError(
                    None, None, "an alias refers to the value that contains it", child.start_mark
                )
            stack.append((child, False))
    return sizes[id(root)]


def _yaml_load(text: str) -> Any:
    """Parse YAML with `_Loader`, refusing (yaml.YAMLError) texts whose aliases expand to more
    than MAX_YAML_VALUES values or that nest too deeply to parse, before anything is built."""
    loader = _Loader(text)  # derives from SafeLoader
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise yaml.YAMLError("values nested too deeply; flatten the file") from None
        if node is None:
            return None
        if _expanded_size(node) > MAX_YAML_VALUES:
            raise yaml.composer.ComposerError(
                None,
                None,
                f"its aliases expand to more than {MAX_YAML_VALUES:,} values; "
                "write the values out or use fewer aliases",
                node.start_mark,
            )
        try:
            return loader.construct_document(node)
        except RecursionError:
            raise yaml.YAMLError("values nested too deeply; flatten the file") from None
        except ValueError as e:  # e.g. an integer past Python's digit limit
            detail = str(e).split(":")[0] if str(e) else "a value cannot be read"
            raise yaml.YAMLError(detail) from None
    finally:
        loader.dispose()


def _read_yaml(path: Path, cls: type | None, stack: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping, following a top-level `include:` (relative to the file) first."""
    path = path.expanduser()
    resolved = path.resolve()
    if resolved in stack:
        chain = " -> ".join(str(p) for p in (*stack, resolved))
        raise ConfigError(f"config file '{path}': include cycle {chain}; remove one include")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' not found; check the path") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file '{path}': not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
            f"{e.start}); save it as UTF-8"
        ) from None
    except OSError as e:
        raise ConfigError(f"config file '{path}' cannot be read ({e.strerror})") from None
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file '{path}'{where}: invalid YAML ({problem})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError(f"config file '{path}': top level must be a mapping, got {kind}")
    include = data.pop("include", None)
    data = _normalize_sections(cls, data)
    if include is None:
        return data
    if not isinstance(include, str):
        raise ConfigError(f"config file '{path}': include must be a file name")
    inc = path.parent / Path(include).expanduser()  # an absolute include replaces path.parent
    return merge(_read_yaml(inc, cls, (*stack, resolved)), data)


def _config_dir() -> Path:
    env = os.environ.get("LMFORGE_CONFIG_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "configs"


def _preset_kind(cls: Any) -> str | None:
    kind = getattr(cls, "PRESETS", None) if dataclasses.is_dataclass(cls) else None
    return kind if isinstance(kind, str) else None


def _preset_data(cls: type, name: Any, key: str) -> dict[str, Any]:
    """The raw mapping of preset `name` (a name in configs/<PRESETS>/ or a .yaml path)."""
    where = key or cls.__name__
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.preset: expected a preset name, got {_show(name)}")
    if name.endswith((".yaml", ".yml")):
        return _read_yaml(Path(name), cls)
    folder = _config_dir() / str(_preset_kind(cls))
    for suffix in (".yaml", ".yml"):
        if "/" not in name and "\\" not in name and (folder / (name + suffix)).is_file():
            return _read_yaml(folder / (name + suffix), cls)
    names = sorted({p.stem for p in folder.glob("*.y*ml")}) if folder.is_dir() else []
    hint = f"available: {', '.join(names)}" if names else f"no presets found in {folder}"
    raise ConfigError(f"{where}: unknown preset '{name}'; {hint}")


def load_preset(cls: type[T], name: str) -> T:
    """Build `cls` from preset `name` (configs/<cls.PRESETS>/<name>.yaml, or a .yaml path)."""
    if _preset_kind(cls) is None:
        raise ValueError(f"{cls.__name__} has no PRESETS class attribute")
    return from_dict(cls, {"preset": name})


def _shorthand(cls: Any) -> str | None:
    """The field a single value given for section `cls` stands for (its SHORTHAND), if any."""
    name = getattr(cls, "SHORTHAND", None) if dataclasses.is_dataclass(cls) else None
    if not isinstance(name, str):
        return None
    if _preset_kind(cls) is not None:  # `model: tiny` could then mean either: a bug in lmforge
        raise TypeError(f"{cls.__name__} sets both PRESETS and SHORTHAND; keep one")
    if name not in {f.name for f in _init_fields(cls)}:
        raise TypeError(f"{cls.__name__}.SHORTHAND names no field: {name!r}")
    return name


def _expand_section(cls: Any, value: Any) -> Any:
    """A single value given for a PRESETS or SHORTHAND section, as that section's mapping.

    `model: tiny` -> `{preset: tiny}`; `resume: auto` -> `{checkpoint: auto}` (any value other
    than a mapping or null, so a list-typed SHORTHAND field works too). Anything else is
    returned unchanged for `_build` to check.
    """
    if isinstance(value, str) and _preset_kind(cls):
        return {"preset": value}
    field = _shorthand(cls)
    if field is not None and value is not None and not isinstance(value, Mapping):
        return {field: value}
    return value


def _normalize_sections(cls: Any, data: Any) -> Any:
    """Rewrite single values given for PRESETS / SHORTHAND sections as mappings, recursively.

    Done on each layer (preset file, include, YAML, CLI) before merging, so `model: tiny` in a
    YAML and `--model.n_layers=4` on the CLI (or `resume: auto` and `--resume.allow_changes=x`)
    combine instead of one replacing the other.
    """
    if not dataclasses.is_dataclass(cls) or not isinstance(data, Mapping):
        return data
    hints = _hints(cls)
    out = dict(data)
    for name, value in data.items():
        sub = hints.get(name) if isinstance(name, str) else None
        if sub is None or not dataclasses.is_dataclass(sub):
            continue
        out[name] = _normalize_sections(sub, _expand_section(sub, value))
    return out


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _init_fields(cls: type) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _show(value: Any) -> str:
    """`str 'four'`: the type and a short repr of a value, for error messages."""
    if value is None:
        return "null"
    try:
        text = repr(value)
    except ValueError:  # an int too long to print (Python's digit limit)
        text = f"<{value.bit_length() if isinstance(value, int) else '?'}-bit number>"
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _type_name(tp: Any) -> str:
    """How a type reads in an error message: `int | None`, `dict[str, float]`."""
    if tp is type(None):
        return "None"
    if tp is Any:
        return "Any"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        names = ["..." if a is Ellipsis else _type_name(a) for a in args]
        base = getattr(origin, "__name__", str(origin))
        return f"{base}[{', '.join(names)}]" if names else base
    return getattr(tp, "__name__", str(tp))


def _type_error(tp: Any, value: Any, key: str) -> ConfigError:
    msg = f"{key or 'config'}: expected {_type_name(tp)}, got {_show(value)}"
    if tp is str and isinstance(value, (int, float)):
        msg += " (quote it to keep it a string)"
    return ConfigError(msg)


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against annotation `tp`, converting where lossless (int -> float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for member in (a for a in args if a is not type(None)):
            try:
                return _convert(member, value, key)
            except ConfigError as e:
                errors.append(e)
        # Report a member that got past the outer shape (its error names a deeper key, as in
        # `data.mix.wiki: expected float`); otherwise say which types would do.
        deeper = [e for e in errors if not str(e).startswith(f"{key}: ")]
        raise deeper[0] if deeper else _type_error(tp, value, key)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        msg = f"{key}: expected {_type_name(tp)}, got {_show(value)}"
        strs = [a for a in args if isinstance(a, str)]
        close = difflib.get_close_matches(value, strs, n=1) if isinstance(value, str) else []
        raise ConfigError(msg + (f"; did you mean '{close[0]}'?" if close else ""))
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        fixed = origin is tuple and args and args[-1] is not Ellipsis  # tuple[int, float]
        if fixed and len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}: {value!r}")
        items = args if fixed else [args[0] if args else Any] * len(value)
        out = [_convert(items[i], v, f"{key}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin in (dict, Mapping) and isinstance(value, Mapping):
        kt, vt = args if args else (Any, Any)
        return {_convert(kt, k, key): _convert(vt, v, _join(key, str(k))) for k, v in value.items()}
    if isinstance(value, bool) and tp in (int, float):
        raise _type_error(tp, value, key)  # bool is an int subclass; `true` is no layer count
    if tp is int and isinstance(value, int):
        return _checked_int(value, key)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {_show(value)}")
        return number
    if origin is None and isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _type_error(tp, value, key)


INT64 = 2**63  # every int key goes to torch, NumPy or C code as a signed 64-bit integer
SEED_LIMIT = 2**32  # NumPy's legacy seeding takes [0, 2**32); torch takes that too


def _checked_int(value: int, key: str) -> int:
    """`value` if an int key can hold it: within 64 bits, and a seed (a key named `seed` or
    `*_seed`) within [0, 2**32), which every seeded generator accepts, with room for the
    offsets added to it (rank, step)."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "seed" or leaf.endswith("_seed"):
        if not 0 <= value < SEED_LIMIT:
            raise ConfigError(
                f"{key}: a seed must be in [0, 2**32) (what NumPy and torch accept), got "
                f"{_show(value)}; choose a seed in that range"
            )
    elif not -INT64 <= value < INT64:
        raise ConfigError(f"{key}: {_show(value)} does not fit in 64 bits; use a value below 2**63")
    return value


def _build(cls: type[T], value: Any, prefix: str) -> T:
    if isinstance(value, cls):
        return value
    kind = _preset_kind(cls)
    value = _expand_section(cls, value)  # also here: a section inside a list or dict value
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        where = prefix or "config"
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {_show(value)}")
    if kind and "preset" in value:
        rest = {k: v for k, v in value.items() if k != "preset"}
        value = merge(_preset_data(cls, value["preset"], prefix), _normalize_sections(cls, rest))
    fields = {f.name: f for f in _init_fields(cls)}
    hints = _hints(cls)
    for name in value:
        if name not in fields:
            raise ConfigError(_unknown_key(cls, str(name), prefix))
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key missing; set it in the YAML or with --{key}=")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(prefix)
    return obj


def _unknown_key(cls: type, name: str, prefix: str) -> str:
    msg = f"unknown key '{_join(prefix, name)}'"
    names = [f.name for f in _init_fields(cls)]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    if close:
        return f"{msg}; did you mean '{_join(prefix, close[0])}'?"
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    return f"{msg}; valid keys{f' in {prefix!r}' if prefix else ''}: {shown}"


def from_dict(cls: type[T], data: Mapping[str, Any] | None, *, prefix: str = "") -> T:
    """Build dataclass `cls` (recursively) from plain dicts, checking every key and type.

    `prefix` is the dotted path of `cls` in the whole tree, used in error messages. Each built
    section's `validate(prefix)` method, if it has one, is called for semantic checks.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    return _build(cls, _normalize_sections(cls, data), prefix)


def _override_pairs(args: Sequence[str]) -> list[tuple[str, str, Any]]:
    """(dotted key, raw text, YAML value) for each `--key=value` / `--key value` argument."""
    pairs: list[tuple[str, str, Any]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"bad argument '{arg}': write overrides as --section.key=value")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, raw = arg[2:], args[i + 1]
            i += 1
        else:
            raise ConfigError(f"argument '{arg}' has no value; write {arg}=VALUE")
        if not key or not all(key.split(".")):
            raise ConfigError(f"bad argument '{arg}': write overrides as --section.key=value")
        try:
            value = _yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            shown = arg if len(arg) <= 80 else arg[:77] + "..."
            raise ConfigError(f"argument '{shown}': cannot parse the value; quote it") from None
        pairs.append((key, raw, value))
        i += 1
    return pairs


def _key_type(cls: type, key: str) -> Any:
    """The annotation of dotted `key` in dataclass `cls`; None if the key is unknown (from_dict
    reports it). A SHORTHAND section stands for its shorthand field, as `--resume=...` does."""
    tp: Any = cls
    for name in key.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = _hints(tp).get(name)
        if tp is None:
            return None
    field = _shorthand(tp)
    return _hints(tp)[field] if field is not None else tp


def _item_types(tp: Any) -> list[Any] | None:
    """For a list or tuple annotation (or one of those `| None`): the item type of each
    position, cycling for variable length. None for any other annotation, including unions
    with a non-sequence type (`str | list[str]`: there a comma may belong to the string)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        return _item_types(members[0]) if len(members) == 1 else None
    if origin is list or (origin is tuple and args and args[-1] is Ellipsis):
        return [args[0] if args else Any]
    if origin is tuple:
        return list(args) or [Any]
    return None


def _cli_value(cls: type, key: str, arg: str, raw: str, value: Any) -> Any:
    """The value of one CLI override: its YAML value, except that a list- or tuple-typed key
    given neither a YAML list (`[a, b]`) nor null takes comma-separated items (`a,b`)."""
    items = _item_types(_key_type(cls, key))
    if items is None or value is None or raw.strip().startswith("["):
        return value
    pieces = [p.strip() for p in raw.split(",")]
    pieces = [] if pieces == [""] else pieces
    out: list[Any] = []
    for i, piece in enumerate(pieces):
        if items[i % len(items)] is str:
            out.append(piece)  # `--resume.allow_changes=1e-3,true` stays strings, as typed
            continue
        try:
            out.append(_yaml_load(piece) if piece else "")
        except yaml.YAMLError:
            raise ConfigError(f"argument '{arg}': cannot parse item '{piece}'; quote it") from None
    return out


def _nest(key: str, value: Any) -> dict[str, Any]:
    *parents, leaf = key.split(".")
    out: dict[str, Any] = {leaf: value}
    for name in reversed(parents):
        out = {name: out}
    return out


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """Parse `--section.key=value` / `--section.key value` into a nested dict.

    Values are YAML (`4`, `true`, `[1, 2]`, `1e-3`, `null`); an empty value is the empty string.
    Later arguments win. Without a config class this knows no types, so `a,b` stays a string
    here; `load_config` reads it as a list for list-typed keys.
    """
    out: dict[str, Any] = {}
    for key, _, value in _override_pairs(args):
        out = merge(out, _nest(key, value))
    return out


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge two nested dicts into a new one; on a conflict `override` wins."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build `cls` from its defaults, then the YAML file at `path`, then CLI `overrides`."""
    data = _read_yaml(Path(path), cls) if path is not None else {}
    for key, raw, value in _override_pairs(overrides):
        value = _cli_value(cls, key, f"--{key}={raw}", raw, value)
        data = merge(data, _normalize_sections(cls, _nest(key, value)))
    return from_dict(cls, data)


def plain(value: Any) -> Any:
    """`value` as JSON would give it back: config objects as dicts, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain dicts, lists and scalars (YAML/JSON-able), in field order."""
    return {f.name: plain(getattr(cfg, f.name)) for f in _init_fields(type(cfg))}


def dumps(cfg: Any) -> str:
    """The config as YAML, keys in field order; `load_config` reads it back to an equal object."""
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def file_mode() -> int:
    """The mode a new file gets from open(): 0o666 less the process umask."""
    try:  # Linux reports the umask without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def dump_config(cfg: Any, path: str | Path) -> None:
    """Write the config as YAML to `path` atomically (a temp file, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(dumps(cfg))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())  # mkstemp makes it private; give it what open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def describe(cls: type) -> list[tuple[str, str, str, str]]:
    """(dotted key, type as written, default repr, doc) for every field, depth first.

    A nested section gets a row of its own (default "") before its fields. Raises ValueError
    naming every field without a doc: that is a bug in lmforge, not a user error.
    """
    rows: list[tuple[str, str, str, str]] = []
    undocumented: list[str] = []

    def walk(c: type, prefix: str) -> None:
        hints = _hints(c)
        for f in _init_fields(c):
            key = _join(prefix, f.name)
            doc = str(f.metadata.get("doc", "")).strip()
            if not doc:
                undocumented.append(key)
            written = f.type if isinstance(f.type, str) else _type_name(f.type)
            sub = hints[f.name]
            if dataclasses.is_dataclass(sub):
                rows.append((key, written, "", doc))
                walk(sub, key)
                continue
            if f.default is not dataclasses.MISSING:
                default = repr(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = repr(f.default_factory())
            else:
                default = "(required)"
            rows.append((key, written, default, doc))

    walk(cls, "")
    if undocumented:
        raise ValueError(f"config fields without a doc: {', '.join(undocumented)}")
    return rows
