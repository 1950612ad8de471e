"""Synthetic multi-distance holography data sets with ground truth (paper Sec. 3.2).

An isolated sample (magnitude and phase from two unrelated images) in vacuum is lit by a plane
wave, Fresnel-propagated to each hologram's distance on a window padded far beyond the
Fresnel spread (so nothing wraps around), and recorded on the sample's field through an affine
misalignment: recorded(r) = |psi(A_lin (r - c) + c + t)|^2, the wave sampled by exact Fourier
interpolation onto a 4x finer grid and cubic splines there (``scipy.ndimage.map_coordinates``,
not the reconstruction's 2x grid and bicubic kernel). The file holds
the start guesses of the distances (true plus ``distance_error_m``); the truth is under
``ground_truth/`` (``object`` complex ``[n, n]``, ``distances_m``, ``affine``).

Command line: ``adorym-dask simulate holography OUT.h5 [options]``.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

__all__ = ["HolographySimulation", "random_affines", "simulate_holography",
           "add_holography_arguments", "sample_image"]

HC_EV_M = 1.239841984e-6


@dataclass
class HolographySimulation:
    """What :func:`simulate_holography` wrote."""

    path: str
    object: np.ndarray  # [n, n] complex128 transmission
    distances_m: np.ndarray  # true [n_holo]
    start_distances_m: np.ndarray  # written to the file [n_holo]
    affine: np.ndarray  # true [n_holo, 2, 3], recorded -> ideal
    intensities: np.ndarray  # [n_holo, n, n]


def sample_image(name: str, shape: tuple[int, int]) -> np.ndarray:
    """A ``[0, 1]`` grey image: a scikit-image sample by name (``camera``, ``astronaut``,
    ``coins``, ``moon``, ``text``, ``brick``, ``grass``, ...), or a ``.npy`` / image file."""
    from skimage import data, io
    from skimage.color import rgb2gray

    from adorym_dask.simulate import _resized_unit_image

    path = Path(name)
    if path.suffix:
        if not path.is_file():
            raise FileNotFoundError(f"image file {path} not found")
        img = np.load(path) if path.suffix == ".npy" else io.imread(path)
    else:
        loader = getattr(data, name, None)
        if loader is None:
            raise ValueError(f"no scikit-image sample image named {name!r}")
        img = loader()
    img = np.asarray(img, np.float64)
    if img.ndim == 3:
        img = rgb2gray(img[..., :3])
    return _resized_unit_image(img, shape)


def random_affines(n: int, shape: tuple[int, int], max_corner_px: float,
                   rng: np.random.Generator) -> np.ndarray:
    """``[n, 2, 3]`` random maps (translation, rotation, non-uniform scale, shear), the first
    the identity, each moving the image's farthest corner by ``0.5..1 max_corner_px``."""
    from adorym_dask.physics.affine import corner_displacement_px, identity_affine

    out = identity_affine(n)
    half = max(shape) / 2
    for i in range(1, n):
        ang = rng.uniform(-1, 1) * 0.4 / half
        sy, sx = 1 + rng.uniform(-1, 1, 2) * 0.4 / half
        shear = rng.uniform(-1, 1) * 0.3 / half
        rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
        out[i, :, :2] = rot @ np.array([[sy, shear], [0.0, sx]])
        out[i, :, 2] = rng.uniform(-1, 1, 2)
        eye = identity_affine(1)[0]
        target = rng.uniform(0.5, 1.0) * max_corner_px
        out[i] = eye + (out[i] - eye) * target / corner_displacement_px(out[i : i + 1], shape)[0]
    return out


UPSAMPLE = 4


def _propagated_fine(field: np.ndarray, z: float, wavelength: float, pixel: float) -> np.ndarray:
    """The propagated wave on a grid ``UPSAMPLE`` times finer (band-limited interpolation)."""
    import torch

    from adorym_dask.physics.affine import fourier_upsample

    fy = np.fft.fftfreq(field.shape[0], d=pixel)
    fx = np.fft.fftfreq(field.shape[1], d=pixel)
    h = np.exp(-1j * math.pi * wavelength * z * (fy[:, None] ** 2 + fx[None, :] ** 2))
    spec = torch.from_numpy(np.fft.fft2(field) * h)
    return fourier_upsample(spec, UPSAMPLE).numpy()


