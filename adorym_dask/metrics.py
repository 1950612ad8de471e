"""Image-quality metrics for comparing complex reconstructions with ground truth.

All functions take numpy arrays (2-D complex images ``[ny, nx]`` unless
stated otherwise) and are insensitive to the ambiguities of ptychography
where noted: a global phase factor (:func:`remove_global_phase`) and a
sub-pixel translation (:func:`align_images`).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = [
    "in_object_frame",
    "remove_global_phase",
    "align_images",
    "phase_ssim",
    "phase_rmse",
    "aligned_phase_correlation",
    "illumination_mask",
]


def _as_mask(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if mask is None:
        return np.ones(shape, dtype=bool)
    m = np.asarray(mask, dtype=bool)
    if m.shape != tuple(shape):
        raise ValueError(f"mask shape {m.shape} != image shape {tuple(shape)}")
    if not m.any():
        raise ValueError("mask is empty")
    return m


def _bbox(mask: np.ndarray) -> tuple[slice, slice]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def remove_global_phase(
    recon: np.ndarray, truth: np.ndarray, *, mask: np.ndarray | None = None
) -> np.ndarray:
    """Multiply ``recon`` by the unit phasor that best aligns it to ``truth``.

    The phasor is ``exp(i angle(sum_mask(conj(recon) * truth)))``, the
    least-squares optimal global phase.

    Parameters
    ----------
    recon, truth : numpy.ndarray, shape [...], complex
        Images of the same shape.
    mask : numpy.ndarray, shape [...], bool, optional
        Region used to estimate the phase (default: everything).

    Returns
    -------
    numpy.ndarray, shape [...], complex
        ``recon * exp(i phi)``.
    """
    recon = np.asarray(recon)
    truth = np.asarray(truth)
    if recon.shape != truth.shape:
        raise ValueError(f"shape mismatch {recon.shape} vs {truth.shape}")
    m = _as_mask(mask, recon.shape)
    c = np.sum(np.conj(recon[m]) * truth[m])
    phi = float(np.angle(c)) if c != 0 else 0.0
    return recon * np.exp(1j * phi).astype(
        np.result_type(recon.dtype, np.complex64)
    )


def align_images(
    moving: np.ndarray, reference: np.ndarray, *, upsample_factor: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel registration of ``moving`` onto ``reference``.

    The shift is found with ``skimage.registration.phase_cross_correlation``
    (complex images are registered as complex fields) and applied with a
    Fourier shift (``scipy.ndimage.fourier_shift``), i.e. circularly: crop a
    border of about ``|shift|`` pixels before comparing.

    Parameters
    ----------
    moving, reference : numpy.ndarray, shape [ny, nx], real or complex
        Images of the same shape.
    upsample_factor : int, optional
        Registration precision is ``1 / upsample_factor`` pixel.

    Returns
    -------
    aligned : numpy.ndarray, shape [ny, nx]
        ``moving`` shifted onto ``reference`` (complex if ``moving`` is
        complex, otherwise real).
    shift : numpy.ndarray, shape [2], float64
        ``(dy, dx)`` applied to ``moving`` (content moves by ``+shift``).
    """
    from skimage.registration import phase_cross_correlation

    moving = np.asarray(moving)
    reference = np.asarray(reference)
    if moving.shape != reference.shape:
        raise ValueError(f"shape mismatch {moving.shape} vs {reference.shape}")
    shift, _, _ = phase_cross_correlation(
        reference, moving, upsample_factor=int(upsample_factor)
    )
    shift = np.asarray(shift, dtype=np.float64)
    shifted = np.fft.ifftn(ndimage.fourier_shift(np.fft.fftn(moving), shift))
    if not np.iscomplexobj(moving):
        shifted = shifted.real
    return shifted.astype(np.result_type(moving.dtype, np.float32)), shift


