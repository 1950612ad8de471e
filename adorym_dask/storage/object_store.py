"""The object volume and its optimizer state in a chunked zarr v3 store.

Layout inside the run store (a zarr group)::

    object             float32 [n_y, n_x, n_z, 2]  dims (y, x, z, channel), chunks (cy, cx, n_z, 2)
    optimizer/<name>   float32, same shape and chunks (e.g. Adam's m and v)

A *block* is one chunk: chunked along y and x, full along z and channel. Each minibatch has
exactly one update task per touched block, so no two tasks ever write the same chunk and zarr
needs no lock. Workers open the arrays themselves from the path (:class:`ObjectRef` is a small
picklable pointer) and read only the boxes their tiles see.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

OBJECT = "object"
STATE_GROUP = "optimizer"
_open_lock = threading.Lock()


@functools.lru_cache(maxsize=64)
def _open(path: str, name: str) -> zarr.Array:
    return zarr.open_array(store=path, path=name, mode="r+")


def open_array(path: str, name: str) -> zarr.Array:
    """Open (and cache per process) one array of a run store."""
    with _open_lock:
        return _open(path, name)


@dataclass(frozen=True)
class ObjectRef:
    """Picklable pointer to an object store, shipped to every task.

    Attributes
    ----------
    path : str
        The zarr group (local folder or URL).
    shape : (int, int, int, int)
        ``[n_y, n_x, n_z, 2]``.
    chunks : (int, int)
        Block size along (y, x).
    state_names : tuple of str
        Optimizer state arrays stored beside the object.
    """

    path: str
    shape: tuple[int, int, int, int]
    chunks: tuple[int, int]
    state_names: tuple[str, ...] = ()

    @property
    def n_blocks(self) -> tuple[int, int]:
        return (math.ceil(self.shape[0] / self.chunks[0]), math.ceil(self.shape[1] / self.chunks[1]))

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

    def _array(self, name: str) -> zarr.Array:
        return open_array(self.path, name if name == OBJECT else f"{STATE_GROUP}/{name}")

    def read_box(self, box: tuple[int, int, int, int], name: str = OBJECT) -> np.ndarray:
        """Read ``[h, w, n_z, 2]`` float32 from one array."""
        y0, x0, h, w = box
        return np.asarray(self._array(name)[y0 : y0 + h, x0 : x0 + w])

    def read_block(self, block: tuple[int, int]) -> dict[str, np.ndarray]:
        """The object and every state array of one block."""
        box = self.block_box(block)
        return {name: self.read_box(box, name) for name in (OBJECT, *self.state_names)}

    def write_block(self, block: tuple[int, int], arrays: dict[str, np.ndarray]) -> None:
        """Overwrite one whole block of the named arrays (one chunk each)."""
        y0, x0, h, w = self.block_box(block)
        for name, value in arrays.items():
            self._array(name)[y0 : y0 + h, x0 : x0 + w] = value

    def read_all(self) -> np.ndarray:
        """The whole object ``[n_y, n_x, n_z, 2]`` (only for objects that fit in memory)."""
        return np.asarray(self._array(OBJECT)[...])


def initial_value(representation: str) -> tuple[float, float]:
    """Per-channel start value: unit transmission, or zero delta and beta."""
    return (1.0, 0.0) if representation == "real_imag" else (0.0, 0.0)


def create_object_store(
    path: str | Path,
    *,
    shape: tuple[int, int, int],
    chunks: tuple[int, int],
    representation: str,
    state_names: tuple[str, ...],
    overwrite: bool = False,
) -> ObjectRef:
    """Create the object and optimizer-state arrays, filled block by block.

    Parameters
    ----------
    path : str or Path
        zarr group to create; refused if it exists and ``overwrite`` is False.
    shape : (int, int, int)
        ``(n_y, n_x, n_z)``.
    chunks : (int, int)
        Block size along (y, x), clipped to the shape.
    representation : str
        ``"real_imag"`` or ``"delta_beta"`` (sets the start value and the ``representation`` attr).
    state_names : tuple of str
        Optimizer state arrays to create (zero-filled).
    """
    path = str(path)
    full = (*shape, 2)
    chunks = (min(chunks[0], shape[0]), min(chunks[1], shape[1]))
    group = zarr.open_group(store=path, mode="w" if overwrite else "w-")
    dims = ["y", "x", "z", "channel"]
    # No compression: float gradients and Adam moments barely compress, and every update task
    # reads and writes its block each minibatch.
    kw = dict(
        shape=full, chunks=(*chunks, shape[2], 2), dtype="float32", fill_value=0.0,
        compressors=None,
    )
    obj = group.create_array(OBJECT, dimension_names=dims, **kw)
    channels = ["real", "imag"] if representation == "real_imag" else ["delta", "beta"]
    obj.attrs.update({"representation": representation, "channels": channels})
    state = group.require_group(STATE_GROUP)
    for name in state_names:
        state.create_array(name, dimension_names=dims, **kw)
    ref = ObjectRef(path=path, shape=full, chunks=chunks, state_names=tuple(state_names))
    start = np.asarray(initial_value(representation), np.float32)
    if start.any():
        for block in ref.all_blocks():
            _, _, h, w = ref.block_box(block)
            ref.write_block(block, {OBJECT: np.broadcast_to(start, (h, w, shape[2], 2))})
    return ref
