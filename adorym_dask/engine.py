"""The reconstruction loop: epochs of minibatches, each a Dask graph (see ``graphs/``).

The driver holds only small things: the model's parameters (probe, positions, slice
spacings, ...) with their optimizer state, the loss, the plan, where each block's state is and
how many steps each block has taken. The object and its optimizer state live in the object
store and are read and written by the tasks. The same loop runs on a cluster and under the
synchronous scheduler: only the ``scheduler`` handed to Dask differs.

Each minibatch ends with a commit: once every update of the minibatch has finished (each has
put its bytes on stable storage, see :mod:`adorym_dask.storage.durability`) and the minibatch's
loss and parameters are finite, the driver records where each block's new state is and
(disk stores) writes a checkpoint. A run killed at any moment resumes from its last commit
(``--resume``) and ends with the same result as an uninterrupted one. A lost worker costs
nothing: Dask reruns its tasks, whose inputs were never overwritten (see
:mod:`adorym_dask.storage.object_store`); the memory store, whose blocks die with their worker,
goes back to its last checkpoint and replays. Every Dask key carries the run's token, so runs
sharing a scheduler never exchange results.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import dask
import numpy as np
from dask.delayed import delayed
from distributed import Client, wait
from distributed.client import futures_of
from tqdm.auto import tqdm

from adorym_dask.cluster import check_shared_paths, dask_client
from adorym_dask.config import ConfigError, OptimizerName, RunConfig, config_from_dict
from adorym_dask.graphs.minibatch import (
    build_minibatch,
    build_position_search,
    epoch_minibatches,
    plan_tile_groups,
)
from adorym_dask.graphs.tasks import TileGroup, box_holds, group_box, grow_box
from adorym_dask.layout import (
    load_measurements,
    object_layout,
    object_learning_rate,
    object_optimizer,
    object_rules,
)
from adorym_dask.refinement import (
    PositionBounds,
    apply_gradients,
    apply_search,
    group_rows,
    plan_refinements,
    search_offsets,
    shared_values,
    start_states,
    tiles_to_search,
)
from adorym_dask.registry import model_builder
from adorym_dask.storage import location, results
from adorym_dask.storage.results import RunResult
from adorym_dask.storage.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_resumable,
    load_checkpoint,
    save_checkpoint,
)
from adorym_dask.storage.measurements import MeasurementError
from adorym_dask.storage.object_store import (
    OBJECT,
    BlockRef,
    ObjectStore,
    StoreError,
    checkpoint_block,
    create_store,
    init_block,
    open_store,
)
from adorym_dask.storage.support import create_support, init_support_block, load_support_file
from adorym_dask.shrinkwrap import shrinkwrap
from adorym_dask.timing import RunClock

log = logging.getLogger(__name__)
MAX_RECOVERIES = 3
DIVERGENCE_FACTOR = 1000.0  # an epoch's loss this many times the start loss stops the run


class DivergenceError(RuntimeError):
    """The loss became NaN/inf or grew far above its start: the step sizes are too large."""


def _publish_block(store: ObjectStore, block: tuple[int, int], source,
                   preview: tuple[int, int, str] | None) -> tuple[int, int, np.ndarray] | None:
    """Publish a block into the run store's ``object``; with ``preview = (step, index, axis)``
    also return, from the same read, every ``step``-th pixel of its slice for the dashboard:
    the z slice ``index`` (axis ``"z"``) or the axial slice at row ``index`` (axis ``"y"``,
    volumes; ``(z, x)``), as the preview's row and column where it goes and its values
    ``[h', w', 2]`` (None for a block the slice misses)."""
    data = store.publish(block, source)
    if preview is None:
        return None
    step, index, axis = preview
    y0, x0, h, _ = store.block_box(block)
    dx = (-x0) % step
    if axis == "y":
        if not y0 <= index < y0 + h:
            return None
        part = data[index - y0, dx::step, ::step, :].transpose(1, 0, 2)  # (z, x, 2)
        return 0, (x0 + dx) // step, np.ascontiguousarray(part, np.float32)
    dy = (-y0) % step
    part = data[dy::step, dx::step, index, :]
    return (y0 + dy) // step, (x0 + dx) // step, np.ascontiguousarray(part, np.float32)


def _compute_with_bar(tasks: list, scheduler, *, desc: str, show: bool) -> list:
    """``dask.compute(*tasks)`` with a progress bar of finished tasks when ``show``."""
    if not show:
        return list(dask.compute(*tasks, scheduler=scheduler))
    bar = tqdm(total=len(tasks), desc=desc, leave=False)
    try:
        if isinstance(scheduler, Client):
            from distributed import as_completed

            futures = scheduler.compute(tasks)
            for _ in as_completed(futures):
                bar.update(1)
            return scheduler.gather(futures)
        out = []
        for task in tasks:
            out.append(dask.compute(task, scheduler=scheduler)[0])
            bar.update(1)
        return out
    finally:
        bar.close()


PUBLISH_BAR_BLOCKS = 16  # publishing more blocks than this shows a progress bar


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


def _stored_optimizer_name(cfg: RunConfig) -> str | None:
    """The object optimizer the run stored at ``cfg.output`` used: an unnamed optimizer in a
    resumed run means the run's own, whatever the default or a new ``step_size`` would choose
    for a new run. Adam where the checkpoint names none (written before runs recorded it, when
    Adam was every model's default); None where there is no readable checkpoint (the resume
    reports that itself)."""
    try:
        return load_checkpoint(str(cfg.output)).config["optimizer"].get("name") or "adam"
    except (CheckpointError, OSError, KeyError):
        return None


def _with_optimizer_name(cfg: RunConfig, name: str | None) -> RunConfig:
    """``cfg`` with ``optimizer.name`` set to ``name`` where it names none (a copy)."""
    if name is None or cfg.optimizer.name is not None:
        return cfg
    named = cfg.optimizer.model_copy(update={"name": OptimizerName(name)})
    return cfg.model_copy(update={"optimizer": named})


class Reconstruction:
    """State of one run on the driver: the plan, the parameters, where each block is, the history.

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
        self.clock = RunClock()  # reading the data and the start values count as setup
        self.cfg = cfg
        self.meas = load_measurements(cfg)
        self.model = model_builder(cfg.model.kind)(cfg, self.meas)
        view = getattr(self.model, "engine_measurements", None)
        if view is not None:  # e.g. holograms cut into tiles
            self.meas = view(self.meas)
        # pixels a model reads beyond each tile (holography's Fresnel halo)
        self.reach = int(getattr(self.model, "reach_px", 0))
        self.specs = self.model.parameter_specs()
        if resume and cfg.optimizer.name is None:
            cfg = _with_optimizer_name(cfg, _stored_optimizer_name(cfg))
        self.spec = object_optimizer(cfg, self.model)
        # the run records the optimizer it uses: its state is in every block
        self.cfg = cfg = _with_optimizer_name(cfg, self.spec.name)
        self.vacuum_margin = bool(getattr(self.model, "vacuum_margin", False))
        kdz = 2 * math.pi / self.model.wavelength_m * self.model.slice_thickness_m
        self.rules = object_rules(cfg, vacuum_margin=self.vacuum_margin,
                                  n_z=int(getattr(self.model, "object_shape_px", (0, 0, 0))[2])
                                  or None, delta_per_rad=1.0 / kdz)
        self.path = location.absolute(cfg.output)  # workers may run in another folder
        self.token = uuid.uuid4().hex[:12]  # part of every Dask key: runs never share keys
        self.sources: dict | None = None
        self.n_checkpoints = 0
        self.recoveries = 0  # part of every task key: a replay must not reuse erred keys
        self._cg_alpha: float | None = None  # conjugate gradient's last step (driver state)
        self.dashboard = _dashboard_publisher(None, self)  # a no-op until run() has a client
        self.dashboard_on = False
        ck = self._check_resume(allow_config_change) if resume else None
        initial = ck.initial if ck is not None else self._initial_values()
        self.refinements = plan_refinements(cfg, self.specs, initial)
        moves = self.refinements.get("positions")
        self.max_shift = moves.options["max_shift_px"] if moves is not None else 0.0
        volume = getattr(self.model, "object_shape_px", None)
        if volume is not None:  # a volume of the model's own (tomography): tiles are its rows
            shape, self.offset = tuple(volume[:2]), np.zeros(2)
            self.obj_shape = tuple(volume)
        else:
            shape, self.offset = object_layout(cfg, self.meas,
                                               movement_px=self.max_shift + self.reach)
            depth = getattr(self.model, "volume_depth", None)  # a volume of whole rows
            self.obj_shape = (*shape, depth(shape[1]) if depth else getattr(cfg.model, "slices", 1))
        if hasattr(self.model, "with_volume"):  # a model that needs the volume's extent
            self.model = self.model.with_volume(self.obj_shape)
            self.reach = int(getattr(self.model, "reach_px", 0))
            self.spec = object_optimizer(self.cfg, self.model)  # its steps may scale with it
        # models that rotate the volume about y read and update whole rows (y-slabs)
        self.full_rows = bool(getattr(self.model, "full_rows", False)) or volume is not None
        if ck is None:
            initial["positions"] = initial["positions"] + self.offset
        self.initial = initial
        self.halo = int(math.ceil(self.max_shift)) + self.reach
        det = np.asarray(self.meas.det_shape, np.float64)
        self.bounds = PositionBounds(
            initial["positions"], self.max_shift, np.zeros(2), np.asarray(shape) - det,
            hold_affine=bool(moves.options["hold_affine"]) if moves is not None else False,
        )
        group_size = min(cfg.tile_group_size, cfg.minibatch_size)
        self.groups = [self._rows(g) for g in plan_tile_groups(
            initial["positions"], self.meas.det_shape, group_size, halo=self.halo, shape=shape
        )]
        if ck is not None:
            self._open_existing(ck)
        else:
            self._create_new()

    # -- set-up -----------------------------------------------------------------------------------
    def _initial_values(self) -> dict[str, np.ndarray]:
        values = self.model.initial_parameters(self.cfg, self.meas)
        if set(values) != set(self.specs) or "positions" not in self.specs:
            raise ConfigError(
                f"model {self.cfg.model.kind!r} declares {sorted(self.specs)} but gives start "
                f"values for {sorted(values)}: a model gives one for every parameter it "
                "declares, and declares 'positions' (the tiles' corners)"
            )
        return values

    def _create_new(self) -> None:
        cfg = self.cfg
        self.params = start_states(self.initial, self.specs, self.refinements)
        results.check_output(self.path, overwrite=cfg.overwrite)
        location.open_group(self.path, mode="w" if cfg.overwrite else "w-")
        self.store = self._make_store(create=True)
        self.epoch, self.batch, self.step = 0, 0, 0
        self.start_loss: float | None = None
        self.loss: list[float] = []
        self.epoch_loss = (0.0, 0)
        self.block_steps = np.zeros(self.store.geometry.n_blocks, np.int64)
        self.tile_loss = np.full(self.initial["positions"].shape[:2], np.nan)
        self._write_metadata()

    def _make_store(self, *, create: bool) -> ObjectStore:
        make = create_store if create else open_store
        return make(
            self.cfg.object.store.value, self.path, shape=self.obj_shape,
            chunks=self._chunks(),
            representation=self.cfg.object.representation.value,
            n_state=len(self.spec.state_names), token=self.store_token,
        )

    def _row_box(self, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """``box`` widened to whole rows when the model rotates the volume about y."""
        return (box[0], 0, box[2], self.obj_shape[1]) if self.full_rows else box

    def _rows(self, g: TileGroup) -> TileGroup:
        return TileGroup(g.index, g.angle, g.tiles, self._row_box(g.box))

    def _chunks(self) -> tuple[int, int]:
        """Block size ``(y, x)``: ``object.chunks``, or y-slabs of the whole width for a model
        that rotates its volume about y (a slab rotates on its own)."""
        cy, cx = self.cfg.object.chunks_px
        if self.full_rows:
            if cx < self.obj_shape[1]:
                log.info("object.chunks: %s rotates the volume about y, so blocks are y-slabs "
                         "of the whole width (%d, %d)", self.cfg.model.kind, cy, self.obj_shape[1])
            return cy, self.obj_shape[1]
        return cy, cx

    @property
    def store_token(self) -> str:
        """The token of the run store: this run's for a new one, the stored one on resume."""
        return getattr(self, "_store_token", self.token)

    def _check_resume(self, allow_config_change: bool) -> Checkpoint:
        """The stored run's last commit, if this config may continue it."""
        ck = load_checkpoint(self.path)
        check_resumable(ck, self.cfg.model_dump(mode="json"), self.path,
                        allow_config_change=allow_config_change)
        return ck

    def _open_existing(self, ck: Checkpoint) -> None:
        results.check_writable(self.path)
        self._store_token = location.open_group(self.path, mode="r").attrs.get("run_token", "")
        self.store = self._make_store(create=False)
        stored = location.open_array(self.path, OBJECT, mode="r").shape
        if tuple(stored) != self.store.shape:
            raise CheckpointError(
                f"{self.path} holds an object of shape {stored}, but this config gives "
                f"{self.store.shape}; resume with the config of the original run"
            )
        self._restore(ck)
        # earlier epochs without a time (a checkpoint from before times were kept): NaN
        known = list(ck.epoch_seconds)[-len(ck.loss):] if ck.loss else []
        seconds = [float("nan")] * (len(ck.loss) - len(known)) + known
        self.clock.resume_from(seconds, ck.epoch_elapsed, ck.setup_seconds)

    def _restore(self, ck: Checkpoint) -> None:
        self.epoch, self.batch, self.step = ck.epoch, ck.batch, ck.step
        self.loss, self.epoch_loss = list(ck.loss), tuple(ck.epoch_loss)
        self.start_loss = ck.start_loss
        self.params = {}
        for name, ps in ck.params.items():
            r = self.refinements.get(name)
            if r is not None and set(ps.state) - {"gmax"} != set(r.optimizer.state_names):
                log.warning("refine.%s: optimizer changed to %s; its state starts afresh",
                            name, r.optimizer.name)
                ps = ps.reset(r.optimizer)
            self.params[name] = ps
        self.block_steps = np.array(ck.block_steps)
        self.tile_loss = np.array(ck.tile_loss)
        if ck.boxes is not None and len(ck.boxes) == len(self.groups):
            # the plan's boxes as committed (a box regrown for a tile that moved stays grown)
            self.groups = [TileGroup(g.index, g.angle, g.tiles, tuple(int(v) for v in box))
                           for g, box in zip(self.groups, ck.boxes)]
        self.sources = (
            None if (ck.slots < 0).any()
            else {b: BlockRef(int(ck.slots[b])) for b in self.store.all_blocks()}
        )
        if not self.store.on_disk and self.sources is not None:
            # the next memory checkpoint must not overwrite the slot this one names
            self.n_checkpoints = 1 - int(ck.slots.flat[0])

    def _write_metadata(self) -> None:
        results.write_attrs(self.path, {
            "config": self.cfg.model_dump(mode="json"),
            "versions": results.versions(),
            "representation": self.cfg.object.representation.value,
            "store": self.cfg.object.store.value,
            "energy_ev": self.meas.energy_ev,
            "pixel_size_m": self.meas.pixel_size_m,
            "position_offset_px": self.offset.tolist(),
            "data_path": str(self.meas.source.path),
            "run_token": self.token,
            "refined": sorted(self.refinements),
            # a full-field model's measured field (the object beyond it is its margin)
            **({"field_box_px": self._field_box()} if self.reach else {}),
        })
        if self.rules is not None and self.rules.support:
            create_support(self.path, self.obj_shape, self.store.geometry.chunks)
        self._write_parameters()

    def _field_box(self) -> list[int]:
        """``[y0, x0, h, w]``: the box of every tile without the model's reach."""
        if hasattr(self.model, "interior_boxes"):
            boxes = np.asarray(self.model.interior_boxes(self.initial["positions"]))
        else:
            pos = np.floor(self.initial["positions"].reshape(-1, 2)).astype(int)
            boxes = np.c_[pos, np.broadcast_to(self.meas.det_shape, pos.shape)]
        lo, hi = boxes[:, :2].min(axis=0), (boxes[:, :2] + boxes[:, 2:]).max(axis=0)
        return [int(lo[0]), int(lo[1]), int(hi[0] - lo[0]), int(hi[1] - lo[1])]

    # -- parameters -------------------------------------------------------------------------------
    def values(self) -> dict[str, np.ndarray]:
        """Every parameter's current value (positions in the object's frame)."""
        return {name: ps.value for name, ps in self.params.items()}

    @property
    def probe(self) -> np.ndarray:
        """Current probe ``[M, py, px]`` complex64."""
        return self.params["probe"].value

    def _write_parameters(self) -> None:
        results.write_parameters(
            self.path, self.specs, self.values(), self.initial, refined=set(self.refinements),
            offset_px=self.offset,
        )
        spacings = self.params["slice_spacings"].value if "slice_spacings" in self.params else ()
        results.write_coordinates(
            self.path, shape=self.obj_shape, pixel_size_m=self.meas.pixel_size_m,
            slice_spacings_m=spacings,
        )

    # -- commits ----------------------------------------------------------------------------------
    def _slots(self) -> np.ndarray:
        slots = np.full(self.store.geometry.n_blocks, -1, np.int8)
        if self.sources is not None and self.store.on_disk:
            for block, src in self.sources.items():
                slots[block] = src.slot
        return slots

    def commit(self, slots: np.ndarray | None = None) -> None:
        """Write the checkpoint naming the current (finished) state of every block."""
        epoch_seconds, epoch_elapsed, setup_seconds = self.clock.snapshot()
        save_checkpoint(self.path, Checkpoint(
            config=self.cfg.model_dump(mode="json"), epoch=self.epoch, batch=self.batch,
            step=self.step, loss=self.loss, epoch_loss=self.epoch_loss, params=self.params,
            initial=self.initial, slots=self._slots() if slots is None else slots,
            block_steps=self.block_steps, start_loss=self.start_loss, tile_loss=self.tile_loss,
            boxes=np.asarray([g.box for g in self.groups], np.int64),
            epoch_seconds=epoch_seconds, epoch_elapsed=epoch_elapsed, setup_seconds=setup_seconds,
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
    def _initialize_blocks(self, scheduler) -> None:
        t = self.token
        tasks = {b: delayed(init_block, pure=True)(self.store, b, dask_key_name=f"init-{t}-{b[0]}-{b[1]}")
                 for b in self.store.all_blocks()}
        self.sources = self._settle(scheduler, dict(zip(tasks, _persist(scheduler, *tasks.values()))))
        if self.rules is not None and self.rules.support:
            self._initialize_support(scheduler)
        self.commit()  # memory store: slots -1, "start values", so even epoch 0 can resume

    def _initialize_support(self, scheduler) -> None:
        npy = self.cfg.object.support_path
        if npy is not None:
            load_support_file(npy, self.obj_shape)  # clear error before any task runs
        inside = (self.model.interior_boxes(self.initial["positions"])
                  if self.vacuum_margin else None)
        tasks = [
            delayed(init_support_block, pure=False)(
                self.path, None if npy is None else location.absolute(npy), self.store.block_box(b),
                self.obj_shape[2], inside=inside,
                dask_key_name=f"support-{self.token}-{b[0]}-{b[1]}",
            )
            for b in self.store.all_blocks()
        ]
        dask.compute(*tasks, scheduler=scheduler)

    def _settle(self, scheduler, sources: dict) -> dict:
        """Wait for block sources: disk sources come back as values, memory ones stay futures."""
        if self.store.on_disk:
            return dict(zip(sources, dask.compute(*sources.values(), scheduler=scheduler)))
        if isinstance(scheduler, Client):
            wait(futures_of(list(sources.values())))
        return sources

    def _fit_boxes(self, groups: list[TileGroup]) -> list[TileGroup]:
        """Regrow the box of any group whose tiles moved beyond it (membership is unchanged,
        so no tile is skipped or repeated)."""
        pos = self.params["positions"].value
        out = []
        for g in groups:
            if not box_holds(g.box, pos[g.angle, g.tiles], self.meas.det_shape):
                box = self._row_box(grow_box(group_box(pos[g.angle, g.tiles], self.meas.det_shape),
                                             self.halo, self.obj_shape[:2]))
                log.info("tile group %d moved beyond its box; new box %s", g.index, box)
                g = TileGroup(g.index, g.angle, g.tiles, box)
                self.groups[g.index] = g
            out.append(g)
        return out

    def _search_due(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` starts with a position search (every ``search_every_epochs``
        epochs of position refinement, after the first)."""
        r = self.refinements.get("positions")
        if r is None or not r.active(epoch) or r.options.get("search_px", 0) < 1:
            return False
        every = int(r.options.get("search_every_epochs", 0))
        since = epoch - r.start_epoch
        return every > 0 and since > 0 and since % every == 0

    def _search_positions(self, epoch: int, scheduler) -> None:
        """Look for a better place for the tiles whose loss stands out (see
        :func:`~adorym_dask.graphs.tasks.position_search`), and move those that find one."""
        opts = self.refinements["positions"].options
        flagged = tiles_to_search(self.tile_loss, ratio=opts["search_loss_ratio"])
        if not flagged.any():
            return
        tag = f"{self.token}-e{epoch}-r{self.recoveries}"
        groups = self._fit_boxes([g for g in self.groups if flagged[g.angle, g.tiles].any()])
        tasks = build_position_search(
            groups, flagged, obj=self.store, sources=self.sources, source=self.meas.source,
            shared=delayed(shared_values(self.params, self.specs), name=f"sshared-{tag}",
                           traverse=False),
            own={g.index: group_rows(self.params, self.specs, g) for g in groups},
            model=self._model_delayed, offsets=search_offsets(opts["search_px"]),
            start=self.initial["positions"], max_shift_px=self.max_shift,
            tile_rows=frozenset(n for n, s in self.specs.items() if s.scope == "tile"), tag=tag,
        )
        found = dask.compute(*tasks, scheduler=scheduler)
        angles = [g.angle for g in groups]
        self.params["positions"], moved = apply_search(
            self.params["positions"], list(found), angles, bounds=self.bounds
        )
        log.info("epoch %d: position search on %d tiles moved %d", epoch, int(flagged.sum()), moved)

    def _footprints(self, groups: list[TileGroup]) -> dict[int, tuple[int, int, int, int]]:
        """The box each group's tiles cover now (inside its halo-widened box)."""
        pos = self.params["positions"].value
        return {g.index: self._row_box(grow_box(group_box(pos[g.angle, g.tiles],
                                                          self.meas.det_shape),
                                                self.reach, self.obj_shape[:2]))
                for g in groups}

    def active_refinements(self, epoch: int) -> dict[str, str]:
        """Parameters updated in ``epoch``, with their scopes."""
        return {n: r.spec.scope for n, r in self.refinements.items() if r.active(epoch)}

    def run_minibatch(self, groups, epoch: int, b: int, scheduler) -> None:
        """Build, run and commit one optimizer step."""
        tag = f"{self.token}-e{epoch}-b{b}-r{self.recoveries}"
        groups = self._fit_boxes(groups)
        n = sum(len(g.tiles) for g in groups)
        shared = shared_values(self.params, self.specs)
        graph = build_minibatch(
            groups,
            obj=self.store,
            sources=self.sources,
            source=self.meas.source,
            shared=delayed(shared, name=f"shared-{tag}", traverse=False),
            own={g.index: group_rows(self.params, self.specs, g) for g in groups},
            model=self._model_delayed,
            spec=object_learning_rate(self.spec, self.model, shared, n),
            block_steps=self.block_steps,
            scopes=self.active_refinements(epoch),
            curvature_for=self.curvature_users,
            rules=self.rules,
            tag=tag,
            footprints=self._footprints(groups),
        )
        if self.store.on_disk:  # every output is small: one round trip
            sums, *updates = dask.compute(graph.sums, *graph.updates.values(), scheduler=scheduler)
            new = dict(zip(graph.updates, updates))
        else:  # block states stay on the workers
            sums, *updates = _persist(scheduler, graph.sums, *graph.updates.values())
            (sums,) = dask.compute(sums, scheduler=scheduler)
            new = self._settle(scheduler, dict(zip(graph.updates, updates)))
        self._check_finite(sums.loss, epoch, b)
        if self.start_loss is None:
            self.start_loss = float(sums.loss)  # the first minibatch, before any update
        self._apply_step(sums, new, epoch, b, n)
        if self.store.on_disk:
            self.commit()

    def _apply_step(self, sums, new: dict, epoch: int, b: int, n: int) -> None:
        """Step the refined parameters from ``sums``, take the blocks' ``new`` sources and
        count the step (minibatch ``b`` of ``n`` tiles)."""
        params = apply_gradients(self.params, self.refinements, sums, bounds=self.bounds)
        if hasattr(self.model, "constrain_parameters"):
            params = self.model.constrain_parameters(params)
        for name, ps in params.items():
            if not np.all(np.isfinite(ps.value)):
                self._check_finite(float("nan"), epoch, b, what=f"parameter {name}")
        self.params = params
        for angle, tiles, losses in sums.tile_losses:
            self.tile_loss[angle, tiles] = losses
        self.sources = {**self.sources, **new}
        for block in new:
            self.block_steps[block] += 1
        self.step += 1
        self.batch = b + 1
        self.epoch_loss = (self.epoch_loss[0] + sums.loss * n, self.epoch_loss[1] + n)
        self.dashboard.minibatch(epoch=epoch, batch=b, loss=float(sums.loss))

    def run_cg_iteration(self, epoch: int, scheduler) -> None:
        """One conjugate-gradient step of the object over every tile (see
        :mod:`adorym_dask.graphs.cg`), the refined parameters stepped by their own optimizers
        from the same gradient pass; then commit."""
        from adorym_dask.graphs import cg

        tag = f"{self.token}-e{epoch}-cg-r{self.recoveries}"
        groups = self._fit_boxes(list(self.groups))
        n = sum(len(g.tiles) for g in groups)
        shared = shared_values(self.params, self.specs)
        own = {g.index: group_rows(self.params, self.specs, g) for g in groups}

        def graph(sources, name, scopes, block_task=None):
            return build_minibatch(
                groups, obj=self.store, sources=sources, source=self.meas.source,
                shared=delayed(shared, name=f"shared-{name}", traverse=False), own=own,
                model=self._model_delayed, spec=self.spec, block_steps=self.block_steps,
                scopes=scopes, curvature_for=self.curvature_users, rules=None, tag=name,
                footprints=self._footprints(groups), block_task=block_task,
            )

        first = graph(self.sources, tag, self.active_refinements(epoch), cg.block_gradient)
        sums, *items = _persist(scheduler, first.sums, *first.updates.values())
        blocks = list(first.updates)
        (sums,) = dask.compute(sums, scheduler=scheduler)
        self._check_finite(sums.loss, epoch, 0)
        if self.start_loss is None:
            self.start_loss = float(sums.loss)
        parts = dask.compute(*[delayed(cg.dots_of)(it) for it in items], scheduler=scheduler)
        dots = np.sum(parts, axis=0)
        beta, slope = cg.direction(dots, first=self._cg_alpha is None)
        alpha0 = self._cg_alpha
        if alpha0 is None:  # first trial: an RMS step of optimizer.step_size per value
            size = float(np.prod(self.obj_shape)) * 2
            alpha0 = self.spec.step_size * math.sqrt(size) / max(cg.direction_norm(dots, beta), 1e-30)
        grads = {b: delayed(cg.gradient_of)(it) for b, it in zip(blocks, items)}

        def step(alpha, constrain, name):
            tasks = [delayed(cg.block_step, pure=False)(
                self.store, b, self.sources[b], grads[b], beta=beta, alpha=alpha,
                rules=self.rules, constrain=constrain, dask_key_name=f"{name}-{b[0]}-{b[1]}")
                for b in blocks]
            return dict(zip(blocks, dask.compute(*tasks, scheduler=scheduler)))

        trial = step(alpha0, False, f"cgtrial-{tag}")
        (f1,) = dask.compute(graph({**self.sources, **trial}, f"{tag}-ls", {}).sums,
                             scheduler=scheduler)
        alpha = cg.line_minimum(float(sums.loss), slope, alpha0, float(f1.loss))
        log.info("epoch %d: cg beta %.3g, trial step %.3g (loss %.5g -> %.5g), step %.3g",
                 epoch, beta, alpha0, sums.loss, f1.loss, alpha)
        new = step(alpha, True, f"cgstep-{tag}")
        self._cg_alpha = alpha
        self._apply_step(sums, new, epoch, 0, n)
        self.commit()

    @property
    def curvature_users(self) -> frozenset[str]:
        """Refined parameters whose step uses the model's curvature estimate (not Adam)."""
        return frozenset(n for n, r in self.refinements.items() if r.optimizer.name != "adam")

    def _step_sizes(self) -> str:
        steps = [f"optimizer.step_size (now {self.spec.step_size:.3g})"]
        steps += [f"refine.{n}.step_size (now {np.max(r.optimizer.step_size):.3g} {r.spec.unit})"
                  for n, r in self.refinements.items()]
        return " or ".join(steps)

    def _check_finite(self, loss: float, epoch: int, b: int, *, what: str = "the loss") -> None:
        """Stop before committing a poisoned state."""
        if math.isfinite(loss):
            return
        raise DivergenceError(
            f"{what} became {loss} in epoch {epoch}, minibatch {b}: the step is too large. "
            f"Nothing of it was committed: lower {self._step_sizes()} and start again, or "
            "continue from the last commit with --resume --allow-config-change --set "
            "optimizer.step_size=<smaller>"
        )

    def _end_epoch(self, scheduler) -> float:
        loss = self.epoch_loss[0] / max(self.epoch_loss[1], 1)
        self._check_finite(loss, self.epoch, self.batch)
        if self.start_loss is not None and loss > DIVERGENCE_FACTOR * self.start_loss:
            raise DivergenceError(
                f"the loss of epoch {self.epoch} ({loss:.4g}) is over {DIVERGENCE_FACTOR:g} times "
                f"the loss at the start ({self.start_loss:.4g}): the reconstruction diverges. "
                f"Lower {self._step_sizes()} and start again"
            )
        self.loss.append(loss)
        self._log_small_parameters(loss)
        self.dashboard.epoch(epoch=self.epoch, loss=loss)
        self.epoch += 1
        self.batch, self.epoch_loss = 0, (0.0, 0)
        sw = self.cfg.object.shrinkwrap
        if sw is not None and self.epoch > sw.start_epoch and (self.epoch - sw.start_epoch) % sw.every_epochs == 0:
            shrinkwrap(self.store, self.sources, self.cfg, scheduler, tag=f"{self.token}-e{self.epoch}")
        self.clock.end_epoch()  # its publish and commit are added to it below
        every = self.cfg.publish_every_epochs
        if every and self.epoch % every == 0:
            self.publish(scheduler)
        if self.store.on_disk:
            self.commit()
        else:
            self._checkpoint_memory_blocks(scheduler)
        self.clock.extend_last()
        self._show_on_dashboard()
        return loss

    def _preview_plan(self) -> tuple[int, int, str] | None:
        """``(step, index, axis)`` of the object slice the dashboard shows (None when off):
        a z slice, or for volumes that rotate (tomography) the axial slice at a row."""
        if not self.dashboard_on:
            return None
        opts = self.cfg.dashboard
        n_y, n_x, n_z = self.obj_shape[:3]
        axis = "y" if self.full_rows else "z"
        n = n_y if axis == "y" else n_z
        index = n // 2 if opts.slice_index is None else min(max(opts.slice_index, 0), n - 1)
        side = max(n_x, n_z) if axis == "y" else max(n_y, n_x)
        return max(1, math.ceil(side / opts.max_px)), index, axis

    def _show_object(self, parts: list, step: int, index: int, axis: str) -> None:
        """Assemble the blocks' previews (from :func:`_publish_block`) and send them."""
        n_y, n_x, n_z = self.obj_shape[:3]
        rows = n_z if axis == "y" else n_y
        out = np.zeros((-(-rows // step), -(-n_x // step), 2), np.float32)
        for part in parts:
            if part is not None:
                r, c, data = part
                out[r : r + data.shape[0], c : c + data.shape[1]] = data
        where = f"row {index}, z down, x across" if axis == "y" else None
        try:
            self.dashboard.object_slice(out, representation=self.cfg.object.representation.value,
                                        slice_index=index, where=where)
        except Exception as err:  # the page must never stop a run
            self._dashboard_failed(err)

    def _dashboard_failed(self, err: Exception) -> None:
        log.warning("dashboard page: cannot show this run any more (%s: %s); the run goes on",
                    type(err).__name__, err)
        self.dashboard_on = False

    def _show_on_dashboard(self) -> None:
        """Send the page the epoch's probe, positions and refined small parameters (the object
        slice goes with each publish, reduced on the workers); small arrays only."""
        if not self.dashboard_on:
            return
        try:
            if "probe" in self.params:
                self.dashboard.probe(np.asarray(self.params["probe"].value))
            pos = self.params.get("positions")
            if pos is not None and ("positions" in self.refinements
                                    or np.ptp(np.asarray(pos.value)[0], axis=0).max() > 0):
                self.dashboard.positions(initial=np.asarray(self.initial["positions"])[0],
                                         current=np.asarray(self.params["positions"].value)[0])
            small = {}
            for name, r in self.refinements.items():
                value = np.asarray(self.params[name].value)
                if r.spec.scope == "global" and value.size <= 64 and not np.iscomplexobj(value):
                    small[r.spec.output] = value
            if small:
                self.dashboard.parameters(small)
        except Exception as err:  # the page must never stop a run
            self._dashboard_failed(err)

    def _log_small_parameters(self, loss: float) -> None:
        """Log the epoch's loss and every refined global parameter of a few values
        (distances, affine maps, kappa, slice spacings): the refinement as it goes."""
        parts = [f"loss {loss:.5g}"]
        for name, r in self.refinements.items():
            value = self.params[name].value
            if r.spec.scope == "global" and np.size(value) <= 64 and not np.iscomplexobj(value):
                shown = np.array2string(np.asarray(value), precision=6, separator=", ",
                                        max_line_width=10_000).replace("\n", "")
                parts.append(f"{r.spec.output} {shown}")
        log.info("epoch %d: %s", self.epoch, "; ".join(parts))

    def publish(self, scheduler) -> None:
        """Copy every block's committed object into the run store's ``object`` array, and the
        parameters and loss history beside it."""
        preview = self._preview_plan()
        tasks = [delayed(_publish_block, pure=False)(self.store, b, src, preview)
                 for b, src in self.sources.items()]
        parts = _compute_with_bar(tasks, scheduler, desc="publishing the object",
                                  show=self.cfg.progress and len(tasks) > PUBLISH_BAR_BLOCKS)
        if preview is not None:
            self._show_object(parts, *preview)
        if "kappa" in self.params:  # the stored channel 1 is beta = kappa * delta
            results.fill_beta_from_kappa(self.path, float(self.params["kappa"].value))
        try:
            self._write_parameters()
            results.write_history(self.path, self.loss, self.clock.epoch_seconds)
        except StoreError:
            raise
        except OSError as err:
            raise StoreError(
                f"run store {self.path}: cannot publish the parameters and loss history: "
                f"{err.strerror or err}. The last commit is intact; fix the cause (e.g. free "
                "disk space) and continue with --resume"
            ) from None

    def _recover(self, err: BaseException, attempt: int) -> None:
        if attempt > MAX_RECOVERIES:
            raise err
        log.warning("lost work on the cluster (%s); continuing from the last commit", str(err))
        self.recoveries += 1
        self._restore(load_checkpoint(self.path))

    def run(self, client: Client | None = None, *, callback: Callable | None = None) -> RunResult:
        """Run (or continue) every epoch; ``callback(epoch, loss, reconstruction)`` after each."""
        starting = time.perf_counter()
        with dask_client(self.cfg.cluster, client) as c:
            if c is not None:
                support = self.cfg.object.support_path
                check_shared_paths(
                    c, read=[str(self.meas.source.path)]
                    + ([location.absolute(support)] if support else []),
                    write=[self.path],
                )
            self.clock.cluster_started(time.perf_counter() - starting)
            scheduler = c if c is not None else "sync"
            self.dashboard = _dashboard_publisher(c, self)
            self.dashboard_on = c is not None and self.cfg.dashboard.enabled
            for i, done in enumerate(self.loss):  # a resumed run's earlier epochs
                self.dashboard.epoch(epoch=i, loss=done)
            bar = tqdm(total=self.cfg.epochs, initial=self.epoch, desc="epochs",
                       disable=not self.cfg.progress)
            attempt = 0
            try:
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
                results.write_setup_seconds(self.path, self.clock.snapshot()[2])
            except KeyboardInterrupt:
                self.dashboard.finished(status="interrupted")
                raise
            except BaseException:
                self.dashboard.finished(status="failed")
                raise
            self.dashboard.finished()
        results.finalize(self.path)
        out = self.path if location.is_url(self.path) else Path(self.path)
        return RunResult(out, self.loss, self.values(), self.offset)

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
        self._model_delayed = delayed(
            self.model, name=f"model-{self.token}-e{epoch}-r{self.recoveries}", traverse=False
        )
        rng = np.random.default_rng([self.cfg.seed, epoch])
        batches = epoch_minibatches(self.groups, self.cfg.minibatch_size, rng,
                                    mix_angles=bool(getattr(self.model, "mix_angles", False)))
        self.clock.start_epoch()
        if self.batch == 0 and self._search_due(epoch):
            self._search_positions(epoch, scheduler)
        if self.spec.name == "cg":  # one step over every tile
            if self.batch == 0:
                self.run_cg_iteration(epoch, scheduler)
            return self._end_epoch(scheduler)
        for b in range(self.batch, len(batches)):
            self.run_minibatch(batches[b], epoch, b, scheduler)
        return self._end_epoch(scheduler)


def _dashboard_publisher(client: Client | None, rec: Reconstruction):
    """The run's sender to the dashboard page (a no-op without a client or when disabled)."""
    from adorym_dask.dashboard.publisher import DashboardPublisher

    on = client is not None and rec.cfg.dashboard.enabled
    return DashboardPublisher(client if on else None, run_id=rec.token,
                              model_kind=rec.cfg.model.kind, epochs=rec.cfg.epochs,
                              max_px=rec.cfg.dashboard.max_px)


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


__all__ = [
    "Reconstruction", "RunResult", "run", "MeasurementError", "DivergenceError",
    "config_from_dict",
]
