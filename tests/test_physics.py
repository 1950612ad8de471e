"""Analytic-oracle tests for adorym_dask.physics (all in float64 / complex128)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special

from adorym_dask.physics import (
    defocused_aperture_probe,
    disk_aperture,
    fourier_shift,
    fraunhofer,
    fresnel_propagate,
    fresnel_transfer_function,
    multislice,
    normalize_probe_power,
    transmission_from_delta_beta,
    wavelength_m,
)

C128 = torch.complex128
F64 = torch.float64

# Physical units used by most tests: 10 nm pixels, 0.1 nm wavelength.
DX = 1e-8
LAM = 1e-10


def _rand_field(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.complex(
        torch.randn(shape, generator=g, dtype=F64), torch.randn(shape, generator=g, dtype=F64)
    )


def test_wavelength():
    # h c = 1.239841984e-6 eV m -> 12.39841984 keV is exactly 1 Angstrom.
    assert wavelength_m(12398.41984) == pytest.approx(1e-10, rel=1e-12)
    with pytest.raises(ValueError):
        wavelength_m(0.0)


# --------------------------------------------------------------------------
# Fresnel propagation
# --------------------------------------------------------------------------


def test_gaussian_beam_rayleigh_range():
    """Gaussian waist propagated to z_R: w = w0 sqrt(2) and Gouy phase -pi/4.

    Analytic field with exp(+ikz) dropped:
    u(r, z) = (w0/w) exp(-r^2/w^2) exp(i k r^2 / (2R)) exp(-i arctan(z/z_R)).
    Sampling: w0 = 8 px in a 128 px window -> the spectrum at Nyquist is
    ~exp(-pi^2 w0^2 / 4) ~ 1e-69 and the intensity at the window edge (64 px,
    w = 11.3 px) is ~exp(-64): the sampled problem matches the continuous one
    to round-off (Poisson summation), so tolerances are ~1e-9 (float64 FFT
    round-off on a 128^2 grid is ~1e-13; margin for accumulation).
    """
    n = 128
    w0 = 8 * DX
    z_r = math.pi * w0**2 / LAM
    c = n // 2
    y = (torch.arange(n, dtype=F64) - c) * DX
    r2 = y[:, None] ** 2 + y[None, :] ** 2
    u0 = torch.exp(-r2 / w0**2).to(C128)
    uz = fresnel_propagate(u0, pixel_size_m=DX, wavelength_m=LAM, distance_m=z_r)

    # 1/e^2 intensity radius from the second moment: <r^2> = w^2 / 2.
    inten = uz.abs() ** 2
    w_fit = torch.sqrt(2 * (inten * r2).sum() / inten.sum())
    assert w_fit.item() == pytest.approx(w0 * math.sqrt(2), rel=1e-9)

    # Gouy phase on axis relative to the input: -arctan(1) = -pi/4.
    gouy = torch.angle(uz[c, c] / u0[c, c]).item()
    assert gouy == pytest.approx(-math.pi / 4, abs=1e-9)

    # Full analytic field (R(z_R) = 2 z_R, w = w0 sqrt 2).
    k = 2 * math.pi / LAM
    w = w0 * math.sqrt(2)
    ana = (w0 / w) * torch.exp(-r2 / w**2) * torch.exp(1j * (k * r2 / (4 * z_r) - math.pi / 4))
    assert torch.allclose(uz, ana, atol=1e-9, rtol=0)


def test_talbot_self_imaging():
    """A periodic field returns to itself at z_T = 2 d^2 / lambda.

    With d = 16 px in a 128 px window, the only frequencies present are m/d,
    where H = exp(-i pi lambda z_T m^2 / d^2) = exp(-2 pi i m^2) = 1, so the
    revival is exact up to float64 round-off of phases <= 2 pi * 128 (~1e-12).
    At z_T / 2, H = (-1)^(m_x + m_y): the image is shifted by half a period.
    """
    n, p = 128, 16
    d = p * DX
    tile = _rand_field((p, p), seed=1)
    u0 = tile.repeat(n // p, n // p)
    z_t = 2 * d**2 / LAM
    uz = fresnel_propagate(u0, pixel_size_m=DX, wavelength_m=LAM, distance_m=z_t)
    assert torch.allclose(uz, u0, atol=1e-10, rtol=0)
    assert torch.allclose(uz.abs() ** 2, u0.abs() ** 2, atol=1e-10, rtol=0)
    uh = fresnel_propagate(u0, pixel_size_m=DX, wavelength_m=LAM, distance_m=z_t / 2)
    assert torch.allclose(uh, torch.roll(u0, (p // 2, p // 2), dims=(-2, -1)), atol=1e-10)


def _fresnel_slit_1d(x, a, b, lam, z):
    """Analytic 1D Fresnel diffraction of a slit [a, b] (exp(ikz) dropped).

    u(x) = 1/sqrt(2i) [ (C(v2) - C(v1)) + i (S(v2) - S(v1)) ],
    v = sqrt(2 / (lambda z)) (x' - x).
    """
    s = math.sqrt(2.0 / (lam * z))
    s1, c1 = special.fresnel(s * (a - x))
    s2, c2 = special.fresnel(s * (b - x))
    return ((c2 - c1) + 1j * (s2 - s1)) / np.sqrt(2j)


def test_fresnel_slit():
    """Slit, uniform along y, vs. the analytic Fresnel-integral solution.

    Window 32768 x 4 px, slit 1024 px, lambda z = 2e4 dx^2 (Fresnel scale
    sqrt(lambda z / 2) = 100 px, Fresnel number W^2 / (lambda z) = 52, and
    lambda z < N dx^2 so H is not aliased).
    Error budget: the discrete propagation is the exact propagation of the
    band-limited (|f| < 1 / (2 dx)) periodic interpolant of the samples.
    Paraxially, frequency f is deflected by lambda z f, so everything the
    grid cannot represent lands > lambda z / (2 dx) = 1e4 px away from each
    edge, where the Fresnel tail amplitude is ~1 / (pi sqrt(2) v) with
    v = sqrt(2 / (lambda z)) * 1e4 px = 100, i.e. <~2e-3. The periodic
    replicas of the slit (> 3e4 px away) likewise only contribute beyond the
    band, so the correct oracle is the single-slit solution (measured: adding
    replicas makes the agreement *worse*, 3e-3). Measured max error in the
    compared region (+-1.5 slit widths) is 3e-4 in amplitude and 2.3e-4 in
    intensity; we allow 1e-3.
    """
    ny, nx = 4, 32768
    z = 2e4 * DX**2 / LAM
    w_px = 1024
    c = nx // 2
    i0, i1 = c - w_px // 2, c + w_px // 2
    u0 = torch.zeros((ny, nx), dtype=C128)
    u0[:, i0:i1] = 1.0
    uz = fresnel_propagate(u0, pixel_size_m=DX, wavelength_m=LAM, distance_m=z)
    # uniform along y
    assert torch.allclose(uz, uz[:1].expand_as(uz), atol=1e-12)

    x = np.arange(nx, dtype=np.float64) * DX
    a, b = (i0 - 0.5) * DX, (i1 - 0.5) * DX  # pixel i covers [i-0.5, i+0.5)
    ana = _fresnel_slit_1d(x, a, b, LAM, z)
    sl = slice(c - 3 * w_px // 2, c + 3 * w_px // 2)
    num = uz[0].numpy()[sl]
    assert np.abs(num - ana[sl]).max() < 1e-3
    # intensity fringes (|u|^2 reaches ~1.8 near the edges)
    assert np.abs(np.abs(num) ** 2 - np.abs(ana[sl]) ** 2).max() < 1e-3
    # sanity: there are real fringes to compare against
    assert np.abs(ana[sl]).max() ** 2 > 1.3


def test_composition_and_energy():
    """P(z1) P(z2) = P(z1+z2) and Parseval (exact identities: 1e-12 round-off)."""
    u = _rand_field((3, 64, 64), seed=2)
    kw = dict(pixel_size_m=DX, wavelength_m=LAM)
    z1, z2 = 3e-5, -1.2e-5
    a = fresnel_propagate(fresnel_propagate(u, distance_m=z1, **kw), distance_m=z2, **kw)
    b = fresnel_propagate(u, distance_m=z1 + z2, **kw)
    assert torch.allclose(a, b, atol=1e-12, rtol=0)
    e0 = (u.abs() ** 2).sum((-2, -1))
    e1 = (fresnel_propagate(u, distance_m=z1, **kw).abs() ** 2).sum((-2, -1))
    e2 = (fraunhofer(u).abs() ** 2).sum((-2, -1))
    assert torch.allclose(e1, e0, rtol=1e-12)
    assert torch.allclose(e2, e0, rtol=1e-12)


def test_transfer_function_tensor_distance():
    """Tensor distance of shape [B] gives [B, ny, nx] equal to the float path."""
    zs = torch.tensor([1e-5, -2e-5, 3e-4], dtype=F64)
    h = fresnel_transfer_function(
        (16, 12), pixel_size_m=DX, wavelength_m=LAM, distance_m=zs, dtype=C128
    )
    assert h.shape == (3, 16, 12) and h.dtype == C128
    for i, z in enumerate(zs.tolist()):
        hi = fresnel_transfer_function((16, 12), pixel_size_m=DX, wavelength_m=LAM,
                                       distance_m=z, dtype=C128)
        assert torch.allclose(h[i], hi, atol=1e-14)
    assert h[..., 0, 0].eq(1).all()  # DC unchanged
    h64 = fresnel_transfer_function((8, 8), pixel_size_m=DX, wavelength_m=LAM, distance_m=1e-5)
    assert h64.dtype == torch.complex64


# --------------------------------------------------------------------------
# Fraunhofer
# --------------------------------------------------------------------------


def test_airy_pattern():
    """|fraunhofer(disk)|^2 vs [2 J1(v)/v]^2, v = 2 pi a rho, normalised at peak.

    Disk of radius 40 px in a 1024 px window: first zero at 1.22 N / (2a)
    = 15.6 px, so the first rings are sampled by ~16 px. ``a`` is taken as the
    area-equivalent radius of the pixelated disk. Residual errors come from
    the staircase edge (spectrum aliasing, ~1/a relative at the rim) and the
    implicit pixel box (sinc(rho) ~ 1 - 4e-3 at rho = 0.05); the measured max
    error along the line up to the 3rd zero is ~1e-3 of the peak, so 5e-3.
    """
    n, rad = 1024, 40.0
    disk = disk_aperture((n, n), radius_px=rad, dtype=C128)
    a_eff = math.sqrt(disk.real.sum().item() / math.pi)
    far = fraunhofer(disk)
    inten = (far.abs() ** 2).numpy()
    c = n // 2
    assert np.unravel_index(np.argmax(inten), inten.shape) == (c, c)
    k = np.arange(1, 55)  # up to ~3.5 zeros
    rho = k / n
    v = 2 * np.pi * a_eff * rho
    ana = (2 * special.j1(v) / v) ** 2
    for line in (inten[c, c + k], inten[c + k, c], inten[c, c - k]):
        assert np.abs(line / inten[c, c] - ana).max() < 5e-3


# --------------------------------------------------------------------------
# Transmission / multislice
# --------------------------------------------------------------------------


def test_uniform_slab_multislice():
    """N slices of thickness L/N of a uniform slab == one slab of thickness L.

    A plane wave is an eigenfunction of H with eigenvalue H(0) = 1, so the
    comparison is exact up to round-off (1e-12).
    """
    delta, beta, length = 1e-6, 1e-8, 2e-5
    k = 2 * math.pi / LAM
    d = torch.full((16, 16), delta, dtype=F64)
    b = torch.full((16, 16), beta, dtype=F64)
    t_full = transmission_from_delta_beta(d, b, wavelength_m=LAM, thickness_m=length)
    expect = complex(np.exp(-1j * k * delta * length - k * beta * length))
    assert t_full.dtype == C128
    assert torch.allclose(t_full, torch.full_like(t_full, expect), atol=1e-14)

    n_sl = 7
    t = transmission_from_delta_beta(d, b, wavelength_m=LAM, thickness_m=length / n_sl)
    slices = t.expand(n_sl, 16, 16)
    h = fresnel_transfer_function(
        (16, 16), pixel_size_m=DX, wavelength_m=LAM, distance_m=length / n_sl, dtype=C128
    )
    psi = torch.ones((2, 16, 16), dtype=C128)
    out = multislice(psi, slices, transfer_function=h)
    assert torch.allclose(out, torch.full_like(out, expect), atol=1e-12)


def test_multislice_broadcast_and_errors():
    """psi [G, M, ny, nx] with slices [S, G, 1, ny, nx] equals explicit loops."""
    g_, m_, s_, n = 2, 3, 3, 8
    psi = _rand_field((g_, m_, n, n), seed=3)
    slices = _rand_field((s_, g_, 1, n, n), seed=4)
    h = fresnel_transfer_function((n, n), pixel_size_m=1.0, wavelength_m=1.0,
                                  distance_m=0.7, dtype=C128)
    out = multislice(psi, slices, transfer_function=h)
    assert out.shape == (g_, m_, n, n)
    for gi in range(g_):
        for mi in range(m_):
            p = psi[gi, mi]
            for j in range(s_):
                p = p * slices[j, gi, 0]
                if j < s_ - 1:
                    p = torch.fft.ifft2(torch.fft.fft2(p) * h)
            assert torch.allclose(out[gi, mi], p, atol=1e-12)
    with pytest.raises(ValueError):
        multislice(psi, slices, transfer_function=None)
    one = multislice(psi, slices[:1], transfer_function=None)
    assert torch.allclose(one, psi * slices[0])


# --------------------------------------------------------------------------
# Fourier shift
# --------------------------------------------------------------------------


def test_fourier_shift_integer_equals_roll():
    x = _rand_field((2, 3, 16, 20), seed=5)
    shifts = torch.tensor([[3.0, -5.0], [-7.0, 2.0], [0.0, 19.0]], dtype=F64)  # [3, 2]
    y = fourier_shift(x, shifts)
    for i, (dy, dx) in enumerate(shifts.long().tolist()):
        assert torch.allclose(y[:, i], torch.roll(x[:, i], (dy, dx), dims=(-2, -1)), atol=1e-12)
    # single shift broadcast over everything
    y1 = fourier_shift(x, torch.tensor([1.0, 1.0], dtype=F64))
    assert torch.allclose(y1, torch.roll(x, (1, 1), dims=(-2, -1)), atol=1e-12)


def test_fourier_shift_composition_and_subpixel_gaussian():
    """Shift(a) Shift(b) = Shift(a+b) exactly; sub-pixel shift of a Gaussian.

    Gaussian sigma = 4 px in 64 px: spectrum at Nyquist ~exp(-2 pi^2 sigma^2 /4)
    ~1e-35 and wrap-around tail ~exp(-32) ~1e-14, so the band-limited periodic
    interpolation equals the analytic shifted Gaussian to ~1e-12.
    """
    x = _rand_field((32, 32), seed=6)
    a = torch.tensor([0.3, -1.7], dtype=F64)
    b = torch.tensor([2.45, 0.9], dtype=F64)
    assert torch.allclose(fourier_shift(fourier_shift(x, a), b), fourier_shift(x, a + b),
                          atol=1e-12)

    n, sig = 64, 4.0
    c = n // 2
    yy = torch.arange(n, dtype=F64)[:, None] - c
    xx = torch.arange(n, dtype=F64)[None, :] - c
    g0 = torch.exp(-(yy**2 + xx**2) / (2 * sig**2)).to(C128)
    dy, dx = 0.37, -2.81
    g = fourier_shift(g0, torch.tensor([dy, dx], dtype=F64))
    ana = torch.exp(-((yy - dy) ** 2 + (xx - dx) ** 2) / (2 * sig**2)).to(C128)
    assert torch.allclose(g, ana, atol=1e-12, rtol=0)


# --------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------


def test_gradchecks():
    n = 8
    kw = dict(pixel_size_m=1.0, wavelength_m=1.0)  # dimensionless: phases O(1)
    psi = _rand_field((2, n, n), seed=7).requires_grad_()
    assert torch.autograd.gradcheck(fraunhofer, (psi,))

    z = torch.tensor(0.8, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda p, zz: fresnel_propagate(p, distance_m=zz, **kw), (psi, z)
    )
    zb = torch.tensor([0.5, -1.3], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda p, zz: fresnel_propagate(p, distance_m=zz, **kw), (psi, zb)
    )

    slices = _rand_field((3, 2, n, n), seed=8).requires_grad_()
    h = fresnel_transfer_function((n, n), distance_m=0.6, dtype=C128, **kw)
    psi0 = _rand_field((2, n, n), seed=9)
    assert torch.autograd.gradcheck(
        lambda s: multislice(psi0, s, transfer_function=h), (slices,)
    )

    sh = torch.tensor([[0.3, -1.2], [2.1, 0.45]], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(fourier_shift, (psi, sh))

    d = (torch.rand((4, 5), dtype=F64) * 1e-2).requires_grad_()
    bb = (torch.rand((4, 5), dtype=F64) * 1e-3).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda dd, be: transmission_from_delta_beta(dd, be, wavelength_m=1.0, thickness_m=5.0),
        (d, bb),
    )


# --------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------


def test_disk_aperture():
    ap = disk_aperture((32, 33), radius_px=5.0, inner_radius_px=2.0, dtype=C128)
    assert ap.shape == (32, 33) and ap.dtype == C128
    assert ap[16, 16] == 0 and ap[16, 16 + 3] == 1 and ap[16, 16 + 6] == 0
    full = disk_aperture((32, 32), radius_px=5.0)
    assert full.dtype == torch.complex64 and full[16, 16] == 1
    # pixel count of a disk ~ pi r^2 (lattice-point count)
    assert abs(full.real.sum().item() - math.pi * 25) < 10


def test_defocused_aperture_probe():
    kw = dict(radius_px=8.0, inner_radius_px=2.0, defocus_m=2e-5, pixel_size_m=DX,
              wavelength_m=LAM, photons_per_pattern=1e7, dtype=C128)
    p = defocused_aperture_probe((48, 48), n_modes=3, seed=3, **kw)
    assert p.shape == (3, 48, 48) and p.dtype == C128
    assert (p.abs() ** 2).sum().item() == pytest.approx(1e7, rel=1e-12)
    pw = (p.abs() ** 2).sum((-2, -1))
    assert (pw[1] / pw[0]).item() == pytest.approx(0.1, rel=1e-10)
    assert (pw[2] / pw[0]).item() == pytest.approx(0.01, rel=1e-10)
    p2 = defocused_aperture_probe((48, 48), n_modes=3, seed=3, **kw)
    assert torch.equal(p, p2)
    p3 = defocused_aperture_probe((48, 48), n_modes=3, seed=4, **kw)
    assert torch.allclose(p3[0], p[0]) and not torch.allclose(p3[1], p[1])
    # mode 0 is the propagated aperture
    ap = disk_aperture((48, 48), radius_px=8.0, inner_radius_px=2.0, dtype=C128)
    m0 = fresnel_propagate(ap, pixel_size_m=DX, wavelength_m=LAM, distance_m=2e-5)
    m0 = m0 * (p[0].abs().sum() / m0.abs().sum())
    assert torch.allclose(p[0], m0, atol=1e-9)
    single = defocused_aperture_probe((32, 32), radius_px=6.0, defocus_m=1e-5,
                                      pixel_size_m=DX, wavelength_m=LAM)
    assert single.shape == (1, 32, 32) and single.dtype == torch.complex64
    assert (single.abs() ** 2).sum().item() == pytest.approx(1e6, rel=1e-4)


def test_normalize_probe_power():
    p = _rand_field((2, 3, 8, 8), seed=10)
    q = normalize_probe_power(p, 100.0)
    assert (q.abs() ** 2).sum().item() == pytest.approx(100.0, rel=1e-12)
    qb = normalize_probe_power(p, 5.0, dim=(-3, -2, -1))
    assert torch.allclose((qb.abs() ** 2).sum((-3, -2, -1)), torch.full((2,), 5.0, dtype=F64))
