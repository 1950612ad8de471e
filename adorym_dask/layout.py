"""What a run is made of before it starts: the measurements, the object's extent and frame, the
object's optimizer, and its regularizers and constraints."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np

from adorym_dask.storage import location
from adorym_dask.config import ConfigError, RunConfig
from adorym_dask.models.regularizers import ObjectRules, Regularizer
from adorym_dask.optimizers import OptimizerSpec
from adorym_dask.storage.measurements import (
    Measurements,
    check_positions_inside,
    open_measurements,
    subset_measurements,
)

log = logging.getLogger(__name__)

FORMATS = {"auto": None, "native": None, "cxi": "cxi", "adorym": "adorym_h5",
           "data_exchange": "data_exchange"}
DEFAULT_PHASE_STEP_RAD = 0.03  # measured: converges fastest among 0.01/0.03/0.1 on simulations
# gd and momentum step the object by step_size / L (L the data term's curvature, see
# FarFieldPtychography.object_curvature); Nesterov momentum 0.9 amplifies steps up to 10x.
DEFAULT_CURVATURE_STEP = {"gd": 0.5, "momentum": 0.1, "pie": 1.0}
# pie: 0.5 measured stable and fastest among 0.5/0.7/0.9 from a wrong-defocus probe (0.7 and
# 0.9 diverged); momentum keeps PyTorch's customary 0.9 (with its 0.1 step)
DEFAULT_MOMENTUM = {"pie": 0.5, "momentum": 0.9}


def is_near_field(cfg: RunConfig) -> bool:
    """Whether the model propagates in the near field (holography, near-field ptychography)."""
    prop = getattr(cfg.model, "propagation", None)
    return cfg.model.kind == "holography" or getattr(prop, "value", prop) == "near_field"


def load_measurements(cfg: RunConfig) -> Measurements:
    """Open ``cfg.data`` (near-field metadata as the model needs it) and take its subset."""
    d = cfg.data
    meas = open_measurements(
        location.absolute(d.path),  # workers read it, perhaps from another folder
        fmt=FORMATS[d.format.value],
        energy_ev=d.energy_ev,
        pixel_size_m=d.pixel_size_m,
        detector_distance_m=d.detector_distance_m,
        check_values=d.check_values,
        near_field=is_near_field(cfg),
        source_distance_m=d.source_distance_m,
    )
    return tile_subset(meas, d.subset.value)


def tile_subset(meas: Measurements, which: str) -> Measurements:
    """``data.subset``: every tile, alternate ones (``even``/``odd``: two disjoint halves of
    a scan that cover the same field) or the first/second half in file order."""
    n = meas.n_tiles
    index = {
        "all": None, "even": np.arange(0, n, 2), "odd": np.arange(1, n, 2),
        "first_half": np.arange(n // 2), "second_half": np.arange(n // 2, n),
    }[which]
    if index is None:
        return meas
    if len(index) == 0:
        raise ConfigError(f"data.subset: {which} of {n} tile(s) is empty; use data.subset: all")
    log.info("data.subset %s: %d of %d tiles", which, len(index), n)
    return subset_measurements(meas, index)


def object_layout(
    cfg: RunConfig, meas: Measurements, *, movement_px: float = 0.0
) -> tuple[tuple[int, int], np.ndarray]:
    """The object's ``(n_y, n_x)`` and the offset from file positions to object pixels.

    With ``object.shape_px`` the positions are used as given and must lie inside. Without it
    the object is the smallest box holding every tile plus ``object.margin_px`` and the tiles'
    allowed movement ``movement_px`` (refined positions) on each side.
    """
    pos = meas.positions_px
    margin = cfg.object.margin_px + int(math.ceil(movement_px))
    if cfg.object.shape_px is not None:
        shape = tuple(cfg.object.shape_px)
        offset = np.zeros(2)
    else:
        offset = margin - np.floor(pos.reshape(-1, 2).min(axis=0))
        far = np.ceil(pos.reshape(-1, 2) + offset).max(axis=0) + np.asarray(meas.det_shape)
        shape = tuple(int(v) + margin for v in far)
    check_positions_inside(pos + offset, meas.det_shape, shape)
    return shape, offset


def object_optimizer(cfg: RunConfig, model) -> OptimizerSpec:
    """The object's optimizer. For Adam the step is the configured one, or 0.03 rad of phase
    per step: in transmission for real/imag objects, and for delta/beta the delta step whose
    phase shift over one slice, k delta L, is 0.03 rad. For gd and momentum ``step_size`` is
    a fraction of ``1/L`` (applied per minibatch by :func:`object_learning_rate`).

    Without ``optimizer.name`` the model's default applies (``pie`` for ptychography), except
    when ``optimizer.step_size`` is given: step sizes mean different things for different
    optimizers, and a run file that sets a step without naming the optimizer was written when
    Adam was every model's default, so it keeps Adam (with a warning) instead of taking its
    Adam step as a fraction of a Newton step."""
    o = cfg.optimizer
    if o.name is not None:
        name = o.name.value
    elif o.step_size is not None:
        name = "adam"
        log.warning("optimizer.step_size %g without optimizer.name: using adam, for which such "
                    "steps were written (the default is now %s); name the optimizer to silence "
                    "this", o.step_size, getattr(model, "default_optimizer", "adam"))
    else:
        name = getattr(model, "default_optimizer", "adam")
        if name == "cg" and (cfg.object.store.value == "memory" or cfg.regularizers):
            name = "gd"  # what cg cannot take (see below): its nearest kin
            log.info("optimizer: gd (the model's default, cg, needs an on-disk store and no "
                     "regularizers)")
    if name == "cg" and (cfg.object.store.value == "memory" or cfg.regularizers):
        raise ConfigError(
            "optimizer.name: cg keeps its direction in the on-disk object store and its line "
            "search evaluates the data term only: use object.store zarr or hdf5 and no "
            "regularizers (or optimizer.name: adam)"
        )
    if name not in ("adam", "cg") and not hasattr(model, "object_curvature"):
        raise ConfigError(
            f"optimizer.name: {name} scales its step by the model's object_curvature, which "
            f"model {cfg.model.kind!r} does not provide; use optimizer.name: adam"
        )
    if name == "pie" and not hasattr(model, "object_curvature_map"):
        raise ConfigError(
            f"optimizer.name: pie divides by the model's per-pixel object curvature, which "
            f"model {cfg.model.kind!r} does not provide; use optimizer.name: gd or adam"
        )
    if o.step_size is not None:
        step = o.step_size
    elif name not in ("adam", "cg"):  # cg: its first trial step, as Adam's (then its own)
        step = getattr(model, "default_object_steps", {}).get(name, DEFAULT_CURVATURE_STEP[name])
    elif getattr(model, "default_adam_step", None) is not None:
        step = model.default_adam_step
    elif cfg.object.representation.value == "real_imag":
        step = DEFAULT_PHASE_STEP_RAD
    else:
        step = DEFAULT_PHASE_STEP_RAD / (2 * math.pi / model.wavelength_m * model.slice_thickness_m)
    momentum = o.momentum if o.momentum is not None else DEFAULT_MOMENTUM.get(name, 0.9)
    return OptimizerSpec(name, step, o.beta1, o.beta2, o.eps, momentum,
                         damping=o.illumination_floor if name == "pie" else 0.0)


def object_learning_rate(spec: OptimizerSpec, model, params: dict, n_tiles: int) -> OptimizerSpec:
    """The spec a minibatch of ``n_tiles`` applies: Adam as is, gd/momentum ``step / L``, and
    for pie the damping ``floor L`` (``L`` the curvature where one tile lights a value with the
    probe's peak: rPIE's ``alpha max|P|^2``)."""
    if spec.name in ("adam", "cg"):
        return spec
    top = model.object_curvature(params, n_tiles)
    if spec.name == "pie":
        return replace(spec, damping=spec.damping * top)
    return spec.with_step(spec.step_size / top)


PASSIVE_BY_DEFAULT = ("holography", "tomography", "ptychotomography")


DEFAULT_REGULARIZER_EPS = 1e-3  # of transmission, or of phase (rad) over one slice


def object_rules(cfg: RunConfig, *, vacuum_margin: bool = False, n_z: int | None = None,
                 delta_per_rad: float | None = None) -> ObjectRules | None:
    """Regularizers and constraints of the blockwise update (None when there are none);
    ``vacuum_margin``: the model holds the object outside its tiles' field at vacuum (a
    support made of the field); ``n_z`` the object's depth (default ``model.slices``);
    ``delta_per_rad`` the delta (or beta) of one radian of phase over one slice,
    ``1 / (k dz)``, which scales the regularizers' default ``eps`` for delta_beta objects."""
    n_z = n_z or getattr(cfg.model, "slices", 1)
    default_eps = DEFAULT_REGULARIZER_EPS
    if cfg.object.representation.value == "delta_beta" and delta_per_rad is not None:
        default_eps *= delta_per_rad
    regs = tuple(
        Regularizer(
            r.kind.value,
            tuple(r.weight) if isinstance(r.weight, list) else (float(r.weight),) * n_z,
            r.eps if r.eps is not None else default_eps,
        )
        for r in cfg.regularizers
    )
    o = cfg.object
    rules = ObjectRules(
        representation=o.representation.value,
        regularizers=regs,
        constraint=o.constraint.value,
        non_negative=o.non_negative,
        support=o.support_path is not None or o.shrinkwrap is not None or vacuum_margin,
        passive=o.passive if o.passive is not None else cfg.model.kind in PASSIVE_BY_DEFAULT,
    )
    return rules if rules.active else None
