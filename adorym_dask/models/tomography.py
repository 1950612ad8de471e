"""Projection tomography on y-slabs (paper Sec. 2.5, 3.7), with tilts, per-angle offsets and
the rotation centre refined.

Geometry (see the README): the volume ``[n_y, n_x, n_z]`` rotates about y through its
geometric centre; the beam travels along +z; at angle ``theta`` with tilts ``(t_y, t_x, t_z)``
a material point goes to ``Rz(t_z) Rx(t_x) Ry(theta + t_y) r``
(:func:`~adorym_dask.physics.rotation.rotation_matrices`). Detector row ``u`` sees lab
``y = u - (n_y - 1)/2``, column ``v`` lab ``x = v - c`` (``c`` the rotation centre column);
a per-angle offset ``o`` means recorded(r) = ideal(r - o).

Each projection is cut into bands of rows (the engine's tiles); a band reads only the y-slab
under it, widened by a halo sized from the largest allowed tilt (tilts about x and z move
material between rows), the offsets' range and, with near-field propagation, the Fresnel
spread. The slab is rotated and integrated inside the tile task, so the object gradient is
autograd's adjoint of that rotation.

Data: ``intensities [n_angles, 1, det_y, det_x]``, ``angles_rad``, attr ``incident_photons``
(bare-beam counts per pixel). ``loss: lsq`` without propagation fits line integrals,
``-ln(I / I0)`` against ``2 k integral(beta)`` (with ``gd``: ART); with ``distances_m`` the
exit wave ``sqrt(I0) exp(-i k int delta - k int beta)`` is Fresnel-propagated and fitted on
amplitudes (lsq) or intensities (poisson), as in holography.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from adorym_dask.config import ConfigError
from adorym_dask.models.base import Batch, ParameterSpec
from adorym_dask.models.losses import LOSSES, abs_square
from adorym_dask.physics.propagation import fresnel_transfer_function
from adorym_dask.physics.rotation import lab_z_samples, project, rotation_matrices
from adorym_dask.storage.measurements import MeasurementError, Measurements, read_tiles

log = logging.getLogger(__name__)

DEFAULT_MAX_TILT_RAD = 0.05
DEFAULT_MAX_OFFSET_PX = 10.0
MIN_TRANSMISSION = 1e-6  # measured transmissions are clipped here before the logarithm
# central-difference steps of the geometric parameters' curvature (rad, px, px)
_STEPS = {"tilts": 1e-3, "offsets": 0.05, "rotation_centre": 0.05}


@dataclass(frozen=True)
class VolumeGeometry:
    """Where the volume and the detector sit (small, immutable, shipped to every task).

    Attributes
    ----------
    volume : (int, int, int)
        ``(n_y, n_x, n_z)`` voxels.
    angles_rad : tuple of float
        Nominal rotation of every angle.
    pixel_size_m : float
        Voxel (and detector pixel) size.
    """

    volume: tuple[int, int, int]
    angles_rad: tuple[float, ...]
    pixel_size_m: float

    def rotations(self, angle: int, tilts: Tensor | None, dtype: torch.dtype) -> Tensor:
        """``[1, 3, 3]`` the rotation of angle ``angle`` (its tilts row ``[3]`` when they are
        refined or not all zero)."""
        theta = torch.tensor([self.angles_rad[angle]], dtype=torch.float64)
        use = tilts is not None and (tilts.requires_grad or bool((tilts != 0).any()))
        rot = rotation_matrices(theta, tilts.reshape(1, 3) if use else None)
        return rot.to(dtype)

    def centre_in(self, origin: tuple[int, int]) -> tuple[float, float, float]:
        """Index coordinates of the rotation centre in a box whose corner is volume pixel
        ``origin = (y0, x0)`` (the box holds the whole depth)."""
        n_y, n_x, n_z = self.volume
        return ((n_y - 1) / 2 - origin[0], (n_x - 1) / 2 - origin[1], (n_z - 1) / 2)

    def inside(self, box: Tensor, origin: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        """The part of a box ``[h, w, n_z, C]`` (corner at volume pixel ``origin``) that lies
        inside the volume, and its corner: beyond the volume is vacuum, whatever a box holds."""
        n_y, n_x, _ = self.volume
        y0, x0 = max(0, -origin[0]), max(0, -origin[1])
        y1 = min(box.shape[0], n_y - origin[0])
        x1 = min(box.shape[1], n_x - origin[1])
        if (y0, x0, y1, x1) == (0, 0, box.shape[0], box.shape[1]):
            return box, origin
        return box[y0:y1, x0:x1], (origin[0] + y0, origin[1] + x0)

    def line_integrals(self, slab: Tensor, origin: tuple[int, int], rot: Tensor, lab_y: Tensor,
                       lab_x: Tensor) -> Tensor:
        """``[h, w, C]`` integrals along the beam (metres times the value) of the slab
        ``[h_s, w_s, n_z, C]`` whose corner is volume pixel ``origin``, over lab rows ``lab_y
        [h]`` and columns ``lab_x [w]`` (voxel units about the rotation centre)."""
        _, n_x, n_z = self.volume
        dtype = slab.dtype
        slab, origin = self.inside(slab, origin)
        centre = self.centre_in(origin)
        out = project(slab, rot, centre=centre, lab_y=lab_y.to(dtype), lab_x=lab_x.to(dtype),
                      lab_z=lab_z_samples(n_x, n_z, dtype=dtype), step=self.pixel_size_m)
        return out[0]


def tilt_halo_px(volume: tuple[int, int, int], det_x: int, centre_px: float,
                 max_tilt_rad: float) -> int:
    """Rows a band must read beyond itself when tilts about x and z reach ``max_tilt_rad``.

    The material row of a lab point is ``(y cos g + x sin g) cos a + z sin a`` (tilts ``a``
    about x and ``g`` about z), so it departs from ``y`` by at most
    ``|y| (1 - cos a cos g) + |x| sin g + |z| sin a``, with ``|x|`` the detector's reach from
    the axis, ``|z|`` the rotated volume's half-diagonal, plus one row for interpolation.
    """
    n_y, n_x, n_z = volume
    a = min(abs(max_tilt_rad), math.pi / 2)
    x = max(centre_px, det_x - 1 - centre_px) + 1
    z = math.hypot(n_x, n_z) / 2 + 1
    shift = n_y / 2 * (1 - math.cos(a) ** 2) + x * math.sin(a) + z * math.sin(a)
    return int(math.ceil(shift)) + 1


def _rotation(theta: float, tilts: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    t = torch.as_tensor([tilts], dtype=torch.float64)
    return rotation_matrices(torch.tensor([theta], dtype=torch.float64), t)[0].numpy()


def tilt_gauge_patterns(angles_rad: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """See :func:`_tilt_gauge_patterns` (cached: the driver removes the gauge every step)."""
    return _tilt_gauge_patterns(tuple(float(a) for a in np.ravel(angles_rad)), eps).copy()


@functools.lru_cache(maxsize=8)
def _tilt_gauge_patterns(angles_rad: tuple[float, ...], eps: float) -> np.ndarray:
    """``[2, n_angles, 3]``: the per-angle tilts ``(t_y, t_x, t_z)`` that re-orienting the
    object by a small rotation about its x (pattern 0) or z axis (pattern 1) is equivalent to,
    per radian of it.

    Any rotation is ``Rz(t_z) Rx(t_x) Ry(theta + t_y)`` for some tilts, so the object's
    orientation and free per-angle tilts trade off exactly: ``R Q^T`` fits the data of object
    ``Q r`` as ``R`` fits that of ``r``. Only the tilts' components along these patterns
    (a rotating vector in ``(t_x, t_z)``; the third, about y, is a constant ``t_y``) are
    undetermined; a constant axis tilt is not among them.
    """
    out = np.zeros((2, len(angles_rad), 3))
    axes = ((0.0, eps, 0.0), (0.0, 0.0, eps))  # Q = Rx(eps), Rz(eps) as tilts of theta = 0
    basis = []
    for k in range(3):  # generators of (t_y, t_x, t_z) at zero tilt, about theta = 0
        t = [0.0, 0.0, 0.0]
        t[k] = eps
        basis.append((_rotation(0.0, tuple(t)) - np.eye(3)) / eps)
    basis = np.stack([b.reshape(-1) for b in basis], 1)  # [9, 3]
    for p, q in enumerate(axes):
        q_t = _rotation(0.0, q).T
        for a, theta in enumerate(angles_rad):
            ry = _rotation(float(theta))
            d = (ry @ q_t @ ry.T - np.eye(3)) / eps  # R Q^T = (I + d) Ry(theta)
            out[p, a] = np.linalg.lstsq(basis, d.reshape(-1), rcond=None)[0]
    return out


def remove_tilt_gauge(tilts: np.ndarray, angles_rad: np.ndarray) -> np.ndarray:
    """``tilts [n_angles, 3]`` with the mean ``t_y`` removed and the least-squares part along
    :func:`tilt_gauge_patterns` removed from ``(t_x, t_z)`` (fitted together with a constant
    axis tilt, which stays): the object is held in the orientation where the refined axis
    tilt varies least over the angles."""
    out = np.array(tilts, np.float64)
    out[:, 0] -= out[:, 0].mean()
    pat = tilt_gauge_patterns(np.asarray(angles_rad))[:, :, 1:]  # [2, A, 2]
    n = len(angles_rad)
    const = np.zeros((2, n, 2))
    const[0, :, 0] = const[1, :, 1] = 1.0
    design = np.concatenate([pat, const]).reshape(4, -1).T  # [2A, 4]
    coef = np.linalg.lstsq(design, out[:, 1:].reshape(-1), rcond=None)[0]
    out[:, 1:] -= (design[:, :2] @ coef[:2]).reshape(n, 2)
    return out


def remove_offset_gauge(offsets: np.ndarray, angles_rad: np.ndarray) -> np.ndarray:
    """``offsets [n_angles, 2]`` less what a shift of the object explains: a constant in y,
    and ``s_x cos(theta) - s_z sin(theta)`` plus a constant in x (a constant x offset is the
    rotation centre's, a rotating one the object's own position in x and z)."""
    out = np.array(offsets, np.float64)
    out[:, 0] -= out[:, 0].mean()
    th = np.asarray(angles_rad, np.float64)
    design = np.stack([np.ones_like(th), np.cos(th), np.sin(th)], 1)
    coef = np.linalg.lstsq(design, out[:, 1], rcond=None)[0]
    out[:, 1] -= design @ coef
    return out


@dataclass(frozen=True)
class Tomography:
    """The tomography forward model (one band of rows of one projection per engine tile).

    Attributes
    ----------
    geometry : VolumeGeometry
    det_shape : (int, int)
        The whole projection ``(det_y, det_x)``.
    band : int
        Rows per engine tile (the last band may reach past ``det_y``; those rows are masked).
    rotation_centre_px : float
        Start value of the detector column of the rotation axis.
    wavelength_m : float
    incident_photons : float
    distance_m : float or None
        Near-field propagation distance (None: pure projection).
    loss_kind : str
        ``lsq`` or ``poisson``.
    reach_px : int
        Halo rows read around each band.
    pad_px : int
        Fresnel window padding on every side of a band (rows and columns).
    max_tilt_rad, max_offset_px : float
        Limits of the refined tilts and offsets.
    mask : ndarray or None
        ``[det_y, det_x]`` detector mask (False = ignored).
    default_adam_step : float
        The object's Adam step (in beta) when ``optimizer.step_size`` is not given: a tenth
        of the mean beta along the longest chord that the densest projection implies.
    """

    geometry: VolumeGeometry
    det_shape: tuple[int, int]
    band: int
    rotation_centre_px: float
    wavelength_m: float
    incident_photons: float = 1.0
    distance_m: float | None = None
    loss_kind: str = "lsq"
    reach_px: int = 0
    pad_px: int = 0
    max_tilt_rad: float = DEFAULT_MAX_TILT_RAD
    max_offset_px: float = DEFAULT_MAX_OFFSET_PX
    mask: np.ndarray | None = None
    default_adam_step: float = 1e-8
    representation: str = "delta_beta"

    # cg: Adam's per-voxel normalised steps amplify noise in the poorly determined components
    # (a noisy Data Exchange set, 121 angles, 40 epochs: NRMSE 0.158 against FBP's 0.087;
    # cg 0.081, gd 0.080); cg converges fastest (10 epochs of a 32x48x48 set: 0.098, gd 0.20)
    default_optimizer = "cg"
    mix_angles = True  # a minibatch holds bands of several angles

    @property
    def pixel_size_m(self) -> float:
        return self.geometry.pixel_size_m

    @property
    def slice_thickness_m(self) -> float:
        return self.geometry.pixel_size_m

    @property
    def object_shape_px(self) -> tuple[int, int, int]:
        return self.geometry.volume

    @property
    def n_angles(self) -> int:
        return len(self.geometry.angles_rad)

    @property
    def n_bands(self) -> int:
        return math.ceil(self.det_shape[0] / self.band)

    @property
    def line_integral_fit(self) -> bool:
        return self.loss_kind == "lsq" and self.distance_m is None

    # -- parameters --------------------------------------------------------------------------
    def parameter_specs(self) -> dict[str, ParameterSpec]:
        return {
            # the engine's tiles: bands of rows, fixed
            "positions": ParameterSpec(
                "positions", "positions_px", ("angle", "tile", "yx"), "tile", "float64",
                unit="px", default_step=1.0, default_optimizer="gd", refinable=False,
            ),
            # damped Gauss-Newton steps (see curvature), each move capped at step_size
            # Adam from the first epoch: tilts refined after the object has formed stayed
            # where that object put them (60 angles, 1.5 degree axis tilt: 0.5 and 0.7
            # degrees after 25 epochs with gd from epoch 2; Adam 3 mrad from epoch 0 over
            # 360 degrees: 1.54 and 1.47)
            "tilts": ParameterSpec(
                "tilts", "tilts_rad", ("angle", "rot_axis"), "angle", "float64", unit="rad",
                default_step=3e-3, default_optimizer="adam", default_start_epoch=0,
                options={"max_tilt_rad": DEFAULT_MAX_TILT_RAD},
            ),
            "offsets": ParameterSpec(
                "offsets", "offsets_px", ("angle", "yx"), "angle", "float64", unit="px",
                default_step=0.5, default_optimizer="gd", default_start_epoch=2,
                default_newton_fraction=0.5, options={"max_offset_px": DEFAULT_MAX_OFFSET_PX},
            ),
            "rotation_centre": ParameterSpec(
                "rotation_centre", "rotation_centre_px", (), "global", "float64", unit="px",
                default_step=0.5, default_optimizer="gd", default_start_epoch=1,
                default_newton_fraction=0.5,
            ),
        }

    def initial_parameters(self, cfg, meas: Measurements) -> dict[str, np.ndarray]:
        return {
            "positions": np.asarray(meas.positions_px, np.float64),
            "tilts": np.zeros((self.n_angles, 3)),
            "offsets": np.zeros((self.n_angles, 2)),
            "rotation_centre": np.asarray(float(self.rotation_centre_px)),
        }

    def engine_measurements(self, meas: Measurements) -> Measurements:
        """Each projection as bands of ``band`` rows: tile ``b`` at object row ``b * band``."""
        det_y, det_x = self.det_shape
        n = self.n_bands
        pos = np.zeros((meas.n_angles, n, 2))
        pos[:, :, 0] = np.arange(n) * self.band
        if n == 1:
            return replace(meas, positions_px=pos)
        return replace(meas, source=replace(meas.source, split=(self.band, det_x, n, 1)),
                       n_tiles=n, det_shape=(self.band, det_x), positions_px=pos, mask=None)

    # -- physics -----------------------------------------------------------------------------
    def _lab_coordinates(self, params: dict[str, Tensor], batch: Batch, rows: np.ndarray
                         ) -> tuple[Tensor, Tensor]:
        """Lab ``y [G * hb]`` and ``x [w]`` of the (padded) band windows."""
        n_y = self.geometry.volume[0]
        p = self.pad_px
        off = params["offsets"]
        det_rows = torch.as_tensor((rows[:, None] + np.arange(-p, self.band + p)).reshape(-1),
                                   dtype=torch.float64)
        cols = torch.arange(-p, self.det_shape[1] + p, dtype=torch.float64)
        lab_y = det_rows - off[0] - (n_y - 1) / 2
        lab_x = cols - off[1] - params["rotation_centre"]
        return lab_y, lab_x

    def integrals(self, obj_box: Tensor, params: dict[str, Tensor], batch: Batch,
                  channels: slice = slice(None)) -> Tensor:
        """``[G, hb, w, C]`` line integrals of the ``channels`` of (delta, beta) over each
        band's window (rows ``band + 2 pad``, columns ``det_x + 2 pad``), in metres times the
        value."""
        rows = np.floor(params["positions"].detach().numpy()[:, 0]).astype(int)
        lab_y, lab_x = self._lab_coordinates(params, batch, rows)
        rot = self.geometry.rotations(batch.angle, params.get("tilts"), obj_box.dtype)
        out = self.geometry.line_integrals(obj_box[..., channels], batch.origin, rot, lab_y,
                                           lab_x)
        return out.reshape(len(rows), self.band + 2 * self.pad_px, *out.shape[1:])

    def _k(self) -> float:
        return 2 * math.pi / self.wavelength_m

    def predict(self, obj_box: Tensor, params: dict[str, Tensor], batch: Batch) -> Tensor:
        """Recorded intensities ``[G, band, det_x]``; see :class:`ForwardModel`."""
        k = self._k()
        if self.distance_m is None:
            beta = self.integrals(obj_box, params, batch, slice(1, 2))[..., 0]
            return self.incident_photons * torch.exp(-2 * k * beta)
        li = self.integrals(obj_box, params, batch)
        wave = math.sqrt(self.incident_photons) * torch.exp(torch.complex(-k * li[..., 1],
                                                                          -k * li[..., 0]))
        h = fresnel_transfer_function(
            wave.shape[-2:], pixel_size_m=self.pixel_size_m, wavelength_m=self.wavelength_m,
            distance_m=self.distance_m, dtype=wave.dtype,
        )
        p = self.pad_px
        far = torch.fft.ifft2(torch.fft.fft2(wave) * h)
        return abs_square(far[:, p : p + self.band, p : p + self.det_shape[1]])

    def tile_mask(self, tiles: np.ndarray) -> Tensor | None:
        """``[G, band, det_x]`` (or ``[det_y, det_x]``) bool: measured pixels."""
        if self.n_bands == 1:
            return None if self.mask is None else torch.as_tensor(self.mask)
        det_y, det_x = self.det_shape
        full = np.ones(self.det_shape, bool) if self.mask is None else np.asarray(self.mask, bool)
        padded = np.zeros((self.n_bands * self.band, det_x), bool)
        padded[:det_y] = full
        return torch.as_tensor(np.stack([padded[t * self.band : (t + 1) * self.band]
                                         for t in np.asarray(tiles) % self.n_bands]))

    def measured_line_integrals(self, meas: Tensor) -> Tensor:
        """``-ln(I / I0)`` of measured intensities, transmissions clipped at
        ``MIN_TRANSMISSION``."""
        t = torch.clamp(meas / self.incident_photons, min=MIN_TRANSMISSION)
        return -torch.log(t)

    def tile_losses(self, obj_box: Tensor, params: dict[str, Tensor], batch: Batch,
                    meas: Tensor) -> Tensor:
        """Per-tile loss ``[G]`` over each band's measured pixels."""
        mask = self.tile_mask(batch.tiles)
        if not self.line_integral_fit:
            return LOSSES[self.loss_kind](self.predict(obj_box, params, batch), meas, mask=mask)
        # beta alone: absorption does not see delta (whose gradient stays zero)
        od = 2 * self._k() * self.integrals(obj_box, params, batch, slice(1, 2))[..., 0]
        diff = od - self.measured_line_integrals(meas).to(od.dtype)
        sq = diff * diff
        if mask is None:
            return sq.mean(dim=(-2, -1))
        m = mask.to(sq.dtype)
        return (sq * m).sum(dim=(-2, -1)) / m.sum(dim=(-2, -1)).clamp(min=1.0)

    def _fitted(self, obj_box: Tensor, params: dict[str, Tensor], batch: Batch) -> Tensor:
        """What the loss compares, ``[G, band, det_x]``: optical densities (line-integral
        fit), amplitudes (lsq) or intensities (poisson)."""
        if self.line_integral_fit:
            return 2 * self._k() * self.integrals(obj_box, params, batch, slice(1, 2))[..., 0]
        pred = self.predict(obj_box, params, batch)
        return torch.sqrt(pred + 1e-12) if self.loss_kind == "lsq" else pred

    def curvature(self, obj_box: Tensor, params: dict[str, Tensor], batch: Batch,
                  names: frozenset[str] = frozenset(_STEPS)) -> dict[str, Tensor]:
        """Gauss-Newton curvature of the group's summed tile losses in each entry of the
        geometric parameters in ``names`` (tilts ``[3]``, offsets ``[2]``, rotation centre
        ``()``): ``sum_tiles c sum_pixels J^2 / n_pixels`` with ``J`` the derivative of what
        the loss compares, by central differences (2 forward passes per entry), ``c`` 2 for
        least squares, 1 for Poisson, which weights each pixel by ``1 / prediction``. With it ``gd`` takes
        damped Gauss-Newton steps, which shrink as the fit converges (Adam's do not: its
        per-angle tilts kept jittering by about its step)."""
        mask = self.tile_mask(batch.tiles)
        out = {}
        with torch.no_grad():
            base = self._fitted(obj_box, params, batch) if self.loss_kind == "poisson" else None
            weight = torch.ones((), dtype=obj_box.dtype) if mask is None else mask.to(obj_box.dtype)
            if base is not None:  # Poisson: d2/dp2 (p - m ln p) = 1 / p at a fit
                weight = weight / base.clamp(min=1e-6 * float(base.max()))
            n_pix = (torch.ones(self.band, self.det_shape[1]) * (torch.ones(()) if mask is None
                     else mask.to(obj_box.dtype))).sum(dim=(-2, -1)).clamp(min=1.0)
            for name in sorted(set(names) & set(_STEPS)):
                value = params[name].detach()
                flat = value.reshape(-1)
                entries = []
                for i in range(flat.numel()):
                    d = torch.zeros_like(flat)
                    d[i] = _STEPS[name]
                    hi = self._fitted(obj_box, {**params, name: (flat + d).reshape(value.shape)}, batch)
                    lo = self._fitted(obj_box, {**params, name: (flat - d).reshape(value.shape)}, batch)
                    jac = (hi - lo) / (2 * _STEPS[name])
                    per_tile = (jac * jac * weight).sum(dim=(-2, -1)) / n_pix
                    entries.append((1.0 if base is not None else 2.0) * per_tile.sum())
                out[name] = torch.stack(entries).reshape(value.shape).to(torch.float64)
        return out

    def loss(self, pred: Tensor, meas: Tensor) -> Tensor:
        if self.line_integral_fit:
            p = -torch.log(torch.clamp(pred / self.incident_photons, min=MIN_TRANSMISSION))
            d = p - self.measured_line_integrals(meas)
            return (d * d).mean(dim=(-2, -1))
        mask = None if self.mask is None or self.n_bands > 1 else torch.as_tensor(self.mask)
        return LOSSES[self.loss_kind](pred, meas, mask=mask)

    def object_curvature(self, params: dict[str, np.ndarray], n_tiles: int) -> float:
        """Largest curvature ``L`` of a minibatch's mean loss in one voxel value (the
        ``gd``/``momentum`` steps are ``step_size / L``): a ray sums ``n_ray`` voxels, so the
        data term's Hessian ``(2/n_pix) A^T A`` has norm about ``2 (2 k dz)^2 n_ray / n_pix``
        for line integrals (``I0 (k dz)^2`` in place of ``(2 k dz)^2`` for amplitudes; twice
        that for Poisson); the minibatch mean divides by the tiles and each voxel is seen by
        every tile, which cancels."""
        _, n_x, n_z = self.geometry.volume
        n_ray = math.hypot(n_x, n_z)
        n_pix = self.band * self.det_shape[1]
        kdz = self._k() * self.pixel_size_m
        if self.line_integral_fit:
            return 2 * (2 * kdz) ** 2 * n_ray / n_pix
        factor = 2.0 if self.loss_kind == "lsq" else 4.0
        return factor * self.incident_photons * kdz ** 2 * n_ray / n_pix

    def constrain_parameters(self, states: dict) -> dict:
        """After each step: what a shift or a re-orientation of the object explains is
        removed from the offsets and tilts (:func:`remove_offset_gauge`,
        :func:`remove_tilt_gauge`: their mean y offset and mean ``t_y`` are zero), offsets and
        tilts stay within their limits, and the rotation axis on the detector."""
        from adorym_dask.optimizers import ParameterState

        out = dict(states)
        angles = np.asarray(self.geometry.angles_rad)
        if "offsets" in out:
            ps = out["offsets"]
            v = remove_offset_gauge(ps.value, angles)
            out["offsets"] = ParameterState(np.clip(v, -self.max_offset_px, self.max_offset_px),
                                            ps.state, ps.step)
        if "tilts" in out:
            ps = out["tilts"]
            v = remove_tilt_gauge(ps.value, angles)
            v[:, 1:] = np.clip(v[:, 1:], -self.max_tilt_rad, self.max_tilt_rad)
            out["tilts"] = ParameterState(v, ps.state, ps.step)
        if "rotation_centre" in out:
            ps = out["rotation_centre"]
            v = np.clip(ps.value, 0.0, self.det_shape[1] - 1.0)
            out["rotation_centre"] = ParameterState(v, ps.state, ps.step)
        return out


