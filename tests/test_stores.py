"""Every object store through one inherited test class; stores agree; resume; store faults."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import zarr

from adorym_dask.config import config_from_dict
from adorym_dask.engine import Reconstruction, run
from adorym_dask.graphs.update import update_block
from adorym_dask.optimizers import OptimizerSpec
from adorym_dask.simulate import simulate_ptychography
from adorym_dask.storage.checkpoint import CheckpointError, load_checkpoint
from adorym_dask.storage.object_store import (
    BlockRef,
    StoreError,
    create_store,
    init_block,
)
from adorym_dask.storage.results import OutputError


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sim")
    return simulate_ptychography(tmp / "s.h5", object_shape=(96, 96), probe_shape=(32, 32),
                                 n_positions=40, probe_modes=2, seed=0)


def _cfg(sim, out: Path, store: str = "zarr", **over):
    tree = {
        "data": {"path": str(sim.path)},
        "model": {"probe_modes": 2},
        "probe": {"init": "file", "path": str(sim.probe_path)},
        "object": {"shape_px": [96, 96], "chunks": [48, 48], "store": store},
        "epochs": 3,
        "output": str(out),
        "cluster": {"scheduler": "sync"},
        "progress": False,
    }
    tree.update(over)
    return config_from_dict(tree)


class StoreContract:
    """What every store must do; subclasses set ``kind``."""

    kind = ""

    @pytest.fixture
    def store(self, tmp_path):
        zarr.open_group(store=str(tmp_path / "run.zarr"), mode="w-")
        return create_store(self.kind, tmp_path / "run.zarr", shape=(40, 50, 2),
                            chunks=(16, 32), representation="real_imag", n_state=2)

    def test_geometry(self, store):
        assert store.geometry.n_blocks == (3, 2)
        assert store.block_box((2, 1)) == (32, 32, 8, 18)
        assert store.blocks_overlapping((10, 30, 10, 5)) == [(0, 0), (0, 1), (1, 0), (1, 1)]

    def test_init_is_start_value(self, store):
        src = init_block(store, (1, 1))
        state = store.load((1, 1), src)
        assert state.shape == (16, 18, 2, 2, 3)
        assert (state[..., 0, 0] == 1).all() and (state[..., 1:] == 0).all()
        assert (state[..., 1, 0] == 0).all()

    def test_update_never_overwrites_its_input_and_is_idempotent(self, store):
        """A rerun of an update (its worker died after writing) gives the same new state, and
        the old state is still readable: that is what makes reruns and commits safe."""
        block = (0, 1)
        src = init_block(store, block)
        before = store.load(block, src).copy()
        grad = np.random.default_rng(0).standard_normal((16, 18, 2, 2)).astype(np.float32)
        spec = OptimizerSpec("adam", 0.1)
        new1 = update_block(store, block, src, grad, step=1, spec=spec)
        after1 = store.load(block, new1).copy()
        new2 = update_block(store, block, src, grad, step=1, spec=spec)
        np.testing.assert_array_equal(store.load(block, new2), after1)
        np.testing.assert_array_equal(store.load(block, src), before)
        assert not np.array_equal(after1[..., 0], before[..., 0])

    @staticmethod
    def _random_object(store):
        """A non-uniform object and optimizer state written block by block; returns the
        object ``[n_y, n_x, n_z, 2]`` and the blocks' sources."""
        rng = np.random.default_rng(7)
        state = rng.normal(size=store.geometry.state_shape).astype(np.float32)
        sources = {}
        for b in store.all_blocks():
            y0, x0, h, w = store.block_box(b)
            start = init_block(store, b)
            sources[b] = store.save(b, start, state[y0 : y0 + h, x0 : x0 + w])
        return state[..., 0], sources

    def test_read_box_spans_blocks(self, store):
        obj, sources = self._random_object(store)
        for box in ((10, 20, 20, 25), (0, 0, 40, 50), (15, 31, 2, 3), (39, 49, 1, 1)):
            y0, x0, h, w = box
            got = store.read_box(box, {b: sources[b] for b in store.blocks_overlapping(box)})
            np.testing.assert_array_equal(got, obj[y0 : y0 + h, x0 : x0 + w])

    def test_publish(self, store):
        obj, sources = self._random_object(store)
        for b, s in sources.items():
            store.publish(b, s)
        published = zarr.open_array(store=store.path, path="object", mode="r")[...]
        np.testing.assert_array_equal(published, obj)


