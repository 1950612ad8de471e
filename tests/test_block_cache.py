"""The per-process cache of immutable block versions (adorym_dask.storage.block_cache)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from adorym_dask.storage.block_cache import CACHE, BlockCache
from adorym_dask.storage.object_store import BlockRef, create_store, init_block


def test_lru_within_budget_and_read_only():
    cache = BlockCache(budget_bytes=3 * 800)
    arrays = {k: np.full(100, k, np.float64) for k in range(4)}  # 800 bytes each
    for k in range(3):
        cache.put(k, arrays[k])
    assert cache.get(0) is not None  # 0 is now the most recently used
    cache.put(3, arrays[3])  # over the budget: 1, the least recently used, goes
    assert cache.get(1) is None
    assert [float(cache.get(k)[0]) for k in (0, 2, 3)] == [0.0, 2.0, 3.0]
    assert cache.nbytes == 3 * 800
    with pytest.raises(ValueError, match="read-only"):
        cache.get(0)[0] = 5.0
    cache.put("big", np.zeros(1000))  # larger than the whole budget: not kept
    assert cache.get("big") is None and cache.nbytes == 3 * 800


@pytest.fixture
def store(tmp_path):
    zarr.open_group(store=str(tmp_path / "run.zarr"), mode="w-")
    return create_store("zarr", tmp_path / "run.zarr", shape=(32, 32, 1), chunks=(16, 16),
                        representation="real_imag", n_state=1)


def _state(store, value: float) -> np.ndarray:
    return np.full(store.geometry.initial_state((0, 0), store.start).shape, value, np.float32)


def test_a_version_is_never_stale(store):
    """Versions A (slot 1), then B (slot 0), then C (slot 1 again, overwriting A on disk): each
    ref reads its own content; A's, no longer on disk, comes from the cache, and a ref to slot 1
    without a version reads the disk (C)."""
    block = (0, 0)
    start = init_block(store, block)
    a = store.save(block, start, _state(store, 1.0))
    b = store.save(block, a, _state(store, 2.0))
    c = store.save(block, b, _state(store, 3.0))
    assert (a.slot, b.slot, c.slot) == (1, 0, 1)
    assert len({a.version, b.version, c.version}) == 3 and all((a.version, c.version))
    assert float(store.load(block, a)[0, 0, 0, 0, 0]) == 1.0
    assert float(store.load(block, c)[0, 0, 0, 0, 0]) == 3.0
    assert float(store.load(block, BlockRef(1))[0, 0, 0, 0, 0]) == 3.0  # the disk


def test_cached_reads_skip_the_store_and_other_runs_do_not_share(store, tmp_path, monkeypatch):
    block = (1, 0)
    ref = store.save(block, init_block(store, block), _state(store, 4.0))

    def no_disk(*args, **kwargs):
        raise AssertionError("read from disk")

    with monkeypatch.context() as m:
        m.setattr(type(store), "read_slot", no_disk)
        assert float(store.load(block, ref)[0, 0, 0, 0, 0]) == 4.0
        box = store.read_box((16, 0, 4, 4), {block: ref})
        assert (box[..., 0] == 4.0).all()
    # a new run replacing the store at the same path (overwrite: true) has another token: the
    # same block, slot and version get no cache hit
    zarr.open_group(store=str(tmp_path / "run.zarr"), mode="w")
    other = create_store("zarr", tmp_path / "run.zarr", shape=(32, 32, 1), chunks=(16, 16),
                         representation="real_imag", n_state=1, token="second-run")
    assert other.path == store.path and other.token != store.token
    init_block(other, block)
    hits = CACHE.hits
    assert float(other.load(block, BlockRef(ref.slot, ref.version))[0, 0, 0, 0, 0]) == 0.0
    assert CACHE.hits == hits


def _budget_after_a_put() -> int:
    from adorym_dask.storage.block_cache import CACHE

    CACHE.put(("probe", 0), np.zeros(8))
    return CACHE.budget_bytes


def test_worker_budget_is_a_small_fraction_of_its_memory_limit():
    """Dask does not see the cache: in a 400 MiB worker it may hold 5 % (20 MiB), not 256 MiB
    (which pushed the out-of-core test's 576 MiB workers past the pause threshold: a hang)."""
    from distributed import Client, LocalCluster

    from adorym_dask.storage.block_cache import WORKER_LIMIT_FRACTION

    limit = 400 * 2**20
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, memory_limit=limit,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        budget = client.submit(_budget_after_a_put, pure=False).result()
    assert budget == int(WORKER_LIMIT_FRACTION * limit)
