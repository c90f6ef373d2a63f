"""Checkpoints: DeepSpeed state plus every rank's own state, published atomically.

Layout under ``<run>/checkpoints/``::

    step_00000120/              DeepSpeed tag folder (model, optimizer, ZeRO shards, scheduler)
        codir_rank_00000.pt     per-rank: bank shard, sampler position, RNG states, counters
        codir_rank_00001.pt
        COMPLETE                written by rank 0 once every rank has finished its files
    latest                      tag of the newest COMPLETE checkpoint (replaced atomically)

DeepSpeed writes its client state from rank 0 only, so per-rank state (bank shards,
sampler positions, RNG) goes to per-rank files. Resuming on another number of ranks
converts the DeepSpeed state once to ``step_XXXXXXXX_universal/`` (DeepSpeed's
universal checkpoint) and re-shards the bank and sampler from all rank files. A checkpoint is visible to resume
only after ``COMPLETE`` and ``latest`` are written, so a crash mid-save leaves the
previous checkpoint as the one that loads.

Modules: :mod:`.store` (names, atomic writes, save/publish/prune, load), :mod:`.universal` (resuming on
another number of ranks), :mod:`.integrity` (checks before a resume), :mod:`.resume` (a run's save and
resume of the engine plus per-rank state). Their public names are re-exported here.
"""
from codir_ds.engine.checkpointing.store import (COMPLETE, LATEST, UNIVERSAL_SUFFIX, complete_tags,
                                                 damaged_checkpoint_fix, latest_tag, load_checkpoint,
                                                 load_rank_states, prune, rank_file, rng_state, save_checkpoint,
                                                 set_rng_state, tag_for)
from codir_ds.engine.checkpointing.universal import convert_to_universal, is_zero_checkpoint, saved_world_size
from codir_ds.engine.checkpointing.integrity import ZIP_MAGIC, check_resume_checkpoint
from codir_ds.engine.checkpointing.resume import (RunState, engine_config, resume_latest, resume_plan,
                                                  save_run_checkpoint)

__all__ = [
    # store
    "COMPLETE", "LATEST", "UNIVERSAL_SUFFIX", "complete_tags", "damaged_checkpoint_fix", "latest_tag",
    "load_checkpoint", "load_rank_states", "prune", "rank_file", "rng_state", "save_checkpoint", "set_rng_state",
    "tag_for",
    # universal
    "convert_to_universal", "is_zero_checkpoint", "saved_world_size",
    # integrity
    "ZIP_MAGIC", "check_resume_checkpoint",
    # resume
    "RunState", "engine_config", "resume_latest", "resume_plan", "save_run_checkpoint",
]
