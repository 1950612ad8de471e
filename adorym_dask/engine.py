"""The reconstruction loop: epochs of minibatches, each a Dask graph (see ``graphs/``).

The driver holds only small things (probe, loss, plan); the object and its optimizer state
live in the run store and are read and written by the tasks. The same loop runs on a cluster
and under the synchronous scheduler: only the ``scheduler`` handed to ``dask.compute`` differs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dask
import numpy as np
from dask.delayed import delayed
from distributed import Client
from tqdm.auto import tqdm

from adorym_dask.cluster import dask_client
from adorym_dask.config import RunConfig
from adorym_dask.graphs.minibatch import build_minibatch, epoch_minibatches, plan_tile_groups
from adorym_dask.optimizers import OptimizerSpec, ParameterState
from adorym_dask.parameters import initial_probe
from adorym_dask.registry import model_builder
from adorym_dask.storage import results
from adorym_dask.storage.measurements import (
    MeasurementError,
    Measurements,
    check_positions_inside,
    open_measurements,
)
from adorym_dask.storage.object_store import ObjectRef, create_object_store

FORMATS = {"auto": None, "native": None, "cxi": "cxi", "adorym": "adorym_h5"}


@dataclass
class RunResult:
    """Where a run wrote its result, and its small outputs."""

    output: Path
    loss: list[float]
    probe: np.ndarray
    object_ref: ObjectRef
    position_offset_px: np.ndarray = field(default_factory=lambda: np.zeros(2))

    def open(self):
        """The run store as an ``xarray.Dataset``."""
        import xarray as xr

        return xr.open_zarr(self.output)

    def object(self) -> np.ndarray:
        """The object ``[n_y, n_x, n_z, 2]`` (loads it whole)."""
        return self.object_ref.read_all()


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


DEFAULT_PHASE_STEP_RAD = 0.03  # measured: converges fastest among 0.01/0.03/0.1 on simulations


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


def _optimizer_spec(cfg: RunConfig, model) -> OptimizerSpec:
    o = cfg.optimizer
    return OptimizerSpec(o.name.value, object_step_size(cfg, model), o.beta1, o.beta2, o.eps)


class Reconstruction:
    """State of one run on the driver: the plan, the probe and its optimizer, the history.

    Parameters
    ----------
    cfg : RunConfig
        The validated configuration.
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.meas = load_measurements(cfg)
        self.positions, shape, self.offset = object_layout(cfg, self.meas)
        self.model = model_builder(cfg.model.kind)(cfg, self.meas)
        probe = initial_probe(cfg.probe, self.meas, n_modes=cfg.model.probe_modes, seed=cfg.seed)
        self.spec = _optimizer_spec(cfg, self.model)
        self.probe_spec = OptimizerSpec(
            "adam", cfg.probe.step_size * float(np.abs(probe).max())
        )
        self.probe_state = ParameterState.start(probe, self.probe_spec)
        group_size = min(cfg.tile_group_size, cfg.minibatch_size)
        self.groups = plan_tile_groups(self.positions, self.meas.det_shape, group_size)
        results.check_output(Path(cfg.output), overwrite=cfg.overwrite)
        self.obj = create_object_store(
            str(cfg.output),
            shape=(*shape, cfg.model.slices),
            chunks=cfg.object.chunks_px,
            representation=cfg.object.representation.value,
            state_names=self.spec.state_names,
            overwrite=cfg.overwrite,
        )
        self._write_metadata()
        self.loss: list[float] = []
        self.step = 0

    def _write_metadata(self) -> None:
        path = str(self.cfg.output)
        spacing = self.cfg.model.slice_spacing_m or self.meas.pixel_size_m
        results.write_coordinates(
            path, shape=self.obj.shape[:3], pixel_size_m=self.meas.pixel_size_m,
            slice_spacing_m=spacing,
        )
        results.write_attrs(path, {
            "config": self.cfg.model_dump(mode="json"),
            "versions": results.versions(),
            "representation": self.cfg.object.representation.value,
            "energy_ev": self.meas.energy_ev,
            "pixel_size_m": self.meas.pixel_size_m,
            "position_offset_px": self.offset.tolist(),
            "data_path": str(self.meas.source.path),
        })
        results.write_progress(path, probe=self.probe, loss=[])

    def refine_probe(self, epoch: int) -> bool:
        return self.cfg.probe.refine and epoch >= self.cfg.probe.refine_start_epoch

    @property
    def probe(self) -> np.ndarray:
        """Current probe ``[M, py, px]`` complex64."""
        return self.probe_state.value

    def run_epoch(self, epoch: int, scheduler) -> float:
        """One pass over every tile; returns the tile-weighted mean loss.

        Every minibatch's graph is handed to the scheduler as soon as it is built (persisted,
        not waited for): each one depends only on the block updates and probe step it needs
        from the one before. The driver waits once, at the end of the epoch.
        """
        rng = np.random.default_rng([self.cfg.seed, epoch])
        batches = epoch_minibatches(self.groups, self.cfg.minibatch_size, rng)
        want_probe = self.refine_probe(epoch)
        model = delayed(self.model, name=f"model-e{epoch}", traverse=False)
        probe_state = delayed(self.probe_state, name=f"probestate-e{epoch}", traverse=False)
        last_update: dict = {}
        losses, weights = [], []
        for b, groups in enumerate(batches):
            self.step += 1
            graph = build_minibatch(
                groups,
                obj=self.obj,
                source=self.meas.source,
                probe_state=probe_state,
                model=model,
                spec=self.spec,
                probe_spec=self.probe_spec,
                step=self.step,
                want_probe_grad=want_probe,
                last_update=last_update,
                tag=f"e{epoch}-b{b}",
            )
            sums, probe_state, *updates = _persist(
                scheduler, graph.sums, graph.probe_state, *graph.updates.values()
            )
            last_update.update(zip(graph.updates, updates))
            losses.append(sums)
            weights.append(sum(len(g.tiles) for g in groups))
        sums, self.probe_state, _ = dask.compute(
            losses, probe_state, list(last_update.values()), scheduler=scheduler
        )
        return float(np.dot([s[0] for s in sums], weights) / np.sum(weights))

    def run(self, client: Client | None = None, *, callback: Callable | None = None) -> RunResult:
        """Run every epoch; ``callback(epoch, loss, reconstruction)`` after each."""
        path = str(self.cfg.output)
        with dask_client(self.cfg.cluster, client) as c:
            scheduler = c if c is not None else "sync"
            bar = tqdm(range(self.cfg.epochs), desc="epochs", disable=not self.cfg.progress)
            for epoch in bar:
                loss = self.run_epoch(epoch, scheduler)
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"loss became {loss} in epoch {epoch}; lower optimizer.step_size"
                    )
                self.loss.append(loss)
                results.write_progress(path, probe=self.probe, loss=self.loss)
                bar.set_postfix(loss=f"{loss:.4g}")
                if callback is not None:
                    callback(epoch, loss, self)
        results.finalize(path)
        return RunResult(Path(path), self.loss, self.probe, self.obj, self.offset)


def _persist(scheduler, *collections):
    """Start computing ``collections`` without waiting (a Client), or compute them now (sync)."""
    if isinstance(scheduler, Client):
        return scheduler.persist(list(collections))
    return dask.persist(*collections, scheduler=scheduler)


def run(cfg: RunConfig, client: Client | None = None, **kwargs) -> RunResult:
    """Build a :class:`Reconstruction` from ``cfg`` and run it."""
    return Reconstruction(cfg).run(client, **kwargs)


__all__ = ["Reconstruction", "RunResult", "run", "MeasurementError"]
