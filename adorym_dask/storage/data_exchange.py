"""TomoPy / APS Data Exchange HDF5 files: raw projections with flat and dark fields.

Layout (Data Exchange, X-ray tomography extension; ``dxfile`` docs, "xraytomo")
------------------------------------------------------------------------------
::

    exchange/data        [n_angles, rows, cols] counts (axes theta:y:x)
    exchange/data_white  [n_flat, rows, cols] flat fields (bare beam), counts
    exchange/data_dark   [n_dark, rows, cols] dark fields (no beam), counts
    exchange/theta       [n_angles] rotation angles, degrees (``units`` attribute
                         "rad"/"radian(s)" is honoured)
    measurement/instrument/monochromator/energy        (optional) photon energy;
                         SI (J) unless a ``units`` attribute says eV / keV
    measurement/instrument/detector/actual_pixel_size_x (optional) pixel size on
                         the sample plane; SI (m) unless ``units`` says mm / um / nm

Values given to :func:`open_data_exchange` (``data.energy_ev`` / ``data.pixel_size_m``)
override the file's.

The files map onto the native tomography layout: ``n_tiles = 1`` (one projection per
angle), ``positions_px`` zeros, ``angles_rad = radians(theta)``, ``incident_photons = 1``.
:func:`read_projections` returns transmissions ``(data - dark) / (white - dark)`` with
``dark`` and ``white`` the per-pixel means over their frames (computed once per process
and file, kept beside the handle cache), values below 0 clipped to 0, and transmission 1
at dead pixels (``white - dark <= 0``). An ``exchange/data`` that is 4-D is an original
Adorym file (:mod:`adorym_dask.storage.formats`), not Data Exchange tomography.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from .formats import _BLOCK_BYTES, _EV_J, MeasurementError, _scalar, _validate_meta
from .measurements import Measurements, TileSource, _get_handle

__all__ = ["FMT", "detect", "open_data_exchange", "read_projections"]

log = logging.getLogger(__name__)

FMT = "data_exchange"
DATA_KEY = "exchange/data"
WHITE_KEY = "exchange/data_white"
DARK_KEY = "exchange/data_dark"
THETA_KEY = "exchange/theta"
ENERGY_KEY = "measurement/instrument/monochromator/energy"
PIXEL_KEY = "measurement/instrument/detector/actual_pixel_size_x"
_ENERGY_UNITS = {"j": 1.0 / _EV_J, "ev": 1.0, "kev": 1e3}
_LENGTH_UNITS = {"m": 1.0, "mm": 1e-3, "um": 1e-6, "micron": 1e-6, "microns": 1e-6, "nm": 1e-9}
_NATIVE_HINT = (
    "if your data are already normalised, write them in the native layout with "
    "write_measurements(path, intensities=..., positions_px=..., angles_rad=..., ...)"
)

# Per-process cache of (dark mean, white - dark, dead-pixel mask) per file version.
_REF_LOCK = threading.Lock()
_REFS: OrderedDict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
_MAX_REFS = 16


def detect(path: str) -> str | None:
    """Return ``"data_exchange"`` if ``path`` is an HDF5 file with a 3-D ``exchange/data``."""
    import h5py

    if not os.path.isfile(path):
        return None
    try:
        with h5py.File(path, "r") as f:
            node = f.get(DATA_KEY)
            return FMT if getattr(node, "ndim", None) == 3 else None
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------
# Opening
# ----------------------------------------------------------------------------
def open_data_exchange(
    path: str,
    *,
    energy_ev: float | None = None,
    pixel_size_m: float | None = None,
    detector_distance_m: float | None = None,
    check_values: bool = True,
) -> Measurements:
    """Open and validate a Data Exchange file (projections stay on disk).

    Parameters
    ----------
    path : str
        Absolute path of the HDF5 file.
    energy_ev, pixel_size_m : float, optional
        Photon energy and object-plane pixel size; override the file's (required
        where the file has none).
    detector_distance_m : float, optional
        Passed through to :class:`Measurements`.
    check_values : bool
        Stream through the projections (bounded memory), reject NaN/inf and log how
        many values were clipped to 0 by the flat/dark correction.

    Returns
    -------
    Measurements
        ``n_tiles = 1``, ``det_shape = (rows, cols)``, zero positions.
    """
    handle = _get_handle(path, FMT)
    ds = _dataset(handle, DATA_KEY, path, "the projections [n_angles, rows, cols]")
    if ds.ndim != 3:
        raise MeasurementError(
            f"{DATA_KEY}: expected [n_angles, rows, cols], got shape {ds.shape} in {path}"
        )
    n_angles, rows, cols = (int(s) for s in ds.shape)
    theta = _theta(handle, n_angles, path)
    _flat_dark(handle, path, (rows, cols))  # checks the fields and logs dead pixels once
    fields = _validate_meta(
        shape=(n_angles, 1, rows, cols), dtype=np.dtype(ds.dtype), frames_flat=False,
        positions_px=np.zeros((n_angles, 1, 2)), angles_rad=theta, mask=None,
        energy_ev=_stored_or_given(handle, ENERGY_KEY, energy_ev, _ENERGY_UNITS, "j", path,
                                   "energy_ev"),
        pixel_size_m=_stored_or_given(handle, PIXEL_KEY, pixel_size_m, _LENGTH_UNITS, "m",
                                      path, "pixel_size_m"),
        detector_distance_m=detector_distance_m, where=path,
    )
    source = TileSource(path=path, fmt=FMT, key=DATA_KEY)
    if check_values:
        _scan(handle, path)
    return Measurements(source=source, **fields)


def _dataset(handle: Any, key: str, where: str, what: str) -> Any:
    node = handle.get(key)
    if node is None:
        raise MeasurementError(f"{key}: missing in {where}; a Data Exchange file needs {what}")
    if not hasattr(node, "shape"):
        raise MeasurementError(f"{key}: is a group in {where}, expected a dataset ({what})")
    return node


def _theta(handle: Any, n_angles: int, where: str) -> np.ndarray:
    """``exchange/theta`` in radians, checked against the number of projections."""
    ds = _dataset(handle, THETA_KEY, where, f"the rotation angles [{n_angles}] in degrees")
    theta = np.asarray(ds[...], dtype=np.float64).reshape(-1)
    if theta.size != n_angles:
        raise MeasurementError(
            f"{THETA_KEY}: {theta.size} angles but {DATA_KEY} has {n_angles} projections in "
            f"{where}; give one angle (degrees) per projection"
        )
    if not np.isfinite(theta).all():
        bad = int(np.flatnonzero(~np.isfinite(theta))[0])
        raise MeasurementError(
            f"{THETA_KEY}: NaN/inf at projection {bad} in {where}; fix the angle or drop that "
            "projection"
        )
    units = _units(ds, "deg")
    if units in ("rad", "radian", "radians"):
        return theta
    if units not in ("deg", "degree", "degrees"):
        raise MeasurementError(
            f"{THETA_KEY}: unknown units {units!r} in {where}; expected degrees (or radians)"
        )
    return np.radians(theta)


def _units(ds: Any, default: str) -> str:
    raw = ds.attrs.get("units", default)
    raw = raw.decode() if isinstance(raw, bytes) else str(raw)
    return raw.strip().lower().replace("µ", "u")


def _stored_or_given(
    handle: Any, key: str, given: float | None, units: dict[str, float], default: str,
    where: str, name: str,
) -> float:
    """The caller's value, else the file's (converted by its ``units``), else raise."""
    if given is not None:
        return given
    ds = handle.get(key)
    if ds is None:
        raise MeasurementError(
            f"{name}: not given and '{key}' is absent in {where}; set data.{name} in the run "
            "config"
        )
    unit = _units(ds, default)
    if unit not in units:
        raise MeasurementError(
            f"{name}: '{key}' in {where} has unknown units {unit!r} (known: {sorted(units)}); "
            f"set data.{name} in the run config"
        )
    return _scalar(ds[()], name) * units[unit]


# ----------------------------------------------------------------------------
# Flat / dark fields
# ----------------------------------------------------------------------------
def _flat_dark(
    handle: Any, path: str, det_shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(dark, white - dark, dead)`` per pixel, cached per process and file version."""
    st = os.stat(path)
    key = (os.getpid(), path, st.st_ino, st.st_mtime_ns)
    with _REF_LOCK:
        refs = _REFS.get(key)
        if refs is not None:
            _REFS.move_to_end(key)
            return refs
    refs = _compute_flat_dark(handle, path, det_shape)
    with _REF_LOCK:
        _REFS[key] = refs
        while len(_REFS) > _MAX_REFS:
            _REFS.popitem(last=False)
    return refs


