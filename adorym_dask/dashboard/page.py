"""The ``/adorym`` Bokeh document: a run's loss, object slice, probe, positions, parameters.

It runs in the scheduler, on its event loop: every ``PERIOD_MS`` a callback reads
``scheduler.get_metadata(["adorym"])`` (written by
:class:`~adorym_dask.dashboard.publisher.DashboardPublisher`), picks the run updated last, and
refreshes the named data sources whose metadata entry changed (metadata values are replaced,
never mutated, so an identity check tells).

Named models (a browser test finds them with ``Bokeh.documents[0].get_model_by_name``):
``title`` (Div); data sources ``loss_minibatch``, ``loss_epoch`` (columns ``x`` epochs, ``y``
loss), ``object_phase``, ``object_magnitude``, ``probe`` (``image``, ``dw``, ``dh``),
``positions`` (``x0``, ``y0`` initial, ``x1``, ``y1`` current; x = column, y = row),
``parameters`` (``name``, ``value``, ``change``), ``parameter_history`` (``xs``, ``ys``,
``label``).
"""

from __future__ import annotations

import html
import time
from typing import Any

import numpy as np
from bokeh.layouts import column, row
from bokeh.models import (
    ColumnDataSource,
    DataTable,
    Div,
    LinearColorMapper,
    Select,
    TableColumn,
)
from bokeh.palettes import Category10_10, Greys256, Viridis256
from bokeh.plotting import figure

from adorym_dask.dashboard.codec import unpack

__all__ = ["doc_fn", "individual_doc_fn", "PERIOD_MS", "latest_run"]

PERIOD_MS = 500
_IMAGE = ("image", "dw", "dh")


RECENT_S = 120.0  # a running run that published within this time is live


def latest_run(meta: Any, *, now: float | None = None) -> tuple[str, dict] | None:
    """The run to show: the most recently *started* of the live runs (status ``running``,
    updated within :data:`RECENT_S`), so that two runs publishing at once do not make the
    page flip between them; without a live run, the one updated last (``meta["latest"]``
    breaks ties), or ``None``.

    Parameters
    ----------
    meta : dict or None
        ``scheduler.get_metadata(["adorym"])``: ``{run_id: {key: value}, "latest": run_id}``.
    now : float, optional
        The time (``time.time()``), for tests.
    """
    import time

    if not isinstance(meta, dict):
        return None
    runs = {k: v for k, v in meta.items() if k != "latest" and isinstance(v, dict)}
    if not runs:
        return None
    pointer = meta.get("latest")
    now = time.time() if now is None else now

    def rank(item: tuple[str, dict]) -> tuple[bool, float, float, bool]:
        info = item[1].get("info")
        info = info if isinstance(info, dict) else {}
        updated = float(info.get("updated", 0.0) or 0.0)
        live = info.get("status") == "running" and now - updated < RECENT_S
        started = float(info.get("started", 0.0) or 0.0) if live else 0.0
        return live, started, updated, item[0] == pointer

    return max(runs.items(), key=rank)


