"""A stage's training state on disk: the collective checkpoint save (with the free-space check,
the whole fp32 state for elastic resume, and retention) and the matching restore, which reads
DeepSpeed's own partitioned state or re-shards the whole one."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lmforge.checkpoint import (
    ENGINE_DIR,
    META_FILE,
    commit,
    partial_dir,
    read_json,
    verify_files,
    write_model_files,
)
from lmforge.distributed import DistInfo
from lmforge.elastic import CONSOLIDATED_DIR, STATE_FILE, load_consolidated, save_consolidated
from lmforge.errors import CheckpointError
from lmforge.rundir import apply_retention, checkpoint_bytes, latest_name, space_problem
from lmforge.runtime import barrier, load_rng, save_rng

SAVE_PAUSE_ENV = "LMFORGE_TEST_SAVE_PAUSE"  # testing aid: seconds to hold a save before commit


def merge_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Fold LoRA adapters into their base weights in a gathered state dict:
    W = W0 + scaling·B·A (Hu et al. 2021), keys back to the plain model's names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if ".base_layer." in key:
            prefix, _, leaf = key.partition(".base_layer.")
            if leaf == "weight":
                a = state[f"{prefix}.lora_A.default.weight"].float()  # (r, in)
                b = state[f"{prefix}.lora_B.default.weight"].float()  # (out, r)
                value = (value.float() + scaling * (b @ a)).to(value.dtype)  # (out, in)
            key = f"{prefix}.{leaf}"
        out[key] = value
    return out


def save_stage_checkpoint(
    engine: Any,
    path: Path,
    *,
    tokenizer: Any,
    info: DistInfo,
    meta: dict[str, Any],
    lora_scaling: float | None = None,
) -> Path:
    """Collective save: every rank writes its engine shard and RNG state into the partial
    directory (and, with train.elastic_state, the whole fp32 weights and optimizer state go to
    deepspeed/consolidated/); rank 0 writes the consolidated weights (LoRA merged when
    lora_scaling is given) and the tokenizer, renames the directory into place, points `latest`
    at it and applies retention (train.keep_last, keep_every).

    The train settings come from meta["config"]["train"] (every stage's metadata carries its
    config). Before anything is written every rank checks the free disk space; too little is a
    CheckpointError on every rank, and the previous checkpoint is left as it was."""
    train = dict(meta.get("config", {}).get("train", {}))
    elastic = bool(train.get("elastic_state", True))
    _check_space(engine, path, info, int(train.get("min_free_bytes", 0)), elastic)
    topology = {"world_size": info.world, "zero_stage": engine.zero_stage}
    meta = {**meta, **engine.run_state, "engine": {**topology, "precision": engine.precision}}
    tmp = partial_dir(path)
    if info.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    engine.save_state(tmp / ENGINE_DIR, client_state={"step": meta.get("step")})
    save_rng(tmp / ENGINE_DIR, info.rank)
    if elastic:
        save_consolidated(engine, tmp / ENGINE_DIR / CONSOLIDATED_DIR)
    state = engine.full_state_dict()
    barrier()
    if info.is_main:
        assert state is not None
        if lora_scaling is not None:
            state = merge_lora_state(state, lora_scaling)
        model_cfg = engine.module.cfg
        write_model_files(tmp, model_cfg, state, tokenizer)
        pause = float(os.environ.get(SAVE_PAUSE_ENV, "0") or 0)
        if pause > 0:
            time.sleep(pause)
        commit(tmp, path, {"model": dataclasses.asdict(model_cfg), **meta}, update_latest=True)
        keep_last, keep_every = int(train.get("keep_last", 0)), int(train.get("keep_every", 0))
        deleted = apply_retention(path.parent, keep_last, keep_every, path.name)
        if deleted:
            print(
                f"deleted {', '.join(deleted)} (train.keep_last={keep_last}, "
                f"keep_every={keep_every})",
                flush=True,
            )
    barrier()
    return path


def _any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if `flag` is true on any."""
    value = torch.tensor([1.0 if flag else 0.0])
    if info.world > 1 and dist.is_initialized():
        if dist.get_backend() == "nccl":
            value = value.cuda()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def _space_needed(engine: Any, parent: Path, elastic: bool) -> int:
    """Bytes the next checkpoint in `parent` will take: the last one's size, or an estimate
    from the parameter count (weights twice, fp32 master and moments, the whole state again)."""
    name = latest_name(parent)
    previous = checkpoint_bytes(parent / name) if name and (parent / name).is_dir() else 0
    if previous:
        return int(previous * 1.1)
    numel = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    low = 4 if engine.precision == "fp32" else 2
    return int(numel * (2 * low + 12 + (12 if elastic else 0)) * 1.1)


def _check_space(engine: Any, path: Path, info: DistInfo, margin: int, elastic: bool) -> None:
    problem = space_problem(path.parent, _space_needed(engine, path.parent, elastic), margin)
    if _any_rank(problem is not None, info):
        raise CheckpointError(problem or f"{path.parent}: another rank has too little disk space")


def restore_checkpoint(engine: Any, ckpt: Path, info: DistInfo, run_dir: Path) -> str:
    """Load the training state of checkpoint `ckpt` into `engine` (collective) and this rank's
    RNG; returns how. The same process count and ZeRO stage read DeepSpeed's own state (only
    from inside run_dir); otherwise the whole fp32 state is re-sharded onto this engine.
    Files are checked against the manifest first."""
    meta = read_json(ckpt / META_FILE)
    saved_world = int(meta.get("world_size") or info.world)
    saved_stage = int(meta.get("engine", {}).get("zero_stage", engine.zero_stage))
    state_dir = ckpt / ENGINE_DIR
    whole = state_dir / CONSOLIDATED_DIR
    own = ckpt.resolve().is_relative_to(run_dir.resolve())
    same = saved_world == info.world and saved_stage == engine.zero_stage
    was = f"{saved_world} process(es), ZeRO-{saved_stage}"
    if same and (own or not whole.is_dir()) and (state_dir / "state").is_dir():
        verify_files(ckpt, meta, engine=True, select=lambda rel: _rank_file(rel, info.rank))
        engine.load_state(state_dir)
        how = f"DeepSpeed engine state ({was})"
    elif (whole / STATE_FILE).is_file():
        verify_files(ckpt, meta, engine=True, select=lambda rel: f"/{CONSOLIDATED_DIR}/" in rel)
        load_consolidated(engine, whole)
        now = f"{info.world} process(es), ZeRO-{engine.zero_stage}"
        how = f"whole fp32 weights and optimizer state, re-sharded from {was} to {now}"
    elif state_dir.is_dir():
        raise CheckpointError(
            f"{ckpt}: written by {was} without the whole optimizer state (train.elastic_state); "
            f"resume it with {saved_world} process(es) and engine.zero_stage={saved_stage}"
        )
    else:
        how = "weights only: the checkpoint has no optimizer state"
    if state_dir.is_dir():
        load_rng(state_dir, info.rank)
    engine.run_state["faults"] = meta.get("faults")
    return how


def _rank_file(rel: str, rank: int) -> bool:
    """Whether engine-state file `rel` is one that `rank` reads (its own shard, or shared)."""
    name = rel.rsplit("/", 1)[-1]
    if f"/{CONSOLIDATED_DIR}/" in rel:
        return False
    for prefix in ("zero_pp_rank_", "rng-rank"):
        if name.startswith(prefix):
            digits = name[len(prefix) :].split("_", 1)[0].split(".", 1)[0]
            return digits == str(rank)
    return True
