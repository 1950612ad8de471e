"""Multi-distance holography: kernels against exact results, the forward model against the
weak-object contrast transfer function, tiling, the measurement layout (cone beam, bad input),
and a reduced-size version of the paper's Sec. 3.2 study end to end."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch
import zarr

from adorym_dask import metrics
from adorym_dask.cli import main
from adorym_dask.config import ConfigError, config_from_dict
from adorym_dask.engine import run
from adorym_dask.layout import load_measurements
from adorym_dask.models.base import Batch
from adorym_dask.models.holography import MultiDistanceHolography, Tiling, build_holography
from adorym_dask.physics.affine import (
    affine_coordinates,
    fourier_upsample,
    identity_affine,
    sample_bspline,
)
from adorym_dask.simulate_holography import sample_image, simulate_holography
from adorym_dask.storage.measurements import MeasurementError, open_measurements, write_measurements

WAVELENGTH = 1.239841984e-6 / 17500.0  # 17.5 keV
PIXEL = 1e-6


# -- kernels ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [16, 17])
def test_fourier_upsample_is_the_band_limited_interpolation(n):
    """At the original samples it returns the field; between them, a sinusoid of the grid's
    own frequencies exactly (odd and even lengths, the even one's Nyquist bin split)."""
    rng = np.random.default_rng(0)
    field = rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))
    fine = fourier_upsample(torch.fft.fft2(torch.from_numpy(field)), 3).numpy()
    np.testing.assert_allclose(fine[::3, ::3], field, atol=1e-12)
    k = 3
    y = np.arange(3 * n)[:, None] / 3
    x = np.arange(3 * n)[None, :] / 3
    wave = np.exp(2j * np.pi * k * (y + 2 * x) / n)
    coarse = torch.from_numpy(wave[::3, ::3].copy())
    np.testing.assert_allclose(fourier_upsample(torch.fft.fft2(coarse), 3).numpy(), wave, atol=1e-10)


def test_bspline_sampling_is_exact_on_the_grid_and_fourth_order_between():
    n = 64
    y, x = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    f = np.cos(2 * np.pi * 3 * y / n) * np.sin(2 * np.pi * 2 * x / n)
    coef = fourier_upsample(torch.fft.fft2(torch.from_numpy(f + 0j)), 1, bspline=True).real
    grid = torch.from_numpy(np.stack([y, x], -1)[None].astype(np.float64))
    inner = (slice(2, -2), slice(2, -2))  # indices are clamped at the border, not wrapped
    np.testing.assert_allclose(sample_bspline(coef[None], grid)[0].numpy()[inner], f[inner],
                               atol=1e-12)
    q = np.random.default_rng(1).uniform(8, n - 8, (1, 50, 1, 2))
    exact = np.cos(2 * np.pi * 3 * q[..., 0] / n) * np.sin(2 * np.pi * 2 * q[..., 1] / n)
    got = sample_bspline(coef[None], torch.from_numpy(q)).numpy()
    np.testing.assert_allclose(got, exact, atol=2e-5)  # h^4 f'''' ~ (2 pi 3.6 / 64)^4


def test_affine_sampling_gradients_are_autograd_exact():
    """float64 gradcheck of the aligned sampling in both the image and the six numbers."""
    torch.manual_seed(0)
    coef = torch.randn(1, 12, 12, dtype=torch.float64, requires_grad=True)
    a = torch.tensor([[[1.01, 0.02, 0.3], [-0.01, 0.99, -0.2]]], dtype=torch.float64,
                     requires_grad=True)
    corner = torch.tensor([[2.0, 3.0]], dtype=torch.float64)

    def f(c, m):
        return sample_bspline(c, affine_coordinates(m, corner, (5, 4), (5.5, 5.5)))

    assert torch.autograd.gradcheck(f, (coef, a))


