"""The one checkpoint format (DESIGN.md, "The checkpoint format"): write atomically, read, validate.

A checkpoint is written into a hidden sibling `.NAME.partial/`, listed with sizes and sha256 in
`lmforge.json`, flushed to disk, and only then renamed to NAME; the run directory's `latest` file
is replaced after that. A crash at any moment leaves either the previous checkpoint or the new
one, never a half-written directory under a real name. Loading never unpickles: weights are
safetensors, everything else JSON.

Two heads share the format (config.json's `architectures` tells them apart, lmforge.json records
it as `head`): a language model ("lm", `*ForCausalLM`) and a reward model or critic ("reward",
`*ForSequenceClassification` with one label): the backbone's weights without any LM head, plus
`score.weight`. `load_checkpoint` returns the GPT of either; `load_reward_model` returns a
`RewardModel` from either (from an LM checkpoint with a fresh score head: how reward training
starts).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.config import file_mode
from lmforge.errors import CheckpointError, ConfigError
from lmforge.hf import (
    Head,
    from_hf_config,
    from_llama_key,
    head_of,
    is_llama_compatible,
    to_hf_config,
    to_llama_key,
)
from lmforge.model import GPT, ModelConfig, build_model
from lmforge.reward import RewardModel, build_reward_model, drop_lm_head

FORMAT_VERSION = 1
META_FILE = "lmforge.json"
LATEST_FILE = "latest"
BEST_FILE = "best"  # names the step with the best evaluation so far (train.keep_best)
POINTER_FILES = (LATEST_FILE, BEST_FILE)
ENGINE_DIR = "deepspeed"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 2**30  # Hugging Face's default shard size
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# A Hugging Face hub name as `init_from` takes it: `org/name` (the hub's repo-id characters).
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What loading reads from a hub snapshot (weights never as pickles; chat templates may be .jinja).
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", LATEST_FILE]


# ------------------------------------------------------------------------------ file helpers


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"checkpoint metadata value of type {type(value).__name__} is not JSON")


def write_json(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """Parse a JSON file; a missing or malformed one is a CheckpointError naming it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the file is corrupt") from None


# ----------------------------------------------------------------------------------- writing


def partial_dir(path: Path) -> Path:
    """The hidden directory a checkpoint is written into before it is renamed to `path`."""
    return path.parent / f".{path.name}.partial"


@contextmanager
def staging(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory for the checkpoint `path`; remove it on any error."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: already exists; choose a new path or pass overwrite=True")
    tmp = partial_dir(path)
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a crash: never used, always rewritten
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def plain_name_problem(name: str) -> str | None:
    """Why `name` cannot be what a pointer file (`latest`, `best`) holds (None if it can): the
    plain name of a directory beside that file, like step-000100: one path component, not
    hidden, printable."""
    if not name:
        return "is empty"
    if "/" in name or "\\" in name or os.sep in name or name in (".", ".."):
        return "is a path, not the plain name of a checkpoint directory beside it"
    if name.startswith("."):
        return "is a hidden name (an unfinished save), not a checkpoint"
    if not name.isprintable() or len(name) > 255:
        return "is not a checkpoint name"
    return None


def write_pointer(run_dir: Path, pointer: str, name: str) -> None:
    """Point `run_dir/<pointer>` (`latest` or `best`) at the checkpoint `name` (a directory in
    run_dir), atomically: written beside it under a hidden name, flushed, then renamed."""
    problem = plain_name_problem(name)
    if problem:
        raise ValueError(f"{pointer}: {name!r} {problem}")
    tmp = run_dir / f".{pointer}.tmp"
    tmp.write_text(name + "\n")
    _fsync(tmp)
    os.replace(tmp, run_dir / pointer)
    _fsync(run_dir)


def write_latest(run_dir: Path, name: str) -> None:
    """Point `run_dir/latest` at the checkpoint `name` (a directory in run_dir), atomically."""
    write_pointer(run_dir, LATEST_FILE, name)


