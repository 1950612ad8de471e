"""Measurement files: open, validate, read tiles, write.

Native layout
-------------
An HDF5 file (``.h5`` / ``.hdf5``) or a zarr v3 group (``.zarr``) with the
same tree::

    intensities   float32 [n_angles, n_tiles, det_y, det_x]
                  photon counts; zero spatial frequency at pixel
                  (det_y // 2, det_x // 2), i.e. fft-shifted (centred).
                  Integer counts are accepted on read and cast to float32.
    positions_px  float64 [n_angles, n_tiles, 2] or [n_tiles, 2]
                  (y, x) of each tile's top-left corner in object pixels;
                  fractional values allowed.
    angles_rad    (optional) float [n_angles]
    mask          (optional) bool [det_y, det_x]; False = ignored pixel.
    distances_m   (near-field models) float [n_tiles]: each hologram's effective
                  plane-wave propagation distance.
    source_distance_m  (optional) float [n_tiles]: a cone beam's focus-to-sample
                  distance; distances_m then holds sample-to-detector distances,
                  converted to effective ones on read (Fresnel scaling theorem).
    attrs (root)  energy_ev, pixel_size_m (object-plane pixel size),
                  optional detector_distance_m, incident_photons (bare-beam
                  counts per pixel, default 1).

Other groups (e.g. ``ground_truth/...``) may exist and are ignored.

Foreign formats (CXI, original Adorym HDF5) are read by
:mod:`adorym_dask.storage.formats`; their conventions are documented there.
:class:`MeasurementError` and the shared validation live there too and are
re-exported here.

Workers only receive a :class:`TileSource` (a few strings) and call
:func:`read_tiles`, which keeps open file handles in a small per-process,
lock-guarded cache.
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from . import formats
from .formats import (
    _BLOCK_BYTES,
    HC_EV_M,
    MeasurementError,
    _check_block,
    _iter_blocks,
    _validate_meta,
)

__all__ = [
    "FORMATS",
    "MeasurementError",
    "TileSource",
    "Measurements",
    "open_measurements",
    "read_tiles",
    "check_positions_inside",
    "write_measurements",
    "close_cached_files",
    "subset_measurements",
]

FORMATS = ("native_h5", "native_zarr", "cxi", "adorym_h5", "data_exchange")
_RESERVED = ("intensities", "positions_px", "angles_rad", "mask", "distances_m", "source_distance_m")
@dataclass(frozen=True)
class TileSource:
    """Picklable pointer to the intensity stack inside a measurement file.

    Attributes
    ----------
    path : str
        Absolute path of the file (HDF5) or directory (zarr).
    fmt : str
        One of ``FORMATS``.
    key : str
        Dataset path of the intensities inside the file.
    frames_flat : bool
        True when the data are ``[n_frames, det_y, det_x]`` (CXI); then the
        only valid angle is 0 and tile ``i`` is frame ``i``.
    is_amplitude : bool
        True when the file stores amplitudes (Adorym ``magnitude`` data);
        :func:`read_tiles` squares them.
    """

    path: str
    fmt: str
    key: str
    frames_flat: bool = False
    is_amplitude: bool = False
    tiles: tuple[int, ...] | None = None
    split: tuple[int, int, int, int] | None = None

    # ``tiles``: a subset (``data.subset``): tile i of this source is file tile ``tiles[i]``.
    # ``split``: ``(ty, tx, n_y, n_x)``, each file tile (hologram) cut into ``n_y x n_x``
    # sub-tiles of ``ty x tx`` pixels (row-major); sub-tiles reaching past the hologram are
    # padded with zeros (the model masks those pixels).


@dataclass(frozen=True, eq=False)
class Measurements:
    """Validated metadata of a measurement file (intensities stay on disk).

    Attributes
    ----------
    source : TileSource
    n_angles, n_tiles : int
    det_shape : tuple of int
        ``(det_y, det_x)``.
    positions_px : np.ndarray
        float64 ``[n_angles, n_tiles, 2]``, (y, x) top-left corners.
    angles_rad : np.ndarray or None
        float64 ``[n_angles]``.
    mask : np.ndarray or None
        bool ``[det_y, det_x]``, False = ignored pixel.
    energy_ev, pixel_size_m : float
    detector_distance_m : float or None
    distances_m : np.ndarray or None
        float64 ``[n_tiles]`` effective (plane-wave) propagation distance of each tile
        (hologram), for near-field models.
    incident_photons : float
        Counts per pixel of the bare beam (full-field models' plane-wave illumination).
    """

    source: TileSource
    n_angles: int
    n_tiles: int
    det_shape: tuple[int, int]
    positions_px: np.ndarray
    angles_rad: np.ndarray | None
    mask: np.ndarray | None
    energy_ev: float
    pixel_size_m: float
    detector_distance_m: float | None
    distances_m: np.ndarray | None = None
    incident_photons: float = 1.0

    @property
    def wavelength_m(self) -> float:
        """Photon wavelength in metres, ``h c / E``."""
        return HC_EV_M / self.energy_ev


# ----------------------------------------------------------------------------
# Per-process handle cache
# ----------------------------------------------------------------------------
_HANDLE_LOCK = threading.Lock()
_HANDLES: OrderedDict[tuple, Any] = OrderedDict()
_MAX_HANDLES = 16


def _open_raw(path: str, fmt: str) -> Any:
    """Open ``path`` read-only; raise MeasurementError on any open failure."""
    if fmt == "native_zarr":
        import zarr

        try:
            return zarr.open_group(path, mode="r")
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise MeasurementError(
                f"intensities: {path} is not a readable zarr v3 group ({exc}); "
                "check data.path or rewrite it with write_measurements"
            ) from None
    import h5py

    try:
        return h5py.File(path, "r", swmr=False)
    except (OSError, ValueError) as exc:
        raise MeasurementError(
            f"intensities: {path} is not a readable HDF5 file ({exc}); check data.path "
            "and that the file is a complete HDF5 (.h5/.hdf5/.cxi) or zarr (.zarr) store"
        ) from None


def _close(handle: Any) -> None:
    close = getattr(handle, "close", None)
    if close is not None:
        try:
            close()
        except (OSError, ValueError, RuntimeError):
            pass


def _get_handle(path: str, fmt: str) -> Any:
    """Cached read-only handle; keyed by pid, path, inode and mtime.

    The inode / mtime part makes a file replaced by :func:`write_measurements`
    reopen instead of serving stale data; the pid part keeps forked workers
    from sharing an HDF5 handle with their parent.
    """
    try:
        st = os.stat(path)
    except OSError:
        raise MeasurementError(
            f"intensities: measurement file not found: {path}; check data.path in the config"
        ) from None
    key = (os.getpid(), path, fmt, st.st_ino, st.st_mtime_ns)
    with _HANDLE_LOCK:
        handle = _HANDLES.get(key)
        if handle is not None:
            _HANDLES.move_to_end(key)
            return handle
        handle = _open_raw(path, fmt)
        _HANDLES[key] = handle
        while len(_HANDLES) > _MAX_HANDLES:
            old_key, old = _HANDLES.popitem(last=False)
            if old_key[0] == os.getpid():
                _close(old)
        return handle


def close_cached_files(path: str | os.PathLike | None = None) -> None:
    """Close cached handles (all, or only those of ``path``) of this process."""
    target = None if path is None else os.path.abspath(os.fspath(path))
    with _HANDLE_LOCK:
        for key in list(_HANDLES):
            if target is None or key[1] == target:
                handle = _HANDLES.pop(key)
                if key[0] == os.getpid():
                    _close(handle)


def _is_zarr(handle: Any) -> bool:
    return not hasattr(handle, "id")  # h5py objects all carry an HDF5 id


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------
def read_tiles(source: TileSource, angle: int, tile_indices: np.ndarray) -> np.ndarray:
    """Read diffraction intensities of some tiles of one angle.

    Parameters
    ----------
    source : TileSource
        Where the data live (see :attr:`Measurements.source`).
    angle : int
        Angle index (must be 0 for ``frames_flat`` sources).
    tile_indices : np.ndarray
        int ``[k]`` tile indices, any order, repeats allowed.

    Returns
    -------
    np.ndarray
        float32 ``[k, det_y, det_x]`` intensities in the order of
        ``tile_indices`` (amplitude formats are squared).
    """
    idx = np.asarray(tile_indices, dtype=np.int64).reshape(-1)
    if source.split is not None:
        return _read_subtiles(source, angle, idx)
    if source.tiles is not None:
        idx = np.asarray(source.tiles, np.int64)[idx]
    if source.fmt == "data_exchange":
        from .data_exchange import read_projections  # imports this module

        return read_projections(source, angle, idx)
    ds = _get_handle(source.path, source.fmt)[source.key]
    shape = tuple(ds.shape)
    n_tiles = shape[0] if source.frames_flat else shape[1]
    if source.frames_flat and int(angle) != 0:
        raise MeasurementError(
            f"angle: {source.fmt} data hold a single angle; got angle={angle} (use angle 0)"
        )
    if not source.frames_flat and not 0 <= int(angle) < shape[0]:
        raise MeasurementError(f"angle: index {angle} outside [0, {shape[0]})")
    if idx.size == 0:
        return np.zeros((0, *shape[-2:]), dtype=np.float32)
    if idx.min() < 0 or idx.max() >= n_tiles:
        raise MeasurementError(
            f"tile_indices: values must lie in [0, {n_tiles}); got min {idx.min()}, max {idx.max()}"
        )
    uniq, inverse = np.unique(idx, return_inverse=True)
    lead = () if source.frames_flat else (int(angle),)
    # One plain slice per contiguous run of indices. Measured on a (1, 16, 128, 128)-chunked
    # file: 8 scattered tiles read by h5py fancy indexing took 7 ms, by single slices 0.15 ms.
    runs = np.split(uniq, np.flatnonzero(np.diff(uniq) != 1) + 1)
    parts = [np.asarray(ds[(*lead, slice(int(r[0]), int(r[-1]) + 1))]) for r in runs]
    block = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    out = np.asarray(block)[inverse].astype(np.float32, copy=False)
    if source.is_amplitude:
        np.square(out, out=out)
    return out


def _read_subtiles(source: TileSource, angle: int, idx: np.ndarray) -> np.ndarray:
    """Sub-tiles of a split source, ``[k, ty, tx]``, zero where they reach past the tile."""
    ty, tx, n_y, n_x = source.split
    whole = TileSource(source.path, source.fmt, source.key, source.frames_flat,
                       source.is_amplitude, source.tiles)
    holo, sub = np.divmod(idx, n_y * n_x)
    out = np.zeros((len(idx), ty, tx), np.float32)
    for h in np.unique(holo):
        image = read_tiles(whole, angle, np.asarray([h]))[0]
        for i in np.flatnonzero(holo == h):
            y0, x0 = (sub[i] // n_x) * ty, (sub[i] % n_x) * tx
            part = image[y0 : y0 + ty, x0 : x0 + tx]
            out[i, : part.shape[0], : part.shape[1]] = part
    return out


def subset_measurements(meas: Measurements, which: np.ndarray) -> Measurements:
    """The measurements of the tiles ``which [k]`` only (every angle), as tiles 0..k-1."""
    which = np.asarray(which, np.int64)
    base = meas.source.tiles
    files = tuple(int(base[i]) if base is not None else int(i) for i in which)
    return replace(
        meas, source=replace(meas.source, tiles=files), n_tiles=len(which),
        positions_px=meas.positions_px[:, which],
        distances_m=None if meas.distances_m is None else meas.distances_m[which],
    )


def open_measurements(
    path: str | os.PathLike,
    *,
    fmt: str | None = None,
    energy_ev: float | None = None,
    pixel_size_m: float | None = None,
    detector_distance_m: float | None = None,
    check_values: bool = True,
    raw_data_type: str | None = None,
    near_field: bool = False,
    source_distance_m: float | None = None,
) -> Measurements:
    """Open and validate a measurement file without loading the intensities.

    Parameters
    ----------
    path : str or PathLike
        ``.h5``/``.hdf5`` (native, Adorym or Data Exchange tomography: see
        :mod:`adorym_dask.storage.data_exchange`), ``.zarr`` (native) or ``.cxi``.
    fmt : str, optional
        Force one of ``FORMATS`` instead of detecting it.
    energy_ev, pixel_size_m, detector_distance_m : float, optional
        Override the values stored in the file.
    check_values : bool
        Stream through the intensities (bounded memory) and reject NaN/inf
        or negative values, naming the first bad (angle, tile).
    raw_data_type : {"intensity", "magnitude"}, optional
        Adorym files only: what ``exchange/data`` holds (Adorym's own
        ``raw_data_type`` argument; default ``"intensity"``).
    near_field : bool
        The model propagates in the near field (see
        :func:`adorym_dask.storage.formats.read_metadata`).
    source_distance_m : float, optional
        Focus-to-sample distance of a cone beam (overrides a stored
        ``source_distance_m``): distances become effective plane-wave ones.

    Returns
    -------
    Measurements
    """
    p = os.path.abspath(os.fspath(path))
    if not os.path.exists(p):
        raise MeasurementError(
            f"intensities: measurement file not found: {p}; check data.path in the config"
        )
    from . import data_exchange  # imports this module

    if fmt is None:
        fmt = data_exchange.detect(p) or formats.detect_format(p)
    if fmt not in FORMATS:
        raise MeasurementError(f"fmt: unknown format {fmt!r}; choose one of {FORMATS}")
    if fmt == "data_exchange":
        return data_exchange.open_data_exchange(
            p, energy_ev=energy_ev, pixel_size_m=pixel_size_m,
            detector_distance_m=detector_distance_m, check_values=check_values,
        )
    handle = _get_handle(p, fmt)
    raw = formats.read_metadata(
        handle, fmt, where=p, energy_ev=energy_ev, pixel_size_m=pixel_size_m,
        detector_distance_m=detector_distance_m, raw_data_type=raw_data_type,
        near_field=near_field, source_distance_m=source_distance_m,
    )
    fields = _validate_meta(
        shape=raw.shape, dtype=raw.dtype, frames_flat=raw.frames_flat,
        positions_px=raw.positions_px, angles_rad=raw.angles_rad, mask=raw.mask,
        energy_ev=raw.energy_ev, pixel_size_m=raw.pixel_size_m,
        detector_distance_m=raw.detector_distance_m, where=p, distances_m=raw.distances_m,
        # CXI converts its single detector distance itself (it also sets the pixel size)
        source_distance_m=None if fmt == "cxi" else raw.source_distance_m,
        incident_photons=raw.incident_photons,
    )
    source = TileSource(
        path=p, fmt=fmt, key=raw.key, frames_flat=raw.frames_flat, is_amplitude=raw.is_amplitude
    )
    if check_values:
        ds = handle[raw.key]
        for a, t0, block in _iter_blocks(ds, raw.frames_flat):
            _check_block(block, a, t0, p)
    return Measurements(source=source, **fields)


def check_positions_inside(
    positions_px: np.ndarray,
    det_shape: tuple[int, int],
    object_shape: tuple[int, ...],
) -> None:
    """Raise if any tile box ``[pos, pos + det)`` leaves ``[0, object_shape)``.

    Parameters
    ----------
    positions_px : np.ndarray
        float ``[..., 2]`` (y, x) top-left corners, e.g. ``[n_angles, n_tiles, 2]``.
    det_shape : tuple of int
        ``(det_y, det_x)``.
    object_shape : tuple of int
        ``(obj_y, obj_x, ...)``; only the first two entries are used.
    """
    pos = np.asarray(positions_px, dtype=np.float64)
    flat = pos.reshape(-1, 2)
    if flat.size == 0:
        return
    det = np.asarray(det_shape[:2], dtype=np.float64)
    obj = np.asarray(object_shape[:2], dtype=np.float64)
    over = np.maximum(np.maximum(-flat, flat + det - obj), 0.0).max(axis=1)
    if over.max() <= 1e-9:
        return
    worst = int(np.argmax(over))
    where = np.unravel_index(worst, pos.shape[:-1]) if pos.ndim > 1 else ()
    label = ", ".join(f"{n} {int(i)}" for n, i in zip(("angle", "tile")[-len(where):], where))
    shift = np.minimum(flat.min(axis=0), 0.0)
    need = np.ceil(flat.max(axis=0) + det - shift - 1e-9).astype(int)
    raise MeasurementError(
        f"positions_px: tile ({label}) at (y, x)=({flat[worst, 0]:.2f}, {flat[worst, 1]:.2f}) with "
        f"detector {tuple(det_shape[:2])} falls outside the object of shape "
        f"{tuple(int(v) for v in obj)}; the object must be at least "
        f"({need[0]}, {need[1]}) pixels"
        + (f" and positions shifted by ({abs(shift[0]):.2f}, {abs(shift[1]):.2f}) to be >= 0"
           if (shift < 0).any() else "")
        + "; enlarge the object (object.shape_px, or leave it unset to size it "
        "automatically) or fix the positions"
    )


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------
def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def write_measurements(
    path: str | os.PathLike,
    *,
    intensities: Any,
    positions_px: np.ndarray,
    energy_ev: float,
    pixel_size_m: float,
    detector_distance_m: float | None = None,
    angles_rad: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    extra: dict[str, np.ndarray] | None = None,
    overwrite: bool = False,
    distances_m: np.ndarray | None = None,
    source_distance_m: np.ndarray | float | None = None,
    incident_photons: float | None = None,
) -> str:
    """Write the native layout to ``path`` (``.h5``/``.hdf5`` or ``.zarr``).

    Data go to a temporary sibling first and are renamed into place, so a
    crash never leaves a half-written file where a good one was.

    Parameters
    ----------
    path : str or PathLike
    intensities : array-like
        ``[n_angles, n_tiles, det_y, det_x]`` intensities (numpy, h5py, zarr
        or dask array; written one bounded block at a time), stored float32.
    positions_px : np.ndarray
        ``[n_tiles, 2]`` or ``[n_angles, n_tiles, 2]`` (y, x) corners.
    energy_ev, pixel_size_m : float
    detector_distance_m : float, optional
    angles_rad : np.ndarray, optional
        ``[n_angles]``.
    mask : np.ndarray, optional
        bool ``[det_y, det_x]``, False = ignored pixel.
    extra : dict, optional
        Extra arrays by path, e.g. ``{"ground_truth/object": arr}``.
    overwrite : bool
        Replace an existing ``path``.
    distances_m : np.ndarray, optional
        ``[n_tiles]`` propagation distance of each hologram: effective plane-wave distances,
        or with ``source_distance_m`` the sample-to-detector distances of a cone beam, which
        are converted (``z1 z2 / (z1 + z2)``) before they are written.
    source_distance_m : float or np.ndarray, optional
        Focus-to-sample distance ``z1`` of a cone beam (one, or one per hologram).
    incident_photons : float, optional
        Bare-beam counts per pixel (attribute; full-field models' illumination).

    Returns
    -------
    str
        Absolute path written.
    """
    p = os.path.abspath(os.fspath(path))
    ext = os.path.splitext(p.rstrip(os.sep))[1].lower()
    if ext not in (".h5", ".hdf5", ".zarr"):
        raise MeasurementError(f"path: {p} must end in .h5, .hdf5 or .zarr")
    if os.path.lexists(p) and not overwrite:
        raise MeasurementError(
            f"path: {p} already exists; pass overwrite=True (or choose another output path)"
        )
    if not os.path.isdir(os.path.dirname(p)):
        raise MeasurementError(f"path: parent directory of {p} does not exist; create it first")
    if not hasattr(intensities, "shape") or not hasattr(intensities, "dtype"):
        intensities = np.asarray(intensities)
    shape = tuple(int(s) for s in intensities.shape)
    fields = _validate_meta(
        shape=shape, dtype=np.dtype(intensities.dtype), frames_flat=False,
        positions_px=positions_px, angles_rad=angles_rad, mask=mask, energy_ev=energy_ev,
        pixel_size_m=pixel_size_m, detector_distance_m=detector_distance_m, where="arguments",
        distances_m=distances_m, source_distance_m=source_distance_m,
        incident_photons=incident_photons,
    )
    extra = dict(extra or {})
    for name in extra:
        if name.strip("/").split("/")[0] in _RESERVED or not name.strip("/"):
            raise MeasurementError(f"extra: key {name!r} collides with a reserved name {_RESERVED}")
    pos = np.asarray(positions_px, dtype=np.float64)
    attrs = {"energy_ev": fields["energy_ev"], "pixel_size_m": fields["pixel_size_m"]}
    if fields["detector_distance_m"] is not None:
        attrs["detector_distance_m"] = fields["detector_distance_m"]
    if incident_photons is not None:
        attrs["incident_photons"] = fields["incident_photons"]
    n_a, n_t, dy, dx = shape
    chunk = (1, min(n_t, 16), dy, dx)
    base = os.path.basename(p.rstrip(os.sep))
    tmp = os.path.join(os.path.dirname(p), f".{base}.tmp-{uuid.uuid4().hex[:8]}")
    step = max(1, _BLOCK_BYTES // (dy * dx * 4))
    try:
        def write_tree(g: Any, make: Any) -> None:
            # zarr's create_array and h5py's create_dataset take the same arguments here
            ds = make("intensities", shape=shape, chunks=chunk, dtype="float32")
            make("positions_px", data=pos)
            for name in ("angles_rad", "mask", "distances_m"):
                if fields[name] is not None:
                    make(name, data=fields[name])
            for name, arr in extra.items():
                make(name.strip("/"), data=np.asarray(arr))
            g.attrs.update(attrs)
            _fill(ds, intensities, n_a, n_t, step)

        if ext == ".zarr":
            import zarr

            g = zarr.open_group(tmp, mode="w")
            write_tree(g, g.create_array)
        else:
            import h5py

            with h5py.File(tmp, "w") as f:
                write_tree(f, f.create_dataset)
        close_cached_files(p)
        if os.path.lexists(p):
            old = os.path.join(os.path.dirname(p), f".{base}.old-{uuid.uuid4().hex[:8]}")
            os.replace(p, old)
            os.replace(tmp, p)
            _remove(old)
        else:
            os.replace(tmp, p)
    except BaseException:
        _remove(tmp)
        raise
    return p


def _fill(ds: Any, intensities: Any, n_a: int, n_t: int, step: int) -> None:
    """Copy ``intensities`` into ``ds`` block by block, checking values."""
    for a in range(n_a):
        for t0 in range(0, n_t, step):
            block = np.asarray(intensities[a, t0 : t0 + step])
            _check_block(block, a, t0, "intensities argument")
            ds[a, t0 : t0 + step] = block.astype(np.float32, copy=False)
