"""Tests for adorym_dask.storage.data_exchange (TomoPy Data Exchange) and adorym_dask.centre."""

from __future__ import annotations

import logging
import pickle
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from adorym_dask.centre import find_rotation_centre, opposite_pair
from adorym_dask.storage import data_exchange
from adorym_dask.storage.measurements import MeasurementError, open_measurements, read_tiles

TOOTH = Path(__file__).resolve().parents[2] / "shared" / "data" / "tomopy" / "tooth.h5"
N_ANGLES, ROWS, COLS = 4, 3, 5
DEAD = (1, 2)


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Counts with a known dark (~100), white (~1100), one dead pixel and sub-dark values."""
    rng = np.random.default_rng(seed)
    dark = 100.0 + rng.integers(0, 5, size=(2, ROWS, COLS)).astype(np.float32)
    white = 1100.0 + rng.integers(0, 50, size=(3, ROWS, COLS)).astype(np.float32)
    white[:, DEAD[0], DEAD[1]] = dark[:, DEAD[0], DEAD[1]].mean()  # white - dark == 0
    data = rng.uniform(150.0, 1100.0, size=(N_ANGLES, ROWS, COLS)).astype(np.float32)
    data[0, 0, :3] = 90.0  # below every dark value: negative after correction
    data[2, 2, 4] = 95.0
    theta = np.array([0.0, 45.0, 90.0, 180.0])
    return {"exchange/data": data, "exchange/data_white": white, "exchange/data_dark": dark,
            "exchange/theta": theta}


def _write(path: Path, arrays: dict[str, np.ndarray], attrs: dict | None = None) -> Path:
    with h5py.File(path, "w") as f:
        for key, arr in arrays.items():
            f.create_dataset(key, data=arr)
        f["exchange/theta"].attrs["units"] = "degrees"
        for key, (value, units) in (attrs or {}).items():
            f.create_dataset(key, data=value).attrs["units"] = units
    return path


def _expected(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, int]:
    dark = arrays["exchange/data_dark"].astype(np.float64).mean(axis=0)
    white = arrays["exchange/data_white"].astype(np.float64).mean(axis=0)
    span = white - dark
    dead = span <= 0
    raw = (arrays["exchange/data"].astype(np.float64) - dark) / np.where(dead, 1.0, span)
    n_neg = int((raw[:, ~dead] < 0).sum())
    raw[:, dead] = 1.0
    return np.maximum(raw, 0.0).astype(np.float32), n_neg


@pytest.fixture
def dx_file(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    arrays = _arrays()
    return _write(tmp_path / "dx.h5", arrays), arrays


# ----------------------------------------------------------------------------- reading
def test_open_and_read_exact(dx_file, caplog):
    path, arrays = dx_file
    with caplog.at_level(logging.INFO, logger="adorym_dask.storage.data_exchange"):
        m = open_measurements(path, energy_ev=25000.0, pixel_size_m=1e-6)
    want, n_neg = _expected(arrays)
    assert n_neg == 4
    pct = 100.0 * n_neg / (N_ANGLES * (ROWS * COLS - 1))
    assert f"{n_neg} values ({pct:.3g} %) below 0 after flat/dark correction were clipped to 0" \
        in caplog.text
    assert "1 detector pixels with white - dark <= 0 (dead)" in caplog.text
    assert m.source.fmt == "data_exchange" and m.source.key == "exchange/data"
    assert (m.n_angles, m.n_tiles, m.det_shape) == (N_ANGLES, 1, (ROWS, COLS))
    np.testing.assert_array_equal(m.positions_px, np.zeros((N_ANGLES, 1, 2)))
    np.testing.assert_allclose(m.angles_rad, [0.0, np.pi / 4, np.pi / 2, np.pi])
    assert m.incident_photons == 1.0 and m.distances_m is None and m.mask is None
    assert (m.energy_ev, m.pixel_size_m) == (25000.0, 1e-6)
    src = pickle.loads(pickle.dumps(m.source))
    for a in range(N_ANGLES):
        got = read_tiles(src, a, np.array([0, 0]))
        assert got.dtype == np.float32 and got.shape == (2, ROWS, COLS)
        np.testing.assert_allclose(got, np.stack([want[a]] * 2), rtol=1e-6)
    assert read_tiles(src, 0, [0])[0, 0, :3].tolist() == [0.0, 0.0, 0.0]
    assert read_tiles(src, 1, [0])[0][DEAD] == 1.0
    assert read_tiles(src, 0, np.zeros(0, int)).shape == (0, ROWS, COLS)


def test_flat_dark_means_computed_once(dx_file, monkeypatch):
    path, _ = dx_file
    calls = []
    real = data_exchange._frame_mean
    monkeypatch.setattr(data_exchange, "_frame_mean", lambda ds: calls.append(ds.name) or real(ds))
    m = open_measurements(path, energy_ev=25000.0, pixel_size_m=1e-6)
    for a in range(N_ANGLES):
        read_tiles(m.source, a, [0])
    assert sorted(calls) == ["/exchange/data_dark", "/exchange/data_white"]


def test_bad_tile_or_angle(dx_file):
    path, _ = dx_file
    m = open_measurements(path, energy_ev=25000.0, pixel_size_m=1e-6)
    with pytest.raises(MeasurementError, match=r"single tile \(index 0\); got \[1\]"):
        read_tiles(m.source, 0, [0, 1])
    with pytest.raises(MeasurementError, match=r"angle: index 4 outside \[0, 4\)"):
        read_tiles(m.source, 4, [0])


def test_split_into_sub_tiles(dx_file):
    path, arrays = dx_file
    m = open_measurements(path, energy_ev=25000.0, pixel_size_m=1e-6)
    want = _expected(arrays)[0][3]
    split = replace(m.source, split=(2, 3, 2, 2))  # 2 x 2 sub-tiles of 2 x 3 pixels
    got = read_tiles(split, 3, np.arange(4))
    np.testing.assert_allclose(got[0], want[:2, :3], rtol=1e-6)
    np.testing.assert_allclose(got[3, :1, :2], want[2:, 3:], rtol=1e-6)
    assert not got[3, 1:].any() and not got[3, :, 2:].any()  # past the projection: zeros


def test_metadata_from_file_and_override(tmp_path):
    attrs = {data_exchange.ENERGY_KEY: (25.0, "keV"),
             data_exchange.PIXEL_KEY: (0.65, "um")}
    path = _write(tmp_path / "meta.h5", _arrays(), attrs)
    m = open_measurements(path)
    assert m.energy_ev == pytest.approx(25000.0) and m.pixel_size_m == pytest.approx(6.5e-7)
    m = open_measurements(path, fmt="data_exchange", energy_ev=8000.0, pixel_size_m=1e-7)
    assert (m.energy_ev, m.pixel_size_m) == (8000.0, 1e-7)


def test_adorym_4d_exchange_data_not_taken(tmp_path):
    path = tmp_path / "adorym.h5"
    with h5py.File(path, "w") as f:
        f["exchange/data"] = np.ones((1, 2, 4, 4), np.float32)
    assert data_exchange.detect(str(path)) is None


# ----------------------------------------------------------------------------- errors
def _drop(key):
    return lambda a: {k: v for k, v in a.items() if k != key}


def _with(key, value):
    return lambda a: {**a, key: value}


ERRORS = [
    (_drop("exchange/data_white"),
     r"exchange/data_white: missing.*flat fields.*write_measurements"),
    (_drop("exchange/data_dark"), r"exchange/data_dark: missing.*dark fields.*write_measurements"),
    (_with("exchange/data_white", np.ones((2, ROWS, COLS + 1))),
     r"exchange/data_white: shape \(2, 3, 6\) does not match .* \(3, 5\)"),
    (_with("exchange/data_dark", np.ones((2, ROWS - 1, COLS))),
     r"exchange/data_dark: shape \(2, 2, 5\) does not match"),
    (_drop("exchange/theta"), r"exchange/theta: missing.*rotation angles"),
    (_with("exchange/theta", np.arange(3.0)), r"exchange/theta: 3 angles but .* 4 projections"),
    (_with("exchange/theta", np.array([0.0, np.nan, 90.0, 180.0])),
     r"exchange/theta: NaN/inf at projection 1"),
]


@pytest.mark.parametrize(("edit", "message"), ERRORS)
def test_file_errors(tmp_path, edit, message):
    arrays = edit(_arrays())
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        for key, arr in arrays.items():
            f.create_dataset(key, data=arr)
    with pytest.raises(MeasurementError, match=message):
        open_measurements(path, energy_ev=25000.0, pixel_size_m=1e-6)


@pytest.mark.parametrize(("given", "name"), [({"pixel_size_m": 1e-6}, "energy_ev"),
                                             ({"energy_ev": 25000.0}, "pixel_size_m")])
def test_missing_energy_or_pixel(dx_file, given, name):
    path, _ = dx_file
    with pytest.raises(MeasurementError, match=rf"{name}: not given .* set data.{name} in the run"):
        open_measurements(path, **given)


def test_nan_in_projection(tmp_path):
    arrays = _arrays()
    arrays["exchange/data"][2, 1, 1] = np.nan
    path = _write(tmp_path / "nan.h5", arrays)
    with pytest.raises(MeasurementError, match=r"exchange/data: NaN or inf in projection 2"):
        open_measurements(path, energy_ev=25000.0, pixel_size_m=1e-6)


# ----------------------------------------------------------------------------- centre
def _fourier_shift(a: np.ndarray, shift: float) -> np.ndarray:
    k = np.fft.fftfreq(a.shape[-1])
    return np.fft.ifft(np.fft.fft(a, axis=-1) * np.exp(-2j * np.pi * k * shift), axis=-1).real


@pytest.mark.parametrize("centre", [123.3, 131.85])
def test_centre_synthetic(centre):
    cols, x = 256, np.arange(256.0)
    bump = lambda mid, width: np.exp(-(((x - mid) / width) ** 2))  # noqa: E731
    line = np.stack([1.5 * bump(100 + r, 12) + 0.7 * bump(160, 6) + 0.3 * bump(60, 20)
                     for r in range(8)])
    # p180(col) = p0(2c - col) = flipped p0 shifted right by 2c - (cols - 1)
    line_180 = _fourier_shift(line[:, ::-1], 2 * centre - (cols - 1))
    found = find_rotation_centre(np.exp(-line), np.exp(-line_180))
    assert found == pytest.approx(centre, abs=0.1)


def test_opposite_pair():
    assert opposite_pair(np.radians([0.0, 10.0, 190.3, 50.0])) == (1, 2)
    assert opposite_pair(np.radians([350.0, 170.2, 5.0])) == (0, 1)
    assert opposite_pair(np.radians([0.0, 10.0, 20.0])) is None
    assert opposite_pair(np.radians([0.0, 179.4])) is None
    assert opposite_pair(np.zeros(1)) is None


# ----------------------------------------------------------------------------- real file
@pytest.mark.skipif(not TOOTH.exists(), reason=f"TomoPy tooth data not found at {TOOTH}")
def test_tooth():
    m = open_measurements(TOOTH, energy_ev=25000.0, pixel_size_m=1e-6)
    assert m.source.fmt == "data_exchange"
    assert (m.n_angles, m.n_tiles, m.det_shape) == (181, 1, (2, 640))
    proj = np.stack([read_tiles(m.source, a, [0])[0] for a in range(m.n_angles)])
    assert np.mean((proj > 0) & (proj <= 1.2)) > 0.99
    # the file's theta ends at 179.0 degrees (no pair within 0.5 degree of 180 apart)
    assert opposite_pair(m.angles_rad) is None
    centre = find_rotation_centre(proj[0], proj[-1])
    assert 290 < centre < 300