def read_pointer(run_dir: Path, pointer: str) -> str | None:
    """The checkpoint name `run_dir/<pointer>` (`latest` or `best`) holds; None when there is
    no such file. Anything but the plain name of a directory beside it (a path, `..`, an
    absolute path, a hidden name, bytes that are not UTF-8 text) is a CheckpointError naming
    the file: a run directory only ever points at its own checkpoints. Whether the named
    checkpoint exists is `resolve_checkpoint`'s check."""
    file = run_dir / pointer
    try:
        data = file.read_bytes()[: 64 << 10]
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise CheckpointError(f"{file}: cannot be read ({e.strerror}); fix or delete it") from None
    fix = "write the name of a step-* directory beside it into it, or delete it"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{file}: holds binary bytes, not a checkpoint name; {fix}") from None
    name = text.strip()
    problem = plain_name_problem(name)
    if problem:
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise CheckpointError(f"{file}: holds {shown!r}, which {problem}; {fix}")
    return name


def read_latest(run_dir: Path) -> str | None:
    """The checkpoint name `run_dir/latest` holds (see `read_pointer`)."""
    return read_pointer(run_dir, LATEST_FILE)


def commit(tmp: Path, path: Path, meta: Mapping[str, Any], *, update_latest: bool) -> Path:
    """Write the manifest into `tmp`, flush everything, rename `tmp` to `path`, update latest.

    The `head` recorded in lmforge.json is read from the config.json in `tmp`, so the two files
    cannot disagree whoever wrote the weights (save_checkpoint or a collective save).
    """
    if (tmp / "config.json").exists():
        head = head_of(read_json(tmp / "config.json"), str(tmp / "config.json"))
        if meta.get("head", head) != head:
            raise ValueError(f"metadata says head={meta['head']!r} but the weights are {head!r}")
        meta = {**meta, "head": head}
    files: dict[str, dict[str, Any]] = {}
    for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
        rel = file.relative_to(tmp).as_posix()
        if rel == META_FILE:
            continue
        _fsync(file)
        files[rel] = {"size": file.stat().st_size, "sha256": sha256_file(file)}
    record = {
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **meta,
        "files": files,
    }
    write_json(tmp / META_FILE, record)
    _fsync(tmp / META_FILE)
    _fsync(tmp)
    old = path.parent / f".{path.name}.old"
    if path.exists():  # overwrite: keep the old one until the new one is in place
        if old.exists():  # left by a crash after an earlier overwrite's rename: garbage
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync(path.parent)
    if old.exists():
        shutil.rmtree(old)
    if update_latest:
        write_latest(path.parent, path.name)
    return path


def state_head(state: Mapping[str, torch.Tensor]) -> Head:
    """The head of a state dict: "reward" for a RewardModel's (it has `score.weight`), else "lm"."""
    return "reward" if "score.weight" in state else "lm"


def _hf_state_dict(
    cfg: ModelConfig, state: Mapping[str, torch.Tensor], head: Head
) -> dict[str, torch.Tensor]:
    llama = is_llama_compatible(cfg)
    out = {}
    for name, tensor in state.items():
        if head == "reward":
            if name == "score.weight":
                out[name] = tensor.detach().contiguous()  # the sequence classifiers' key
                continue
            name = name.removeprefix("backbone.")
            if name == "output.weight":
                continue  # a sequence classifier has no LM head
        if cfg.tie_embeddings and name == "output.weight":
            continue  # tied: transformers re-ties it from the embedding
        key = to_llama_key(name) if llama else f"model.{name}"
        out[key] = tensor.detach().contiguous()
    return out


def save_safetensors(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """One safetensors file with the mode every other file of the checkpoint gets (safetensors
    itself creates its files readable by their owner only, whatever the umask)."""
    save_file(tensors, file, metadata={"format": "pt"})
    os.chmod(file, file_mode())


def _save_weights(directory: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    if len(shards) == 1:
        save_safetensors(shards[0], directory / WEIGHTS_FILE)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, directory / name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(
        directory / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map}
    )


def _token_ids(tokenizer: Any) -> dict[str, Any]:
    if tokenizer is None:
        return {}
    from lmforge.data.templates import stop_token_ids

    # EOS, and the chat template's end-of-turn token: generation stops on either.
    eos = stop_token_ids(tokenizer) or [tokenizer.eos_token_id]
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": tokenizer.pad_token_id,
    }


