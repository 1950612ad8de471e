"""Plain-numpy reference ePIE (Maiden & Rodenburg 2009), independent of adorym_dask.

Conventions (those of the tike test data, e.g. ``siemens-star-small``):

* ``data[j]`` is the measured far-field intensity of tile ``j`` with the zero
  spatial frequency at pixel ``[0, 0]`` (NOT fft-shifted); the forward model
  is ``|fft2(P * O[patch], norm="ortho")|^2``.
* ``scan[j] = (row, col)`` of the probe's top-left corner in object pixels.
  Fractional positions are rounded to the nearest integer pixel
  (``np.rint``) -- no sub-pixel probe shift -- and clipped so the tile fits.

To use it on adorym_dask's fft-shifted data pass
``np.fft.ifftshift(data, axes=(-2, -1))``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["epie", "fourier_error"]


def _corners(scan: np.ndarray, probe_shape, object_shape) -> np.ndarray:
    ij = np.rint(np.asarray(scan, dtype=np.float64)).astype(np.int64)
    ij[:, 0] = np.clip(ij[:, 0], 0, object_shape[0] - probe_shape[0])
    ij[:, 1] = np.clip(ij[:, 1], 0, object_shape[1] - probe_shape[1])
    return ij


def fourier_error(data, scan, probe, obj) -> float:
    """Normalised amplitude error ``sum (|F psi| - sqrt(I))^2 / sum I``."""
    py, px = probe.shape
    ij = _corners(scan, probe.shape, obj.shape)
    num = 0.0
    for (iy, ix), d in zip(ij, data):
        far = np.fft.fft2(probe * obj[iy : iy + py, ix : ix + px], norm="ortho")
        num += float(np.sum((np.abs(far) - np.sqrt(np.maximum(d, 0))) ** 2))
    return num / float(np.sum(data))


def epie(
    data: np.ndarray,
    scan: np.ndarray,
    probe: np.ndarray,
    object_shape: tuple[int, int],
    *,
    n_iter: int = 15,
    alpha: float = 1.0,
    beta: float = 1.0,
    seed: int = 0,
    obj: np.ndarray | None = None,
    update_probe: bool = True,
    errors: list | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Extended ptychographic iterative engine.

    For each tile, in a random (seeded) order each iteration::

        psi   = P * O_j
        psi'  = ifft2(sqrt(I_j) * exp(i angle(fft2(psi))))      (ortho FFTs)
        O_j  += alpha * conj(P)   / max|P|^2   * (psi' - psi)
        P    += beta  * conj(O_j) / max|O_j|^2 * (psi' - psi)   (old O_j)

    Parameters
    ----------
    data : numpy.ndarray, shape [n, py, px], float
        Intensities, zero frequency at pixel [0, 0].
    scan : numpy.ndarray, shape [n, 2]
        (row, col) of each tile's top-left corner (rounded to integers).
    probe : numpy.ndarray, shape [py, px], complex
        Initial probe.
    object_shape : tuple of int
        ``(ny, nx)`` of the object.
    n_iter : int, optional
        Number of passes over all tiles.
    alpha, beta : float, optional
        Object and probe step sizes.
    seed : int, optional
        Seed of the tile-order generator.
    obj : numpy.ndarray, shape [ny, nx], complex, optional
        Initial object (default all ones).
    update_probe : bool, optional
        Refine the probe (default True).
    errors : list, optional
        If given, :func:`fourier_error` before each iteration and after the
        last one is appended to it (n_iter + 1 values).

    Returns
    -------
    obj : numpy.ndarray, shape [ny, nx], complex128
    probe : numpy.ndarray, shape [py, px], complex128
    """
    data = np.asarray(data, dtype=np.float64)
    amp = np.sqrt(np.maximum(data, 0.0))
    P = np.array(probe, dtype=np.complex128)
    if P.ndim != 2:
        raise ValueError(f"probe must be 2-D, got {P.shape}")
    py, px = P.shape
    O = (
        np.ones(tuple(object_shape), dtype=np.complex128)
        if obj is None
        else np.array(obj, dtype=np.complex128)
    )
    ij = _corners(scan, P.shape, O.shape)
    rng = np.random.default_rng(seed)
    for _ in range(int(n_iter)):
        if errors is not None:
            errors.append(fourier_error(data, scan, P, O))
        for j in rng.permutation(len(ij)):
            iy, ix = ij[j]
            patch = O[iy : iy + py, ix : ix + px].copy()
            psi = P * patch
            far = np.fft.fft2(psi, norm="ortho")
            far = amp[j] * np.exp(1j * np.angle(far))
            dpsi = np.fft.ifft2(far, norm="ortho") - psi
            O[iy : iy + py, ix : ix + px] = patch + alpha * np.conj(P) / np.max(
                np.abs(P) ** 2
            ) * dpsi
            if update_probe:
                P = P + beta * np.conj(patch) / np.max(np.abs(patch) ** 2) * dpsi
    if errors is not None:
        errors.append(fourier_error(data, scan, P, O))
    return O, P
