"""The tile-group gradient task: a pure function of its inputs, run by Dask workers."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from adorym_dask.models.base import Batch, ForwardModel
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
    box : (int, int, int, int)
        ``(y0, x0, h, w)``: the object box every tile of the group lies in, with a halo wide
        enough for the positions' allowed refinement.
    """

    index: int
    angle: int
    tiles: np.ndarray
    box: Box


def group_box(positions_px: np.ndarray, det_shape: tuple[int, int]) -> Box:
    """Smallest integer box holding every ``[floor(pos), floor(pos) + det)`` tile."""
    lo = np.floor(positions_px).astype(np.int64).min(axis=0)
    hi = np.floor(positions_px).astype(np.int64).max(axis=0) + np.asarray(det_shape)
    return int(lo[0]), int(lo[1]), int(hi[0] - lo[0]), int(hi[1] - lo[1])


def grow_box(box: Box, halo: int, shape: tuple[int, int]) -> Box:
    """``box`` widened by ``halo`` pixels on every side, clipped to an object of ``shape``."""
    y0, x0 = max(box[0] - halo, 0), max(box[1] - halo, 0)
    y1 = min(box[0] + box[2] + halo, shape[0])
    x1 = min(box[1] + box[3] + halo, shape[1])
    return y0, x0, y1 - y0, x1 - x0


def box_holds(box: Box, positions_px: np.ndarray, det_shape: tuple[int, int]) -> bool:
    """Whether every tile at ``positions_px [G, 2]`` lies inside ``box``."""
    inner = group_box(positions_px, det_shape)
    return (inner[0] >= box[0] and inner[1] >= box[1]
            and inner[0] + inner[2] <= box[0] + box[2] and inner[1] + inner[3] <= box[1] + box[3])


@dataclass
class GroupGradient:
    """What a tile-group task returns.

    Attributes
    ----------
    index, angle : int
        The group's index and angle.
    tiles : ndarray
        ``[G]`` its tile indices (where per-tile gradients go).
    box : (int, int, int, int)
        Object box the gradient covers.
    loss : float
        Sum of the group's per-tile losses times the minibatch scale.
    object_grad : ndarray
        ``[h, w, n_z, 2]`` float32 gradient over ``box``.
    grads : dict of ndarray
        Gradient of every refined parameter in its own dtype: global parameters whole, per-tile
        ones ``[G, ...]`` (the group's rows), per-angle ones the angle's row.
    curvatures : dict of ndarray
        For refined parameters whose curvature the model estimates (``model.curvature``), that
        estimate in the gradient's shape and scale (positions: ``[G, 2]``).
    tile_loss : ndarray
        ``[G]`` each tile's own loss (unscaled).
    """

    index: int
    angle: int
    tiles: np.ndarray
    box: Box
    loss: float
    object_grad: np.ndarray
    grads: dict[str, np.ndarray]
    curvatures: dict[str, np.ndarray] = field(default_factory=dict)
    tile_loss: np.ndarray | None = None


def _leaf(value: np.ndarray, grad: bool) -> torch.Tensor:
    return torch.from_numpy(np.asarray(value, order="C")).requires_grad_(grad)  # 0-d stays 0-d


