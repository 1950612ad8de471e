"""Data-mismatch terms, normalised per detector pixel [eq. 4, eq. 5].

Each returns the per-tile loss ``[G]``: the mean over the detector pixels that the mask keeps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# Keeps sqrt and log differentiable where the prediction is exactly zero; far below one photon.
_EPS = 1e-9


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return values.mean(dim=(-2, -1))
    m = mask.to(values.dtype)
    return (values * m).sum(dim=(-2, -1)) / m.sum().clamp_min(1.0)


def lsq_amplitude(pred: Tensor, meas: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Least squares on amplitudes [eq. 4].

    Parameters
    ----------
    pred, meas : Tensor
        ``[G, dy, dx]`` predicted and measured intensities (photons).
    mask : Tensor, optional
        ``[dy, dx]`` bool, False where a pixel is ignored.

    Returns
    -------
    Tensor
        ``[G]`` mean of ``(sqrt(pred) - sqrt(meas))**2`` over the kept pixels.
    """
    diff = torch.sqrt(pred + _EPS) - torch.sqrt(meas.clamp_min(0.0))
    return _masked_mean(diff * diff, mask)


def poisson(pred: Tensor, meas: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Poisson negative log-likelihood [eq. 5], offset to its deviance.

    ``pred - meas - meas log(pred / meas)`` (with ``0 log 0 = 0``) differs from eq. 5's
    ``pred - meas log pred`` by a term of the data alone, so the gradient is the same; the
    offset makes the value 0 at a perfect fit and never negative, so losses of different runs
    and the divergence check compare like with like (half the deviance per pixel).

    Shapes as in :func:`lsq_amplitude`.
    """
    meas = meas.clamp_min(0.0)
    return _masked_mean(pred - meas - meas * torch.log((pred + _EPS) / (meas + _EPS)), mask)


LOSSES: dict[str, Callable[..., Tensor]] = {"lsq": lsq_amplitude, "poisson": poisson}