# -- building ------------------------------------------------------------------------------
def file_value(meas: Measurements, name: str) -> np.ndarray | None:
    """A dataset or root attribute ``name`` of a native measurement file, or None."""
    src = meas.source
    if src.fmt not in ("native_h5", "native_zarr"):
        return None
    if src.fmt == "native_h5":
        import h5py

        with h5py.File(src.path, "r") as f:
            if name in f:
                return np.asarray(f[name][()])
            return None if name not in f.attrs else np.asarray(f.attrs[name])
    import zarr

    g = zarr.open_group(src.path, mode="r")
    if name in g:
        return np.asarray(g[name][...])
    return None if name not in g.attrs else np.asarray(g.attrs[name])


def rotation_centre(cfg, meas: Measurements) -> float:
    """``model.rotation_centre_px``, ``'auto'`` (two opposite projections), the file's
    ``rotation_centre_px``, or the detector's middle column."""
    given = cfg.model.rotation_centre_px
    det_x = meas.det_shape[1]
    if given == "auto":
        from adorym_dask.centre import find_rotation_centre, opposite_pair

        pair = opposite_pair(meas.angles_rad)
        if pair is None:  # e.g. 181 angles written as 0 .. 179 degrees: the nearest pair
            step = float(np.median(np.diff(np.sort(meas.angles_rad)))) if meas.n_angles > 1 else 0
            pair = opposite_pair(meas.angles_rad, tolerance_rad=1.01 * step)
            if pair is not None:
                gap = math.degrees(abs(meas.angles_rad[pair[1]] - meas.angles_rad[pair[0]]))
                log.warning("model.rotation_centre_px auto: no two projections are 180 degrees "
                            "apart; using angles %d and %d, %.3f degrees apart (refine it with "
                            "refine.rotation_centre if the result looks doubled)", *pair, gap)
        if pair is None:
            raise ConfigError("model.rotation_centre_px: auto needs two projections 180 "
                              "degrees apart; give the axis column instead")
        p0, p1 = (read_tiles(meas.source, i, np.arange(1))[0] for i in pair)
        centre = float(find_rotation_centre(p0, p1))
        log.info("rotation centre found at detector column %.2f (angles %d and %d)", centre,
                 *pair)
        return centre
    if given is not None:
        return float(given)
    stored = file_value(meas, "rotation_centre_px")
    return float(stored) if stored is not None else (det_x - 1) / 2


