"""Arrays to and from the scheduler's metadata, and the reductions the page shows.

The scheduler's metadata must stay msgpack-able: a raw numpy array can be *set*, but the next
``get_metadata`` of it breaks the comm. Arrays therefore travel as ``{"dtype", "shape", "data"}``
with ``data`` the array's little-endian bytes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["pack", "unpack", "block_mean", "display_channels", "probe_strip"]


def pack(values: np.ndarray, *, dtype: str = "<f4") -> dict[str, Any]:
    """Encode an array as a msgpack-able dict.

    Parameters
    ----------
    values : np.ndarray
        Any shape; cast to ``dtype``.
    dtype : str
        Little-endian numpy type string of the encoded values.

    Returns
    -------
    dict
        ``{"dtype": str, "shape": list[int], "data": bytes}``.
    """
    arr = np.ascontiguousarray(values, dtype=dtype)
    return {"dtype": dtype, "shape": list(arr.shape), "data": arr.tobytes()}


def unpack(packed: dict[str, Any] | None) -> np.ndarray | None:
    """Decode :func:`pack`'s dict (``None`` and malformed entries give ``None``)."""
    if not isinstance(packed, dict) or "data" not in packed:
        return None
    arr = np.frombuffer(packed["data"], dtype=packed.get("dtype", "<f4"))
    return arr.reshape(tuple(packed.get("shape", (arr.size,))))


def block_mean(values: np.ndarray, max_px: int) -> np.ndarray:
    """Shrink the first two axes to at most ``max_px`` by averaging ``f x f`` blocks.

    Parameters
    ----------
    values : np.ndarray
        ``[ny, nx, ...]``, real or complex.
    max_px : int
        Largest allowed size of either of the first two axes after the reduction.

    Returns
    -------
    np.ndarray
        ``[ceil(ny / f), ceil(nx / f), ...]`` with ``f = ceil(max(ny, nx) / max_px)``; the ragged
        last blocks are averaged over the pixels they hold (edge padding).
    """
    ny, nx = values.shape[:2]
    f = max(1, math.ceil(max(ny, nx) / max(1, max_px)))
    if f == 1:
        return values
    my, mx = math.ceil(ny / f), math.ceil(nx / f)
    pad = [(0, my * f - ny), (0, mx * f - nx)] + [(0, 0)] * (values.ndim - 2)
    padded = np.pad(values, pad, mode="edge")
    return padded.reshape(my, f, mx, f, *values.shape[2:]).mean(axis=(1, 3))


def display_channels(
    values: np.ndarray, *, representation: str, max_px: int
) -> tuple[np.ndarray, np.ndarray, tuple[str, str]]:
    """The two images the page shows of an object slice.

    Parameters
    ----------
    values : np.ndarray
        ``[ny, nx, 2]`` float, channels (real, imag) or (delta, beta).
    representation : str
        ``"real_imag"`` (shown as phase and magnitude of the complex transmission) or
        ``"delta_beta"`` (shown as they are).
    max_px : int
        Largest side of the images (block mean of the complex values, not of the phase).

    Returns
    -------
    first, second : np.ndarray
        ``[my, mx]`` float32 each, ``my, mx <= max_px``.
    labels : tuple of str
        ``("phase", "magnitude")`` or ``("delta", "beta")``.
    """
    values = np.asarray(values)
    if values.ndim != 3 or values.shape[2] != 2:
        raise ValueError(f"an object slice is [ny, nx, 2], not {list(values.shape)}")
    if representation == "real_imag":
        small = block_mean(values[..., 0] + 1j * values[..., 1].astype(np.complex64), max_px)
        return (np.angle(small).astype(np.float32), np.abs(small).astype(np.float32),
                ("phase", "magnitude"))
    if representation == "delta_beta":
        small = block_mean(values.astype(np.float32), max_px)
        return small[..., 0], small[..., 1], ("delta", "beta")
    raise ValueError(f"representation {representation!r}: expected 'real_imag' or 'delta_beta'")


def probe_strip(
    probe: np.ndarray, *, max_px: int, max_modes: int = 8
) -> tuple[np.ndarray, list[float]]:
    """The probe modes' amplitudes side by side, each scaled to its own maximum.

    Parameters
    ----------
    probe : np.ndarray
        ``[n_modes, py, px]`` complex (``[py, px]`` is one mode).
    max_px : int
        Largest side of each mode's image.
    max_modes : int
        Only the first ``max_modes`` modes are drawn.

    Returns
    -------
    strip : np.ndarray
        ``[my, n_shown * (mx + 1) - 1]`` float32 in [0, 1], a NaN column between modes.
    power : list of float
        Every mode's share of the total intensity ``sum |P_k|^2 / sum |P|^2``.
    """
    probe = np.asarray(probe)
    if probe.ndim == 2:
        probe = probe[None]
    if probe.ndim != 3:
        raise ValueError(f"a probe is [n_modes, py, px], not {list(probe.shape)}")
    intensity = (np.abs(probe) ** 2).sum(axis=(1, 2)).astype(np.float64)
    power = (intensity / max(float(intensity.sum()), 1e-300)).tolist()
    tiles = []
    for mode in probe[:max_modes]:
        amp = block_mean(np.abs(mode).astype(np.float32), max_px)
        peak = float(amp.max()) if amp.size else 0.0
        tiles.append(amp / peak if peak > 0 else amp)
    gap = np.full((tiles[0].shape[0], 1), np.nan, np.float32)
    parts = [p for tile in tiles for p in (tile, gap)][:-1]
    return np.concatenate(parts, axis=1).astype(np.float32), power
