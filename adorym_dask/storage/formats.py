"""Format detection and metadata readers (native, CXI, original Adorym).

Each reader gets an open read-only handle (h5py.File or zarr group) and
returns a :class:`RawMeta`; :func:`adorym_dask.storage.measurements.
open_measurements` then validates it. Intensities are never loaded here.

CXI conventions (``.cxi``, CXI spec 1.6 as written by cdtools)
-------------------------------------------------------------
* Data: ``entry_1/instrument_1/detector_1/data`` or ``entry_1/data_1/data``,
  ``[n_frames, det_y, det_x]``, read as one angle with ``n_tiles = n_frames``.
  The beam centre is assumed to be at ``(det_y // 2, det_x // 2)`` (raw
  detector frames are naturally centred, i.e. already "fft-shifted").
* Energy: ``source_1/wavelength`` (m) wins over ``source_1/energy`` (J),
  like ``cdtools.tools.data.get_wavelength``.
* Mask: CXI masks are bit fields where any set bit flags a bad pixel,
  except the value 0x00001000 ("signal above background"), which is good;
  we follow ``cdtools.tools.data.get_mask``: good = (m == 0) | (m == 0x1000).
* Object-plane pixel size (far field): ``wavelength * distance /
  (det_x * x_pixel_size)``. Objects use square pixels, so if the y sampling
  ``wavelength * distance / (det_y * y_pixel_size)`` differs by > 0.1 % we
  raise and ask for ``pixel_size_m`` (or a square crop).
* Near-field data (holography, near-field ptychography; the model says so):
  the far-field formula does not apply. The object pixel is the detector
  pixel divided by the cone beam's magnification ``M = (z1 + z2) / z1``
  (``z1`` the focus-to-sample distance, which CXI does not store: give
  ``data.source_distance_m``; without it, a plane wave, ``M = 1``) and the
  effective propagation distance is ``z1 z2 / (z1 + z2)`` (Fresnel scaling
  theorem), ``z2`` = ``detector_1/distance``.
* Positions: ``entry_1/sample_1/geometry_1/translation`` (also
  ``data_1/translation``, ``detector_1/translation``) ``[n, 3]`` (x, y, z) in
  metres is the *sample* translation. As in cdtools, the probe position is
  ``-translation``, expressed in the object-pixel basis whose directions are
  the detector ``basis_vectors`` (default ``[[0, -y_pix, 0], [-x_pix, 0,
  0]]``, cdtools' default). With the default basis the two sign flips
  cancel: ``(row, col) = (t_y, t_x) / pixel_size_m``. Positions are then
  shifted so that their minimum is 0 along each axis.

Original Adorym HDF5 (``exchange/data``)
----------------------------------------
Source: mdw771/adorym README "Dataset format" and ``adorym/ptychography.py``
(``f['exchange/data']``, ``f['metadata/energy_ev'][...]`` etc.).

* ``exchange/data`` ``[n_angles, n_tiles, det_y, det_x]``; far-field
  patterns are fft-shifted (``propagate.py`` uses ``fft2_and_shift``).
* Adorym does not record whether the data are intensities or magnitudes;
  its ``reconstruct_ptychography(raw_data_type='intensity')`` default is
  used unless ``raw_data_type`` is passed or a ``metadata/raw_data_type``
  dataset / root attribute exists. Magnitudes are squared by read_tiles.
* Metadata are *datasets* in ``/metadata``: ``probe_pos_px`` ``[n_tiles, 2]``
  (y, x) top-left corners in object pixels, ``energy_ev``, ``psize_cm``
  (object-plane pixel size, cm), ``theta`` (radians, optional),
  ``free_prop_cm`` (optional; absent / ``'inf'`` = far field; arrays of
  several distances are not mapped and give ``detector_distance_m=None``).
  Per-angle ``probe_pos_px_<i>`` (``common_probe_pos=False``) is not
  supported.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MeasurementError", "RawMeta", "detect_format", "read_metadata"]

log = logging.getLogger(__name__)

HC_EV_M = 1.239841984e-6  # h * c in eV * m
_BLOCK_BYTES = 64 * 2**20  # bounded-memory block for value scans / writes


class MeasurementError(ValueError):
    """A measurement file or array is missing, malformed or inconsistent.

    The message names the offending field (``intensities``, ``positions_px``,
    ``energy_ev``, ...) and says how to fix it.
    """


_EV_J = 1.602176634e-19
CXI_DATA_KEYS = ("entry_1/instrument_1/detector_1/data", "entry_1/data_1/data")
CXI_TRANSLATION_KEYS = (
    "entry_1/sample_1/geometry_1/translation",
    "entry_1/data_1/translation",
    "entry_1/instrument_1/detector_1/translation",
)


@dataclass
class RawMeta:
    """Unvalidated metadata of one file.

    ``shape``/``dtype`` describe the intensity dataset at ``key``;
    ``positions_px`` is ``[n_tiles, 2]`` or ``[n_angles, n_tiles, 2]``.
    """

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    positions_px: np.ndarray | None
    angles_rad: np.ndarray | None
    mask: np.ndarray | None
    energy_ev: float | None
    pixel_size_m: float | None
    detector_distance_m: float | None
    frames_flat: bool = False
    is_amplitude: bool = False
    distances_m: np.ndarray | None = None
    source_distance_m: np.ndarray | None = None
    incident_photons: float | None = None


def _h5_has(path: str, key: str) -> bool:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return key in f
    except (OSError, ValueError):
        raise MeasurementError(
            f"intensities: {path} is not a readable HDF5 file; check data.path"
        ) from None


def detect_format(path: str) -> str:
    """Return the format of ``path``: one of ``measurements.FORMATS``.

    ``.zarr`` (or a directory with ``zarr.json``) -> native_zarr; ``.cxi`` ->
    cxi; other files are sniffed as HDF5: ``intensities`` -> native_h5,
    ``exchange/data`` -> adorym_h5, ``entry_1`` -> cxi.
    """
    ext = os.path.splitext(path.rstrip(os.sep))[1].lower()
    if ext == ".zarr" or (os.path.isdir(path) and os.path.exists(os.path.join(path, "zarr.json"))):
        return "native_zarr"
    if ext == ".cxi":
        return "cxi"
    if os.path.isdir(path):
        raise MeasurementError(
            f"intensities: {path} is a directory but not a zarr v3 group (.zarr); check data.path"
        )
    if _h5_has(path, "intensities"):
        return "native_h5"
    if _h5_has(path, "exchange/data"):
        return "adorym_h5"
    if _h5_has(path, "entry_1"):
        return "cxi"
    raise MeasurementError(
        f"intensities: no 'intensities' dataset (native layout), 'exchange/data' (Adorym) or "
        f"'entry_1' (CXI) in {path}; write the file with write_measurements or pass fmt="
    )


def _node(handle: Any, key: str) -> Any | None:
    """Return the array at ``key`` or None; raise if it is a group."""
    try:
        if key not in handle:
            return None
        node = handle[key]
    except (KeyError, ValueError, OSError):
        return None
    if not hasattr(node, "shape") or not hasattr(node, "dtype"):
        raise MeasurementError(f"{key.split('/')[-1]}: '{key}' is a group, expected a dataset")
    return node


def _read(handle: Any, key: str) -> np.ndarray | None:
    node = _node(handle, key)
    return None if node is None else np.asarray(node[...])


def _scalar(value: Any, name: str) -> float | None:
    """Convert a stored scalar (dataset, attr, bytes 'inf') to float or None."""
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.size != 1:
        raise MeasurementError(f"{name}: expected a scalar, got shape {arr.shape}")
    item = arr.reshape(-1)[0]
    if isinstance(item, bytes):
        item = item.decode()
    try:
        return float(item)
    except (TypeError, ValueError):
        raise MeasurementError(f"{name}: stored value {item!r} is not a number") from None


def _intensity_node(handle: Any, key: str, where: str) -> Any:
    node = _node(handle, key)
    if node is None:
        raise MeasurementError(
            f"intensities: dataset '{key}' missing in {where}; the native layout needs "
            "'intensities' [n_angles, n_tiles, det_y, det_x] (see write_measurements)"
        )
    return node


def read_metadata(
    handle: Any,
    fmt: str,
    *,
    where: str,
    energy_ev: float | None = None,
    pixel_size_m: float | None = None,
    detector_distance_m: float | None = None,
    raw_data_type: str | None = None,
    near_field: bool = False,
    source_distance_m: float | None = None,
) -> RawMeta:
    """Read metadata of an open file; keyword values override stored ones.

    ``near_field`` says the data are near-field (holograms, near-field ptychography): a CXI
    file's object pixel size is then the detector pixel divided by the cone beam's
    magnification (``source_distance_m`` given), or the detector pixel itself (a plane wave),
    never the far-field formula.
    """
    if fmt in ("native_h5", "native_zarr"):
        meta = _read_native(handle, where)
    elif fmt == "adorym_h5":
        meta = _read_adorym(handle, where, raw_data_type)
    elif fmt == "cxi":
        return _read_cxi(handle, where, energy_ev, pixel_size_m, detector_distance_m,
                         near_field=near_field, source_distance_m=source_distance_m)
    else:
        raise MeasurementError(f"fmt: unknown format {fmt!r}")
    if energy_ev is not None:
        meta.energy_ev = energy_ev
    if pixel_size_m is not None:
        meta.pixel_size_m = pixel_size_m
    if detector_distance_m is not None:
        meta.detector_distance_m = detector_distance_m
    if source_distance_m is not None:
        meta.source_distance_m = np.asarray(source_distance_m, np.float64)
    return meta


def _read_native(handle: Any, where: str) -> RawMeta:
    ds = _intensity_node(handle, "intensities", where)
    attrs = dict(handle.attrs)
    return RawMeta(
        key="intensities", shape=tuple(ds.shape), dtype=np.dtype(ds.dtype),
        positions_px=_read(handle, "positions_px"), angles_rad=_read(handle, "angles_rad"),
        mask=_read(handle, "mask"),
        energy_ev=_scalar(attrs.get("energy_ev"), "energy_ev"),
        pixel_size_m=_scalar(attrs.get("pixel_size_m"), "pixel_size_m"),
        detector_distance_m=_scalar(attrs.get("detector_distance_m"), "detector_distance_m"),
        distances_m=_read(handle, "distances_m"),
        source_distance_m=_read(handle, "source_distance_m"),
        incident_photons=_scalar(attrs.get("incident_photons"), "incident_photons"),
    )


def _read_adorym(handle: Any, where: str, raw_data_type: str | None) -> RawMeta:
    ds = _node(handle, "exchange/data")
    if ds is None:
        raise MeasurementError(f"intensities: dataset 'exchange/data' missing in {where}")
    pos = _read(handle, "metadata/probe_pos_px")
    if pos is None and _node(handle, "metadata/probe_pos_px_0") is not None:
        raise MeasurementError(
            f"positions_px: per-angle 'metadata/probe_pos_px_<i>' (Adorym common_probe_pos=False) "
            f"is not supported in {where}; convert to the native layout with [n_angles, n_tiles, 2]"
        )
    if pos is None:
        raise MeasurementError(
            f"positions_px: 'metadata/probe_pos_px' [n_tiles, 2] missing in {where}"
        )

    def meta(name: str) -> Any:
        value = _read(handle, f"metadata/{name}")
        return handle.attrs.get(name) if value is None else value

    psize_cm = _scalar(meta("psize_cm"), "pixel_size_m (metadata/psize_cm)")
    dist = None
    free = meta("free_prop_cm")
    if free is not None and np.asarray(free).size == 1:
        d_cm = _scalar(free, "detector_distance_m (metadata/free_prop_cm)")
        dist = d_cm * 1e-2 if d_cm is not None and math.isfinite(d_cm) and d_cm > 0 else None
    kind = raw_data_type
    if kind is None:
        stored = meta("raw_data_type")
        if stored is not None:
            item = np.asarray(stored).reshape(-1)[0]
            kind = item.decode() if isinstance(item, bytes) else str(item)
    kind = (kind or "intensity").lower()
    if kind not in ("intensity", "magnitude"):
        raise MeasurementError(
            f"raw_data_type must be 'intensity' or 'magnitude', got {kind!r} for {where}"
        )
    return RawMeta(
        key="exchange/data", shape=tuple(ds.shape), dtype=np.dtype(ds.dtype),
        positions_px=pos, angles_rad=meta("theta"), mask=None,
        energy_ev=_scalar(meta("energy_ev"), "energy_ev"),
        pixel_size_m=None if psize_cm is None else psize_cm * 1e-2,
        detector_distance_m=dist, is_amplitude=(kind == "magnitude"),
    )


def _read_cxi(
    handle: Any,
    where: str,
    energy_ev: float | None,
    pixel_size_m: float | None,
    distance_m: float | None,
    *,
    near_field: bool = False,
    source_distance_m: float | None = None,
) -> RawMeta:
    key = next((k for k in CXI_DATA_KEYS if _node(handle, k) is not None), None)
    if key is None:
        raise MeasurementError(
            f"intensities: none of {CXI_DATA_KEYS} found in CXI file {where}"
        )
    ds = handle[key]
    det = "entry_1/instrument_1/detector_1/"
    src = "entry_1/instrument_1/source_1/"
    if energy_ev is None:
        wl = _scalar(_read(handle, src + "wavelength"), "energy_ev (source_1/wavelength)")
        if wl is not None and wl > 0:
            energy_ev = HC_EV_M / wl
        else:
            e_j = _scalar(_read(handle, src + "energy"), "energy_ev (source_1/energy)")
            energy_ev = None if e_j is None else e_j / _EV_J
    if distance_m is None:
        distance_m = _scalar(_read(handle, det + "distance"), "detector_distance_m")
    xps = _scalar(_read(handle, det + "x_pixel_size"), "x_pixel_size")
    yps = _scalar(_read(handle, det + "y_pixel_size"), "y_pixel_size")
    xps, yps = xps or yps, yps or xps
    distances = None
    if near_field:
        # the far-field sampling formula does not apply: the object pixel is the detector
        # pixel, demagnified by a cone beam (Fresnel scaling theorem)
        if not distance_m:
            raise MeasurementError(
                f"distances_m: near-field data need the sample-to-detector distance; "
                f"detector_1/distance is missing in {where}: set data.detector_distance_m"
            )
        z2 = float(distance_m)
        z_eff, mag = z2, 1.0
        if source_distance_m is not None:
            z1 = float(np.asarray(source_distance_m).reshape(-1)[0])
            z_eff, mag = z1 * z2 / (z1 + z2), (z1 + z2) / z1
        if pixel_size_m is None:
            if not xps:
                raise MeasurementError(
                    f"pixel_size_m: detector_1/x_pixel_size missing in {where}; set "
                    "data.pixel_size_m (object-plane pixel size, metres)"
                )
            if yps and not math.isclose(xps, yps, rel_tol=1e-3):
                raise MeasurementError(
                    f"pixel_size_m: detector pixels are not square ({yps:.4g} x {xps:.4g} m) in "
                    f"{where}; set data.pixel_size_m explicitly"
                )
            pixel_size_m = xps / mag
        distances = np.full(ds.shape[0], z_eff)
        log.info("CXI %s read as near-field data: object pixel %.4g m, effective (plane-wave) "
                 "distance %.5g m%s", where, pixel_size_m, z_eff,
                 "" if source_distance_m is None else
                 f" (cone beam, magnification {mag:.4g}, Fresnel scaling theorem)")
    if pixel_size_m is None and len(ds.shape) == 3:
        missing = [n for n, v in (("energy", energy_ev), ("detector_1/distance", distance_m),
                                  ("detector_1/x_pixel_size", xps)) if not v]
        if missing:
            raise MeasurementError(
                f"pixel_size_m: cannot derive the object pixel size, {', '.join(missing)} missing in "
                f"{where}; set data.pixel_size_m in the config or --set data.pixel_size_m=1e-8"
            )
        lam_z = HC_EV_M / energy_ev * distance_m
        pixel_size_m = lam_z / (ds.shape[2] * xps)
        psize_y = lam_z / (ds.shape[1] * yps)
        if not math.isclose(pixel_size_m, psize_y, rel_tol=1e-3):
            raise MeasurementError(
                f"pixel_size_m: far-field sampling differs in y ({psize_y:.4g} m) and x "
                f"({pixel_size_m:.4g} m) for detector {tuple(ds.shape[1:])} in {where}; crop the "
                "detector to a square or set data.pixel_size_m explicitly"
            )
    positions = None
    tkey = next((k for k in CXI_TRANSLATION_KEYS if _node(handle, k) is not None), None)
    if tkey is not None and pixel_size_m:
        positions = _cxi_positions(handle, tkey, det, float(pixel_size_m), xps, yps, where)
    raw_mask = _read(handle, det + "mask")
    mask = None
    if raw_mask is not None:
        m = raw_mask.astype(np.uint32)
        mask = (m == 0) | (m == 0x00001000)
    return RawMeta(
        key=key, shape=tuple(ds.shape), dtype=np.dtype(ds.dtype), positions_px=positions,
        angles_rad=None, mask=mask, energy_ev=energy_ev, pixel_size_m=pixel_size_m,
        detector_distance_m=distance_m, frames_flat=True, distances_m=distances,
    )


def _cxi_positions(
    handle: Any, tkey: str, det: str, psize: float, xps: float | None, yps: float | None,
    where: str,
) -> np.ndarray:
    """CXI sample translations [n, 3] (m) -> (y, x) object pixels, min at 0."""
    t = np.asarray(handle[tkey][...], dtype=np.float64)
    if t.ndim != 2 or t.shape[1] not in (2, 3):
        raise MeasurementError(
            f"positions_px: CXI '{tkey}' must be [n_frames, 3] (x, y, z) metres, got {t.shape} "
            f"in {where}"
        )
    if t.shape[1] == 2:
        t = np.concatenate([t, np.zeros((t.shape[0], 1))], axis=1)
    basis = _read(handle, det + "basis_vectors")
    if basis is not None and basis.ndim == 3:
        basis = basis[0]  # per-frame basis vectors: use the first frame's
    if basis is not None and basis.shape == (2, 3):
        basis = basis.T
    if basis is None or basis.shape != (3, 2):
        basis = np.array([[0.0, -(xps or 1.0)], [-(yps or 1.0), 0.0], [0.0, 0.0]])
    basis = np.asarray(basis, dtype=np.float64)
    norms = np.linalg.norm(basis, axis=0)
    if not (norms > 0).all():
        raise MeasurementError(f"positions_px: CXI detector basis_vectors are degenerate in {where}")
    obj_basis = basis / norms * psize  # columns: one object pixel along row / col
    probe = -t.T  # cdtools: probe translation = -sample translation
    px, *_ = np.linalg.lstsq(obj_basis, probe, rcond=None)
    px = px.T
    return px - px.min(axis=0)


# ----------------------------------------------------------------------------
# Validation shared by open_measurements and write_measurements
# ----------------------------------------------------------------------------
def _iter_blocks(ds: Any, frames_flat: bool):
    """Yield ``(angle, tile0, block)`` with blocks of at most ~64 MiB."""
    shape = tuple(ds.shape)
    frame_bytes = max(1, int(np.prod(shape[-2:])) * max(4, np.dtype(ds.dtype).itemsize))
    step = max(1, _BLOCK_BYTES // frame_bytes)
    if frames_flat:
        for t0 in range(0, shape[0], step):
            yield 0, t0, np.asarray(ds[t0 : t0 + step])
    else:
        for a in range(shape[0]):
            for t0 in range(0, shape[1], step):
                yield a, t0, np.asarray(ds[a, t0 : t0 + step])


def _check_block(block: np.ndarray, angle: int, tile0: int, where: str) -> None:
    """Raise on the first non-finite or negative frame of ``block`` [k, dy, dx]."""
    if block.dtype.kind == "f":
        bad = ~np.isfinite(block).reshape(block.shape[0], -1).all(axis=1)
        if bad.any():
            t = tile0 + int(np.argmax(bad))
            raise MeasurementError(
                f"intensities: NaN or inf at (angle {angle}, tile {t}) in {where}; "
                "fix or drop that frame (or mask the bad pixels and set them to 0)"
            )
    if block.dtype.kind in "fi":
        neg = (block < 0).reshape(block.shape[0], -1).any(axis=1)
        if neg.any():
            t = tile0 + int(np.argmax(neg))
            raise MeasurementError(
                f"intensities: negative value at (angle {angle}, tile {t}) in {where}; "
                "photon counts must be >= 0 (clip background-subtracted data at 0)"
            )


def _positive(name: str, value: Any, hint: str) -> float:
    if value is None:
        raise MeasurementError(f"{name} is missing; {hint}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise MeasurementError(f"{name}: {value!r} is not a number; {hint}") from None
    if not math.isfinite(v) or v <= 0:
        raise MeasurementError(f"{name} must be finite and > 0, got {v}; {hint}")
    return v


def _validate_meta(
    *,
    shape: tuple[int, ...],
    dtype: np.dtype,
    frames_flat: bool,
    positions_px: Any,
    angles_rad: Any,
    mask: Any,
    energy_ev: Any,
    pixel_size_m: Any,
    detector_distance_m: Any,
    where: str,
    distances_m: Any = None,
    source_distance_m: Any = None,
    incident_photons: Any = None,
) -> dict[str, Any]:
    """Check metadata consistency; return normalised fields.

    A cone beam (``source_distance_m`` given, one per tile or one for all) turns the
    recorded sample-to-detector ``distances_m`` into effective plane-wave distances
    ``z1 z2 / (z1 + z2)`` (Fresnel scaling theorem); ``pixel_size_m`` is the object-plane
    pixel already.
    """
    want = 3 if frames_flat else 4
    layout = "[n_frames, det_y, det_x]" if frames_flat else "[n_angles, n_tiles, det_y, det_x]"
    if len(shape) != want:
        raise MeasurementError(
            f"intensities must be {want}-D {layout}, got shape {shape} in {where}"
        )
    dtype = np.dtype(dtype)
    if dtype.kind not in "fiu":
        raise MeasurementError(
            f"intensities must be real numbers (float32 photon counts), got dtype {dtype} in {where}"
        )
    if min(shape) < 1:
        raise MeasurementError(f"intensities is empty (shape {shape}) in {where}")
    n_angles, n_tiles = (1, shape[0]) if frames_flat else (shape[0], shape[1])
    det_shape = (int(shape[-2]), int(shape[-1]))
    if positions_px is None:
        raise MeasurementError(
            f"positions_px is missing in {where}; add a [n_tiles, 2] (y, x) dataset 'positions_px'"
        )
    pos = np.asarray(positions_px, dtype=np.float64)
    if pos.ndim == 2 and pos.shape[1] == 2:
        if pos.shape[0] != n_tiles:
            raise MeasurementError(
                f"positions_px has {pos.shape[0]} tiles but intensities has n_tiles={n_tiles} "
                f"in {where}; give one (y, x) row per diffraction pattern"
            )
        pos = np.broadcast_to(pos, (n_angles, n_tiles, 2)).copy()
    elif pos.ndim == 3 and pos.shape[2] == 2:
        if pos.shape[:2] != (n_angles, n_tiles):
            raise MeasurementError(
                f"positions_px has shape {pos.shape} but intensities has n_angles={n_angles}, "
                f"n_tiles={n_tiles} in {where}; expected ({n_angles}, {n_tiles}, 2)"
            )
    else:
        raise MeasurementError(
            f"positions_px must have shape [n_tiles, 2] or [n_angles, n_tiles, 2] (last dim = "
            f"(y, x)), got {pos.shape} in {where}"
        )
    if not np.isfinite(pos).all():
        bad = np.argwhere(~np.isfinite(pos).all(axis=-1))[0]
        raise MeasurementError(
            f"positions_px contains NaN/inf at (angle {bad[0]}, tile {bad[1]}) in {where}"
        )
    ang = None
    if angles_rad is not None:
        ang = np.asarray(angles_rad, dtype=np.float64).reshape(-1)
        if ang.size != n_angles:
            raise MeasurementError(
                f"angles_rad has {ang.size} entries but intensities has n_angles={n_angles} "
                f"in {where}; give one angle (radians) per angle slice"
            )
        if not np.isfinite(ang).all():
            raise MeasurementError(f"angles_rad contains NaN/inf in {where}")
    msk = None
    if mask is not None:
        msk = np.asarray(mask)
        if msk.shape != det_shape:
            raise MeasurementError(
                f"mask has shape {msk.shape} but the detector is {det_shape} in {where}; "
                "give a bool [det_y, det_x] mask (False = ignored pixel)"
            )
        msk = msk.astype(bool)
    e = _positive(
        "energy_ev", energy_ev,
        f"not found in {where}: set data.energy_ev in the config or --set data.energy_ev=8800",
    )
    p = _positive(
        "pixel_size_m", pixel_size_m,
        f"not found in {where}: set data.pixel_size_m in the config or "
        "--set data.pixel_size_m=1e-8 (object-plane pixel size, metres)",
    )
    d = None
    if detector_distance_m is not None:
        d = _positive(
            "detector_distance_m", detector_distance_m,
            "set data.detector_distance_m in the config (metres) or remove it",
        )
    dist = _distances(distances_m, n_tiles, where)
    if source_distance_m is not None:
        z1 = _distances(source_distance_m, n_tiles, where, name="source_distance_m")
        if dist is None:
            raise MeasurementError(
                f"source_distance_m is given but distances_m (sample-to-detector, metres, one "
                f"per hologram) is missing in {where}; add it or drop source_distance_m"
            )
        dist = z1 * dist / (z1 + dist)
        log.info("cone beam in %s: effective plane-wave distances %s m (Fresnel scaling "
                 "theorem, z1 z2 / (z1 + z2))", where, np.array2string(dist, precision=5))
    photons = 1.0 if incident_photons is None else _positive(
        "incident_photons", incident_photons,
        f"the bare beam's counts per pixel in {where}; fix the attribute or remove it (default 1)",
    )
    return dict(
        n_angles=int(n_angles), n_tiles=int(n_tiles), det_shape=det_shape, positions_px=pos,
        angles_rad=ang, mask=msk, energy_ev=e, pixel_size_m=p, detector_distance_m=d,
        distances_m=dist, incident_photons=photons,
    )


def _distances(value: Any, n_tiles: int, where: str, *, name: str = "distances_m") -> np.ndarray | None:
    """``[n_tiles]`` float64 positive distances (one value is repeated), or None."""
    if value is None:
        return None
    d = np.asarray(value, dtype=np.float64).reshape(-1)
    if d.size == 1:
        d = np.full(n_tiles, float(d[0]))
    if d.size != n_tiles:
        raise MeasurementError(
            f"{name} has {d.size} values but intensities has {n_tiles} holograms (tiles) in "
            f"{where}; give one distance in metres per hologram"
        )
    if not np.isfinite(d).all() or (d <= 0).any():
        bad = int(np.flatnonzero(~np.isfinite(d) | (d <= 0))[0])
        raise MeasurementError(
            f"{name}[{bad}] = {d[bad]} in {where}: every distance must be finite and > 0 "
            "(metres; effective plane-wave distances for a cone beam)"
        )
    return d
