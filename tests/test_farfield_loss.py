"""The fused far-field loss equals the loss of the predicted intensities, gradients included.

The oracle is autograd through ``fraunhofer`` (fftshift of ``fft2(psi, ortho)``), the sum of
``|F|^2`` over modes and ``LOSSES[kind]``: the same mathematics without the closed form.
"""

from __future__ import annotations

import pytest
import torch

from adorym_dask.models.losses import LOSSES, farfield_loss
from adorym_dask.physics.propagation import fraunhofer


def _case(seed: int, dtype=torch.complex128):
    g = torch.Generator().manual_seed(seed)
    psi = torch.randn(3, 2, 16, 12, generator=g, dtype=dtype) * 4
    meas = torch.poisson((torch.randn(3, 16, 12, generator=g, dtype=torch.float64) * 5) ** 2)
    meas[0, 0, 0] = 0.0  # zero counts must stay finite
    mask = torch.rand(16, 12, generator=g) > 0.2
    return psi, meas.to(psi.real.dtype), mask


@pytest.mark.parametrize("kind", ["lsq", "poisson"])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_loss_and_gradient_match_autograd(kind, masked):
    psi, meas, mask = _case(1)
    mask = mask if masked else None
    a = psi.clone().requires_grad_(True)
    far = fraunhofer(a)
    ref = LOSSES[kind]((far.real**2 + far.imag**2).sum(dim=1), meas, mask=mask)
    w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    (ref * w).sum().backward()
    b = psi.clone().requires_grad_(True)
    got = farfield_loss(b, meas, kind=kind, mask=mask)
    (got * w).sum().backward()
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12)


def test_fused_loss_passes_gradcheck():
    psi, meas, _ = _case(2)
    psi = psi[:1, :1, :6, :5].clone().requires_grad_(True)
    meas = meas[:1, :6, :5] + 1.0
    assert torch.autograd.gradcheck(lambda p: farfield_loss(p, meas, kind="lsq"), (psi,))