def phase_ssim(
    recon: np.ndarray, truth: np.ndarray, *, mask: np.ndarray | None = None
) -> float:
    """SSIM between the phases of ``recon`` and ``truth``.

    ``recon`` is first multiplied by the best global phasor
    (:func:`remove_global_phase`, estimated over ``mask``); SSIM
    (``skimage.metrics.structural_similarity``, ``data_range`` = peak-to-peak
    of the true phase) is then computed between ``angle(recon)`` and
    ``angle(truth)`` over the bounding box of ``mask`` (e.g. the
    illuminated region from :func:`illumination_mask`). No translation
    alignment is done.

    Parameters
    ----------
    recon, truth : numpy.ndarray, shape [ny, nx], complex
    mask : numpy.ndarray, shape [ny, nx], bool, optional

    Returns
    -------
    float
        SSIM in [-1, 1]; 1 for identical phases.
    """
    from skimage.metrics import structural_similarity

    recon = np.asarray(recon)
    truth = np.asarray(truth)
    m = _as_mask(mask, recon.shape)
    r = remove_global_phase(recon, truth, mask=m)
    sy, sx = _bbox(m)
    a = np.angle(r[sy, sx]).astype(np.float64)
    b = np.angle(truth[sy, sx]).astype(np.float64)
    data_range = float(b.max() - b.min())
    if data_range <= 0:
        data_range = 1.0
    win = min(7, *a.shape)
    if win % 2 == 0:
        win -= 1
    if win < 3:
        raise ValueError(f"region {a.shape} too small for SSIM")
    return float(structural_similarity(a, b, data_range=data_range, win_size=win))


def phase_rmse(
    recon: np.ndarray, truth: np.ndarray, *, mask: np.ndarray | None = None
) -> float:
    """Root-mean-square phase error in radians over ``mask``.

    After removing the best global phase, the wrapped phase difference
    ``angle(recon * conj(truth))`` is averaged over the mask.

    Parameters
    ----------
    recon, truth : numpy.ndarray, shape [ny, nx], complex
    mask : numpy.ndarray, shape [ny, nx], bool, optional

    Returns
    -------
    float
        RMSE in radians.
    """
    recon = np.asarray(recon)
    truth = np.asarray(truth)
    m = _as_mask(mask, recon.shape)
    r = remove_global_phase(recon, truth, mask=m)
    d = np.angle(r[m] * np.conj(truth[m]))
    return float(np.sqrt(np.mean(d.astype(np.float64) ** 2)))


def aligned_phase_correlation(
    a: np.ndarray,
    b: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    border_px: int = 3,
    upsample_factor: int = 10,
) -> float:
    """Pearson correlation of the phases of ``a`` and ``b`` after alignment.

    Steps: remove the global phase of ``a`` relative to ``b`` (over
    ``mask``); register ``a`` onto ``b`` with :func:`align_images`; remove
    the global phase again; crop a border of ``ceil(max|shift|) +
    border_px`` pixels (where the circular shift wraps); correlate
    ``angle(a)`` with ``angle(b)`` over the cropped region (intersected
    with ``mask``).

    Parameters
    ----------
    a, b : numpy.ndarray, shape [ny, nx], complex
    mask : numpy.ndarray, shape [ny, nx], bool, optional
        Region of ``b`` to compare (e.g. illuminated area).
    border_px : int, optional
        Extra border cropped beyond the shift (default 3).
    upsample_factor : int, optional
        Registration precision (1 / upsample_factor pixel).

    Returns
    -------
    float
        Pearson correlation coefficient in [-1, 1].
    """
    a = np.asarray(a)
    b = np.asarray(b)
    m = _as_mask(mask, b.shape)
    a1 = remove_global_phase(a, b, mask=m)
    a2, shift = align_images(a1, b, upsample_factor=upsample_factor)
    a2 = remove_global_phase(a2, b, mask=m)
    crop = int(math.ceil(float(np.max(np.abs(shift))))) + int(border_px)
    keep = np.zeros(b.shape, dtype=bool)
    ny, nx = b.shape
    if 2 * crop >= ny or 2 * crop >= nx:
        raise ValueError(f"shift {shift} too large for image {b.shape}")
    keep[crop : ny - crop, crop : nx - crop] = True
    keep &= m
    if keep.sum() < 2:
        raise ValueError("nothing left to correlate after cropping")
    pa = np.angle(a2[keep]).astype(np.float64)
    pb = np.angle(b[keep]).astype(np.float64)
    pa -= pa.mean()
    pb -= pb.mean()
    den = math.sqrt(float(np.sum(pa**2) * np.sum(pb**2)))
    if den == 0:
        return 0.0
    return float(np.sum(pa * pb) / den)


