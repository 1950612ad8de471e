"""``adorym-dask inspect`` and ``adorym-dask convert``: reports of run stores and of every
measurement format, conversion of each foreign format to the native layout (the converted
file reads exactly as the original), refusals and clear errors."""

from __future__ import annotations

import argparse

import h5py
import numpy as np
import pytest

from adorym_dask import convert as convert_mod
from adorym_dask.config import config_from_dict, load_config
from adorym_dask.convert import add_convert_arguments, convert, run_convert
from adorym_dask.engine import run
from adorym_dask.inspect import add_inspect_arguments, describe, run_inspect
from adorym_dask.simulate import simulate_ptychography
from adorym_dask.storage import measurements as meas_mod
from adorym_dask.storage.measurements import MeasurementError, open_measurements, read_tiles
from adorym_dask.storage.results import OutputError

EV_J = 1.602176634e-19


# -- small files of every format -----------------------------------------------------------
def _cxi(path, *, energy=True):
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 1000, size=(7, 8, 8)).astype(np.int32)
    trans = np.zeros((7, 3))
    trans[:, 0] = np.arange(7) * 1e-7
    trans[:, 1] = -np.arange(7) * 2e-7
    mask = np.zeros((8, 8), np.uint32)
    mask[1, 2] = 1
    with h5py.File(path, "w") as f:
        f["entry_1/data_1/data"] = frames
        if energy:
            f["entry_1/instrument_1/source_1/energy"] = EV_J * 10000.0
        f["entry_1/instrument_1/detector_1/distance"] = 2.0
        f["entry_1/instrument_1/detector_1/x_pixel_size"] = 75e-6
        f["entry_1/instrument_1/detector_1/mask"] = mask
        f["entry_1/sample_1/geometry_1/translation"] = trans
    return path


def _adorym(path):
    rng = np.random.default_rng(2)
    with h5py.File(path, "w") as f:
        f["exchange/data"] = np.sqrt(rng.poisson(50.0, (2, 5, 8, 6))).astype(np.float32)
        f["metadata/probe_pos_px"] = rng.uniform(0, 20, (5, 2))
        f["metadata/energy_ev"] = 5000.0
        f["metadata/psize_cm"] = 1e-6
        f["metadata/theta"] = np.array([0.0, 1.0])
        f["metadata/raw_data_type"] = "magnitude"
    return path


def _data_exchange(path, *, energy=True):
    rng = np.random.default_rng(3)
    with h5py.File(path, "w") as f:
        f["exchange/data"] = rng.uniform(150, 1100, (4, 3, 5)).astype(np.float32)
        f["exchange/data_white"] = 1100 + rng.integers(0, 50, (3, 3, 5)).astype(np.float32)
        f["exchange/data_dark"] = 100 + rng.integers(0, 5, (2, 3, 5)).astype(np.float32)
        f["exchange/theta"] = np.array([0.0, 45.0, 90.0, 180.0])
        f["exchange/theta"].attrs["units"] = "degrees"
        if energy:
            f.create_dataset("measurement/instrument/monochromator/energy",
                             data=20.0).attrs["units"] = "keV"
        f.create_dataset("measurement/instrument/detector/actual_pixel_size_x",
                         data=1.5).attrs["units"] = "um"
    return path


def _native(tmp_path):
    return simulate_ptychography(tmp_path / "native.h5", object_shape=(40, 40),
                                 probe_shape=(16, 16), n_positions=12, seed=0,
                                 progress=False).path


MAKERS = {"cxi": lambda t: _cxi(t / "d.cxi"), "adorym_h5": lambda t: _adorym(t / "a.h5"),
          "data_exchange": lambda t: _data_exchange(t / "dx.h5"), "native_h5": _native}


