"""Far-field ptychography forward model checked against an independent NumPy oracle.

The package's simulator and its reconstruction model share the same physics kernels
(``adorym_dask.physics``), so a convention error in those kernels (the sign of the sub-pixel
probe shift, the order of transmission and propagation in the multislice, a missing or
misplaced ``fftshift``, the units of the Fresnel kernel, the delta/beta phase sign) would make
simulated data and model agree with each other and go unnoticed by round-trip tests.

This module re-derives the forward model from the written physics conventions alone, in plain
NumPy ``complex128`` with explicit loops over tiles, modes and slices, and without importing
or copying any package kernel:

1. A tile at position ``(y, x)`` (object pixels) has the integer corner ``floor`` of it and
   sees the box pixels ``[iy - y0 : iy - y0 + py, ix - x0 : ix - x0 + px]``.
2. The probe is moved by the fractional part ``s`` with a circular Fourier shift,
   ``P(r - s) = ifft2(fft2(P) exp(-2 pi i (ky sy + kx sx)))``, ``k = fftfreq(n)`` (an integer
   ``s`` gives ``np.roll(P, s)``).
3. Slice transmission: ``re + i im`` (``real_imag``) or
   ``exp(-i k delta L - k beta L)``, ``k = 2 pi / wavelength`` (``delta_beta``).
4. Multislice: multiply by slice 0, then for each further slice propagate by the gap with
   ``H(z) = exp(-i pi wavelength z (fx^2 + fy^2))``, ``f = fftfreq(n, d=pixel_size)``, and
   multiply by that slice; no propagation after the last slice.
5. Far field ``fftshift(fft2(psi, norm="ortho"))``; intensity summed over probe modes.

Only :class:`~adorym_dask.models.ptychography.FarFieldPtychography` and
:class:`~adorym_dask.models.base.Batch` are imported from the package. A last test checks that
the comparison has teeth: oracles with a deliberately wrong convention (opposite shift, no
``fftshift``, no propagation, opposite Fresnel sign, conjugated transmission, object read one
pixel off) differ from the package by far more than the tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adorym_dask.models.base import Batch
from adorym_dask.models.ptychography import FarFieldPtychography

WAVELENGTH = 1e-10  # m
PIXEL = 1e-8  # m
THICKNESS = 2e-8  # m, slice thickness for delta/beta
RTOL = 1e-5
DET = (24, 20)  # (py, px), non-square to catch a swapped axis


# -- the oracle ------------------------------------------------------------------------------
def shift_probe(probe: np.ndarray, shift: tuple[float, float], sign: float = 1.0) -> np.ndarray:
    """``P(r - s)`` for one 2-D probe mode by the Fourier shift theorem (``sign=-1``: P(r + s))."""
    ny, nx = probe.shape
    ky = np.fft.fftfreq(ny)[:, None]
    kx = np.fft.fftfreq(nx)[None, :]
    ramp = np.exp(-2j * np.pi * sign * (ky * shift[0] + kx * shift[1]))
    return np.fft.ifft2(np.fft.fft2(probe) * ramp)


def transmission(a: np.ndarray, b: np.ndarray, representation: str,
                 phase_sign: float = 1.0) -> np.ndarray:
    """Complex transmission of one slice from its two channels (``phase_sign=-1``: wrong)."""
    if representation == "real_imag":
        return a + 1j * phase_sign * b
    k = 2 * np.pi / WAVELENGTH
    return np.exp(-1j * phase_sign * k * a * THICKNESS - k * b * THICKNESS)


def fresnel_kernel(shape: tuple[int, int], z: float, sign: float = 1.0) -> np.ndarray:
    """Angular-spectrum Fresnel transfer function on the unshifted FFT grid."""
    fy = np.fft.fftfreq(shape[0], d=PIXEL)[:, None]
    fx = np.fft.fftfreq(shape[1], d=PIXEL)[None, :]
    return np.exp(-1j * sign * np.pi * WAVELENGTH * z * (fx**2 + fy**2))


def oracle(
    obj: np.ndarray,
    origin: tuple[int, int],
    probe: np.ndarray,
    positions: np.ndarray,
    spacings,
    representation: str,
    *,
    shift_sign: float = 1.0,
    fftshift: bool = True,
    propagate: bool = True,
    fresnel_sign: float = 1.0,
    phase_sign: float = 1.0,
) -> np.ndarray:
    """Predicted intensities ``[G, py, px]``; the keywords switch on deliberate mistakes."""
    n_modes, py, px = probe.shape
    n_slices = obj.shape[2]
    out = np.zeros((len(positions), py, px))
    for g, (y, x) in enumerate(positions):
        iy, ix = int(np.floor(y)), int(np.floor(x))
        fy, fx = y - iy, x - ix
        r0, c0 = iy - origin[0], ix - origin[1]
        assert r0 >= 0 and c0 >= 0 and r0 + py <= obj.shape[0] and c0 + px <= obj.shape[1]
        patch = obj[r0 : r0 + py, c0 : c0 + px]  # [py, px, S, 2]
        trans = [transmission(patch[:, :, s, 0], patch[:, :, s, 1], representation,
                              phase_sign)
                 for s in range(n_slices)]
        for m in range(n_modes):
            psi = shift_probe(probe[m], (fy, fx), sign=shift_sign) * trans[0]
            for j in range(1, n_slices):
                if propagate:
                    h = fresnel_kernel((py, px), spacings[j - 1], sign=fresnel_sign)
                    psi = np.fft.ifft2(np.fft.fft2(psi) * h)
                psi = psi * trans[j]
            far = np.fft.fft2(psi, norm="ortho")
            if fftshift:
                far = np.fft.fftshift(far)
            out[g] += np.abs(far) ** 2
    return out


# -- inputs ----------------------------------------------------------------------------------
def random_object(rng, shape, n_slices, representation):
    """Random, non-uniform object ``[h, w, S, 2]`` with realistic values."""
    h, w = shape
    if representation == "real_imag":
        mag = rng.uniform(0.5, 1.0, (h, w, n_slices))
        phase = rng.uniform(-1.0, 1.0, (h, w, n_slices))
        t = mag * np.exp(1j * phase)
        return np.stack([t.real, t.imag], axis=-1)
    k = 2 * np.pi / WAVELENGTH
    phase = rng.uniform(0.1, 1.0, (h, w, n_slices))  # k delta L in rad
    absorb = rng.uniform(0.0, 0.2, (h, w, n_slices))  # k beta L
    return np.stack([phase / (k * THICKNESS), absorb / (k * THICKNESS)], axis=-1)


def random_probe(rng, n_modes, shape):
    """Random complex probe modes with a smooth-ish envelope (so no mode is trivial)."""
    py, px = shape
    yy, xx = np.meshgrid(np.arange(py) - py / 2, np.arange(px) - px / 2, indexing="ij")
    env = np.exp(-(yy**2 + xx**2) / (2 * (py / 4) ** 2))
    modes = rng.normal(size=(n_modes, py, px)) + 1j * rng.normal(size=(n_modes, py, px))
    return (modes * env * np.array([1.0, 0.6, 0.3][:n_modes])[:, None, None]).astype(np.complex128)


def random_setup(seed, *, n_modes, n_slices, representation, n_tiles=5, origin=(7, 13)):
    rng = np.random.default_rng(seed)
    py, px = DET
    box = (py + 14, px + 17)
    obj = random_object(rng, box, n_slices, representation)
    # absolute positions: fractional part random, integer corner anywhere inside the box
    corner_y = rng.integers(0, box[0] - py, n_tiles) + origin[0]
    corner_x = rng.integers(0, box[1] - px, n_tiles) + origin[1]
    frac = rng.uniform(0.0, 1.0, (n_tiles, 2))
    positions = np.stack([corner_y, corner_x], axis=1) + frac
    probe = random_probe(rng, n_modes, DET)
    return obj, origin, probe, positions


def package_predict(obj, origin, probe, positions, representation, spacings_m,
                    override=None):
    n_slices = obj.shape[2]
    model = FarFieldPtychography(
        det_shape=DET, representation=representation, wavelength_m=WAVELENGTH,
        pixel_size_m=PIXEL, n_modes=probe.shape[0], n_slices=n_slices,
        slice_spacings_m=tuple(spacings_m), slice_thickness_m=THICKNESS, loss_kind="lsq",
    )
    params = {
        "probe": torch.as_tensor(probe, dtype=torch.complex128),
        "positions": torch.as_tensor(positions, dtype=torch.float64),
    }
    if override is not None:
        params["slice_spacings"] = torch.as_tensor(override, dtype=torch.float64)
    batch = Batch(origin=origin, angle=0, tiles=np.arange(len(positions)))
    pred = model.predict(torch.as_tensor(obj, dtype=torch.float64), params, batch)
    assert tuple(pred.shape) == (len(positions), *DET)
    assert pred.dtype == torch.float64
    return pred.detach().numpy()


def assert_close(got, want):
    err = np.max(np.abs(got - want))
    scale = np.max(np.abs(want))
    assert err <= RTOL * scale, f"max abs diff {err:.3e} > {RTOL} * {scale:.3e}"


def rel_err(got, want):
    return np.max(np.abs(got - want)) / np.max(np.abs(want))


# -- tests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("representation", ["real_imag", "delta_beta"])
def test_two_slices_two_modes_match_oracle(representation):
    spacings = (3.7e-6,)
    obj, origin, probe, pos = random_setup(1, n_modes=2, n_slices=2,
                                           representation=representation)
    want = oracle(obj, origin, probe, pos, spacings, representation)
    got = package_predict(obj, origin, probe, pos, representation, spacings)
    assert_close(got, want)


@pytest.mark.parametrize("representation", ["real_imag", "delta_beta"])
def test_three_slices_unequal_spacings_match_oracle(representation):
    spacings = (1.2e-6, 4.6e-6)
    obj, origin, probe, pos = random_setup(2, n_modes=2, n_slices=3,
                                           representation=representation)
    want = oracle(obj, origin, probe, pos, spacings, representation)
    got = package_predict(obj, origin, probe, pos, representation, spacings)
    assert_close(got, want)
    # the gaps are applied in order: swapping them changes the oracle noticeably
    swapped = oracle(obj, origin, probe, pos, spacings[::-1], representation)
    assert rel_err(got, swapped) > 1e3 * RTOL


@pytest.mark.parametrize("representation", ["real_imag", "delta_beta"])
def test_single_slice_single_mode_match_oracle(representation):
    obj, origin, probe, pos = random_setup(3, n_modes=1, n_slices=1,
                                           representation=representation, origin=(5, 2))
    want = oracle(obj, origin, probe, pos, (), representation)
    got = package_predict(obj, origin, probe, pos, representation, ())
    assert_close(got, want)


def test_integer_positions_match_oracle():
    """Whole-pixel positions (zero fractional shift) take the package's unshifted path."""
    obj, origin, probe, pos = random_setup(4, n_modes=2, n_slices=2,
                                           representation="real_imag")
    pos = np.floor(pos)
    spacings = (2.5e-6,)
    want = oracle(obj, origin, probe, pos, spacings, "real_imag")
    got = package_predict(obj, origin, probe, pos, "real_imag", spacings)
    assert_close(got, want)


