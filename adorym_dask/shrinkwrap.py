"""Shrink-wrap of the finite support, blockwise (three passes of one task per block).

A far-field intensity does not change with the object's global phase, so a real/imag object
may settle at ``exp(i phi0)`` in vacuum rather than 1: pass 0 sums each slice's transmission
and takes ``phi0`` as its phase (the background's, for an object that is mostly vacuum), and
the contrast is ``|T exp(-i phi0) - 1|`` (delta/beta: ``|delta| + |beta|``). Pass 1 finds each
slice's largest blurred contrast over the whole object (each block blurs its own values with a
halo of ``3 sigma`` read from its neighbours, so the blur equals the whole object's); pass 2
writes each block's new support: blurred contrast above ``threshold`` times that maximum,
intersected with the starting support (``object.support_path``, or everything).
"""

from __future__ import annotations

import math

import dask
import numpy as np
from dask.delayed import delayed

from adorym_dask.config import RunConfig
from adorym_dask.graphs.tasks import grow_box
from adorym_dask.storage.object_store import ObjectStore
from adorym_dask.storage.support import blurred_contrast, initial_support, write_support


def block_sum(store: ObjectStore, block, source) -> np.ndarray:
    """Task: ``[n_z]`` complex sum of one block's transmission (real/imag objects)."""
    x = store.load(block, source)[..., 0]
    return (x[..., 0] + 1j * x[..., 1]).sum(axis=(0, 1))


def _blurred_block(store: ObjectStore, block, sources: dict, halo: int, rep: str, sigma: float,
                   phase0: np.ndarray):
    box = store.block_box(block)
    ext_box = grow_box(box, halo, store.shape[:2])
    ext = store.read_box(ext_box, sources)
    if rep == "real_imag":
        t = (ext[..., 0] + 1j * ext[..., 1]) * np.exp(-1j * phase0)
        ext = np.stack([t.real, t.imag], axis=-1)
    blurred = blurred_contrast(ext, rep, sigma)
    oy, ox = box[0] - ext_box[0], box[1] - ext_box[1]
    return blurred[oy : oy + box[2], ox : ox + box[3]]


def block_peak(store, block, sources, halo, rep, sigma, phase0) -> np.ndarray:
    """Task: ``[n_z]`` largest blurred contrast of one block."""
    return _blurred_block(store, block, sources, halo, rep, sigma, phase0).max(axis=(0, 1))


def block_support(store, block, sources, halo, rep, sigma, phase0, level, npy) -> tuple[int, int]:
    """Task: write one block's shrink-wrapped support (``level [n_z]`` the thresholds)."""
    blurred = _blurred_block(store, block, sources, halo, rep, sigma, phase0)
    start = initial_support(npy, store.block_box(block), store.shape[2])
    write_support(store.path, store.block_box(block), (blurred > level) & start)
    return block


def shrinkwrap(store: ObjectStore, sources: dict, cfg: RunConfig, scheduler, *, tag: str) -> None:
    """Replace the run store's ``support`` by the shrink-wrapped one (see module docstring)."""
    sw = cfg.object.shrinkwrap
    rep = cfg.object.representation.value
    halo = int(math.ceil(3 * sw.sigma_px))
    npy = None if cfg.object.support_path is None else str(cfg.object.support_path)

    def around(block):
        ext = grow_box(store.block_box(block), halo, store.shape[:2])
        return {b: sources[b] for b in store.blocks_overlapping(ext)}

    blocks = store.all_blocks()
    phase0 = np.zeros(store.shape[2])
    if rep == "real_imag":
        sums = dask.compute(*[
            delayed(block_sum, pure=True)(store, b, sources[b],
                                          dask_key_name=f"swsum-{tag}-{b[0]}-{b[1]}")
            for b in blocks
        ], scheduler=scheduler)
        phase0 = np.angle(np.sum(np.stack(sums), axis=0))
    peaks = dask.compute(*[
        delayed(block_peak, pure=True)(
            store, b, around(b), halo, rep, sw.sigma_px, phase0,
            dask_key_name=f"swpeak-{tag}-{b[0]}-{b[1]}",
        )
        for b in blocks
    ], scheduler=scheduler)
    level = sw.threshold * np.max(np.stack(peaks), axis=0)
    dask.compute(*[
        delayed(block_support, pure=True)(
            store, b, around(b), halo, rep, sw.sigma_px, phase0, level, npy,
            dask_key_name=f"swsupport-{tag}-{b[0]}-{b[1]}",
        )
        for b in blocks
    ], scheduler=scheduler)
