"""Where a run's wall time goes: setup and each epoch (``setup_seconds``, ``epoch_seconds``).

The clock starts when the :class:`~adorym_dask.engine.Reconstruction` is built (reading the
measurements and making the start probe count as setup). The time the cluster takes to start is
left out; everything else is either inside an epoch (its minibatches, the position search at its
start, its shrink-wrap, publish and commit) or setup (the start values of the blocks, the final
publish). So ``setup_seconds + sum(epoch_seconds)`` is the run's wall time minus the cluster's
start, up to the milliseconds of the last metadata write and the cluster's shutdown.

A resumed run continues the stored figures: the epoch that was cut carries the seconds it had
at its last commit, and setup adds up over the sessions. Work lost after the last commit (a
killed driver) is redone and counted once, as it is redone; a lost worker's replay inside a
session counts in the epoch it delays.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class RunClock:
    """Seconds of setup and of every finished epoch, and of the epoch under way.

    Attributes
    ----------
    epoch_seconds : list of float
        Wall seconds of each finished epoch.
    epoch_elapsed : float
        Seconds the current epoch had at the last commit of an earlier session.
    setup_seconds : float
        Setup seconds of earlier sessions.
    """

    epoch_seconds: list[float] = field(default_factory=list)
    epoch_elapsed: float = 0.0
    setup_seconds: float = 0.0
    _created: float = field(default_factory=lambda: time.perf_counter(), repr=False)
    _cluster: float = field(default=0.0, repr=False)
    _in_epochs: float = field(default=0.0, repr=False)
    _mark: float | None = field(default=None, repr=False)
    _ended: float | None = field(default=None, repr=False)

    def resume_from(self, epoch_seconds, epoch_elapsed: float, setup_seconds: float) -> None:
        """Continue the figures a checkpoint holds."""
        self.epoch_seconds = [float(s) for s in epoch_seconds]
        self.epoch_elapsed = float(epoch_elapsed)
        self.setup_seconds = float(setup_seconds)

    def cluster_started(self, seconds: float) -> None:
        """Leave ``seconds`` (the cluster's start) out of the run's time."""
        self._cluster += float(seconds)

    def start_epoch(self) -> None:
        """The current epoch's work (re)starts now; a no-op while it runs."""
        if self._mark is None:
            self._mark = time.perf_counter()

    def end_epoch(self) -> float:
        """Close the current epoch; return its seconds."""
        now = time.perf_counter()
        run = now - self._mark if self._mark is not None else 0.0
        self._in_epochs += run
        seconds = self.epoch_elapsed + run
        self.epoch_seconds.append(seconds)
        self.epoch_elapsed, self._mark, self._ended = 0.0, None, now
        return seconds

    def extend_last(self) -> None:
        """Add the time since :meth:`end_epoch` (the epoch's publish and commit, which store
        its seconds) to the epoch just ended."""
        if self._ended is None:
            return
        now = time.perf_counter()
        self.epoch_seconds[-1] += now - self._ended
        self._in_epochs += now - self._ended
        self._ended = None

    def snapshot(self) -> tuple[list[float], float, float]:
        """``(epoch_seconds, seconds of the current epoch so far, setup seconds so far)``, as a
        commit stores them."""
        now = time.perf_counter()
        running = now - self._mark if self._mark is not None else 0.0
        setup = now - self._created - self._cluster - self._in_epochs - running
        return list(self.epoch_seconds), self.epoch_elapsed + running, self.setup_seconds + setup