def illumination_mask(
    probe: np.ndarray,
    positions_px: np.ndarray,
    object_shape: tuple[int, ...],
    *,
    threshold: float = 0.1,
) -> np.ndarray:
    """Region of the object that the scan illuminates.

    Sums ``sum_modes |P|^2`` placed at ``floor(position)`` for every scan
    position, normalises by the maximum and thresholds.

    Parameters
    ----------
    probe : numpy.ndarray or torch.Tensor, shape [py, px] or [M, py, px], complex
        Probe (modes are summed incoherently).
    positions_px : numpy.ndarray, shape [n, 2]
        Top-left ``(y, x)`` positions in object pixels.
    object_shape : tuple of int
        ``(ny, nx, ...)``; only the first two are used.
    threshold : float, optional
        Fraction of the maximum illumination (default 0.1).

    Returns
    -------
    numpy.ndarray, shape [ny, nx], bool
    """
    try:
        import torch

        if isinstance(probe, torch.Tensor):
            probe = probe.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    p = np.asarray(probe)
    inten = np.abs(p) ** 2
    if inten.ndim == 3:
        inten = inten.sum(axis=0)
    elif inten.ndim != 2:
        raise ValueError(f"probe must be [py, px] or [M, py, px], got {p.shape}")
    py, px = inten.shape
    ny, nx = int(object_shape[0]), int(object_shape[1])
    acc = np.zeros((ny, nx), dtype=np.float64)
    pos = np.floor(np.asarray(positions_px, dtype=np.float64).reshape(-1, 2)).astype(int)
    for iy, ix in pos:
        y0, x0 = max(iy, 0), max(ix, 0)
        y1, x1 = min(iy + py, ny), min(ix + px, nx)
        if y1 <= y0 or x1 <= x0:
            continue
        acc[y0:y1, x0:x1] += inten[y0 - iy : y1 - iy, x0 - ix : x1 - ix]
    mx = acc.max()
    if mx <= 0:
        return np.zeros((ny, nx), dtype=bool)
    return acc / mx > threshold


def in_object_frame(
    image: np.ndarray, shape: tuple[int, int], offset_px: np.ndarray, *, fill: complex = 1.0
) -> np.ndarray:
    """``image`` (e.g. a simulation's true object, in the data's pixel frame) placed on a
    reconstruction's grid of ``shape``, where object pixel = data pixel + ``offset_px`` (the
    run's ``position_offset_px``, rounded); pixels it does not cover get ``fill`` (vacuum).

    ``image [ny, nx, ...]`` -> ``[shape[0], shape[1], ...]``.
    """
    off = np.round(np.asarray(offset_px)).astype(int)
    out = np.full((*shape, *image.shape[2:]), fill, dtype=np.result_type(image, type(fill)))
    src, dst = [], []
    for axis in range(2):
        lo, hi = max(0, -off[axis]), min(image.shape[axis], shape[axis] - off[axis])
        src.append(slice(lo, hi))
        dst.append(slice(lo + off[axis], hi + off[axis]))
    out[tuple(dst)] = image[tuple(src)]
    return out