# -- inspect: measurement files ------------------------------------------------------------
@pytest.mark.parametrize("fmt,expect", [
    ("native_h5", ["(1, 12, 16, 16) float32", "energy: 10000 eV", "positions_px: (12, 2)",
                   "opens as 1 angle(s) x 12 tile(s)"]),
    ("cxi", ["'entry_1/data_1/data' (7, 8, 8) int32", "detector distance: 2 m",
             "mask: 63 of 64", "opens as 1 angle(s) x 7 tile(s) of 8 x 8"]),
    ("adorym_h5", ["(2, 5, 8, 6) float32 (magnitudes: squared on read)", "energy: 5000 eV",
                   "angles: 2, 0 .. 57.3 degrees", "pixel size (object plane): 1e-08 m"]),
    ("data_exchange", ["(4, 3, 5) float32", "flat fields: 'exchange/data_white' (3, 3, 5)",
                       "energy: 20000 eV", "pixel size (object plane): 1.5e-06 m",
                       "0 .. 180 degrees"]),
])
def test_inspect_describes_every_format(tmp_path, fmt, expect):
    text = describe(MAKERS[fmt](tmp_path))
    assert f"format: {fmt}" in text
    for piece in expect:
        assert piece in text, (piece, text)
    assert "missing" not in text and "does not open" not in text


def test_inspect_names_what_is_missing_and_the_key_that_supplies_it(tmp_path):
    path = tmp_path / "bare.h5"
    with h5py.File(path, "w") as f:
        f["intensities"] = np.ones((1, 3, 4, 4), np.float32)
        f["positions_px"] = np.zeros((3, 2))
    text = describe(path)
    assert "missing: energy_ev: set data.energy_ev" in text
    assert "missing: pixel_size_m: set data.pixel_size_m" in text
    assert "does not open: energy_ev is missing" in text
    dx = describe(_data_exchange(tmp_path / "dx.h5", energy=False))
    assert "missing: energy_ev: set data.energy_ev (convert: --energy-ev)" in dx
    cxi = describe(_cxi(tmp_path / "d.cxi", energy=False))
    assert "missing: pixel_size_m: cannot derive the object pixel size, energy" in cxi
    assert "(7, 8, 8) int32" in cxi


def test_inspect_errors_are_clear(tmp_path, capsys):
    with pytest.raises(MeasurementError, match="does not exist"):
        describe(tmp_path / "nothing.h5")
    (tmp_path / "notes.h5").write_text("not hdf5")
    with pytest.raises(MeasurementError, match="not a readable HDF5"):
        describe(tmp_path / "notes.h5")
    parser = add_inspect_arguments(argparse.ArgumentParser())
    assert run_inspect(parser.parse_args([str(tmp_path / "nothing.h5")])) == 2
    assert "does not exist" in capsys.readouterr().err


# -- inspect: run stores -------------------------------------------------------------------
def test_inspect_a_run_store_and_write_its_config(tmp_path, capsys):
    data = _native(tmp_path)
    out = tmp_path / "run.zarr"
    run(config_from_dict({
        "data": {"path": str(data)}, "model": {"kind": "ptychography"},
        "refine": {"positions": {"start_epoch": 0}}, "epochs": 2, "output": str(out),
        "cluster": {"scheduler": "sync"}, "progress": False}))
    text = describe(out)
    for piece in ("model: ptychography", "epochs: 2 of 2 done (finished)", "loss: first",
                  "  0      ", "  1      ", "object: (", "probe: 1 mode(s) of 16 x 16",
                  "refined parameters (initial -> refined): positions, probe",
                  "positions_px (1, 12, 2): shift mean", "is at epoch 2, minibatch 0",
                  "adorym-dask reconstruct RUN.yaml --resume --set epochs=12",
                  "--write-config RUN.yaml", "config (YAML", "  epochs: 2"):
        assert piece in text, (piece, text)
    parser = add_inspect_arguments(argparse.ArgumentParser())
    args = parser.parse_args([str(out), "--write-config", str(tmp_path / "again.yaml"),
                              "--png", str(tmp_path / "run.png")])
    assert run_inspect(args) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and (tmp_path / "run_positions.png").is_file()
    cfg = load_config(tmp_path / "again.yaml")
    assert cfg.epochs == 2 and cfg.output == str(out)


# -- convert ---------------------------------------------------------------------------------
def _all_frames(m):
    return np.stack([read_tiles(m.source, a, np.arange(m.n_tiles)) for a in range(m.n_angles)])


