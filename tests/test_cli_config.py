"""The CLI and config contract, and bad input: each error names the field and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml

from adorym_dask.cli import main
from adorym_dask.config import ConfigError, load_config
from adorym_dask.engine import run
from adorym_dask.parameters import ProbeError
from adorym_dask.simulate import simulate_ptychography
from adorym_dask.storage.measurements import MeasurementError, write_measurements
from adorym_dask.storage.results import OutputError

CONTRACT = """
data: {path: scan.h5}
model: {kind: ptychography, probe_modes: 1, slices: 1}
probe: {init: from_data}
object: {representation: real_imag}
optimizer: {name: adam, step_size: 0.01}
epochs: 2
minibatch_size: 32
output: run.zarr
cluster: {n_workers: 2}
"""


@pytest.fixture
def scan(tmp_path) -> Path:
    simulate_ptychography(tmp_path / "scan.h5", object_shape=(80, 80), probe_shape=(32, 32),
                          n_positions=30, seed=0)
    return tmp_path / "scan.h5"


def _write_yaml(tmp_path: Path, text: str = CONTRACT, **changes) -> Path:
    tree = yaml.safe_load(text)
    tree.update(changes)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_cli_contract_output_layout(tmp_path, scan):
    """The documented keys run through the CLI (here in-process with --set overrides), and the
    store opens with xarray with the documented variables, dims and attrs."""
    cfg = _write_yaml(tmp_path)
    rc = main(["reconstruct", str(cfg), "--set", "cluster.scheduler=sync",
               "--set", "progress=false", "--png", str(tmp_path / "run.png")])
    assert rc == 0
    ds = xr.open_zarr(tmp_path / "run.zarr")
    assert ds["object"].dims == ("y", "x", "z", "channel")
    assert ds["object"].dtype == np.float32
    assert ds["object"].attrs["representation"] == "real_imag"
    assert ds["probe"].dims == ("mode", "py", "px", "channel")
    assert ds["probe"].shape == (1, 32, 32, 2)
    assert ds["loss"].dims == ("epoch",) and ds["loss"].shape == (2,)
    assert ds.attrs["config"]["optimizer"]["step_size"] == 0.01
    assert "torch" in ds.attrs["versions"]
    assert float(ds["x"][1] - ds["x"][0]) == pytest.approx(ds.attrs["pixel_size_m"])
    assert (tmp_path / "run.png").stat().st_size > 1000


def test_cli_png_includes_the_positions_plot_when_positions_are_refined(tmp_path):
    """``--png run.png`` with ``refine: {positions: {}}`` writes ``run_positions.png`` too, and
    the store holds the refined positions in the file's frame beside their start values."""
    sim = simulate_ptychography(tmp_path / "scan.h5", object_shape=(80, 80), probe_shape=(32, 32),
                                n_positions=30, position_error_px=1.0, seed=1)
    cfg = _write_yaml(tmp_path, epochs=4, refine={"positions": {"start_epoch": 1}})
    rc = main(["reconstruct", str(cfg), "--set", "cluster.scheduler=sync",
               "--set", "progress=false", "--png", str(tmp_path / "run.png")])
    assert rc == 0
    ds = xr.open_zarr(tmp_path / "run.zarr")
    assert ds["positions_px"].dims == ("angle", "tile", "yx")
    np.testing.assert_allclose(ds["positions_px_initial"].values[0], sim.recorded_positions_px,
                               rtol=0, atol=1e-9)  # the file frame: the engine offset removed
    assert not np.array_equal(ds["positions_px"].values, ds["positions_px_initial"].values)
    image = plt_imread(tmp_path / "run_positions.png")
    assert image.ndim == 3 and image.shape[0] > 300 and image.std() > 0


def plt_imread(path: Path) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(path)


