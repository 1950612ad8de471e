"""Regression tests for engine defects found in review (each failed before its fix).

- Adam's bias correction used the global minibatch count for every block, so a block first
  touched late took a first step larger than the step size;
- the per-process cache of zarr arrays outlived ``overwrite: true`` (a second run at the same
  path with another object shape crashed);
- Dask keys carried no run identifier, so two runs on one scheduler could get each other's
  results;
- a NaN loss was committed and found only at the end of the epoch, and a diverging run ended
  with exit code 0;
- resuming silently ignored a changed probe step, crashed deep inside on a changed optimizer,
  and skipped or repeated tiles on a changed minibatch size mid-epoch;
- a commit could name chunks that were not yet on stable storage.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from dask.delayed import delayed

from adorym_dask.cli import main
from adorym_dask.config import config_from_dict
from adorym_dask.engine import DivergenceError, Reconstruction, run
from adorym_dask.graphs.minibatch import build_minibatch, epoch_minibatches
from adorym_dask.models.ptychography import FarFieldPtychography
from adorym_dask.refinement import group_rows, shared_values
from adorym_dask.simulate import simulate_ptychography
from adorym_dask.storage.checkpoint import CheckpointError, load_checkpoint
from adorym_dask.storage.measurements import write_measurements


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("defects")
    return simulate_ptychography(tmp / "s.h5", object_shape=(80, 80), probe_shape=(32, 32),
                                 n_positions=30, seed=0)


def _tree(sim, out: Path, **over) -> dict:
    tree = {
        "data": {"path": str(sim.path)},
        "probe": {"init": "file", "path": str(sim.probe_path)},
        "object": {"shape_px": [80, 80], "chunks": [40, 40]},
        "epochs": 2,
        "minibatch_size": 8,
        "tile_group_size": 4,
        "output": str(out),
        "cluster": {"scheduler": "sync"},
        "progress": False,
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            tree[key] = {**tree[key], **value}
        else:
            tree[key] = value
    return tree


def test_adam_first_step_of_a_late_block_is_at_most_the_step_size(tmp_path):
    """199 tiles over the top-left of the object and one tile alone in a far block: that
    block's first (and only) update comes after about 150 other minibatches, and Adam's first
    step moves each value by at most the step size. With the global step count the bias
    correction gave this block a step of 1.2-1.4 times the step size."""
    rng = np.random.default_rng(1)
    det, lone = 16, 199
    pos = np.concatenate([rng.uniform(0, 40, (lone, 2)), [[100.0, 100.0]]])
    data = rng.poisson(50.0, (1, lone + 1, det, det)).astype(np.float32)
    path = write_measurements(tmp_path / "d.h5", intensities=data, positions_px=pos,
                              energy_ev=1e4, pixel_size_m=1e-8)
    tree = {
        "data": {"path": str(path)},
        "probe": {"init": "from_data"},
        "refine": {"probe": None},
        "object": {"shape_px": [128, 128], "chunks": [32, 32]},
        "optimizer": {"step_size": 0.05},
        "epochs": 1, "minibatch_size": 1, "tile_group_size": 1, "seed": 0,
        "output": str(tmp_path / "r.zarr"), "cluster": {"scheduler": "sync"}, "progress": False,
    }
    rec = Reconstruction(config_from_dict(tree))
    order = epoch_minibatches(rec.groups, 1, np.random.default_rng([0, 0]))
    first = next(i for i, b in enumerate(order) if lone in b[0].tiles)
    assert first >= 100, f"the lone tile's minibatch is number {first}; pick another seed"
    result = rec.run()
    block = result.object()[96:128, 96:128]
    moved = np.abs(block - np.array([1.0, 0.0])).max()
    assert 0 < moved <= 0.05 * (1 + 1e-5), moved
    assert rec.block_steps[3, 3] == 1 and rec.block_steps[0, 0] > 100


def test_overwrite_at_the_same_path_with_another_shape(sim, tmp_path):
    """A second run at the same path in the same process, with another object shape."""
    out = tmp_path / "r.zarr"
    run(config_from_dict(_tree(sim, out, epochs=1)))
    second = run(config_from_dict(_tree(
        sim, out, epochs=1, overwrite=True, object={"shape_px": [96, 88], "chunks": [48, 44]},
    )))
    obj = second.object()
    assert obj.shape == (96, 88, 1, 2)
    assert np.isfinite(obj).all() and second.loss[0] > 0


def test_every_key_carries_the_run_token(sim, tmp_path):
    """Two runs building the same minibatch of the same epoch get disjoint Dask keys."""
    keys = []
    for name in ("a", "b"):
        rec = Reconstruction(config_from_dict(_tree(sim, tmp_path / f"{name}.zarr")))
        rec._initialize_blocks("sync")
        groups = epoch_minibatches(rec.groups, 8, np.random.default_rng([0, 0]))[0]
        graph = build_minibatch(
            groups, obj=rec.store, sources=rec.sources, source=rec.meas.source,
            shared=delayed(shared_values(rec.params, rec.specs), traverse=False),
            own={g.index: group_rows(rec.params, rec.specs, g) for g in groups},
            model=delayed(rec.model, traverse=False), spec=rec.spec,
            block_steps=rec.block_steps, scopes={"probe": "global"}, rules=None,
            tag=f"{rec.token}-e0-b0-r0",
        )
        keys.append({k for k in graph.sums.dask if isinstance(k, str) and "-e0-b0-" in k}
                    | {u.key for u in graph.updates.values()})
        assert all(rec.token in k for k in keys[-1])
    assert keys[0] and keys[1] and not keys[0] & keys[1]


def test_two_runs_on_one_scheduler_do_not_mix(sim, tmp_path):
    """Two different runs at once on one client each equal their own in-process run."""
    from distributed import Client, LocalCluster

    trees = [_tree(sim, tmp_path / "a.zarr", seed=1),
             _tree(sim, tmp_path / "b.zarr", seed=1, optimizer={"step_size": 0.01})]
    solo = [run(config_from_dict({**t, "output": str(tmp_path / f"solo{i}.zarr")}))
            for i, t in enumerate(trees)]
    results: dict = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        def go(i):
            results[i] = run(config_from_dict(trees[i]), client)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    for i in range(2):
        a, b = solo[i].object(), results[i].object()
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max(), i


def test_nan_loss_is_not_committed(sim, tmp_path, monkeypatch):
    """The loss of epoch 1, minibatch 2 becomes NaN: the run stops naming both, and the last
    commit is the one before it, from which --resume continues."""
    calls = {"n": 0}
    real_loss = FarFieldPtychography.tile_losses  # the fused forward and loss the tasks call
    rec = Reconstruction(config_from_dict(_tree(sim, tmp_path / "r.zarr", epochs=3)))
    per_epoch = len(epoch_minibatches(rec.groups, 8, np.random.default_rng([0, 0])))
    groups_per_batch = 2  # 8 tiles in groups of 4
    poison = (per_epoch + 2) * groups_per_batch  # first group of epoch 1, minibatch 2

    def loss(self, *args):
        calls["n"] += 1
        out = real_loss(self, *args)
        return out * float("nan") if calls["n"] == poison + 1 else out

    monkeypatch.setattr(FarFieldPtychography, "tile_losses", loss)
    with pytest.raises(DivergenceError, match=r"epoch 1, minibatch 2.*step_size"):
        rec.run()
    ck = load_checkpoint(tmp_path / "r.zarr")
    assert (ck.epoch, ck.batch) == (1, 2)
    assert all(np.isfinite(ps.value).all() for ps in ck.params.values())
    monkeypatch.setattr(FarFieldPtychography, "tile_losses", real_loss)
    resumed = run(config_from_dict(_tree(sim, tmp_path / "r.zarr", epochs=3)), resume=True)
    assert len(resumed.loss) == 3 and np.isfinite(resumed.loss).all()


def test_divergence_stops_with_exit_code_2(sim, tmp_path, capsys):
    """A step of 1e6 used to end with a loss of 1e14 and exit code 0."""
    import yaml

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(_tree(sim, tmp_path / "r.zarr", epochs=4,
                                        optimizer={"step_size": 1.0e6})))
    assert main(["reconstruct", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "diverges" in err or "became" in err
    assert "optimizer.step_size" in err and "Traceback" not in err


def test_resume_honours_a_changed_probe_step(sim, tmp_path):
    out = tmp_path / "r.zarr"
    run(config_from_dict(_tree(sim, out, epochs=1)))
    cfg = config_from_dict(_tree(sim, out, epochs=2, refine={"probe": {"step_size": 0.002}}))
    with pytest.raises(CheckpointError, match=r"refine"):
        Reconstruction(cfg, resume=True)
    rec = Reconstruction(cfg, resume=True, allow_config_change=True)
    max_probe = np.abs(rec.initial["probe"]).max()
    assert rec.refinements["probe"].optimizer.step_size == pytest.approx(0.002 * max_probe)


def test_resume_refuses_a_changed_object_optimizer(sim, tmp_path):
    out = tmp_path / "r.zarr"
    run(config_from_dict(_tree(sim, out, epochs=1, optimizer={"name": "gd"})))
    cfg = config_from_dict(_tree(sim, out, epochs=2, optimizer={"name": "adam"}))
    with pytest.raises(CheckpointError, match=r"optimizer\.name: gd -> adam.*resume with"):
        Reconstruction(cfg, resume=True, allow_config_change=True)


def test_resume_with_a_changed_parameter_optimizer_restarts_its_state(sim, tmp_path):
    out = tmp_path / "r.zarr"
    run(config_from_dict(_tree(sim, out, epochs=2, refine={"probe": {"start_epoch": 0}})))
    cfg = config_from_dict(_tree(sim, out, epochs=3,
                                 refine={"probe": {"start_epoch": 0, "optimizer": "momentum"}}))
    result = run(cfg, resume=True, allow_config_change=True)
    assert len(result.loss) == 3 and np.isfinite(result.loss).all()


def test_resume_refuses_a_changed_minibatch_mid_epoch(sim, tmp_path, monkeypatch):
    out = tmp_path / "r.zarr"
    rec = Reconstruction(config_from_dict(_tree(sim, out, epochs=2)))
    real = rec.run_minibatch

    def stop_after_two(groups, epoch, b, scheduler):
        if (epoch, b) == (1, 1):
            raise KeyboardInterrupt
        real(groups, epoch, b, scheduler)

    rec.run_minibatch = stop_after_two
    with pytest.raises(KeyboardInterrupt):
        rec.run()
    for key, value in (("minibatch_size", 4), ("tile_group_size", 2), ("seed", 7)):
        cfg = config_from_dict(_tree(sim, out, epochs=2, **{key: value}))
        with pytest.raises(CheckpointError, match=rf"{key}.*middle of epoch 1"):
            Reconstruction(cfg, resume=True, allow_config_change=True)


def test_commit_names_only_synced_chunks(sim, tmp_path, monkeypatch):
    """Every chunk a minibatch writes is fsynced before the checkpoint that names it."""
    events = []
    real_fsync = os.fsync

    def fsync(fd):
        events.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "r.zarr"
    rec = Reconstruction(config_from_dict(_tree(sim, out, epochs=1)))
    rec.run()
    checkpoints = [i for i, p in enumerate(events) if "_checkpoint" in p]
    chunks = [i for i, p in enumerate(events) if "/state/blocks/c/" in p]
    assert checkpoints and chunks
    # between two checkpoints, each written chunk was synced before the second one
    for block, n in np.ndenumerate(rec.block_steps):
        slot = int(load_checkpoint(out).slots[block])
        name = f"/state/blocks/c/{slot}/{block[0]}/{block[1]}/0/0/0"
        synced = [i for i, p in enumerate(events) if p.endswith(name)]
        assert synced and synced[-1] < checkpoints[-1], (block, name)


def test_results_layout_of_refined_parameters(sim, tmp_path):
    """positions_px in the input file's frame, _initial beside every refined parameter, and the
    probe's mode powers."""
    tree = _tree(sim, tmp_path / "r.zarr", epochs=2, model={"probe_modes": 2},
                 object={"shape_px": None, "chunks": [40, 40]},
                 refine={"positions": {"start_epoch": 1}})
    result = run(config_from_dict(tree))
    ds = xr.open_zarr(tmp_path / "r.zarr")
    assert ds["positions_px"].dims == ("angle", "tile", "yx")
    np.testing.assert_allclose(ds["positions_px_initial"].values[0], sim.positions_px)
    moved = np.abs(ds["positions_px"].values - ds["positions_px_initial"].values)
    assert 0 < moved.max() <= 10.0
    assert ds["probe_initial"].dims == ("mode", "py", "px", "channel")
    power = ds["probe_mode_power"].values
    assert power.shape == (2,) and power.sum() == pytest.approx(1.0) and power[0] > power[1]
    np.testing.assert_allclose(result.positions_px, ds["positions_px"].values)


