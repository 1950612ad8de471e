"""Plan tile groups once, and build one Dask graph per minibatch.

Graph of one minibatch::

    tile_group_gradient (one task per group)
        -> (crop_sum tree when a block has many pieces) -> update_block (one writer per block)
        -> small_sums (loss, parameter gradients), returned to the driver, which updates the
           small parameters (probe, positions, ...)

Every key carries the run's tag (run token, epoch, minibatch, recovery count), so two runs on
one scheduler never share a key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from dask.delayed import Delayed, delayed

from adorym_dask.graphs.reduction import block_partials, small_sum_tree
from adorym_dask.graphs.tasks import (
    TileGroup,
    group_box,
    grow_box,
    position_search,
    tile_group_gradient,
)
from adorym_dask.graphs.update import block_borders, neighbours, update_block
from adorym_dask.models.regularizers import ObjectRules
from adorym_dask.optimizers import OptimizerSpec
from adorym_dask.storage.object_store import ObjectStore

FAN_IN = 8


def spatial_order(positions_px: np.ndarray, det_shape: tuple[int, int]) -> np.ndarray:
    """Order tiles along a serpentine over bands of half a tile height, so that consecutive
    tiles are neighbours and a group of them sees a compact object box.

    The direction alternates between *occupied* bands (not band parity: rows an even number
    of bands apart would otherwise all run the same way, and a group crossing rows would join
    one row's right end to the next row's left end).

    ``positions_px [n, 2]`` -> permutation ``[n]``.
    """
    band = np.floor(positions_px[:, 0] / max(1, det_shape[0] // 2)).astype(np.int64)
    rank = np.unique(band, return_inverse=True)[1].reshape(-1)
    x = np.where(rank % 2 == 0, positions_px[:, 1], -positions_px[:, 1])
    return np.lexsort((x, band))


# A group's box may cover at most this many times the detector area per tile it holds: loose
# enough for overlapping scans in 2-D, tight enough that a group never spans a gap.
MAX_BOX_AREA_PER_TILE = 2.0


def plan_tile_groups(
    positions_px: np.ndarray,
    det_shape: tuple[int, int],
    group_size: int,
    *,
    halo: int = 0,
    shape: tuple[int, int] | None = None,
) -> list[TileGroup]:
    """Split every angle's tiles into spatially compact groups of at most ``group_size``.

    Tiles are taken in :func:`spatial_order`; a group is closed when it is full or when the
    next tile would make its object box larger than ``MAX_BOX_AREA_PER_TILE`` detector areas
    per tile (a jump to a distant tile), so a task never reads and differentiates a box much
    larger than its tiles.

    Parameters
    ----------
    positions_px : ndarray
        ``[n_angles, n_tiles, 2]`` tile corners in object pixels.
    halo : int
        Pixels added around each group's box (the tiles' allowed movement when positions are
        refined), clipped to an object of ``shape``.
    """
    det_area = float(det_shape[0] * det_shape[1])
    groups: list[TileGroup] = []
    far = shape if shape is not None else (np.iinfo(np.int64).max,) * 2

    def close(angle: int, tiles: list[int], pos: np.ndarray) -> None:
        idx = np.asarray(tiles)
        box = grow_box(group_box(pos[idx], det_shape), halo, far)
        groups.append(TileGroup(len(groups), angle, idx, box))

    for angle, pos in enumerate(positions_px):
        current: list[int] = []
        for t in spatial_order(pos, det_shape):
            if current:
                box = group_box(pos[current + [t]], det_shape)
                too_big = box[2] * box[3] > MAX_BOX_AREA_PER_TILE * det_area * (len(current) + 1)
                if len(current) == group_size or too_big:
                    close(angle, current, pos)
                    current = []
            current.append(int(t))
        close(angle, current, pos)
    return groups


def epoch_minibatches(
    groups: Sequence[TileGroup], minibatch_size: int, rng: np.random.Generator,
    *, mix_angles: bool = False,
) -> list[list[TileGroup]]:
    """Shuffle the groups and pack them into minibatches of about ``minibatch_size`` tiles.

    Minibatches never mix angles (each optimizer step sees one rotation of the object), unless
    ``mix_angles`` (tomography: a projection is one tile, and a step should see several
    angles). Groups inside a minibatch are sorted by index, which fixes the reduction order.
    """
    by_angle: dict[int, list[TileGroup]] = {}
    for g in groups:
        by_angle.setdefault(-1 if mix_angles else g.angle, []).append(g)
    batches: list[list[TileGroup]] = []
    for angle in rng.permutation(sorted(by_angle)):
        members = [by_angle[int(angle)][i] for i in rng.permutation(len(by_angle[int(angle)]))]
        current: list[TileGroup] = []
        for g in members:
            current.append(g)
            if sum(len(c.tiles) for c in current) >= minibatch_size:
                batches.append(sorted(current, key=lambda c: c.index))
                current = []
        if current:
            batches.append(sorted(current, key=lambda c: c.index))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


@dataclass
class MinibatchGraph:
    """Delayed outputs of one minibatch.

    Attributes
    ----------
    sums : Delayed
        :class:`~adorym_dask.graphs.reduction.SmallSums`: the minibatch's mean loss and the
        gradients of the refined parameters.
    updates : dict
        Block index -> the Delayed update task of that block (its new source).
    """

    sums: Delayed
    updates: dict[tuple[int, int], Delayed]


def build_minibatch(
    groups: Sequence[TileGroup],
    *,
    obj: ObjectStore,
    sources: dict,
    source,
    shared,
    own: dict[int, dict],
    model: Delayed,
    spec: OptimizerSpec,
    block_steps: np.ndarray,
    scopes: dict[str, str],
    rules: ObjectRules | None,
    tag: str,
    footprints: dict[int, tuple[int, int, int, int]] | None = None,
    curvature_for: frozenset[str] = frozenset({"positions"}),
    block_task=None,
) -> MinibatchGraph:
    """Build the graph of one optimizer step (see module docstring).

    ``sources`` maps every block to where its current state is (a value, or a Delayed/future
    for the memory store); each task gets the sources of the blocks it reads or updates.
    ``shared`` is the (delayed) dict of global parameter values, ``own`` each group's rows of
    the per-tile parameters by group index, ``block_steps`` the steps each block has taken, and
    ``scopes`` the scope of every parameter to differentiate. ``footprints`` (by group index)
    are the boxes the tiles actually cover now, inside their groups' (halo-widened) boxes: the
    gradient is zero elsewhere, so only the blocks a footprint overlaps are updated.
    ``curvature_for`` names the parameters whose optimizer uses the model's curvature estimate
    (gd and momentum: a Gauss-Newton step); the tasks estimate it for those only.
    ``block_task(obj, block, source, *pieces)`` replaces the update of each block (the
    conjugate gradient's first pass: the block's gradient, no update).
    """
    n_tiles = sum(len(g.tiles) for g in groups)
    refine = frozenset(scopes)
    pieces = []
    touching: dict[tuple[int, int], list[int]] = {}
    for i, g in enumerate(groups):
        blocks = obj.blocks_overlapping(g.box)
        seen = footprints[g.index] if footprints is not None else g.box
        for block in obj.blocks_overlapping(seen):
            touching.setdefault(block, []).append(i)
        pieces.append(
            delayed(tile_group_gradient, pure=True)(
                g, obj, {b: sources[b] for b in blocks}, source, shared, own[g.index], model,
                scale=1.0 / n_tiles, refine=refine, object_curvature=spec.name == "pie",
                curvature_for=refine & curvature_for,
                dask_key_name=f"grad-{tag}-{g.index}",
            )
        )
    borders = {}
    if rules is not None and rules.needs_halo:
        around = sorted({nb for block in touching for nb in neighbours(obj, block)})
        borders = {
            b: delayed(block_borders, pure=True)(
                obj, b, sources[b], dask_key_name=f"borders-{tag}-{b[0]}-{b[1]}"
            )
            for b in around
        }
    updates = {}
    for block in sorted(touching):
        name = f"blockgrad-{tag}-{block[0]}-{block[1]}"
        parts = block_partials(
            obj.block_box(block), obj.shape[2], [pieces[i] for i in touching[block]],
            fan_in=FAN_IN, name=name,
        )
        if block_task is not None:
            updates[block] = delayed(block_task, pure=True)(
                obj, block, sources[block], *parts, dask_key_name=f"blocktask-{tag}-{block[0]}-{block[1]}")
            continue
        near = {b: borders[b] for b in neighbours(obj, block) if b in borders}
        updates[block] = delayed(update_block, pure=True)(
            obj, block, sources[block], *parts, step=int(block_steps[block]) + 1, spec=spec,
            rules=rules, borders=near or None,
            dask_key_name=f"update-{tag}-{block[0]}-{block[1]}",
        )
    sums = small_sum_tree(pieces, scopes=scopes, fan_in=FAN_IN, name=f"sums-{tag}")
    return MinibatchGraph(sums=sums, updates=updates)


def build_position_search(
    groups: Sequence[TileGroup],
    flagged: np.ndarray,
    *,
    obj: ObjectStore,
    sources: dict,
    source,
    shared,
    own: dict[int, dict],
    model: Delayed,
    offsets: np.ndarray,
    start: np.ndarray,
    max_shift_px: float,
    tile_rows: frozenset[str],
    tag: str,
) -> list[Delayed]:
    """One :func:`~adorym_dask.graphs.tasks.position_search` task per group holding a tile
    flagged in ``flagged [n_angles, n_tiles]`` (``start`` the positions' start values)."""
    tasks = []
    for g in groups:
        which = flagged[g.angle, g.tiles]
        if not which.any():
            continue
        blocks = obj.blocks_overlapping(g.box)
        tasks.append(delayed(position_search, pure=True)(
            g, obj, {b: sources[b] for b in blocks}, source, shared, own[g.index], model,
            which=which, offsets=offsets, start=start[g.angle, g.tiles],
            max_shift_px=max_shift_px, tile_rows=tile_rows,
            dask_key_name=f"search-{tag}-{g.index}",
        ))
    return tasks