def test_affine_convention_maps_recorded_to_ideal():
    """``affine`` = [[1, 0, t_y], [0, 1, t_x]]: recorded pixel r shows the ideal image at
    r + t, and a rotation turns about the image centre."""
    a = torch.tensor([[[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]], dtype=torch.float64)
    q = affine_coordinates(a, torch.zeros(1, 2, dtype=torch.float64), (4, 4), (1.5, 1.5))
    np.testing.assert_allclose(q[0, 0, 0].numpy(), [2.0, -1.0])
    ang = 0.1
    rot = torch.tensor([[[math.cos(ang), -math.sin(ang), 0], [math.sin(ang), math.cos(ang), 0]]],
                       dtype=torch.float64)
    qc = affine_coordinates(rot, torch.tensor([[1.5, 1.5]], dtype=torch.float64), (1, 1), (1.5, 1.5))
    np.testing.assert_allclose(qc[0, 0, 0].numpy(), [1.5, 1.5])


# -- the forward model -----------------------------------------------------------------------
def _model(holo, tile_px, distances, reach, **kw):
    return MultiDistanceHolography(Tiling.for_hologram(holo, tile_px), reach, "real_imag",
                                   WAVELENGTH, PIXEL, tuple(distances), **kw)


def _predict(model, obj, affine=None, requires_grad=False):
    n = model.n_holograms * model.tiling.per_hologram
    idx = np.arange(n)
    pos = torch.as_tensor(model.tiling.corners(idx) + model.reach_px, dtype=torch.float64)
    a = torch.tensor(identity_affine(model.n_holograms) if affine is None else affine,
                     requires_grad=requires_grad)
    params = {"positions": pos, "distances": torch.tensor(model.distances_m), "affine": a}
    return model.predict(torch.from_numpy(obj), params, Batch((0, 0), 0, idx)).detach().numpy()


def _embed(t: np.ndarray, reach: int) -> np.ndarray:
    n = t.shape[0] + 2 * reach
    obj = np.zeros((n, n, 1, 2))
    obj[..., 0, 0] = 1.0
    obj[reach:-reach, reach:-reach, 0, 0] = t.real
    obj[reach:-reach, reach:-reach, 0, 1] = t.imag
    return obj


def test_weak_phase_grating_follows_the_contrast_transfer_function():
    """A weak phase grating eps cos(2 pi f x) gives I = 1 + 2 eps sin(pi lambda z f^2) cos(...)
    to first order (T = 1 + i phi, P_z cos = exp(-i chi) cos, so |psi|^2 = 1 + 2 eps
    Re(i exp(-i chi)) cos): the model's sign and scale of defocus."""
    n, eps, period = 64, 1e-3, 16
    x = np.arange(n)
    phi = eps * np.cos(2 * np.pi * x / period)
    t = np.exp(1j * np.broadcast_to(phi, (n, n)))
    z = 0.3
    m = _model((n, n), 512, [z], 0)
    got = _predict(m, np.stack([t.real, t.imag], -1)[:, :, None])[0]
    chi = math.pi * WAVELENGTH * z / (period * PIXEL) ** 2
    expect = 1 + 2 * eps * math.sin(chi) * np.cos(2 * np.pi * x / period)
    np.testing.assert_allclose(got[0], expect, atol=2 * eps ** 2)


def test_tiled_prediction_equals_untiled_over_each_tile():
    """A 96 px hologram cut into 32 px tiles (each with its halo) against the same hologram
    predicted whole: equal to 1e-4 of the hologram's peak over every tile's own pixels."""
    n, z = 96, (0.4, 1.0)
    t = (0.6 + 0.4 * sample_image("camera", (n, n))) * np.exp(
        1j * (sample_image("astronaut", (n, n)) - 0.5))
    cfg = {"tile_halo_factor": 6.0}
    spread = WAVELENGTH * max(z) / (2 * PIXEL ** 2)
    reach = int(math.ceil(cfg["tile_halo_factor"] * spread))
    whole, tiled = _model((n, n), 512, z, reach), _model((n, n), 32, z, reach)
    obj = _embed(t, reach)
    ref = _predict(whole, obj)
    parts = _predict(tiled, obj)
    idx = np.arange(len(parts))
    for k, (h, (y, x)) in enumerate(zip(tiled.tiling.hologram(idx), tiled.tiling.corners(idx))):
        diff = np.abs(parts[k] - ref[h, y : y + 32, x : x + 32]).max()
        assert diff < 1e-4 * ref.max(), (k, diff / ref.max())


# -- the measurement layout ------------------------------------------------------------------
def _write(path, n_holo=2, size=32, **kw):
    args = dict(intensities=np.ones((1, n_holo, size, size), np.float32),
                positions_px=np.zeros((n_holo, 2)), energy_ev=17500.0, pixel_size_m=PIXEL,
                distances_m=np.linspace(0.4, 0.6, n_holo))
    args.update(kw)
    return write_measurements(path, **args)


def test_cone_beam_distances_are_converted_when_written_and_when_read(tmp_path, caplog):
    z1, z2 = np.array([0.1, 0.1]), np.array([0.5, 0.7])
    p = _write(tmp_path / "cone.h5", distances_m=z2, source_distance_m=z1)
    meas = open_measurements(p)
    np.testing.assert_allclose(meas.distances_m, z1 * z2 / (z1 + z2))
    raw = tmp_path / "raw.h5"
    _write(raw, distances_m=z2)
    with h5py.File(raw, "a") as f:
        f["source_distance_m"] = z1
    with caplog.at_level("INFO"):
        meas = open_measurements(raw)
    np.testing.assert_allclose(meas.distances_m, z1 * z2 / (z1 + z2))
    assert "Fresnel scaling theorem" in caplog.text
    assert meas.incident_photons == 1.0


def test_cxi_near_field_pixel_is_the_demagnified_detector_pixel(shared_data):
    """The cdtools PETRA III file: 55 um pixels, 1.12 m, focus-to-sample 3.65 mm (given in the
    config): object pixel 55 um z1 / (z1 + z2) and effective distance z1 z2 / (z1 + z2), not
    the far-field formula."""
    cxi = shared_data / "cdtools" / "PETRAIII_P25_Near_Field_Ptycho.cxi"
    cfg = config_from_dict({"data": {"path": str(cxi), "source_distance_m": 3.65e-3},
                            "model": {"kind": "ptychography", "propagation": "near_field"}})
    meas = load_measurements(cfg)
    with h5py.File(cxi) as f:
        z2 = float(f["entry_1/instrument_1/detector_1/distance"][()])
        xps = float(f["entry_1/instrument_1/detector_1/x_pixel_size"][()])
    z1 = 3.65e-3
    assert meas.pixel_size_m == pytest.approx(xps * z1 / (z1 + z2), rel=1e-9)
    np.testing.assert_allclose(meas.distances_m, z1 * z2 / (z1 + z2))
    even = load_measurements(config_from_dict({
        "data": {"path": str(cxi), "source_distance_m": 3.65e-3, "subset": "even"},
        "model": {"kind": "ptychography", "propagation": "near_field"}}))
    assert even.n_tiles == meas.n_tiles // 2
    np.testing.assert_array_equal(even.positions_px[0], meas.positions_px[0, ::2])


@pytest.mark.parametrize("change, field", [
    ({"distances_m": None}, "distances_m is missing"),
    ({"distances_m": np.array([0.4, 0.5, 0.6])}, "distances_m has 3 values"),
    ({"distances_m": np.array([0.4, -0.1])}, "distances_m[1]"),
    ({"intensities": np.ones((2, 2, 32, 32), np.float32)}, "intensities: holography expects"),
])
def test_bad_holography_input_names_the_field(tmp_path, change, field, capsys):
    path = tmp_path / "bad.h5"
    bad_distances = "distances_m" in change and change["distances_m"] is not None
    if bad_distances:  # the writer refuses these: write a valid file, then spoil it
        _write(path)
        with h5py.File(path, "a") as f:
            del f["distances_m"]
            f["distances_m"] = change["distances_m"]
    else:
        _write(path, **change)
    run_file = tmp_path / "run.yaml"
    run_file.write_text(f"data: {{path: {path}}}\nmodel: {{kind: holography}}\n"
                        f"output: {tmp_path / 'out.zarr'}\n")
    assert main(["reconstruct", str(run_file)]) == 2
    err = capsys.readouterr().err
    assert field in err, err
    assert not (tmp_path / "out.zarr").exists()


def test_holography_config_errors_name_the_key(tmp_path):
    p = _write(tmp_path / "h.h5")
    base = {"data": {"path": str(p)}, "model": {"kind": "holography", "kappa": 0.01}}
    with pytest.raises(ConfigError, match="model.kappa"):
        build_holography(config_from_dict(base), load_measurements(config_from_dict(base)))
    bad = {**base, "model": {"kind": "holography"}, "refine": {"positions": {}}}
    with pytest.raises(ConfigError, match="refine.positions"):
        build_holography(config_from_dict(bad), load_measurements(config_from_dict(bad)))


# -- reconstructions -------------------------------------------------------------------------
def _study_data(tmp_path, size=64, affine_px=1.5, **kw):
    return simulate_holography(tmp_path / "study.h5", size_px=size, distances_m=(0.4, 0.6, 0.8, 1.0),
                               distance_error_m=-0.02, affine_error_px=affine_px, seed=3, **kw)


def test_reduced_paper_study_refines_distances_alignment_and_phase(tmp_path):
    """Sec. 3.2 at 64 px (noise-free, LSQ), through the CLI: the
    distances, started 2 cm short, come back within 0.3 cm; every hologram's alignment is
    right within 1 px at its corners; the high-pass filtered phase correlates >= 0.8 with
    the truth's (the holograms carry little of the phase's lowest frequencies)."""
    sim = _study_data(tmp_path)
    run_file = tmp_path / "run.yaml"
    run_file.write_text(
        "data: {path: study.h5}\nmodel: {kind: holography}\n"
        "refine: {distances: {}, affine: {}}\nepochs: 120\noutput: study.zarr\n"
        "cluster: {scheduler: sync}\nprogress: false\n")
    assert main(["reconstruct", str(run_file)]) == 0
    g = zarr.open_group(str(tmp_path / "study.zarr"), mode="r")
    z = np.asarray(g["distances_m"])
    np.testing.assert_allclose(np.asarray(g["distances_m_initial"]), sim.start_distances_m)
    assert np.abs(z - sim.distances_m).max() < 0.003, z
    corner = metrics.affine_corner_error_px(np.asarray(g["affine"]), sim.affine, (64, 64))
    assert corner.max() < 1.0, corner
    assert g["affine"].metadata.dimension_names == ("hologram", "row", "col")
    assert g["distances_m"].metadata.dimension_names == ("hologram",)
    obj = np.asarray(g["object"])[:, :, 0]
    r = (obj.shape[0] - 64) // 2
    t = obj[r : r + 64, r : r + 64, 0] + 1j * obj[r : r + 64, r : r + 64, 1]
    cut = metrics.hologram_phase_cutoff(WAVELENGTH, 0.7, PIXEL)
    assert metrics.highpass_phase_correlation(t, sim.object, cut) >= 0.8
    # the vacuum margin stayed vacuum
    np.testing.assert_array_equal(obj[:r, :, 0], 1.0)
    np.testing.assert_array_equal(obj[:r, :, 1], 0.0)


def test_distributed_holography_equals_the_in_process_run(tmp_path):
    """The same 3 epochs (distances, affine refined) on a 2-worker LocalCluster and in process."""
    _study_data(tmp_path, size=32, affine_px=1.0)
    out = {}
    for name, cluster in (("sync", {"scheduler": "sync"}), ("dist", {"n_workers": 2})):
        cfg = config_from_dict({
            "data": {"path": str(tmp_path / "study.h5")}, "model": {"kind": "holography"},
            "refine": {"distances": {}, "affine": {}}, "epochs": 3,
            "output": str(tmp_path / f"{name}.zarr"), "cluster": cluster, "progress": False,
        })
        run(cfg)
        out[name] = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="r")
    for var in ("object", "distances_m", "affine"):
        np.testing.assert_allclose(np.asarray(out["dist"][var]), np.asarray(out["sync"][var]),
                                   rtol=1e-5, atol=1e-7)


