"""The finite-support mask of the object: a bool zarr array ``support [n_y, n_x, n_z]`` in the run
store, chunked like the object, so each update task reads only its block's part.

It starts from ``object.support_path`` (a ``.npy`` bool ``[n_y, n_x]`` or ``[n_y, n_x, n_z]``,
memory-mapped, so a large mask is never loaded whole) and shrink-wrap rewrites it: the blurred
contrast of each slice is thresholded at a fraction of its maximum over the slice and
intersected with the starting support (Marchesini et al. 2003).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adorym_dask.storage import location

SUPPORT = "support"


class SupportError(ValueError):
    """A support mask file that cannot be used, with the field and the fix."""


def load_support_file(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """Memory-map the ``.npy`` mask and check it fits an object ``(n_y, n_x, n_z)``."""
    if not Path(path).is_file():
        raise SupportError(f"object.support_path: file {path} not found; give a .npy bool mask")
    try:
        mask = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        raise SupportError(f"object.support_path: {path} is not a readable .npy array ({err})") from None
    want2, want3 = shape[:2], tuple(shape)
    if mask.shape not in (want2, want3):
        raise SupportError(
            f"object.support_path: mask shape {mask.shape} does not fit the object {want3}; "
            f"give [n_y, n_x] = {list(want2)} (every slice) or [n_y, n_x, n_z] = {list(want3)} "
            "(set object.shape_px to fix the object's shape)"
        )
    if mask.dtype.kind not in "biu":
        raise SupportError(
            f"object.support_path: mask dtype {mask.dtype} is not bool or integer (True/1 inside)"
        )
    return mask


def create_support(path: str, shape: tuple[int, int, int], chunks: tuple[int, int]) -> None:
    """Create the ``support`` array (all True until written)."""
    g = location.open_group(path)
    g.create_array(
        SUPPORT, shape=shape, chunks=(*chunks, shape[2]), dtype="bool", fill_value=True,
        dimension_names=["y", "x", "z"], overwrite=True,
    )


def _box_index(box: tuple[int, int, int, int]) -> tuple[slice, slice]:
    y0, x0, h, w = box
    return slice(y0, y0 + h), slice(x0, x0 + w)


def read_support(path: str, box: tuple[int, int, int, int]) -> np.ndarray:
    """``[h, w, n_z]`` bool support over ``box``."""
    return np.asarray(location.open_array(path, SUPPORT, mode="r")[_box_index(box)])


def write_support(path: str, box: tuple[int, int, int, int], mask: np.ndarray) -> None:
    location.open_array(path, SUPPORT)[_box_index(box)] = mask


def initial_support(
    npy: str | None, box: tuple[int, int, int, int], n_z: int, *, inside: list | None = None
) -> np.ndarray:
    """``[h, w, n_z]`` bool: the file's mask over ``box`` (all True without a file), and
    with ``inside`` (a list of ``(y0, x0, h, w)`` boxes) only within their union."""
    h, w = box[2], box[3]
    if npy is None:
        out = np.ones((h, w, n_z), bool)
    else:
        part = np.asarray(np.load(npy, mmap_mode="r")[_box_index(box)]).astype(bool)
        out = np.broadcast_to(part[..., None] if part.ndim == 2 else part, (h, w, n_z)).copy()
    if inside is not None:
        field = np.zeros((h, w), bool)
        for y0, x0, bh, bw in inside:
            ya, xa = max(y0 - box[0], 0), max(x0 - box[1], 0)
            yb, xb = min(y0 + bh - box[0], h), min(x0 + bw - box[1], w)
            if ya < yb and xa < xb:
                field[ya:yb, xa:xb] = True
        out &= field[..., None]
    return out


def init_support_block(
    path: str, npy: str | None, box: tuple[int, int, int, int], n_z: int, *,
    inside: list | None = None,
) -> None:
    """Task: copy the starting support of one block into the run store."""
    write_support(path, box, initial_support(npy, box, n_z, inside=inside))


def blurred_contrast(ext: np.ndarray, representation: str, sigma_px: float) -> np.ndarray:
    """``[H, W, n_z]`` Gaussian-blurred |contrast| of object values ``[H, W, n_z, 2]``."""
    from scipy.ndimage import gaussian_filter

    if representation == "real_imag":
        c = np.hypot(ext[..., 0] - 1.0, ext[..., 1])
    else:
        c = np.abs(ext[..., 0]) + np.abs(ext[..., 1])
    return gaussian_filter(c, sigma=(sigma_px, sigma_px, 0), mode="nearest")
