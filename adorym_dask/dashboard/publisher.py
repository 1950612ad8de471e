"""The driver's side of the ``/adorym`` page: push a run's progress to the scheduler.

Everything goes to the scheduler's metadata under ``["adorym", run_id, key]`` (plus
``["adorym", "latest"] = run_id``), as msgpack-able values only (numbers, strings, and arrays as
:func:`~adorym_dask.dashboard.codec.pack` dicts). The page (:mod:`adorym_dask.dashboard.page`)
reads them there.

A background thread does the pushing: the engine's calls only store the newest value of each
key (a few microseconds to a millisecond for an image) and wake the thread, which sends what is
pending at most every ``interval_s`` seconds. A comm failure is logged once and never reaches
the engine.

Keys of a run
-------------
``info``
    ``{"run_id", "model_kind", "epochs", "epoch" (epochs done), "batch", "loss", "status",
    "updated" (unix time)}``.
``loss_minibatch/<k>``
    Chunk ``k`` of the minibatch losses, packed ``[m, 3]`` float32 rows (epoch, batch, loss),
    ``m <= CHUNK``; chunks older than ``MAX_MINIBATCHES`` losses are set to ``None``.
``loss_epoch``
    Packed ``[n, 2]`` float32 rows (epoch, loss).
``object``
    ``{"first", "second": packed [my, mx] float32, "labels": [str, str], "representation",
    "slice_index", "shape": [ny, nx]}``.
``probe``
    ``{"image": packed [my, w] float32 in [0, 1], "power": [float] per mode, "shape"}``.
``positions``
    ``{"initial", "current": packed [n, 2] float32 (row, col), "n_total": int}``.
``parameters``
    ``{name: packed [k] float64}`` (flattened), and ``parameter_history`` ``{name: packed
    [n, 1 + k] float64}`` rows (epoch, values...).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from adorym_dask.dashboard.codec import display_channels, pack, probe_strip

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)

__all__ = ["DashboardPublisher", "CHUNK", "MAX_MINIBATCHES", "MAX_POSITIONS"]

CHUNK = 1000
"""Minibatch losses per metadata entry (only the last entry changes as a run goes)."""
MAX_MINIBATCHES = 20_000
"""Minibatch losses kept (the oldest chunks are dropped)."""
MAX_POSITIONS = 2000
"""Scan positions shown (a fixed stride through the scan)."""
RETRIES = 3
"""Consecutive failed pushes after which unsent values are dropped (the comm is gone)."""
MAX_PARAMETER_VALUES = 64
MAX_HISTORY = 2000


class DashboardPublisher:
    """Send a run's losses, object slice, probe, positions and parameters to the page.

    Parameters
    ----------
    client : distributed.Client or None
        The run's client. ``None`` (the sync scheduler) or an asynchronous client makes every
        method a no-op.
    run_id : str
        Names the run on the page (several runs may publish to one scheduler).
    model_kind : str
        Shown in the title, e.g. ``"ptychography"``.
    epochs : int
        Epochs the run will do (the title's ``epoch x/y``).
    max_px : int
        Largest side of the object image (block mean) and of each probe mode's image.
    interval_s : float
        Least time between two pushes to the scheduler (values set meanwhile are coalesced).
    """

    def __init__(
        self,
        client: Client | None,
        *,
        run_id: str,
        model_kind: str,
        epochs: int,
        max_px: int = 192,
        interval_s: float = 0.2,
    ) -> None:
        if client is not None and getattr(client, "asynchronous", False):
            log.info("dashboard: an asynchronous client cannot publish from the engine; off")
            client = None
        self._client = client
        self.run_id = str(run_id)
        self.max_px = int(max_px)
        self.interval_s = float(interval_s)
        self._info: dict[str, Any] = {
            "run_id": self.run_id, "model_kind": str(getattr(model_kind, "value", model_kind)),
            "epochs": int(epochs), "epoch": 0, "batch": -1, "loss": None, "status": "running",
            "started": time.time(), "updated": time.time(),
        }
        self._rows: list[tuple[float, float, float]] = []  # current minibatch chunk
        self._chunk = 0
        self._epoch_rows: list[tuple[float, float]] = []
        self._history: dict[str, list[np.ndarray]] = {}
        self._position_index: np.ndarray | None = None
        self._position_count = -1
        self._pending: dict[tuple[str, ...], Any] = {}
        self._cond = threading.Condition()
        self._queued = 0  # puts so far
        self._sent = 0  # puts the thread has pushed (or dropped on a failure)
        self._stop = False
        self._thread: threading.Thread | None = None
        self._warned = False
        self._failures = 0  # consecutive failed pushes
        self._put(("info",), dict(self._info))

    @property
    def enabled(self) -> bool:
        """Whether anything is published (a client was given and nothing broke for good)."""
        return self._client is not None

    # -- the engine's calls ------------------------------------------------------------------

    def minibatch(self, *, epoch: int, batch: int, loss: float) -> None:
        """Append one minibatch's loss to the curve."""
        if not self.enabled:
            return
        self._rows.append((float(epoch), float(batch), float(loss)))
        updates: dict[tuple[str, ...], Any] = {
            ("loss_minibatch", str(self._chunk)): pack(np.asarray(self._rows, np.float32))
        }
        if len(self._rows) >= CHUNK:
            self._chunk, self._rows = self._chunk + 1, []
            old = self._chunk - MAX_MINIBATCHES // CHUNK - 1
            if old >= 0:
                updates[("loss_minibatch", str(old))] = None
        self._info.update(epoch=int(epoch), batch=int(batch), loss=float(loss))
        self._put_many(updates)

    def epoch(self, *, epoch: int, loss: float) -> None:
        """Epoch ``epoch`` (0-based) just finished with this loss."""
        if not self.enabled:
            return
        self._epoch_rows = [r for r in self._epoch_rows if r[0] != epoch]  # a resumed epoch
        self._epoch_rows.append((float(epoch), float(loss)))
        self._epoch_rows = self._epoch_rows[-MAX_MINIBATCHES:]
        self._info.update(epoch=int(epoch) + 1, batch=-1, loss=float(loss))
        self._put_many({("loss_epoch",): pack(np.asarray(self._epoch_rows, np.float32))})

    def object_slice(self, values: np.ndarray, *, representation: str, slice_index: int,
                     where: str | None = None) -> None:
        """Show one slice of the object (a z slice, or a volume's axial slice).

        Parameters
        ----------
        values : np.ndarray
            ``[ny, nx, 2]`` float, channels (real, imag) or (delta, beta); block-averaged to at
            most ``max_px`` pixels a side.
        representation : str
            ``"real_imag"`` (shown as phase and magnitude) or ``"delta_beta"``.
        slice_index : int
            Which z slice this is (shown in the title).
        where : str, optional
            The slice's name in the title instead (e.g. ``"row 12 (z down, x across)"``).
        """
        if not self.enabled:
            return
        rep = str(getattr(representation, "value", representation))
        first, second, labels = display_channels(values, representation=rep, max_px=self.max_px)
        self._put(("object",), {
            "first": pack(first), "second": pack(second), "labels": list(labels),
            "representation": rep, "slice_index": int(slice_index), "where": where,
            "shape": [int(s) for s in np.shape(values)[:2]],
        })

    def probe(self, probe: np.ndarray) -> None:
        """Show the amplitude of every probe mode (``[n_modes, py, px]`` complex)."""
        if not self.enabled:
            return
        strip, power = probe_strip(probe, max_px=min(self.max_px, 128))
        self._put(("probe",), {"image": pack(strip), "power": [float(p) for p in power],
                               "shape": [int(s) for s in np.shape(probe)]})

    def positions(self, *, initial: np.ndarray, current: np.ndarray) -> None:
        """Show the scan positions, as first given and as refined.

        Parameters
        ----------
        initial, current : np.ndarray
            ``[..., 2]`` (row, col) in object pixels, the same shape; at most
            :data:`MAX_POSITIONS` of them are shown (the same ones every call).
        """
        if not self.enabled:
            return
        initial = np.asarray(initial, np.float64).reshape(-1, 2)
        current = np.asarray(current, np.float64).reshape(-1, 2)
        if initial.shape != current.shape:
            raise ValueError(f"positions: initial {list(initial.shape)} and current "
                             f"{list(current.shape)} differ")
        n = len(initial)
        idx = self._position_index
        if idx is None or self._position_count != n:
            idx = self._position_index = np.arange(0, n, max(1, -(-n // MAX_POSITIONS)))
            self._position_count = n
        self._put(("positions",), {"initial": pack(initial[idx]), "current": pack(current[idx]),
                                   "n_total": int(n)})

    def parameters(self, values: dict[str, np.ndarray]) -> None:
        """Show small refined parameters by name (each at most 64 values, real).

        Every call also adds a row to each parameter's history, at the epochs done so far.
        """
        if not self.enabled:
            return
        shown: dict[str, Any] = {}
        history: dict[str, Any] = {}
        for name, value in values.items():
            arr = np.asarray(value)
            if np.iscomplexobj(arr) or arr.size > MAX_PARAMETER_VALUES or arr.size == 0:
                log.debug("dashboard: parameter %s (%s values) not shown", name, arr.size)
                continue
            flat = arr.astype(np.float64).ravel()
            shown[str(name)] = pack(flat, dtype="<f8")
            rows = self._history.setdefault(str(name), [])
            row = np.concatenate([[float(self._info["epoch"])], flat])
            if rows and rows[-1][0] == row[0]:
                rows[-1] = row
            else:
                rows.append(row)
            del rows[:-MAX_HISTORY]
            history[str(name)] = pack(np.asarray(rows), dtype="<f8")
        self._put_many({("parameters",): shown, ("parameter_history",): history})

    def finished(self, *, status: str = "finished", timeout_s: float = 5.0) -> None:
        """Mark the run finished, send what is pending (waiting at most ``timeout_s``), stop."""
        if not self.enabled:
            return
        self._info["status"] = status
        self._put_many({})
        self.flush(timeout_s=timeout_s)
        with self._cond:
            self._stop = True
            self._cond.notify_all()

    def flush(self, *, timeout_s: float = 5.0) -> bool:
        """Wait until everything set so far reached the scheduler; ``False`` on a time-out."""
        if self._thread is None:
            return True
        deadline = time.monotonic() + timeout_s
        with self._cond:
            target = self._queued
            while self._sent < target and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    # -- the pushing thread ------------------------------------------------------------------

    def _put(self, key: tuple[str, ...], value: Any) -> None:
        self._put_many({key: value})

    def _put_many(self, updates: dict[tuple[str, ...], Any]) -> None:
        if self._client is None:
            return
        self._info["updated"] = time.time()
        updates = {**updates, ("info",): dict(self._info)}
        with self._cond:
            if self._stop:
                return
            self._pending.update(updates)
            self._queued += 1
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name=f"adorym-dashboard-{self.run_id}", daemon=True
                )
                self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if not self._pending:  # stopped with nothing left
                    return
                batch, self._pending = self._pending, {}
                target = self._queued
            done = self._push(batch)
            with self._cond:
                if done:  # else the rest is pending again and goes with the next push
                    self._sent = target
                self._cond.notify_all()
                # coalesce what the engine sets meanwhile (its notifications do not cut this)
                pause_until = time.monotonic() + self.interval_s
                while not self._stop and (left := pause_until - time.monotonic()) > 0:
                    self._cond.wait(left)

    def _push(self, batch: dict[tuple[str, ...], Any]) -> bool:
        """Send ``batch``; False when part of it is pending again after a failure."""
        client = self._client
        sent: set[tuple[str, ...]] = set()
        try:
            for key, value in batch.items():
                client.set_metadata(["adorym", self.run_id, *key], value)
                sent.add(key)
            client.set_metadata(["adorym", "latest"], self.run_id)
            self._failures = 0
        except Exception as err:  # noqa: BLE001 - monitoring must never stop a reconstruction
            self._failures += 1
            retry = self._failures <= RETRIES  # a passing hiccup: send the rest next time
            if retry:
                with self._cond:
                    for key, value in batch.items():
                        if key not in sent:
                            self._pending.setdefault(key, value)  # unless a newer value waits
            if not self._warned:
                self._warned = True
                log.warning("dashboard: could not publish run %s to the scheduler (%s: %s); "
                            "the run goes on, the page may lag", self.run_id,
                            type(err).__name__, err)
            return not retry
        return True
