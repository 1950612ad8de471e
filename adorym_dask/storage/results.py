"""Everything in a run store besides the object: parameters, loss history, coordinates,
provenance.

The store opens with ``xarray.open_zarr(path)``: ``object (y, x, z, channel)``,
``probe (mode, py, px, channel)`` with channel = (real, imag), one variable per model parameter
(``positions_px (angle, tile, yx)`` in the input file's frame, ``slice_spacings_m (gap,)``,
...) and ``<name>_initial`` beside each refined one, ``probe_mode_power (mode,)``,
``loss (epoch,)``, coordinates ``y``, ``x``, ``z`` in metres, and the config and versions as
attributes.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import zarr

from adorym_dask.optimizers import as_real
from adorym_dask.parameters import mode_power_fractions
from adorym_dask.storage import location
from adorym_dask.storage.object_store import OBJECT


class OutputError(OSError):
    """The output location cannot be used (exists, read-only, not a folder, ...)."""


def check_output(path: str | Path, *, overwrite: bool) -> None:
    """Refuse before any work is done if the run store cannot be written.

    An existing store is never touched unless ``overwrite`` is set.
    """
    if location.is_url(str(path)):
        exists = location.get_bytes(str(path), "zarr.json") is not None
    else:
        path = Path(path)
        exists = path.exists()
    if exists and not overwrite:
        raise OutputError(
            f"output: {path} already exists; continue it with --resume, choose another output "
            "path, or set overwrite: true (--set overwrite=true) to replace it"
        )
    check_writable(path)


def check_writable(path: str | Path) -> None:
    """Raise :class:`OutputError` unless files can be created in ``path``'s folder."""
    if location.is_url(str(path)):
        return
    parent = Path(path).parent if Path(path).parent != Path("") else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output: folder {parent} does not exist; create it or change output")
    # A real write, not os.access: root passes access checks on read-only or immutable folders.
    for folder in (parent, Path(path)):
        if not folder.is_dir():
            continue
        try:
            fd, probe = tempfile.mkstemp(prefix=".adorym-dask-write-test-", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise OutputError(
                f"output: cannot write in folder {folder} ({err.strerror}); choose a writable "
                "output path"
            ) from None


def versions() -> dict[str, str]:
    """Versions of the packages a result depends on, and the git commit of the source."""
    out = {}
    for name in ("adorym-dask", "torch", "numpy", "dask", "distributed", "zarr"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    try:
        src = Path(__file__).resolve().parents[2]
        out["git"] = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
            timeout=5, check=False,
        ).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        out["git"] = "unknown"
    return out


def _put(
    group: zarr.Group, name: str, data: np.ndarray, dims: list[str], attrs: dict | None = None
) -> None:
    # attributes go in with the array: setting them afterwards through a group opened from
    # consolidated metadata would rewrite the array's metadata with its stale shape
    group.create_array(name, data=data, dimension_names=dims, overwrite=True,
                       attributes=attrs or {})


def write_coordinates(
    path: str, *, shape: tuple[int, int, int], pixel_size_m: float, slice_spacings_m=()
) -> None:
    """Physical coordinates (metres) of the object axes ``shape = (n_y, n_x, n_z)``: z is the
    depth of each slice from the slice spacings (one per gap), or steps of a pixel."""
    if len(slice_spacings_m):
        z = np.concatenate([[0.0], np.cumsum(slice_spacings_m)])
    else:
        z = np.arange(shape[2]) * pixel_size_m
    g = location.open_group(path)
    for name, values in (("y", np.arange(shape[0]) * pixel_size_m),
                         ("x", np.arange(shape[1]) * pixel_size_m), ("z", z)):
        _put(g, name, np.asarray(values, np.float64), [name], {"units": "m"})


def write_array(
    path: str, name: str, value: np.ndarray, dims: tuple[str, ...] | list[str],
    attrs: dict | None = None,
) -> None:
    """Store one variable; a complex value gets a trailing ``channel`` = (real, imag)."""
    if np.iscomplexobj(value):
        value, dims = as_real(value), [*dims, "channel"]
    _put(location.open_group(path), name, np.asarray(value), list(dims), attrs)


def write_parameters(
    path: str,
    specs: dict,
    values: dict[str, np.ndarray],
    initial: dict[str, np.ndarray],
    *,
    refined: set[str],
    offset_px: np.ndarray,
) -> None:
    """Every model parameter under its output name, ``<output>_initial`` beside each refined
    one, and the probe's mode power fractions ``probe_mode_power (mode,)``. Positions are
    written in the input file's frame (``offset_px``, the engine's shift, removed)."""

    def file_frame(name: str, value: np.ndarray) -> np.ndarray:
        return value - offset_px if name == "positions" else value

    for name, spec in specs.items():
        write_array(path, spec.output, file_frame(name, values[name]), spec.dims)
        if name in refined:
            write_array(path, f"{spec.output}_initial", file_frame(name, initial[name]), spec.dims)
    if "probe" in values and np.ndim(values["probe"]) == 3:  # modes (not an illumination)
        write_array(path, "probe_mode_power", mode_power_fractions(values["probe"]), ["mode"])


def fill_beta_from_kappa(path: str, kappa: float) -> None:
    """Write ``beta = kappa * delta`` into channel 1 of the run store's ``object`` (a model
    with the homogeneous-object constraint refines delta only), one chunk row at a time."""
    arr = location.open_array(path, OBJECT)
    step = arr.chunks[0]
    for y0 in range(0, arr.shape[0], step):
        delta = np.asarray(arr[y0 : y0 + step, :, :, 0])
        arr[y0 : y0 + step, :, :, 1] = (kappa * delta).astype(arr.dtype)


def write_history(path: str, loss: list[float], epoch_seconds: list[float]) -> None:
    """Store the loss and the wall seconds of every finished epoch, ``(epoch,)`` each."""
    write_array(path, "loss", np.asarray(loss, np.float64), ["epoch"])
    write_array(path, "epoch_seconds", np.asarray(epoch_seconds, np.float64), ["epoch"],
                {"units": "s"})


def write_setup_seconds(path: str, seconds: float) -> None:
    """Store the run's seconds outside its epochs and the cluster's start (0-d)."""
    write_array(path, "setup_seconds", np.asarray(seconds, np.float64), [], {"units": "s"})


def write_attrs(path: str, attrs: dict) -> None:
    g = location.open_group(path)
    g.attrs.update(json.loads(json.dumps(attrs, default=str)))


def finalize(path: str) -> None:
    """Consolidate metadata so xarray opens the store with one read."""
    with warnings.catch_warnings():
        # zarr warns that consolidated metadata is not (yet) in the v3 spec; xarray reads it.
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        # ... and that the checkpoint file beside the arrays is not a zarr node.
        warnings.filterwarnings("ignore", message="Object at .* is not recognized", category=UserWarning)
        zarr.consolidate_metadata(location.zarr_store(path))


@dataclass
class RunResult:
    """Where a run wrote its result, and its small outputs."""

    output: Path | str
    loss: list[float]
    params: dict[str, np.ndarray]
    position_offset_px: np.ndarray = field(default_factory=lambda: np.zeros(2))

    @property
    def probe(self) -> np.ndarray:
        """The probe ``[M, py, px]`` complex (models that have one)."""
        return self.params["probe"]

    @property
    def positions_px(self) -> np.ndarray:
        """Positions ``[n_angles, n_tiles, 2]`` in the input file's frame."""
        return self.params["positions"] - self.position_offset_px

    def open(self):
        """The run store as an ``xarray.Dataset``."""
        import xarray as xr

        return xr.open_zarr(location.zarr_store(str(self.output)))

    def object(self) -> np.ndarray:
        """The object ``[n_y, n_x, n_z, 2]`` (loads it whole)."""
        return np.asarray(location.open_array(str(self.output), OBJECT, mode="r")[...])