def test_cli_subprocess_on_local_cluster(tmp_path, scan):
    """The real console script on its default LocalCluster (2 workers)."""
    cfg = _write_yaml(tmp_path, epochs=1)
    exe = Path(sys.executable).parent / "adorym-dask"
    if not exe.is_file():
        pytest.skip("console script adorym-dask not installed in this environment")
    proc = subprocess.run([str(exe), "reconstruct", str(cfg), "--set", "progress=false"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert xr.open_zarr(tmp_path / "run.zarr")["loss"].shape == (1,)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"epoch": 3}, "epoch"),  # typo of epochs
        ({"optimizer": {"name": "lbfgs"}}, "optimizer.name"),
        ({"model": {"kind": "laminography"}}, "model.kind"),
        ({"model": {"slices": 2}}, "slice_spacings_m"),
        ({"model": {"slices": 2, "slice_spacing_m": 1e-6}}, "slice_spacings_m"),
        ({"probe": {"refine": False}}, r"refine: {probe: null}"),
        ({"probe": {"step_size": 0.1}}, r"refine: {probe: {step_size"),
        ({"probe": {"refine_start_epoch": 3}}, r"refine: {probe: {start_epoch"),
        ({"refine": {"positions": {"start_epoch": 4, "stop_epoch": 2}}}, "refine.positions"),
        ({"refine": {"probe": {"optimizer": "lbfgs"}}}, "refine.probe.optimizer"),
        ({"regularizers": [{"kind": "tv", "weight": [1e-3, 1e-3]}]}, "regularizers.0.weight"),
        ({"probe": {"init": "file"}}, "probe.path"),
        ({"minibatch_size": 0}, "minibatch_size"),
    ],
)
def test_bad_config_names_field(tmp_path, change, field):
    cfg = _write_yaml(tmp_path, **change)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("{", r"\{")):
        load_config(cfg)


def test_missing_data_key(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("epochs: 2\n")
    with pytest.raises(ConfigError, match=r"data: required key is missing"):
        load_config(cfg)


def test_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(_write_yaml(tmp_path), overrides=["epochs"])


def test_existing_output_is_refused_and_kept(tmp_path, scan):
    cfg = load_config(_write_yaml(tmp_path), overrides=["cluster.scheduler=sync", "progress=0"])
    first = run(cfg)
    before = first.object().copy()
    with pytest.raises(OutputError, match="overwrite"):
        run(cfg)
    np.testing.assert_array_equal(xr.open_zarr(tmp_path / "run.zarr")["object"].values, before)


def test_cli_reports_user_errors_without_traceback(tmp_path, scan, capsys):
    cfg = _write_yaml(tmp_path, output=str(tmp_path / "missing-folder" / "run.zarr"))
    assert main(["reconstruct", str(cfg), "--set", "cluster.scheduler=sync"]) == 2
    err = capsys.readouterr().err
    assert "output" in err and "does not exist" in err and "Traceback" not in err


def test_read_only_output_folder(tmp_path, scan):
    """A folder nobody may write in (immutable even for root) fails before any work."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode != 0:
        ro.chmod(0o555)
    try:
        probe_write = ro / "x"
        try:
            probe_write.touch()
            probe_write.unlink()
            pytest.skip("cannot make a read-only folder here (no chattr, running as root)")
        except OSError:
            pass
        cfg = load_config(_write_yaml(tmp_path, output=str(ro / "run.zarr")),
                          overrides=["cluster.scheduler=sync"])
        with pytest.raises(OutputError, match="cannot write in folder"):
            run(cfg)
    finally:
        subprocess.run(["chattr", "-i", str(ro)], capture_output=True)
        ro.chmod(0o755)


def test_probe_file_with_wrong_shape(tmp_path, scan):
    np.save(tmp_path / "p.npy", np.ones((16, 16), np.complex64))
    cfg = load_config(_write_yaml(tmp_path, probe={"init": "file", "path": "p.npy"}),
                      overrides=["cluster.scheduler=sync"])
    with pytest.raises(ProbeError, match=r"probe\.path.*does not match the detector"):
        run(cfg)


def test_nan_measurement_through_engine(tmp_path):
    data = np.ones((1, 4, 16, 16), np.float32)
    data[0, 2, 3, 3] = np.nan
    with pytest.raises(MeasurementError, match="intensities"):
        write_measurements(tmp_path / "bad.h5", intensities=data,
                           positions_px=np.zeros((4, 2)), energy_ev=1e4, pixel_size_m=1e-8)


def test_missing_energy_through_config(tmp_path):
    import h5py

    with h5py.File(tmp_path / "scan.h5", "w") as f:
        f["intensities"] = np.ones((1, 3, 16, 16), np.float32)
        f["positions_px"] = np.zeros((3, 2))
        f.attrs["pixel_size_m"] = 1e-8
    cfg = load_config(_write_yaml(tmp_path), overrides=["cluster.scheduler=sync"])
    with pytest.raises(MeasurementError, match="energy_ev"):
        run(cfg)


def test_demo_writes_store_and_png(tmp_path, capsys):
    """The Quick start's demo: simulated data, a LocalCluster, demo.zarr and demo.png."""
    assert main(["demo", "--folder", str(tmp_path), "--epochs", "3", "--workers", "1"]) == 0
    ds = xr.open_zarr(tmp_path / "demo.zarr")
    assert ds["loss"].shape == (3,) and ds["loss"].values[-1] < ds["loss"].values[0]
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert "correlation" in capsys.readouterr().out