def test_oracle_shift_is_a_roll_for_integer_shift():
    """Self-check of the oracle's shift convention: an integer shift equals ``np.roll(+s)``."""
    rng = np.random.default_rng(5)
    p = rng.normal(size=DET) + 1j * rng.normal(size=DET)
    np.testing.assert_allclose(shift_probe(p, (3.0, -2.0)), np.roll(p, (3, -2), axis=(0, 1)),
                               atol=1e-12)


@pytest.mark.parametrize("representation", ["real_imag", "delta_beta"])
def test_slice_spacings_param_overrides_config(representation):
    config_spacings = (1.0e-6,)
    override = (4.5e-6,)
    obj, origin, probe, pos = random_setup(6, n_modes=2, n_slices=2,
                                           representation=representation)
    got = package_predict(obj, origin, probe, pos, representation, config_spacings,
                          override=override)
    assert_close(got, oracle(obj, origin, probe, pos, override, representation))
    # and the configured spacing would have given something measurably different
    assert rel_err(got, oracle(obj, origin, probe, pos, config_spacings, representation)) \
        > 1e3 * RTOL


@pytest.mark.parametrize("representation", ["real_imag", "delta_beta"])
def test_wrong_conventions_are_caught(representation):
    """Oracles with a deliberate convention error differ from the package far beyond RTOL."""
    spacings = (3.7e-6,)
    obj, origin, probe, pos = random_setup(1, n_modes=2, n_slices=2,
                                           representation=representation)
    got = package_predict(obj, origin, probe, pos, representation, spacings)
    wrong = {
        "opposite probe shift": dict(shift_sign=-1.0),
        "no fftshift": dict(fftshift=False),
        "no propagation": dict(propagate=False),
        "opposite Fresnel sign": dict(fresnel_sign=-1.0),
        "conjugated transmission": dict(phase_sign=-1.0),
    }
    for name, kw in wrong.items():
        err = rel_err(got, oracle(obj, origin, probe, pos, spacings, representation, **kw))
        assert err > 1e3 * RTOL, f"{name}: only {err:.2e} relative difference"
    # reading the object one pixel off (origin / corner handling) is caught too
    err = rel_err(got, oracle(obj, (origin[0] - 1, origin[1]), probe, pos, spacings,
                              representation))
    assert err > 1e3 * RTOL
