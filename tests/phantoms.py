"""Analytic ellipsoid phantoms, exact projections and a reference FBP for the tests.

Geometry (the package's contract, everything in voxel units)
-------------------------------------------------------------
* A volume is ``[n_y, n_x, n_z]``; voxel ``(i, j, k)`` sits at material
  coordinates ``(y, x, z) = (i - (n_y-1)/2, j - (n_x-1)/2, k - (n_z-1)/2)``.
* The beam runs along +z. At angle ``theta`` a material point ``(x, z)`` moves
  to ``(x cos theta - z sin theta, x sin theta + z cos theta)`` (rotation about
  y, y unchanged), then the projection integrates along lab z.
* Detector image ``[n_det_y, n_det_x]``: row ``u`` at lab ``y = u - (n_y-1)/2``,
  column ``v`` at lab ``x = v - c`` with ``c`` the rotation-centre column
  (default ``(n_det_x - 1)/2``).
* Hence the lab point ``(x_l, z_l)`` sees the material point
  ``x = x_l cos theta + z_l sin theta``, ``z = -x_l sin theta + z_l cos theta``,
  and a material point ``(x, z)`` lands on column ``c + x cos theta - z sin theta``.

This module does not use any projector of the package: the projections are
closed-form chord lengths, the reconstruction is :func:`skimage.transform.iradon`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage
from skimage.transform import iradon

#: Wavelength (m) and voxel / pixel size (m) of the default hard-X-ray setting.
WAVELENGTH_M = 1e-10
PIXEL_M = 1e-6


def attenuation_per_beta_voxel(wavelength_m: float = WAVELENGTH_M, pixel_m: float = PIXEL_M) -> float:
    """Factor ``2 k * pixel`` turning a line integral of beta (voxel units) into ``-log T``.

    Parameters
    ----------
    wavelength_m, pixel_m : float
        Wavelength and voxel size in metres.

    Returns
    -------
    float
        ``4 pi pixel / wavelength`` (about 1.26e5 for 0.1 nm and 1 um).
    """
    return 4.0 * np.pi * pixel_m / wavelength_m


@dataclass(frozen=True)
class Ellipsoid:
    """A homogeneous ellipsoid, all lengths in voxels.

    Attributes
    ----------
    centre : tuple of float
        ``(y, x, z)`` of the centre relative to the volume centre.
    semi_axes : tuple of float
        ``(a_y, a_x, a_z)`` in the ellipsoid's own frame.
    phi : float
        Rotation (rad) of the ellipsoid about y, in the contract's sense: the
        body's ``a_x`` axis points along ``(x, z) = (cos phi, sin phi)`` and its
        ``a_z`` axis along ``(-sin phi, cos phi)``.
    value : float
        Added (e.g. beta) wherever a point is inside.
    """

    centre: tuple[float, float, float]
    semi_axes: tuple[float, float, float]
    phi: float = 0.0
    value: float = 1.0

    def body_coords(
        self, y: np.ndarray, x: np.ndarray, z: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Material offsets to the body frame, scaled by the semi-axes.

        Parameters
        ----------
        y, x, z : ndarray
            Broadcastable material coordinates (voxels).

        Returns
        -------
        tuple of ndarray
            ``(y_b / a_y, x_b / a_x, z_b / a_z)``; the point is inside iff the
            sum of their squares is ``<= 1``.
        """
        dy = np.asarray(y, dtype=float) - self.centre[0]
        dx = np.asarray(x, dtype=float) - self.centre[1]
        dz = np.asarray(z, dtype=float) - self.centre[2]
        cp, sp = np.cos(self.phi), np.sin(self.phi)
        xb = dx * cp + dz * sp
        zb = -dx * sp + dz * cp
        ay, ax, az = self.semi_axes
        return dy / ay, xb / ax, zb / az

    def contains(self, y: np.ndarray, x: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Indicator at material points ``(y, x, z)`` (broadcastable, voxels).

        Returns a bool array of the inputs' broadcast shape.
        """
        qy, qx, qz = self.body_coords(y, x, z)
        return qy * qy + qx * qx + qz * qz <= 1.0

    def half_widths_xz(self) -> tuple[float, float]:
        """Half extents of the rotated ellipsoid along material x and z."""
        _, ax, az = self.semi_axes
        cp, sp = np.cos(self.phi), np.sin(self.phi)
        return float(np.hypot(ax * cp, az * sp)), float(np.hypot(ax * sp, az * cp))


# --------------------------------------------------------------------------- phantom


def _axis_coords(n: int) -> np.ndarray:
    """Material coordinates ``index - (n-1)/2`` of ``n`` voxels, shape ``[n]``."""
    return np.arange(n, dtype=float) - (n - 1) / 2.0


def _index_range(centre: float, half: float, n: int) -> tuple[int, int]:
    """Voxel index range ``[lo, hi)`` whose voxels may overlap ``centre +- half``."""
    offset = (n - 1) / 2.0
    lo = int(np.floor(centre - half + offset - 0.5))
    hi = int(np.ceil(centre + half + offset + 0.5)) + 1
    return max(lo, 0), min(hi, n)


def _subsample_coords(coords: np.ndarray, supersample: int) -> np.ndarray:
    """Sub-voxel sample points, shape ``[len(coords) * supersample]`` (voxel-major)."""
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    return (coords[:, None] + offsets[None, :]).ravel()


def _ellipsoid_fraction(
    e: Ellipsoid, shape: tuple[int, int, int], supersample: int
) -> tuple[tuple[slice, slice, slice], np.ndarray]:
    """Fraction of each voxel inside ``e``, over the ellipsoid's bounding box.

    Exact along y (overlap of the voxel's y extent with the chord), sampled on a
    ``supersample x supersample`` grid in (x, z).

    Returns
    -------
    box : tuple of slice
        Where the fractions go in the ``[n_y, n_x, n_z]`` volume.
    frac : ndarray
        Fractions in ``[0, 1]``, shape of the box.
    """
    n_y, n_x, n_z = shape
    wx, wz = e.half_widths_xz()
    iy = _index_range(e.centre[0], e.semi_axes[0], n_y)
    jx = _index_range(e.centre[1], wx, n_x)
    kz = _index_range(e.centre[2], wz, n_z)
    box = (slice(*iy), slice(*jx), slice(*kz))
    if iy[0] >= iy[1] or jx[0] >= jx[1] or kz[0] >= kz[1]:
        return box, np.zeros((0, 0, 0))
    xs = _subsample_coords(_axis_coords(n_x)[slice(*jx)], supersample)
    zs = _subsample_coords(_axis_coords(n_z)[slice(*kz)], supersample)
    _, qx, qz = e.body_coords(e.centre[0], xs[:, None], zs[None, :])
    half_y = e.semi_axes[0] * np.sqrt(np.clip(1.0 - qx * qx - qz * qz, 0.0, None))
    y = _axis_coords(n_y)[slice(*iy)][:, None, None]
    top = np.minimum(y + 0.5, e.centre[0] + half_y[None])
    bottom = np.maximum(y - 0.5, e.centre[0] - half_y[None])
    overlap = np.clip(top - bottom, 0.0, 1.0)
    ni, nj, nk = overlap.shape[0], jx[1] - jx[0], kz[1] - kz[0]
    frac = overlap.reshape(ni, nj, supersample, nk, supersample).mean(axis=(2, 4))
    return box, frac


def ellipsoid_phantom(
    shape: tuple[int, int, int], ellipsoids: Sequence[Ellipsoid], *, supersample: int = 4
) -> np.ndarray:
    """Voxelise ellipsoids as voxel averages (values add where they overlap).

    Parameters
    ----------
    shape : tuple of int
        ``(n_y, n_x, n_z)``.
    ellipsoids : sequence of Ellipsoid
        Centres relative to the volume centre, in voxels.
    supersample : int
        Sub-samples per voxel along x and along z; the y average is exact.

    Returns
    -------
    ndarray
        float64 ``[n_y, n_x, n_z]``.
    """
    vol = np.zeros(shape, dtype=np.float64)
    for e in ellipsoids:
        box, frac = _ellipsoid_fraction(e, shape, supersample)
        if frac.size:
            vol[box] += e.value * frac
    return vol


# ---------------------------------------------------------------- analytic projections


def _chord_lengths(
    e: Ellipsoid, angles: np.ndarray, y_lab: np.ndarray, x_lab: np.ndarray
) -> np.ndarray:
    """Chord of each ray through ``e``, shape ``[n_angles, n_rows, n_cols]``.

    The ray of lab ``(y_l, x_l)`` at angle theta is ``P0 + s D`` in material
    coordinates with ``P0 = (y_l, x_l cos, -x_l sin)`` and unit ``D = (0, sin, cos)``.
    In the scaled body frame ``|m + s w|^2 = 1`` is ``A s^2 + B s + C = 0``; the
    chord is ``(s_2 - s_1) |D| = sqrt(B^2 - 4 A C) / A``.
    """
    th = angles[:, None, None]
    yl = y_lab[None, :, None]
    xl = x_lab[None, None, :]
    cos_t, sin_t = np.cos(th), np.sin(th)
    my, mx, mz = e.body_coords(yl, xl * cos_t, -xl * sin_t)
    # Direction in the scaled body frame (a direction, so no centre offset).
    cp, sp = np.cos(e.phi), np.sin(e.phi)
    _, ax, az = e.semi_axes
    wx = (sin_t * cp + cos_t * sp) / ax
    wz = (-sin_t * sp + cos_t * cp) / az
    a = wx * wx + wz * wz
    b = 2.0 * (mx * wx + mz * wz)
    c = my * my + mx * mx + mz * mz - 1.0
    disc = b * b - 4.0 * a * c
    return np.sqrt(np.clip(disc, 0.0, None)) / a


def ellipsoid_projections(
    ellipsoids: Sequence[Ellipsoid],
    angles_rad: np.ndarray,
    det_shape: tuple[int, int],
    *,
    rotation_centre_px: float | None = None,
    n_y: int | None = None,
) -> np.ndarray:
    """Exact line integrals ``sum_e value_e * chord_e`` through pixel centres.

    The rays are point samples at the detector pixel centres of the *analytic*
    ellipsoids; the voxelised :func:`ellipsoid_phantom` differs from them by
    partial-volume effects at the edges. Multiply by the pixel size outside.

    Parameters
    ----------
    ellipsoids : sequence of Ellipsoid
    angles_rad : ndarray
        ``[n_angles]`` rotation angles (rad).
    det_shape : tuple of int
        ``(n_det_y, n_det_x)``.
    rotation_centre_px : float, optional
        Column ``c`` of the rotation axis; default ``(n_det_x - 1) / 2``.
    n_y : int, optional
        Rows of the volume the row coordinate refers to (row ``u`` at
        ``y = u - (n_y-1)/2``); default ``n_det_y``.

    Returns
    -------
    ndarray
        float64 ``[n_angles, n_det_y, n_det_x]`` in value * voxels.
    """
    n_det_y, n_det_x = det_shape
    n_y = n_det_y if n_y is None else n_y
    c = (n_det_x - 1) / 2.0 if rotation_centre_px is None else float(rotation_centre_px)
    angles = np.atleast_1d(np.asarray(angles_rad, dtype=float))
    y_lab = np.arange(n_det_y, dtype=float) - (n_y - 1) / 2.0
    x_lab = np.arange(n_det_x, dtype=float) - c
    out = np.zeros((angles.size, n_det_y, n_det_x), dtype=np.float64)
    for e in ellipsoids:
        out += e.value * _chord_lengths(e, angles, y_lab, x_lab)
    return out


# --------------------------------------------------------------------- default phantom


def _relative_phantom(n: int) -> list[Ellipsoid]:
    """Shepp-Logan-like ellipsoids with relative values (outer shell = 1)."""
    s = float(n)
    small = float(np.clip(0.045 * n, 2.0, 4.0))  # radius of the small features, voxels
    d = np.deg2rad
    return [
        # skull and brain: elliptic in (x, z), so not symmetric about y
        Ellipsoid((0.0, 0.0, 0.0), (0.42 * s, 0.40 * s, 0.33 * s), d(8.0), 1.0),
        Ellipsoid((0.0, 0.0, 0.0), (0.38 * s, 0.355 * s, 0.285 * s), d(8.0), -0.7),
        # tilted ventricles
        Ellipsoid((0.02 * s, 0.10 * s, 0.03 * s), (0.20 * s, 0.05 * s, 0.12 * s), d(-20.0), -0.15),
        Ellipsoid((-0.03 * s, -0.10 * s, -0.02 * s), (0.18 * s, 0.07 * s, 0.14 * s), d(18.0), -0.15),
        # a larger off-centre blob overlapping the right ventricle
        Ellipsoid((0.10 * s, 0.12 * s, -0.12 * s), (0.09 * s, 0.08 * s, 0.05 * s), d(35.0), 0.35),
        # small features, two of them overlapping each other
        Ellipsoid((-0.20 * s, 0.0, 0.18 * s), (small, small, 0.7 * small), d(25.0), 0.5),
        Ellipsoid((-0.18 * s, 0.03 * s, 0.20 * s), (0.8 * small, 1.3 * small, 0.8 * small), d(60.0), 0.3),
        Ellipsoid((0.25 * s, -0.15 * s, 0.10 * s), (small, 0.6 * small, small), d(-40.0), 0.6),
        Ellipsoid((0.05 * s, -0.02 * s, -0.20 * s), (1.5 * small, 0.8 * small, 1.2 * small), d(10.0), 0.4),
    ]


def default_phantom(
    n: int,
    *,
    max_attenuation: float = 1.6,
    wavelength_m: float = WAVELENGTH_M,
    pixel_m: float = PIXEL_M,
) -> list[Ellipsoid]:
    """A 3-D Shepp-Logan-like phantom for an ``n^3`` volume, values in beta.

    Nine ellipsoids inside a central cylinder of radius ``0.42 n`` (about y):
    a rotated elliptic shell, two tilted ventricles, an off-centre blob
    overlapping one of them and four small features (radius ``clip(0.045 n, 2,
    4)`` voxels), two of which overlap. None is symmetric about the y axis.

    Parameters
    ----------
    n : int
        Edge of the volume in voxels.
    max_attenuation : float
        Target of ``max 2 k beta L`` over the projections (transmissions down
        to ``exp(-max_attenuation)``, ~0.2 by default).
    wavelength_m, pixel_m : float
        Setting used to scale beta (about 1e-7 for n = 64 by default).

    Returns
    -------
    list of Ellipsoid
    """
    rel = _relative_phantom(n)
    angles = np.linspace(0.0, np.pi, 24, endpoint=False)
    peak = ellipsoid_projections(rel, angles, (n, n)).max()
    scale = max_attenuation / (peak * attenuation_per_beta_voxel(wavelength_m, pixel_m))
    return [Ellipsoid(e.centre, e.semi_axes, e.phi, e.value * scale) for e in rel]


def noisy_line_integrals(
    line_integrals: np.ndarray,
    *,
    incident: float,
    rng: np.random.Generator,
    wavelength_m: float = WAVELENGTH_M,
    pixel_m: float = PIXEL_M,
) -> np.ndarray:
    """Poisson-noisy line integrals of beta (voxel units).

    ``I = Poisson(I0 exp(-2 k beta L))`` then ``-log(max(I, 1) / I0)``, divided
    back by ``2 k * pixel``.

    Parameters
    ----------
    line_integrals : ndarray
        Noise-free line integrals of beta, any shape (e.g. ``[n_angles, n_y, n_det_x]``).
    incident : float
        Photons per pixel, ``I0``.
    rng : numpy.random.Generator
    wavelength_m, pixel_m : float

    Returns
    -------
    ndarray
        Same shape, float64.
    """
    factor = attenuation_per_beta_voxel(wavelength_m, pixel_m)
    counts = rng.poisson(incident * np.exp(-factor * np.asarray(line_integrals)))
    return -np.log(np.maximum(counts, 1) / incident) / factor


# ------------------------------------------------------------------------------ metrics


def central_cylinder(
    shape: tuple[int, int, int], radius_fraction: float = 0.45, *, end_rows: int = 2
) -> np.ndarray:
    """Cylinder about y of radius ``radius_fraction * min(n_x, n_z)``.

    Parameters
    ----------
    shape : tuple of int
        ``(n_y, n_x, n_z)``.
    radius_fraction : float
    end_rows : int
        Rows left out at each end of y.

    Returns
    -------
    ndarray of bool
        ``[n_y, n_x, n_z]``.
    """
    n_y, n_x, n_z = shape
    r = radius_fraction * min(n_x, n_z)
    x = _axis_coords(n_x)[:, None]
    z = _axis_coords(n_z)[None, :]
    disc = x * x + z * z <= r * r
    rows = np.zeros(n_y, dtype=bool)
    rows[end_rows : n_y - end_rows] = True
    return rows[:, None, None] & disc[None, :, :]


def nrmse(rec: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """``sqrt(mean((rec - truth)^2)) / sqrt(mean(truth^2))`` over ``mask``.

    Parameters
    ----------
    rec, truth : ndarray
        Same shape, e.g. ``[n_y, n_x, n_z]``.
    mask : ndarray of bool
        Same shape.

    Returns
    -------
    float
    """
    r = np.asarray(rec, dtype=float)[mask]
    t = np.asarray(truth, dtype=float)[mask]
    return float(np.sqrt(np.mean((r - t) ** 2)) / np.sqrt(np.mean(t * t)))


# ---------------------------------------------------------------------------------- FBP


def _shift_rows(rows: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Shift each ``rows[a]`` along its last axis by ``shifts[a]`` pixels.

    ``out[a, ..., s] = rows[a, ..., s - shifts[a]]`` (the :func:`scipy.ndimage.shift`
    sense), cubic-spline interpolation, zeros outside (the caller pads).

    Parameters
    ----------
    rows : ndarray
        ``[n_angles, n_y, n]``.
    shifts : ndarray
        ``[n_angles]``.

    Returns
    -------
    ndarray
        ``[n_angles, n_y, n]``.
    """
    out = np.empty_like(rows)
    for a, d in enumerate(shifts):
        out[a] = ndimage.shift(rows[a], (0.0, float(d)), order=3, mode="constant")
    return out


def _iradon_grid(n_x: int, n_z: int) -> tuple[int, int, int, float, float]:
    """Output size ``M`` of iradon, crop origins ``(j0, k0)`` and grid offsets ``(o_x, o_z)``.

    iradon's output pixel ``(r, col)`` sits at ``(r - M//2, col - M//2)``; our
    voxel ``(j, k)`` is output pixel ``(k + k0, j + j0)`` and there the iradon
    coordinates are ``(z + o_z, x + o_x)``, with ``o`` 0 or 1/2.
    """
    m = max(n_x, n_z) + 2
    radius = m // 2
    j0 = radius - (n_x - 1) // 2
    k0 = radius - (n_z - 1) // 2
    return m, j0, k0, j0 + (n_x - 1) / 2.0 - radius, k0 + (n_z - 1) / 2.0 - radius


def fbp(
    projections: np.ndarray,
    angles_rad: np.ndarray,
    *,
    rotation_centre_px: float | None = None,
    n_x: int | None = None,
    n_z: int | None = None,
    filter_name: str = "ramp",
    interpolation: str = "linear",
) -> np.ndarray:
    """Filtered back-projection, slice by slice, with :func:`skimage.transform.iradon`.

    Mapping to skimage (``circle=False``): iradon back-projects detector bin
    ``s`` of an ``N``-bin sinogram column to the points where
    ``col' cos(a) - row' sin(a) = s - N // 2``, ``(row', col')`` being output
    pixel offsets from ``M // 2``. With ``a = theta``, ``col' <-> x`` and
    ``row' <-> z`` this is our ``v - c = x cos theta - z sin theta``, so the
    output image is ``[z, x]`` (transposed to our ``[x, z]``). The remaining
    sub-pixel offsets (our centre ``c`` vs ``N // 2``, our voxel grid
    ``index - (n-1)/2`` vs iradon's ``index - M // 2``) are folded into a
    per-angle detector shift ``d = N//2 - c + o_x cos theta - o_z sin theta``
    (cubic-spline interpolation on a zero-padded detector).

    iradon's normalisation ``pi / (2 n_angles)`` (with its ``2|f|`` filter) is
    right for angles uniformly spaced over 180 or over 360 degrees.

    Parameters
    ----------
    projections : ndarray
        Line integrals ``[n_angles, n_y, n_det_x]`` (value * voxels).
    angles_rad : ndarray
        ``[n_angles]`` (rad), uniformly covering ``[0, pi)`` or ``[0, 2 pi)``.
    rotation_centre_px : float, optional
        Column of the rotation axis; default ``(n_det_x - 1) / 2``.
    n_x, n_z : int, optional
        Output size; default ``n_det_x`` and ``n_x``.
    filter_name : str
        iradon filter: 'ramp', 'shepp-logan', 'cosine', 'hamming', 'hann'.
    interpolation : str
        iradon interpolation: 'linear', 'nearest', 'cubic'.

    Returns
    -------
    ndarray
        float64 ``[n_y, n_x, n_z]``.
    """
    proj = np.asarray(projections, dtype=np.float64)
    n_angles, n_y, n_det = proj.shape
    angles = np.asarray(angles_rad, dtype=float)
    c = (n_det - 1) / 2.0 if rotation_centre_px is None else float(rotation_centre_px)
    n_x = n_det if n_x is None else n_x
    n_z = n_x if n_z is None else n_z
    m, j0, k0, o_x, o_z = _iradon_grid(n_x, n_z)
    shifts = n_det // 2 - c + o_x * np.cos(angles) - o_z * np.sin(angles)
    pad = int(np.ceil(np.abs(shifts).max())) + 8
    padded = np.pad(proj, ((0, 0), (0, 0), (pad, pad)))  # N//2 and c both move by pad
    sino = _shift_rows(padded, shifts)
    theta_deg = np.rad2deg(angles)
    out = np.empty((n_y, n_x, n_z), dtype=np.float64)
    for i in range(n_y):
        img = iradon(
            sino[:, i, :].T,
            theta=theta_deg,
            output_size=m,
            filter_name=filter_name,
            interpolation=interpolation,
            circle=False,
        )
        out[i] = img[k0 : k0 + n_z, j0 : j0 + n_x].T
    return out


def best_fbp(
    projections: np.ndarray,
    angles_rad: np.ndarray,
    truth: np.ndarray,
    mask: np.ndarray,
    *,
    rotation_centre_px: float | None = None,
    filters: Sequence[str] = ("ramp", "shepp-logan"),
) -> tuple[np.ndarray, str, float]:
    """The FBP (over ``filters``) with the lowest NRMSE against ``truth`` on ``mask``.

    Parameters
    ----------
    projections : ndarray
        ``[n_angles, n_y, n_det_x]`` line integrals.
    angles_rad : ndarray
        ``[n_angles]``.
    truth : ndarray
        ``[n_y, n_x, n_z]``; sets the output size.
    mask : ndarray of bool
        ``[n_y, n_x, n_z]``.
    rotation_centre_px : float, optional
    filters : sequence of str

    Returns
    -------
    rec : ndarray
        ``[n_y, n_x, n_z]``.
    filter_name : str
    error : float
        Its NRMSE.
    """
    _, n_x, n_z = truth.shape
    best: tuple[np.ndarray, str, float] | None = None
    for name in filters:
        rec = fbp(
            projections, angles_rad, rotation_centre_px=rotation_centre_px,
            n_x=n_x, n_z=n_z, filter_name=name,
        )
        err = nrmse(rec, truth, mask)
        if best is None or err < best[2]:
            best = (rec, name, err)
    assert best is not None, "no filter given"
    return best