def write_model_files(
    directory: Path,
    cfg: ModelConfig,
    state: Mapping[str, torch.Tensor],
    tokenizer: Any = None,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> None:
    """config.json, weights, generation_config.json and tokenizer files into `directory`.

    `state` is a GPT's state dict, or a RewardModel's (`backbone.*` and `score.weight`), which
    is written as a one-label sequence classifier.
    """
    head = state_head(state)
    tensors = _hf_state_dict(cfg, state, head)
    dtype = next(t.dtype for t in tensors.values() if t.is_floating_point())
    ids = _token_ids(tokenizer)
    if head == "reward" and ids.get("pad_token_id") is None:
        # transformers scores a batch at each row's last token that is not pad_token_id.
        raise ValueError("a reward checkpoint needs a tokenizer with a pad token (pad_token_id)")
    hf_config = to_hf_config(cfg, dtype=dtype, token_ids=ids, head=head)
    hf_config.to_json_file(directory / "config.json")
    if head == "reward":  # transformers keeps only id2label; say it plainly for other readers
        write_json(
            directory / "config.json", {**read_json(directory / "config.json"), "num_labels": 1}
        )
    _save_weights(directory, tensors, max_shard_bytes)
    write_json(
        directory / "generation_config.json", {k: v for k, v in ids.items() if v is not None}
    )
    if tokenizer is not None:
        from lmforge.tokenizer import save_tokenizer

        save_tokenizer(tokenizer, directory)


def save_checkpoint(
    path: str | Path,
    model: GPT | RewardModel,
    tokenizer: Any = None,
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    update_latest: bool = False,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    **meta: Any,
) -> Path:
    """Write `model` (and tokenizer) as a checkpoint directory at `path`, atomically.

    `meta` goes into lmforge.json (stage, step, tokens_seen, config, data_cursor, rng, parent,
    metrics, ...). A RewardModel is written as a one-label sequence classifier (it needs the
    tokenizer, for pad_token_id) and lmforge.json records `head: reward`. `state_dict` replaces
    the model's own (e.g. weights gathered from ZeRO-3).
    With update_latest, `path.parent/latest` names this checkpoint once it is complete.
    """
    path = Path(path)
    state = state_dict if state_dict is not None else model.state_dict()
    with staging(path, overwrite=overwrite) as tmp:
        write_model_files(tmp, model.cfg, state, tokenizer, max_shard_bytes=max_shard_bytes)
        record = {"model": dataclasses.asdict(model.cfg), **meta}
        commit(tmp, path, record, update_latest=update_latest)
    return path


# ----------------------------------------------------------------------------------- reading


def _offline() -> bool:
    """Whether the network is off for Hugging Face: huggingface_hub's rule (HF_HUB_OFFLINE, else
    TRANSFORMERS_OFFLINE, is 1/on/yes/true), read now rather than when it was imported."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_snapshot(name: str) -> Path:
    """The local folder of the hub model `name` (`org/name`): its snapshot in the Hugging Face
    cache (HF_HUB_CACHE / HF_HOME), downloaded first unless HF_HUB_OFFLINE is set."""
    from huggingface_hub import snapshot_download

    offline = _offline()
    try:
        folder = snapshot_download(name, local_files_only=offline, allow_patterns=_HUB_FILES)
    except Exception as e:  # huggingface_hub raises many types: missing, gated, unreachable
        if offline:
            raise CheckpointError(
                f"{name}: not a local directory and not in the Hugging Face cache, and "
                f"HF_HUB_OFFLINE is set; download it first (`hf download {name}` with the "
                "network on) or give a local path"
            ) from None
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f"{name}: not a local directory, and the Hugging Face hub cannot provide it "
            f"({detail}); check the name and your access, or give a local path"
        ) from None
    return Path(folder)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory; a run directory whose `latest` file names one of its own
    checkpoint directories (`read_pointer`); a run directory's pointer file itself
    (`runs/sft/best`, `runs/sft/latest`): the checkpoint it names, with the same checks; or a
    Hugging Face hub name (`org/name`, when no such local path exists): its cached snapshot,
    which may in turn be either (see `hub_snapshot`)."""
    p = Path(path)
    if p.name in POINTER_FILES and not p.is_dir() and p.parent.is_dir():
        return _pointed(p.parent, p.name)
    if not p.exists() and _HUB_NAME.match(str(path)):
        p = hub_snapshot(str(path))
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such checkpoint directory")
    if not (p / "config.json").exists() and (p / LATEST_FILE).is_file():
        return _pointed(p, LATEST_FILE)
    if not (p / "config.json").exists():
        raise CheckpointError(f"{p}: not a checkpoint (no config.json and no '{LATEST_FILE}' file)")
    return p


def _pointed(run_dir: Path, pointer: str) -> Path:
    """The checkpoint directory `run_dir/<pointer>` names; a missing pointer file or one naming
    no checkpoint of run_dir is a CheckpointError."""
    name = read_pointer(run_dir, pointer)
    if name is None:
        why = " (that run did not set train.keep_best)" if pointer == BEST_FILE else ""
        raise CheckpointError(
            f"{run_dir / pointer}: no such file{why}; name a step-* directory of {run_dir}, or "
            f"{run_dir} itself for its latest checkpoint"
        )
    target = run_dir / name
    if not (target / "config.json").exists():
        raise CheckpointError(
            f"{run_dir / pointer}: names {name!r}, which is not a checkpoint in {run_dir} (no "
            f"{name}/config.json); point it at an existing step-* directory or delete it"
        )
    return target


def verify_files(
    ckpt: Path,
    meta: Mapping[str, Any],
    *,
    engine: bool = False,
    select: Callable[[str], bool] | None = None,
) -> None:
    """Check every file listed in lmforge.json for presence, size and sha256.

    Files under deepspeed/ are optional (removable without harm) and checked only with engine;
    `select` (a predicate on the relative path) limits which of them are checked.
    """
    for rel, info in meta.get("files", {}).items():
        optional = rel.startswith(ENGINE_DIR + "/")
        if optional and (not engine or (select is not None and not select(rel))):
            continue
        file = ckpt / rel
        if not file.exists():
            if optional:
                continue
            raise CheckpointError(f"{file}: missing (listed in {META_FILE}); restore it")
        size = file.stat().st_size
        if size != info["size"]:
            raise CheckpointError(
                f"{file}: {size} bytes but {META_FILE} records {info['size']}; "
                "the file is truncated or was modified"
            )
        if sha256_file(file) != info["sha256"]:
            raise CheckpointError(
                f"{file}: sha256 does not match {META_FILE}; the file is corrupt or was modified"
            )


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.exists():
        raise CheckpointError(f"{file}: missing; the checkpoint is incomplete")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{file}: unreadable safetensors ({e}); file truncated or corrupt"
        ) from None


