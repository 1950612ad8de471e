"""The blockwise object update: one writer task per block per minibatch."""

from __future__ import annotations

import numpy as np

from adorym_dask.graphs.reduction import crop_sum
from adorym_dask.graphs.tasks import GroupGradient
from adorym_dask.optimizers import OptimizerSpec, apply_step
from adorym_dask.storage.object_store import OBJECT, ObjectRef


def update_block(
    obj: ObjectRef,
    block: tuple[int, int],
    *grad_items: GroupGradient | np.ndarray,
    step: int,
    spec: OptimizerSpec,
) -> tuple[int, int]:
    """Sum a block's gradient, read the block and its optimizer state, take one step, and
    write both back in place.

    Parameters
    ----------
    obj : ObjectRef
        The object store.
    block : (int, int)
        Block index ``(by, bx)``.
    *grad_items : GroupGradient or ndarray
        Gradient pieces overlapping the block, or partial sums ``[h, w, n_z, 2]``, in plan
        order (see :func:`~adorym_dask.graphs.reduction.crop_sum`).
    step : int
        Global optimizer step (from 1) for bias correction.
    spec : OptimizerSpec
        Optimizer hyper-parameters.

    Returns
    -------
    (int, int)
        The block index (so the driver can wait on it).
    """
    grad = crop_sum(obj.block_box(block), obj.shape[2], *grad_items)
    arrays = obj.read_block(block)
    state = {name: arrays[name] for name in obj.state_names}
    x, state = apply_step(arrays[OBJECT], grad, state, step, spec)
    obj.write_block(block, {OBJECT: x, **state})
    return block
