"""Sub-pixel (Fourier) shifts."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["fourier_shift"]


def fourier_shift(x: Tensor, shift: Tensor) -> Tensor:
    """Circularly shift a complex image by a (sub-)pixel amount via the FFT.

    Returns ``y(r) = x(r - shift)``, i.e. the content moves by ``+shift``,
    computed as ``ifft2(fft2(x) * exp(-2 pi i (fy dy + fx dx)))`` with
    ``fy, fx = fftfreq(ny), fftfreq(nx)`` in cycles/pixel. For integer shifts
    this equals ``torch.roll(x, (dy, dx), dims=(-2, -1))`` up to round-off.

    Notes
    -----
    For even ``n`` the Nyquist frequency is represented by ``fftfreq`` as
    ``-0.5`` only, so the phase ramp is not Hermitian there: a sub-pixel
    shift of a *real* signal with Nyquist content gives a (slightly)
    non-real result. This is intended; all fields here are complex.
    Differentiable w.r.t. ``x`` and ``shift``.

    Parameters
    ----------
    x : Tensor, shape [..., ny, nx], complex
        Images to shift (a real input is promoted to complex).
    shift : Tensor, shape [..., 2], real
        ``(dy, dx)`` in pixels; ``shift.shape[:-1]`` broadcasts against
        ``x.shape[:-2]``.

    Returns
    -------
    Tensor, shape [broadcast(...), ny, nx], complex
        Shifted images.
    """
    if not x.is_complex():
        x = x.to(torch.complex128 if x.dtype == torch.float64 else torch.complex64)
    real_dtype = torch.float64 if x.dtype == torch.complex128 else torch.float32
    ny, nx = x.shape[-2], x.shape[-1]
    fy = torch.fft.fftfreq(ny, dtype=real_dtype, device=x.device)
    fx = torch.fft.fftfreq(nx, dtype=real_dtype, device=x.device)
    shift = shift.to(dtype=real_dtype, device=x.device)
    # the ramp is separable: ny + nx complex exponentials per shift, not ny * nx
    ry = torch.polar(torch.ones_like(fy), (-2.0 * math.pi) * fy * shift[..., 0, None])
    rx = torch.polar(torch.ones_like(fx), (-2.0 * math.pi) * fx * shift[..., 1, None])
    ramp = ry.unsqueeze(-1) * rx.unsqueeze(-2)
    return torch.fft.ifft2(torch.fft.fft2(x) * ramp)
