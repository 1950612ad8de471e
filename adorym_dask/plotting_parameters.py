"""The refined small parameters of a run, initial against refined: rows for a report and a
PNG panel.

A run store holds each refined parameter as ``<output>`` with ``<output>_initial`` beside it
(see :mod:`adorym_dask.storage.results`): ``distances_m (hologram,)``, ``affine (hologram,
row, col)``, ``tilts_rad (angle, rot_axis)``, ``offsets_px (angle, yx)``, ``kappa ()``,
``rotation_centre_px ()``, ``slice_spacings_m (gap,)``, ``positions_px (angle, tile, yx)``.
Complex parameters (the probe, with a ``channel`` dimension) are left to the probe picture.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: component names of a parameter's trailing dimension
_COMPONENTS = {"yx": ("y", "x"), "rot_axis": ("y", "x", "z")}
#: values printed in full up to this many elements
_SHOWN = 6


@dataclass(frozen=True)
class ParameterRow:
    """One refined parameter of a run store.

    Attributes
    ----------
    name : str
        The run store's variable (``distances_m``, ``tilts_rad``, ...).
    dims : tuple of str
        Its dimension names.
    initial, refined : ndarray
        Start and final values, the same shape (``()`` for a scalar).
    """

    name: str
    dims: tuple[str, ...]
    initial: np.ndarray
    refined: np.ndarray

    @property
    def change(self) -> np.ndarray:
        """``refined - initial``, the parameter's shape."""
        return self.refined - self.initial

    def summary(self) -> str:
        """One line: the values (small parameters) or the largest change (large ones)."""
        shape = "x".join(str(s) for s in self.refined.shape) or "scalar"
        if self.refined.size <= _SHOWN:
            return (f"{self.name} ({shape}): {_fmt(self.initial)} -> {_fmt(self.refined)}")
        ch = np.abs(self.change)
        return (f"{self.name} ({shape}): largest change {ch.max():.4g}, mean {ch.mean():.4g}"
                f" (refined range {self.refined.min():.4g} .. {self.refined.max():.4g})")

    def table(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """``(initial [n, c], refined [n, c], component labels [c])``: the values indexed by
        the first dimension (angle and tile together for positions), one column per
        component."""
        lead = 2 if self.dims[:2] == ("angle", "tile") else 1
        lead = min(lead, self.refined.ndim)
        n = int(np.prod(self.refined.shape[:lead])) if lead else 1
        init = self.initial.reshape(n, -1)
        ref = self.refined.reshape(n, -1)
        rest = self.dims[lead:]
        if len(rest) == 1 and rest[0] in _COMPONENTS:
            labels = list(_COMPONENTS[rest[0]])
        elif rest == ("row", "col"):  # affine [n, 2, 3]: linear part A and translation t
            labels = [{(0, 2): "t_y", (1, 2): "t_x"}.get((r, c), f"A{r}{c}")
                      for r, c in np.ndindex(*self.refined.shape[lead:])]
        elif rest:
            labels = [",".join(str(i) for i in idx)
                      for idx in np.ndindex(*self.refined.shape[lead:])]
        else:
            labels = [self.name]
        return init, ref, labels


def _fmt(value: np.ndarray) -> str:
    flat = np.asarray(value, np.float64).reshape(-1)
    text = ", ".join(f"{v:.6g}" for v in flat)
    return text if np.ndim(value) == 0 else f"[{text}]"


def refined_parameters(ds) -> list[ParameterRow]:
    """Every real-valued parameter of a run store with an ``<name>_initial`` companion.

    Parameters
    ----------
    ds : xarray.Dataset
        The run store (``RunResult.open()`` or ``xarray.open_zarr(path)``).

    Returns
    -------
    list of ParameterRow
        In the store's order; the probe (complex) is not among them.
    """
    rows = []
    for name in ds.data_vars:
        if name.endswith("_initial") or f"{name}_initial" not in ds:
            continue
        var = ds[name]
        if "channel" in var.dims:  # complex (the probe): drawn as pictures, not values
            continue
        rows.append(ParameterRow(str(name), tuple(str(d) for d in var.dims),
                                 np.asarray(ds[f"{name}_initial"].values, np.float64),
                                 np.asarray(var.values, np.float64)))
    return rows


def save_parameters_png(path: str | Path, rows: list[ParameterRow]) -> Path:
    """One panel per parameter, initial (dashed, open markers) against refined (solid):
    scalars as two bars, one value per hologram / gap as lines over its index, and
    per-angle or multi-component parameters (tilts, offsets, alignment, positions) as the
    change ``refined - initial`` of each component over the index; the title of each panel
    gives :meth:`ParameterRow.summary`.

    Parameters
    ----------
    path : str or Path
        The PNG to write.
    rows : list of ParameterRow
        From :func:`refined_parameters`; at least one.
    """
    from adorym_dask.plotting import _pyplot

    if not rows:
        raise ValueError("rows: no refined parameters to draw; refine some (refine: {...})")
    plt = _pyplot()
    cols = min(3, len(rows))
    n_rows = -(-len(rows) // cols)
    fig, ax = plt.subplots(n_rows, cols, figsize=(5.5 * cols, 4 * n_rows), squeeze=False)
    for axis, row in zip(ax.flat, rows):
        _draw_row(axis, row)
    for axis in ax.flat[len(rows):]:
        axis.axis("off")
    fig.suptitle("refined parameters: initial (dashed) and refined (solid)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


def _draw_row(axis, row: ParameterRow) -> None:
    title = row.summary()
    axis.set_title(title if len(title) <= 60 else title[:57] + "...", fontsize=8)
    if row.refined.size == 1:
        values = [float(row.initial.reshape(-1)[0]), float(row.refined.reshape(-1)[0])]
        axis.bar(["initial", "refined"], values, color=["lightgray", "tab:blue"])
        for k, v in enumerate(values):
            axis.annotate(f"{v:.6g}", (k, v), ha="center", va="bottom", fontsize=8)
        axis.set_ylabel(row.name)
        return
    init, ref, labels = row.table()
    idx = np.arange(len(ref))
    index_name = "tile" if row.dims[:2] == ("angle", "tile") else (row.dims[0] if row.dims else "")
    if ref.shape[1] == 1:  # one value per index: the values themselves
        axis.plot(idx, init[:, 0], "o--", mfc="none", color="gray", label="initial")
        axis.plot(idx, ref[:, 0], "o-", color="tab:blue", label="refined")
        axis.set_ylabel(row.name)
    else:  # several components: their changes
        for c, label in enumerate(labels):
            axis.plot(idx, ref[:, c] - init[:, c], ".-", label=f"{label}")
        axis.axhline(0.0, color="gray", ls="--", lw=0.8)
        axis.set_ylabel(f"{row.name}: refined - initial")
    axis.set_xlabel(index_name)
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.legend(fontsize=7, ncol=2 if len(labels) > 3 else 1)