def test_resume_with_refined_positions_and_search_is_exact(tmp_path, monkeypatch, caplog):
    """Positions refined from epoch 0 with a position search every epoch; a run killed in the
    middle of epoch 2 and resumed ends where an uninterrupted one does (positions, object,
    probe, loss)."""
    sim = simulate_ptychography(tmp_path / "s.h5", object_shape=(80, 80), probe_shape=(32, 32),
                                n_positions=30, position_error_px=1.5, seed=2)
    tree = _tree(sim, tmp_path / "full.zarr", epochs=4, object={"shape_px": None},
                 refine={"positions": {"start_epoch": 0, "search_every_epochs": 1,
                                       "search_loss_ratio": 1.0}})
    caplog.set_level(logging.INFO, logger="adorym_dask.engine")
    full = run(config_from_dict(tree))
    assert "position search on 3 tiles" in caplog.text
    calls = {"n": 0}
    real = Reconstruction.run_minibatch

    def dying(self, *args, **kwargs):
        if calls["n"] == 9:  # 4 minibatches per epoch: dies after epoch 2, minibatch 0
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(self, *args, **kwargs)

    cut = {**tree, "output": str(tmp_path / "cut.zarr")}
    with monkeypatch.context() as m:
        m.setattr(Reconstruction, "run_minibatch", dying)
        with pytest.raises(KeyboardInterrupt):
            run(config_from_dict(cut))
    ck = load_checkpoint(tmp_path / "cut.zarr")
    assert (ck.epoch, ck.batch) == (2, 1) and np.isfinite(ck.tile_loss).all()
    resumed = run(config_from_dict(cut), resume=True)
    np.testing.assert_allclose(resumed.positions_px, full.positions_px, rtol=0, atol=1e-9)
    a, b = full.object(), resumed.object()
    assert np.abs(a - b).max() <= 1e-6 * np.abs(a).max()
    np.testing.assert_allclose(resumed.loss, full.loss, rtol=1e-6)
    assert np.abs(full.positions_px - full.open()["positions_px_initial"].values).max() > 0.1


