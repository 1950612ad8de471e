"""Synthetic far-field ptychography data sets with ground truth.

Everything here produces data in the package's native measurement layout
(see :func:`adorym_dask.storage.measurements.write_measurements`):

* diffraction intensities with the zero spatial frequency at pixel
  ``(det_y // 2, det_x // 2)`` (fft-shifted), far field
  ``fftshift(fft2(psi, norm="ortho"))``;
* scan positions are ``(y, x)`` of the probe's top-left corner in object
  pixels (fractional); tile ``g`` sees ``O[iy:iy+py, ix:ix+px]`` with
  ``(iy, ix) = floor(pos)`` and a probe Fourier-shifted by ``pos - floor(pos)``.

The command-line entry is ``adorym-dask simulate ptychography OUT.h5 ...``
(:func:`add_simulate_arguments`, :func:`run_simulate`, :func:`main_simulate`).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from adorym_dask.scans import _scan_extent, fermat_spiral_scan, raster_scan

__all__ = [
    "SimulationResult",
    "test_object",
    "raster_scan",
    "fermat_spiral_scan",
    "default_probe",
    "simulate_ptychography",
    "add_simulate_arguments",
    "run_simulate",
    "main_simulate",
]

# --------------------------------------------------------------------------
# objects
# --------------------------------------------------------------------------
def _resized_unit_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Anti-aliased resize to ``shape`` and min-max normalisation to [0, 1]."""
    from skimage.transform import resize

    img = resize(
        image.astype(np.float64),
        shape,
        order=1,
        mode="reflect",
        anti_aliasing=True,
        preserve_range=True,
    )
    lo, hi = float(img.min()), float(img.max())
    if hi > lo:
        img = (img - lo) / (hi - lo)
    else:
        img = np.zeros_like(img)
    return img


def test_object(
    shape: tuple[int, int] = (256, 256),
    *,
    magnitude_range: tuple[float, float] = (0.6, 1.0),
    phase_range_rad: tuple[float, float] = (-0.5, 0.5),
) -> np.ndarray:
    """Complex test transmission function built from two scikit-image images.

    The magnitude comes from ``skimage.data.camera()`` and the phase from
    ``skimage.data.astronaut()`` converted to grey. Each image is resized
    (anti-aliased) to ``shape`` and mapped linearly so that its minimum and
    maximum hit the ends of the requested range.

    Parameters
    ----------
    shape : tuple of int, optional
        ``(ny, nx)`` of the object (default ``(256, 256)``).
    magnitude_range : tuple of float, optional
        ``(min, max)`` of ``|O|`` (default ``(0.6, 1.0)``).
    phase_range_rad : tuple of float, optional
        ``(min, max)`` of ``angle(O)`` in radians (default ``(-0.5, 0.5)``).

    Returns
    -------
    numpy.ndarray, shape [ny, nx], complex64
        ``|O| * exp(i * phase)``.
    """
    from skimage import data
    from skimage.color import rgb2gray

    shape = (int(shape[0]), int(shape[1]))
    mag01 = _resized_unit_image(data.camera(), shape)
    ph01 = _resized_unit_image(rgb2gray(data.astronaut()), shape)
    m0, m1 = (float(v) for v in magnitude_range)
    p0, p1 = (float(v) for v in phase_range_rad)
    mag = m0 + (m1 - m0) * mag01
    phase = p0 + (p1 - p0) * ph01
    return (mag * np.exp(1j * phase)).astype(np.complex64)


# Keep pytest from collecting ``test_object`` when this module is imported
# into a test file's namespace.
test_object.__test__ = False  # type: ignore[attr-defined]


def _extra_slice(base_shape: tuple[int, int], s: int) -> np.ndarray:
    """Weaker, flipped copy of :func:`test_object` for slice ``s >= 1``."""
    weaken = 1.0 / (s + 1)
    obj = test_object(
        base_shape,
        magnitude_range=(1.0 - 0.4 * weaken, 1.0),
        phase_range_rad=(-0.5 * weaken, 0.5 * weaken),
    )
    flips = [(1,), (0,), (0, 1)][(s - 1) % 3]
    return np.ascontiguousarray(np.flip(obj, axis=flips))


