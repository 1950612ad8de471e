"""The blockwise object update: one writer task per block per minibatch."""

from __future__ import annotations

import numpy as np

from adorym_dask.optimizers import OptimizerSpec, apply_step
from adorym_dask.storage.object_store import OBJECT, ObjectRef


def update_block(
    obj: ObjectRef,
    block: tuple[int, int],
    grad: np.ndarray,
    *,
    step: int,
    spec: OptimizerSpec,
) -> tuple[int, int]:
    """Read one block with its optimizer state, take one step, write both back in place.

    Parameters
    ----------
    obj : ObjectRef
        The object store.
    block : (int, int)
        Block index ``(by, bx)``.
    grad : ndarray
        ``[h, w, n_z, 2]`` summed gradient of the block.
    step : int
        Global optimizer step (from 1) for bias correction.
    spec : OptimizerSpec
        Optimizer hyper-parameters.

    Returns
    -------
    (int, int)
        The block index (so the driver can wait on it).
    """
    arrays = obj.read_block(block)
    state = {name: arrays[name] for name in obj.state_names}
    x, state = apply_step(arrays[OBJECT], grad, state, step, spec)
    obj.write_block(block, {OBJECT: x, **state})
    return block