def simulate_holography(
    path: str | Path,
    *,
    size_px: int = 256,
    energy_ev: float = 17500.0,
    pixel_size_m: float = 1e-6,
    distances_m: tuple[float, ...] = (0.4, 0.6, 0.8, 1.0),
    distance_error_m: float | tuple[float, ...] = -0.02,
    affine_error_px: float = 0.0,
    incident_photons: float = 1.0,
    poisson: bool = False,
    magnitude_image: str = "camera",
    phase_image: str = "astronaut",
    magnitude_range: tuple[float, float] = (0.6, 1.0),
    phase_range_rad: tuple[float, float] = (-0.5, 0.5),
    kappa: float | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> HolographySimulation:
    """Write holograms of a ``size_px`` square sample in the native layout (see module doc).

    With ``kappa`` the sample is homogeneous: its phase image sets delta, beta = kappa delta
    (one-pixel-thick slab), and the magnitude image is not used.
    ``incident_photons`` is each hologram's bare-beam counts per pixel. ``progress`` shows a
    bar over the holograms (terminal or notebook).
    """
    from scipy.ndimage import map_coordinates

    from adorym_dask.storage.measurements import write_measurements

    rng = np.random.default_rng(seed)
    n = int(size_px)
    wavelength = HC_EV_M / energy_ev
    dist = np.asarray(distances_m, np.float64)
    phase = phase_range_rad[0] + (phase_range_rad[1] - phase_range_rad[0]) * sample_image(
        phase_image, (n, n))
    if kappa is None:
        mag = magnitude_range[0] + (magnitude_range[1] - magnitude_range[0]) * sample_image(
            magnitude_image, (n, n))
        obj = mag * np.exp(1j * phase)
    else:  # T = exp(-i k delta L - k beta L) with k delta L = -phase
        obj = np.exp(1j * phase + kappa * phase)
    spread = wavelength * dist.max() / (2 * pixel_size_m ** 2)
    pad = int(math.ceil(3 * spread)) + 16
    field = np.ones((n + 2 * pad, n + 2 * pad), np.complex128)
    field[pad : pad + n, pad : pad + n] = obj
    affine = random_affines(len(dist), (n, n), affine_error_px, rng) if affine_error_px > 0 \
        else np.tile(np.array([[1.0, 0, 0], [0, 1.0, 0]]), (len(dist), 1, 1))
    c = (n - 1) / 2
    ry, rx = np.meshgrid(np.arange(n) - c, np.arange(n) - c, indexing="ij")
    holos = []
    for z, a in tqdm(list(zip(dist, affine)), desc="simulating holograms", unit="hologram",
                     disable=not progress):
        # the detector samples |psi|^2 at the aligned points: the wave is interpolated (exact
        # Fourier interpolation to a 4x grid, then cubic splines), and squared
        fine = _propagated_fine(field, z, wavelength, pixel_size_m)
        qy = (a[0, 0] * ry + a[0, 1] * rx + c + a[0, 2] + pad) * UPSAMPLE
        qx = (a[1, 0] * ry + a[1, 1] * rx + c + a[1, 2] + pad) * UPSAMPLE
        re = map_coordinates(fine.real, [qy, qx], order=3, mode="nearest")
        im = map_coordinates(fine.imag, [qy, qx], order=3, mode="nearest")
        holos.append(re * re + im * im)
    intensities = np.clip(np.asarray(holos), 0, None) * incident_photons
    if poisson:
        intensities = rng.poisson(intensities).astype(np.float64)
    err = np.broadcast_to(np.asarray(distance_error_m, np.float64), dist.shape)
    start = dist + err
    extra = {"ground_truth/object": obj.astype(np.complex64), "ground_truth/distances_m": dist,
             "ground_truth/affine": affine}
    if kappa is not None:
        extra["ground_truth/kappa"] = np.asarray(kappa)
    written = write_measurements(
        path, intensities=intensities[None].astype(np.float32),
        positions_px=np.zeros((len(dist), 2)), energy_ev=energy_ev, pixel_size_m=pixel_size_m,
        distances_m=start, incident_photons=incident_photons, extra=extra, overwrite=overwrite,
    )
    return HolographySimulation(written, obj, dist, start, affine, intensities)


def add_holography_arguments(sub) -> None:
    """Add ``holography`` to the ``simulate`` sub-commands."""
    p = sub.add_parser(
        "holography", help="multi-distance holography data set with ground truth",
        description="Simulate multi-distance in-line holograms of an isolated sample (plane "
        "wave, Fresnel propagation, optional affine misalignment, distance errors and "
        "Poisson noise) in the native layout, with the truth under ground_truth/.",
    )
    p.add_argument("out", metavar="OUT", help="output file (.h5 or .zarr)")
    p.add_argument("--size", type=int, default=256, help="sample and hologram size, px")
    p.add_argument("--energy-ev", type=float, default=17500.0)
    p.add_argument("--pixel-size-m", type=float, default=1e-6)
    p.add_argument("--distances-m", type=float, nargs="+", default=[0.4, 0.6, 0.8, 1.0],
                   help="true effective distances (default 0.4 0.6 0.8 1.0)")
    p.add_argument("--distance-error-m", type=float, nargs="+", default=[-0.02],
                   help="written distances = true + this (one, or one per hologram)")
    p.add_argument("--affine-error-px", type=float, default=0.0,
                   help="random misalignment of holograms 2.. moving a corner by up to this")
    p.add_argument("--incident-photons", type=float, default=1.0,
                   help="bare-beam counts per pixel in each hologram")
    p.add_argument("--poisson", action="store_true", help="add Poisson noise")
    p.add_argument("--magnitude-image", default="camera",
                   help="scikit-image sample name or .npy/.png file (default camera)")
    p.add_argument("--phase-image", default="astronaut", help="(default astronaut)")
    p.add_argument("--magnitude-range", type=float, nargs=2, default=[0.6, 1.0])
    p.add_argument("--phase-range-rad", type=float, nargs=2, default=[-0.5, 0.5])
    p.add_argument("--kappa", type=float, default=None,
                   help="homogeneous sample: beta = kappa delta from the phase image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_holography(args: argparse.Namespace) -> int:
    errors = args.distance_error_m
    res = simulate_holography(
        args.out, size_px=args.size, energy_ev=args.energy_ev, pixel_size_m=args.pixel_size_m,
        distances_m=tuple(args.distances_m),
        distance_error_m=errors[0] if len(errors) == 1 else tuple(errors),
        affine_error_px=args.affine_error_px, incident_photons=args.incident_photons,
        poisson=args.poisson, magnitude_image=args.magnitude_image,
        phase_image=args.phase_image, kappa=args.kappa, seed=args.seed,
        magnitude_range=tuple(args.magnitude_range), phase_range_rad=tuple(args.phase_range_rad),
        overwrite=args.overwrite, progress=not getattr(args, "no_progress", False),
    )
    print(f"wrote {res.path} ({len(res.distances_m)} holograms of {args.size}x{args.size}, "
          f"distances {np.round(res.start_distances_m, 4).tolist()} m written, true "
          f"{np.round(res.distances_m, 4).tolist()} m)")
    return 0
