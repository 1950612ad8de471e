"""The probe's start value (from the data, a file, or a defocused aperture) and its modes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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


def orthogonalize_modes(probe: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Orthogonal probe modes ordered by decreasing power, and the unitary that made them.

    With the modes as the rows of ``A [M, py*px]`` and ``A = U S V^H``, the new modes are
    ``U^H A = S V^H``: mutually orthogonal, mode 0 the strongest. Incoherent modes are only
    defined up to such a unitary mixing (the intensities ``sum_m |F(P_m O)|^2`` do not change),
    so this fixes a meaningful, ordered set without changing any prediction.

    Parameters
    ----------
    probe : ndarray
        ``[M, py, px]`` complex modes.

    Returns
    -------
    modes : ndarray
        ``[M, py, px]`` in the input's dtype.
    mix : ndarray
        ``[M, M]`` complex128 ``U^H``: ``modes = mix @ probe`` over the mode axis.
    """
    m = probe.shape[0]
    a = probe.reshape(m, -1).astype(np.complex128)
    u, _, _ = np.linalg.svd(a, full_matrices=False)
    mix = u.conj().T
    return (mix @ a).reshape(probe.shape).astype(probe.dtype), mix


def mode_power_fractions(probe: np.ndarray) -> np.ndarray:
    """``[M]`` float64: each mode's share of the total power ``sum |P|^2``."""
    power = (np.abs(probe) ** 2).reshape(probe.shape[0], -1).sum(axis=1, dtype=np.float64)
    return power / max(float(power.sum()), np.finfo(np.float64).tiny)


def seed_modes(probe: np.ndarray, n_modes: int, *, noise: float, seed: int = 0) -> np.ndarray:
    """Extend ``[m, py, px]`` to ``[n_modes, py, px]`` orthogonal modes of the same total power.

    Each new mode is a duplicate of mode 0 with complex Gaussian noise added where the probe
    is (``P0 (1 + noise * n)``, ``n`` unit-rms, seeded), the Sec. 3.4 recipe; the set is then
    orthogonalised (:func:`orthogonalize_modes`), so the extra modes start as weak, orthogonal
    variations of the first.
    """
    if probe.shape[0] >= n_modes:
        return probe
    rng = np.random.default_rng(seed)
    power = float((np.abs(probe) ** 2).sum())
    extra = []
    for _ in range(n_modes - probe.shape[0]):
        n = (rng.standard_normal(probe.shape[1:]) + 1j * rng.standard_normal(probe.shape[1:]))
        extra.append(probe[0] * (1.0 + noise * n / np.sqrt(2.0)))
    out = np.concatenate([probe.astype(np.complex128), np.asarray(extra)], axis=0)
    out, _ = orthogonalize_modes(out)
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


def probe_from_near_field(
    mean_intensity: np.ndarray, *, distance_m: float, pixel_size_m: float, wavelength_m: float
) -> np.ndarray:
    """Near field: the mean measured amplitude, Fresnel-propagated back to the sample
    (``-distance_m``), ``[det_y, det_x]`` complex64 of the same total power. In the near
    field a pattern is the probe's own (defocused) image, not its Fourier transform."""
    import torch

    from adorym_dask.physics.propagation import fresnel_propagate

    amp = torch.from_numpy(np.sqrt(np.clip(mean_intensity, 0, None)).astype(np.complex128))
    back = fresnel_propagate(amp, pixel_size_m=pixel_size_m, wavelength_m=wavelength_m,
                             distance_m=-distance_m)
    return back.numpy().astype(np.complex64)


def initial_probe(
    cfg: ProbeConfig, meas: Measurements, *, n_modes: int, seed: int,
    near_field_m: float | None = None,
) -> np.ndarray:
    """The probe guess ``[n_modes, det_y, det_x]`` complex64 requested by ``cfg``
    (``near_field_m``: the model propagates that far in the near field)."""
    if cfg.init is ProbeInit.file:
        probe = load_probe_file(cfg.path, meas.det_shape)
        if probe.shape[0] > n_modes:
            raise ProbeError(
                f"probe.path has {probe.shape[0]} modes but model.probe_modes is {n_modes}; "
                "raise model.probe_modes or give fewer modes"
            )
        return seed_modes(probe, n_modes, noise=cfg.mode_noise, seed=seed)
    mean_i = mean_pattern(meas)
    if cfg.init is ProbeInit.from_data and near_field_m is not None:
        first = probe_from_near_field(mean_i, distance_m=near_field_m,
                                      pixel_size_m=meas.pixel_size_m,
                                      wavelength_m=meas.wavelength_m)
    elif cfg.init is ProbeInit.from_data:
        first = probe_from_mean_amplitude(mean_i)
    else:
        first = defocused_aperture_probe(
            meas.det_shape,
            radius_px=cfg.aperture_radius_px,
            inner_radius_px=cfg.aperture_inner_radius_px,
            defocus_m=cfg.defocus_m,
            pixel_size_m=meas.pixel_size_m,
            wavelength_m=meas.wavelength_m,
            n_modes=1,
            photons_per_pattern=float(mean_i.sum()),
        )[0].numpy().astype(np.complex64)
    return seed_modes(first[None], n_modes, noise=cfg.mode_noise, seed=seed)
