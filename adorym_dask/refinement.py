"""Refinement of the model's parameters on the driver: schedules, steps and constraints.

A model declares its parameters (:class:`~adorym_dask.models.base.ParameterSpec`); the run
file's ``refine:`` section says which are refined and how. The driver holds every parameter as
a :class:`~adorym_dask.optimizers.ParameterState` in its own dtype; tasks receive the values
(global ones whole, per-tile ones as their group's rows) and return gradients, which
:func:`apply_gradients` turns into one optimizer step per refined parameter, followed by that
parameter's constraints:

- ``positions``: the mean correction over each angle's tiles is removed (no drift of the whole
  image: it cannot be told from a shift of the object) and, with ``hold_affine: true``, so is
  the part of the corrections linear in position (a global scale, rotation or shear of the
  scan: while the probe is refined too, a change of its curvature mimics a rescaled scan, so a
  run can drift that way; on the Siemens star from its recorded positions, 1.53 px RMS in 15
  epochs without and 1.15 px with it). It is off by default: it also keeps the affine part of
  random errors (about ``sigma sqrt(6 / n_tiles)``) from being corrected. Corrections are
  clipped to ``max_shift_px`` per axis, and tiles are kept inside the object. Every
  ``search_every_epochs`` epochs, the tiles whose loss stands out are searched on a grid
  (:func:`tiles_to_search`, :func:`apply_search`): a tile that started about a scan step off
  sits in a local minimum that no gradient step leaves;
- ``probe``: the modes are orthogonalised and ordered by power; the optimizer's moments are
  transformed with them (the first moment, a linear function of the gradients, by the same
  unitary mixing; Adam's second moment by its squared magnitudes, exact when the modes'
  gradients are uncorrelated), so a step after the change continues where it was.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from adorym_dask.config import ConfigError, RunConfig
from adorym_dask.graphs.reduction import SmallSums
from adorym_dask.models.base import ParameterSpec
from adorym_dask.optimizers import OptimizerSpec, ParameterState, parameter_step
from adorym_dask.parameters import orthogonalize_modes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refinement:
    """How one parameter is refined: its optimizer (step in the value's unit), schedule and
    options (``max_shift_px``)."""

    spec: ParameterSpec
    optimizer: OptimizerSpec
    start_epoch: int
    stop_epoch: int | None
    every_epochs: int
    options: dict = field(default_factory=dict)

    def active(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based) updates the parameter."""
        if epoch < self.start_epoch or (self.stop_epoch is not None and epoch >= self.stop_epoch):
            return False
        return (epoch - self.start_epoch) % self.every_epochs == 0


def plan_refinements(
    cfg: RunConfig, specs: dict[str, ParameterSpec], initial: dict[str, np.ndarray]
) -> dict[str, Refinement]:
    """The refinements ``cfg.refine`` asks for, checked against the model's declarations."""
    # "refine: {probe: null}" for a model without a probe asks for nothing: not an error
    unknown = sorted(n for n, entry in cfg.refine.items() if n not in specs and entry is not None)
    if unknown:
        raise ConfigError(
            f"refine.{unknown[0]}: model {cfg.model.kind!r} has no refinable parameter "
            f"{unknown[0]!r}; it has {sorted(specs)}"
        )
    fixed = sorted(n for n, e in cfg.refine.items() if e is not None and not specs[n].refinable)
    if fixed:
        raise ConfigError(
            f"refine.{fixed[0]}: model {cfg.model.kind!r} takes {fixed[0]!r} but cannot refine "
            f"it; its refinable parameters are {sorted(n for n, s in specs.items() if s.refinable)}"
        )
    out = {}
    for name, spec in specs.items():
        if name in cfg.refine:
            entry = cfg.refine[name]
            if entry is None:
                continue
        elif spec.refined_by_default:
            entry = None
        else:
            continue
        options = dict(spec.options)
        if entry is not None:
            extra = entry.options()
            bad = sorted(set(extra) - set(spec.options))
            if bad:
                known = sorted(spec.options) or "none"
                raise ConfigError(
                    f"refine.{name}.{bad[0]}: unknown key; {name} takes the common keys "
                    f"(optimizer, step_size, start_epoch, stop_epoch, every_epochs) and {known}"
                )
            for key, value in extra.items():
                if isinstance(spec.options[key], bool):
                    if not isinstance(value, bool):
                        raise ConfigError(f"refine.{name}.{key}: {value!r} must be true or false")
                elif (isinstance(value, bool) or not isinstance(value, (int, float))
                      or not math.isfinite(value) or value < 0):
                    raise ConfigError(f"refine.{name}.{key}: {value!r} must be a number >= 0")
                options[key] = value if isinstance(value, bool) else float(value)
        name_opt = (spec.default_optimizer if entry is None or entry.optimizer is None
                    else entry.optimizer.value)
        step = (spec.default_steps.get(name_opt, spec.default_step)
                if entry is None or entry.step_size is None else entry.step_size)
        if spec.relative_step:
            step *= float(np.abs(initial[name]).max())
        if spec.step_scale is not None:
            step = step * np.asarray(spec.step_scale, np.float64)  # per element
        o = cfg.optimizer
        start = spec.default_start_epoch if entry is None or entry.start_epoch is None else entry.start_epoch
        momentum = (entry.momentum if entry is not None and entry.momentum is not None
                    else spec.default_momentum if spec.default_momentum is not None
                    else o.momentum if o.momentum is not None else 0.9)
        out[name] = Refinement(
            spec=spec,
            optimizer=OptimizerSpec(
                name_opt, step, o.beta1, o.beta2, o.eps, momentum,
                newton_fraction=(entry.newton_fraction if entry is not None
                                 and entry.newton_fraction is not None
                                 else spec.default_newton_fraction),
            ),
            start_epoch=start,
            stop_epoch=None if entry is None else entry.stop_epoch,
            every_epochs=1 if entry is None else entry.every_epochs,
            options=options,
        )
    return out


def count_shape(spec: ParameterSpec, value: np.ndarray) -> tuple[int, ...]:
    """Shape of a parameter's step counts: one per tile, per angle, or one."""
    return {"global": (), "tile": value.shape[:2], "angle": value.shape[:1]}[spec.scope]


def start_states(
    values: dict[str, np.ndarray], specs: dict[str, ParameterSpec], refinements: dict
) -> dict[str, ParameterState]:
    """A state for every declared parameter (refined ones with their optimizer's arrays)."""
    out = {}
    for name, value in values.items():
        opt = refinements[name].optimizer if name in refinements else OptimizerSpec("gd")
        out[name] = ParameterState.start(value, opt, count_shape(specs[name], value))
    return out


def shared_values(states: dict[str, ParameterState], specs: dict[str, ParameterSpec]) -> dict:
    """The global parameters' values, shipped to every task of a minibatch."""
    return {n: s.value for n, s in states.items() if specs[n].scope == "global"}


def group_rows(states: dict[str, ParameterState], specs: dict[str, ParameterSpec], group) -> dict:
    """A tile group's rows of the per-tile and per-angle parameters."""
    rows = {}
    for name, s in states.items():
        if specs[name].scope == "tile":
            rows[name] = s.value[group.angle, group.tiles]
        elif specs[name].scope == "angle":
            rows[name] = s.value[group.angle]
    return rows


@dataclass(frozen=True)
class PositionBounds:
    """What constrains refined positions (engine frame): their start, the allowed correction
    per axis, and the range that keeps every tile inside the object."""

    initial: np.ndarray
    max_shift_px: float
    low: np.ndarray
    high: np.ndarray
    hold_affine: bool = False


def constrain_positions(value: np.ndarray, bounds: PositionBounds) -> np.ndarray:
    """Remove each angle's mean correction (with ``hold_affine``, its least-squares affine
    part ``a + B p``), clip corrections to ``max_shift_px`` per axis, and keep tiles inside the
    object. ``value [n_angles, n_tiles, 2]``."""
    corr = value - bounds.initial
    if bounds.hold_affine and value.shape[1] >= 3:
        for a in range(value.shape[0]):
            basis = np.c_[np.ones(value.shape[1]), bounds.initial[a]]
            coef, *_ = np.linalg.lstsq(basis, corr[a], rcond=None)
            corr[a] = corr[a] - basis @ coef
    else:
        corr = corr - corr.mean(axis=1, keepdims=True)
    corr = np.clip(corr, -bounds.max_shift_px, bounds.max_shift_px)
    return np.clip(bounds.initial + corr, bounds.low, bounds.high)


def orthogonalize_probe(ps: ParameterState) -> ParameterState:
    """Orthogonal, power-ordered probe modes, with the optimizer moments transformed alike."""
    if ps.value.ndim != 3 or ps.value.shape[0] < 2:  # [modes, py, px] only
        return ps
    value, mix = orthogonalize_modes(ps.value)
    weights = np.abs(mix) ** 2
    state = {}
    for key, arr in ps.state.items():
        if key == "v":
            state[key] = np.einsum("ij,j...->i...", weights, arr).astype(arr.dtype)
        elif key == "m":
            c = arr[..., 0] + 1j * arr[..., 1]
            c = np.einsum("ij,j...->i...", mix, c)
            state[key] = np.stack([c.real, c.imag], axis=-1).astype(arr.dtype)
        else:
            state[key] = arr
    return ParameterState(value, state, ps.step)


def apply_gradients(
    states: dict[str, ParameterState],
    refinements: dict[str, Refinement],
    sums: SmallSums,
    *,
    bounds: PositionBounds | None = None,
) -> dict[str, ParameterState]:
    """One optimizer step of every parameter with a gradient in ``sums``, then its
    constraints. Pure: returns new states."""
    states = dict(states)
    for name, grad in sums.grads.items():
        states[name] = parameter_step(states[name], grad, refinements[name].optimizer,
                                      curvature=sums.curvatures.get(name))
    for name, rows in sums.rows.items():
        states[name] = _step_rows(states[name], refinements[name], rows)
    if "probe" in sums.grads:
        states["probe"] = orthogonalize_probe(states["probe"])
    if "positions" in sums.rows and bounds is not None:
        ps = states["positions"]
        states["positions"] = ParameterState(constrain_positions(ps.value, bounds), ps.state, ps.step)
    return states


def _step_rows(ps: ParameterState, r: Refinement, rows: list) -> ParameterState:
    """Scatter per-tile (or per-angle) gradients by index and step only those entries."""
    if r.spec.scope == "tile":
        angles = np.concatenate([np.full(len(t), a) for a, t, _, _ in rows])
        tiles = np.concatenate([t for _, t, _, _ in rows])
        grad = np.concatenate([g for _, _, g, _ in rows])
        curv = None if any(c is None for *_, c in rows) else np.concatenate([c for *_, c in rows])
        return parameter_step(ps, grad, r.optimizer, (angles, tiles), curvature=curv)
    by_angle: dict[int, np.ndarray] = {}
    for a, _, g, _ in rows:  # plan order: a fixed summation order per angle
        by_angle[a] = g if a not in by_angle else by_angle[a] + g
    angles = np.asarray(sorted(by_angle))
    grad = np.stack([by_angle[a] for a in angles])
    return parameter_step(ps, grad, r.optimizer, (angles,))


# A searched tile moves only if the best candidate's loss is below this fraction of its current
# loss: a clear improvement, not noise. Measured: 0.9 moved tiles of the Siemens star to places
# no better than where they were (its spokes leave radial positions loose; 2.43 px RMS from the
# recorded positions against 2.16 without a search), 0.7 left misplaced tiles of the synthetic
# fly scan where they were (0.35 px RMS against 0.30 with 0.8 or 0.9).
SEARCH_GAIN = 0.8


def tiles_to_search(tile_loss: np.ndarray, *, ratio: float, most: float = 0.1) -> np.ndarray:
    """``[n_angles, n_tiles]`` bool: tiles whose last loss exceeds ``ratio`` times their
    angle's median (at most the worst ``most`` fraction of each angle's tiles, which bounds the
    search's cost: with the default grid, 48 forward passes per tile searched)."""
    flagged = np.zeros(tile_loss.shape, bool)
    for a, losses in enumerate(tile_loss):
        ok = np.isfinite(losses)
        if not ok.any():
            continue
        high = ok & (losses > ratio * np.median(losses[ok]))
        cap = max(1, int(most * len(losses)))
        order = np.argsort(np.where(high, -losses, np.inf))[:cap]
        flagged[a, order[high[order]]] = True
    return flagged


def search_offsets(radius_px: float, step_px: float = 2.0) -> np.ndarray:
    """``[K, 2]`` the grid of offsets ``step_px`` apart within ``radius_px`` per axis, without
    (0, 0). A 2 px grid lands within a pixel of any place, inside the basin from which the
    gradient steps that follow finish the job."""
    axis = np.arange(-np.floor(radius_px / step_px), np.floor(radius_px / step_px) + 1) * step_px
    grid = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    return grid[np.any(grid != 0, axis=1)].astype(np.float64)


def apply_search(
    ps: ParameterState, found: list, angle_of: dict, *, bounds: PositionBounds
) -> tuple[ParameterState, int]:
    """Move each searched tile to its best candidate when that clearly lowers its loss; returns
    the new state (constraints applied) and how many tiles moved. ``found`` is the tasks'
    results in plan order, ``angle_of`` their groups' angles."""
    value = ps.value.copy()
    moved = 0
    for (tiles, current, best, where), angle in zip(found, angle_of):
        for t, c, b, w in zip(tiles, current, best, where):
            if b < SEARCH_GAIN * c:
                value[angle, t] = w
                moved += 1
    if moved:
        value = constrain_positions(value, bounds)
    return ParameterState(value, ps.state, ps.step), moved
