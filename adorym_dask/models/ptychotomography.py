"""Joint ptychotomography (paper Sec. 3.6): far-field ptychography through the rotated volume.

At each angle the volume ``[n_y, n_x, n_z]`` (delta, beta) is rotated (tilts optional, as in
:mod:`adorym_dask.models.tomography`) into the lab frame over the box that a tile group's
probe positions cover, its lab-z samples summed into ``model.slices`` slices, and the exit
waves of the group's tiles computed by multislice with the probe modes and propagated to the
far field (:class:`~adorym_dask.models.ptychography.FarFieldPtychography`). One probe is shared
by all angles; positions are per angle and tile, in the projection's frame (object pixels,
lab ``x = col - (n_x - 1)/2``). A group reads the y-slab under its tiles, whole in x and z.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from adorym_dask.config import ConfigError
from adorym_dask.models.base import Batch, ParameterSpec
from adorym_dask.models.ptychography import FarFieldPtychography
from adorym_dask.models.tomography import DEFAULT_MAX_TILT_RAD, VolumeGeometry, tilt_halo_px
from adorym_dask.physics.rotation import lab_z_samples, rotate_to_lab
from adorym_dask.storage.measurements import MeasurementError, Measurements

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ptychotomography:
    """The joint ptychotomography model.

    Attributes
    ----------
    ptycho : FarFieldPtychography
        The far-field physics of one angle (its ``n_slices`` slices along lab z).
    angles_rad : tuple of float
    n_z : int or None
        Voxels along z (None: ``n_x``).
    geometry : VolumeGeometry or None
        Set by the engine through :meth:`with_volume` once the volume's extent is known.
    reach_px : int
        Halo rows for tilts about x and z.
    max_tilt_rad : float
    """

    ptycho: FarFieldPtychography
    angles_rad: tuple[float, ...]
    n_z: int | None = None
    geometry: VolumeGeometry | None = None
    reach_px: int = 0
    max_tilt_rad: float = DEFAULT_MAX_TILT_RAD
    refine_tilts: bool = False

    full_rows = True  # a group reads whole rows: rotation about y mixes x and z
    default_optimizer = "adam"

    @property
    def wavelength_m(self) -> float:
        return self.ptycho.wavelength_m

    @property
    def pixel_size_m(self) -> float:
        return self.ptycho.pixel_size_m

    @property
    def det_shape(self) -> tuple[int, int]:
        return self.ptycho.det_shape

    @property
    def representation(self) -> str:
        return "delta_beta"

    @property
    def slice_thickness_m(self) -> float:
        return self.ptycho.slice_thickness_m

    @property
    def default_adam_step(self) -> float | None:
        """The object's Adam step in delta/beta: 0.03 rad of phase over the rotated volume's
        depth spread over its voxels (a voxel's own 0.03 rad, the default of the 2-D models,
        moves a projection through ``n`` voxels ``n`` times as far)."""
        if self.geometry is None:
            return None
        _, n_x, n_z = self.geometry.volume
        k = 2 * math.pi / self.wavelength_m
        return 0.03 / (k * self.pixel_size_m * math.hypot(n_x, n_z))

    def volume_depth(self, n_x: int) -> int:
        return self.n_z or n_x

    def with_volume(self, shape: tuple[int, int, int]) -> Ptychotomography:
        """This model for a volume of ``shape`` (its tilt halo sized for it)."""
        geo = VolumeGeometry(tuple(int(s) for s in shape), self.angles_rad, self.pixel_size_m)
        ptycho = self.ptycho
        if ptycho.n_slices > 1:  # slices evenly spread over the lab-z samples
            depth = len(lab_z_samples(shape[1], shape[2])) * self.pixel_size_m
            ptycho = replace(ptycho, slice_spacings_m=(depth / ptycho.n_slices,)
                             * (ptycho.n_slices - 1))
        reach = 0
        if self.refine_tilts:
            reach = tilt_halo_px(geo.volume, shape[1], (shape[1] - 1) / 2, self.max_tilt_rad)
        return replace(self, ptycho=ptycho, geometry=geo, reach_px=reach)

    # -- parameters --------------------------------------------------------------------------
    def parameter_specs(self) -> dict[str, ParameterSpec]:
        specs = dict(self.ptycho.parameter_specs())
        specs["tilts"] = ParameterSpec(
            "tilts", "tilts_rad", ("angle", "rot_axis"), "angle", "float64", unit="rad",
            default_step=2e-3, default_optimizer="adam", default_start_epoch=5,
            options={"max_tilt_rad": DEFAULT_MAX_TILT_RAD},
        )
        specs.pop("slice_spacings", None)  # the slices are the rotated volume's
        return specs

    def initial_parameters(self, cfg, meas: Measurements) -> dict[str, np.ndarray]:
        values = self.ptycho.initial_parameters(cfg, meas)
        values.pop("slice_spacings", None)
        values["tilts"] = np.zeros((len(self.angles_rad), 3))
        return values

    # -- physics -----------------------------------------------------------------------------
    def lab_box(self, obj_box: Tensor, params: dict[str, Tensor], batch: Batch
                ) -> tuple[Tensor, tuple[int, int]]:
        """The rotated volume over the group's tiles, ``[h, w, S, 2]`` (each slice the sum of
        its lab-z samples), and its origin ``(y, x)`` in object pixels."""
        geo = self.geometry
        if geo is None:
            raise RuntimeError("Ptychotomography.with_volume was not called")
        n_y, n_x, n_z = geo.volume
        pos = np.floor(params["positions"].detach().numpy()).astype(int)
        det = np.asarray(self.det_shape)
        lo, hi = pos.min(axis=0), pos.max(axis=0) + det
        dtype = obj_box.dtype
        lab_y = torch.arange(lo[0], hi[0], dtype=dtype) - (n_y - 1) / 2
        lab_x = torch.arange(lo[1], hi[1], dtype=dtype) - (n_x - 1) / 2
        lab_z = lab_z_samples(n_x, n_z, dtype=dtype)
        rot = geo.rotations(batch.angle, params.get("tilts"), dtype)
        obj_box, origin = geo.inside(obj_box, batch.origin)
        centre = geo.centre_in(origin)
        lab = rotate_to_lab(obj_box, rot, centre=centre, lab_y=lab_y, lab_x=lab_x,
                            lab_z=lab_z)[0]  # [h, w, d, 2]
        s = self.ptycho.n_slices
        d = lab.shape[2]
        edges = np.linspace(0, d, s + 1).round().astype(int)
        slices = torch.stack([lab[:, :, a:b].sum(dim=2) for a, b in zip(edges, edges[1:])], 2)
        return slices, (int(lo[0]), int(lo[1]))

    def _lab_batch(self, obj_box, params, batch):
        box, origin = self.lab_box(obj_box, params, batch)
        return box, replace(batch, origin=origin)

    def predict(self, obj_box: Tensor, params: dict[str, Tensor], batch: Batch) -> Tensor:
        box, lab = self._lab_batch(obj_box, params, batch)
        return self.ptycho.predict(box, params, lab)

    def tile_losses(self, obj_box: Tensor, params: dict[str, Tensor], batch: Batch,
                    meas: Tensor) -> Tensor:
        box, lab = self._lab_batch(obj_box, params, batch)
        return self.ptycho.tile_losses(box, params, lab, meas)

    def loss(self, pred: Tensor, meas: Tensor) -> Tensor:
        return self.ptycho.loss(pred, meas)

    def curvature(self, obj_box: Tensor, params: dict[str, Tensor], batch: Batch,
                  names: frozenset[str] = frozenset({"positions", "probe"})) -> dict[str, Tensor]:
        """The far-field model's curvature estimates on the rotated box."""
        box, lab = self._lab_batch(obj_box, params, batch)
        return self.ptycho.curvature(box, params, lab, names=names)

    def constrain_parameters(self, states: dict) -> dict:
        """The mean ``t_y`` held at zero, tilts within ``max_tilt_rad``."""
        from adorym_dask.optimizers import ParameterState

        out = dict(states)
        if "tilts" in out:
            ps = out["tilts"]
            v = np.array(ps.value)
            v[:, 0] -= v[:, 0].mean()
            v[:, 1:] = np.clip(v[:, 1:], -self.max_tilt_rad, self.max_tilt_rad)
            out["tilts"] = ParameterState(v, ps.state, ps.step)
        return out