class TestZarrStore(StoreContract):
    kind = "zarr"

    def test_sources_are_slots(self, store):
        assert init_block(store, (0, 0)) == BlockRef(0)


class TestHdf5Store(StoreContract):
    kind = "hdf5"

    def test_blocks_live_in_the_hdf5_file(self, store):
        import h5py

        init_block(store, (0, 0))
        with h5py.File(store.hdf5_path, "r") as f:
            assert f["state"].shape == (2, 40, 50, 2, 2, 3)


class TestMemoryStore(StoreContract):
    kind = "memory"

    def test_sources_are_arrays(self, store):
        assert isinstance(init_block(store, (0, 0)), np.ndarray)


def test_stores_agree_in_process(sim, tmp_path):
    ref = run(_cfg(sim, tmp_path / "zarr.zarr", "zarr")).object()
    for kind in ("hdf5", "memory"):
        obj = run(_cfg(sim, tmp_path / f"{kind}.zarr", kind)).object()
        assert np.abs(obj - ref).max() <= 1e-5 * np.abs(ref).max(), kind


def test_stores_agree_on_a_cluster(sim, tmp_path):
    """hdf5 through the cluster-wide lock and memory blocks as futures, on 2 processes."""
    from distributed import Client, LocalCluster

    ref = run(_cfg(sim, tmp_path / "ref.zarr", "zarr")).object()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        for kind in ("hdf5", "memory"):
            obj = run(_cfg(sim, tmp_path / f"{kind}.zarr", kind), client).object()
            assert np.abs(obj - ref).max() <= 1e-5 * np.abs(ref).max(), kind


class _Interrupt(RuntimeError):
    pass


def _interrupt_after(monkeypatch, n_minibatches: int) -> None:
    """Make the driver die (an exception) after ``n`` minibatches, mid-epoch."""
    original = Reconstruction.run_minibatch
    calls = {"n": 0}

    def dying(self, *args, **kwargs):
        if calls["n"] == n_minibatches:
            raise _Interrupt
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Reconstruction, "run_minibatch", dying)


@pytest.mark.parametrize("kind", ["zarr", "hdf5", "memory"])
def test_resume_mid_epoch_equals_uninterrupted(sim, tmp_path, monkeypatch, kind):
    full = run(_cfg(sim, tmp_path / "full.zarr", kind, minibatch_size=8))
    with monkeypatch.context() as m:
        _interrupt_after(m, 7)  # 5 minibatches per epoch: dies in epoch 1
        with pytest.raises(_Interrupt):
            run(_cfg(sim, tmp_path / "cut.zarr", kind, minibatch_size=8))
    ck = load_checkpoint(tmp_path / "cut.zarr")
    assert (ck.epoch, ck.batch) == ((1, 2) if kind != "memory" else (1, 0))
    resumed = run(_cfg(sim, tmp_path / "cut.zarr", kind, minibatch_size=8), resume=True)
    a, b = full.object(), resumed.object()
    assert np.abs(a - b).max() <= 1e-6 * np.abs(a).max()
    np.testing.assert_allclose(resumed.loss, full.loss, rtol=1e-6)
    np.testing.assert_allclose(resumed.probe, full.probe, rtol=1e-6, atol=1e-6)


def test_resume_extends_epochs(sim, tmp_path):
    full = run(_cfg(sim, tmp_path / "full.zarr", epochs=3))
    run(_cfg(sim, tmp_path / "two.zarr", epochs=2))
    more = run(_cfg(sim, tmp_path / "two.zarr", epochs=3), resume=True)
    np.testing.assert_array_equal(more.object(), full.object())


