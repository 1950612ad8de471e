"""PNG summaries of a run: object slices, probe modes, loss curve, refined positions and the
other refined parameters (initial against refined), for every model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adorym_dask.plotting_parameters import (  # noqa: F401  (re-exported)
    ParameterRow,
    refined_parameters,
    save_parameters_png,
)

#: at most this many slices of a multislice object get a panel (evenly spaced)
MAX_SLICE_PANELS = 8


def object_phase(obj: np.ndarray, representation: str, *, slice_index: int = 0) -> np.ndarray:
    """Phase image ``[n_y, n_x]`` of one slice of an object ``[n_y, n_x, n_z, 2]``.

    For delta/beta objects the phase is ``-delta`` (proportional to the phase shift).
    """
    s = obj[:, :, slice_index]
    if representation == "real_imag":
        return np.angle(s[..., 0] + 1j * s[..., 1])
    return -s[..., 0]


def _pyplot():
    """pyplot, on the Agg backend unless a backend was chosen already (a notebook's inline
    backend must survive: our figures are saved and closed, the user's still show)."""
    import os
    import sys

    import matplotlib

    if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax, path, probe: np.ndarray | None, k: int, loss: list[float]) -> Path:
    """The probe's first mode in panel ``k`` (if any), the loss in the last; save and close."""
    if probe is not None:
        probe = probe if probe.ndim == 3 else probe[None]  # an illumination [py, px]
        im = ax[k].imshow(np.abs(probe[0]), cmap="viridis")
        ax[k].set_title(f"probe |mode 0| of {probe.shape[0]}")
        fig.colorbar(im, ax=ax[k])
    ax[-1].semilogy(np.arange(1, len(loss) + 1), loss, "o-")
    ax[-1].set_xlabel("epoch")
    ax[-1].set_title("loss")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _pyplot().close(fig)
    return Path(path)


def save_summary_png(
    path: str | Path,
    *,
    obj: np.ndarray,
    representation: str,
    probe: np.ndarray | None,
    loss: list[float],
    field_box: tuple[int, int, int, int] | None = None,
) -> Path:
    """Write one phase panel per slice, the probe's first mode and the loss curve to ``path``;
    with ``field_box`` (``(y0, x0, h, w)``, a full-field model's measured field) the object
    panels show that field only, and the first slice's magnitude (or beta) beside its phase.

    Parameters
    ----------
    obj : ndarray
        ``[n_y, n_x, n_z, 2]`` object.
    probe : ndarray or None
        ``[M, py, px]`` complex probe (models without one: None).
    loss : list of float
        Loss per epoch.
    """
    plt = _pyplot()
    extra = 0
    if field_box is not None:
        y0, x0, h, w = (int(v) for v in field_box)
        obj = obj[y0 : y0 + h, x0 : x0 + w]
        extra = 1
    shown = _slices_shown(obj.shape[2])
    n_z = len(shown)
    panels = n_z + extra + (probe is not None) + 1
    fig, ax = plt.subplots(1, panels, figsize=(4.3 * panels, 4))
    if extra:
        s0 = obj[:, :, 0]
        mag = np.hypot(s0[..., 0], s0[..., 1]) if representation == "real_imag" else s0[..., 1]
        im = ax[n_z].imshow(mag, cmap="gray")
        ax[n_z].set_title("object |T|" if representation == "real_imag" else "object beta")
        fig.colorbar(im, ax=ax[n_z])
    for k, z in enumerate(shown):
        im = ax[k].imshow(object_phase(obj, representation, slice_index=z), cmap="gray")
        label = "phase (rad)" if representation == "real_imag" else "-delta"
        ax[k].set_title(f"object {label}" + (f", slice {z}" if obj.shape[2] > 1 else ""))
        fig.colorbar(im, ax=ax[k])
    return _finish(fig, ax, path, probe, n_z + extra, loss)


