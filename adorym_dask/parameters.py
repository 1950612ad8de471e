"""Initial values of the small refinable parameters (the probe for now)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from adorym_dask.config import ProbeConfig, ProbeInit
from adorym_dask.physics.probes import defocused_aperture_probe
from adorym_dask.storage.measurements import Measurements, read_tiles


class ProbeError(ValueError):
    """A probe guess that cannot be used, with the field and the fix."""


def mean_pattern(meas: Measurements, *, batch: int = 256) -> np.ndarray:
    """Mean measured intensity ``[det_y, det_x]`` over every tile, read in bounded batches."""
    total = np.zeros(meas.det_shape, np.float64)
    for angle in range(meas.n_angles):
        for start in range(0, meas.n_tiles, batch):
            idx = np.arange(start, min(start + batch, meas.n_tiles))
            total += read_tiles(meas.source, angle, idx).sum(axis=0, dtype=np.float64)
    return total / (meas.n_angles * meas.n_tiles)


def probe_from_mean_amplitude(mean_intensity: np.ndarray) -> np.ndarray:
    """Inverse Fourier transform of the mean measured amplitude, centred in the window.

    ``[det_y, det_x]`` centred intensities -> ``[det_y, det_x]`` complex64 probe with the same
    total power (the transform is unitary).
    """
    amp = np.sqrt(np.clip(mean_intensity, 0, None))
    probe = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(amp), norm="ortho"))
    return probe.astype(np.complex64)


def add_modes(probe: np.ndarray, n_modes: int, *, seed: int = 0) -> np.ndarray:
    """Extend ``[m, py, px]`` to ``[n_modes, py, px]`` keeping the total power.

    New modes are the first mode with a seeded random smooth phase, each with 10% of the first
    mode's power halved per mode; the total power is rescaled to the input's.
    """
    if probe.shape[0] >= n_modes:
        return probe
    rng = np.random.default_rng(seed)
    power = float((np.abs(probe) ** 2).sum())
    extra = []
    py, px = probe.shape[1:]
    for k in range(n_modes - probe.shape[0]):
        noise = rng.standard_normal((py, px)) + 1j * rng.standard_normal((py, px))
        f = np.fft.fft2(noise)
        fy, fx = np.meshgrid(np.fft.fftfreq(py), np.fft.fftfreq(px), indexing="ij")
        smooth = np.fft.ifft2(f * np.exp(-(fy**2 + fx**2) / (2 * 0.05**2)))
        smooth /= np.abs(smooth).max()
        extra.append(probe[0] * smooth * np.sqrt(0.1 * 0.5**k))
    out = np.concatenate([probe, np.asarray(extra)], axis=0)
    out *= np.sqrt(power / (np.abs(out) ** 2).sum())
    return out.astype(np.complex64)


def load_probe_file(path: Path, det_shape: tuple[int, int]) -> np.ndarray:
    """Read a complex ``.npy`` probe, ``[py, px]`` or ``[modes, py, px]``."""
    if not Path(path).is_file():
        raise ProbeError(f"probe.path: file {path} not found; give a .npy file of the probe")
    try:
        probe = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise ProbeError(f"probe.path: {path} is not a readable .npy array ({err})") from None
    if probe.ndim == 2:
        probe = probe[None]
    if probe.ndim != 3 or tuple(probe.shape[1:]) != tuple(det_shape):
        raise ProbeError(
            f"probe.path: probe shape {probe.shape} does not match the detector {det_shape}; "
            "expected [py, px] or [modes, py, px] equal to the detector size"
        )
    if not np.all(np.isfinite(probe)):
        raise ProbeError(f"probe.path: {path} contains NaN or inf values")
    return probe.astype(np.complex64)


def initial_probe(cfg: ProbeConfig, meas: Measurements, *, n_modes: int, seed: int) -> np.ndarray:
    """The probe guess ``[n_modes, det_y, det_x]`` complex64 requested by ``cfg``."""
    if cfg.init is ProbeInit.file:
        probe = load_probe_file(cfg.path, meas.det_shape)
        if probe.shape[0] > n_modes:
            raise ProbeError(
                f"probe.path has {probe.shape[0]} modes but model.probe_modes is {n_modes}; "
                "raise model.probe_modes or give fewer modes"
            )
        return add_modes(probe, n_modes, seed=seed)
    mean_i = mean_pattern(meas)
    photons = float(mean_i.sum())
    if cfg.init is ProbeInit.from_data:
        return add_modes(probe_from_mean_amplitude(mean_i)[None], n_modes, seed=seed)
    probe = defocused_aperture_probe(
        meas.det_shape,
        radius_px=cfg.aperture_radius_px,
        inner_radius_px=cfg.aperture_inner_radius_px,
        defocus_m=cfg.defocus_m,
        pixel_size_m=meas.pixel_size_m,
        wavelength_m=meas.wavelength_m,
        n_modes=n_modes,
        photons_per_pattern=photons,
        seed=seed,
    )
    return probe.numpy().astype(np.complex64) if isinstance(probe, torch.Tensor) else probe
