"""data.group_by_length: micro-batches cut from length-sorted windows (less padding), still exact samplers."""
from __future__ import annotations

import pytest
import torch

from codir_ds.data.sampler import GlobalOrderSampler, OwnedShardSampler, build_sampler, group_by_length


def _lengths(n: int, seed: int = 0) -> torch.Tensor:
    """Skewed token counts like real sentences: many short, a long tail."""
    g = torch.Generator().manual_seed(seed)
    return (8 + (-20.0 * torch.log(torch.rand(n, generator=g)))).long().clamp(max=128)


def _padded_tokens(batches, lengths) -> int:
    return sum(int(lengths[b].max()) * b.numel() for b in batches)


def test_group_by_length_is_a_permutation_of_sorted_units():
    lengths = _lengths(1000)
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(1))
    out = group_by_length(order, lengths, unit=8, window=10, generator=torch.Generator().manual_seed(2))
    assert sorted(out.tolist()) == list(range(1000))
    for w in range(0, 1000, 80):  # every window holds the same ids as before, cut into sorted units
        window_in, window_out = order[w:w + 80], out[w:w + 80]
        assert set(window_in.tolist()) == set(window_out.tolist())
        ranked = torch.sort(lengths[window_in], descending=True).values
        units = [lengths[u] for u in torch.split(window_out, 8)]
        # each unit is a contiguous run of the window's sorted lengths
        assert sorted(torch.cat([torch.sort(u, descending=True).values for u in
                                 sorted(units, key=lambda u: -int(u.max()))]).tolist(), reverse=True) == ranked.tolist()
        for u in units:
            lo, hi = int(u.min()), int(u.max())
            inside = ((ranked >= lo) & (ranked <= hi)).sum()
            assert inside <= len(u) + (ranked == lo).sum() + (ranked == hi).sum()


def test_owned_sampler_grouped_pads_less_and_sees_every_owned_id_once():
    n, micro, world = 4000, 16, 2
    lengths = _lengths(n)
    for rank in range(world):
        plain = OwnedShardSampler(n, micro, rank, world, seed=5)
        grouped = OwnedShardSampler(n, micro, rank, world, seed=5, lengths=lengths, group_window=50)
        assert len(grouped) == len(plain)
        batches = list(grouped)
        ids = torch.cat(batches)
        assert ids.unique().numel() == ids.numel() and bool((ids % world == rank).all())
        real = int(lengths[ids].sum())
        assert real / _padded_tokens(batches, lengths) > 0.9          # grouped: little padding
        assert real / _padded_tokens(list(plain), lengths) < 0.6      # shuffled: much more
        # deterministic per (seed, epoch, rank), different across epochs
        again = OwnedShardSampler(n, micro, rank, world, seed=5, lengths=lengths, group_window=50)
        assert torch.equal(torch.cat(list(again)), ids)
        grouped.set_epoch(1)
        assert not torch.equal(torch.cat(list(grouped)), ids)


def test_grouped_resume_is_exact_and_reshards_without_repeats():
    n, micro = 2000, 8
    lengths = _lengths(n, seed=3)
    full = [OwnedShardSampler(n, micro, r, 2, seed=9, lengths=lengths) for r in range(2)]
    expected = [list(s) for s in full]
    part = [OwnedShardSampler(n, micro, r, 2, seed=9, lengths=lengths) for r in range(2)]
    seen = []
    for s in part:
        it = iter(s)
        seen.append([next(it) for _ in range(7)])
    states = [s.state_dict() for s in part]
    assert all(st["grouped"] for st in states)
    same = [OwnedShardSampler(n, micro, r, 2, seed=9, lengths=lengths) for r in range(2)]
    for r, s in enumerate(same):
        s.resume(states)
        assert [b.tolist() for b in seen[r] + list(s)] == [b.tolist() for b in expected[r]]
    # on 3 ranks: the rest of the epoch, every id at most once, none of the consumed ones
    other = [OwnedShardSampler(n, micro, r, 3, seed=9, lengths=lengths) for r in range(3)]
    rest = []
    for s in other:
        s.resume(states)
        rest.extend(list(s))
    rest = torch.cat(rest)
    consumed = torch.cat([torch.cat(b) for b in seen])
    assert rest.unique().numel() == rest.numel() and not bool(torch.isin(rest, consumed).any())


def test_resume_with_another_grouping_setting_is_refused():
    lengths = _lengths(400)
    grouped = OwnedShardSampler(400, 8, 0, 1, seed=1, lengths=lengths)
    next(iter(grouped))
    plain = OwnedShardSampler(400, 8, 0, 1, seed=1)
    with pytest.raises(ValueError, match="group_by_length on"):
        plain.resume([grouped.state_dict()])
    g_plain = GlobalOrderSampler(400, 8, 0, 1, seed=1)
    g_grouped = GlobalOrderSampler(400, 8, 0, 1, seed=1, lengths=lengths)
    with pytest.raises(ValueError, match="group_by_length off"):
        g_grouped.resume([g_plain.state_dict()])