class AdorymPage:
    """One browser session's document and the state of its updates.

    Parameters
    ----------
    scheduler : distributed.Scheduler
        Read only, on its own event loop.
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.run_id: str | None = None
        self._seen: dict[str, tuple] = {}
        self._history: dict[str, np.ndarray] = {}
        self.sources = {
            name: ColumnDataSource({k: [] for k in data}, name=name)
            for name, data in [
                ("loss_minibatch", ("x", "y")),
                ("loss_epoch", ("x", "y")),
                ("object_phase", _IMAGE),
                ("object_magnitude", _IMAGE),
                ("probe", _IMAGE),
                ("positions", ("x0", "y0", "x1", "y1")),
                ("parameters", ("name", "value", "change")),
                ("parameter_history", ("xs", "ys", "label", "color")),
            ]
        }
        self.title = Div(text="<b>adorym</b>: waiting for a run to publish", name="title",
                         sizing_mode="stretch_width")
        self.loss_fig = self._loss_figure()
        self.object_figs = (self._image_figure("object_phase", "phase", Viridis256),
                            self._image_figure("object_magnitude", "magnitude", Greys256))
        self.probe_fig = self._image_figure("probe", "probe modes (amplitude)", Viridis256,
                                            width=520)
        self.positions_fig = self._positions_figure()
        self.select = Select(title="history of", options=[], value="", width=200,
                             name="parameter_select")
        self.select.on_change("value", lambda attr, old, new: self._show_history())
        self.history_fig = self._history_figure()
        table = DataTable(
            source=self.sources["parameters"], name="parameters_table", width=420, height=220,
            index_position=None,
            columns=[TableColumn(field="name", title="parameter", width=110),
                     TableColumn(field="value", title="value", width=210),
                     TableColumn(field="change", title="max |change|", width=100)],
        )
        self.root = column(
            self.title,
            row(self.loss_fig, column(table, row(self.select), self.history_fig)),
            row(*self.object_figs),
            row(self.probe_fig, self.positions_fig),
            name="adorym_root",
        )

    # -- figures -------------------------------------------------------------------------

    def _loss_figure(self):
        fig = figure(title="loss", y_axis_type="log", width=560, height=420,
                     x_axis_label="epoch", y_axis_label="loss",
                     tools="pan,wheel_zoom,box_zoom,reset,save,hover")
        fig.line("x", "y", source=self.sources["loss_minibatch"], color="#9ab",
                 legend_label="minibatch")
        fig.line("x", "y", source=self.sources["loss_epoch"], color="#c33", line_width=2,
                 legend_label="epoch")
        fig.scatter("x", "y", source=self.sources["loss_epoch"], color="#c33", size=5)
        fig.legend.location = "top_right"
        return fig

    def _image_figure(self, name: str, title: str, palette, *, width: int = 400):
        fig = figure(title=title, width=width, height=380, match_aspect=True,
                     tools="pan,wheel_zoom,box_zoom,reset,save,hover",
                     tooltips=[("x", "$x{0}"), ("y", "$y{0}"), ("value", "@image")])
        fig.y_range.flipped = True  # row 0 at the top, as the object is stored
        mapper = LinearColorMapper(palette=palette, nan_color=(0, 0, 0, 0))
        fig.image("image", x=0, y=0, dw="dw", dh="dh", source=self.sources[name],
                  color_mapper=mapper)
        fig.grid.visible = False
        return fig

    def _positions_figure(self):
        fig = figure(title="scan positions (row, col)", width=420, height=380,
                     match_aspect=True, x_axis_label="col (px)", y_axis_label="row (px)",
                     tools="pan,wheel_zoom,box_zoom,reset,save")
        fig.y_range.flipped = True
        src = self.sources["positions"]
        fig.segment("x0", "y0", "x1", "y1", source=src, color="#888", line_width=1)
        fig.scatter("x0", "y0", source=src, color="#999", size=4, legend_label="initial")
        fig.scatter("x1", "y1", source=src, color="#d33", size=4, legend_label="current")
        fig.legend.location = "top_right"
        fig.legend.click_policy = "hide"
        return fig

    def _history_figure(self):
        fig = figure(title="per epoch", width=420, height=170, x_axis_label="epoch",
                     tools="pan,wheel_zoom,reset,hover")
        fig.multi_line("xs", "ys", source=self.sources["parameter_history"],
                       color="color", line_width=1.5)
        return fig

    # -- updates -------------------------------------------------------------------------

    def _changed(self, key: str, *values: Any) -> bool:
        """Whether the metadata objects of ``key`` differ from those shown (by identity)."""
        old = self._seen.get(key)
        if old is not None and len(old) == len(values) and all(
            a is b for a, b in zip(old, values)
        ):
            return False
        self._seen[key] = values
        return True

    def update(self) -> None:
        """Read the metadata and refresh what changed (the periodic callback)."""
        found = latest_run(self.scheduler.get_metadata(["adorym"], default=None))
        if found is None:
            return
        run_id, run = found
        if run_id != self.run_id:
            self.run_id, self._seen = run_id, {}
            for src in self.sources.values():
                src.data = {k: [] for k in src.data}
        self._title(run.get("info"))
        chunks = run.get("loss_minibatch")
        if isinstance(chunks, dict) and self._changed("loss_minibatch", *chunks.values()):
            self._losses(chunks)
        epoch_rows = run.get("loss_epoch")
        if self._changed("loss_epoch", epoch_rows):
            rows = unpack(epoch_rows)
            if rows is not None and rows.size:
                self.sources["loss_epoch"].data = {"x": rows[:, 0] + 1.0,
                                                   "y": _positive(rows[:, 1])}
        obj = run.get("object")
        if isinstance(obj, dict) and self._changed("object", obj):
            self._object(obj)
        probe = run.get("probe")
        if isinstance(probe, dict) and self._changed("probe", probe):
            self._probe(probe)
        pos = run.get("positions")
        if isinstance(pos, dict) and self._changed("positions", pos):
            self._positions(pos)
        params, hist = run.get("parameters"), run.get("parameter_history")
        if isinstance(params, dict) and self._changed("parameters", params, hist):
            self._parameters(params, hist if isinstance(hist, dict) else {})

    def _title(self, info: Any) -> None:
        if not isinstance(info, dict):
            return
        loss = info.get("loss")
        age = time.time() - float(info.get("updated") or time.time())
        parts = [
            f"<b>adorym</b> run <code>{html.escape(str(info.get('run_id', self.run_id)))}</code>",
            html.escape(str(info.get("model_kind", "?"))),
            f"epoch {info.get('epoch', 0)}/{info.get('epochs', '?')}",
            f"<b>{html.escape(str(info.get('status', '?')))}</b>",
        ]
        if isinstance(loss, (int, float)):
            parts.append(f"loss {loss:.5g}")
        if age > 10:
            parts.append(f"last update {age:.0f} s ago")
        text = " &middot; ".join(parts)
        if self.title.text != text:
            self.title.text = text

    def _losses(self, chunks: dict) -> None:
        parts = [unpack(chunks[k]) for k in sorted(chunks, key=int)]
        parts = [p for p in parts if p is not None and p.size]
        if not parts:
            return
        rows = np.concatenate(parts)
        per_epoch = max(float(rows[:, 1].max()) + 1.0, 1.0)
        self.sources["loss_minibatch"].data = {
            "x": rows[:, 0] + (rows[:, 1] + 1.0) / per_epoch, "y": _positive(rows[:, 2]),
        }

    def _object(self, obj: dict) -> None:
        ny, nx = obj.get("shape") or (1, 1)
        labels = obj.get("labels") or ("phase", "magnitude")
        where = f"{obj.get('where') or 'slice %d' % obj.get('slice_index', 0)}, {ny} x {nx} px"
        for fig, name, label, key in zip(self.object_figs, ("object_phase", "object_magnitude"),
                                         labels, ("first", "second")):
            img = unpack(obj.get(key))
            if img is None:
                continue
            self.sources[name].data = {"image": [img], "dw": [nx], "dh": [ny]}
            fig.title.text = f"object {label} ({where})"

    def _probe(self, probe: dict) -> None:
        img = unpack(probe.get("image"))
        if img is None:
            return
        self.sources["probe"].data = {"image": [img], "dw": [img.shape[1]], "dh": [img.shape[0]]}
        power = ", ".join(f"{p:.1%}" for p in probe.get("power") or ())
        self.probe_fig.title.text = f"probe modes, amplitude / max (power {power})"

    def _positions(self, pos: dict) -> None:
        a, b = unpack(pos.get("initial")), unpack(pos.get("current"))
        if a is None or b is None:
            return
        self.sources["positions"].data = {"x0": a[:, 1], "y0": a[:, 0],
                                          "x1": b[:, 1], "y1": b[:, 0]}
        moved = float(np.hypot(*(b - a).T).max()) if len(a) else 0.0
        shown = f"{len(a)}/{pos.get('n_total', len(a))}"
        self.positions_fig.title.text = f"positions ({shown}), largest shift {moved:.3g} px"

    def _parameters(self, params: dict, hist: dict) -> None:
        names, values, changes = [], [], []
        self._history = {}
        for name in sorted(params):
            arr = unpack(params[name])
            if arr is None:
                continue
            rows = unpack(hist.get(name))
            if rows is not None and rows.ndim == 2 and len(rows):
                self._history[name] = rows
                change = float(np.abs(rows[-1, 1:] - rows[0, 1:]).max())
            else:
                change = 0.0
            names.append(name)
            values.append(_format(arr))
            changes.append(f"{change:.3g}")
        self.sources["parameters"].data = {"name": names, "value": values, "change": changes}
        if self.select.options != names:
            self.select.options = names
        if self.select.value not in names:
            self.select.value = names[0] if names else ""  # calls _show_history
        else:
            self._show_history()

    def _show_history(self) -> None:
        rows = self._history.get(self.select.value)
        if rows is None:
            self.sources["parameter_history"].data = {"xs": [], "ys": [], "label": [],
                                                      "color": []}
            return
        k = rows.shape[1] - 1
        self.sources["parameter_history"].data = {
            "xs": [rows[:, 0]] * k, "ys": [rows[:, 1 + i] for i in range(k)],
            "label": [f"{self.select.value}[{i}]" for i in range(k)],
            "color": [Category10_10[i % 10] for i in range(k)],
        }


def _positive(values: np.ndarray) -> np.ndarray:
    """NaN for the values a log axis cannot show."""
    out = np.asarray(values, np.float64).copy()
    out[~(out > 0)] = np.nan
    return out


def _format(values: np.ndarray, *, shown: int = 6) -> str:
    flat = np.asarray(values).ravel()
    text = ", ".join(f"{v:.6g}" for v in flat[:shown])
    return text + (f", ... ({flat.size})" if flat.size > shown else "")


def _build(scheduler: Any, doc: Any) -> AdorymPage:
    page = AdorymPage(scheduler)
    page.update()
    doc.add_periodic_callback(page.update, PERIOD_MS)
    doc.add_root(page.root)
    doc.title = "Dask: adorym"
    try:
        from distributed.dashboard.components.scheduler import BOKEH_THEME
    except ImportError:  # the page still works with Bokeh's own theme
        return page
    doc.theme = BOKEH_THEME
    return page


def doc_fn(scheduler: Any, extra: dict, doc: Any) -> None:
    """The ``/adorym`` page, inside the dashboard's frame (navigation bar).

    Parameters
    ----------
    scheduler : distributed.Scheduler
    extra : dict
        The dashboard's template variables (prefix, pages, plots).
    doc : bokeh.document.Document
    """
    _build(scheduler, doc)
    try:
        from distributed.dashboard.components.scheduler import env
    except ImportError:
        return
    doc.template = env.get_template("simple.html")
    doc.template_variables.update(extra)


def individual_doc_fn(scheduler: Any, extra: dict, doc: Any) -> None:
    """The same page without the frame, for ``/individual-adorym`` (JupyterLab's panes)."""
    _build(scheduler, doc)
