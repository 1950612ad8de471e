"""Scan patterns: where the tiles of a simulated (or planned) ptychography scan go.

Positions are (y, x) of each tile's top-left corner in object pixels, fractional allowed, and
always keep ``floor(pos) + probe`` inside the object (a 1-pixel margin).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: golden angle in radians, pi * (3 - sqrt(5))
_GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))


def _scan_extent(
    object_shape: Sequence[int], probe_shape: Sequence[int]
) -> tuple[float, float]:
    """Largest allowed top-left position along (y, x), with a 1-px margin.

    A position ``p`` in ``[0, N - P - 1]`` guarantees
    ``floor(p) + P <= N - 1 < N`` even after float round-off.
    """
    ext = []
    for n, p in zip(object_shape[:2], probe_shape[-2:]):
        e = float(n) - float(p) - 1.0
        if e < 0:
            raise ValueError(
                f"probe {tuple(probe_shape[-2:])} does not fit in object "
                f"{tuple(object_shape[:2])} with a 1-pixel margin"
            )
        ext.append(e)
    return ext[0], ext[1]


def raster_scan(
    object_shape: Sequence[int],
    probe_shape: Sequence[int],
    *,
    step_px: float | tuple[float, float],
    jitter_px: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """Rectangular raster of probe positions covering the object.

    Along each axis the positions are ``linspace(0, extent, n)`` with the
    smallest ``n`` such that the spacing is ``<= step_px``, where
    ``extent = object - probe - 1`` (a 1-pixel safety margin). Optional
    uniform jitter in ``[-jitter_px, jitter_px]`` is added and the result is
    clipped back into ``[0, extent]``. Row-major order (y slow, x fast).

    Parameters
    ----------
    object_shape : sequence of int
        ``(ny, nx)`` of the object (extra trailing dims are ignored).
    probe_shape : sequence of int
        ``(..., py, px)`` of the probe (only the last two are used).
    step_px : float or tuple of float
        Maximum step in pixels, scalar or ``(step_y, step_x)``.
    jitter_px : float, optional
        Half-width of the uniform random jitter (default 0).
    seed : int, optional
        Seed of the jitter's random generator.

    Returns
    -------
    numpy.ndarray, shape [n, 2], float64
        Top-left ``(y, x)`` positions, ``0 <= pos`` and
        ``floor(pos) + probe_shape < object_shape``.
    """
    ext = _scan_extent(object_shape, probe_shape)
    steps = np.broadcast_to(np.asarray(step_px, dtype=np.float64), (2,))
    if np.any(steps <= 0):
        raise ValueError(f"step_px must be positive, got {step_px}")
    axes = []
    for e, st in zip(ext, steps):
        n = int(math.ceil(e / st - 1e-9)) + 1 if e > 0 else 1
        axes.append(np.linspace(0.0, e, n) if n > 1 else np.array([e / 2.0]))
    yy, xx = np.meshgrid(axes[0], axes[1], indexing="ij")
    pos = np.stack([yy.ravel(), xx.ravel()], axis=1)
    if jitter_px > 0:
        rng = np.random.default_rng(seed)
        pos = pos + rng.uniform(-jitter_px, jitter_px, size=pos.shape)
        pos = np.clip(pos, 0.0, np.asarray(ext))
    return pos.astype(np.float64)


def _spiral_points(scale: float, k: np.ndarray, theta0: float) -> np.ndarray:
    r = scale * np.sqrt(k + 0.5)
    t = k * _GOLDEN_ANGLE + theta0
    return np.stack([r * np.sin(t), r * np.cos(t)], axis=1)


def fermat_spiral_scan(
    object_shape: Sequence[int],
    probe_shape: Sequence[int],
    *,
    n_positions: int,
    seed: int = 0,
) -> np.ndarray:
    """Fermat (golden-angle) spiral filling the allowed scan rectangle.

    Points ``r_k = c sqrt(k + 1/2)``, ``theta_k = k * golden_angle + theta_0``
    are centred on the allowed rectangle ``[0, ey] x [0, ex]`` with
    ``e = object - probe - 1`` (1-pixel safety margin); points falling
    outside are dropped. The scale ``c`` is found by bisection so that the
    number of points inside is ``n_positions`` (if a jump in the count makes
    that impossible, the ``n_positions`` points of smallest ``k`` at the
    closest larger count are kept). The seed only sets the spiral's
    rotation ``theta_0``.

    Parameters
    ----------
    object_shape : sequence of int
        ``(ny, nx)`` of the object.
    probe_shape : sequence of int
        ``(..., py, px)`` of the probe.
    n_positions : int
        Exact number of positions returned.
    seed : int, optional
        Seed for the random rotation of the spiral.

    Returns
    -------
    numpy.ndarray, shape [n_positions, 2], float64
        Top-left ``(y, x)`` positions ordered along the spiral (centre first).
    """
    n = int(n_positions)
    if n < 1:
        raise ValueError(f"n_positions must be >= 1, got {n_positions}")
    ey, ex = _scan_extent(object_shape, probe_shape)
    centre = np.array([ey / 2.0, ex / 2.0])
    if n == 1:
        return centre[None, :].astype(np.float64)
    theta0 = float(np.random.default_rng(seed).uniform(0.0, 2.0 * math.pi))
    half = np.array([ey / 2.0, ex / 2.0])
    # every point with r > half-diagonal is outside, so K bounds the search
    diag = float(np.hypot(*half))

    def inside(scale: float) -> np.ndarray:
        k_max = int(math.ceil((diag / scale) ** 2)) + 1
        k = np.arange(k_max, dtype=np.float64)
        p = _spiral_points(scale, k, theta0)
        ok = np.all(np.abs(p) <= half + 1e-12, axis=1)
        return p[ok]

    if ey == 0 or ex == 0:
        # degenerate (line) region: fall back to evenly spaced points
        t = np.linspace(0.0, 1.0, n)
        return np.stack([t * ey, t * ex], axis=1).astype(np.float64)

    # area of the rectangle ~ pi c^2 n  ->  initial guess
    c0 = math.sqrt(4.0 * half[0] * half[1] / (math.pi * n))
    lo, hi = c0 / 8.0, c0 * 8.0  # count(lo) >= n, count(hi) < n
    while len(inside(lo)) < n:
        lo /= 2.0
    while len(inside(hi)) >= n:
        hi *= 2.0
    best = inside(lo)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        pts = inside(mid)
        if len(pts) >= n:
            lo, best = mid, pts
            if len(pts) == n:
                break
        else:
            hi = mid
        if hi - lo < 1e-12 * hi:
            break
    pos = best[:n] + centre
    pos = np.clip(pos, 0.0, np.array([ey, ex]))
    return pos.astype(np.float64)
