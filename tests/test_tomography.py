"""Tomography on y-slabs: a band from its slab equals the whole volume, reconstruction of an
analytic ellipsoid phantom against filtered back-projection, the real TomoPy tooth, tilt
refinement with the volume in slabs, bad input, and the command line."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch
import xarray as xr

from adorym_dask.cli import main
from adorym_dask.config import ConfigError, config_from_dict
from adorym_dask.engine import run
from adorym_dask.models.base import Batch
from adorym_dask.models.tomography import Tomography, VolumeGeometry, tilt_halo_px
from adorym_dask.storage.measurements import MeasurementError, write_measurements
from phantoms import (
    PIXEL_M,
    WAVELENGTH_M,
    attenuation_per_beta_voxel,
    best_fbp,
    central_cylinder,
    default_phantom,
    ellipsoid_phantom,
    ellipsoid_projections,
    fbp,
    nrmse,
)

ENERGY_EV = 1.239841984e-6 / WAVELENGTH_M


def _model(volume, angles, *, band, reach, pad=0, distance=None, centre=None):
    n_y, n_x, _ = volume
    return Tomography(
        geometry=VolumeGeometry(tuple(volume), tuple(angles), PIXEL_M), det_shape=(n_y, n_x),
        band=band, rotation_centre_px=(n_x - 1) / 2 if centre is None else centre,
        wavelength_m=WAVELENGTH_M, distance_m=distance, reach_px=reach, pad_px=pad,
    )


def _params(model, angle, tilts, offsets, bands):
    rows = np.stack([np.asarray(bands) * model.band, np.zeros(len(bands))], -1)
    return {
        "positions": torch.as_tensor(rows, dtype=torch.float64),
        "tilts": torch.as_tensor(tilts[angle], dtype=torch.float64),
        "offsets": torch.as_tensor(offsets[angle], dtype=torch.float64),
        "rotation_centre": torch.as_tensor(model.rotation_centre_px, dtype=torch.float64),
    }


# -- slabs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("pad", [0, 3])
def test_a_band_from_its_slab_equals_the_whole_volume(pad):
    """Tilts at the allowed limit about x and z, offsets, an off-centre axis (and, with
    ``pad``, a propagation window): each band predicted from its y-slab plus the halo equals
    the prediction from the whole volume to 1e-5 of the peak, and the slab gradients, put
    back in place and summed, equal the whole volume's gradient to 1e-5; a slab without the
    halo does not (so the halo is what makes them equal)."""
    rng = np.random.default_rng(1)
    volume = (40, 24, 20)
    vol = torch.as_tensor(rng.uniform(0, 1e-7, (*volume, 2)), dtype=torch.float32)
    angles = [0.3, 1.9]
    max_tilt = 0.05
    tilts = np.array([[0.01, max_tilt, -max_tilt], [-0.01, -0.03, 0.04]])
    offsets = np.array([[0.7, -1.2], [-0.7, 1.2]])
    halo = tilt_halo_px(volume, volume[1], 12.3, max_tilt) + 2 + pad  # offsets < 2 px
    model = _model(volume, angles, band=8, reach=halo, pad=pad,
                   distance=None if pad == 0 else 1e-3, centre=12.3)
    for angle in range(2):
        whole = vol.clone().requires_grad_(True)
        pred = model.predict(whole, _params(model, angle, tilts, offsets, range(5)),
                             Batch((0, 0), angle, np.arange(5)))
        pred.sum().backward()
        grad = torch.zeros_like(vol)
        for b in range(5):
            y0, y1 = max(b * 8 - halo, 0), min(b * 8 + 8 + halo, volume[0])
            slab = vol[y0:y1].clone().requires_grad_(True)
            part = model.predict(slab, _params(model, angle, tilts, offsets, [b]),
                                 Batch((y0, 0), angle, np.array([b])))
            peak = float(pred.detach().abs().max())
            assert float((part[0] - pred[b]).abs().max()) <= 1e-5 * peak
            part.sum().backward()
            grad[y0:y1] += slab.grad
        assert float((grad - whole.grad).abs().max()) <= 1e-5 * float(whole.grad.abs().max())
    # too small a halo: rows beyond the slab are missing
    b, y0 = 2, 16
    thin = vol[y0 : y0 + 8].clone()
    short = model.predict(thin, _params(model, 0, tilts, offsets, [b]), Batch((y0, 0), 0, np.array([b])))
    full = model.predict(vol, _params(model, 0, tilts, offsets, [b]), Batch((0, 0), 0, np.array([b])))
    assert float((short - full).abs().max()) > 1e-3 * float(full.abs().max())


def test_projection_of_a_voxel_phantom_matches_its_analytic_projections():
    """The model's recorded intensity of a voxelised ellipsoid phantom is ``I0 exp(-2 k dz
    L)``: at angle 0 with the axis on a voxel column, ``L`` is exactly the voxel sums along z;
    at other angles and an off-centre axis (a fractional column), ``L`` matches the analytic
    chords within 6 % (the voxelised phantom alone is 3-4 % from them, its partial-volume
    edges; linear interpolation at fractional columns blurs it a little more)."""
    n = 64
    ells = default_phantom(n)
    beta = ellipsoid_phantom((n, n, n), ells)
    vol = torch.as_tensor(np.stack([np.zeros_like(beta), beta], -1), dtype=torch.float32)
    att = attenuation_per_beta_voxel()
    model = _model((n, n, n), [0.0], band=n, reach=0)
    pred = model.predict(vol, _params(model, 0, np.zeros((1, 3)), np.zeros((1, 2)), [0]),
                         Batch((0, 0), 0, np.array([0])))[0].numpy()
    exact_sums = att * beta.sum(axis=2)
    assert np.abs(-np.log(pred) - exact_sums).max() <= 1e-5 * exact_sums.max()
    angles = np.radians([0.0, 37.0, 90.0, 143.0])
    centre = (n - 1) / 2 - 2.6
    model = _model((n, n, n), angles, band=n, reach=0, centre=centre)
    exact = ellipsoid_projections(ells, angles, (n, n), rotation_centre_px=centre)
    for a in range(len(angles)):
        pred = model.predict(vol, _params(model, a, np.zeros((4, 3)), np.zeros((4, 2)), [0]),
                             Batch((0, 0), a, np.array([0])))[0].numpy()
        err = np.linalg.norm(-np.log(pred) - att * exact[a]) / np.linalg.norm(att * exact[a])
        assert err < 0.06, (a, err)


# -- reconstruction against filtered back-projection -----------------------------------------
def _phantom_data(tmp_path, n, n_angles, incident, seed=0):
    rng = np.random.default_rng(seed)
    ells = default_phantom(n)
    truth = ellipsoid_phantom((n, n, n), ells)
    angles = np.linspace(0, np.pi, n_angles, endpoint=False)
    chords = ellipsoid_projections(ells, angles, (n, n))
    att = attenuation_per_beta_voxel()
    counts = rng.poisson(incident * np.exp(-att * chords)).astype(np.float32)
    path = write_measurements(
        tmp_path / "phantom.h5", intensities=counts[:, None], positions_px=np.zeros((n_angles, 1, 2)),
        angles_rad=angles, energy_ev=ENERGY_EV, pixel_size_m=PIXEL_M, incident_photons=incident,
    )
    line = -np.log(np.maximum(counts, 1) / incident) / att  # beta * voxels
    return path, truth, angles, line


def _reconstruct_phantom(tmp_path, n, n_angles, epochs, **extra):
    path, truth, angles, line = _phantom_data(tmp_path, n, n_angles, 1e4)
    cfg = {"data": {"path": str(path)}, "model": {"kind": "tomography"},
           "object": {"representation": "delta_beta"}, "epochs": epochs,
           "output": str(tmp_path / "run.zarr"), "progress": False,
           "cluster": {"scheduler": "sync"}, **extra}
    run(config_from_dict(cfg))
    beta = xr.open_zarr(tmp_path / "run.zarr").object.values[..., 1]
    mask = central_cylinder(truth.shape)
    _, filt, err_fbp = best_fbp(line, angles, truth, mask)
    return nrmse(beta, truth, mask), err_fbp, filt


@pytest.mark.parametrize("n,epochs", [(64, 25), pytest.param(96, 25, marks=pytest.mark.slow)])
def test_ellipsoid_phantom_beats_filtered_back_projection(tmp_path, n, epochs):
    """45 angles over 180 degrees of an analytic ellipsoid phantom with Poisson noise (1e4
    photons per pixel): our NRMSE of beta over the central cylinder is at most 0.9 times that
    of the better of scikit-image's ramp and Shepp-Logan filtered back-projections of the
    same data (45 angles are under-sampled for FBP: streaks). Least squares on line integrals
    with Adam and TV (weight 0.3, eps the default 1e-3 rad per voxel); measured at 64^3:
    0.073 against FBP's 0.113 (without TV the fit starts to follow the noise after about 30
    epochs: 0.124 at 15, 0.110 at 30, 0.168 at 60)."""
    ours, theirs, filt = _reconstruct_phantom(tmp_path, n, 45, epochs,
                                              regularizers=[{"kind": "tv", "weight": 0.3}],
                                              optimizer={"name": "adam"})
    print(f"n={n}: NRMSE ours {ours:.4f}, FBP ({filt}) {theirs:.4f}, ratio {ours / theirs:.3f}")
    assert ours <= 0.9 * theirs


# -- the real TomoPy tooth -------------------------------------------------------------------
@pytest.mark.slow  # 181 projections of 640 columns: minutes; the Data Exchange reader, the
# centre finder (tests/test_data_exchange.py) and the reconstruction path (the phantom test)
# are each covered quickly
def test_the_real_tooth_reconstructs_like_fbp_at_its_rotation_centre(shared_data, tmp_path):
    """TomoPy's tooth (Data Exchange, 181 projections of 2 x 640, flat/dark corrected on
    read): the rotation axis is found from two opposite projections (near column 296, not
    the middle 319.5), the reconstruction correlates with filtered back-projection at that
    centre at >= 0.9 over the sample, and the command line writes a PNG of the slice."""
    from adorym_dask.storage.measurements import open_measurements, read_tiles

    path = shared_data / "tomopy" / "tooth.h5"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    run_yaml = tmp_path / "tooth.yaml"
    out = tmp_path / "tooth.zarr"
    run_yaml.write_text(
        f"data: {{path: {path}, energy_ev: 20000, pixel_size_m: 2.0e-6}}\n"
        "model: {kind: tomography, rotation_centre_px: auto}\n"
        "object: {representation: delta_beta}\n"
        # Adam: 12 epochs are 144 minibatch steps (0.957 / 0.958); cg, the default, takes one
        # step per epoch and reached 0.872 in 12 (it needs more epochs on 640 x 640 slices)
        "optimizer: {name: adam}\n"
        f"epochs: 12\noutput: {out}\nprogress: false\ncluster: {{scheduler: sync}}\n"
    )
    png = tmp_path / "tooth.png"
    assert main(["reconstruct", str(run_yaml), "-q", "--png", str(png)]) == 0
    assert png.is_file() and png.stat().st_size > 10_000
    ds = xr.open_zarr(out)
    centre = float(ds.rotation_centre_px)
    assert 290 < centre < 300, centre
    beta = ds.object.values[..., 1]  # [2, 640, 640]
    meas = open_measurements(path, energy_ev=20000, pixel_size_m=2e-6)
    proj = np.stack([read_tiles(meas.source, a, np.arange(1))[0] for a in range(meas.n_angles)])
    line = -np.log(np.clip(proj, 1e-6, None))
    ref = fbp(line, meas.angles_rad, rotation_centre_px=centre, n_x=640, n_z=640)
    for row in range(2):
        ours, theirs = beta[row], ref[row]
        sample = theirs > 0.2 * np.percentile(theirs, 99.5)
        r = np.corrcoef(ours[sample], theirs[sample])[0, 1]
        print(f"tooth row {row}: correlation with FBP {r:.3f} over {sample.sum()} voxels")
        assert r >= 0.9


# -- bad input -------------------------------------------------------------------------------
def _tiny(tmp_path, **kw):
    data = dict(intensities=np.ones((3, 1, 4, 6), np.float32), positions_px=np.zeros((3, 1, 2)),
                angles_rad=np.array([0.0, 1.0, 2.0]), energy_ev=10000.0, pixel_size_m=1e-6)
    data.update(kw)
    return write_measurements(tmp_path / "tiny.h5", overwrite=True, **data)


def _cfg(tmp_path, path, **kw):
    base = {"data": {"path": str(path)}, "model": {"kind": "tomography"},
            "object": {"representation": "delta_beta"}, "epochs": 1,
            "output": str(tmp_path / "o.zarr"), "cluster": {"scheduler": "sync"}}
    base.update(kw)
    return config_from_dict(base)


def test_bad_tomography_input_is_named(tmp_path):
    path = _tiny(tmp_path)
    with pytest.raises(ConfigError, match="representation: delta_beta"):
        run(_cfg(tmp_path, path, object={"representation": "real_imag"}))
    with pytest.raises(ConfigError, match="refine.offsets"):
        run(_cfg(tmp_path, path, refine={"positions": {}}))
    many = _tiny(tmp_path, intensities=np.ones((3, 2, 4, 6), np.float32),
                 positions_px=np.zeros((3, 2, 2)))
    with pytest.raises(MeasurementError, match=r"\[n_angles, 1, det_y, det_x\]"):
        run(_cfg(tmp_path, many))
    no_angles = _tiny(tmp_path, angles_rad=None)
    with pytest.raises(MeasurementError, match="angles_rad"):
        run(_cfg(tmp_path, no_angles))
    with pytest.raises(ConfigError, match="180 degrees"):
        run(_cfg(tmp_path, _tiny(tmp_path), model={"kind": "tomography",
                                                   "rotation_centre_px": "auto"}))


def test_the_rotation_centre_comes_from_the_file_or_the_config(tmp_path):
    from adorym_dask.engine import Reconstruction

    path = _tiny(tmp_path, extra={"rotation_centre_px": np.asarray(2.25)})
    rec = Reconstruction(_cfg(tmp_path, path))
    assert float(rec.params["rotation_centre"].value) == 2.25
    rec = Reconstruction(_cfg(tmp_path, path, model={"kind": "tomography",
                                                     "rotation_centre_px": 3.0}, overwrite=True))
    assert float(rec.params["rotation_centre"].value) == 3.0
    assert rec.store.geometry.chunks[1] == 6  # y-slabs of the whole width


# -- joint ptychotomography ------------------------------------------------------------------
def _pt_setup(tmp_path, n=12, det=8, n_angles=4):
    from adorym_dask.models.ptychotomography import build_ptychotomography
    from adorym_dask.storage.measurements import open_measurements

    pos = np.stack(np.meshgrid([0, 4], [0, 4], indexing="ij"), -1).reshape(-1, 2).astype(float)
    angles = np.linspace(0, np.pi, n_angles, endpoint=False)
    path = write_measurements(
        tmp_path / "pt.h5", intensities=np.ones((n_angles, len(pos), det, det), np.float32),
        positions_px=np.broadcast_to(pos, (n_angles, len(pos), 2)).copy(), angles_rad=angles,
        energy_ev=10000.0, pixel_size_m=2e-8, detector_distance_m=1.0, overwrite=True,
    )
    cfg = config_from_dict({"data": {"path": str(path)}, "model": {"kind": "ptychotomography"},
                            "object": {"representation": "delta_beta"},
                            "output": str(tmp_path / "pt.zarr")})
    model = build_ptychotomography(cfg, open_measurements(path)).with_volume((n, n, n))
    return model, pos


def test_ptychotomography_at_angle_zero_is_ptychography_of_the_projection(tmp_path):
    """One slice, angle 0: the volume's exit waves are those of far-field ptychography
    through one slice holding the volume's sums along z (the projection approximation), and
    at 90 degrees those of the sums along x."""
    model, pos = _pt_setup(tmp_path)
    rng = np.random.default_rng(0)
    vol = torch.as_tensor(rng.uniform(0, 1e-5, (12, 12, 12, 2)), dtype=torch.float32)
    probe = torch.as_tensor(rng.normal(size=(1, 8, 8)) + 1j * rng.normal(size=(1, 8, 8)),
                            dtype=torch.complex64)
    params = {"probe": probe, "positions": torch.as_tensor(pos),
              "tilts": torch.zeros(3, dtype=torch.float64)}
    ours = model.predict(vol, params, Batch((0, 0), 0, np.arange(len(pos))))
    flat = model.ptycho.predict(vol.sum(dim=2, keepdim=True), params,
                                Batch((0, 0), 0, np.arange(len(pos))))
    assert torch.allclose(ours, flat, rtol=1e-4, atol=1e-6 * float(flat.max()))
    side = model.predict(vol, params, Batch((0, 0), 2, np.arange(len(pos))))  # 90 degrees
    # Ry(90): lab x = -material z, so lab column j sees material z = n - 1 - j
    proj = vol.sum(dim=1).flip(1).unsqueeze(2)
    flat90 = model.ptycho.predict(proj, params, Batch((0, 0), 2, np.arange(len(pos))))
    assert torch.allclose(side, flat90, rtol=1e-3, atol=1e-5 * float(flat90.max()))


def test_ptychotomography_reconstruction_lowers_the_loss(tmp_path):
    """End to end on data from the model itself (12^3, 4 angles x 4 tiles): the engine runs
    the rotated multislice on whole-row slabs, refines the shared probe, the positions and the
    tilts, and the loss falls."""
    model, pos = _pt_setup(tmp_path)
    yy, xx, zz = np.meshgrid(*(np.arange(12) - 5.5,) * 3, indexing="ij")
    vol = np.zeros((12, 12, 12, 2), np.float32)
    vol[..., 0] = 3e-5 * ((xx - 1) ** 2 + zz ** 2 + yy ** 2 < 16)
    vol[..., 1] = vol[..., 0] / 20
    yy2, xx2 = np.meshgrid(np.arange(8) - 3.5, np.arange(8) - 3.5, indexing="ij")
    probe = torch.as_tensor((30 * np.exp(-(yy2 ** 2 + xx2 ** 2) / 8))[None], dtype=torch.complex64)
    inten = []
    for a in range(4):
        params = {"probe": probe, "positions": torch.as_tensor(pos),
                  "tilts": torch.zeros(3, dtype=torch.float64)}
        inten.append(model.predict(torch.as_tensor(vol), params,
                                   Batch((0, 0), a, np.arange(len(pos)))).numpy())
    path = write_measurements(
        tmp_path / "pt.h5", intensities=np.asarray(inten, np.float32),
        positions_px=np.broadcast_to(pos, (4, len(pos), 2)).copy(),
        angles_rad=np.linspace(0, np.pi, 4, endpoint=False), energy_ev=10000.0,
        pixel_size_m=2e-8, detector_distance_m=1.0, overwrite=True,
    )
    res = run(config_from_dict({
        "data": {"path": str(path)}, "model": {"kind": "ptychotomography"},
        "object": {"representation": "delta_beta"}, "epochs": 6, "minibatch_size": 4,
        "refine": {"positions": {"max_shift_px": 2}, "tilts": {}},
        "output": str(tmp_path / "run.zarr"), "progress": False,
        "cluster": {"scheduler": "sync"}}))
    ds = xr.open_zarr(tmp_path / "run.zarr")
    assert ds.object.shape == (16, 16, 16, 2)  # the scan plus the positions' 2 px of room
    assert res.loss[-1] < 0.5 * res.loss[0]


# -- tilt refinement on a volume in slabs -----------------------------------------------------
def _tilted_run(tmp_path, shape, n_angles, epochs, band):
    from adorym_dask.simulate_tomography import simulate_tomography

    sim = simulate_tomography(str(tmp_path / "tilt.h5"), shape=shape, n_angles=n_angles,
                              angle_range_deg=360.0, tilt_deg=(1.5, 1.5), poisson=False, seed=3)
    run(config_from_dict({
        "data": {"path": sim.path}, "model": {"kind": "tomography", "tile_px": band},
        "object": {"representation": "delta_beta", "chunks": [band, shape[1]]},
        "refine": {"tilts": {}}, "epochs": epochs, "minibatch_size": 16,
        "optimizer": {"name": "adam"},  # several object steps per epoch, as measured
        "output": str(tmp_path / "tilt.zarr"), "progress": False,
        "cluster": {"scheduler": "sync"}}))
    ds = xr.open_zarr(tmp_path / "tilt.zarr")
    assert ds.object.chunks[0][0] == band and len(ds.object.chunks[0]) >= 4  # >= 4 y-slabs
    return np.degrees(ds.tilts_rad.values)


@pytest.mark.slow  # 5 minutes on 2 cores; test_tilts_move_towards_the_axis_tilt runs in CI
def test_a_tilted_rotation_axis_is_refined_per_angle(tmp_path):
    """The rotation axis tilted by 1.5 degrees about x and about z at every angle (simulated
    on a grid twice as fine, 60 angles over 360 degrees, noise-free), the volume 32 x 48 x 48
    in 4 y-slabs of 8 rows read with their tilt halo: the refined per-angle tilts average to
    within 0.1 degree of 1.5 and scatter by at most 0.3 degree RMS per angle (measured:
    1.539 and 1.465; 0.27 and 0.13 RMS). Over 180 degrees a constant tilt about z is nearly
    degenerate with the object's re-orientation about x (the removed gauge): 1.54 / 1.08."""
    tilts = _tilted_run(tmp_path, (32, 48, 48), 60, 40, 8)
    err = tilts[:, 1:] - 1.5
    print("mean tilts", tilts.mean(0), "rms error", np.sqrt((err ** 2).mean(0)))
    assert np.all(np.abs(tilts[:, 1:].mean(0) - 1.5) <= 0.1)
    assert np.all(np.sqrt((err ** 2).mean(0)) <= 0.3)
    assert abs(tilts[:, 0].mean()) < 1e-9  # the mean t_y is held at zero


