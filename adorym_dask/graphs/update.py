"""The blockwise object update: one writer task per block per minibatch.

An update sums the block's gradient pieces, adds the regularizers' gradient (total variation
with a one-pixel halo from the neighbours' borders, see :mod:`adorym_dask.models.regularizers`),
takes one optimizer step with the block's own step count, projects onto the constraints and
the support, and stores the result without overwriting its input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adorym_dask.graphs.reduction import crop_sum
from adorym_dask.graphs.tasks import GroupGradient
from adorym_dask.models.regularizers import (
    ObjectRules,
    apply_constraints,
    pad_far_edges,
    regularization_gradient,
)
from adorym_dask.optimizers import OptimizerSpec, apply_step, precondition
from adorym_dask.storage.object_store import ObjectStore
from adorym_dask.storage.support import read_support

NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


@dataclass(frozen=True)
class Borders:
    """A block's outermost object values: rows ``[w, n_z, 2]`` and columns ``[h, n_z, 2]``."""

    first_row: np.ndarray
    last_row: np.ndarray
    first_col: np.ndarray
    last_col: np.ndarray


def block_borders(obj: ObjectStore, block: tuple[int, int], source) -> Borders:
    """Task: the borders of a block's current object values (what its neighbours' TV needs)."""
    x = obj.load(block, source)[..., 0]
    return Borders(x[0].copy(), x[-1].copy(), x[:, 0].copy(), x[:, -1].copy())


def neighbours(obj: ObjectStore, block: tuple[int, int]) -> list[tuple[int, int]]:
    """The (up to 8) blocks around ``block``."""
    n_by, n_bx = obj.geometry.n_blocks
    out = []
    for dy, dx in NEIGHBOURS:
        b = (block[0] + dy, block[1] + dx)
        if 0 <= b[0] < n_by and 0 <= b[1] < n_bx:
            out.append(b)
    return out


def with_halo(
    obj: ObjectStore, block: tuple[int, int], x: np.ndarray, borders: dict
) -> tuple[np.ndarray, tuple[int, int]]:
    """The block ``x [h, w, n_z, 2]`` with a one-pixel halo from ``borders`` (by neighbour
    block) where neighbours exist, and far-edge padding; returns it and the block's corner."""
    n_by, n_bx = obj.geometry.n_blocks
    by, bx = block
    top, left = by > 0, bx > 0
    bottom, right = by < n_by - 1, bx < n_bx - 1
    h, w = x.shape[:2]
    oy, ox = int(top), int(left)
    ext = np.empty((h + oy + int(bottom), w + ox + int(right), *x.shape[2:]), x.dtype)
    ext[oy : oy + h, ox : ox + w] = x
    if top:
        ext[0, ox : ox + w] = borders[(by - 1, bx)].last_row
        if left:
            ext[0, 0] = borders[(by - 1, bx - 1)].last_row[-1]
        if right:
            ext[0, -1] = borders[(by - 1, bx + 1)].last_row[0]
    if bottom:
        ext[-1, ox : ox + w] = borders[(by + 1, bx)].first_row
        if left:
            ext[-1, 0] = borders[(by + 1, bx - 1)].first_row[-1]
        if right:
            ext[-1, -1] = borders[(by + 1, bx + 1)].first_row[0]
    if left:
        ext[oy : oy + h, 0] = borders[(by, bx - 1)].last_col
    if right:
        ext[oy : oy + h, -1] = borders[(by, bx + 1)].first_col
    return pad_far_edges(ext, bottom=not bottom, right=not right), (oy, ox)


def update_block(
    obj: ObjectStore,
    block: tuple[int, int],
    source,
    *grad_items: GroupGradient | np.ndarray,
    step: int,
    spec: OptimizerSpec,
    rules: ObjectRules | None = None,
    borders: dict | None = None,
):
    """Sum a block's gradient, take one optimizer step on its state, and store the result
    without overwriting the input (so running it twice is harmless).

    Parameters
    ----------
    obj : ObjectStore
        The object store.
    block : (int, int)
        Block index ``(by, bx)``.
    source : BlockRef or ndarray
        Where the block's current state is.
    *grad_items : GroupGradient or ndarray
        Gradient pieces overlapping the block, or partial sums ``[h, w, n_z, 2]``, in plan
        order (see :func:`~adorym_dask.graphs.reduction.crop_sum`).
    step : int
        This block's optimizer step (from 1), for Adam's bias correction.
    spec : OptimizerSpec
        Optimizer hyper-parameters (the learning rate already scaled).
    rules : ObjectRules, optional
        Regularizers and constraints.
    borders : dict, optional
        :class:`Borders` of the neighbouring blocks, by block (total variation).

    Returns
    -------
    BlockRef or ndarray
        The block's new source.
    """
    grad = crop_sum(obj.block_box(block), obj.shape[2], *grad_items)
    curvature = None
    if grad.shape[-1] == 3:  # pie: the summed per-pixel curvature rides along
        grad, curvature = grad[..., :2], grad[..., 2:]
    state = obj.load(block, source)
    x = state[..., 0]
    if rules is not None and rules.regularizers:
        ext, inner = with_halo(obj, block, x, borders) if rules.needs_halo else (None, (0, 0))
        grad = grad + regularization_gradient(x, rules, ext, inner)
    if spec.name == "pie":
        grad = precondition(grad, curvature if curvature is not None else 0.0, spec.damping)
    opt = {name: state[..., i + 1] for i, name in enumerate(spec.state_names)}
    x, opt = apply_step(x, grad, opt, step, spec)
    if rules is not None and rules.active:
        support = read_support(obj.path, obj.block_box(block)) if rules.support else None
        x = apply_constraints(x, rules, support)
    new = np.stack([x, *(opt[name] for name in spec.state_names)], axis=-1)
    return obj.save(block, source, new)