def test_curvature_is_estimated_only_for_the_parameters_that_use_it(sim, tmp_path, monkeypatch):
    """The probe refined with Adam ignores curvature: its tasks must not estimate any (it was
    17 % of the in-process loop's time). The default probe step (Gauss-Newton momentum) needs
    the probe's only, refined positions need theirs, in every task where they are refined."""
    calls = []
    original = FarFieldPtychography.curvature

    def counting(self, *args, names=frozenset(), **kwargs):
        calls.append(frozenset(names))
        return original(self, *args, names=names, **kwargs)

    monkeypatch.setattr(FarFieldPtychography, "curvature", counting)
    run(config_from_dict(_tree(sim, tmp_path / "a.zarr", epochs=3,
                               refine={"probe": {"optimizer": "adam"}})))
    assert calls == []
    run(config_from_dict(_tree(sim, tmp_path / "b.zarr", epochs=3,
                               refine={"positions": {"start_epoch": 2}})))
    n_groups = len(Reconstruction(config_from_dict(_tree(sim, tmp_path / "c.zarr"))).groups)
    # 3 epochs of the probe's, then epoch 2 (only) adds the positions', once per group
    assert calls.count(frozenset({"probe"})) == 2 * n_groups
    assert calls.count(frozenset({"probe", "positions"})) == n_groups
    assert len(calls) == 3 * n_groups


