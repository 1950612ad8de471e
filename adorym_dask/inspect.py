"""``adorym-dask inspect RUN_OR_DATA``: a human-readable report of a run store or a
measurement file.

A run store (the zarr folder a reconstruction writes, see
:mod:`adorym_dask.storage.results`): model, epochs done of the total, the loss per epoch,
the refined parameters (initial against refined), the object and probe, where the run
resumes (its checkpoint, :mod:`adorym_dask.storage.checkpoint`) and its config as YAML.

A measurement file (native ``.h5``/``.zarr``, CXI, original Adorym HDF5, Data Exchange): its
format and layout, shapes, dtype, energy, pixel size, distances, the positions' range, and
what is missing with the run-file key that supplies it. Only metadata and one frame are
read, never the whole intensity stack.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from adorym_dask.storage import formats
from adorym_dask.storage.checkpoint import CheckpointError, checkpoint_path, load_checkpoint
from adorym_dask.storage.measurements import MeasurementError, open_measurements

__all__ = ["describe", "describe_run", "describe_measurements", "is_run_store",
           "add_inspect_arguments", "run_inspect"]

#: loss rows shown in full; longer histories show their first and last rows
_LOSS_ROWS = 10
#: variables of a run store that are not model parameters
_NOT_PARAMETERS = ("object", "probe", "loss", "epoch_seconds", "setup_seconds",
                   "probe_mode_power", "support", "x", "y", "z")


def is_run_store(path: str | os.PathLike) -> bool:
    """True for a folder written by a reconstruction: a zarr group whose attributes hold the
    run's ``config``, or one with a checkpoint."""
    p = Path(path)
    if not p.is_dir():
        return False
    if checkpoint_path(p).is_file():
        return True
    if not (p / "zarr.json").is_file():
        return False
    import zarr

    try:
        return "config" in zarr.open_group(str(p), mode="r").attrs
    except (OSError, ValueError, KeyError):
        return False


def describe(path: str | os.PathLike) -> str:
    """A report of a run store or a measurement file (see the module docstring).

    Raises
    ------
    MeasurementError
        ``path`` does not exist or is neither a run store nor a readable measurement file.
    """
    p = Path(path)
    if not p.exists():
        raise MeasurementError(
            f"inspect: {p} does not exist; give a run store (the run's output folder) or a "
            "measurement file (.h5, .hdf5, .zarr, .cxi)"
        )
    return describe_run(p) if is_run_store(p) else describe_measurements(p)


# ----------------------------------------------------------------------------
# run stores
# ----------------------------------------------------------------------------
def _open_dataset(path: Path):
    """The store as an xarray Dataset, or None where nothing readable was written yet."""
    import xarray as xr

    from adorym_dask.storage import location

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # consolidated metadata / the checkpoint file
        try:
            return xr.open_zarr(location.zarr_store(str(path)))
        except (OSError, ValueError, KeyError):
            return None


def describe_run(path: str | os.PathLike) -> str:
    """The report of a run store (see the module docstring)."""
    import zarr

    path = Path(path)
    attrs = dict(zarr.open_group(str(path), mode="r").attrs) if (path / "zarr.json").is_file() \
        else {}
    ck = None
    ck_problem = None
    try:
        ck = load_checkpoint(path)
    except CheckpointError as err:
        ck_problem = str(err)
    config = attrs.get("config") or (ck.config if ck is not None else {})
    ds = _open_dataset(path)
    lines = [f"run store {path}"]
    lines += _model_lines(config, attrs)
    loss, seconds = _history(ck, ds)
    lines += _epoch_lines(config, ck, loss)
    lines += _loss_lines(loss, seconds)
    if ds is not None:
        lines += _object_lines(ds, attrs)
        lines += _parameter_lines(ds, attrs)
    lines += _resume_lines(path, config, ck, ck_problem, len(loss))
    lines += ["", "config (YAML; write it out with --write-config RUN.yaml):"]
    lines += ["  " + row for row in config_yaml(config).rstrip().splitlines()]
    return "\n".join(lines)


def config_yaml(config: dict) -> str:
    """A run's config (JSON form, as stored) as a YAML run file."""
    import yaml

    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def write_config(path: str | os.PathLike, run: str | os.PathLike, *,
                 overwrite: bool = False) -> Path:
    """Write the config stored in ``run`` (a run store) as a YAML run file at ``path``."""
    import zarr

    out = Path(path)
    if out.exists() and not overwrite:
        raise MeasurementError(f"--write-config: {out} already exists; choose another path")
    config = dict(zarr.open_group(str(run), mode="r").attrs).get("config")
    if config is None:
        config = load_checkpoint(run).config
    out.write_text(config_yaml(config))
    return out


