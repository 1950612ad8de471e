"""The reconstruction loop: epochs of minibatches, each a Dask graph (see ``graphs/``).

The driver holds only small things (probe, loss, plan, where each block's state is); the object
and its optimizer state live in the object store and are read and written by the tasks. The
same loop runs on a cluster and under the synchronous scheduler: only the ``scheduler`` handed
to Dask differs.

Each minibatch ends with a commit: once every update of the minibatch has finished, the driver
records where each block's new state is and (disk stores) writes a checkpoint. A run killed at
any moment resumes from its last commit (``--resume``) and ends with the same result as an
uninterrupted one. A lost worker costs nothing: Dask reruns its tasks, whose inputs were never
overwritten (see :mod:`adorym_dask.storage.object_store`); the memory store, whose blocks die
with their worker, goes back to its last checkpoint and replays.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dask
import numpy as np
from dask.delayed import delayed
from distributed import Client, wait
from distributed.client import futures_of
from tqdm.auto import tqdm

from adorym_dask.cluster import dask_client
from adorym_dask.config import RunConfig, config_from_dict
from adorym_dask.graphs.minibatch import build_minibatch, epoch_minibatches, plan_tile_groups
from adorym_dask.optimizers import OptimizerSpec, ParameterState
from adorym_dask.parameters import initial_probe
from adorym_dask.registry import model_builder
from adorym_dask.storage import location, results
from adorym_dask.storage.checkpoint import (
    Checkpoint,
    CheckpointError,
    config_differences,
    load_checkpoint,
    save_checkpoint,
)
from adorym_dask.storage.measurements import (
    MeasurementError,
    Measurements,
    check_positions_inside,
    open_measurements,
)
from adorym_dask.storage.object_store import (
    OBJECT,
    BlockRef,
    ObjectStore,
    checkpoint_block,
    create_store,
    init_block,
    open_store,
)

log = logging.getLogger(__name__)
FORMATS = {"auto": None, "native": None, "cxi": "cxi", "adorym": "adorym_h5"}
DEFAULT_PHASE_STEP_RAD = 0.03  # measured: converges fastest among 0.01/0.03/0.1 on simulations
MAX_RECOVERIES = 3


@dataclass
class RunResult:
    """Where a run wrote its result, and its small outputs."""

    output: Path | str
    loss: list[float]
    probe: np.ndarray
    position_offset_px: np.ndarray = field(default_factory=lambda: np.zeros(2))

    def open(self):
        """The run store as an ``xarray.Dataset``."""
        import xarray as xr

        return xr.open_zarr(location.zarr_store(str(self.output)))

    def object(self) -> np.ndarray:
        """The object ``[n_y, n_x, n_z, 2]`` (loads it whole)."""
        return np.asarray(location.open_array(str(self.output), OBJECT, mode="r")[...])


def load_measurements(cfg: RunConfig) -> Measurements:
    d = cfg.data
    return open_measurements(
        d.path,
        fmt=FORMATS[d.format.value],
        energy_ev=d.energy_ev,
        pixel_size_m=d.pixel_size_m,
        detector_distance_m=d.detector_distance_m,
        check_values=d.check_values,
    )


def object_layout(cfg: RunConfig, meas: Measurements) -> tuple[np.ndarray, tuple[int, int], np.ndarray]:
    """Positions in object pixels, the object's (n_y, n_x), and the offset applied.

    With ``object.shape_px`` the positions are used as given and must lie inside. Without it
    the object is the smallest box holding every tile plus ``object.margin_px`` on each side.
    """
    pos = meas.positions_px
    if cfg.object.shape_px is not None:
        shape = tuple(cfg.object.shape_px)
        offset = np.zeros(2)
    else:
        offset = cfg.object.margin_px - np.floor(pos.reshape(-1, 2).min(axis=0))
        far = np.ceil(pos.reshape(-1, 2) + offset).max(axis=0) + np.asarray(meas.det_shape)
        shape = tuple(int(v) + cfg.object.margin_px for v in far)
    pos = pos + offset
    check_positions_inside(pos, meas.det_shape, shape)
    return pos, shape, offset


def object_step_size(cfg: RunConfig, model) -> float:
    """The object's step size: the configured one, or 0.03 rad of phase per step.

    For real/imag objects a step of 0.03 in transmission moves the phase of a unit-magnitude
    pixel by about 0.03 rad; for delta/beta it is the delta step whose phase shift over one
    slice, k delta L, is 0.03 rad.
    """
    if cfg.optimizer.step_size is not None:
        return cfg.optimizer.step_size
    if cfg.object.representation.value == "real_imag":
        return DEFAULT_PHASE_STEP_RAD
    k = 2 * math.pi / model.wavelength_m
    return DEFAULT_PHASE_STEP_RAD / (k * model.slice_thickness_m)


def _recoverable() -> tuple[type[BaseException], ...]:
    """Errors meaning the cluster lost work (a worker died), not that the run is wrong."""
    from concurrent.futures import CancelledError

    from distributed.client import FutureCancelledError
    from distributed.scheduler import KilledWorker

    return (KilledWorker, FutureCancelledError, CancelledError)


def _persist(scheduler, *collections):
    """Start computing ``collections`` without waiting (a Client), or compute them now (sync)."""
    if isinstance(scheduler, Client):
        return scheduler.persist(list(collections))
    return dask.persist(*collections, scheduler=scheduler)


class Reconstruction:
    """State of one run on the driver: the plan, the probe, where each block is, the history.

    Parameters
    ----------
    cfg : RunConfig
        The validated configuration.
    resume : bool
        Continue the run stored at ``cfg.output`` from its last commit.
    allow_config_change : bool
        Resume even if science settings differ from the stored run's.
    """

    def __init__(
        self, cfg: RunConfig, *, resume: bool = False, allow_config_change: bool = False
    ) -> None:
        self.cfg = cfg
        self.meas = load_measurements(cfg)
        self.positions, shape, self.offset = object_layout(cfg, self.meas)
        self.model = model_builder(cfg.model.kind)(cfg, self.meas)
        o = cfg.optimizer
        self.spec = OptimizerSpec(
            o.name.value, object_step_size(cfg, self.model), o.beta1, o.beta2, o.eps
        )
        group_size = min(cfg.tile_group_size, cfg.minibatch_size)
        self.groups = plan_tile_groups(self.positions, self.meas.det_shape, group_size)
        self.path = str(cfg.output)
        self.obj_shape = (*shape, cfg.model.slices)
        self.sources: dict | None = None
        self.n_checkpoints = 0
        self.recoveries = 0  # part of every task key: a replay must not reuse erred keys
        if resume:
            self._open_existing(allow_config_change)
        else:
            self._create_new()

    # -- set-up -----------------------------------------------------------------------------------
    def _probe_spec(self, probe: np.ndarray) -> OptimizerSpec:
        return OptimizerSpec("adam", self.cfg.probe.step_size * float(np.abs(probe).max()))

    def _create_new(self) -> None:
        cfg = self.cfg
        probe = initial_probe(cfg.probe, self.meas, n_modes=cfg.model.probe_modes, seed=cfg.seed)
        self.probe_spec = self._probe_spec(probe)
        self.probe_state = ParameterState.start(probe, self.probe_spec)
        results.check_output(self.path, overwrite=cfg.overwrite)
        location.open_group(self.path, mode="w" if cfg.overwrite else "w-")
        self.store = self._make_store(create=True)
        self.epoch, self.batch, self.step = 0, 0, 0
        self.loss: list[float] = []
        self.epoch_loss = (0.0, 0)
        self._write_metadata()

    def _make_store(self, *, create: bool) -> ObjectStore:
        make = create_store if create else open_store
        return make(
            self.cfg.object.store.value, self.path, shape=self.obj_shape,
            chunks=self.cfg.object.chunks_px,
            representation=self.cfg.object.representation.value,
            n_state=len(self.spec.state_names),
        )

    def _open_existing(self, allow_config_change: bool) -> None:
        ck = load_checkpoint(self.path)
        diffs = config_differences(ck.config, self.cfg.model_dump(mode="json"))
        if diffs and not allow_config_change:
            raise CheckpointError(
                f"the config differs from the one {self.path} was run with: "
                + "; ".join(diffs)
                + ". Restore those values, or resume anyway with --allow-config-change"
            )
        results.check_writable(self.path)
        self.store = self._make_store(create=False)
        stored = location.open_array(self.path, OBJECT, mode="r").shape
        if tuple(stored) != self.store.shape:
            raise CheckpointError(
                f"{self.path} holds an object of shape {stored}, but this config gives "
                f"{self.store.shape}; resume with the config of the original run"
            )
        self._restore(ck)

    def _restore(self, ck: Checkpoint) -> None:
        self.epoch, self.batch, self.step = ck.epoch, ck.batch, ck.step
        self.loss, self.epoch_loss = list(ck.loss), tuple(ck.epoch_loss)
        self.probe_spec = OptimizerSpec("adam", ck.probe_step_size)
        self.probe_state = ParameterState(ck.probe, ck.probe_state, ck.probe_step)
        self.sources = (
            None if (ck.slots < 0).any()
            else {b: BlockRef(int(ck.slots[b])) for b in self.store.all_blocks()}
        )
        if not self.store.on_disk and self.sources is not None:
            # the next memory checkpoint must not overwrite the slot this one names
            self.n_checkpoints = 1 - int(ck.slots.flat[0])

    def _write_metadata(self) -> None:
        spacing = self.cfg.model.slice_spacing_m or self.meas.pixel_size_m
        results.write_coordinates(
            self.path, shape=self.obj_shape, pixel_size_m=self.meas.pixel_size_m,
            slice_spacing_m=spacing,
        )
        results.write_attrs(self.path, {
            "config": self.cfg.model_dump(mode="json"),
            "versions": results.versions(),
            "representation": self.cfg.object.representation.value,
            "store": self.cfg.object.store.value,
            "energy_ev": self.meas.energy_ev,
            "pixel_size_m": self.meas.pixel_size_m,
            "position_offset_px": self.offset.tolist(),
            "data_path": str(self.meas.source.path),
        })
        results.write_progress(self.path, probe=self.probe, loss=[])

    # -- commits ----------------------------------------------------------------------------------
    @property
    def probe(self) -> np.ndarray:
        """Current probe ``[M, py, px]`` complex64."""
        return self.probe_state.value

    def _slots(self) -> np.ndarray:
        slots = np.full(self.store.geometry.n_blocks, -1, np.int8)
        if self.sources is not None and self.store.on_disk:
            for block, src in self.sources.items():
                slots[block] = src.slot
        return slots

    def commit(self, slots: np.ndarray | None = None) -> None:
        """Write the checkpoint naming the current (finished) state of every block."""
        save_checkpoint(self.path, Checkpoint(
            config=self.cfg.model_dump(mode="json"), epoch=self.epoch, batch=self.batch,
            step=self.step, loss=self.loss, epoch_loss=self.epoch_loss, probe=self.probe,
            probe_state=self.probe_state.state, probe_step=self.probe_state.step,
            slots=self._slots() if slots is None else slots,
            probe_step_size=self.probe_spec.step_size,
        ))

    def _checkpoint_memory_blocks(self, scheduler) -> None:
        """Memory store: write every block to the zarr slots not used by the last checkpoint,
        then continue from those copies, which also cuts the tasks' lineage on the scheduler
        (otherwise a lost block is recomputed from the run's whole history)."""
        slot = self.n_checkpoints % 2
        tasks = [
            delayed(checkpoint_block, pure=False)(self.store, b, src, slot)
            for b, src in self.sources.items()
        ]
        refs = dask.compute(*tasks, scheduler=scheduler)
        self.n_checkpoints += 1
        self.commit(np.full(self.store.geometry.n_blocks, slot, np.int8))
        self.sources = dict(zip(self.sources, refs))

    # -- running ----------------------------------------------------------------------------------
    def refine_probe(self, epoch: int) -> bool:
        return self.cfg.probe.refine and epoch >= self.cfg.probe.refine_start_epoch

    def _initialize_blocks(self, scheduler) -> None:
        tasks = {b: delayed(init_block, pure=True)(self.store, b, dask_key_name=f"init-{b[0]}-{b[1]}")
                 for b in self.store.all_blocks()}
        self.sources = self._settle(scheduler, dict(zip(tasks, _persist(scheduler, *tasks.values()))))
        self.commit()  # memory store: slots -1, "start values", so even epoch 0 can resume

    def _settle(self, scheduler, sources: dict) -> dict:
        """Wait for block sources: disk sources come back as values, memory ones stay futures."""
        if self.store.on_disk:
            return dict(zip(sources, dask.compute(*sources.values(), scheduler=scheduler)))
        if isinstance(scheduler, Client):
            wait(futures_of(list(sources.values())))
        return sources

    def run_minibatch(self, groups, epoch: int, b: int, scheduler) -> None:
        """Build, run and commit one optimizer step."""
        tag = f"e{epoch}-b{b}-r{self.recoveries}"
        graph = build_minibatch(
            groups,
            obj=self.store,
            sources=self.sources,
            source=self.meas.source,
            probe_state=delayed(self.probe_state, name=f"probestate-{tag}", traverse=False),
            model=self._model_delayed,
            spec=self.spec,
            probe_spec=self.probe_spec,
            step=self.step + 1,
            want_probe_grad=self.refine_probe(epoch),
            tag=tag,
        )
        if self.store.on_disk:  # every output is small: one round trip
            (loss, _), probe_state, *updates = dask.compute(
                graph.sums, graph.probe_state, *graph.updates.values(), scheduler=scheduler
            )
            new = dict(zip(graph.updates, updates))
        else:  # block states stay on the workers
            sums, probe_state, *updates = _persist(
                scheduler, graph.sums, graph.probe_state, *graph.updates.values()
            )
            (loss, _), probe_state = dask.compute(sums, probe_state, scheduler=scheduler)
            new = self._settle(scheduler, dict(zip(graph.updates, updates)))
        n = sum(len(g.tiles) for g in groups)
        self.sources = {**self.sources, **new}
        self.probe_state = probe_state
        self.step += 1
        self.batch = b + 1
        self.epoch_loss = (self.epoch_loss[0] + loss * n, self.epoch_loss[1] + n)
        if self.store.on_disk:
            self.commit()

    def _end_epoch(self, scheduler) -> float:
        loss = self.epoch_loss[0] / max(self.epoch_loss[1], 1)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"loss became {loss} in epoch {self.epoch}; lower optimizer.step_size"
            )
        self.loss.append(loss)
        self.epoch += 1
        self.batch, self.epoch_loss = 0, (0.0, 0)
        every = self.cfg.publish_every_epochs
        if every and self.epoch % every == 0:
            self.publish(scheduler)
        if self.store.on_disk:
            self.commit()
        else:
            self._checkpoint_memory_blocks(scheduler)
        return loss

    def publish(self, scheduler) -> None:
        """Copy every block's committed object into the run store's ``object`` array, and the
        probe and loss history beside it."""
        tasks = [delayed(self.store.publish, pure=False)(b, src) for b, src in self.sources.items()]
        dask.compute(*tasks, scheduler=scheduler)
        results.write_progress(self.path, probe=self.probe, loss=self.loss)

    def _recover(self, err: BaseException, attempt: int) -> None:
        if attempt > MAX_RECOVERIES:
            raise err
        log.warning("lost work on the cluster (%s); continuing from the last commit", str(err))
        self.recoveries += 1
        self._restore(load_checkpoint(self.path))

    def run(self, client: Client | None = None, *, callback: Callable | None = None) -> RunResult:
        """Run (or continue) every epoch; ``callback(epoch, loss, reconstruction)`` after each."""
        with dask_client(self.cfg.cluster, client) as c:
            scheduler = c if c is not None else "sync"
            bar = tqdm(total=self.cfg.epochs, initial=self.epoch, desc="epochs",
                       disable=not self.cfg.progress)
            attempt = 0
            while self.epoch < self.cfg.epochs:
                try:
                    self._run_epoch(scheduler, bar, callback)
                except _recoverable() as err:
                    attempt += 1
                    self._recover(err, attempt)
            bar.close()
            if self.sources is None:
                self._initialize_blocks(scheduler)
            self.publish(scheduler)
        results.finalize(self.path)
        out = self.path if location.is_url(self.path) else Path(self.path)
        return RunResult(out, self.loss, self.probe, self.offset)

    def _run_epoch(self, scheduler, bar, callback) -> None:
        epoch = self.epoch
        loss = self.run_epoch(scheduler)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4g}")
        if callback is not None:
            callback(epoch, loss, self)

    def run_epoch(self, scheduler) -> float:
        """Run the rest of the current epoch (from its next minibatch); return its loss."""
        if self.sources is None:
            self._initialize_blocks(scheduler)
        epoch = self.epoch
        self._model_delayed = delayed(self.model, name=f"model-e{epoch}-r{self.recoveries}",
                                     traverse=False)
        rng = np.random.default_rng([self.cfg.seed, epoch])
        batches = epoch_minibatches(self.groups, self.cfg.minibatch_size, rng)
        for b in range(self.batch, len(batches)):
            self.run_minibatch(batches[b], epoch, b, scheduler)
        return self._end_epoch(scheduler)


def run(
    cfg: RunConfig,
    client: Client | None = None,
    *,
    resume: bool = False,
    allow_config_change: bool = False,
    **kwargs,
) -> RunResult:
    """Build a :class:`Reconstruction` from ``cfg`` (or continue the stored one) and run it."""
    rec = Reconstruction(cfg, resume=resume, allow_config_change=allow_config_change)
    return rec.run(client, **kwargs)


__all__ = ["Reconstruction", "RunResult", "run", "MeasurementError", "config_from_dict"]
