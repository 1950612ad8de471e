"""The run store records time: ``epoch_seconds (epoch,)`` beside ``loss``, and ``setup_seconds``.

The clock's bookkeeping is checked exactly on a fake ``perf_counter``; a real run checks that
setup plus the epochs account for the run's wall time (the cluster's start aside: under the
sync scheduler there is none), and a resumed run keeps the stored epochs' seconds.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import xarray as xr

from adorym_dask import timing
from adorym_dask.config import config_from_dict
from adorym_dask.engine import run
from adorym_dask.simulate import simulate_ptychography
from adorym_dask.timing import RunClock


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_clock_splits_setup_epochs_and_cluster_start(monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(timing.time, "perf_counter", fake)
    clock = RunClock()
    fake.now += 2.0  # reading data, start values: setup
    clock.cluster_started(5.0)
    fake.now += 5.0  # the cluster's start: left out
    fake.now += 1.0  # initial blocks: setup
    clock.start_epoch()
    fake.now += 3.0
    clock.start_epoch()  # a second call while the epoch runs changes nothing
    fake.now += 1.0
    assert clock.end_epoch() == 4.0
    fake.now += 0.5  # its publish and commit
    clock.extend_last()
    clock.start_epoch()
    fake.now += 2.0
    epochs, running, setup = clock.snapshot()  # a commit in the middle of epoch 2
    assert epochs == [4.5] and running == 2.0 and setup == 3.0
    fake.now += 1.0
    clock.end_epoch()
    clock.extend_last()
    fake.now += 0.25  # the final publish: setup
    epochs, running, setup = clock.snapshot()
    assert epochs == [4.5, 3.0] and running == 0.0 and setup == 3.25
    assert setup + sum(epochs) == (fake.now - 100.0) - 5.0


def test_resumed_clock_continues_the_stored_figures(monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(timing.time, "perf_counter", fake)
    clock = RunClock()
    clock.resume_from([4.0, 3.0], 1.5, 2.0)  # epoch 3 had 1.5 s at its last commit
    fake.now += 1.0
    clock.start_epoch()
    fake.now += 2.0
    assert clock.end_epoch() == 3.5
    assert clock.snapshot() == ([4.0, 3.0, 3.5], 0.0, 3.0)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("timing")
    return simulate_ptychography(tmp / "s.h5", object_shape=(80, 80), probe_shape=(32, 32),
                                 n_positions=30, seed=0)


def _cfg(sim, out, epochs: int):
    return config_from_dict({
        "data": {"path": str(sim.path)}, "probe": {"init": "file", "path": str(sim.probe_path)},
        "object": {"chunks": [40, 40]}, "epochs": epochs, "minibatch_size": 8,
        "output": str(out), "cluster": {"scheduler": "sync"}, "progress": False,
    })


def test_run_store_records_setup_and_epoch_seconds(sim, tmp_path):
    start = time.perf_counter()
    run(_cfg(sim, tmp_path / "r.zarr", 3))
    wall = time.perf_counter() - start
    ds = xr.open_zarr(tmp_path / "r.zarr")
    assert ds.epoch_seconds.dims == ("epoch",) and ds.epoch_seconds.shape == ds.loss.shape == (3,)
    assert ds.setup_seconds.dims == () and ds.epoch_seconds.attrs["units"] == "s"
    seconds, setup = ds.epoch_seconds.values, float(ds.setup_seconds)
    assert np.all(seconds > 0) and setup > 0
    # everything is counted once: only the last metadata write is outside (no cluster here)
    assert setup + seconds.sum() <= wall
    assert setup + seconds.sum() >= 0.95 * wall - 0.05


def test_resume_keeps_the_stored_epoch_seconds(sim, tmp_path):
    out = tmp_path / "r.zarr"
    run(_cfg(sim, out, 2))
    first = xr.open_zarr(out)
    before, setup_before = first.epoch_seconds.values.copy(), float(first.setup_seconds)
    run(_cfg(sim, out, 4), resume=True)
    after = xr.open_zarr(out)
    assert after.epoch_seconds.shape == (4,)
    kept = after.epoch_seconds.values
    assert kept[0] == before[0]
    # the checkpoint of epoch 2 was written by its own commit, whose time it cannot hold
    assert 0.5 * before[1] < kept[1] <= before[1]
    assert float(after.setup_seconds) > setup_before