def check_tomography_data(meas: Measurements) -> None:
    if meas.n_tiles != 1:
        raise MeasurementError(
            f"intensities: tomography expects [n_angles, 1, det_y, det_x] (one full-field "
            f"projection per angle); {meas.source.path} has {meas.n_tiles} tiles per angle"
        )
    if meas.angles_rad is None:
        raise MeasurementError(f"angles_rad is missing in {meas.source.path}: tomography "
                               "needs the rotation angle of every projection (radians)")
    if not np.all(np.isfinite(meas.angles_rad)):
        raise MeasurementError(f"angles_rad in {meas.source.path} holds NaN or inf values")


def adam_step(meas: Measurements, wavelength_m: float, chord_px: float,
              incident_photons: float) -> float:
    """A tenth of the mean beta along a chord of ``chord_px`` that the densest of a few
    projections implies (``-ln(I / I0) = 2 k beta L``)."""
    idx = np.unique(np.linspace(0, meas.n_angles - 1, 4).astype(int))
    od = 0.0
    for a in idx:
        t = np.clip(read_tiles(meas.source, int(a), np.arange(1)) / incident_photons,
                    MIN_TRANSMISSION, None)
        od = max(od, float(np.percentile(-np.log(t), 99.5)))
    k = 2 * math.pi / wavelength_m
    return 0.1 * max(od, 1e-3) / (2 * k * chord_px * meas.pixel_size_m)