def test_tilts_move_towards_the_axis_tilt(tmp_path):
    """The same on a small volume (16 x 32 x 32 in 4 slabs, 36 angles, 20 epochs): the tilts
    leave zero towards 1.5 degrees (20 epochs do not finish the job; see the slow test)."""
    tilts = _tilted_run(tmp_path, (16, 32, 32), 36, 20, 4)
    mean = tilts[:, 1:].mean(0)
    print("mean tilts after 20 epochs", mean)
    assert np.all(mean > 0.3) and np.all(mean < 2.5)


def test_offsets_and_rotation_centre_are_refined(tmp_path):
    """Random per-angle offsets (up to 1.5 px) and an axis 2.2 px left of the middle, the
    centre started 1.5 px away from it, 20 epochs: the refined offsets approach the true ones
    (less what an object shift explains, the gauge the model removes): y within 0.3 px RMS,
    the x error at least halved, and the centre error at least halved (measured: 0.05 and
    0.30 px RMS from 0.75 and 0.84; centre 1.5 -> 0.6 px. The x offsets and the centre share
    the constant and the slowest-converging patterns; at 24 x 48 x 48, 60 angles and 30
    epochs: 0.01 and 0.09 px RMS)."""
    from adorym_dask.models.tomography import remove_offset_gauge
    from adorym_dask.simulate_tomography import simulate_tomography

    sim = simulate_tomography(str(tmp_path / "off.h5"), shape=(16, 32, 32), n_angles=36,
                              offset_px=1.5, centre_shift_px=-2.2, poisson=False, seed=5)
    start = sim.rotation_centre_px + 1.5
    run(config_from_dict({
        "data": {"path": sim.path},
        "model": {"kind": "tomography", "rotation_centre_px": start},
        "object": {"representation": "delta_beta"},
        "refine": {"offsets": {}, "rotation_centre": {}}, "epochs": 20,
        "optimizer": {"name": "adam"},
        "output": str(tmp_path / "off.zarr"), "progress": False,
        "cluster": {"scheduler": "sync"}}))
    ds = xr.open_zarr(tmp_path / "off.zarr")
    true = remove_offset_gauge(sim.offsets_px, sim.angles_rad)
    err = np.sqrt(((ds.offsets_px.values - true) ** 2).mean(0))
    # the true offsets' constant x part (fitted with the object-shift pattern) is the centre's
    th = sim.angles_rad
    design = np.stack([np.ones_like(th), np.cos(th), np.sin(th)], 1)
    centre = sim.rotation_centre_px + np.linalg.lstsq(design, sim.offsets_px[:, 1], rcond=None)[0][0]
    before = np.sqrt((true ** 2).mean(0))
    print("offset rms error", err, "from", before, "centre", float(ds.rotation_centre_px), "true", centre)
    assert np.all(before >= 0.5) and err[0] <= 0.3 and err[1] <= 0.5 * before[1]
    assert abs(float(ds.rotation_centre_px) - centre) <= 0.5 * 1.5  # at least halved