def test_kappa_is_refined_and_beta_is_stored_as_kappa_delta(tmp_path):
    """A homogeneous sample (beta = 0.1 delta) reconstructed from kappa 0.02 with
    delta/beta: kappa climbs towards 0.1, and the stored channel 1 is kappa * delta."""
    simulate_holography(tmp_path / "k.h5", size_px=48, kappa=0.1, phase_range_rad=(-1.0, 0.0),
                        distance_error_m=0.0, seed=1)
    cfg = config_from_dict({
        "data": {"path": str(tmp_path / "k.h5")}, "model": {"kind": "holography", "kappa": 0.02},
        "object": {"representation": "delta_beta"}, "refine": {"kappa": {}}, "epochs": 60,
        "output": str(tmp_path / "k.zarr"), "cluster": {"scheduler": "sync"}, "progress": False,
    })
    run(cfg)
    g = zarr.open_group(str(tmp_path / "k.zarr"), mode="r")
    kappa = float(np.asarray(g["kappa"]))
    assert float(np.asarray(g["kappa_initial"])) == 0.02
    assert abs(kappa - 0.1) < 0.03, kappa
    obj = np.asarray(g["object"])
    np.testing.assert_allclose(obj[..., 1], kappa * obj[..., 0], rtol=1e-6, atol=1e-12)


