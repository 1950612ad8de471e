"""A per-process cache of immutable block versions of the object store.

Every update of a block writes its new state to the other disk slot and names it with a new
:class:`~adorym_dask.storage.object_store.BlockRef` carrying a version string that no other
write ever gets (a random 128-bit id). A version's content never changes: the slot may later
be overwritten on disk, but by another version. So a cache keyed by ``(store path, run token,
block, slot, version)`` can never return a stale state (the defect of issue 4 came from a key
that outlived its content); a rerun of a task that reads an old version even gets that
version's state where the disk no longer has it.

The worker that updates a block keeps the state it wrote; gradient tasks and the next update
on that worker then read it from memory instead of the store. The cache holds at most
:data:`DEFAULT_BUDGET_BYTES` (least recently used first out), and in a Dask worker with a
memory limit at most :data:`WORKER_LIMIT_FRACTION` of it: Dask's memory manager does not see
the cache (it is "unmanaged" memory to it), and a 256 MiB cache in a 576 MiB worker pushed it
past the pause threshold, where the run hung. ``ADORYM_DASK_BLOCK_CACHE_MB`` sets another
budget for the processes that inherit it (0 turns the cache off).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Hashable

import numpy as np

DEFAULT_BUDGET_BYTES = 256 * 2**20
WORKER_LIMIT_FRACTION = 0.05


class BlockCache:
    """Least-recently-used store of read-only arrays, bounded by their bytes; thread-safe.

    Parameters
    ----------
    budget_bytes : int
        Most bytes held; an array larger than the budget is not kept.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = int(budget_bytes)
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> np.ndarray | None:
        """The array stored under ``key`` (read-only), or None."""
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: np.ndarray) -> None:
        """Keep a read-only view of ``value`` under ``key`` (the caller must not change
        ``value`` afterwards), dropping the least recently used arrays beyond the budget."""
        if value.nbytes > self.budget_bytes:
            return
        view = value.view()
        view.setflags(write=False)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._items[key] = view
            self._bytes += view.nbytes
            while self._bytes > self.budget_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes


def _budget() -> int:
    value = os.environ.get("ADORYM_DASK_BLOCK_CACHE_MB")
    if value is None:
        return DEFAULT_BUDGET_BYTES
    return max(int(float(value) * 2**20), 0)


def _worker_memory_limit() -> int | None:
    """The memory limit (bytes) of the Dask worker this code runs in, or None."""
    try:
        from distributed import get_worker

        limit = get_worker().memory_manager.memory_limit
    except (ImportError, ValueError, AttributeError):
        return None
    return int(limit) if limit else None


class _ProcessCache(BlockCache):
    """The process's cache: its budget is settled at the first ``put``, where it is known
    whether this process is a Dask worker with a memory limit."""

    def __init__(self) -> None:
        super().__init__(_budget())
        self._settled = False

    def put(self, key: Hashable, value: np.ndarray) -> None:
        if not self._settled:
            limit = _worker_memory_limit()
            if limit is not None:
                self.budget_bytes = min(self.budget_bytes, int(WORKER_LIMIT_FRACTION * limit))
            self._settled = True
        super().put(key, value)


CACHE = _ProcessCache()
