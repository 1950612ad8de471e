"""Tests for adorym_dask.storage.measurements / formats."""

from __future__ import annotations

import os
import pickle

import h5py
import numpy as np
import pytest

from adorym_dask.storage.measurements import (
    MeasurementError,
    check_positions_inside,
    open_measurements,
    read_tiles,
    write_measurements,
)

CDTOOLS_CXI = "/work/shared/data/cdtools/PETRAIII_P25_Near_Field_Ptycho.cxi"


def _data(n_angles=2, n_tiles=7, det=(8, 6), seed=0):
    rng = np.random.default_rng(seed)
    inten = rng.poisson(50.0, size=(n_angles, n_tiles, *det)).astype(np.float32)
    pos = rng.uniform(0, 20, size=(n_angles, n_tiles, 2))
    return inten, pos


def _write(path, **over):
    inten, pos = _data()
    kw = dict(intensities=inten, positions_px=pos, energy_ev=8800.0, pixel_size_m=1e-8)
    kw.update(over)
    write_measurements(path, **kw)
    return kw


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("ext", [".h5", ".zarr"])
def test_native_round_trip(tmp_path, ext):
    inten, pos = _data()
    mask = np.ones(inten.shape[-2:], bool)
    mask[0, 0] = False
    path = tmp_path / f"m{ext}"
    write_measurements(
        path, intensities=inten, positions_px=pos, energy_ev=8800.0, pixel_size_m=1e-8,
        detector_distance_m=2.0, angles_rad=np.array([0.0, 0.5]), mask=mask,
        extra={"ground_truth/object": np.ones((4, 4), np.complex64)},
    )
    m = open_measurements(path)
    assert m.source.fmt == ("native_zarr" if ext == ".zarr" else "native_h5")
    assert (m.n_angles, m.n_tiles, m.det_shape) == (2, 7, (8, 6))
    np.testing.assert_array_equal(m.positions_px, pos)
    np.testing.assert_array_equal(m.mask, mask)
    np.testing.assert_allclose(m.angles_rad, [0.0, 0.5])
    assert m.energy_ev == 8800.0 and m.pixel_size_m == 1e-8 and m.detector_distance_m == 2.0
    assert m.wavelength_m == pytest.approx(1.4089e-10, rel=1e-3)
    src = pickle.loads(pickle.dumps(m.source))
    order = np.array([6, 0, 3, 3, 1])
    np.testing.assert_array_equal(read_tiles(src, 1, order), inten[1, order])
    np.testing.assert_array_equal(read_tiles(src, 0, np.array([2, 3, 4])), inten[0, 2:5])
    assert read_tiles(src, 0, np.array([], int)).shape == (0, 8, 6)


def test_threaded_reads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    inten, pos = _data(n_angles=3, n_tiles=20)
    path = tmp_path / "m.h5"
    write_measurements(path, intensities=inten, positions_px=pos, energy_ev=8800.0,
                       pixel_size_m=1e-8)
    src = open_measurements(path).source
    rng = np.random.default_rng(3)
    jobs = [(int(rng.integers(3)), rng.permutation(20)[:5]) for _ in range(64)]
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda j: read_tiles(src, *j), jobs))
    for (a, idx), out in zip(jobs, outs):
        np.testing.assert_array_equal(out, inten[a, idx])


def test_positions_2d_are_broadcast_and_overrides_win(tmp_path):
    inten, pos = _data()
    path = tmp_path / "m.h5"
    write_measurements(path, intensities=inten, positions_px=pos[0], energy_ev=1000.0,
                       pixel_size_m=1e-8)
    m = open_measurements(path, energy_ev=9000.0, pixel_size_m=2e-8)
    assert m.positions_px.shape == (2, 7, 2)
    np.testing.assert_array_equal(m.positions_px[1], pos[0])
    assert (m.energy_ev, m.pixel_size_m) == (9000.0, 2e-8)