def test_a_free_margin_is_refined(tmp_path):
    """``object.margin: free``: the object outside the holograms' field is refined too."""
    _study_data(tmp_path, size=32, affine_px=0.0)
    cfg = config_from_dict({
        "data": {"path": str(tmp_path / "study.h5")}, "model": {"kind": "holography"},
        "object": {"margin": "free"}, "epochs": 3, "output": str(tmp_path / "f.zarr"),
        "cluster": {"scheduler": "sync"}, "progress": False,
    })
    run(cfg)
    obj = np.asarray(zarr.open_group(str(tmp_path / "f.zarr"), mode="r")["object"])
    assert np.abs(obj[:5, :, 0, 1]).max() > 0


def test_simulate_holography_cli_writes_the_layout(tmp_path, capsys):
    out = tmp_path / "sim.h5"
    assert main(["simulate", "holography", str(out), "--size", "32", "--distances-m", "0.1",
                 "0.2", "--distance-error-m", "0.01", "--affine-error-px", "1",
                 "--incident-photons", "50", "--poisson"]) == 0
    with h5py.File(out) as f:
        assert f["intensities"].shape == (1, 2, 32, 32)
        np.testing.assert_allclose(f["distances_m"][...], [0.11, 0.21])
        np.testing.assert_allclose(f["ground_truth/distances_m"][...], [0.1, 0.2])
        assert f["ground_truth/affine"].shape == (2, 2, 3)
        assert f.attrs["incident_photons"] == 50
        assert np.allclose(f["intensities"][...] % 1, 0)  # Poisson counts
        # a hologram keeps the light the sample lets through (mean |T|^2 of the truth)
        transmitted = np.mean(np.abs(f["ground_truth/object"][...]) ** 2)
        assert abs(f["intensities"][...].mean() / (50 * transmitted) - 1) < 0.1
    assert "wrote" in capsys.readouterr().out


