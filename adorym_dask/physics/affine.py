"""Affine alignment of images (holograms): where each recorded pixel looks in the ideal image.

Convention (the run store's ``affine [n, 2, 3]`` = ``[[a11, a12, t_y], [a21, a22, t_x]]``):
the recorded image at pixel ``r = (y, x)`` equals the ideal image at
``A_lin @ (r - c) + c + t``, with ``c = ((n_y - 1) / 2, (n_x - 1) / 2)`` the image centre. The
map goes from recorded coordinates to ideal ones, so applying it is one interpolation of the
ideal image, differentiable in the image and in the six numbers (bicubic, through
``torch.nn.functional.grid_sample``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["identity_affine", "affine_coordinates", "sample_bicubic", "corner_displacement_px",
           "fourier_upsample", "sample_bspline"]


def identity_affine(n: int) -> np.ndarray:
    """``[n, 2, 3]`` float64 identity maps."""
    out = np.zeros((n, 2, 3))
    out[:, 0, 0] = out[:, 1, 1] = 1.0
    return out


def affine_coordinates(
    affine: Tensor, corner: Tensor, shape: tuple[int, int], centre: tuple[float, float]
) -> Tensor:
    """Ideal-image coordinates ``[G, h, w, 2]`` (y, x) of a block of recorded pixels.

    Parameters
    ----------
    affine : Tensor
        ``[G, 2, 3]`` maps (see the module docstring).
    corner : Tensor
        ``[G, 2]`` recorded pixel ``(y, x)`` of each block's first pixel.
    shape : (int, int)
        ``(h, w)`` of the block.
    centre : (float, float)
        The whole image's centre ``c``.
    """
    dt = affine.dtype
    iy = torch.arange(shape[0], dtype=dt)
    ix = torch.arange(shape[1], dtype=dt)
    cy, cx = centre
    ry = corner[:, 0, None, None].to(dt) + iy[None, :, None] - cy  # [G, h, 1]
    rx = corner[:, 1, None, None].to(dt) + ix[None, None, :] - cx  # [G, 1, w]
    a = affine[:, :, :, None, None]
    qy = a[:, 0, 0] * ry + a[:, 0, 1] * rx + cy + a[:, 0, 2]
    qx = a[:, 1, 0] * ry + a[:, 1, 1] * rx + cx + a[:, 1, 2]
    return torch.stack([qy, qx], dim=-1)


def sample_bicubic(image: Tensor, coords: Tensor) -> Tensor:
    """Bicubic samples ``[G, h, w]`` of ``image [G, H, W]`` at ``coords [G, h, w, 2]`` (y, x)
    in pixels (0 = the first pixel's centre); outside the image the border value is used.
    Exact at integer coordinates; differentiable in both arguments."""
    big_h, big_w = image.shape[-2:]
    gx = coords[..., 1] * (2.0 / (big_w - 1)) - 1.0
    gy = coords[..., 0] * (2.0 / (big_h - 1)) - 1.0
    grid = torch.stack([gx, gy], dim=-1).to(image.dtype)
    out = F.grid_sample(image[:, None], grid, mode="bicubic", padding_mode="border",
                        align_corners=True)
    return out[:, 0]


def fourier_upsample(spectrum: Tensor, factor: int, *, bspline: bool = False) -> Tensor:
    """The band-limited (trigonometric) interpolation of a periodic complex field onto a grid
    ``factor`` times finer, from its spectrum ``[..., ny, nx]`` (``fft2`` of the field,
    unshifted): ``[..., factor ny, factor nx]``, sample ``k`` at position ``k / factor`` of
    the original pixels, equal to the field at the original samples. Interpolating the finer
    grid then samples the field between pixels far more exactly than interpolating the
    coarse one, whose content reaches the Nyquist frequency. With ``bspline`` the result is
    the cubic B-spline coefficients of that finer grid (its spectrum divided by the sampled
    spline's, ``(4 + 2 cos(2 pi k / n)) / 6`` per axis: the exact periodic prefilter), for
    :func:`sample_bspline`."""
    ny, nx = spectrum.shape[-2:]
    big = torch.zeros((*spectrum.shape[:-2], factor * ny, factor * nx), dtype=spectrum.dtype)
    hy, hx = (ny + 1) // 2, (nx + 1) // 2  # non-negative frequencies (with zero)
    ly, lx = ny - hy, nx - hx
    big[..., :hy, :hx] = spectrum[..., :hy, :hx]
    big[..., :hy, big.shape[-1] - lx:] = spectrum[..., :hy, hx:]
    big[..., big.shape[-2] - ly:, :hx] = spectrum[..., hy:, :hx]
    big[..., big.shape[-2] - ly:, big.shape[-1] - lx:] = spectrum[..., hy:, hx:]
    # an even length's Nyquist bin is split evenly between +/- Nyquist (the symmetric, real
    # interpolation of a real signal), not put on one side
    if ny % 2 == 0 and factor > 1:
        nyq = big[..., big.shape[-2] - ly, :] * 0.5
        big[..., big.shape[-2] - ly, :] = nyq
        big[..., ny // 2, :] = nyq
    if nx % 2 == 0 and factor > 1:
        nyq = big[..., big.shape[-1] - lx] * 0.5
        big[..., big.shape[-1] - lx] = nyq
        big[..., nx // 2] = nyq
    if bspline:
        ky = torch.arange(big.shape[-2], dtype=torch.float64) * (2 * math.pi / big.shape[-2])
        kx = torch.arange(big.shape[-1], dtype=torch.float64) * (2 * math.pi / big.shape[-1])
        resp = ((4 + 2 * torch.cos(ky))[:, None] * (4 + 2 * torch.cos(kx))[None, :]) / 36.0
        big = big / resp.to(big.real.dtype)
    return torch.fft.ifft2(big) * (factor * factor)


def _bspline_weights(t: Tensor) -> list[Tensor]:
    """Cubic B-spline weights of the samples at offsets -1, 0, 1, 2 from ``floor(q)``,
    ``t = q - floor(q)`` in [0, 1)."""
    t2, t3 = t * t, t * t * t
    return [(1 - t) ** 3 / 6, (3 * t3 - 6 * t2 + 4) / 6, (-3 * t3 + 3 * t2 + 3 * t + 1) / 6, t3 / 6]


def sample_bspline(coef: Tensor, coords: Tensor) -> Tensor:
    """Cubic B-spline interpolation: samples ``[G, h, w]`` at ``coords [G, h, w, 2]`` (y, x),
    pixels, of the image whose spline coefficients are ``coef [G, H, W]`` (real), indices
    clamped at the border. Accurate to fourth order (bicubic convolution: second/third),
    differentiable in both arguments."""
    big_h, big_w = coef.shape[-2:]
    g = coef.shape[0]
    flat = coef.reshape(g, -1)
    qy, qx = coords[..., 0], coords[..., 1]
    y0, x0 = torch.floor(qy.detach()), torch.floor(qx.detach())
    wy = _bspline_weights((qy - y0).to(coef.dtype))
    wx = _bspline_weights((qx - x0).to(coef.dtype))
    y0, x0 = y0.long(), x0.long()
    out = torch.zeros(coords.shape[:-1], dtype=coef.dtype)
    for a in range(4):
        iy = (y0 + a - 1).clamp(0, big_h - 1)
        row = torch.zeros_like(out)
        for b in range(4):
            ix = (x0 + b - 1).clamp(0, big_w - 1)
            idx = (iy * big_w + ix).reshape(g, -1)
            row = row + wx[b] * torch.gather(flat, 1, idx).reshape(out.shape)
        out = out + wy[a] * row
    return out


def corner_displacement_px(affine: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``[n]`` the largest distance, over the image's four corners, between where each
    affine map sends a corner and the corner itself (pixels)."""
    ny, nx = shape
    c = np.array([(ny - 1) / 2, (nx - 1) / 2])
    corners = np.array([[0, 0], [0, nx - 1], [ny - 1, 0], [ny - 1, nx - 1]], float) - c
    a = np.asarray(affine, np.float64)
    moved = np.einsum("nij,kj->nki", a[:, :, :2], corners) + a[:, None, :, 2]
    return np.linalg.norm(moved - corners[None], axis=-1).max(axis=1)
