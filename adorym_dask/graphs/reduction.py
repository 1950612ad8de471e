"""Fixed-order tree sums: gradient pieces per object block, and the small gradients.

The order of every addition is fixed by the plan (group index), never by task completion, so a
run gives the same bits whatever the scheduling, and a distributed run equals a sync one.

Task count matters (each costs the scheduler ~1 ms, on the same cores as the workers here): a
block touched by at most ``fan_in`` pieces gets no reduction task at all (its update task sums
them), and the loss and the parameter gradients of a minibatch are summed by one task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from dask.delayed import Delayed, delayed

from adorym_dask.graphs.tasks import Box, GroupGradient


def _overlap(a: Box, b: Box) -> tuple[slice, slice, slice, slice] | None:
    """Slices of ``a`` and ``b`` covering their intersection, or None."""
    y0, x0 = max(a[0], b[0]), max(a[1], b[1])
    y1, x1 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    if y0 >= y1 or x0 >= x1:
        return None
    return (
        slice(y0 - a[0], y1 - a[0]),
        slice(x0 - a[1], x1 - a[1]),
        slice(y0 - b[0], y1 - b[0]),
        slice(x0 - b[1], x1 - b[1]),
    )


def crop_sum(block_box: Box, n_z: int, *items: GroupGradient | np.ndarray) -> np.ndarray:
    """Sum, in the given order, the parts of ``items`` that fall in ``block_box``.

    ``items`` are gradient pieces (cropped to the block) or partial block sums (already
    ``[h, w, n_z, C]``). Returns ``[h, w, n_z, C]`` float32: ``C`` is 2 (the gradient) or 3
    (with the ``pie`` update's curvature), as the items have it.
    """
    first = items[0] if items else None
    n_ch = 2 if first is None else (
        first.shape[-1] if isinstance(first, np.ndarray) else first.object_grad.shape[-1]
    )
    out = np.zeros((block_box[2], block_box[3], n_z, n_ch), np.float32)
    for item in items:
        if isinstance(item, np.ndarray):
            out += item
            continue
        ov = _overlap(block_box, item.box)
        if ov is not None:
            out[ov[0], ov[1]] += item.object_grad[ov[2], ov[3]]
    return out


def block_partials(
    block_box: Box, n_z: int, pieces: Sequence[Delayed], *, fan_in: int, name: str
) -> list[Delayed]:
    """At most ``fan_in`` items whose in-order sum is the block's gradient.

    With ``fan_in`` pieces or fewer they are returned as they are; otherwise a fixed-shape tree
    of :func:`crop_sum` tasks reduces them.
    """
    level = list(pieces)
    depth = 0
    while len(level) > fan_in:
        level = [
            delayed(crop_sum, pure=True)(
                block_box, n_z, *level[i : i + fan_in], dask_key_name=f"{name}-l{depth}-{i}"
            )
            for i in range(0, len(level), fan_in)
        ]
        depth += 1
    return level


def add_in_order(*values: np.ndarray | float | None) -> np.ndarray | float | None:
    """``((a0 + a1) + a2) + ...`` of arrays or floats; None entries are skipped."""
    total = None
    for a in values:
        if a is not None:
            total = a if total is None else total + a
    return total


@dataclass
class SmallSums:
    """A minibatch's loss and parameter gradients, summed in plan order.

    Attributes
    ----------
    loss : float
        Sum of the pieces' (scaled) losses: the minibatch mean.
    grads : dict
        Global parameters: the summed gradient.
    rows : dict
        Per-tile and per-angle parameters: ``[(angle, tiles or None, grad, curvature or None),
        ...]`` in plan order, each tile once; the driver scatters them by index.
    tile_losses : list
        ``[(angle, tiles, losses), ...]``: each tile's own (unscaled) loss.
    curvatures : dict
        Global parameters with a curvature estimate (the probe: the summed object
        intensity): its sum, like the gradient's.
    """

    loss: float
    grads: dict[str, np.ndarray] = field(default_factory=dict)
    curvatures: dict[str, np.ndarray] = field(default_factory=dict)
    rows: dict[str, list] = field(default_factory=dict)
    tile_losses: list = field(default_factory=list)


def small_sums(scopes: dict[str, str], *items: GroupGradient | SmallSums) -> SmallSums:
    """In-order sums of the loss and the parameter gradients of pieces or of partial sums.

    ``scopes`` maps every refined parameter to its scope (``global``, ``tile``, ``angle``).
    """
    parts = [_as_sums(i, scopes) for i in items]
    out = SmallSums(loss=add_in_order(*(p.loss for p in parts)),
                    tile_losses=[row for p in parts for row in p.tile_losses])
    for name, scope in scopes.items():
        if scope == "global":
            out.grads[name] = add_in_order(*(p.grads.get(name) for p in parts))
            curv = add_in_order(*(p.curvatures.get(name) for p in parts))
            if curv is not None:
                out.curvatures[name] = curv
        else:
            out.rows[name] = [row for p in parts for row in p.rows.get(name, [])]
    return out


def small_part(item: GroupGradient | SmallSums, scopes: dict[str, str]) -> SmallSums:
    """Task: the small outputs of one gradient piece (loss, parameter gradients and
    curvatures, tile losses) as a :class:`SmallSums`, without its object gradient."""
    return _as_sums(item, scopes)


def _as_sums(item: GroupGradient | SmallSums, scopes: dict[str, str]) -> SmallSums:
    if isinstance(item, SmallSums):
        return item
    sums = SmallSums(loss=item.loss)
    if item.tile_loss is not None:
        sums.tile_losses = [(item.angle, item.tiles, item.tile_loss)]
    for name, scope in scopes.items():
        g = item.grads[name]
        if scope == "global":
            sums.grads[name] = g
            if name in item.curvatures:
                sums.curvatures[name] = item.curvatures[name]
        else:
            tiles = item.tiles if scope == "tile" else None
            sums.rows[name] = [(item.angle, tiles, g, item.curvatures.get(name))]
    return sums


def small_sum_tree(
    pieces: Sequence[Delayed], *, scopes: dict[str, str], fan_in: int, name: str
) -> Delayed:
    """:class:`SmallSums` over every piece, as a fixed-shape tree.

    Each piece first goes through its own small task (:func:`small_part`), which the
    scheduler runs where the piece is: the tree then moves only losses and parameter
    gradients between workers, never the pieces' object gradients.
    """
    level = [
        delayed(small_part, pure=True)(p, scopes, dask_key_name=f"{name}-part-{i}")
        for i, p in enumerate(pieces)
    ]
    depth = 0
    while True:
        level = [
            delayed(small_sums, pure=True)(
                scopes, *level[i : i + fan_in], dask_key_name=f"{name}-l{depth}-{i}"
            )
            for i in range(0, len(level), fan_in)
        ]
        depth += 1
        if len(level) == 1:
            return level[0]