def _model_lines(config: dict, attrs: dict) -> list[str]:
    model = dict(config.get("model", {}))
    kind = model.pop("kind", "unknown")
    shown = ", ".join(f"{k} {v}" for k, v in model.items() if v is not None)
    data = config.get("data", {}).get("path", attrs.get("data_path", "?"))
    out = [f"model: {kind}" + (f" ({shown})" if shown else "")]
    found = attrs.get("data_path", data)  # the absolute path the run read
    here = "" if Path(str(found)).exists() else "  [not found here: resuming needs it]"
    energy, pixel = attrs.get("energy_ev"), attrs.get("pixel_size_m")
    out.append(f"data: {data}{here}")
    if energy is not None:
        out.append(f"  energy {energy:g} eV, object pixel {pixel:.4g} m")
    return out


def _history(ck, ds) -> tuple[list[float], list[float]]:
    """Loss and seconds of every finished epoch: the checkpoint's (the newest), else the store's."""
    if ck is not None:
        return list(ck.loss), list(ck.epoch_seconds)
    if ds is not None and "loss" in ds:
        secs = ds["epoch_seconds"].values.tolist() if "epoch_seconds" in ds else []
        return ds["loss"].values.tolist(), secs
    return [], []


def _epoch_lines(config: dict, ck, loss: list[float]) -> list[str]:
    total = config.get("epochs", "?")
    done = len(loss)
    state = "finished" if done == total else "not finished"
    line = f"epochs: {done} of {total} done ({state})"
    if ck is not None and ck.batch > 0:
        line += f"; epoch {ck.epoch} is under way, {ck.batch} minibatch(es) committed"
    return [line]


