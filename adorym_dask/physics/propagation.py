"""Free-space propagation kernels (Fraunhofer and Fresnel).

Conventions
-----------
* A plane wave travelling along +z is ``exp(+i k z)``; the constant
  ``exp(i k z)`` phase of free-space propagation is dropped everywhere.
* Fourier transforms use ``torch.fft`` (forward kernel ``exp(-2 pi i f x)``),
  so a tilted plane wave ``exp(+2 pi i f0 x)`` appears at frequency ``+f0``.
* Under these conventions the paraxial (Fresnel) transfer function is
  ``H(f) = exp(-i pi lambda z |f|^2)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "wavelength_m",
    "fraunhofer",
    "fresnel_transfer_function",
    "fresnel_propagate",
]

_HC_EV_M = 1.239841984e-6  # h c in eV * m


def wavelength_m(energy_ev: float) -> float:
    """Photon wavelength in metres for a photon energy in eV.

    Parameters
    ----------
    energy_ev : float
        Photon energy in electron-volts (must be positive).

    Returns
    -------
    float
        Wavelength ``h c / E`` in metres.
    """
    if energy_ev <= 0:
        raise ValueError(f"energy_ev must be positive, got {energy_ev}")
    return _HC_EV_M / float(energy_ev)


def fraunhofer(psi: Tensor) -> Tensor:
    """Far-field (Fraunhofer) propagation.

    Computes ``fftshift(fft2(psi, norm="ortho"))`` over the last two axes,
    so the zero spatial frequency lands at pixel ``(ny // 2, nx // 2)`` and
    the total energy ``sum |psi|^2`` is conserved.

    Parameters
    ----------
    psi : Tensor, shape [..., ny, nx], complex
        Exit wave; any leading batch dimensions.

    Returns
    -------
    Tensor, shape [..., ny, nx], complex
        Far-field wave, same dtype as ``psi``.
    """
    return torch.fft.fftshift(torch.fft.fft2(psi, norm="ortho"), dim=(-2, -1))


def _real_dtype_of(dtype: torch.dtype) -> torch.dtype:
    if dtype == torch.complex128 or dtype == torch.float64:
        return torch.float64
    if dtype == torch.complex32 or dtype == torch.float16:
        return torch.float16
    return torch.float32


def _complex_dtype_of(dtype: torch.dtype) -> torch.dtype:
    if dtype.is_complex:
        return dtype
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _freq_sq(
    shape: tuple[int, int], pixel_size_m: float, device: torch.device | str | None
) -> Tensor:
    """|f|^2 on the unshifted fftfreq grid, float64, shape [ny, nx] (1/m^2)."""
    ny, nx = int(shape[0]), int(shape[1])
    fy = torch.fft.fftfreq(ny, d=pixel_size_m, dtype=torch.float64, device=device)
    fx = torch.fft.fftfreq(nx, d=pixel_size_m, dtype=torch.float64, device=device)
    return fy[:, None] ** 2 + fx[None, :] ** 2


def fresnel_transfer_function(
    shape: tuple[int, int],
    *,
    pixel_size_m: float,
    wavelength_m: float,
    distance_m: float | Tensor,
    dtype: torch.dtype = torch.complex64,
    device: torch.device | str | None = None,
) -> Tensor:
    """Paraxial (Fresnel) free-space transfer function.

    ``H(fy, fx) = exp(-i pi lambda z (fx^2 + fy^2))`` sampled on the
    *unshifted* FFT frequency grid ``torch.fft.fftfreq(n, d=pixel_size_m)``,
    ready to multiply ``torch.fft.fft2(psi)``.

    The phase is evaluated in float64 (large phases at high frequency would
    lose precision in float32) and cast to ``dtype`` at the end.

    Parameters
    ----------
    shape : tuple of int
        ``(ny, nx)`` of the field.
    pixel_size_m : float
        Pixel size in metres (same along y and x).
    wavelength_m : float
        Wavelength in metres.
    distance_m : float or Tensor
        Propagation distance in metres (may be negative). A tensor of shape
        ``[...]`` (including 0-d) gives an output of shape ``[..., ny, nx]``
        and the result is differentiable w.r.t. it.
    dtype : torch.dtype, optional
        Complex output dtype (default complex64).
    device : torch.device or str, optional
        Output device; defaults to ``distance_m.device`` for a tensor
        distance, else CPU.

    Returns
    -------
    Tensor, shape [ny, nx] or [..., ny, nx], complex
        The transfer function.
    """
    dtype = _complex_dtype_of(dtype)
    if isinstance(distance_m, Tensor):
        if device is None:
            device = distance_m.device
        z = distance_m.to(device=device, dtype=torch.float64)
        f2 = _freq_sq(shape, pixel_size_m, device)
        phase = (-math.pi * wavelength_m) * z[..., None, None] * f2
    else:
        f2 = _freq_sq(shape, pixel_size_m, device)
        phase = (-math.pi * wavelength_m * float(distance_m)) * f2
    h = torch.complex(torch.cos(phase), torch.sin(phase))
    return h.to(dtype)


def fresnel_propagate(
    psi: Tensor,
    *,
    pixel_size_m: float,
    wavelength_m: float,
    distance_m: float | Tensor,
) -> Tensor:
    """Fresnel (paraxial transfer-function) propagation of a complex field.

    ``psi_z = ifft2(fft2(psi) * H)`` with ``H`` from
    :func:`fresnel_transfer_function`. The field is treated as periodic over
    the window (pad beforehand to avoid wrap-around). Energy is conserved.

    Parameters
    ----------
    psi : Tensor, shape [..., ny, nx], complex
        Input field.
    pixel_size_m : float
        Pixel size in metres.
    wavelength_m : float
        Wavelength in metres.
    distance_m : float or Tensor
        Distance in metres. A tensor of shape ``[...]`` must broadcast, once
        ``[ny, nx]`` is appended, against ``psi``; gradients flow to it.

    Returns
    -------
    Tensor, shape broadcast([..., ny, nx]), complex
        Propagated field, dtype of ``psi`` (complex).
    """
    if not psi.is_complex():
        psi = psi.to(_complex_dtype_of(psi.dtype))
    h = fresnel_transfer_function(
        (psi.shape[-2], psi.shape[-1]),
        pixel_size_m=pixel_size_m,
        wavelength_m=wavelength_m,
        distance_m=distance_m,
        dtype=psi.dtype,
        device=psi.device,
    )
    return torch.fft.ifft2(torch.fft.fft2(psi) * h)