def read_weights(ckpt: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """All tensors of a checkpoint (single file or sharded) and the file to name in errors."""
    if (ckpt / INDEX_FILE).exists():
        index = read_json(ckpt / INDEX_FILE)
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index.get("weight_map", {}).values())):
            tensors.update(_load_safetensors(ckpt / shard))
        return tensors, ckpt / INDEX_FILE
    if (ckpt / WEIGHTS_FILE).exists():
        return _load_safetensors(ckpt / WEIGHTS_FILE), ckpt / WEIGHTS_FILE
    pickles = sorted(p.name for p in ckpt.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{ckpt / pickles[0]}: pickle weights are never loaded (they can run code); "
            "convert the model to safetensors"
        )
    raise CheckpointError(f"{ckpt / WEIGHTS_FILE}: missing; the checkpoint has no weights")


def _our_names(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if is_llama_compatible(cfg):
        mapped = {from_llama_key(k): v for k, v in tensors.items()}
        return {k: v for k, v in mapped.items() if k is not None}
    return {k.removeprefix("model."): v for k, v in tensors.items()}


def load_state_into(model: GPT, state: dict[str, torch.Tensor], where: Path) -> None:
    """Assign `state` to a (meta or real) model after checking names and shapes."""
    expected = dict(model.named_parameters())  # a tied output.weight is listed once
    if model.cfg.tie_embeddings:
        state.pop("output.weight", None)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{where}: tensor {missing[0]!r} is missing ({len(missing)} in all)")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{where}: unexpected tensor {unexpected[0]!r}; the weights do not match config.json"
        )
    for name, param in expected.items():
        if tuple(state[name].shape) != tuple(param.shape):
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {list(state[name].shape)} but config.json "
                f"implies {list(param.shape)}; the config does not match the weights"
            )
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()