# --------------------------------------------------------------------------
# probe
# --------------------------------------------------------------------------
def default_probe(
    probe_shape: tuple[int, int],
    *,
    energy_ev: float,
    pixel_size_m: float,
    n_modes: int = 1,
    photons_per_pattern: float = 1e6,
    seed: int = 0,
) -> np.ndarray:
    """The default simulation probe: a defocused annular aperture.

    An annular aperture (outer radius ``a = min(py, px) / 6`` pixels, central
    stop ``a / 4``) in the sample plane is Fresnel-propagated by
    ``z = 0.8 * (a * pixel_size_m)^2 / wavelength`` (aperture Fresnel number
    ``1 / 0.8``) with
    :func:`adorym_dask.physics.probes.defocused_aperture_probe` in a window 4
    times larger (so the wide-angle edge diffraction does not wrap around),
    cropped to ``probe_shape``, tapered by the radial super-Gaussian
    ``exp(-(r / (0.45 min(py, px)))^8)`` (1 inside, ~0.1 at the window edge)
    and renormalised. For 128 x 128 at 10 keV and 10 nm pixels: a = 21.3 px,
    z = 0.29 mm, a centrally peaked spot with rings, about 45 px (a third of
    the window) wide, decaying smoothly to ~0.5 % of the peak amplitude at
    the window edge.

    Parameters
    ----------
    probe_shape : tuple of int
        ``(py, px)``.
    energy_ev : float
        Photon energy in eV.
    pixel_size_m : float
        Object pixel size in metres.
    n_modes : int, optional
        Number of incoherent modes (mode m carries 0.1**m of mode 0's power).
    photons_per_pattern : float, optional
        Total ``sum |P|^2`` over all modes and pixels.
    seed : int, optional
        Seed for the mode perturbations.

    Returns
    -------
    numpy.ndarray, shape [n_modes, py, px], complex64
    """
    from adorym_dask.physics.probes import defocused_aperture_probe
    from adorym_dask.physics.propagation import wavelength_m

    py, px = int(probe_shape[0]), int(probe_shape[1])
    lam = wavelength_m(energy_ev)
    n_min = min(py, px)
    radius_px = n_min / 6.0
    defocus_m = 0.8 * (radius_px * pixel_size_m) ** 2 / lam
    pad = 4
    big = _to_numpy(
        defocused_aperture_probe(
            (pad * py, pad * px),
            radius_px=radius_px,
            inner_radius_px=radius_px / 4.0,
            defocus_m=defocus_m,
            pixel_size_m=pixel_size_m,
            wavelength_m=lam,
            n_modes=n_modes,
            photons_per_pattern=1.0,
            seed=seed,
        )
    ).astype(np.complex128)
    # the aperture is centred at (pad*py//2, pad*px//2); keep it at (py//2, px//2)
    y0 = pad * py // 2 - py // 2
    x0 = pad * px // 2 - px // 2
    p = big[:, y0 : y0 + py, x0 : x0 + px]
    yy = np.arange(py)[:, None] - py // 2
    xx = np.arange(px)[None, :] - px // 2
    r = np.hypot(yy, xx)
    p = p * np.exp(-((r / (0.45 * n_min)) ** 8))
    p *= np.sqrt(photons_per_pattern / np.sum(np.abs(p) ** 2))
    return p.astype(np.complex64)


def _to_numpy(x) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(x)