def tile_group_gradient(
    group: TileGroup,
    obj: ObjectStore,
    blocks: dict,
    source: TileSource,
    shared: dict[str, np.ndarray],
    own: dict[str, np.ndarray],
    model: ForwardModel,
    *,
    scale: float,
    refine: frozenset[str] | tuple[str, ...],
    object_curvature: bool = False,
    curvature_for: frozenset[str] = frozenset({"positions"}),
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
    shared : dict of ndarray
        Global parameters (the probe ``[M, py, px]``, ...), one value for every task.
    own : dict of ndarray
        This group's rows of the per-tile and per-angle parameters (positions ``[G, 2]``).
    model : ForwardModel
        The physics.
    scale : float
        Weight of each tile's loss, ``1 / n_tiles_in_minibatch``, so that the sum over tasks is
        the minibatch mean.
    refine : collection of str
        Parameters to differentiate besides the object.
    object_curvature : bool
        Append the model's per-pixel object curvature (``model.object_curvature_map``, the
        summed illumination for ptychography) times ``scale`` as one more channel of
        ``object_grad`` (``[..., C + 1]``), for the ``pie`` optimizer's preconditioner: it is
        a sum over tiles, so it reduces per block exactly like the gradient.
    curvature_for : collection of str
        Refined parameters whose curvature estimate (``model.curvature``) the driver's step
        uses; none is computed for the others (it cost 17 % of a default run's loop when the
        probe was refined with Adam).
    """
    meas = torch.from_numpy(read_tiles(source, group.angle, group.tiles))
    box = torch.from_numpy(obj.read_box(group.box, blocks)).requires_grad_(True)
    params = {name: _leaf(v, name in refine) for name, v in {**shared, **own}.items()}
    batch = Batch(origin=group.box[:2], angle=group.angle, tiles=group.tiles)
    if hasattr(model, "tile_losses"):  # a fused forward-and-loss step (ptychography)
        per_tile = model.tile_losses(box, params, batch, meas)
    else:
        per_tile = model.loss(model.predict(box, params, batch), meas)
    loss = per_tile.sum() * scale
    loss.backward()
    grads = {}
    for name in refine:
        g = params[name].grad
        grads[name] = np.zeros_like(params[name].detach().numpy()) if g is None else g.numpy()
    curvatures = {}
    wanted = frozenset(refine) & frozenset(curvature_for)
    if hasattr(model, "curvature") and wanted:
        with torch.no_grad():
            estimates = model.curvature(box, params, batch, names=wanted)
        curvatures = {n: (c * scale).numpy() for n, c in estimates.items() if n in wanted}
    object_grad = box.grad.numpy()
    if object_curvature and hasattr(model, "precondition_object_gradient"):
        # a preconditioner that is not diagonal in pixels (holography's, in frequency)
        object_grad = model.precondition_object_gradient(object_grad, params)
    if object_curvature:
        with torch.no_grad():
            curv = (model.object_curvature_map(box.detach(), params, batch) * scale).numpy()
        curv = np.broadcast_to(curv[:, :, None, None], (*object_grad.shape[:3], 1))
        object_grad = np.concatenate([object_grad, curv.astype(object_grad.dtype)], axis=-1)
    return GroupGradient(
        index=group.index,
        angle=group.angle,
        tiles=group.tiles,
        box=group.box,
        loss=float(loss.detach()),
        object_grad=object_grad,
        grads=grads,
        curvatures=curvatures,
        tile_loss=per_tile.detach().numpy().astype(np.float64),
    )


def position_search(
    group: TileGroup,
    obj: ObjectStore,
    blocks: dict,
    source: TileSource,
    shared: dict[str, np.ndarray],
    own: dict[str, np.ndarray],
    model: ForwardModel,
    *,
    which: np.ndarray,
    offsets: np.ndarray,
    start: np.ndarray,
    max_shift_px: float,
    tile_rows: frozenset[str] = frozenset({"positions"}),
    chunk: int = 64,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Task: for the tiles ``which`` of a group, the loss on a grid of positions around each.

    Gradient steps cannot bring back a tile that started about a scan step off: it settles in
    a neighbour's place (a local minimum). The driver asks this task, every few epochs, about
    the tiles whose loss stands out; it evaluates the forward model (no gradient) at the
    current position plus each of ``offsets [K, 2]``, keeping candidates whose correction from
    ``start [G, 2]`` stays within ``max_shift_px`` per axis and whose tile stays in the box.
    ``tile_rows`` names the entries of ``own`` that are per-tile rows (others go as they are).

    Returns ``(tiles, current_loss, best_loss, best_position)`` for the tiles asked about.
    """
    meas = read_tiles(source, group.angle, group.tiles)
    box = torch.from_numpy(obj.read_box(group.box, blocks))
    det = np.asarray(meas.shape[-2:])
    lo = np.asarray(group.box[:2], np.float64)
    hi = lo + np.asarray(group.box[2:]) - det
    fixed = {**shared, **{n: v for n, v in own.items() if n not in tile_rows}}
    params = {name: torch.from_numpy(np.asarray(v, order="C")) for name, v in fixed.items()}
    rows = {name: v for name, v in own.items() if name in tile_rows and name != "positions"}
    found = []
    for i in np.flatnonzero(which):
        here = own["positions"][i]
        cands = here + offsets
        keep = (np.all(np.abs(cands - start[i]) <= max_shift_px, axis=1)
                & np.all(cands >= lo, axis=1) & np.all(cands <= hi, axis=1))
        cands = np.concatenate([here[None], cands[keep]])
        losses = []
        with torch.no_grad():
            for c0 in range(0, len(cands), chunk):
                part = cands[c0 : c0 + chunk]
                k = len(part)
                batch = Batch(origin=group.box[:2], angle=group.angle,
                              tiles=np.full(k, group.tiles[i]))
                extra = {n: torch.from_numpy(np.repeat(v[i : i + 1], k, axis=0))
                         for n, v in rows.items()}
                pred = model.predict(box, {**params, **extra, "positions": torch.from_numpy(part)},
                                     batch)
                target = torch.from_numpy(np.repeat(meas[i : i + 1], k, axis=0))
                losses.append(model.loss(pred, target).numpy())
        losses = np.concatenate(losses)
        best = int(np.argmin(losses))
        found.append((group.tiles[i], losses[0], losses[best], cands[best]))
    if not found:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0), np.zeros((0, 2))
    tiles, current, best, where = zip(*found)
    return np.asarray(tiles), np.asarray(current), np.asarray(best), np.asarray(where)
