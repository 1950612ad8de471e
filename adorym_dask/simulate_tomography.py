"""Synthetic tomography data sets with ground truth: a volume of random ellipsoids (beta, and
delta = ``delta_per_beta`` times it), projected with optional tilts of the rotation axis,
per-angle offsets, an off-centre axis, near-field propagation and Poisson noise.

The volume is made and projected on a grid twice as fine as the detector's (rays every half
pixel, voxels of half a pixel), then binned 2 x 2, so the data do not come from the
reconstruction's own discretisation. The truth (``beta`` and ``delta`` at the detector's
resolution, the tilts, offsets and rotation centre) is under ``ground_truth/``.

Command line: ``adorym-dask simulate tomography OUT.h5 [options]``.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from adorym_dask.physics.rotation import lab_z_samples, project, rotation_matrices
from adorym_dask.storage.measurements import write_measurements

__all__ = ["TomographySimulation", "random_ellipsoid_volume", "simulate_tomography",
           "add_tomography_arguments"]

HC_EV_M = 1.239841984e-6
FINE = 2  # the simulation's grid is this much finer than the detector's


@dataclass
class TomographySimulation:
    """What :func:`simulate_tomography` wrote."""

    path: str
    beta: np.ndarray  # [n_y, n_x, n_z] at the detector's resolution
    angles_rad: np.ndarray
    tilts_rad: np.ndarray  # [n_angles, 3] (t_y, t_x, t_z)
    offsets_px: np.ndarray  # [n_angles, 2]
    rotation_centre_px: float
    intensities: np.ndarray  # [n_angles, det_y, det_x]


def random_ellipsoid_volume(shape: tuple[int, int, int], n_features: int,
                            rng: np.random.Generator) -> np.ndarray:
    """``[n_y, n_x, n_z]`` values in ``[0, 1]``: a large body (0.3) with ``n_features``
    random ellipsoids inside (0.2 .. 1.0), all within a cylinder of radius 0.45 n_x about y."""
    n_y, n_x, n_z = shape
    y, x, z = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in shape), indexing="ij")
    r = 0.45 * min(n_x, n_z)
    vol = 0.3 * (((x / (0.9 * r)) ** 2 + (z / (0.8 * r)) ** 2 + (y / (0.45 * n_y)) ** 2) <= 1)
    for _ in range(n_features):
        rad = rng.uniform(0.05, 0.3) * r
        ax = rad * rng.uniform(0.5, 1.5, 3)
        ang = rng.uniform(0, 2 * np.pi)
        rho = rng.uniform(0, 0.8 * r - rad)
        cx, cz = rho * math.cos(ang), rho * math.sin(ang)
        cy = rng.uniform(-0.4, 0.4) * n_y
        phi = rng.uniform(0, np.pi)
        u = (x - cx) * math.cos(phi) - (z - cz) * math.sin(phi)
        w = (x - cx) * math.sin(phi) + (z - cz) * math.cos(phi)
        inside = ((y - cy) / ax[0]) ** 2 + (u / ax[1]) ** 2 + (w / ax[2]) ** 2 <= 1
        vol[inside] = rng.uniform(0.2, 1.0)
    return vol


def _project_fine(fine: np.ndarray, angles: np.ndarray, tilts: np.ndarray,
                  offsets: np.ndarray, centre_px: float, det: tuple[int, int], *,
                  progress: bool = False) -> np.ndarray:
    """``[n_angles, det_y, det_x]`` line integrals (pixel units) of the fine volume: rays at
    every half pixel, binned 2 x 2; ``progress`` shows a bar over the angles."""
    vol = torch.as_tensor(fine[..., None], dtype=torch.float64)
    n_y, n_x, n_z = (s // FINE for s in fine.shape)
    dy, dx = det
    sub = (np.arange(FINE) + 0.5) / FINE - 0.5  # ray offsets inside a pixel
    rows = (np.arange(dy)[:, None] + sub).reshape(-1) - (n_y - 1) / 2
    cols = np.arange(dx)[:, None] + sub
    lab_z = lab_z_samples(fine.shape[1], fine.shape[2], dtype=torch.float64)
    centre = tuple((s - 1) / 2 for s in fine.shape)
    out = np.empty((len(angles), dy, dx))
    for a in tqdm(range(len(angles)), desc="simulating projections", unit="angle",
                  disable=not progress):
        rot = rotation_matrices(torch.tensor([angles[a]]), torch.as_tensor(tilts[a : a + 1]))
        lab_y = torch.as_tensor((rows - offsets[a, 0]) * FINE)
        lab_x = torch.as_tensor((cols.reshape(-1) - offsets[a, 1] - centre_px) * FINE)
        p = project(vol, rot, centre=centre, lab_y=lab_y, lab_x=lab_x, lab_z=lab_z,
                    step=1.0 / FINE)[0, ..., 0].numpy()
        out[a] = p.reshape(dy, FINE, dx, FINE).mean(axis=(1, 3))
    return out


def simulate_tomography(
    path: str, *, shape: tuple[int, int, int] = (64, 64, 64), n_angles: int = 90,
    angle_range_deg: float = 180.0, energy_ev: float = 20000.0, pixel_size_m: float = 1e-6,
    max_optical_density: float = 1.5, delta_per_beta: float = 0.0,
    tilt_deg: tuple[float, float] = (0.0, 0.0), offset_px: float = 0.0,
    centre_shift_px: float = 0.0, distance_m: float | None = None,
    incident_photons: float = 1e4, poisson: bool = True, n_features: int = 12,
    seed: int = 0, overwrite: bool = False, progress: bool = True,
) -> TomographySimulation:
    """Write a tomography data set in the native layout (see the module docstring).

    Parameters
    ----------
    shape : (int, int, int)
        ``(n_y, n_x, n_z)`` of the volume; the detector is ``(n_y, n_x)``.
    max_optical_density : float
        The largest ``2 k integral(beta)`` at angle 0 (sets the beta scale).
    tilt_deg : (float, float)
        Tilt of the rotation axis about x and about z, the same at every angle.
    offset_px : float
        Per-angle projection offsets uniform in ``+-offset_px`` (mean removed).
    centre_shift_px : float
        The rotation axis's column minus the detector's middle column.
    distance_m : float, optional
        Near-field propagation distance (then ``delta_per_beta`` should be > 0).
    progress : bool
        Show a progress bar over the angles (terminal or notebook).
    """
    rng = np.random.default_rng(seed)
    fine_shape = tuple(FINE * s for s in shape)
    fine = random_ellipsoid_volume(fine_shape, n_features, rng)
    angles = np.linspace(0, np.radians(angle_range_deg), n_angles, endpoint=False)
    tilts = np.zeros((n_angles, 3))
    tilts[:, 1:] = np.radians(tilt_deg)
    offsets = rng.uniform(-1, 1, (n_angles, 2)) * offset_px
    offsets -= offsets.mean(axis=0)
    det = (shape[0], shape[1])
    centre = (det[1] - 1) / 2 + centre_shift_px
    li = _project_fine(fine, angles, tilts, offsets, centre, det,
                       progress=progress)  # pixels * value
    wavelength = HC_EV_M / energy_ev
    k = 2 * math.pi / wavelength
    scale = max_optical_density / (2 * k * pixel_size_m * max(li[0].max(), 1e-12))
    od = 2 * k * pixel_size_m * scale * li
    if distance_m is None:
        intensity = incident_photons * np.exp(-od)
    else:
        phase = delta_per_beta * od / 2
        intensity = _propagate(np.exp(-od / 2 - 1j * phase), distance_m, wavelength,
                               pixel_size_m) * incident_photons
    if poisson:
        intensity = rng.poisson(intensity).astype(np.float64)
    beta = scale * fine.reshape(shape[0], FINE, shape[1], FINE, shape[2], FINE).mean((1, 3, 5))
    extra = {"ground_truth/beta": beta.astype(np.float32),
             "ground_truth/delta": (delta_per_beta * beta).astype(np.float32),
             "ground_truth/tilts_rad": tilts, "ground_truth/offsets_px": offsets,
             "ground_truth/rotation_centre_px": np.asarray(centre)}
    written = write_measurements(
        path, intensities=intensity[:, None].astype(np.float32),
        positions_px=np.zeros((n_angles, 1, 2)), angles_rad=angles, energy_ev=energy_ev,
        pixel_size_m=pixel_size_m, incident_photons=incident_photons, extra=extra,
        distances_m=None if distance_m is None else np.asarray([distance_m]),
        overwrite=overwrite,
    )
    return TomographySimulation(written, beta, angles, tilts, offsets, centre, intensity)


def _propagate(wave: np.ndarray, distance_m: float, wavelength_m: float,
               pixel_size_m: float) -> np.ndarray:
    """``|psi|^2`` after Fresnel propagation of ``wave [A, h, w]``, padded with vacuum by
    twice the Fresnel spread on every side."""
    pad = int(math.ceil(2 * wavelength_m * distance_m / (2 * pixel_size_m ** 2))) + 8
    big = np.pad(wave, ((0, 0), (pad, pad), (pad, pad)), constant_values=1.0)
    fy = np.fft.fftfreq(big.shape[1], pixel_size_m)[:, None]
    fx = np.fft.fftfreq(big.shape[2], pixel_size_m)[None, :]
    h = np.exp(-1j * np.pi * wavelength_m * distance_m * (fy ** 2 + fx ** 2))
    out = np.fft.ifft2(np.fft.fft2(big) * h)
    return np.abs(out[:, pad:-pad, pad:-pad]) ** 2


def add_tomography_arguments(sub) -> None:
    """Add ``tomography`` to the ``simulate`` sub-commands."""
    p = sub.add_parser(
        "tomography", help="tomography data set with ground truth",
        description="Simulate projections of a volume of random ellipsoids (optionally "
        "tilted axis, per-angle offsets, off-centre axis, propagation, Poisson noise) in the "
        "native layout, with the truth under ground_truth/.",
    )
    p.add_argument("out", metavar="OUT", help="output file (.h5 or .zarr)")
    p.add_argument("--shape", type=int, nargs=3, default=[64, 64, 64], metavar=("NY", "NX", "NZ"))
    p.add_argument("--angles", type=int, default=90, help="number of projections")
    p.add_argument("--angle-range-deg", type=float, default=180.0)
    p.add_argument("--energy-ev", type=float, default=20000.0)
    p.add_argument("--pixel-size-m", type=float, default=1e-6)
    p.add_argument("--max-optical-density", type=float, default=1.5)
    p.add_argument("--delta-per-beta", type=float, default=0.0)
    p.add_argument("--tilt-deg", type=float, nargs=2, default=[0.0, 0.0], metavar=("TX", "TZ"),
                   help="rotation-axis tilt about x and about z (degrees)")
    p.add_argument("--offset-px", type=float, default=0.0, help="random per-angle offsets")
    p.add_argument("--centre-shift-px", type=float, default=0.0)
    p.add_argument("--distance-m", type=float, default=None)
    p.add_argument("--incident-photons", type=float, default=1e4)
    p.add_argument("--no-poisson", action="store_true")
    p.add_argument("--features", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_tomography(args: argparse.Namespace) -> int:
    res = simulate_tomography(
        args.out, shape=tuple(args.shape), n_angles=args.angles,
        angle_range_deg=args.angle_range_deg, energy_ev=args.energy_ev,
        pixel_size_m=args.pixel_size_m, max_optical_density=args.max_optical_density,
        delta_per_beta=args.delta_per_beta, tilt_deg=tuple(args.tilt_deg),
        offset_px=args.offset_px, centre_shift_px=args.centre_shift_px,
        distance_m=args.distance_m, incident_photons=args.incident_photons,
        poisson=not args.no_poisson, n_features=args.features, seed=args.seed,
        overwrite=args.overwrite, progress=not getattr(args, "no_progress", False),
    )
    print(f"wrote {res.path} ({len(res.angles_rad)} projections of {tuple(args.shape[:2])}, "
          f"volume {tuple(args.shape)}, rotation centre {res.rotation_centre_px:.2f})")
    return 0