def test_an_illumination_file_lights_the_holograms(tmp_path):
    """``probe: {init: file}``: a uniform illumination of 1 predicts the plane wave's
    holograms; one twice as bright (amplitude sqrt 2), twice the counts. The illumination is
    extended into the margin and is a (non-refined) parameter of its own."""
    _study_data(tmp_path, size=32, affine_px=0.0)
    ones = tmp_path / "ones.npy"
    np.save(ones, np.ones((32, 32), np.complex64))
    base = {"data": {"path": str(tmp_path / "study.h5")}, "model": {"kind": "holography"}}
    cfg_plane = config_from_dict(base)
    meas = load_measurements(cfg_plane)
    plane = build_holography(cfg_plane, meas)
    lit = build_holography(config_from_dict({**base, "probe": {"init": "file", "path": str(ones)}}),
                           meas)
    probe = lit.initial_parameters(None, meas)["probe"]
    assert probe.shape == (32 + 2 * lit.reach_px,) * 2
    rng = np.random.default_rng(0)
    obj = _embed(np.exp(1j * rng.uniform(-0.3, 0.3, (32, 32))), lit.reach_px)[:, :, :, :]
    idx = np.arange(4)
    pos = torch.full((4, 2), float(lit.reach_px), dtype=torch.float64)
    common = {"positions": pos, "distances": torch.tensor(plane.distances_m),
              "affine": torch.tensor(identity_affine(4))}
    box = torch.from_numpy(obj)
    with torch.no_grad():
        ref = plane.predict(box, common, Batch((0, 0), 0, idx))
        same = lit.predict(box, {**common, "probe": torch.from_numpy(probe)}, Batch((0, 0), 0, idx))
        double = lit.predict(box, {**common, "probe": torch.from_numpy(probe * np.sqrt(2))},
                             Batch((0, 0), 0, idx))
    torch.testing.assert_close(same, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(double, 2 * ref, rtol=1e-5, atol=1e-6)
    np.save(ones, np.ones((31, 32), np.complex64))
    from adorym_dask.parameters import ProbeError

    with pytest.raises(ProbeError, match="probe.path"):
        build_holography(config_from_dict({**base, "probe": {"init": "file", "path": str(ones)}}),
                         meas)


def test_pie_is_preconditioned_in_frequency_and_converges_faster_than_adam(tmp_path):
    """``optimizer.name: pie`` divides each frequency of the object gradient by the weak-object
    curvature (mean over holograms of sin^2 chi for the phase, cos^2 chi for the absorption):
    from the same start, with the distances held, it fits the holograms at least 5x better
    than Adam in 30 epochs (measured at 64 px: 20x in 40 epochs)."""
    _study_data(tmp_path, size=48, affine_px=0.0)
    losses = {}
    for name in ("pie", "adam"):
        cfg = config_from_dict({
            "data": {"path": str(tmp_path / "study.h5")}, "model": {"kind": "holography"},
            "optimizer": {"name": name}, "epochs": 30, "output": str(tmp_path / f"{name}.zarr"),
            "cluster": {"scheduler": "sync"}, "progress": False,
        })
        losses[name] = run(cfg).loss
    assert losses["pie"][-1] < 0.2 * losses["adam"][-1], losses
    m = build_holography(cfg, load_measurements(cfg))
    g = np.zeros((40, 40, 1, 2))
    g[20, 20, 0, 1] = 1.0  # a phase impulse: flat spectrum in, 1 / (sin^2 + floor) out
    params = {"distances": torch.tensor(m.distances_m)}
    out = np.fft.fft2(m.precondition_object_gradient(g, params)[..., 0, 1])
    fy = np.fft.fftfreq(40, d=PIXEL)
    chi = np.pi * WAVELENGTH * np.asarray(m.distances_m)[:, None] * fy[None, 3] ** 2
    want = 1 / ((np.sin(chi) ** 2).mean() + 0.05)
    assert abs(abs(out[3, 0]) - want) < 1e-6 * want


# -- near-field ptychography on the real PETRA III data (cdtools' example) --------------------
def _near_field_run(shared_data, tmp_path, name, *, epochs, subset="all", modes=3):
    cxi = shared_data / "cdtools" / "PETRAIII_P25_Near_Field_Ptycho.cxi"
    cfg = config_from_dict({
        "data": {"path": str(cxi), "source_distance_m": 3.65e-3, "subset": subset},
        "model": {"kind": "ptychography", "propagation": "near_field", "probe_modes": modes},
        "refine": {"positions": {}}, "epochs": epochs, "output": str(tmp_path / f"{name}.zarr"),
        "cluster": {"scheduler": "sync"}, "progress": False,
    })
    result = run(cfg)
    g = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="r")
    obj = np.asarray(g["object"])[:, :, 0]
    return result, obj[..., 0] + 1j * obj[..., 1], np.asarray(g["positions_px_initial"])[0], \
        np.asarray(g.attrs["position_offset_px"]).astype(int)


