"""The tile-group gradient task: a pure function of its inputs, run by Dask workers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from adorym_dask.models.base import ForwardModel
from adorym_dask.optimizers import ParameterState
from adorym_dask.storage.measurements import TileSource, read_tiles
from adorym_dask.storage.object_store import ObjectStore

Box = tuple[int, int, int, int]  # (y0, x0, h, w) in object pixels


@dataclass(frozen=True)
class TileGroup:
    """A few tiles of one angle processed together by one task.

    Attributes
    ----------
    index : int
        Fixed position of the group in the plan (sets the reduction order).
    angle : int
        Angle index into the measurements.
    tiles : ndarray
        ``[G]`` tile indices.
    positions_px : ndarray
        ``[G, 2]`` (y, x) tile corners in object pixels.
    box : (int, int, int, int)
        ``(y0, x0, h, w)``: the object box every tile of the group lies in.
    """

    index: int
    angle: int
    tiles: np.ndarray
    positions_px: np.ndarray
    box: Box


def group_box(positions_px: np.ndarray, det_shape: tuple[int, int]) -> Box:
    """Smallest integer box holding every ``[floor(pos), floor(pos) + det)`` tile."""
    lo = np.floor(positions_px).astype(np.int64).min(axis=0)
    hi = np.floor(positions_px).astype(np.int64).max(axis=0) + np.asarray(det_shape)
    return int(lo[0]), int(lo[1]), int(hi[0] - lo[0]), int(hi[1] - lo[1])


@dataclass
class GroupGradient:
    """What a tile-group task returns.

    Attributes
    ----------
    index : int
        The group's index.
    box : (int, int, int, int)
        Object box the gradient covers.
    loss : float
        Sum of the group's per-tile losses times the minibatch scale.
    object_grad : ndarray
        ``[h, w, n_z, 2]`` float32 gradient over ``box``.
    probe_grad : ndarray or None
        ``[M, py, px]`` complex64 gradient of the probe (None when it is not refined).
    """

    index: int
    box: Box
    loss: float
    object_grad: np.ndarray
    probe_grad: np.ndarray | None


def tile_group_gradient(
    group: TileGroup,
    obj: ObjectStore,
    blocks: dict,
    source: TileSource,
    probe: np.ndarray | ParameterState,
    model: ForwardModel,
    *,
    scale: float,
    want_probe_grad: bool,
) -> GroupGradient:
    """Forward model, loss and backward pass for one tile group (all tiles and modes batched).

    Parameters
    ----------
    group : TileGroup
        The tiles and the object box they see.
    obj : ObjectStore
        The object store.
    blocks : dict
        ``{block: source}`` for every block that ``group.box`` overlaps (see
        :mod:`adorym_dask.storage.object_store`); only ``group.box`` is read.
    source : TileSource
        Where the measured tiles are read from (only ``group.tiles``).
    probe : ndarray or ParameterState
        ``[M, py, px]`` complex64 probe modes (or the probe's optimizer state holding them).
    model : ForwardModel
        The physics.
    scale : float
        Weight of each tile's loss, ``1 / n_tiles_in_minibatch``, so that the sum over tasks is
        the minibatch mean.
    want_probe_grad : bool
        Also differentiate with respect to the probe.
    """
    meas = torch.from_numpy(read_tiles(source, group.angle, group.tiles))
    box = torch.from_numpy(obj.read_box(group.box, blocks)).requires_grad_(True)
    if isinstance(probe, ParameterState):
        probe = probe.value
    p = torch.from_numpy(np.ascontiguousarray(probe)).requires_grad_(want_probe_grad)
    origin = np.asarray(group.box[:2], dtype=np.float64)
    pred = model.predict(box, p, group.positions_px - origin)
    loss = model.loss(pred, meas).sum() * scale
    loss.backward()
    return GroupGradient(
        index=group.index,
        box=group.box,
        loss=float(loss.detach()),
        object_grad=box.grad.numpy(),
        probe_grad=p.grad.numpy() if want_probe_grad else None,
    )
