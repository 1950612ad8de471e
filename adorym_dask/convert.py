"""``adorym-dask convert IN OUT``: CXI, original Adorym HDF5 and Data Exchange files to the
native layout (:mod:`adorym_dask.storage.measurements`).

The source is opened with the same readers a reconstruction uses
(:func:`~adorym_dask.storage.measurements.open_measurements`) and its frames are streamed
through :func:`~adorym_dask.storage.measurements.read_tiles` into
:func:`~adorym_dask.storage.measurements.write_measurements` in blocks of at most ~64 MiB,
never loaded whole, with a progress bar. What the reader does to the data is what the
converted file holds, so both reconstruct alike: Adorym magnitudes are squared, Data
Exchange projections are flat/dark-normalised transmissions (``incident_photons = 1``), a
cone beam's distances become effective plane-wave ones, a CXI scan becomes one angle of
``n_frames`` tiles with positions in object pixels. The output is written to a temporary
sibling and renamed into place; an existing output is replaced only with ``overwrite``, and
the input never.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from adorym_dask.storage.measurements import (
    FORMATS,
    Measurements,
    MeasurementError,
    open_measurements,
    read_tiles,
    write_measurements,
)
from adorym_dask.storage.results import OutputError

__all__ = ["convert", "add_convert_arguments", "run_convert"]

#: keyword overrides :func:`convert` passes on to ``open_measurements``
OVERRIDES = ("energy_ev", "pixel_size_m", "detector_distance_m", "source_distance_m",
             "raw_data_type", "near_field", "fmt")


class _Frames:
    """A ``[n_angles, n_tiles, det_y, det_x]`` float32 view of a file's intensities, read
    from disk block by block when indexed ``[angle, tile_slice]``, advancing ``bar``."""

    def __init__(self, meas: Measurements, bar: Any) -> None:
        self.meas, self.bar = meas, bar
        self.shape = (meas.n_angles, meas.n_tiles, *meas.det_shape)
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, key: tuple[int, slice]) -> np.ndarray:
        angle, tiles = key
        idx = np.arange(self.meas.n_tiles)[tiles]
        block = read_tiles(self.meas.source, int(angle), idx)
        self.bar.update(len(idx))
        return block


def _check_paths(src: Path, dst: Path, overwrite: bool) -> None:
    if not src.exists():
        raise MeasurementError(f"input: {src} does not exist; check the path")
    if dst.suffix.lower() not in (".h5", ".hdf5", ".zarr"):
        raise OutputError(f"output: {dst} must end in .h5, .hdf5 or .zarr (the native layout)")
    if dst.resolve() == src.resolve():
        raise OutputError(
            f"output: {dst} is the input file; the input is never replaced: choose another "
            "output path"
        )
    if os.path.lexists(dst) and not overwrite:
        raise OutputError(
            f"output: {dst} already exists; choose another output path or pass --overwrite "
            "(overwrite=True) to replace it"
        )
    if not dst.parent.is_dir():
        raise OutputError(f"output: folder {dst.parent} does not exist; create it first")


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
            progress: bool = True, **overrides: Any) -> Path:
    """Write the measurements of ``src`` (any readable format) to ``dst`` in the native layout.

    Parameters
    ----------
    src : str or PathLike
        A CXI (``.cxi``), original Adorym HDF5, Data Exchange or native file.
    dst : str or PathLike
        The native file to write, ``.h5``/``.hdf5`` or ``.zarr``: ``intensities
        [n_angles, n_tiles, det_y, det_x]`` float32, ``positions_px [n_angles, n_tiles, 2]``,
        ``angles_rad [n_angles]``, ``mask [det_y, det_x]``, ``distances_m [n_tiles]`` where
        the source has them, attributes ``energy_ev``, ``pixel_size_m``, ...
    overwrite : bool
        Replace an existing ``dst`` (never ``src``).
    progress : bool
        Show a progress bar over the frames (terminal or notebook).
    **overrides
        What the source lacks or states wrongly, as in the run file's ``data:`` section:
        ``energy_ev``, ``pixel_size_m``, ``detector_distance_m``, ``source_distance_m``;
        ``raw_data_type`` (Adorym: ``"intensity"`` or ``"magnitude"``), ``near_field``
        (CXI holds near-field data: the object pixel is the detector pixel), ``fmt`` (one of
        :data:`~adorym_dask.storage.measurements.FORMATS`, instead of detecting it).

    Returns
    -------
    Path
        The absolute path written.

    Raises
    ------
    MeasurementError
        The source cannot be read or lacks a value (the message names the option to give).
    OutputError
        ``dst`` exists (without ``overwrite``), is the input, or cannot be written.
    """
    src, dst = Path(src).absolute(), Path(dst).absolute()
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise TypeError(f"convert: unknown option(s) {unknown}; known: {list(OVERRIDES)}")
    _check_paths(src, dst, overwrite)
    given = {k: v for k, v in overrides.items() if v is not None}
    meas = open_measurements(src, check_values=False, **given)
    ignored = sorted(set(given) - DATA_EXCHANGE_OPTIONS)
    if meas.source.fmt == "data_exchange" and ignored:
        raise MeasurementError(
            f"{src}: a Data Exchange file (projections) has no use for "
            f"{', '.join('--' + k.replace('_', '-') for k in ignored)}; leave them out")
    n_frames = meas.n_angles * meas.n_tiles
    with tqdm(total=n_frames, desc=f"converting {src.name}", unit="frame",
              disable=not progress) as bar:
        written = write_measurements(
            dst, intensities=_Frames(meas, bar), positions_px=meas.positions_px,
            energy_ev=meas.energy_ev, pixel_size_m=meas.pixel_size_m,
            detector_distance_m=meas.detector_distance_m, angles_rad=meas.angles_rad,
            mask=meas.mask, distances_m=meas.distances_m, overwrite=overwrite,
            incident_photons=_incident_photons(meas),
        )
    _note_source(written, src, meas.source.fmt)
    return Path(written)


# the options a Data Exchange source can use (the others are for ptychography formats)
DATA_EXCHANGE_OPTIONS = {"energy_ev", "pixel_size_m", "detector_distance_m", "fmt"}


def _incident_photons(meas: Measurements) -> float | None:
    """Data Exchange transmissions: 1 (stated, so no counts warning); others: the stored
    value, where it is not the default."""
    if meas.source.fmt == "data_exchange":
        return 1.0
    return None if meas.incident_photons == 1.0 else meas.incident_photons


def _note_source(path: str, src: Path, fmt: str) -> None:
    """Record where the file came from (root attributes ``converted_from``, ``source_format``)."""
    attrs = {"converted_from": str(src), "source_format": fmt}
    if path.lower().rstrip("/").endswith(".zarr"):
        import zarr

        zarr.open_group(path, mode="r+").attrs.update(attrs)
    else:
        import h5py

        with h5py.File(path, "r+") as f:
            f.attrs.update(attrs)


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------
def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``IN OUT [options]`` of the ``convert`` sub-command to ``parser`` (in place);
    run the parsed namespace with :func:`run_convert`."""
    parser.description = (
        "Convert a CXI, original Adorym HDF5 or Data Exchange file to the native layout "
        "(.h5 or .zarr), streaming its frames; the input is never modified.")
    parser.add_argument("src", metavar="IN", help="measurement file to read")
    parser.add_argument("dst", metavar="OUT", help="native file to write (.h5, .hdf5 or .zarr)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.add_argument("--energy-ev", type=float, help="photon energy (eV), if IN lacks it")
    parser.add_argument("--pixel-size-m", type=float,
                        help="object-plane pixel size (m), if IN lacks it")
    parser.add_argument("--detector-distance-m", type=float, help="sample-to-detector distance")
    parser.add_argument("--source-distance-m", type=float,
                        help="cone beam: focus-to-sample distance (distances become effective)")
    parser.add_argument("--near-field", action="store_true",
                        help="CXI near-field data: the object pixel is the detector pixel")
    parser.add_argument("--raw-data-type", choices=["intensity", "magnitude"],
                        help="Adorym files: what exchange/data holds (default intensity)")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, help="do not detect IN's format")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Run a parsed ``convert`` command; 0 on success, 2 (with the reason on stderr) on a
    user error."""
    try:
        out = convert(
            args.src, args.dst, overwrite=args.overwrite, progress=not args.no_progress,
            energy_ev=args.energy_ev, pixel_size_m=args.pixel_size_m,
            detector_distance_m=args.detector_distance_m,
            source_distance_m=args.source_distance_m, near_field=args.near_field or None,
            raw_data_type=args.raw_data_type, fmt=args.fmt,
        )
    except (MeasurementError, OutputError) as err:
        print(f"adorym-dask: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