# -- conjugate gradient ----------------------------------------------------------------------
def test_cg_line_search_and_direction_are_exact_on_a_quadratic():
    """The parabola's minimum from f(0), f'(0) and one trial point is the exact minimiser of a
    quadratic; Polak-Ribiere+ restarts along -g when beta < 0 or the direction would not
    descend."""
    from adorym_dask.graphs.cg import direction, line_minimum

    f = lambda a: 3.0 * (a - 0.7) ** 2 + 1.0  # noqa: E731
    assert line_minimum(f(0), -6.0 * 0.7, 0.5, f(0.5)) == pytest.approx(0.7)
    beta, slope = direction(np.array([4.0, 5.0, 2.0, 1.0, 3.0]), first=False)
    assert beta == 0.0 and slope == -4.0  # g.(g - g_prev) < 0
    beta, slope = direction(np.array([4.0, 1.0, 2.0, 1.0, 3.0]), first=False)
    assert beta == pytest.approx(1.5) and slope == pytest.approx(-4.0 + 1.5)


def test_cg_reconstructs_faster_than_art(tmp_path):
    """Nonlinear CG (one step over every projection per epoch, line search on the driver) on
    least squares of line integrals, a quadratic: the loss falls every epoch, and after 6
    epochs it is below plain gradient descent's (ART) after 6 epochs (measured at 10 epochs
    on a 32 x 48 x 48 simulation: NRMSE 0.098 against Adam's 0.111)."""
    from adorym_dask.simulate_tomography import simulate_tomography

    sim = simulate_tomography(str(tmp_path / "cg.h5"), shape=(12, 24, 24), n_angles=30,
                              poisson=False, seed=2)
    losses = {}
    for name in ("cg", "gd"):
        res = run(config_from_dict({
            "data": {"path": sim.path}, "model": {"kind": "tomography"},
            "object": {"representation": "delta_beta"}, "optimizer": {"name": name},
            "epochs": 6, "output": str(tmp_path / f"{name}.zarr"), "progress": False,
            "cluster": {"scheduler": "sync"}}))
        losses[name] = res.loss
    print(losses)
    assert all(b < a for a, b in zip(losses["cg"], losses["cg"][1:]))
    assert losses["cg"][-1] < losses["gd"][-1]
    with pytest.raises(ConfigError, match="cg"):
        run(config_from_dict({
            "data": {"path": sim.path}, "model": {"kind": "tomography"},
            "object": {"representation": "delta_beta", "store": "memory"},
            "optimizer": {"name": "cg"}, "output": str(tmp_path / "m.zarr")}))


def test_counts_without_incident_photons_are_warned_about(tmp_path, caplog):
    """Counts of ~1000 in a file without ``incident_photons`` (default 1): the bare beam would
    be 1000 times the incident one; the log says which attribute to set."""
    from adorym_dask.engine import Reconstruction

    path = _tiny(tmp_path, intensities=np.full((3, 1, 4, 6), 1000.0, np.float32))
    with caplog.at_level("WARNING"):
        Reconstruction(_cfg(tmp_path, path))
    assert "incident_photons" in caplog.text