def test_cxi_written_by_test(tmp_path):
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 1000, size=(5, 8, 8)).astype(np.int32)
    trans = np.zeros((5, 3))
    trans[:, 0] = np.arange(5) * 1e-7  # x
    trans[:, 1] = -np.arange(5) * 2e-7  # y
    raw_mask = np.zeros((8, 8), np.uint32)
    raw_mask[1, 2] = 1
    raw_mask[3, 3] = 0x1000
    path = tmp_path / "d.cxi"
    with h5py.File(path, "w") as f:
        f["entry_1/data_1/data"] = frames
        f["entry_1/instrument_1/source_1/energy"] = 1.60217663e-19 * 10000.0  # J
        f["entry_1/instrument_1/detector_1/distance"] = 2.0
        f["entry_1/instrument_1/detector_1/x_pixel_size"] = 75e-6
        f["entry_1/instrument_1/detector_1/mask"] = raw_mask
        f["entry_1/sample_1/geometry_1/translation"] = trans
    m = open_measurements(path)
    assert m.source.fmt == "cxi" and m.source.frames_flat
    assert (m.n_angles, m.n_tiles, m.det_shape) == (1, 5, (8, 8))
    assert m.energy_ev == pytest.approx(10000.0, rel=1e-6)
    psize = m.wavelength_m * 2.0 / (8 * 75e-6)
    assert m.pixel_size_m == pytest.approx(psize)
    np.testing.assert_allclose(m.positions_px[0, :, 1], np.arange(5) * 1e-7 / psize, atol=1e-6)
    np.testing.assert_allclose(m.positions_px[0, :, 0], (4 - np.arange(5)) * 2e-7 / psize,
                               atol=1e-6)
    assert not m.mask[1, 2] and m.mask[3, 3] and m.mask.sum() == 63
    np.testing.assert_array_equal(read_tiles(m.source, 0, np.array([4, 0])), frames[[4, 0]])
    with pytest.raises(MeasurementError, match="angle"):
        read_tiles(m.source, 1, np.array([0]))


@pytest.mark.skipif(not os.path.exists(CDTOOLS_CXI),
                    reason=f"cdtools example data not present at {CDTOOLS_CXI}")
def test_cdtools_cxi():
    m = open_measurements(CDTOOLS_CXI)
    assert (m.n_angles, m.n_tiles, m.det_shape) == (1, 200, (100, 100))
    assert m.energy_ev == pytest.approx(12658.0, abs=1.0)  # wavelength 9.795e-11 m
    assert m.detector_distance_m == pytest.approx(1.12)
    assert m.mask.dtype == bool and m.mask.sum() == 100 * 100 - 5
    assert np.allclose(m.positions_px.min(axis=(0, 1)), 0)
    tiles = read_tiles(m.source, 0, np.array([199, 3, 0]))
    assert tiles.shape == (3, 100, 100) and tiles.dtype == np.float32
    with h5py.File(CDTOOLS_CXI, "r") as f:
        np.testing.assert_array_equal(tiles[1], f["entry_1/instrument_1/detector_1/data"][3])


@pytest.mark.parametrize("kind", ["intensity", "magnitude"])
def test_adorym_layout(tmp_path, kind):
    inten, pos = _data()
    stored = inten if kind == "intensity" else np.sqrt(inten)
    path = tmp_path / "adorym.h5"
    with h5py.File(path, "w") as f:
        f["exchange/data"] = stored
        f["metadata/probe_pos_px"] = pos[0]
        f["metadata/energy_ev"] = 5000.0
        f["metadata/psize_cm"] = 1e-6
        f["metadata/theta"] = np.array([0.0, 1.0])
        f["metadata/free_prop_cm"] = "inf"
    m = open_measurements(path, raw_data_type=kind)
    assert m.source.fmt == "adorym_h5" and m.source.is_amplitude == (kind == "magnitude")
    assert m.pixel_size_m == pytest.approx(1e-8) and m.energy_ev == 5000.0
    assert m.detector_distance_m is None
    np.testing.assert_allclose(m.angles_rad, [0.0, 1.0])
    np.testing.assert_allclose(read_tiles(m.source, 1, np.array([5, 2])), inten[1, [5, 2]],
                               rtol=1e-5)


# ----------------------------------------------------------------------------- validation
def _native_h5(path, *, drop=(), **replace):
    inten, pos = _data()
    content = {"intensities": inten, "positions_px": pos}
    content.update({k: v for k, v in replace.items() if k in ("intensities", "positions_px",
                                                              "mask", "angles_rad")})
    with h5py.File(path, "w") as f:
        for k, v in content.items():
            if k not in drop:
                f[k] = v
        for k, v in {"energy_ev": 8800.0, "pixel_size_m": 1e-8}.items():
            if k not in drop:
                f.attrs[k] = v
    return path


def test_missing_file(tmp_path):
    with pytest.raises(MeasurementError, match="not found"):
        open_measurements(tmp_path / "nope.h5")


