"""The blockwise object update: one writer task per block per minibatch."""

from __future__ import annotations

import numpy as np

from adorym_dask.graphs.reduction import crop_sum
from adorym_dask.graphs.tasks import GroupGradient
from adorym_dask.optimizers import OptimizerSpec, apply_step
from adorym_dask.storage.object_store import ObjectStore


def update_block(
    obj: ObjectStore,
    block: tuple[int, int],
    source,
    *grad_items: GroupGradient | np.ndarray,
    step: int,
    spec: OptimizerSpec,
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
        Global optimizer step (from 1) for bias correction.
    spec : OptimizerSpec
        Optimizer hyper-parameters.

    Returns
    -------
    BlockRef or ndarray
        The block's new source.
    """
    grad = crop_sum(obj.block_box(block), obj.shape[2], *grad_items)
    state = obj.load(block, source)
    opt = {name: state[..., i + 1] for i, name in enumerate(spec.state_names)}
    x, opt = apply_step(state[..., 0], grad, opt, step, spec)
    new = np.stack([x, *(opt[name] for name in spec.state_names)], axis=-1)
    return obj.save(block, source, new)