def _loss_lines(loss: list[float], seconds: list[float]) -> list[str]:
    if not loss:
        return ["loss: no epoch finished yet"]
    best = int(np.argmin(loss))
    out = [f"loss: first {loss[0]:.6g}, last {loss[-1]:.6g}, min {loss[best]:.6g} "
           f"(epoch {best})", "  epoch  loss          seconds"]
    rows = list(range(len(loss)))
    if len(rows) > _LOSS_ROWS:
        rows = rows[: _LOSS_ROWS // 2] + [-1] + rows[-(_LOSS_ROWS // 2):]
    for e in rows:
        if e < 0:
            out.append("  ...")
            continue
        sec = f"{seconds[e]:.2f}" if e < len(seconds) else ""
        out.append(f"  {e:<5d}  {loss[e]:<12.6g}  {sec}")
    return out


def _object_lines(ds, attrs: dict) -> list[str]:
    out = []
    if "object" in ds:
        obj = ds["object"]
        rep = attrs.get("representation", "?")
        chunks = tuple(c[0] for c in obj.chunks) if obj.chunks else None
        line = (f"object: {tuple(obj.shape)} {obj.dtype} (y, x, z, channel), {rep}, "
                f"{attrs.get('store', '?')} store, chunks {chunks}")
        if "y" in ds.coords and "x" in ds.coords and ds.sizes.get("y", 0) > 1:
            py = float(ds.y[1] - ds.y[0])
            line += f"; {obj.shape[0] * py * 1e6:.4g} x {obj.shape[1] * py * 1e6:.4g} um"
        out.append(line)
        if "field_box_px" in attrs:
            out.append(f"  measured field (y0, x0, h, w): {attrs['field_box_px']}")
    if "probe" in ds:
        probe = ds["probe"]
        if probe.ndim == 4:
            power = ds["probe_mode_power"].values if "probe_mode_power" in ds else None
            frac = "" if power is None else \
                ", power fractions " + ", ".join(f"{v:.3f}" for v in power)
            out.append(f"probe: {probe.shape[0]} mode(s) of {probe.shape[1]} x "
                       f"{probe.shape[2]}{frac}")
        else:
            out.append(f"illumination: {probe.shape[0]} x {probe.shape[1]}")
    return out


def _parameter_lines(ds, attrs: dict) -> list[str]:
    from adorym_dask.plotting_parameters import refined_parameters

    rows = refined_parameters(ds)
    refined = attrs.get("refined", [])
    out = ["refined parameters (initial -> refined): " + (", ".join(refined) or "none")]
    for row in rows:
        if row.name == "positions_px":
            shift = np.linalg.norm(row.change, axis=-1)
            out.append(f"  positions_px {row.refined.shape}: shift mean {shift.mean():.3g} px, "
                       f"max {shift.max():.3g} px")
        else:
            out.append("  " + row.summary())
    if "probe_initial" in ds:
        p0, p1 = (np.asarray(ds[n].values, np.float64) for n in ("probe_initial", "probe"))
        rel = np.linalg.norm(p1 - p0) / max(float(np.linalg.norm(p0)), 1e-300)
        out.append(f"  probe {tuple(ds['probe'].shape[:-1])} complex: changed by {rel:.3g} of "
                   "its norm (pictures: inspect RUN --png FILE)")
    named = {r.name for r in rows}
    fixed = [str(n) for n in ds.data_vars if str(n) not in _NOT_PARAMETERS
             and not str(n).endswith("_initial") and str(n) not in named]
    for name in fixed:
        var = ds[name]
        value = f" = {np.array2string(var.values, precision=5, threshold=6)}" \
            if var.size <= 6 else ""
        out.append(f"held: {name} {tuple(var.shape)}{value}")
    return out


def _resume_lines(path: Path, config: dict, ck, problem: str | None, done: int) -> list[str]:
    if ck is None:
        return ["resume: not possible: " + (problem or "no checkpoint")]
    out = [f"resume: the checkpoint ({checkpoint_path(path).name}) is at epoch {ck.epoch}, "
           f"minibatch {ck.batch} ({ck.step} minibatches run)"]
    cmd = "adorym-dask reconstruct RUN.yaml --resume"
    if done >= config.get("epochs", 0):
        cmd += f" --set epochs={done + 10}"
        out.append(f"  the run is finished; to run more epochs (e.g. {done + 10} in all):")
    else:
        out.append("  to continue it:")
    stored = config.get("output")
    if stored and Path(str(stored)).is_absolute() and Path(str(stored)) != path.absolute():
        cmd += f" --set output={path}"
        out.append(f"  (the store has moved: its config's output is {stored})")
    out.append(f"    {cmd}")
    out.append("  RUN.yaml is the run file it was started with (its output must be this store); "
               f"without it: adorym-dask inspect {path} --write-config RUN.yaml")
    return out


# ----------------------------------------------------------------------------
# measurement files
# ----------------------------------------------------------------------------
_FORMAT_NAMES = {
    "native_h5": "native layout, HDF5", "native_zarr": "native layout, zarr v3",
    "cxi": "CXI (frames read as one angle of n_frames tiles)",
    "adorym_h5": "original Adorym HDF5 (exchange/data, metadata/...)",
    "data_exchange": "TomoPy / APS Data Exchange (projections with flat and dark fields)",
}


def describe_measurements(path: str | os.PathLike) -> str:
    """The report of a measurement file (see the module docstring)."""
    from adorym_dask.storage import data_exchange

    p = os.path.abspath(os.fspath(path))
    fmt = data_exchange.detect(p) or formats.detect_format(p)
    lines = [f"measurement file {p}", f"format: {fmt}: {_FORMAT_NAMES[fmt]}"]
    if fmt == "data_exchange":
        lines += _data_exchange_lines(p)
    else:
        lines += _raw_lines(p, fmt)
    try:
        m = open_measurements(p, check_values=False)
    except MeasurementError as err:
        lines.append(f"as it stands it does not open: {err}")
    else:
        lines.append(f"opens as {m.n_angles} angle(s) x {m.n_tiles} tile(s) of "
                     f"{m.det_shape[0]} x {m.det_shape[1]}; energy {m.energy_ev:g} eV, object "
                     f"pixel {m.pixel_size_m:.4g} m")
    return "\n".join(lines)


def _open_file(p: str, fmt: str) -> Any:
    if fmt == "native_zarr":
        import zarr

        return zarr.open_group(p, mode="r")
    import h5py

    try:
        return h5py.File(p, "r")
    except (OSError, ValueError) as err:
        raise MeasurementError(f"inspect: {p} is not a readable HDF5 file ({err})") from None


def _frame_stats(ds: Any, frames_flat: bool) -> str:
    frame = np.asarray(ds[0] if frames_flat else ds[0, 0], np.float64)
    return f"first frame: min {frame.min():.4g}, mean {frame.mean():.4g}, max {frame.max():.4g}"


def _raw_lines(p: str, fmt: str) -> list[str]:
    handle = _open_file(p, fmt)
    try:
        try:
            raw = formats.read_metadata(handle, fmt, where=p)
        except MeasurementError as err:
            return _cxi_fallback(handle, p, err) if fmt == "cxi" else [f"problem: {err}"]
        ds = handle[raw.key]
        lines = [_shape_line(raw), _frame_stats(ds, raw.frames_flat)]
        lines += _metadata_lines(raw)
        if fmt == "cxi":
            lines.append("  (far-field reading; near-field CXI data: pass near_field / "
                         "--near-field to convert, and data.source_distance_m for a cone beam)")
        return lines
    finally:
        if hasattr(handle, "close"):
            handle.close()


def _shape_line(raw: formats.RawMeta) -> str:
    shape = tuple(raw.shape)
    n_a, n_t = (1, shape[0]) if raw.frames_flat else shape[:2]
    amp = " (magnitudes: squared on read)" if raw.is_amplitude else ""
    return (f"intensities: '{raw.key}' {shape} {raw.dtype}{amp} -> {n_a} angle(s) x {n_t} "
            f"tile(s), detector {shape[-2]} x {shape[-1]}")


def _metadata_lines(raw: formats.RawMeta) -> list[str]:
    out, missing = [], []
    if raw.energy_ev:
        out.append(f"energy: {raw.energy_ev:g} eV (wavelength "
                   f"{formats.HC_EV_M / raw.energy_ev:.5g} m)")
    else:
        missing.append(("energy_ev", "data.energy_ev (convert: --energy-ev)"))
    if raw.pixel_size_m:
        out.append(f"pixel size (object plane): {raw.pixel_size_m:.5g} m")
    else:
        missing.append(("pixel_size_m", "data.pixel_size_m (convert: --pixel-size-m)"))
    if raw.detector_distance_m:
        out.append(f"detector distance: {raw.detector_distance_m:.5g} m")
    if raw.distances_m is not None:
        out.append(f"distances_m (per hologram): {_values(raw.distances_m)} m")
    if raw.source_distance_m is not None:
        out.append(f"source_distance_m (cone beam): {_values(raw.source_distance_m)} m")
    if raw.angles_rad is not None:
        a = np.degrees(np.asarray(raw.angles_rad, np.float64).reshape(-1))
        out.append(f"angles: {a.size}, {a.min():.4g} .. {a.max():.4g} degrees")
    else:
        out.append("angles: none (fine for a single-angle model; tomography needs angles_rad)")
    if raw.positions_px is not None:
        out.append(_positions_line(np.asarray(raw.positions_px, np.float64),
                                   tuple(raw.shape[-2:])))
    else:
        missing.append(("positions_px", "the file itself (no run-file key): add "
                        "'positions_px' [n_tiles, 2] (y, x) in object pixels"))
    if raw.mask is not None:
        mask = np.asarray(raw.mask, bool)
        out.append(f"mask: {int(mask.sum())} of {mask.size} detector pixels used")
    if raw.incident_photons is not None:
        out.append(f"incident_photons: {raw.incident_photons:g} per pixel")
    for name, where in missing:
        out.append(f"missing: {name}: set {where}")
    return out


def _values(v: Any) -> str:
    return np.array2string(np.asarray(v, np.float64).reshape(-1), precision=5, threshold=8)


def _positions_line(pos: np.ndarray, det: tuple[int, int]) -> str:
    flat = pos.reshape(-1, 2)
    lo, hi = flat.min(axis=0), flat.max(axis=0)
    return (f"positions_px: {pos.shape}, y {lo[0]:.4g} .. {hi[0]:.4g}, x {lo[1]:.4g} .. "
            f"{hi[1]:.4g}; the scan with its tiles spans {hi[0] - lo[0] + det[0]:.0f} x "
            f"{hi[1] - lo[1] + det[1]:.0f} px")


def _cxi_fallback(handle: Any, p: str, err: MeasurementError) -> list[str]:
    """What a CXI file holds when its object pixel cannot be derived."""
    key = next((k for k in formats.CXI_DATA_KEYS if k in handle), None)
    out = []
    if key is not None:
        ds = handle[key]
        out += [f"intensities: '{key}' {tuple(ds.shape)} {ds.dtype} -> 1 angle x "
                f"{ds.shape[0]} tiles, detector {ds.shape[-2]} x {ds.shape[-1]}",
                _frame_stats(ds, True)]
    det = "entry_1/instrument_1/detector_1/"
    for name in ("distance", "x_pixel_size", "y_pixel_size"):
        if det + name in handle:
            out.append(f"detector_1/{name}: {float(np.asarray(handle[det + name][()])):.5g} m")
    tkey = next((k for k in formats.CXI_TRANSLATION_KEYS if k in handle), None)
    if tkey is not None:
        t = np.asarray(handle[tkey][...], np.float64)
        out.append(f"translations: '{tkey}' {t.shape}, x {t[:, 0].min():.4g} .. "
                   f"{t[:, 0].max():.4g} m, y {t[:, 1].min():.4g} .. {t[:, 1].max():.4g} m")
    out.append(f"missing: {err}")
    return out


def _data_exchange_lines(p: str) -> list[str]:
    from adorym_dask.storage import data_exchange as dx

    handle = _open_file(p, "data_exchange")
    try:
        ds = handle[dx.DATA_KEY]
        out = [f"projections: '{dx.DATA_KEY}' {tuple(ds.shape)} {ds.dtype} -> {ds.shape[0]} "
               f"angle(s) x 1 tile, detector {ds.shape[1]} x {ds.shape[2]}",
               _frame_stats(ds, True)]
        for key, what in ((dx.WHITE_KEY, "flat fields"), (dx.DARK_KEY, "dark fields")):
            node = handle.get(key)
            out.append(f"{what}: '{key}' {tuple(node.shape)}" if node is not None else
                       f"missing: {what} '{key}': the file cannot be normalised")
        theta = handle.get(dx.THETA_KEY)
        if theta is not None:
            t = np.asarray(theta[...], np.float64)
            units = theta.attrs.get("units", "degrees")
            units = units.decode() if isinstance(units, bytes) else str(units)
            out.append(f"angles: {t.size}, {t.min():.4g} .. {t.max():.4g} {units}")
        else:
            out.append(f"missing: angles '{dx.THETA_KEY}' (degrees, one per projection)")
        for key, name, unit_map, default, label in (
                (dx.ENERGY_KEY, "energy_ev", dx._ENERGY_UNITS, "j", "energy: {:g} eV"),
                (dx.PIXEL_KEY, "pixel_size_m", dx._LENGTH_UNITS, "m",
                 "pixel size (object plane): {:.5g} m")):
            try:
                value = dx._stored_or_given(handle, key, None, unit_map, default, p, name)
            except MeasurementError:
                flag = "--" + name.replace("_", "-")
                out.append(f"missing: {name}: set data.{name} (convert: {flag})")
            else:
                out.append(label.format(value))
        out.append("read as flat/dark-normalised transmissions (incident_photons = 1)")
        return out
    finally:
        handle.close()


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------
def add_inspect_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``RUN_OR_DATA [--write-config FILE] [--png FILE]`` to ``parser`` (in place); run
    the parsed namespace with :func:`run_inspect`."""
    parser.description = (
        "Describe a run store (config, epochs done, loss, refined parameters, how to resume) "
        "or a measurement file (format, shapes, energy, pixel size, what is missing).")
    parser.add_argument("path", metavar="RUN_OR_DATA",
                        help="a run store (the run's output folder) or a measurement file")
    parser.add_argument("--write-config", metavar="RUN.yaml",
                        help="run stores: write the stored config as a run file here")
    parser.add_argument("--png", metavar="FILE.png",
                        help="run stores: draw the summary pictures here (and beside it)")
    return parser


def run_inspect(args: argparse.Namespace) -> int:
    """Run a parsed ``inspect`` command: print the report; 0 on success, 2 (with the reason
    on stderr) when the path cannot be described."""
    try:
        print(describe(args.path))
        extras = getattr(args, "write_config", None) or getattr(args, "png", None)
        if extras and not is_run_store(args.path):
            raise MeasurementError("--write-config and --png need a run store, not a "
                                   "measurement file")
        if getattr(args, "write_config", None):
            print(f"wrote {write_config(args.write_config, args.path)}")
        if getattr(args, "png", None):
            from adorym_dask.plotting import save_run_pngs

            for png in save_run_pngs(args.png, args.path):
                print(f"wrote {png}")
    except (MeasurementError, CheckpointError) as err:
        print(f"adorym-dask: error: {err}", file=sys.stderr)
        return 2
    return 0