def test_near_field_ptychography_reconstructs_the_real_star(shared_data, tmp_path):
    """A few epochs on the whole scan: the loss falls and the phase has structure (the star's
    spokes; a flat start has none)."""
    result, obj, _, _ = _near_field_run(shared_data, tmp_path, "nf", epochs=4, modes=1)
    assert result.loss[-1] < 0.85 * result.loss[0], result.loss
    assert np.angle(obj).std() > 0.05


def _on_canvas(obj, pos, offset, frame=(260, 260), det=100):
    """The object and each pixel's number of tiles in a common frame (the file's positions)."""
    canvas, count = np.ones(frame, complex), np.zeros(frame)
    y0, x0 = 20 - offset
    canvas[y0 : y0 + obj.shape[0], x0 : x0 + obj.shape[1]] = obj
    for y, x in np.floor(pos).astype(int) + 20:
        count[y : y + det, x : x + det] += 1
    return canvas, count


@pytest.mark.slow
def test_near_field_halves_agree(shared_data, tmp_path):
    """Two reconstructions from disjoint halves of the scan (alternate positions, 30 epochs,
    3 modes, positions refined) agree where both light the sample well (each half's tiles
    overlap there at least half as often as at its most lit pixel): phase correlation >= 0.8
    after alignment, and each has real structure (phase deviation at least half the whole
    scan's). Measured: 0.84; 0.20 and 0.20 against 0.22. Writes the three phases as a PNG."""
    runs = {s: _near_field_run(shared_data, tmp_path, s, epochs=30, subset=s)
            for s in ("even", "odd", "all")}
    (ca, na), (cb, nb), (cf, _) = (_on_canvas(*r[1:]) for r in runs.values())
    both = (na >= 0.5 * na.max()) & (nb >= 0.5 * nb.max())
    ys, xs = np.nonzero(both)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    corr = metrics.aligned_phase_correlation(ca[box], cb[box], mask=both[box])
    spread = {k: np.angle(metrics.remove_global_phase(c[box], cf[box], mask=both[box]))[both[box]].std()
              for k, c in (("even", ca), ("odd", cb), ("all", cf))}
    from adorym_dask.plotting import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(1, 3, figsize=(12, 4))
    for a, (k, c) in zip(ax, (("even", ca), ("odd", cb), ("all", cf))):
        a.imshow(np.angle(metrics.remove_global_phase(c[box], cf[box], mask=both[box])), cmap="gray")
        a.set_title(f"{k}: phase")
    fig.savefig(tmp_path / "halves.png")
    assert (tmp_path / "halves.png").stat().st_size > 0
    assert corr >= 0.8, corr
    assert min(spread["even"], spread["odd"]) >= 0.5 * spread["all"], spread