# --------------------------------------------------------------------------
# simulation
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class SimulationResult:
    """What :func:`simulate_ptychography` wrote.

    Attributes
    ----------
    path : pathlib.Path
        The measurement file (.h5 or .zarr).
    object : numpy.ndarray, shape [ny, nx, n_slices], complex64
        Ground-truth transmission function.
    probe : numpy.ndarray, shape [M, py, px], complex64
        Ground-truth probe modes (also saved as ``<stem>_probe.npy``).
    positions_px : numpy.ndarray, shape [n, 2], float64
        True top-left ``(y, x)`` scan positions in object pixels (exposure centres).
    probe_path : pathlib.Path
        The ``<stem>_probe.npy`` file next to ``path``.
    recorded_positions_px : numpy.ndarray, shape [n, 2], float64
        The positions written to the file (with ``position_error_px`` added).
    """

    path: Path
    object: np.ndarray
    probe: np.ndarray
    positions_px: np.ndarray
    probe_path: Path | None = None
    recorded_positions_px: np.ndarray | None = None


def probe_npy_path(path: str | Path) -> Path:
    """``<folder>/<stem>_probe.npy`` for a measurement file ``path``."""
    path = Path(path)
    return path.with_name(f"{path.stem}_probe.npy")


def simulate_ptychography(
    path: str | Path,
    *,
    object_shape: tuple[int, int] = (256, 256),
    probe_shape: tuple[int, int] = (128, 128),
    n_positions: int = 300,
    scan: str = "fermat",
    step_px: float | None = None,
    probe: np.ndarray | None = None,
    probe_modes: int = 1,
    slices: int = 1,
    photons_per_pattern: float = 1e6,
    poisson_noise: bool = False,
    energy_ev: float = 10000.0,
    pixel_size_m: float = 10e-9,
    slice_spacing_m: float | None = None,
    position_error_px: float = 0.0,
    fly_scan_px: float = 0.0,
    fly_substeps: int = 8,
    obj: np.ndarray | None = None,
    batch_size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> SimulationResult:
    """Simulate a far-field ptychography data set and write it to disk.

    Parameters
    ----------
    path : str or pathlib.Path
        Output file, ``.h5`` or ``.zarr`` (native layout). The true probe is
        also saved as ``<stem>_probe.npy`` (complex64 [M, py, px]) next to it.
    object_shape : tuple of int, optional
        ``(ny, nx)`` of the object (ignored when ``obj`` is given).
    probe_shape : tuple of int, optional
        ``(py, px)``, also the detector shape (ignored when ``probe`` given).
    n_positions : int, optional
        Number of scan positions for the Fermat scan; for a raster scan it
        only sets the default step (about ``n_positions`` points).
    scan : {"fermat", "raster"}, optional
        Scan pattern (:func:`fermat_spiral_scan` or :func:`raster_scan`).
    step_px : float, optional
        Raster step; default chosen to give about ``n_positions`` points.
    probe : numpy.ndarray, shape [py, px] or [M, py, px], complex, optional
        Probe to use as is (not renormalised). Default: :func:`default_probe`
        with ``probe_modes`` modes and ``photons_per_pattern`` photons.
    probe_modes : int, optional
        Number of incoherent probe modes of the default probe.
    slices : int, optional
        Number of object slices (multislice when > 1). Slice 0 is
        :func:`test_object`; the others are weaker, flipped copies.
    photons_per_pattern : float, optional
        Total probe intensity ``sum |P|^2``; with a unit-magnitude object
        every pattern sums to this (energy conservation).
    poisson_noise : bool, optional
        Replace the intensities by Poisson draws (seeded numpy Generator).
    energy_ev : float, optional
        Photon energy in eV.
    pixel_size_m : float, optional
        Object pixel size in metres.
    slice_spacing_m : float, optional
        Distance between slices; default ``50 * pixel_size_m``.
    position_error_px : float, optional
        RMS per axis of Gaussian errors (seeded) added to the positions written to the file;
        the true positions go to ``ground_truth/positions_px``.
    fly_scan_px : float, optional
        Fly scan (Sec. 3.4): during each exposure the probe moves this far along the fast axis
        (x), and the pattern is the incoherent mean over ``fly_substeps`` equally spaced
        sub-positions centred on the exposure's (true) position. The scan is kept far enough
        from the object's edges for the whole path.
    fly_substeps : int, optional
        Sub-positions per exposure of a fly scan.
    obj : numpy.ndarray, shape [ny, nx] or [ny, nx, S], complex, optional
        Use this object instead of the test object (overrides
        ``object_shape`` and ``slices``).
    batch_size : int, optional
        Tiles per forward-model batch (default 64).
    seed : int, optional
        Seed for the scan, probe modes and noise.
    overwrite : bool, optional
        Allow replacing existing output files.
    progress : bool, optional
        Show a progress bar over the tile batches (terminal or notebook).

    Returns
    -------
    SimulationResult

    Raises
    ------
    FileExistsError
        If ``path`` or its probe file exists and ``overwrite`` is False.

    Notes
    -----
    The file holds ``intensities`` float32 [1, n, py, px] (fft-shifted),
    ``positions_px`` [n, 2], attributes ``energy_ev`` and ``pixel_size_m``,
    plus ``ground_truth/object`` float32 [ny, nx, S, 2] (real, imag),
    ``ground_truth/probe`` float32 [M, py, px, 2], ``ground_truth/positions_px``
    [n, 2] and, for ``S > 1``, ``ground_truth/slice_spacing_m`` float64 [1].
    """
    import torch

    from adorym_dask.models.ptychography import extract_patches, farfield_intensities
    from adorym_dask.physics.propagation import (
        fresnel_transfer_function,
        wavelength_m,
    )
    from adorym_dask.storage.measurements import write_measurements

    path = Path(path)
    ppath = probe_npy_path(path)
    if not overwrite:
        for p in (path, ppath):
            if p.exists():
                raise FileExistsError(
                    f"{p} exists; pass overwrite=True (--overwrite) to replace it"
                )

    # ---- object [ny, nx, S]
    if obj is not None:
        o = np.asarray(obj)
        if o.ndim == 2:
            o = o[:, :, None]
        if o.ndim != 3:
            raise ValueError(f"obj must be [ny, nx] or [ny, nx, S], got {o.shape}")
        o = o.astype(np.complex64)
    else:
        if slices < 1:
            raise ValueError(f"slices must be >= 1, got {slices}")
        oshape = (int(object_shape[0]), int(object_shape[1]))
        layers = [test_object(oshape)] + [
            _extra_slice(oshape, s) for s in range(1, int(slices))
        ]
        o = np.stack(layers, axis=2).astype(np.complex64)
    n_slices = o.shape[2]

    # ---- probe [M, py, px]
    if probe is not None:
        pr = _to_numpy(probe)
        if pr.ndim == 2:
            pr = pr[None]
        pr = pr.astype(np.complex64)
    else:
        pr = default_probe(
            (int(probe_shape[0]), int(probe_shape[1])),
            energy_ev=energy_ev,
            pixel_size_m=pixel_size_m,
            n_modes=probe_modes,
            photons_per_pattern=photons_per_pattern,
            seed=seed,
        )
    py, px = pr.shape[-2:]

    # ---- scan [n, 2]: exposure centres; a fly scan's path needs room along x
    reach = int(math.ceil(fly_scan_px / 2.0))
    room = (o.shape[0], o.shape[1] - 2 * reach)
    if scan == "fermat":
        pos = fermat_spiral_scan(room, (py, px), n_positions=n_positions, seed=seed)
    elif scan == "raster":
        if step_px is None:
            ey, ex = _scan_extent(room, (py, px))
            side = max(math.sqrt(max(n_positions, 1)) - 1.0, 1.0)
            step_px = max(max(ey, ex) / side, 1.0)
        pos = raster_scan(room, (py, px), step_px=step_px, seed=seed)
    else:
        raise ValueError(f"scan must be 'fermat' or 'raster', got {scan!r}")
    pos = pos + np.array([0.0, reach])
    if fly_scan_px > 0:
        k = np.arange(int(fly_substeps))
        travel = ((k + 0.5) / int(fly_substeps) - 0.5) * float(fly_scan_px)
    else:
        travel = np.zeros(1)

    # ---- forward model, in batches
    tf = None
    if n_slices > 1:
        dz = 50.0 * pixel_size_m if slice_spacing_m is None else float(slice_spacing_m)
        slice_spacing_m = dz
        tf = fresnel_transfer_function(
            (py, px),
            pixel_size_m=pixel_size_m,
            wavelength_m=wavelength_m(energy_ev),
            distance_m=dz,
            dtype=torch.complex64,
        )
    probe_t = torch.from_numpy(pr)
    slices = torch.from_numpy(np.ascontiguousarray(np.moveaxis(o, 2, 0)).astype(np.complex64))
    n = len(pos)
    intens = np.zeros((n, py, px), dtype=np.float64)
    bar = tqdm(total=n * len(travel), desc="simulating patterns", unit="pattern",
               disable=not progress)
    with torch.no_grad():
        for dx in travel:
            sub = pos + np.array([0.0, dx])
            ij = np.floor(sub).astype(np.int64)
            frac = sub - ij
            for start in range(0, n, int(batch_size)):
                sl = slice(start, min(start + int(batch_size), n))
                patches = extract_patches(slices, ij[sl], (py, px))
                fs = torch.from_numpy(frac[sl].astype(np.float32))
                out = farfield_intensities(probe_t, patches, fs, transfer_function=tf)
                intens[sl] += out.detach().cpu().numpy() / len(travel)
                bar.update(sl.stop - sl.start)
    bar.close()
    intens = intens.astype(np.float32)
    rng = np.random.default_rng(seed)
    if poisson_noise:
        intens = rng.poisson(np.clip(intens, 0.0, None)).astype(np.float32)
    recorded = pos + rng.normal(0.0, float(position_error_px), pos.shape) if position_error_px else pos

    # ---- write
    extra: dict[str, np.ndarray] = {
        "ground_truth/object": np.stack([o.real, o.imag], axis=-1).astype(np.float32),
        "ground_truth/probe": np.stack([pr.real, pr.imag], axis=-1).astype(np.float32),
    }
    if n_slices > 1:
        extra["ground_truth/slice_spacing_m"] = np.array(
            [slice_spacing_m], dtype=np.float64
        )
    extra["ground_truth/positions_px"] = pos
    path.parent.mkdir(parents=True, exist_ok=True)
    write_measurements(
        path,
        intensities=intens[None],
        positions_px=recorded,
        energy_ev=float(energy_ev),
        pixel_size_m=float(pixel_size_m),
        extra=extra,
        overwrite=overwrite,
    )
    np.save(ppath, pr)
    return SimulationResult(
        path=path, object=o, probe=pr, positions_px=pos, probe_path=ppath,
        recorded_positions_px=recorded,
    )


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------
def add_simulate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``simulate`` sub-commands to ``parser``.

    Gives ``<parser> ptychography OUT [options]``; use it on the parser of
    the ``simulate`` sub-command of the main CLI, then call
    :func:`run_simulate` with the parsed namespace.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        Parser to extend (modified in place).

    Returns
    -------
    argparse.ArgumentParser
        The same parser.
    """
    sub = parser.add_subparsers(dest="simulate_kind", metavar="KIND")
    sub.required = True
    p = sub.add_parser(
        "ptychography",
        help="far-field ptychography data set with ground truth",
        description="Simulate far-field ptychography (test object, defocused "
        "annular probe) and write it in the native .h5/.zarr layout, with the "
        "ground truth and <stem>_probe.npy next to it.",
    )
    p.add_argument("out", metavar="OUT", help="output file (.h5 or .zarr)")
    p.add_argument("--object-size", type=int, nargs=2, default=[256, 256],
                   metavar=("NY", "NX"), help="object shape (default 256 256)")
    p.add_argument("--probe-size", type=int, nargs=2, default=[128, 128],
                   metavar=("PY", "PX"), help="probe/detector shape (default 128 128)")
    p.add_argument("--positions", type=int, default=300,
                   help="number of scan positions (default 300)")
    p.add_argument("--scan", choices=["fermat", "raster"], default="fermat",
                   help="scan pattern (default fermat)")
    p.add_argument("--step-px", type=float, default=None,
                   help="raster step in pixels (default: ~POSITIONS points)")
    p.add_argument("--modes", type=int, default=1, help="probe modes (default 1)")
    p.add_argument("--slices", type=int, default=1, help="object slices (default 1)")
    p.add_argument("--slice-spacing-m", type=float, default=None,
                   help="slice spacing in m (default 50 pixels)")
    p.add_argument("--photons", type=float, default=1e6,
                   help="photons per pattern (default 1e6)")
    p.add_argument("--poisson", action="store_true", help="add Poisson noise")
    p.add_argument("--position-error-px", type=float, default=0.0,
                   help="RMS per axis of errors added to the recorded positions (default 0)")
    p.add_argument("--fly-scan-px", type=float, default=0.0,
                   help="fly scan: probe travel along x during each exposure (default 0)")
    p.add_argument("--energy-ev", type=float, default=10000.0,
                   help="photon energy in eV (default 10000)")
    p.add_argument("--pixel-size-m", type=float, default=1e-8,
                   help="object pixel size in m (default 1e-8)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from adorym_dask.simulate_holography import add_holography_arguments
    from adorym_dask.simulate_tomography import add_tomography_arguments

    add_holography_arguments(sub)
    add_tomography_arguments(sub)
    return parser


def run_simulate(args: argparse.Namespace) -> int:
    """Run a parsed ``simulate`` command; returns the exit status."""
    if getattr(args, "simulate_kind", None) == "holography":
        from adorym_dask.simulate_holography import run_holography

        return run_holography(args)
    if getattr(args, "simulate_kind", None) == "tomography":
        from adorym_dask.simulate_tomography import run_tomography

        return run_tomography(args)
    if getattr(args, "simulate_kind", None) != "ptychography":
        raise SystemExit(f"unknown simulation kind {args.simulate_kind!r}")
    try:
        res = simulate_ptychography(
            args.out,
            object_shape=tuple(args.object_size),
            probe_shape=tuple(args.probe_size),
            n_positions=args.positions,
            scan=args.scan,
            step_px=args.step_px,
            probe_modes=args.modes,
            slices=args.slices,
            slice_spacing_m=args.slice_spacing_m,
            photons_per_pattern=args.photons,
            poisson_noise=args.poisson,
            position_error_px=args.position_error_px,
            fly_scan_px=args.fly_scan_px,
            energy_ev=args.energy_ev,
            pixel_size_m=args.pixel_size_m,
            seed=args.seed,
            overwrite=args.overwrite,
            progress=not getattr(args, "no_progress", False),
        )
    except FileExistsError as exc:
        print(f"error: {exc}")
        return 1
    print(
        f"wrote {res.path} ({len(res.positions_px)} patterns of "
        f"{res.probe.shape[-2]}x{res.probe.shape[-1]}, object "
        f"{res.object.shape[0]}x{res.object.shape[1]}x{res.object.shape[2]}, "
        f"{res.probe.shape[0]} probe mode(s)) and {res.probe_path}"
    )
    return 0


def main_simulate(argv: list[str] | None = None) -> int:
    """Stand-alone entry: ``main_simulate(["ptychography", "OUT.h5", ...])``."""
    parser = argparse.ArgumentParser(
        prog="adorym-dask simulate", description="Simulate data sets with ground truth."
    )
    add_simulate_arguments(parser)
    args = parser.parse_args(argv)
    return run_simulate(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main_simulate())
