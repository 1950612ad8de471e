"""The forward-model interface every technique implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
from torch import Tensor


@runtime_checkable
class ForwardModel(Protocol):
    """Predict measured intensities for a group of tiles from an object box.

    Instances are small, immutable and picklable: they are shipped inside every Dask task.
    """

    def predict(self, obj_box: Tensor, probe: Tensor, positions_rel: np.ndarray) -> Tensor:
        """Return predicted intensities ``[G, det_y, det_x]``.

        Parameters
        ----------
        obj_box : Tensor
            ``[h, w, n_z, 2]`` float object values of the box the tiles see.
        probe : Tensor
            ``[n_modes, det_y, det_x]`` complex illumination.
        positions_rel : ndarray
            ``[G, 2]`` float (y, x) tile corners relative to the box origin.
        """
        ...

    def loss(self, pred: Tensor, meas: Tensor) -> Tensor:
        """Per-tile data mismatch ``[G]``."""
        ...
