"""A run's checkpoints: the DeepSpeed state plus every rank's sampler position, RNG and stateful components (the
memory bank's shard among them), saved together and resumed on the same or another number of ranks.

Each rank's file holds ``world_size``, ``rank``, ``sampler``, ``rng``, one top-level entry per sharded component
(``bank``: its rows, re-sharded on a resume with another number of ranks) and ``extras``: the other stateful
components' states (``ema``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from codir_ds.distill.memory_bank import derive_seed
from codir_ds.engine.checkpointing.store import (check_rank_files, latest_tag, load_checkpoint, load_rank_states,
                                                 rng_state, save_checkpoint, set_rng_state)
from codir_ds.engine.checkpointing.universal import (UNIVERSAL_SUFFIX, check_zero_stage, convert_to_universal,
                                                     is_zero_checkpoint, saved_world_size)
from codir_ds.engine.distributed import set_seed
from codir_ds.errors import CodirError


def resume_plan(ckpt_root: Path, world: int, zero_stage: int, ds_path: str) -> Optional[str]:
    """Before ``deepspeed.initialize`` on --resume: how the DeepSpeed state must be loaded.

    Returns ``"universal"`` when the newest checkpoint was written by another number of
    ranks with ZeRO-partitioned optimizer state (the engine must then be created with
    ``checkpoint.load_universal``), else None. Refuses first a checkpoint whose rank files hold anything but
    plain data (:func:`check_rank_files`), so such a file is reported before anything is started, and one written
    in another ZeRO layout than ``zero_stage`` loads (:func:`check_zero_stage`).
    """
    tag = latest_tag(ckpt_root)
    if tag is None:
        raise CodirError(f"--resume: no complete checkpoint under '{ckpt_root}': start a new run with --overwrite")
    check_rank_files(ckpt_root / tag)
    check_zero_stage(ckpt_root / tag, zero_stage, ds_path)
    saved = saved_world_size(ckpt_root / tag)
    if saved and saved != world and is_zero_checkpoint(ckpt_root / tag):
        return "universal"
    return None


def engine_config(ds: dict, universal: bool) -> dict:
    """The DeepSpeed config given to ``deepspeed.initialize`` (``load_universal`` when resuming re-sharded)."""
    if not universal:
        return ds
    return {**ds, "checkpoint": {**ds.get("checkpoint", {}), "load_universal": True}}


@dataclass
class RunState:
    """What a run checkpoint holds besides the main engine and the client state.

    ``components``: name -> stateful component (``state_dict`` / ``load_state_dict``); one whose ``sharded`` is
    true saves its rank's shard and, on resume, loads every rank's (``load_shards``), re-sharding to the new number
    of ranks. ``engines``: name -> further DeepSpeed engine saved in the same folder (CTCD's larger model).
    """
    sampler: object
    components: dict = field(default_factory=dict)
    engines: dict = field(default_factory=dict)

    def sharded(self) -> dict:
        return {n: c for n, c in self.components.items() if getattr(c, "sharded", False)}

    def extras(self) -> dict:
        return {n: c for n, c in self.components.items() if not getattr(c, "sharded", False)}


def resume_latest(engine, ckpt_root: Path, rank: int, world: int, seed: int, state: RunState) -> dict:
    """Load the newest complete checkpoint into the engine, RNG and ``state`` (sampler, components, further
    engines); returns the client state.

    Collective. On the number of ranks that wrote it, everything is restored exactly. On
    another number, rank 0 first converts the DeepSpeed state to a universal checkpoint
    (:func:`resume_plan` made the engine ready for it), the sharded components (the bank) are re-sharded from
    every rank's shard, the sampler continues the epoch with the examples not yet seen in it,
    and dropout RNGs are re-seeded from ``(seed, rank, step)``. The other components (e.g. CR-ILD's EMA student)
    are restored from the checkpoint's rank files. Further engines are loaded, and converted, like the main one.
    """
    tag = latest_tag(ckpt_root)
    if tag is None:
        raise CodirError(f"--resume: no complete checkpoint under '{ckpt_root}': start a new run with --overwrite")
    rank_states = load_rank_states(ckpt_root / tag, world)
    saved_world = len(rank_states)
    load_tag = tag
    if saved_world != world and is_zero_checkpoint(ckpt_root / tag):
        _convert_on_rank0(ckpt_root, tag, rank, saved_world, world, state.engines)
        load_tag = tag + UNIVERSAL_SUFFIX
    client = load_checkpoint(engine, ckpt_root, load_tag)
    for name, other in state.engines.items():
        if load_tag == tag:
            load_checkpoint(other, ckpt_root / tag, name)
        else:
            load_checkpoint(other, ckpt_root / load_tag, name + UNIVERSAL_SUFFIX)
    _restore_rank_state(ckpt_root / tag, rank_states, rank, world, state)
    if saved_world == world:
        set_rng_state(rank_states[rank]["rng"])
    else:
        set_seed(derive_seed(seed, rank, engine.global_steps))
    if rank == 0:
        note = f" (written by {saved_world} ranks, re-sharded to {world})" if saved_world != world else ""
        print(f"resumed from {ckpt_root / tag} at step {engine.global_steps}{note}", flush=True)
    return client.get("codir", {})


def _convert_on_rank0(ckpt_root: Path, tag: str, rank: int, saved_world: int, world: int, extra_engines: dict) -> None:
    """Rank 0 converts the checkpoint (and the extra engines') to DeepSpeed's universal format. Collective:
    a failure on rank 0 is raised on every rank."""
    failure = None
    if rank == 0:
        print(f"resuming a {saved_world}-rank checkpoint on {world} ranks: converting {tag} to DeepSpeed's "
              f"universal format", flush=True)
        try:
            convert_to_universal(ckpt_root, tag)
            for name in extra_engines:
                convert_to_universal(ckpt_root / tag, name, out_root=ckpt_root / (tag + UNIVERSAL_SUFFIX))
        except CodirError as e:
            failure = str(e)
    flag = [failure]
    dist.broadcast_object_list(flag, src=0)
    if flag[0]:
        raise CodirError(flag[0])


def _restore_rank_state(tag_dir: Path, rank_states: list, rank: int, world: int, state: RunState) -> None:
    """Sampler position, sharded components and extras from every rank's saved files (re-sharded when needed)."""
    saved_world = len(rank_states)
    try:
        state.sampler.resume([s["sampler"] for s in rank_states])
        for name, obj in state.sharded().items():
            if any(s.get(name) is None for s in rank_states):
                raise ValueError(f"no saved {name} shards")
            obj.load_shards([s[name] for s in rank_states])
        own = rank_states[rank if saved_world == world else 0].get("extras") or {}
        for name, obj in state.extras().items():
            if name not in own:
                raise ValueError(f"no saved state for {name}")
            obj.load_state_dict(own[name])
    except (ValueError, RuntimeError) as e:
        raise CodirError(f"checkpoint '{tag_dir}' does not fit this run ({e}): resume with the run's "
                         f"own config and data") from None


def save_run_checkpoint(engine, ckpt_root: Path, step: int, client: dict, rank: int, world: int, keep: int,
                        state: RunState) -> None:
    """Collective: the DeepSpeed state(s) with the ``client`` state, and this rank's sampler position, RNG and
    components' states (:class:`RunState`); further engines are written into the same folder before it is
    published."""
    rank_state = {"world_size": world, "rank": rank, "sampler": state.sampler.state_dict(), "rng": rng_state(),
                  **{name: obj.state_dict() for name, obj in state.sharded().items()},
                  "extras": {name: obj.state_dict() for name, obj in state.extras().items()}}
    save_checkpoint(engine, ckpt_root, step, {"codir": dict(client)}, rank_state, rank, keep,
                    extra_engines=state.engines)
