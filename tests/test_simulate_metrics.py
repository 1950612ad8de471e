"""Fast tests of adorym_dask.simulate, adorym_dask.metrics and the reference ePIE."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from adorym_dask import metrics
from adorym_dask import simulate as sim

from epie import epie


# --------------------------------------------------------------------------
# test object and scans
# --------------------------------------------------------------------------
def test_test_object_ranges():
    o = sim.test_object((96, 80), magnitude_range=(0.5, 0.9), phase_range_rad=(-1.0, 0.3))
    assert o.shape == (96, 80) and o.dtype == np.complex64
    mag, ph = np.abs(o), np.angle(o)
    assert mag.min() == pytest.approx(0.5, abs=1e-5)
    assert mag.max() == pytest.approx(0.9, abs=1e-5)
    assert ph.min() == pytest.approx(-1.0, abs=1e-5)
    assert ph.max() == pytest.approx(0.3, abs=1e-5)
    # magnitude and phase come from different images
    assert abs(np.corrcoef(mag.ravel(), ph.ravel())[0, 1]) < 0.9


def _check_inside(pos, object_shape, probe_shape):
    assert pos.ndim == 2 and pos.shape[1] == 2 and pos.dtype == np.float64
    assert np.all(pos >= 0)
    ij = np.floor(pos).astype(int)
    assert np.all(ij + np.asarray(probe_shape) <= np.asarray(object_shape) - 1)
    assert np.all(pos + np.asarray(probe_shape) <= np.asarray(object_shape))


@pytest.mark.parametrize("n", [1, 7, 50, 300, 1000])
@pytest.mark.parametrize("shapes", [((256, 256), (128, 128)), ((100, 180), (32, 48))])
def test_fermat_scan_exact_count_inside(n, shapes):
    obj_shape, probe_shape = shapes
    pos = sim.fermat_spiral_scan(obj_shape, probe_shape, n_positions=n, seed=3)
    assert pos.shape == (n, 2)
    _check_inside(pos, obj_shape, probe_shape)
    if n >= 50:
        # fills the allowed region, not just its centre
        ext = np.asarray(obj_shape) - np.asarray(probe_shape) - 1
        span = pos.max(0) - pos.min(0)
        assert np.all(span > 0.85 * ext)
        assert len(np.unique(np.round(pos, 6), axis=0)) == n


def test_raster_scan_inside():
    for jitter in (0.0, 3.0):
        pos = sim.raster_scan((120, 150), (40, 40), step_px=9.0, jitter_px=jitter, seed=1)
        _check_inside(pos, (120, 150), (40, 40))
        assert len(pos) == 10 * 14  # ceil(79 / 9) + 1, ceil(109 / 9) + 1
    pos = sim.raster_scan((120, 150), (40, 40), step_px=9.0)
    steps = np.diff(np.unique(pos[:, 1]))
    assert np.all(steps <= 9.0 + 1e-9)


def test_default_probe_shape_power():
    p = sim.default_probe((64, 64), energy_ev=10000.0, pixel_size_m=1e-8, n_modes=2,
                          photons_per_pattern=1e5)
    assert p.shape == (2, 64, 64) and p.dtype == np.complex64
    assert np.sum(np.abs(p) ** 2) == pytest.approx(1e5, rel=1e-4)
    a = np.abs(p[0])
    edge = max(a[0].max(), a[-1].max(), a[:, 0].max(), a[:, -1].max())
    assert edge < 0.02 * a.max()  # decays smoothly inside the window


# --------------------------------------------------------------------------
# simulation
# --------------------------------------------------------------------------
def _read_intensities(path):
    import h5py

    with h5py.File(path, "r") as f:
        return np.asarray(f["intensities"])


def test_simulation_energy_conservation(tmp_path):
    rng = np.random.default_rng(0)
    phase = ndimage.gaussian_filter(rng.normal(size=(72, 72, 2)), (2, 2, 0)) * 5
    obj = np.exp(1j * phase).astype(np.complex64)  # |O| = 1
    for slices in (1, 2):
        out = tmp_path / f"sim{slices}.h5"
        res = sim.simulate_ptychography(
            out, obj=obj[:, :, :slices], probe_shape=(32, 32), n_positions=40,
            probe_modes=2, photons_per_pattern=1e5, seed=1,
        )
        assert res.object.shape == (72, 72, slices)
        assert res.probe.shape == (2, 32, 32)
        assert res.positions_px.shape == (40, 2)
        assert np.any(res.positions_px % 1 != 0)  # fractional shifts exercised
        inten = _read_intensities(out)
        assert inten.shape[-3:] == (40, 32, 32)
        sums = inten.reshape(40, -1).sum(1)
        np.testing.assert_allclose(sums, 1e5, rtol=1e-3)
        assert np.load(sim.probe_npy_path(out)).shape == (2, 32, 32)
        with pytest.raises(FileExistsError):
            sim.simulate_ptychography(out, obj=obj[:, :, :slices], probe_shape=(32, 32),
                                      n_positions=40)


def test_simulation_cli_and_ground_truth(tmp_path):
    import h5py

    out = tmp_path / "cli.h5"
    argv = ["ptychography", str(out), "--object-size", "80", "80", "--probe-size", "32", "32",
            "--positions", "25", "--scan", "raster", "--slices", "2", "--poisson",
            "--photons", "1e4"]
    assert sim.main_simulate(argv) == 0
    with h5py.File(out, "r") as f:
        inten = np.asarray(f["intensities"])
        gt = np.asarray(f["ground_truth/object"])
        gp = np.asarray(f["ground_truth/probe"])
    assert gt.shape == (80, 80, 2, 2) and gt.dtype == np.float32
    assert gp.shape == (1, 32, 32, 2)
    assert np.all(inten == np.round(inten)) and inten.min() >= 0  # Poisson counts
    assert sim.main_simulate(argv) == 1  # refuses to overwrite
    assert sim.main_simulate(argv + ["--overwrite"]) == 0


# --------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def obj64():
    return sim.test_object((64, 64), phase_range_rad=(-1.0, 1.0))


def test_phase_ssim_identity_and_global_phase(obj64):
    assert metrics.phase_ssim(obj64, obj64) == pytest.approx(1.0, abs=1e-9)
    rotated = obj64 * np.exp(1j * 0.7)
    assert metrics.phase_ssim(rotated, obj64) == pytest.approx(1.0, abs=1e-5)
    assert metrics.phase_rmse(rotated, obj64) == pytest.approx(0.0, abs=1e-5)
    mask = np.zeros(obj64.shape, bool)
    mask[10:50, 5:40] = True
    assert metrics.phase_ssim(rotated, obj64, mask=mask) == pytest.approx(1.0, abs=1e-5)
    noisy = obj64 * np.exp(1j * 0.3 * np.random.default_rng(0).normal(size=obj64.shape))
    assert metrics.phase_ssim(noisy, obj64) < 0.9
    assert metrics.phase_rmse(noisy, obj64) == pytest.approx(0.3, rel=0.1)


def test_remove_global_phase(obj64):
    r = metrics.remove_global_phase(obj64 * np.exp(-2.0j), obj64)
    np.testing.assert_allclose(r, obj64, atol=1e-5)


def test_aligned_phase_correlation_recovers_shift(obj64):
    big = sim.test_object((128, 128), phase_range_rad=(-1.0, 1.0))
    shifted = np.fft.ifft2(ndimage.fourier_shift(np.fft.fft2(big), (3.3, -2.6)))
    shifted = shifted * np.exp(0.4j)
    aligned, shift = metrics.align_images(shifted, big, upsample_factor=20)
    np.testing.assert_allclose(shift, (-3.3, 2.6), atol=0.06)
    assert metrics.aligned_phase_correlation(shifted, big) > 0.99
    # without alignment the phases correlate much worse
    raw = np.corrcoef(np.angle(shifted * np.exp(-0.4j)).ravel(), np.angle(big).ravel())[0, 1]
    assert raw < 0.95


def test_illumination_mask():
    probe = np.zeros((2, 16, 16), np.complex64)
    probe[:, 4:12, 4:12] = 1.0
    pos = np.array([[0.0, 0.0], [10.5, 20.2]])
    m = metrics.illumination_mask(probe, pos, (40, 50))
    assert m.shape == (40, 50) and m.dtype == bool
    assert m[8, 8] and m[18, 28] and not m[0, 0] and not m[39, 49]
    assert m.sum() == 2 * 64


# --------------------------------------------------------------------------
# reference ePIE on a small self-made simulation
# --------------------------------------------------------------------------
def test_epie_converges_on_small_simulation():
    rng = np.random.default_rng(0)
    n, p = 64, 16
    obj = sim.test_object((n, n), magnitude_range=(0.7, 1.0), phase_range_rad=(-0.8, 0.8))
    obj = obj.astype(np.complex128)
    yy, xx = np.mgrid[:p, :p] - p / 2 + 0.5
    probe = np.exp(-(yy**2 + xx**2) / (2 * 3.5**2)) * np.exp(0.02j * (yy**2 + xx**2))
    probe *= np.sqrt(1e4 / np.sum(np.abs(probe) ** 2))
    g = np.arange(0, n - p + 1, 3)
    scan = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2).astype(float)
    scan[1:-1] += rng.uniform(-0.4, 0.4, size=(len(scan) - 2, 2))  # rounded away by ePIE
    ij = np.rint(scan).astype(int)
    data = np.stack([
        np.abs(np.fft.fft2(probe * obj[i:i + p, j:j + p], norm="ortho")) ** 2 for i, j in ij
    ])
    # start from a blurred, slightly wrong probe
    probe0 = ndimage.gaussian_filter(np.abs(probe), 1.0) * 1.1
    errs: list[float] = []
    rec, _ = epie(data, scan, probe0, (n, n), n_iter=40, seed=0, errors=errs)
    assert len(errs) == 41
    assert errs[-1] < errs[0] / 30, errs
    mask = metrics.illumination_mask(probe, scan, (n, n), threshold=0.5)
    assert metrics.aligned_phase_correlation(rec, obj, mask=mask) > 0.9


def test_epie_reconstructs_adorym_dask_simulation(tmp_path):
    """Cross-check of conventions: the independent numpy ePIE inverts our simulator."""
    # extent 81 - 32 - 1 = 48 = 8 * 6  ->  integer raster positions
    res = sim.simulate_ptychography(
        tmp_path / "x.h5", object_shape=(81, 81), probe_shape=(32, 32), scan="raster",
        step_px=6.0, photons_per_pattern=1e6,
    )
    assert np.all(res.positions_px % 1 == 0)
    data = np.fft.ifftshift(_read_intensities(res.path)[0], axes=(-2, -1))
    errs: list[float] = []
    rec, _ = epie(data, res.positions_px, res.probe[0], (81, 81), n_iter=30,
                  update_probe=False, seed=0, errors=errs)
    assert errs[-1] < errs[0] / 50, errs  # ~0.12 -> ~7e-4 when conventions agree
    mask = metrics.illumination_mask(res.probe, res.positions_px, (81, 81), threshold=0.3)
    truth = res.object[:, :, 0]
    assert metrics.aligned_phase_correlation(rec, truth, mask=mask) > 0.9  # ~0.95
    assert metrics.phase_rmse(rec, truth, mask=mask) < 0.15  # ~0.09 rad


def test_siemens_star_fixture(siemens_star):
    d = siemens_star
    assert d["data"].shape == (516, 128, 128) and d["data"].dtype == np.float32
    assert d["probe"].shape == (128, 128) and np.iscomplexobj(d["probe"])
    assert d["scan"].shape == (516, 2)


def test_epie_siemens_star(siemens_star):
    """Plain ePIE on tike's experimental Siemens star (about 10 s)."""
    data, probe = siemens_star["data"], siemens_star["probe"]
    scan = siemens_star["scan"] - siemens_star["scan"].min(0) + 1  # scan is centred on 0
    probe = probe * np.sqrt(data.sum((1, 2)).mean() / np.sum(np.abs(probe) ** 2))
    shape = tuple(int(v) for v in np.ceil(scan.max(0)) + 128 + 2)
    errs: list[float] = []
    rec, _ = epie(data, scan, probe, shape, n_iter=15, errors=errs)
    assert errs[-1] < errs[0] / 5, errs
    ph = np.angle(rec[100:-100, 100:-100])
    assert np.std(ph) > 0.1  # a star, not a flat phase