def test_resume_refuses_changed_config(sim, tmp_path):
    run(_cfg(sim, tmp_path / "r.zarr", epochs=1))
    changed = _cfg(sim, tmp_path / "r.zarr", epochs=2, optimizer={"step_size": 0.5},
                   minibatch_size=8)
    with pytest.raises(CheckpointError, match=r"optimizer\.step_size.*minibatch_size|"
                                              r"minibatch_size.*optimizer\.step_size"):
        run(changed, resume=True)
    r = run(changed, resume=True, allow_config_change=True)
    assert len(r.loss) == 2


def test_resume_without_checkpoint(sim, tmp_path):
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run(_cfg(sim, tmp_path / "empty.zarr"), resume=True)


def test_corrupt_checkpoint_and_block(sim, tmp_path):
    out = tmp_path / "r.zarr"
    run(_cfg(sim, out, epochs=1))
    ck = out / "_checkpoint.npz"
    good = ck.read_bytes()
    ck.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="damaged"):
        run(_cfg(sim, out, epochs=2), resume=True)
    ck.write_bytes(good)
    slot = int(load_checkpoint(out).slots[0, 0])
    chunk = out / "state" / "blocks" / "c" / str(slot) / "0" / "0" / "0" / "0" / "0"
    chunk.write_bytes(b"not a chunk")
    with pytest.raises(StoreError, match=r"cannot read block \(0, 0\)"):
        run(_cfg(sim, out, epochs=2), resume=True)


def test_resume_into_read_only_folder(sim, tmp_path):
    out = tmp_path / "ro" / "r.zarr"
    out.parent.mkdir()
    run(_cfg(sim, out, epochs=1))
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i not available: cannot make a folder read-only for root")
    try:
        with pytest.raises(OutputError, match="cannot write"):
            run(_cfg(sim, out, epochs=2), resume=True)
    finally:
        subprocess.run(["chattr", "-i", str(out)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 500 KiB tmpfs: a real 'No space left on device' (skipped where mount is refused).
    The run needs ~0.3 MB for its start state and ~0.2 MB more for its first minibatch."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=500k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): no way to fill a disk safely")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_keeps_last_commit(sim, tmp_path, small_disk):
    """The run stops with a clear error; the last commit stays readable; after space is freed
    --resume finishes with the same result as an uninterrupted run."""
    full = run(_cfg(sim, tmp_path / "full.zarr"))
    out = small_disk / "r.zarr"
    with pytest.raises(StoreError, match="No space left on device.*--resume"):
        run(_cfg(sim, out))
    ck = load_checkpoint(out)
    assert ck.epoch < 3
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    resumed = run(_cfg(sim, out), resume=True)
    np.testing.assert_array_equal(resumed.object(), full.object())
    assert len(resumed.loss) == 3


def test_fsspec_url_store_runs_resumes_and_opens(sim, tmp_path, monkeypatch):
    """The run store as an fsspec URL (file://, through fsspec like s3:// would be): the
    workers of a 2-process cluster open it themselves, a killed run resumes, xarray opens it."""
    from distributed import Client, LocalCluster

    ref = run(_cfg(sim, tmp_path / "local.zarr", minibatch_size=8))
    url = f"file://{tmp_path}/url.zarr"
    with monkeypatch.context() as m:
        _interrupt_after(m, 7)
        with pytest.raises(_Interrupt):
            run(_cfg(sim, url, minibatch_size=8))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        resumed = run(_cfg(sim, url, minibatch_size=8), client, resume=True)
    assert resumed.output == url
    np.testing.assert_array_equal(resumed.object(), ref.object())
    assert resumed.open()["loss"].shape == (3,)
    with pytest.raises(OutputError, match="already exists"):
        run(_cfg(sim, url, minibatch_size=8))
