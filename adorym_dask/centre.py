"""Rotation-axis position from a pair of projections 180 degrees apart.

Convention: the axis at detector column ``c`` means the projection at 180 degrees is the
mirror of the 0-degree one about ``c``, ``p180(col) = p0(2 c - col)``. Mirroring ``p180``
left-right (``col -> n - 1 - col``) turns it into ``p0`` shifted by ``s = 2 c - (n - 1)``
columns, so ``c = (s + n - 1) / 2``; ``s`` is found by sub-pixel phase correlation of the
line integrals ``-log(transmission)``, each row's background removed and its edges tapered.
A centred axis is ``c = (n - 1) / 2``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["find_rotation_centre", "opposite_pair"]

_TOLERANCE_RAD = np.radians(0.5)


def find_rotation_centre(
    projection_0: np.ndarray, projection_180: np.ndarray, *, upsample: int = 20
) -> float:
    """Detector column of the rotation axis from two opposite projections.

    Parameters
    ----------
    projection_0, projection_180 : np.ndarray
        ``[rows, cols]`` transmissions (flat/dark corrected, about 1 in the bare beam) at
        angles 180 degrees apart.
    upsample : int
        Sub-pixel precision of the phase correlation: ``1 / upsample`` pixel of shift,
        i.e. ``1 / (2 upsample)`` pixel of centre.

    Returns
    -------
    float
        Column ``c`` (0-based, fractional) with ``p180(col) = p0(2 c - col)``.
    """
    from skimage.registration import phase_cross_correlation

    p0 = np.asarray(projection_0, np.float64)
    p180 = np.asarray(projection_180, np.float64)
    if p0.ndim != 2 or p0.shape != p180.shape:
        raise ValueError(
            f"projection_0 and projection_180 must be [rows, cols] of the same shape, got "
            f"{p0.shape} and {p180.shape}"
        )
    if upsample < 1:
        raise ValueError(f"upsample must be >= 1, got {upsample}")
    reference = _prepare(p0)
    moving = _prepare(p180[:, ::-1])
    shift, _, _ = phase_cross_correlation(reference, moving, upsample_factor=int(upsample),
                                          normalization=None)
    return (float(shift[-1]) + p0.shape[1] - 1) / 2.0


def _prepare(transmission: np.ndarray) -> np.ndarray:
    """Line integrals with each row's edge level removed and a cosine taper at the edges."""
    line = -np.log(np.clip(transmission, 1e-6, None))
    cols = line.shape[1]
    edge = max(1, cols // 20)
    level = np.concatenate([line[:, :edge], line[:, -edge:]], axis=1).mean(axis=1, keepdims=True)
    return (line - level) * _taper(cols, edge)


def _taper(n: int, width: int) -> np.ndarray:
    """``[n]`` weights: 1 inside, a half cosine falling to 0 over ``width`` at each end."""
    w = np.ones(n)
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(width) + 0.5) / width)
    w[:width] = ramp
    w[n - width :] = ramp[::-1]
    return w


def opposite_pair(angles_rad: np.ndarray, *, tolerance_rad: float | None = None
                  ) -> tuple[int, int] | None:
    """The two projections closest to 180 degrees apart.

    Parameters
    ----------
    angles_rad : np.ndarray
        ``[n_angles]`` rotation angles, radians, any order.

    Returns
    -------
    tuple of int or None
        ``(i, j)`` with ``angles_rad[j] - angles_rad[i]`` closest to 180 degrees (modulo
        360), or None if no pair is within ``tolerance_rad`` (default 0.5 degree) of it.
    """
    tolerance = _TOLERANCE_RAD if tolerance_rad is None else tolerance_rad
    ang = np.mod(np.asarray(angles_rad, np.float64).reshape(-1), 2 * np.pi)
    if ang.size < 2:
        return None
    order = np.argsort(ang, kind="stable")
    ordered = ang[order]
    target = np.mod(ordered + np.pi, 2 * np.pi)
    best: tuple[float, int, int] | None = None
    pos = np.searchsorted(ordered, target)
    for k, p in enumerate(pos):
        for q in (p - 1, p, p + 1):
            q %= ordered.size
            if q == k:
                continue
            miss = abs(np.angle(np.exp(1j * (ordered[q] - target[k]))))
            if best is None or miss < best[0]:
                best = (miss, int(order[k]), int(order[q]))
    if best is None or best[0] > tolerance:
        return None
    i, j = sorted(best[1:])
    return i, j
