"""Probe modes (Sec. 3.4): orthogonalisation, the optimizer's moments transformed with the modes,
and the aperture-defocus start with extra modes seeded from the first."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from adorym_dask.config import ProbeConfig
from adorym_dask.optimizers import OptimizerSpec, ParameterState
from adorym_dask.parameters import (
    initial_probe,
    mode_power_fractions,
    orthogonalize_modes,
    seed_modes,
)
from adorym_dask.physics.probes import defocused_aperture_probe
from adorym_dask.refinement import orthogonalize_probe
from adorym_dask.simulate import simulate_ptychography
from adorym_dask.storage.measurements import open_measurements


def _random_modes(rng, m=3, n=24) -> np.ndarray:
    return (rng.normal(size=(m, n, n)) + 1j * rng.normal(size=(m, n, n))).astype(np.complex128)


def test_orthogonal_ordered_and_predictions_unchanged():
    rng = np.random.default_rng(0)
    probe = _random_modes(rng)
    probe[1] += 2 * probe[0]  # strongly overlapping modes
    modes, mix = orthogonalize_modes(probe)
    gram = np.einsum("ixy,jxy->ij", modes.conj(), modes)
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-9 * np.abs(gram).max())
    power = mode_power_fractions(modes)
    assert np.all(np.diff(power) <= 0) and power.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(mix @ mix.conj().T, np.eye(3), atol=1e-12)
    obj = np.exp(1j * rng.normal(size=(24, 24)))  # incoherent intensities are invariant

    def far(p):
        return (np.abs(np.fft.fft2(p * obj, norm="ortho")) ** 2).sum(axis=0)

    np.testing.assert_allclose(far(modes), far(probe), rtol=1e-10)


def test_moments_follow_the_modes():
    """After orthogonalisation the first moment is the same unitary mixture of the old one, and
    Adam's second moment the mixture by squared magnitudes."""
    rng = np.random.default_rng(1)
    probe = _random_modes(rng).astype(np.complex64)
    ps = ParameterState.start(probe, OptimizerSpec("adam"))
    m = _random_modes(rng).astype(np.complex64)
    v = rng.uniform(0, 1, (*probe.shape, 2)).astype(np.float32)
    ps = ParameterState(probe, {"m": np.stack([m.real, m.imag], -1), "v": v}, ps.step)
    out = orthogonalize_probe(ps)
    _, mix = orthogonalize_modes(probe)
    want_m = np.einsum("ij,jxy->ixy", mix, m)
    np.testing.assert_allclose(out.state["m"][..., 0] + 1j * out.state["m"][..., 1], want_m,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.state["v"], np.einsum("ij,jxyc->ixyc", np.abs(mix) ** 2, v),
                               rtol=1e-4, atol=1e-6)
    single = ParameterState.start(probe[:1], OptimizerSpec("adam"))
    assert orthogonalize_probe(single) is single


def test_seeded_modes_keep_power_and_start_weak():
    rng = np.random.default_rng(2)
    first = _random_modes(rng, m=1).astype(np.complex64)
    modes = seed_modes(first, 5, noise=0.5, seed=3)
    assert modes.shape == (5, 24, 24) and modes.dtype == np.complex64
    assert (np.abs(modes) ** 2).sum() == pytest.approx((np.abs(first) ** 2).sum(), rel=1e-5)
    power = mode_power_fractions(modes)
    assert power[0] > 0.8 and np.all(np.diff(power) <= 1e-9)
    corr = abs(np.vdot(modes[0], first[0])) / np.linalg.norm(modes[0]) / np.linalg.norm(first)
    assert corr > 0.95  # mode 0 is (nearly) the first
    np.testing.assert_array_equal(seed_modes(first, 5, noise=0.5, seed=3), modes)


def test_aperture_defocus_start(tmp_path):
    """probe.init aperture: mode 0 is the annulus Fresnel-propagated by defocus_m, scaled to
    the mean photons per pattern; extra modes are seeded from it."""
    sim = simulate_ptychography(tmp_path / "s.h5", object_shape=(64, 64), probe_shape=(32, 32),
                                n_positions=10, seed=0)
    meas = open_measurements(sim.path)
    cfg = ProbeConfig(init="aperture", aperture_radius_px=8, aperture_inner_radius_px=4,
                      defocus_m=2e-6)
    probe = initial_probe(cfg, meas, n_modes=3, seed=0)
    assert probe.shape == (3, 32, 32)
    with h5py.File(sim.path) as f:
        photons = float(f["intensities"][0].sum(axis=(1, 2)).mean())
    assert (np.abs(probe) ** 2).sum() == pytest.approx(photons, rel=1e-3)
    ref = defocused_aperture_probe((32, 32), radius_px=8, inner_radius_px=4, defocus_m=2e-6,
                                   pixel_size_m=meas.pixel_size_m, wavelength_m=meas.wavelength_m,
                                   photons_per_pattern=1.0)[0].numpy()
    corr = abs(np.vdot(probe[0], ref)) / np.linalg.norm(probe[0]) / np.linalg.norm(ref)
    assert corr > 0.95