# Training-only fields that config.json of a Llama checkpoint cannot hold; lmforge.json keeps them.
_TRAINING_ONLY = (
    "embed_dropout",
    "resid_dropout",
    "attn_dropout",
    "init_std",
    "scaled_residual_init",
)


# Rope fields each rope_type leaves unread (config.json of a Llama-style model omits them).
_UNREAD_ROPE = {
    "default": (
        "rope_factor",
        "rope_low_freq_factor",
        "rope_high_freq_factor",
        "rope_original_max_seq_len",
    ),
    "linear": ("rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_seq_len"),
    "dynamic": ("rope_low_freq_factor", "rope_high_freq_factor"),
    "llama3": (),
}


def _architecture(cfg: ModelConfig) -> dict[str, Any]:
    """The fields of `cfg` that config.json determines, resolved, for comparing the two files.

    Left out: training-only fields; `bias` of an RMSNorm model (it reaches the model only
    through the resolved linear bias flags); rope fields the rope_type does not read; and
    max_seq_len of dynamic RoPE, whose config.json holds the original context instead.
    """
    arch = dataclasses.asdict(cfg.resolved())
    unread = [*_TRAINING_ONLY, *_UNREAD_ROPE[cfg.rope_type]]
    if cfg.norm == "rmsnorm":
        unread.append("bias")
    if cfg.rope_type == "dynamic":
        unread.append("max_seq_len")
    return {k: v for k, v in arch.items() if k not in unread}


def _model_config(ckpt: Path, meta: Mapping[str, Any]) -> ModelConfig:
    """The architecture from config.json; lmforge.json's copy adds the training-only fields
    (and max_seq_len of a dynamic-RoPE model)."""
    where = ckpt / "config.json"
    cfg = from_hf_config(read_json(where), str(where))
    try:
        cfg.validate("")
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    if "model" not in meta:
        return cfg
    try:
        ours = ModelConfig(**meta["model"])
    except TypeError as e:
        raise CheckpointError(f"{ckpt / META_FILE}: bad 'model' section ({e})") from None
    a, b = _architecture(cfg), _architecture(ours)
    for key in sorted(a.keys() | b.keys()):
        if a.get(key) != b.get(key):
            raise CheckpointError(
                f"{where}: {key}={a.get(key)!r} but {META_FILE} says {b.get(key)!r}; "
                "the two files disagree: restore the original config.json"
            )
    return ours


@dataclasses.dataclass
class _Stored:
    """What every loader reads first: the directory, metadata, architecture, head, and the
    tensors under our names (the score head, if any, as `score.weight`)."""

    ckpt: Path
    meta: dict[str, Any]
    cfg: ModelConfig
    head: Head
    state: dict[str, torch.Tensor]
    where: Path


def _read_checkpoint(
    path: str | Path, *, dtype: torch.dtype | None, verify: bool, meta: Mapping[str, Any] | None
) -> _Stored:
    ckpt = resolve_checkpoint(path)
    if meta is not None:  # read (and verified) by the caller already
        meta = dict(meta)
    else:
        meta = read_json(ckpt / META_FILE) if (ckpt / META_FILE).exists() else {}
        if meta and verify:
            verify_files(ckpt, meta)
    head = head_of(read_json(ckpt / "config.json"), str(ckpt / "config.json"))
    if meta.get("head", head) != head:
        raise CheckpointError(
            f"{ckpt / 'config.json'}: describes a {head!r} head but {META_FILE} says "
            f"{meta['head']!r}; the two files disagree: restore the original config.json"
        )
    meta["head"] = head
    cfg = _model_config(ckpt, meta)
    tensors, where = read_weights(ckpt)
    state = _our_names(cfg, tensors)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    return _Stored(ckpt, meta, cfg, head, state, where)