def test_a_resumed_run_keeps_its_object_optimizer(sim, tmp_path):
    """The optimizer's state is in every block, so an unnamed optimizer in a resumed run is the
    run's own: a default (pie) run resumed with a new step and no name stays pie (the rule that
    keeps Adam for a new run's bare step_size must not switch it: that read the pie blocks as
    Adam's and failed with an IndexError); a checkpoint written before runs recorded the name
    (None) was Adam's, and resumes as Adam."""
    from adorym_dask.storage.checkpoint import save_checkpoint

    out = tmp_path / "r.zarr"
    run(config_from_dict(_tree(sim, out, epochs=1)))
    assert load_checkpoint(out).config["optimizer"]["name"] == "pie"  # recorded
    resumed = Reconstruction(config_from_dict(_tree(sim, out, epochs=2,
                                                    optimizer={"step_size": 0.5})),
                             resume=True, allow_config_change=True)
    assert (resumed.spec.name, resumed.spec.step_size) == ("pie", 0.5)

    old = tmp_path / "old.zarr"
    run(config_from_dict(_tree(sim, old, epochs=1, optimizer={"name": "adam"})))
    ck = load_checkpoint(old)
    ck.config["optimizer"]["name"] = None  # as a checkpoint of an earlier version
    save_checkpoint(old, ck)
    result = run(config_from_dict(_tree(sim, old, epochs=2)), resume=True)
    assert len(result.loss) == 2
    assert load_checkpoint(old).config["optimizer"]["name"] == "adam"
