"""Simple synthetic probe (illumination) generators."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .propagation import fresnel_propagate

__all__ = ["disk_aperture", "defocused_aperture_probe", "normalize_probe_power"]


def disk_aperture(
    shape: tuple[int, int],
    *,
    radius_px: float,
    inner_radius_px: float = 0.0,
    dtype: torch.dtype = torch.complex64,
    device: torch.device | str | None = None,
) -> Tensor:
    """Binary (annular) disk aperture centred at pixel ``(ny // 2, nx // 2)``.

    A pixel is 1 when its centre distance ``r`` satisfies
    ``inner_radius_px <= r <= radius_px`` and 0 otherwise (so with
    ``inner_radius_px = 0`` it is a full disk).

    Parameters
    ----------
    shape : tuple of int
        ``(ny, nx)``.
    radius_px : float
        Outer radius in pixels.
    inner_radius_px : float, optional
        Inner (central-stop) radius in pixels, default 0.
    dtype : torch.dtype, optional
        Output dtype (default complex64).
    device : torch.device or str, optional
        Output device.

    Returns
    -------
    Tensor, shape [ny, nx]
        The aperture.
    """
    ny, nx = int(shape[0]), int(shape[1])
    y = torch.arange(ny, dtype=torch.float64, device=device) - ny // 2
    x = torch.arange(nx, dtype=torch.float64, device=device) - nx // 2
    r = torch.sqrt(y[:, None] ** 2 + x[None, :] ** 2)
    mask = (r <= radius_px) & (r >= inner_radius_px)
    return mask.to(dtype)


def normalize_probe_power(
    probe: Tensor,
    photons_per_pattern: float,
    *,
    dim: Sequence[int] | None = None,
) -> Tensor:
    """Scale a probe so that ``sum |probe|^2 == photons_per_pattern``.

    Parameters
    ----------
    probe : Tensor, shape [...], complex
        Probe (e.g. [n_modes, ny, nx]).
    photons_per_pattern : float
        Target total intensity (photons per diffraction pattern).
    dim : sequence of int, optional
        Dimensions summed over for the power; default None sums over all
        dimensions (all modes and pixels). Use e.g. ``(-3, -2, -1)`` to
        normalise a batch of [..., n_modes, ny, nx] probes independently.

    Returns
    -------
    Tensor, same shape and dtype as ``probe``
        The rescaled probe.
    """
    p2 = probe.real**2 + probe.imag**2 if probe.is_complex() else probe**2
    if dim is None:
        power = p2.sum()
    else:
        power = p2.sum(dim=tuple(dim), keepdim=True)
    return probe * torch.sqrt(photons_per_pattern / power).to(probe.dtype)


def _smooth_noise(
    shape: tuple[int, int], correlation_px: float, generator: torch.Generator
) -> Tensor:
    """Real, zero-mean, unit-std, Gaussian-correlated random field (float64)."""
    ny, nx = shape
    noise = torch.randn((ny, nx), generator=generator, dtype=torch.float64)
    fy = torch.fft.fftfreq(ny, dtype=torch.float64)
    fx = torch.fft.fftfreq(nx, dtype=torch.float64)
    f2 = fy[:, None] ** 2 + fx[None, :] ** 2
    filt = torch.exp(-2.0 * (math.pi * correlation_px) ** 2 * f2)
    s = torch.fft.ifft2(torch.fft.fft2(noise) * filt).real
    s = s - s.mean()
    return s / s.std().clamp_min(1e-30)


def defocused_aperture_probe(
    shape: tuple[int, int],
    *,
    radius_px: float,
    inner_radius_px: float = 0.0,
    defocus_m: float,
    pixel_size_m: float,
    wavelength_m: float,
    n_modes: int = 1,
    photons_per_pattern: float = 1e6,
    mode_power_ratio: float = 0.1,
    seed: int = 0,
    dtype: torch.dtype = torch.complex64,
    device: torch.device | str | None = None,
) -> Tensor:
    """Mixed-state probe: a (annular) disk aperture Fresnel-propagated by a defocus.

    Mode 0 is :func:`disk_aperture` propagated by ``defocus_m`` with
    :func:`fresnel_propagate`. Mode ``m >= 1`` is mode 0 multiplied by a
    smooth random perturbation ``(1 + 0.2 a_m) exp(i pi p_m)`` (``a_m``,
    ``p_m`` unit-std Gaussian-correlated noise, correlation length a quarter
    of the aperture radius, drawn from a ``torch.Generator`` seeded with
    ``seed``), rescaled to carry ``mode_power_ratio ** m`` times the power of
    mode 0. Finally all modes are scaled together so that the sum over modes
    and pixels of ``|P|^2`` equals ``photons_per_pattern``. Modes are not
    orthogonalised. Computation is done in complex128 on CPU and cast.

    Parameters
    ----------
    shape : tuple of int
        ``(ny, nx)``.
    radius_px, inner_radius_px : float
        Aperture outer / inner radii in pixels.
    defocus_m : float
        Propagation distance from the aperture in metres (may be negative).
    pixel_size_m : float
        Pixel size in metres.
    wavelength_m : float
        Wavelength in metres.
    n_modes : int, optional
        Number of probe modes (default 1).
    photons_per_pattern : float, optional
        Total probe intensity (default 1e6).
    mode_power_ratio : float, optional
        Power of mode ``m`` relative to mode 0 is ``mode_power_ratio ** m``
        (default 0.1).
    seed : int, optional
        Seed for the perturbations (default 0); same seed gives same probe.
    dtype : torch.dtype, optional
        Output complex dtype (default complex64).
    device : torch.device or str, optional
        Output device.

    Returns
    -------
    Tensor, shape [n_modes, ny, nx], complex
        The probe modes.
    """
    if n_modes < 1:
        raise ValueError(f"n_modes must be >= 1, got {n_modes}")
    ny, nx = int(shape[0]), int(shape[1])
    ap = disk_aperture(
        (ny, nx), radius_px=radius_px, inner_radius_px=inner_radius_px,
        dtype=torch.complex128,
    )
    p0 = fresnel_propagate(
        ap, pixel_size_m=pixel_size_m, wavelength_m=wavelength_m, distance_m=defocus_m
    )
    power0 = (p0.abs() ** 2).sum()
    modes = [p0]
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    corr = max(radius_px / 4.0, 1.0)
    for m in range(1, n_modes):
        amp = 1.0 + 0.2 * _smooth_noise((ny, nx), corr, gen)
        phs = math.pi * _smooth_noise((ny, nx), corr, gen)
        pm = p0 * torch.polar(amp.clamp_min(0.0), phs)
        pm = pm * torch.sqrt(power0 * mode_power_ratio**m / (pm.abs() ** 2).sum())
        modes.append(pm)
    probe = normalize_probe_power(torch.stack(modes, dim=0), photons_per_pattern)
    return probe.to(dtype=dtype, device=device)
