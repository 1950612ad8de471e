"""The position search that rescues tiles a gradient cannot bring back (a tile about a scan step
off settles in a neighbour's place): which tiles are searched, the candidate grid, the task on
a known object, and the driver's decision to move."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from adorym_dask.graphs.tasks import TileGroup, position_search
from adorym_dask.models.ptychography import FarFieldPtychography
from adorym_dask.optimizers import ParameterState
from adorym_dask.refinement import (
    PositionBounds,
    apply_search,
    search_offsets,
    tiles_to_search,
)
from adorym_dask.simulate import simulate_ptychography
from adorym_dask.storage.measurements import open_measurements
from adorym_dask.storage.object_store import create_store, init_block


def test_tiles_to_search_picks_outliers_per_angle():
    loss = np.ones((2, 100))
    loss[0, [3, 50]] = [5.0, 1.4]
    loss[1, 7] = 2.0
    loss[1, 8] = np.nan
    flagged = tiles_to_search(loss, ratio=1.5)
    assert sorted(zip(*np.nonzero(flagged))) == [(0, 3), (1, 7)]
    many = np.ones((1, 100))
    many[0, :30] = np.linspace(2, 3, 30)
    assert tiles_to_search(many, ratio=1.5).sum() == 10  # at most 10 % per angle, the worst
    assert tiles_to_search(many, ratio=1.5)[0, 20:30].all()


def test_search_offsets_grid():
    off = search_offsets(6.0)
    assert off.shape == (48, 2) and not np.any(np.all(off == 0, axis=1))
    assert np.abs(off).max() == 6 and len(np.unique(off, axis=0)) == 48
    assert set(np.unique(off)) == {-6, -4, -2, 0, 2, 4, 6}
    assert search_offsets(2.0, 1.0).shape == (24, 2)


def _true_object_store(tmp_path):
    """A small simulation, its model, and a memory store holding its true object."""
    sim = simulate_ptychography(tmp_path / "s.h5", object_shape=(96, 96), probe_shape=(32, 32),
                                n_positions=20, seed=4)
    meas = open_measurements(sim.path)
    model = FarFieldPtychography(det_shape=(32, 32), representation="real_imag",
                                 wavelength_m=meas.wavelength_m, pixel_size_m=meas.pixel_size_m)
    zarr.open_group(store=str(tmp_path / "r.zarr"), mode="w-")
    store = create_store("memory", tmp_path / "r.zarr", shape=(96, 96, 1), chunks=(96, 96),
                         representation="real_imag", n_state=0)
    truth = sim.object[..., 0]
    state = np.stack([truth.real, truth.imag], -1)[:, :, None, :, None].astype(np.float32)
    source = store.save((0, 0), init_block(store, (0, 0)), state)
    return sim, meas, model, store, source


def test_search_finds_a_tile_one_step_off(tmp_path):
    """A tile recorded 4 px from where it was measured, over the true object: the best
    candidate is its true position, and the driver moves it there."""
    sim, meas, model, store, source = _true_object_store(tmp_path)
    tiles = np.array([2, 5, 9])
    true = sim.positions_px[tiles]
    wrong = true + np.array([[0.0, 0.0], [3.6, -1.2], [0.0, 0.0]])
    group = TileGroup(0, 0, tiles, (0, 0, 96, 96))
    found = position_search(
        group, store, {(0, 0): source}, meas.source, {"probe": sim.probe},
        {"positions": wrong}, model, which=np.array([False, True, False]),
        offsets=search_offsets(6), start=wrong, max_shift_px=10.0,
    )
    t, current, best, where = found
    assert list(t) == [5] and best[0] < 0.2 * current[0]  # on the 2-px grid, not exactly there
    np.testing.assert_allclose(where[0], true[1], atol=1.0)
    # the driver: tile 1 of this three-tile state moves, then the mean correction is removed
    ps = ParameterState(wrong[None], {}, np.zeros((1, 3), np.int64))
    bounds = PositionBounds(wrong[None], 10.0, np.zeros(2), np.full(2, 64.0))
    moved_state, moved = apply_search(ps, [(np.array([1]), current, best, where)], [0],
                                      bounds=bounds)
    assert moved == 1
    np.testing.assert_allclose(moved_state.value[0, 1], wrong[1] + 2 / 3 * (where[0] - wrong[1]))
    unchanged, moved = apply_search(ps, [(np.array([1]), current, current * 0.95, where)], [0],
                                    bounds=bounds)
    assert moved == 0 and np.array_equal(unchanged.value, ps.value)


def test_search_stays_within_max_shift(tmp_path):
    """Candidates whose correction from the start would exceed max_shift_px are not tried."""
    sim, meas, model, store, source = _true_object_store(tmp_path)
    tiles = np.array([5])
    true = sim.positions_px[tiles]
    here = true + np.array([[4.0, 0.0]])
    start = here - np.array([[0.0, 0.0]])
    group = TileGroup(0, 0, tiles, (0, 0, 96, 96))
    _, _, _, where = position_search(
        group, store, {(0, 0): source}, meas.source, {"probe": sim.probe}, {"positions": here},
        model, which=np.array([True]), offsets=search_offsets(6), start=start,
        max_shift_px=2.0,
    )
    assert np.all(np.abs(where[0] - start[0]) <= 2.0)