def _finish(
    stored: _Stored, model: torch.nn.Module, device: str | torch.device, with_tokenizer: bool
) -> tuple[Any, Any, dict[str, Any]]:
    model = model.to(device).eval()  # like from_pretrained; training stages call .train()
    tokenizer = None
    if with_tokenizer and (stored.ckpt / "tokenizer.json").exists():
        from lmforge.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(stored.ckpt)
    stored.meta["path"] = str(stored.ckpt)
    return model, tokenizer, stored.meta


def load_checkpoint(
    path: str | Path,
    *,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
    verify: bool = True,
    with_tokenizer: bool = True,
    meta: Mapping[str, Any] | None = None,
) -> tuple[GPT, Any, dict[str, Any]]:
    """Load an lmforge checkpoint or a local Hugging Face Llama directory.

    Returns (model, tokenizer or None, metadata). `path` may be a run directory (its `latest`
    checkpoint is used). With verify, every file is checked against the manifest first.
    dtype None keeps the stored precision. The model is returned in eval mode. `meta` is the
    checkpoint's lmforge.json when the caller has read and verified it already.

    A reward checkpoint (`meta["head"] == "reward"`) gives its backbone GPT, whose LM head is the
    tied embedding; an untied one stores no LM head, which is an error (use load_reward_model).
    """
    stored = _read_checkpoint(path, dtype=dtype, verify=verify, meta=meta)
    state = stored.state
    if stored.head == "reward":
        state.pop("score.weight", None)
        if not stored.cfg.tie_embeddings and "output.weight" not in state:
            raise CheckpointError(
                f"{stored.where}: a reward model with untied embeddings stores no LM head, so it "
                "is no language model; load it with lmforge.checkpoint.load_reward_model"
            )
    model = build_model(stored.cfg, device="meta")
    load_state_into(model, state, stored.where)
    return _finish(stored, model, device, with_tokenizer)


def load_reward_model(
    path: str | Path,
    *,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
    verify: bool = True,
    with_tokenizer: bool = True,
    seed: int | None = None,
    meta: Mapping[str, Any] | None = None,
) -> tuple[RewardModel, Any, dict[str, Any]]:
    """Load a RewardModel from a reward checkpoint, or from a language-model checkpoint (an SFT
    or pretraining one, or a Hugging Face Llama) with a fresh score head initialised from `seed`:
    how reward training starts. `meta["head"]` says which it was ("reward" or "lm").

    Returns (reward model in eval mode, tokenizer or None, metadata); arguments as in
    `load_checkpoint`.
    """
    stored = _read_checkpoint(path, dtype=dtype, verify=verify, meta=meta)
    state, where = stored.state, stored.where
    score = state.pop("score.weight", None)
    backbone = build_model(stored.cfg, device="meta")
    if stored.head == "lm":
        load_state_into(backbone, state, where)
        return _finish(stored, build_reward_model(backbone, seed=seed), device, with_tokenizer)
    if score is None:
        raise CheckpointError(f"{where}: tensor 'score.weight' is missing; the reward head is lost")
    dim = stored.cfg.dim
    if tuple(score.shape) != (1, dim):
        raise CheckpointError(
            f"{where}: tensor 'score.weight' has shape {list(score.shape)}, expected [1, {dim}]"
        )
    state.pop("output.weight", None)  # a Hugging Face classifier may keep one; the score needs none
    load_state_into(drop_lm_head(backbone), state, where)
    model = RewardModel(backbone)
    model.score.weight = torch.nn.Parameter(score)
    return _finish(stored, model, device, with_tokenizer)