def test_not_hdf5(tmp_path):
    p = tmp_path / "bad.h5"
    p.write_text("this is not hdf5")
    with pytest.raises(MeasurementError, match="HDF5"):
        open_measurements(p)


def test_missing_intensities(tmp_path):
    p = _native_h5(tmp_path / "m.h5", drop=("intensities",))
    with pytest.raises(MeasurementError, match="intensities"):
        open_measurements(p)
    p = _native_h5(tmp_path / "m2.h5", drop=("intensities",))
    with pytest.raises(MeasurementError, match="intensities"):
        open_measurements(p, fmt="native_h5")


def test_wrong_positions_shape(tmp_path):
    p = _native_h5(tmp_path / "m.h5", positions_px=np.zeros((7, 3)))
    with pytest.raises(MeasurementError, match="positions_px"):
        open_measurements(p)


def test_positions_tile_mismatch(tmp_path):
    p = _native_h5(tmp_path / "m.h5", positions_px=np.zeros((5, 2)))
    with pytest.raises(MeasurementError, match="positions_px has 5 tiles"):
        open_measurements(p)


def test_nan_intensity(tmp_path):
    inten, _ = _data()
    inten[1, 4, 2, 2] = np.nan
    p = _native_h5(tmp_path / "m.h5", intensities=inten)
    with pytest.raises(MeasurementError, match=r"intensities: NaN.*angle 1, tile 4"):
        open_measurements(p)
    assert open_measurements(p, check_values=False).n_tiles == 7


def test_negative_intensity(tmp_path):
    inten, _ = _data()
    inten[0, 3, 0, 1] = -1.0
    p = _native_h5(tmp_path / "m.h5", intensities=inten)
    with pytest.raises(MeasurementError, match=r"intensities: negative.*angle 0, tile 3"):
        open_measurements(p)
    with pytest.raises(MeasurementError, match="intensities"):
        _write(tmp_path / "w.h5", intensities=inten)
    assert not os.path.exists(tmp_path / "w.h5")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".w.h5")]


def test_mask_shape_mismatch(tmp_path):
    p = _native_h5(tmp_path / "m.h5", mask=np.ones((6, 8), bool))
    with pytest.raises(MeasurementError, match="mask"):
        open_measurements(p)


def test_angles_length_mismatch(tmp_path):
    p = _native_h5(tmp_path / "m.h5", angles_rad=np.zeros(3))
    with pytest.raises(MeasurementError, match="angles_rad"):
        open_measurements(p)


def test_missing_energy_and_override(tmp_path):
    p = _native_h5(tmp_path / "m.h5", drop=("energy_ev",))
    with pytest.raises(MeasurementError, match=r"energy_ev.*data\.energy_ev"):
        open_measurements(p)
    assert open_measurements(p, energy_ev=7000.0).energy_ev == 7000.0
    with pytest.raises(MeasurementError, match="energy_ev"):
        open_measurements(p, energy_ev=-1.0)


def test_positions_outside_object():
    pos = np.array([[[0.0, 0.0], [10.0, 30.5]]])
    check_positions_inside(pos, (8, 8), (64, 64))
    with pytest.raises(MeasurementError, match=r"positions_px.*tile 1.*\(18, 39\)"):
        check_positions_inside(pos, (8, 8), (32, 32, 1))
    with pytest.raises(MeasurementError, match=r"positions_px.*\(8, 8\) pixels.*shifted by \(1.00, 0.00\)"):
        check_positions_inside(np.array([[-1.0, 0.0]]), (8, 8), (32, 32))


@pytest.mark.parametrize("ext", [".h5", ".zarr"])
def test_overwrite_refusal(tmp_path, ext):
    p = tmp_path / f"m{ext}"
    first = _write(p)
    src = open_measurements(p).source
    before = read_tiles(src, 0, np.arange(7))
    with pytest.raises(MeasurementError, match="overwrite"):
        _write(p, energy_ev=1.0)
    m = open_measurements(p)
    assert m.energy_ev == 8800.0
    np.testing.assert_array_equal(read_tiles(m.source, 0, np.arange(7)), before)
    np.testing.assert_array_equal(before, first["intensities"][0])
    inten2 = first["intensities"] * 2
    _write(p, intensities=inten2, overwrite=True)
    np.testing.assert_array_equal(read_tiles(src, 0, np.arange(7)), inten2[0])
    assert sorted(os.listdir(tmp_path)) == [f"m{ext}"]
