"""Tomography out of core: a volume 4x each worker's memory limit, one epoch, no spilling.

The tomography counterpart of ``test_out_of_core.py`` (2 worker processes of one thread, Dask's
default spill/pause/restart thresholds), with 768 MiB workers (see ``LIMIT``).

Sizes. The volume is 6144 x 256 x 256 voxels (y, x, z) x 2 float32 channels (delta, beta) =
3 GiB = 4x each worker's limit, stored in y-slabs of 8 rows of the whole width and depth
(``object.chunks: [8, 256]``: 768 slabs of 4 MiB). The data are 3 projections (0, 60 and 120
degrees) of 6144 x 256 pixels, cut into bands of 8 rows (``model.tile_px: 8``): 2304
tiles; a task holds one band (``tile_group_size: 1``), reads its 4 MiB slab and rotates and
integrates it inside the task. Minibatches of 16 bands mix the angles (144 minibatches; a slab
is updated once per minibatch holding one of its bands, so up to 3 times); with ``gd`` (ART)
the store keeps no optimizer arrays. On disk: 2 slots x 3 GiB plus the published 3 GiB
volume, under ``tmp_path``.

The object is a cylinder of constant beta about the rotation axis, so every row of every
projection is the same analytic profile (chord ``2 sqrt(R^2 - x^2)``): the data are written
from one profile without ever holding the volume.

Measured (2-core x86-64 machine shared with other jobs, torch CPU, distributed 2026.8,
Python 3.11), with 768 MiB workers and a 3 GiB volume (6144 rows): warm baseline 336-339 MiB,
peak during the run 438-452 MiB (spill threshold 537 MiB), no spill, pause or restart; the loss of
the one gd epoch 0.533 -> 0.515; the run 137-152 s (hence ``slow``; the far-field out-of-core
test covers the engine's out-of-core path in the default suite). At 576 MiB (the far-field
test's limit, 2.25 GiB volume) the workers peaked at 420-428 MiB, over that limit's 403 MiB
spill threshold, and spilled.

Per-task working sets measured (``VmHWM`` growth of one gradient task, in-process): a group of
2 bands of 16 rows (16 MiB slab) +107-124 MiB, which paused both workers at 470 MiB during the
first minibatch and hung the run; 1 band of 16 rows +42 MiB; 1 band of 8 rows +39 MiB. Besides
the task, a worker holds its block cache (5 % of the limit, 29 MiB: ~7 slabs, see
``storage/block_cache.py``) and the gradient pieces (4 MiB each) waiting for their updates.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from adorym_dask.config import config_from_dict
from adorym_dask.storage.checkpoint import load_checkpoint
from adorym_dask.storage.measurements import write_measurements
from test_out_of_core import (
    MIB, SPILL, assert_no_memory_trouble, require_free_disk, run_measured,
)

N_X = 256  # = n_z = det_x
# 768 MiB workers: the far-field test's 576 MiB leave ~60 MiB above a warm worker's 340 MiB
# before Dask spills, and a tomography task (an 8-row slab of the whole width and depth, its
# rotation and gradient) takes ~40 MiB, with gradient pieces waiting for their updates: at
# 576 MiB the workers peaked at 420-428 MiB and spilled
LIMIT = 768 * MIB
N_Y = 6144  # rows: N_Y x N_X x N_X x 2 channels x 4 B = 3 GiB = 4 x LIMIT
BAND = 8  # rows per tile and per object slab
MINIBATCH = 16  # bands per minibatch
GROUP = 1  # bands per task
ANGLES = np.radians([0.0, 60.0, 120.0])
ENERGY_EV = 20000.0
PIXEL_M = 1e-6
I0 = 1e4
MAX_OD = 1.0  # optical density through the cylinder's axis


def _write_cylinder(folder: Path, n_y: int) -> Path:
    """Projections of a cylinder of constant beta about the rotation axis (radius 0.4 n_x):
    every row at every angle is ``I0 exp(-2 k beta chord(x) pixel)``."""
    folder.mkdir(exist_ok=True)
    x = np.arange(N_X) - (N_X - 1) / 2
    radius = 0.4 * N_X
    chord = 2 * np.sqrt(np.clip(radius**2 - x**2, 0, None))  # voxels
    row = (I0 * np.exp(-MAX_OD * chord / chord.max())).astype(np.float32)
    intensities = np.broadcast_to(row, (len(ANGLES), 1, n_y, N_X))
    return Path(write_measurements(
        folder / "cylinder.h5", intensities=intensities,
        positions_px=np.zeros((len(ANGLES), 1, 2)), angles_rad=ANGLES, energy_ev=ENERGY_EV,
        pixel_size_m=PIXEL_M, incident_photons=I0,
    ))


def _config(data: Path, output: Path):
    return config_from_dict({
        "data": {"path": str(data)},
        "model": {"kind": "tomography", "tile_px": BAND},
        "object": {"representation": "delta_beta", "chunks": [BAND, N_X], "store": "zarr"},
        "optimizer": {"name": "gd"},
        "epochs": 1,
        "minibatch_size": MINIBATCH,
        "tile_group_size": GROUP,
        "publish_every_epochs": 0,  # the run publishes once at its end anyway
        "output": str(output),
        "progress": False,
    })


@pytest.mark.slow
def test_volume_four_times_worker_memory(tmp_path):
    volume_bytes = N_Y * N_X * N_X * 2 * 4
    assert volume_bytes >= 4 * LIMIT
    require_free_disk(tmp_path, 3 * volume_bytes + 256 * MIB)
    warm = _config(_write_cylinder(tmp_path / "warm", 2 * BAND), tmp_path / "warm.zarr")
    cfg = _config(_write_cylinder(tmp_path / "big", N_Y), tmp_path / "run.zarr")
    m = run_measured(warm, cfg, LIMIT)
    result, baseline = m.result, m.baseline
    ck = load_checkpoint(cfg.output)
    print(f"volume {volume_bytes / MIB:.0f} MiB; warm baseline {baseline / MIB:.0f} MiB; run "
          f"{m.elapsed:.1f} s of {m.total:.1f} s; loss {ck.start_loss:.4g} -> "
          f"{result.loss}; workers: {m.report()}")
    assert baseline < SPILL * LIMIT - 32 * MIB, (
        f"a warm worker already uses {baseline / MIB:.0f} MiB: too close to the spill "
        f"threshold of the {LIMIT / MIB:.0f} MiB limit to test anything here")

    # one finite epoch; gd lowered the loss (the epoch's mean over its minibatches, each slab
    # seen at 3 angles, against the first minibatch before any update)
    assert len(result.loss) == 1 and math.isfinite(result.loss[0])
    assert result.loss[0] < ck.start_loss
    n_slabs = N_Y // BAND
    assert ck.block_steps.size == n_slabs
    # every slab was read, updated and written, once per minibatch holding one of its bands
    assert ck.block_steps.min() >= 1 and ck.block_steps.max() <= len(ANGLES)
    # the published volume: [n_y, n_x, n_z, (delta, beta)], its beta positive inside the
    # cylinder (spot checks: reading it whole would take 2.25 GiB here)
    obj = xr.open_zarr(cfg.output).object
    assert obj.shape == (N_Y, N_X, N_X, 2)
    for y in (0, N_Y // 2, N_Y - 1):
        beta = obj[y, N_X // 2 - 8 : N_X // 2 + 8, N_X // 2 - 8 : N_X // 2 + 8, 1].values
        assert np.isfinite(beta).all() and (beta > 0).all(), y
    # no worker restarted, paused or spilled; a worker's memory does not grow with the
    # volume: at most 128 MiB (a 24th of the 3 GiB volume) above the warm baseline: the block
    # cache (5 % of the limit, 38 MiB), one task's slab, rotation and gradient (~40 MiB) and
    # pieces waiting for updates
    assert_no_memory_trouble(m, LIMIT, growth=128 * MIB)
