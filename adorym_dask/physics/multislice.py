"""Thin-object transmission and multislice forward model."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["transmission_from_delta_beta", "multislice"]


def transmission_from_delta_beta(
    delta: Tensor,
    beta: Tensor,
    *,
    wavelength_m: float,
    thickness_m: float,
) -> Tensor:
    """Complex transmission function of a thin slab.

    For refractive index ``n = 1 - delta + i beta`` and thickness ``L`` under
    the ``exp(+i k z)`` convention (with the vacuum ``exp(i k L)`` dropped),
    ``T = exp(-i k delta L - k beta L)`` with ``k = 2 pi / lambda``.

    Parameters
    ----------
    delta : Tensor, shape [...], real
        Refractive index decrement.
    beta : Tensor, shape [...], real
        Absorption index; broadcast against ``delta``.
    wavelength_m : float
        Wavelength in metres.
    thickness_m : float
        Slab (slice) thickness in metres.

    Returns
    -------
    Tensor, shape broadcast([...]), complex
        ``complex64`` for float32 inputs, ``complex128`` for float64.
    """
    kl = 2.0 * math.pi / wavelength_m * thickness_m
    delta, beta = torch.broadcast_tensors(delta, beta)
    dt = torch.promote_types(delta.dtype, beta.dtype)
    if not dt.is_floating_point:
        dt = torch.get_default_dtype()
    delta = delta.to(dt)
    beta = beta.to(dt)
    return torch.exp(torch.complex(-kl * beta, -kl * delta))


def multislice(
    psi: Tensor,
    slices: Tensor,
    *,
    transfer_function: Tensor | Sequence[Tensor] | None,
) -> Tensor:
    """Multislice propagation of a wave through a stack of thin slices.

    For ``j`` in ``range(n_slices)``: ``psi <- psi * slices[j]``; between
    consecutive slices (not after the last one) the wave is propagated with
    ``ifft2(fft2(psi) * transfer_function)``.

    Parameters
    ----------
    psi : Tensor, shape [..., ny, nx], complex
        Incident wave.
    slices : Tensor, shape [n_slices, ..., ny, nx], complex
        Transmission functions; ``slices[j]`` must broadcast against ``psi``
        (e.g. ``psi`` [G, M, ny, nx] and ``slices`` [S, G, 1, ny, nx]).
    transfer_function : Tensor, sequence of Tensor, or None
        Free-space transfer function(s) on the unshifted FFT grid (see
        ``fresnel_transfer_function``), each broadcastable to [..., ny, nx]:
        one tensor used between every pair of slices (equal spacing), or a
        sequence of ``n_slices - 1``, one per gap (unequal spacing). May be
        None only when ``n_slices == 1``.

    Returns
    -------
    Tensor, shape broadcast([..., ny, nx]), complex
        Exit wave just after the last slice.
    """
    n_slices = slices.shape[0]
    if n_slices > 1 and transfer_function is None:
        raise ValueError("transfer_function is required when n_slices > 1")
    if isinstance(transfer_function, Tensor) or transfer_function is None:
        kernels = [transfer_function] * (n_slices - 1)
    else:
        kernels = list(transfer_function)
        if len(kernels) != n_slices - 1:
            raise ValueError(
                f"{len(kernels)} transfer functions given for {n_slices - 1} gaps between slices"
            )
    for j in range(n_slices):
        psi = psi * slices[j]
        if j < n_slices - 1:
            psi = torch.fft.ifft2(torch.fft.fft2(psi) * kernels[j])
    return psi