def build_ptychotomography(cfg, meas: Measurements) -> Ptychotomography:
    """The model of ``cfg.model`` (a :class:`~adorym_dask.config.PtychotomographyConfig`)."""
    m = cfg.model
    if meas.angles_rad is None:
        raise MeasurementError(f"angles_rad is missing in {meas.source.path}: "
                               "ptychotomography needs the rotation angle of every angle")
    if not np.all(np.isfinite(meas.angles_rad)):
        raise MeasurementError(f"angles_rad in {meas.source.path} holds NaN or inf values")
    if cfg.object.representation.value != "delta_beta":
        raise ConfigError("ptychotomography reconstructs delta and beta: set "
                          "object.representation: delta_beta")
    ptycho = FarFieldPtychography(
        det_shape=tuple(meas.det_shape), representation="delta_beta",
        wavelength_m=meas.wavelength_m, pixel_size_m=meas.pixel_size_m,
        n_modes=m.probe_modes, n_slices=m.slices,
        slice_spacings_m=(meas.pixel_size_m,) * (m.slices - 1),
        slice_thickness_m=meas.pixel_size_m, loss_kind=m.loss.value, mask=meas.mask,
    )
    tilts = cfg.refine.get("tilts")
    max_tilt = float((tilts.options() if tilts is not None else {}).get(
        "max_tilt_rad", DEFAULT_MAX_TILT_RAD))
    if m.slices > 1:
        log.info("ptychotomography: %d slices along the beam through the rotated volume",
                 m.slices)
    model = Ptychotomography(ptycho=ptycho, angles_rad=tuple(float(a) for a in meas.angles_rad),
                             n_z=m.n_z, max_tilt_rad=max_tilt, refine_tilts=tilts is not None)
    return model

