"""Fixed-order tree sums: gradient pieces per object block, and small-parameter gradients.

The order of every addition is fixed by the plan (group index), never by task completion, so a
run gives the same bits whatever the scheduling, and a distributed run equals a sync one.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def crop_sum(block_box: Box, n_z: int, *pieces: GroupGradient) -> np.ndarray:
    """Sum, in the given order, the parts of ``pieces`` that fall in ``block_box``.

    Returns ``[h, w, n_z, 2]`` float32.
    """
    out = np.zeros((block_box[2], block_box[3], n_z, 2), np.float32)
    for piece in pieces:
        ov = _overlap(block_box, piece.box)
        if ov is not None:
            out[ov[0], ov[1]] += piece.object_grad[ov[2], ov[3]]
    return out


def add_in_order(*values: np.ndarray | float | None) -> np.ndarray | float | None:
    """``((a0 + a1) + a2) + ...`` of arrays or floats; None entries are skipped."""
    total = None
    for a in values:
        if a is not None:
            total = a if total is None else total + a
    return total


def tree(leaves: Sequence[Delayed], *, fan_in: int, name: str) -> Delayed:
    """Fixed-shape tree of :func:`add_in_order` over ``leaves``."""
    level = list(leaves)
    depth = 0
    while len(level) > 1:
        level = [
            delayed(add_in_order, pure=True)(
                *level[i : i + fan_in], dask_key_name=f"{name}-l{depth}-{i}"
            )
            for i in range(0, len(level), fan_in)
        ]
        depth += 1
    return level[0]


def block_gradient(
    block_box: Box, n_z: int, pieces: Sequence[Delayed], *, fan_in: int, name: str
) -> Delayed:
    """Tree sum of the gradient pieces that overlap one block (pieces in plan order)."""
    leaves = [
        delayed(crop_sum, pure=True)(
            block_box, n_z, *pieces[i : i + fan_in], dask_key_name=f"{name}-crop-{i}"
        )
        for i in range(0, len(pieces), fan_in)
    ]
    return tree(leaves, fan_in=fan_in, name=name)


def _field(piece: GroupGradient, field: str):
    return getattr(piece, field)


def field_sum(pieces: Sequence[Delayed], field: str, *, fan_in: int, name: str) -> Delayed:
    """Tree sum of one field (``loss`` or ``probe_grad``) of every piece, in plan order."""
    leaves = [
        delayed(_field, pure=True)(p, field, dask_key_name=f"{name}-get-{i}")
        for i, p in enumerate(pieces)
    ]
    return tree(leaves, fan_in=fan_in, name=name)
