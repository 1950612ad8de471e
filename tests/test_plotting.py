"""PNG summaries for every model: a tiny run of each (in process), then ``save_run_pngs``:
the files are valid images of sensible size, and the parameter panel lists the refined
parameters with their initial values."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from adorym_dask.config import config_from_dict
from adorym_dask.engine import run
from adorym_dask.plotting import (
    refined_parameters,
    save_parameters_png,
    save_probe_png,
    save_run_pngs,
)
from adorym_dask.storage.measurements import write_measurements

SYNC = {"cluster": {"scheduler": "sync"}, "progress": False}


def _ptychography(tmp_path):
    from adorym_dask.simulate import simulate_ptychography

    sim = simulate_ptychography(tmp_path / "p.h5", object_shape=(40, 40), probe_shape=(16, 16),
                                n_positions=12, probe_modes=2, slices=2, seed=0, progress=False)
    return {"data": {"path": str(sim.path)},
            "model": {"kind": "ptychography", "probe_modes": 2, "slices": 2,
                      "slice_spacings_m": [5e-7]},
            "refine": {"positions": {"start_epoch": 0}, "slice_spacings": {"start_epoch": 0}}}


def _holography(tmp_path):
    from adorym_dask.simulate_holography import simulate_holography

    sim = simulate_holography(tmp_path / "h.h5", size_px=24, distances_m=(0.4, 0.7),
                              affine_error_px=1.0, seed=3, progress=False)
    return {"data": {"path": str(sim.path)}, "model": {"kind": "holography"},
            "refine": {"distances": {}, "affine": {"start_epoch": 0}}}


def _tomography(tmp_path):
    from adorym_dask.simulate_tomography import simulate_tomography

    sim = simulate_tomography(str(tmp_path / "t.h5"), shape=(6, 12, 12), n_angles=8,
                              offset_px=0.5, poisson=False, seed=5, progress=False)
    return {"data": {"path": sim.path}, "model": {"kind": "tomography"},
            "object": {"representation": "delta_beta"},
            "refine": {"offsets": {"start_epoch": 0}, "rotation_centre": {"start_epoch": 0},
                       "tilts": {}}}


def _ptychotomography(tmp_path):
    pos = np.stack(np.meshgrid([0, 4], [0, 4], indexing="ij"), -1).reshape(-1, 2).astype(float)
    rng = np.random.default_rng(0)
    path = write_measurements(
        tmp_path / "pt.h5", intensities=rng.uniform(0.5, 2, (3, 4, 8, 8)).astype(np.float32),
        positions_px=np.broadcast_to(pos, (3, 4, 2)).copy(),
        angles_rad=np.linspace(0, np.pi, 3, endpoint=False), energy_ev=10000.0,
        pixel_size_m=2e-8, detector_distance_m=1.0)
    return {"data": {"path": str(path)}, "model": {"kind": "ptychotomography"},
            "object": {"representation": "delta_beta"},
            "refine": {"positions": {"start_epoch": 0, "max_shift_px": 1},
                       "tilts": {"start_epoch": 0}}}


MODELS = {
    # model: (make the config, refined parameters in the panel, files besides the summary)
    "ptychography": (_ptychography, {"slice_spacings_m"}, {"positions", "probe", "parameters"}),
    "holography": (_holography, {"distances_m", "affine"}, {"parameters"}),
    "tomography": (_tomography, {"offsets_px", "rotation_centre_px", "tilts_rad"},
                   {"parameters"}),
    "ptychotomography": (_ptychotomography, {"tilts_rad"}, {"positions", "parameters"}),
}


def _image_size(path):
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_model_gets_its_pictures(tmp_path, kind):
    make, names, extras = MODELS[kind]
    cfg = make(tmp_path)
    out = tmp_path / "run.zarr"
    result = run(config_from_dict({**cfg, "epochs": 2, "output": str(out), **SYNC}))
    pngs = save_run_pngs(tmp_path / "run.png", result)
    assert pngs[0].name == "run.png"
    assert {p.stem.removeprefix("run_") for p in pngs[1:]} == extras
    for png in pngs:
        w, h = _image_size(png)
        assert 200 <= w <= 6000 and 200 <= h <= 4000, (png.name, w, h)
    rows = refined_parameters(xr.open_zarr(out))
    assert {r.name for r in rows} - {"positions_px"} == names
    for row in rows:
        assert row.initial.shape == row.refined.shape
    # a run store's path draws the same pictures
    again = save_run_pngs(tmp_path / "again.png", out)
    assert [p.name.replace("again", "run") for p in again] == [p.name for p in pngs]


def test_parameter_rows_and_panels_without_a_run(tmp_path):
    ds = xr.Dataset({
        "kappa": ((), 0.09), "kappa_initial": ((), 0.02),
        "distances_m": (("hologram",), [0.41, 0.6]),
        "distances_m_initial": (("hologram",), [0.38, 0.58]),
        "tilts_rad": (("angle", "rot_axis"), np.full((5, 3), 1e-3)),
        "tilts_rad_initial": (("angle", "rot_axis"), np.zeros((5, 3))),
        "probe": (("mode", "py", "px", "channel"), np.ones((1, 4, 4, 2))),
        "probe_initial": (("mode", "py", "px", "channel"), np.ones((1, 4, 4, 2))),
        "offsets_px": (("angle", "yx"), np.zeros((5, 2))),  # held: no _initial
    })
    rows = {r.name: r for r in refined_parameters(ds)}
    assert set(rows) == {"kappa", "distances_m", "tilts_rad"}
    assert rows["kappa"].summary() == "kappa (scalar): 0.02 -> 0.09"
    assert rows["distances_m"].summary() == "distances_m (2): [0.38, 0.58] -> [0.41, 0.6]"
    assert "largest change 0.001" in rows["tilts_rad"].summary()
    init, ref, labels = rows["tilts_rad"].table()
    assert init.shape == ref.shape == (5, 3) and labels == ["y", "x", "z"]
    png = save_parameters_png(tmp_path / "p.png", list(rows.values()))
    assert _image_size(png)[0] >= 200
    with pytest.raises(ValueError, match="rows"):
        save_parameters_png(tmp_path / "none.png", [])
    probe = np.exp(1j * np.linspace(0, 3, 3 * 8 * 8)).reshape(3, 8, 8)
    assert _image_size(save_probe_png(tmp_path / "probe.png", probe))[0] >= 300
