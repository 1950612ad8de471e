"""The object volume and its optimizer state: three stores behind one interface.

A *block* is one chunk of the object, chunked along y and x and full along z. A block's
*state* is one float32 array ``[h, w, n_z, 2, 1 + n_state]``: the object's two channels and,
beside them, the optimizer's arrays (e.g. Adam's m and v), so an update is one read and one
write.

Every store hands out *sources*: a value that says where the current state of a block is.
Tasks take the sources of the blocks they need as arguments, which also orders them after the
update that produced them. An update never overwrites its input:

- ``zarr`` (default) and ``hdf5`` keep two *slots* per block (double buffering). The source is
  a :class:`BlockRef` naming the slot; an update reads slot ``s`` and writes slot ``1 - s``. A
  rerun of an update (Dask reruns a task whose worker died after writing but before
  reporting) reads the same input and writes the same bytes: idempotent. The driver commits the
  per-block slot map only after every update of a minibatch has finished, so a committed map
  always names complete, mutually consistent blocks, whatever was killed when.
- ``memory`` keeps each block's state in the workers' memory (the paper's distributed-object
  mode); the source is the array itself (a future on a cluster). Updates return new arrays.

zarr: each slot of a block is one zarr chunk (no sharding: with sharding the shard, not the
chunk, would be the unit of exclusive writing), and zarr's local store writes each chunk to a
temporary file and renames it, so a killed writer never leaves a torn chunk.

hdf5: h5py from PyPI has no parallel HDF5, and two processes writing one file corrupt it
silently. Every read and write therefore opens the file, works and closes it while holding one
named lock: a ``distributed.Lock`` on a cluster (one writer at a time across all workers), a
process lock otherwise.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adorym_dask.storage import location
from adorym_dask.storage.block_cache import CACHE
from adorym_dask.storage.durability import fsync_file, fsync_zarr_chunk

OBJECT = "object"
STATE = "state"  # HDF5 dataset name
STATE_ZARR = "state/blocks"  # in a subgroup, so xarray.open_zarr of the run shows only results
HDF5_FILE = "_state.h5"
_local_lock = threading.Lock()


class StoreError(OSError):
    """The object store cannot be read or written (corrupt, missing, disk full, ...)."""


@dataclass(frozen=True)
class BlockRef:
    """The slot that holds a block's current state in a disk store, and the state's version:
    a random id that only this write has, so that the state can be cached per process
    (:mod:`adorym_dask.storage.block_cache`); ``""`` (start states, checkpoints) is never
    cached."""

    slot: int
    version: str = ""


@dataclass(frozen=True)
class Geometry:
    """Object shape and blocking.

    Attributes
    ----------
    shape : (int, int, int, int)
        ``[n_y, n_x, n_z, 2]``.
    chunks : (int, int)
        Block size along (y, x).
    n_state : int
        Optimizer arrays stored beside the object in each block.
    """

    shape: tuple[int, int, int, int]
    chunks: tuple[int, int]
    n_state: int = 0

    @property
    def n_blocks(self) -> tuple[int, int]:
        return (math.ceil(self.shape[0] / self.chunks[0]), math.ceil(self.shape[1] / self.chunks[1]))

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (*self.shape, 1 + self.n_state)

    def block_box(self, block: tuple[int, int]) -> tuple[int, int, int, int]:
        """``(y0, x0, h, w)`` of block ``(by, bx)``."""
        y0, x0 = block[0] * self.chunks[0], block[1] * self.chunks[1]
        return y0, x0, min(self.chunks[0], self.shape[0] - y0), min(self.chunks[1], self.shape[1] - x0)

    def blocks_overlapping(self, box: tuple[int, int, int, int]) -> list[tuple[int, int]]:
        """Blocks (row-major order) that intersect ``box = (y0, x0, h, w)``."""
        y0, x0, h, w = box
        ys = range(y0 // self.chunks[0], (y0 + h - 1) // self.chunks[0] + 1)
        xs = range(x0 // self.chunks[1], (x0 + w - 1) // self.chunks[1] + 1)
        return list(itertools.product(ys, xs))

    def all_blocks(self) -> list[tuple[int, int]]:
        return list(itertools.product(range(self.n_blocks[0]), range(self.n_blocks[1])))

    def initial_state(self, block: tuple[int, int], start: tuple[float, float]) -> np.ndarray:
        """``[h, w, n_z, 2, 1 + n_state]``: the start value, zero optimizer state."""
        _, _, h, w = self.block_box(block)
        out = np.zeros((h, w, self.shape[2], 2, 1 + self.n_state), np.float32)
        out[..., 0, 0], out[..., 1, 0] = start
        return out


def initial_value(representation: str) -> tuple[float, float]:
    """Per-channel start value: unit transmission, or zero delta and beta."""
    return (1.0, 0.0) if representation == "real_imag" else (0.0, 0.0)


@functools.lru_cache(maxsize=64)
def _zarr_array(path: str, name: str, token: str):
    return location.open_array(path, name)


def zarr_array(path: str, name: str, token: str):
    """Open (and cache per process) one array of a run store.

    The cache is keyed by the store's run token as well as its path: a run that replaces the
    store at the same path (``overwrite: true``, in the same process or on a long-lived cluster)
    has a new token, so it never gets the previous run's array with its old shape.
    """
    with _local_lock:
        return _zarr_array(path, name, token)


@contextmanager
def _hdf5_lock(path: str):
    """One holder at a time across the cluster (distributed.Lock), or in this process."""
    try:
        from distributed import Lock, get_worker

        get_worker()
    except (ImportError, ValueError):
        with _local_lock:
            yield
        return
    with Lock(f"adorym-dask-hdf5-{path}"):
        yield


@dataclass(frozen=True)
class ObjectStore:
    """Driver-side handle of a store; small and picklable, shipped inside tasks.

    Attributes
    ----------
    kind : str
        ``"zarr"``, ``"hdf5"`` or ``"memory"``.
    path : str
        The run store (a zarr group). The hdf5 store keeps its blocks in ``path/_state.h5``;
        the memory store writes its blocks there only when a checkpoint is taken.
    geometry : Geometry
        Shape and blocking.
    start : (float, float)
        Start value of the two channels.
    token : str
        The run token of the store (written in its attributes when it was created).
    """

    kind: str
    path: str
    geometry: Geometry
    start: tuple[float, float] = (1.0, 0.0)
    token: str = ""

    # -- convenience passthroughs ---------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.geometry.shape

    def block_box(self, block):
        return self.geometry.block_box(block)

    def blocks_overlapping(self, box):
        return self.geometry.blocks_overlapping(box)

    def all_blocks(self):
        return self.geometry.all_blocks()

    @property
    def on_disk(self) -> bool:
        return self.kind != "memory"

    @property
    def hdf5_path(self) -> str:
        return str(Path(self.path) / HDF5_FILE)

    # -- block state I/O (run inside tasks) ------------------------------------------------------
    def _slot_index(self, block: tuple[int, int], slot: int) -> tuple[slice, ...]:
        y0, x0, h, w = self.block_box(block)
        return (slot, slice(y0, y0 + h), slice(x0, x0 + w))

    def read_slot(self, block: tuple[int, int], slot: int) -> np.ndarray:
        """State ``[h, w, n_z, 2, 1 + n_state]`` of one block from one disk slot."""
        idx = self._slot_index(block, slot)
        try:
            if self.kind == "hdf5":
                import h5py

                with _hdf5_lock(self.hdf5_path), h5py.File(self.hdf5_path, "r") as f:
                    return f[STATE][idx]
            return np.asarray(zarr_array(self.path, STATE_ZARR, self.token)[idx])
        except (OSError, ValueError, KeyError) as err:
            raise StoreError(
                f"object store {self.path}: cannot read block {block} (slot {slot}): {err}. "
                "The store is damaged or was removed; restore it or start a new run"
            ) from None

    def write_slot(self, block: tuple[int, int], slot: int, data: np.ndarray) -> None:
        """Write one block's state into one disk slot (a whole chunk) and put it on stable
        storage (see :mod:`adorym_dask.storage.durability`) before returning."""
        idx = self._slot_index(block, slot)
        try:
            if self.kind == "hdf5":
                import h5py

                with _hdf5_lock(self.hdf5_path):
                    with h5py.File(self.hdf5_path, "r+") as f:
                        f[STATE][idx] = data
                    fsync_file(self.hdf5_path)
                return
            arr = zarr_array(self.path, STATE_ZARR, self.token)
            arr[idx] = data
            fsync_zarr_chunk(arr, self.path, STATE_ZARR, (slot, *block, 0, 0, 0))
        except OSError as err:
            raise StoreError(
                f"object store {self.path}: cannot write block {block}: {err.strerror or err}. "
                "The last committed state is intact; fix the cause (e.g. free disk space) and "
                "continue with --resume"
            ) from None

    def load(self, block: tuple[int, int], source) -> np.ndarray:
        """A block's current state from its source (a BlockRef or the array itself); a
        versioned BlockRef is read from this process's block cache when it holds it (the
        array is then read-only)."""
        if not isinstance(source, BlockRef):
            return source
        if not source.version:
            return self.read_slot(block, source.slot)
        key = (self.path, self.token, block, source.slot, source.version)
        data = CACHE.get(key)
        if data is None:
            data = self.read_slot(block, source.slot)
            CACHE.put(key, data)
        return data

    def save(self, block: tuple[int, int], old_source, data: np.ndarray):
        """Store a block's new state without touching the old one; returns the new source
        (``data`` must not be changed afterwards: this process's block cache keeps it)."""
        if not self.on_disk:
            return data
        slot = 1 - old_source.slot
        self.write_slot(block, slot, data)
        ref = BlockRef(slot, uuid.uuid4().hex)
        CACHE.put((self.path, self.token, block, slot, ref.version), data)
        return ref

    def publish(self, block: tuple[int, int], source) -> np.ndarray:
        """Copy a block's object channels into the run store's ``object`` array; return
        them, ``[h, w, n_z, 2]``."""
        y0, x0, h, w = self.block_box(block)
        data = self.load(block, source)[..., 0]
        try:
            zarr_array(self.path, OBJECT, self.token)[y0 : y0 + h, x0 : x0 + w] = data
        except OSError as err:
            raise StoreError(
                f"run store {self.path}: cannot publish block {block} of the object: "
                f"{err.strerror or err}. The last commit is intact (the published 'object' may "
                "mix two epochs until it is rewritten); fix the cause (e.g. free disk space) "
                "and continue with --resume"
            ) from None
        return data

    def read_box(self, box: tuple[int, int, int, int], sources: dict) -> np.ndarray:
        """Object values ``[h, w, n_z, 2]`` of ``box`` assembled from the blocks' sources."""
        y0, x0, h, w = box
        out = np.empty((h, w, self.shape[2], 2), np.float32)
        for block, src in sources.items():
            by0, bx0, bh, bw = self.block_box(block)
            ys, ye = max(y0, by0), min(y0 + h, by0 + bh)
            xs, xe = max(x0, bx0), min(x0 + w, bx0 + bw)
            if ys < ye and xs < xe:
                data = self.load(block, src)
                out[ys - y0 : ye - y0, xs - x0 : xe - x0] = data[
                    ys - by0 : ye - by0, xs - bx0 : xe - bx0, ..., 0
                ]
        return out

    def read_object(self, sources: dict) -> np.ndarray:
        """The whole object ``[n_y, n_x, n_z, 2]`` from the given sources (fits in memory)."""
        out = np.empty(self.shape, np.float32)
        for block, src in sources.items():
            y0, x0, h, w = self.block_box(block)
            out[y0 : y0 + h, x0 : x0 + w] = self.load(block, src)[..., 0]
        return out


def open_store(
    kind: str,
    path: str | Path,
    *,
    shape: tuple[int, int, int],
    chunks: tuple[int, int],
    representation: str,
    n_state: int,
    token: str = "",
) -> ObjectStore:
    """The handle of a store whose arrays exist (or are about to be made by create_store)."""
    chunks = (min(chunks[0], shape[0]), min(chunks[1], shape[1]))
    geometry = Geometry((*shape, 2), chunks, n_state)
    return ObjectStore(kind, str(path), geometry, initial_value(representation), token)


def create_store(kind: str, path: str | Path, **layout) -> ObjectStore:
    """Create the arrays of a store inside an existing (new) run group.

    ``layout`` is the keyword arguments of :func:`open_store` (shape, chunks, representation,
    n_state, token); the handle it returns is returned here.

    The run group gets ``object`` (the published result, dims ``y, x, z, channel``) and, for
    disk stores, the two slots of every block's state (``state/blocks`` in zarr, or
    ``_state.h5``). Slot 0 of every block is filled with the start value by
    :func:`init_block` tasks.
    """
    store = open_store(kind, path, **layout)
    path, geometry = store.path, store.geometry
    chunks, shape = geometry.chunks, layout["shape"]
    representation, n_state = layout["representation"], geometry.n_state
    group = location.open_group(path)
    # No compression: float gradients and Adam moments barely compress, and every update reads
    # and writes its block each minibatch.
    obj = group.create_array(
        OBJECT, shape=geometry.shape, chunks=(*chunks, shape[2], 2), dtype="float32",
        fill_value=0.0, compressors=None, dimension_names=["y", "x", "z", "channel"],
    )
    channels = ["real", "imag"] if representation == "real_imag" else ["delta", "beta"]
    obj.attrs.update({"representation": representation, "channels": channels})
    state_shape = (2, *geometry.state_shape)
    state_chunks = (1, *chunks, shape[2], 2, 1 + n_state)
    if kind in ("zarr", "memory"):  # memory: the slots hold its checkpoints
        group.require_group("state").create_array(
            "blocks", shape=state_shape, chunks=state_chunks, dtype="float32", fill_value=0.0,
            compressors=None,
        )
    elif kind == "hdf5":
        import h5py

        if location.is_url(path):
            raise StoreError(
                f"object.store hdf5 needs a local output folder, not {path}; use the zarr store "
                "for URLs"
            )

        with h5py.File(Path(path) / HDF5_FILE, "w-") as f:
            f.create_dataset(STATE, shape=state_shape, chunks=state_chunks, dtype="float32")
    return store


def init_block(store: ObjectStore, block: tuple[int, int]):
    """Task: the start state of a block, written to slot 0 of a disk store."""
    data = store.geometry.initial_state(block, store.start)
    if not store.on_disk:
        return data
    store.write_slot(block, 0, data)
    return BlockRef(0)


def checkpoint_block(store: ObjectStore, block: tuple[int, int], source, slot: int) -> BlockRef:
    """Task (memory store): write a block's in-memory state to a zarr slot for a checkpoint,
    on stable storage before it returns."""
    data = store.load(block, source)
    arr = zarr_array(store.path, STATE_ZARR, store.token)
    arr[store._slot_index(block, slot)] = data
    fsync_zarr_chunk(arr, store.path, STATE_ZARR, (slot, *block, 0, 0, 0))
    return BlockRef(slot)