# --------------------------------------------------------------------------
# holography (paper Sec. 3.2)
# --------------------------------------------------------------------------
def highpass(image: np.ndarray, cutoff_cycles_per_px: float, *, sigma_px: float = 2.5) -> np.ndarray:
    """``image [ny, nx]`` keeping spatial frequencies above ``cutoff_cycles_per_px``, the
    filter's edge smoothed by a Gaussian of ``sigma_px`` frequency pixels (the paper's
    scoring of hologram phases: they carry little of the lowest frequencies)."""
    ny, nx = image.shape
    fy = np.fft.fftshift(np.fft.fftfreq(ny))
    fx = np.fft.fftshift(np.fft.fftfreq(nx))
    keep = (np.hypot(fy[:, None], fx[None, :]) > cutoff_cycles_per_px).astype(np.float64)
    keep = ndimage.gaussian_filter(keep, sigma_px, mode="nearest")
    spec = np.fft.fftshift(np.fft.fft2(image - image.mean()))
    return np.fft.ifft2(np.fft.ifftshift(spec * keep)).real


def hologram_phase_cutoff(wavelength_m: float, mean_distance_m: float, pixel_size_m: float) -> float:
    """The paper's cutoff ``1 / (4 sqrt(lambda z_mean))`` in cycles per pixel."""
    return pixel_size_m / (4.0 * math.sqrt(wavelength_m * mean_distance_m))


def highpass_phase_correlation(
    recon: np.ndarray, truth: np.ndarray, cutoff_cycles_per_px: float
) -> float:
    """Pearson correlation of the high-pass filtered phases of two complex images of the
    same field (global phase removed first)."""
    r = remove_global_phase(np.asarray(recon), np.asarray(truth))
    a = highpass(np.angle(r), cutoff_cycles_per_px).ravel()
    b = highpass(np.angle(truth), cutoff_cycles_per_px).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def highpass_phase_ssim(recon: np.ndarray, truth: np.ndarray, cutoff_cycles_per_px: float) -> float:
    """SSIM of the high-pass filtered phases, each normalised to zero mean and unit standard
    deviation (the paper's scoring: offsets and scalings of the phase do not count)."""
    from skimage.metrics import structural_similarity

    r = remove_global_phase(np.asarray(recon), np.asarray(truth))
    a = highpass(np.angle(r), cutoff_cycles_per_px)
    b = highpass(np.angle(truth), cutoff_cycles_per_px)
    a, b = (a - a.mean()) / a.std(), (b - b.mean()) / b.std()
    return float(structural_similarity(a, b, data_range=float(b.max() - b.min())))


def d_affine(recovered: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Eq. 6 per hologram: ``|A_r A_0 r0 - r0| / |r0|`` with ``r0 = (1, 1)``, ``A_0`` the
    applied distortion (ideal -> recorded, the inverse of the true ``affine``) and ``A_r`` the
    recovered correction (the refined ``affine``, recorded -> ideal); linear parts only (the
    metric ignores translations). ``[n, 2, 3]`` each -> ``[n]``."""
    r0 = np.ones(2)
    out = []
    for ar, a0 in zip(np.asarray(recovered), np.asarray(truth)):
        prod = ar[:, :2] @ np.linalg.inv(a0[:, :2])
        out.append(np.linalg.norm(prod @ r0 - r0) / np.linalg.norm(r0))
    return np.asarray(out)


def affine_corner_error_px(recovered: np.ndarray, truth: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``[n]``: the largest distance, over an image's four corners, between where the
    recovered and the true maps send the corner (pixels; translations included)."""
    ny, nx = shape
    c = np.array([(ny - 1) / 2, (nx - 1) / 2])
    corners = np.array([[0, 0], [0, nx - 1], [ny - 1, 0], [ny - 1, nx - 1]], float) - c

    def sent(a):
        a = np.asarray(a, np.float64)
        return np.einsum("nij,kj->nki", a[:, :, :2], corners) + a[:, None, :, 2]

    return np.linalg.norm(sent(recovered) - sent(truth), axis=-1).max(axis=1)