def test_deterministic_grouped_steps_do_not_depend_on_the_ranks():
    """training.deterministic + grouping: whole global batches are grouped, so each step's ids are world-invariant."""
    n, global_batch = 3000, 32
    lengths = _lengths(n, seed=4)

    def steps(world: int, accum: int) -> list[set]:
        micro = global_batch // (world * accum)
        samplers = [build_sampler(n, micro, r, world, 7, accum, True, lengths, 20) for r in range(world)]
        per_rank = [list(s) for s in samplers]
        out = []
        for k in range(len(per_rank[0]) // accum):
            out.append({i for r in range(world) for b in per_rank[r][k * accum:(k + 1) * accum] for i in b.tolist()})
        return out

    one = steps(1, 1)
    assert steps(2, 1) == one and steps(4, 2) == one
    # and the grouping reduced each step's length spread
    spread = [int(lengths[list(s)].max() - lengths[list(s)].min()) for s in one]
    plain = GlobalOrderSampler(n, global_batch, 0, 1, 7)
    plain_spread = [int(lengths[b].max() - lengths[b].min()) for b in plain]
    assert sum(spread) < 0.5 * sum(plain_spread)


def test_bad_lengths_are_refused():
    with pytest.raises(ValueError, match="lengths for"):
        OwnedShardSampler(100, 4, 0, 1, seed=1, lengths=torch.ones(99))
    with pytest.raises(ValueError, match="window"):
        OwnedShardSampler(100, 4, 0, 1, seed=1, lengths=torch.ones(100), group_window=0)


def test_resume_config_check_fills_keys_added_later_and_allows_speed_switches(tmp_path):
    """A run directory written before a key existed resumes (the key takes its default); speed-only switches
    may change on resume; data.group_by_length may not (the epoch order depends on it)."""
    import yaml
    from codir_ds.config import ExperimentConfig
    from codir_ds.engine.rundir import check_run_dir
    from codir_ds.errors import CodirError
    cfg = ExperimentConfig()
    old = cfg.to_dict()
    for section, key in (("training", "optimizer_impl"), ("training", "compile"), ("data", "group_by_length"),
                         ("data", "group_window")):
        del old[section][key]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    # the config check passes; the next check (there is no checkpoint in this bare directory) speaks
    with pytest.raises(CodirError, match="no complete checkpoint"):
        check_run_dir(tmp_path, cfg.to_dict(), resume=True, overwrite=False)
    fast = ExperimentConfig()
    fast.training.compile, fast.training.optimizer_impl = True, "foreach"
    with pytest.raises(CodirError, match="no complete checkpoint"):
        check_run_dir(tmp_path, fast.to_dict(), resume=True, overwrite=False)
    grouped = ExperimentConfig()
    grouped.data.group_by_length = True
    with pytest.raises(CodirError, match="data.group_by_length"):
        check_run_dir(tmp_path, grouped.to_dict(), resume=True, overwrite=False)


def test_grouped_finetune_pads_less_and_resumes_exactly(tmp_path, tiny_config, single_process_env):
    """data.group_by_length through run_finetune: grouped batches, fewer padded tokens, stop + resume = uninterrupted."""
    from safetensors.torch import load_file
    from codir_ds.config import load_config
    from codir_ds.recipes import run_finetune
    from conftest import REPO
    ds = str(REPO / "ds_configs" / "zero2.json")
    sets = ["data.group_by_length=true", "data.group_window=4", "data.max_train_examples=128"]
    from codir_ds.recipes import FinetuneRecipe
    recipe = FinetuneRecipe(load_config(str(tiny_config), sets), ds, str(tmp_path / "full"))
    full = recipe.run()
    sampler = recipe.sampler
    assert sampler.lengths is not None and sampler.lengths.numel() == 128
    # the grouped epoch pads to fewer tokens than the same sampler without grouping
    from codir_ds.data.sampler import OwnedShardSampler
    plain = OwnedShardSampler(128, sampler.batch_size, 0, 1, sampler.seed)
    sampler.set_epoch(0)
    assert _padded_tokens(list(sampler), sampler.lengths) < _padded_tokens(list(plain), sampler.lengths)
    stopped = run_finetune(load_config(str(tiny_config), sets + ["training.stop_at_step=3"]), ds,
                           str(tmp_path / "split"))
    assert stopped == {"stopped_at_step": 3}
    resumed = run_finetune(load_config(str(tiny_config), sets), ds, str(tmp_path / "split"), resume=True)
    assert resumed["steps"] == full["steps"]
    a = load_file(str(tmp_path / "full" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "export" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["final"] == full["final"]