def build_tomography(cfg, meas: Measurements) -> Tomography:
    """The model of ``cfg.model`` (a :class:`~adorym_dask.config.TomographyConfig`)."""
    m = cfg.model
    check_tomography_data(meas)
    if cfg.object.representation.value != "delta_beta":
        raise ConfigError("tomography reconstructs delta and beta: set object.representation: "
                          "delta_beta")
    det_y, det_x = meas.det_shape
    n_z = m.n_z or det_x
    volume = (det_y, det_x, n_z)
    centre = rotation_centre(cfg, meas)
    refine = {k for k, v in cfg.refine.items() if v is not None}
    if "positions" in refine:
        raise ConfigError("refine.positions: tomography refines per-angle offsets "
                          "(refine.offsets), tilts and the rotation centre; remove it")
    if "probe" in refine:
        raise ConfigError("refine.probe: tomography has no probe (a plane wave of "
                          "incident_photons); remove it")
    opts = {k: (cfg.refine[k].options() if k in refine else {}) for k in ("tilts", "offsets")}
    max_tilt = float(opts["tilts"].get("max_tilt_rad", DEFAULT_MAX_TILT_RAD))
    max_offset = float(opts["offsets"].get("max_offset_px", DEFAULT_MAX_OFFSET_PX))
    distance = None if meas.distances_m is None else float(np.mean(meas.distances_m))
    pad = 0
    if distance is not None:
        spread = meas.wavelength_m * distance / (2 * meas.pixel_size_m ** 2)
        pad = int(math.ceil(m.halo_factor * spread))
    band = min(m.tile_px, det_y)
    band = math.ceil(det_y / math.ceil(det_y / band))  # bands as even as possible
    reach = pad
    if "tilts" in refine:
        reach += tilt_halo_px(volume, det_x, centre, max_tilt)
    if "offsets" in refine:
        reach += int(math.ceil(max_offset)) + 1
    bright = float(np.percentile(read_tiles(meas.source, 0, np.arange(1)), 99.5))
    if not 0.5 < bright / meas.incident_photons < 2.0:
        log.warning(
            "incident_photons is %g but the brightest pixels of projection 1 read %.4g: the "
            "bare beam should read about incident_photons (absorption only lowers it). Set the "
            "file's attribute incident_photons to the bare beam's counts per pixel",
            meas.incident_photons, bright)
    k_chord = min(det_x, n_z) / 2
    model = Tomography(
        geometry=VolumeGeometry(volume, tuple(float(a) for a in meas.angles_rad),
                                meas.pixel_size_m),
        det_shape=(det_y, det_x), band=band, rotation_centre_px=centre,
        wavelength_m=meas.wavelength_m, incident_photons=meas.incident_photons,
        distance_m=distance, loss_kind=m.loss.value, reach_px=reach, pad_px=pad,
        max_tilt_rad=max_tilt, max_offset_px=max_offset, mask=meas.mask,
        default_adam_step=adam_step(meas, meas.wavelength_m, k_chord, meas.incident_photons),
    )
    log.info("tomography: %d angles, volume %s (y, x, z), bands of %d rows, halo %d rows, "
             "rotation centre column %.2f%s", model.n_angles, volume, band, reach, centre,
             "" if distance is None else f", propagation {distance:.4g} m")
    return model