def _same(a, b):
    assert (a.n_angles, a.n_tiles, a.det_shape) == (b.n_angles, b.n_tiles, b.det_shape)
    np.testing.assert_array_equal(_all_frames(a), _all_frames(b))
    np.testing.assert_array_equal(a.positions_px, b.positions_px)
    for name in ("energy_ev", "pixel_size_m", "detector_distance_m", "incident_photons"):
        assert getattr(a, name) == getattr(b, name), name
    for name in ("angles_rad", "mask", "distances_m"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("fmt", ["cxi", "adorym_h5", "data_exchange"])
@pytest.mark.parametrize("ext", [".h5", ".zarr"])
def test_converted_file_reads_as_the_original(tmp_path, fmt, ext):
    src = MAKERS[fmt](tmp_path)
    before = src.read_bytes()
    out = convert(src, tmp_path / f"native{ext}", progress=False)
    assert open_measurements(out).source.fmt == ("native_zarr" if ext == ".zarr" else "native_h5")
    _same(open_measurements(src), open_measurements(out))
    assert src.read_bytes() == before  # the input is untouched
    assert f"format: native_{ext[1:] if ext == '.zarr' else 'h5'}" in describe(out)


def test_conversion_streams_in_blocks_and_takes_missing_values(tmp_path, monkeypatch):
    """Blocks of at most 3 frames (the block size made small), and an energy the file lacks
    given as an option."""
    src = _cxi(tmp_path / "d.cxi", energy=False)
    sizes = []

    def spy(source, angle, idx):
        sizes.append(len(idx))
        return read_tiles(source, angle, idx)

    monkeypatch.setattr(meas_mod, "_BLOCK_BYTES", 3 * 8 * 8 * 4)
    monkeypatch.setattr(convert_mod, "read_tiles", spy)
    with pytest.raises(MeasurementError, match="pixel_size_m"):
        convert(src, tmp_path / "n.h5", progress=False)
    out = convert(src, tmp_path / "n.h5", energy_ev=9000.0, progress=False)
    assert sizes == [3, 3, 1]
    _same(open_measurements(src, energy_ev=9000.0), open_measurements(out))
    with h5py.File(out) as f:
        assert f.attrs["source_format"] == "cxi" and f.attrs["converted_from"] == str(src)


def test_convert_rejects_options_a_data_exchange_file_cannot_use(tmp_path):
    """Projections have no cone beam or raw data type: such options are an error, not
    silently dropped; an upper-case .ZARR output is written as zarr."""
    src = _data_exchange(tmp_path / "dx.h5")
    with pytest.raises(MeasurementError, match="--source-distance-m"):
        convert(src, tmp_path / "n.h5", source_distance_m=0.01, progress=False)
    assert not (tmp_path / "n.h5").exists()
    out = convert(src, tmp_path / "N.ZARR", progress=False)
    _same(open_measurements(src), open_measurements(out))


def test_convert_refuses_to_overwrite_and_never_touches_the_input(tmp_path, capsys):
    src = _adorym(tmp_path / "a.h5")
    dst = tmp_path / "n.h5"
    dst.write_text("precious")
    with pytest.raises(OutputError, match="already exists.*--overwrite"):
        convert(src, dst, progress=False)
    assert dst.read_text() == "precious"
    with pytest.raises(OutputError, match="is the input"):
        convert(src, src, overwrite=True, progress=False)
    with pytest.raises(MeasurementError, match="does not exist"):
        convert(tmp_path / "missing.cxi", tmp_path / "m.h5", progress=False)
    with pytest.raises(OutputError, match=r"\.h5, \.hdf5 or \.zarr"):
        convert(src, tmp_path / "n.cxi", progress=False)
    parser = add_convert_arguments(argparse.ArgumentParser())
    assert run_convert(parser.parse_args([str(src), str(dst), "--no-progress"])) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run_convert(parser.parse_args([str(src), str(dst), "--overwrite",
                                          "--no-progress"])) == 0
    _same(open_measurements(src), open_measurements(dst))