def _slices_shown(n_z: int) -> list[int]:
    """Every slice, or :data:`MAX_SLICE_PANELS` evenly spaced ones (first and last included)."""
    if n_z <= MAX_SLICE_PANELS:
        return list(range(n_z))
    return sorted({int(round(v)) for v in np.linspace(0, n_z - 1, MAX_SLICE_PANELS)})


def save_positions_png(
    path: str | Path, *, initial: np.ndarray, refined: np.ndarray, angle: int = 0
) -> Path:
    """Initial (open circles) against refined (dots) positions of one angle, joined by lines,
    as in Fig. 10(b) of the paper. Where the shifts are small against the scan's spacing, a
    second panel draws them magnified (so that the 90th percentile spans half a spacing).

    ``initial``, ``refined`` : ``[n_angles, n_tiles, 2]`` (y, x) in the input file's frame.
    """
    plt = _pyplot()
    from matplotlib.collections import LineCollection

    a, b = initial[angle], refined[angle]
    shift = np.linalg.norm(b - a, axis=1)
    gain = 1.0
    if len(a) > 1:
        from scipy.spatial import cKDTree

        # nearest-neighbour distances through a tree: a full distance matrix of a
        # 5000-exposure scan would take 400 MB
        nearest = cKDTree(a).query(a, k=2)[0][:, 1]
        spacing = float(np.median(nearest))
        gain = float(np.clip(np.floor(0.5 * spacing / max(np.percentile(shift, 90), 1e-9)), 1, 50))
    gains = (1.0, gain) if gain > 1 else (1.0,)
    fig, ax = plt.subplots(1, len(gains), figsize=(6 * len(gains), 6), squeeze=False)
    ax = ax[0]
    for axis, gain in zip(ax, gains):
        tip = a + gain * (b - a)
        # one collection for every shift (a line per tile is an artist per tile: slow)
        segments = np.stack([a[:, ::-1], tip[:, ::-1]], axis=1)  # [n, 2 ends, (x, y)]
        axis.add_collection(LineCollection(segments, colors="tab:blue", linewidths=0.8))
        axis.scatter(a[:, 1], a[:, 0], s=14, facecolors="none", edgecolors="k", label="initial")
        axis.scatter(tip[:, 1], tip[:, 0], s=8, color="tab:blue",
                     label="refined" if gain == 1 else f"refined, shift x{gain:g}")
        axis.invert_yaxis()
        axis.set_aspect("equal")
        axis.set_xlabel("x (px)")
        axis.set_ylabel("y (px)")
        axis.legend(loc="upper right", fontsize=8)
    ax[0].set_title(f"probe positions, angle {angle}: mean shift {shift.mean():.2f} px, "
                    f"max {shift.max():.2f} px")
    if len(ax) > 1:
        ax[1].set_title(f"the same, shifts magnified {gains[1]:g}x")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def save_volume_png(path: str | Path, *, obj: np.ndarray, probe: np.ndarray | None,
                    loss: list[float], row: int | None = None) -> Path:
    """A volume ``[n_y, n_x, n_z, 2]`` (delta, beta) of a tomographic model: beta and delta
    in the ``(z, x)`` slice at ``row`` (default the middle one, the axial slice), beta in the
    ``(y, x)`` slice through the middle of z, the probe's first mode if any, and the loss."""
    plt = _pyplot()
    row = obj.shape[0] // 2 if row is None else row
    views = [(obj[row, :, :, 1].T, f"beta, row {row} (z down, x across)"),
             (obj[row, :, :, 0].T, f"delta, row {row}"),
             (obj[:, :, obj.shape[2] // 2, 1], "beta, middle of z (y down, x across)")]
    panels = len(views) + (probe is not None) + 1
    fig, ax = plt.subplots(1, panels, figsize=(4.3 * panels, 4))
    for axis, (img, title) in zip(ax, views):
        im = axis.imshow(img, cmap="gray", aspect="auto" if img.shape[0] < 8 else "equal")
        axis.set_title(title)
        fig.colorbar(im, ax=axis)
    return _finish(fig, ax, path, probe, len(views), loss)


def save_probe_png(path: str | Path, probe: np.ndarray, *,
                   power: np.ndarray | None = None) -> Path:
    """Every probe mode: magnitude (top row) and phase (bottom row), one column per mode.

    Parameters
    ----------
    probe : ndarray
        ``[M, py, px]`` complex modes, or an illumination ``[py, px]``.
    power : ndarray, optional
        ``[M]`` each mode's share of the total power (default: computed from ``probe``).
    """
    from adorym_dask.parameters import mode_power_fractions

    plt = _pyplot()
    probe = probe if probe.ndim == 3 else probe[None]
    power = mode_power_fractions(probe) if power is None else np.asarray(power)
    m = probe.shape[0]
    fig, ax = plt.subplots(2, m, figsize=(3.4 * m, 6.4), squeeze=False)
    for k in range(m):
        im = ax[0, k].imshow(np.abs(probe[k]), cmap="viridis")
        ax[0, k].set_title(f"|mode {k}|, {100 * float(power[k]):.1f} % of power")
        fig.colorbar(im, ax=ax[0, k])
        im = ax[1, k].imshow(np.angle(probe[k]), cmap="twilight", vmin=-np.pi, vmax=np.pi)
        ax[1, k].set_title(f"phase of mode {k} (rad)")
        fig.colorbar(im, ax=ax[1, k])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


VOLUME_MODELS = ("tomography", "ptychotomography")


def _as_result(result):
    """A :class:`~adorym_dask.engine.RunResult`, or one made from a run store's path."""
    if not isinstance(result, (str, Path)):
        return result
    import xarray as xr

    from adorym_dask.storage import location
    from adorym_dask.storage.results import RunResult

    ds = xr.open_zarr(location.zarr_store(str(result)))
    params = {}
    if "probe" in ds:
        p = ds["probe"].values
        params["probe"] = p[..., 0] + 1j * p[..., 1]
    loss = ds["loss"].values.tolist() if "loss" in ds else []
    return RunResult(result, loss, params, np.asarray(ds.attrs.get("position_offset_px", [0, 0])))


def _sibling(path: str | Path, suffix: str) -> Path:
    return Path(path).with_name(f"{Path(path).stem}_{suffix}.png")


def save_run_pngs(path: str | Path, result) -> list[Path]:
    """The summary PNG at ``path`` (object slices, the probe's first mode, the loss; for
    tomographic models three views of the volume) and beside it, where they apply:
    ``<stem>_positions.png`` (refined positions), ``<stem>_probe.png`` (every mode, when there
    are several) and ``<stem>_parameters.png`` (every other refined parameter, initial against
    refined: distances, alignment, tilts, offsets, kappa, rotation centre, slice spacings).

    ``result`` is a :class:`~adorym_dask.engine.RunResult` or the path of a run store.
    Returns the paths written, the summary first.
    """
    result = _as_result(result)
    ds = result.open()
    probe = result.params.get("probe")
    if ds.attrs.get("config", {}).get("model", {}).get("kind") in VOLUME_MODELS:
        out = [save_volume_png(path, obj=result.object(), probe=probe, loss=result.loss)]
    else:
        out = [save_summary_png(
            path, obj=result.object(), representation=ds.attrs["representation"],
            probe=probe, loss=result.loss, field_box=ds.attrs.get("field_box_px"),
        )]
    if "positions_px_initial" in ds:
        out.append(save_positions_png(
            _sibling(path, "positions"), initial=ds["positions_px_initial"].values,
            refined=ds["positions_px"].values,
        ))
    if probe is not None and np.ndim(probe) == 3 and probe.shape[0] > 1:
        power = ds["probe_mode_power"].values if "probe_mode_power" in ds else None
        out.append(save_probe_png(_sibling(path, "probe"), probe, power=power))
    rows = [r for r in refined_parameters(ds) if r.name != "positions_px"]
    if rows:
        out.append(save_parameters_png(_sibling(path, "parameters"), rows))
    return out