def _compute_flat_dark(
    handle: Any, path: str, det_shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    what = "flat fields (exchange/data_white, bare beam) and dark fields (exchange/data_dark)"
    means = []
    for key in (DARK_KEY, WHITE_KEY):
        ds = _dataset(handle, key, path, f"{what} to normalise the projections; {_NATIVE_HINT}")
        if ds.ndim != 3 or tuple(ds.shape[1:]) != det_shape or ds.shape[0] < 1:
            raise MeasurementError(
                f"{key}: shape {tuple(ds.shape)} does not match the projections' (rows, cols) "
                f"= {det_shape} in {path}; give [n_frames, {det_shape[0]}, {det_shape[1]}] "
                "frames recorded with the same detector region and binning"
            )
        means.append(_frame_mean(ds))
    dark, white = means
    span = white - dark
    dead = ~(span > 0)
    if dead.any():
        log.warning(
            "%d detector pixels with white - dark <= 0 (dead) in %s; their transmission is set "
            "to 1", int(dead.sum()), path,
        )
    span[dead] = 1.0
    return dark, span, dead


def _frame_mean(ds: Any) -> np.ndarray:
    """float64 per-pixel mean over the first axis, read in bounded blocks."""
    frame_bytes = max(1, int(np.prod(ds.shape[1:])) * 8)
    step = max(1, _BLOCK_BYTES // frame_bytes)
    total = np.zeros(ds.shape[1:], np.float64)
    for i0 in range(0, ds.shape[0], step):
        total += np.asarray(ds[i0 : i0 + step], dtype=np.float64).sum(axis=0)
    return total / ds.shape[0]


def _normalise(raw: np.ndarray, refs: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """float32 transmissions of ``raw [..., rows, cols]``, clipped below at 0."""
    dark, span, dead = refs
    out = (np.asarray(raw, np.float64) - dark) / span
    out[..., dead] = 1.0
    np.maximum(out, 0.0, out=out)  # NaN stays NaN (reported by _scan)
    return out.astype(np.float32)


def _scan(handle: Any, path: str) -> None:
    """Reject non-finite projections; log how many values the correction clips to 0."""
    ds = handle[DATA_KEY]
    n_angles = int(ds.shape[0])
    refs = _flat_dark(handle, path, tuple(ds.shape[1:]))
    live = ~refs[2]
    step = max(1, _BLOCK_BYTES // max(1, int(np.prod(ds.shape[1:])) * 8))
    n_neg = 0
    for a0 in range(0, n_angles, step):
        block = (np.asarray(ds[a0 : a0 + step], np.float64) - refs[0]) / refs[1]
        finite = np.isfinite(block).reshape(block.shape[0], -1).all(axis=1)
        if not finite.all():
            raise MeasurementError(
                f"{DATA_KEY}: NaN or inf in projection {a0 + int(np.argmin(finite))} of {path}; "
                "fix or drop that projection"
            )
        n_neg += int((block[:, live] < 0).sum())
    total = n_angles * int(live.sum())
    pct = 100.0 * n_neg / max(total, 1)
    log.log(
        logging.WARNING if n_neg else logging.INFO,
        "%d values (%.3g %%) below 0 after flat/dark correction were clipped to 0 in %s",
        n_neg, pct, path,
    )


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------
def read_projections(source: TileSource, angle: int, tile_indices: np.ndarray) -> np.ndarray:
    """Flat/dark-corrected transmissions of one projection, ``[k, rows, cols]`` float32.

    Parameters
    ----------
    source : TileSource
        A ``data_exchange`` source.
    angle : int
        Projection index.
    tile_indices : np.ndarray
        int ``[k]`` file tile indices; each must be 0 (one projection per angle).

    Returns
    -------
    np.ndarray
        float32 ``[k, rows, cols]``, the projection repeated ``k`` times.
    """
    idx = np.asarray(tile_indices, np.int64).reshape(-1)
    handle = _get_handle(source.path, source.fmt)
    ds = handle[source.key]
    n_angles, rows, cols = (int(s) for s in ds.shape)
    if not 0 <= int(angle) < n_angles:
        raise MeasurementError(f"angle: index {angle} outside [0, {n_angles})")
    if (idx != 0).any():
        raise MeasurementError(
            f"tile_indices: a Data Exchange projection is a single tile (index 0); got "
            f"{sorted(set(idx[idx != 0].tolist()))} for {source.path}"
        )
    if idx.size == 0:
        return np.zeros((0, rows, cols), np.float32)
    image = _normalise(ds[int(angle)], _flat_dark(handle, source.path, (rows, cols)))
    return np.repeat(image[None], idx.size, axis=0)

