"""Commit points of a run: everything the driver needs to continue exactly where it was.

A checkpoint is one ``.npz`` file in the run store, written to a temporary file, flushed to disk
and renamed over the previous one, so a driver killed at any moment leaves either the old or
the new checkpoint, never a torn one. It names, per block, the slot holding the committed state
(see :mod:`adorym_dask.storage.object_store`), so together with those slots it is a complete,
consistent state of the run. The minibatch order of an epoch is a pure function of the seed and
the epoch number, so the position in the epoch (``batch``) is the whole RNG state.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from adorym_dask.optimizers import ParameterState
from adorym_dask.storage import location
from adorym_dask.storage.durability import fsync_dir
from adorym_dask.storage.object_store import StoreError

FILE = "_checkpoint.npz"
FORMAT = 2


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the reason and the fix."""


@dataclass
class Checkpoint:
    """The driver's state at a commit point.

    Attributes
    ----------
    config : dict
        The run's configuration (JSON form).
    epoch, batch : int
        The next minibatch to run is number ``batch`` of epoch ``epoch``.
    step : int
        Minibatches run so far.
    loss : list of float
        Loss of every finished epoch.
    epoch_loss : (float, int)
        Tile-weighted loss sum and tile count of the current epoch so far.
    params : dict of ParameterState
        Every model parameter (probe, positions, ...) with its optimizer arrays and step counts.
    initial : dict of ndarray
        Every parameter's start value (positions in the engine's frame).
    slots : ndarray
        ``[n_by, n_bx]`` int8: the slot holding each block's committed state.
    block_steps : ndarray
        ``[n_by, n_bx]`` int64: optimizer steps each block has taken.
    tile_loss : ndarray or None
        ``[n_angles, n_tiles]`` each tile's latest loss (NaN before its first), which chooses
        the tiles a position search looks at.
    start_loss : float or None
        Loss of the run's first minibatch, before any update (the divergence check's scale).
    epoch_seconds, epoch_elapsed, setup_seconds
        The run's clock (:class:`adorym_dask.timing.RunClock`): seconds of each finished epoch,
        of the current epoch so far, and of setup.
    boxes : ndarray or None
        ``[n_groups, 4]`` int64 object boxes ``(y0, x0, h, w)`` of the plan's tile groups (the
        groups' members follow from the start positions; a box may have been regrown).
    """

    config: dict
    epoch: int
    batch: int
    step: int
    loss: list[float]
    epoch_loss: tuple[float, int]
    params: dict[str, ParameterState]
    initial: dict[str, np.ndarray]
    slots: np.ndarray
    block_steps: np.ndarray
    boxes: np.ndarray | None = None
    start_loss: float | None = None
    tile_loss: np.ndarray | None = None
    epoch_seconds: list[float] = field(default_factory=list)
    epoch_elapsed: float = 0.0
    setup_seconds: float = 0.0


def checkpoint_path(run: str | Path) -> Path:
    return Path(run) / FILE


def _arrays(ck: Checkpoint) -> tuple[dict, dict[str, np.ndarray]]:
    meta = {
        "format": FORMAT, "config": ck.config, "epoch": ck.epoch, "batch": ck.batch,
        "step": ck.step, "loss": ck.loss, "epoch_loss": list(ck.epoch_loss),
        "params": {n: sorted(ps.state) for n, ps in ck.params.items()},
        "start_loss": ck.start_loss, "epoch_seconds": list(ck.epoch_seconds),
        "epoch_elapsed": ck.epoch_elapsed, "setup_seconds": ck.setup_seconds,
    }
    arrays = {"slots": ck.slots, "block_steps": ck.block_steps}
    if ck.boxes is not None:
        arrays["boxes"] = ck.boxes
    if ck.tile_loss is not None:
        arrays["tile_loss"] = ck.tile_loss
    for name, ps in ck.params.items():
        arrays[f"param.{name}.value"] = ps.value
        arrays[f"param.{name}.step"] = ps.step
        arrays[f"initial.{name}"] = ck.initial[name]
        for key, arr in ps.state.items():
            arrays[f"param.{name}.state.{key}"] = arr
    return meta, arrays


def save_checkpoint(run: str | Path, ck: Checkpoint) -> None:
    """Atomically replace the run's checkpoint with ``ck``."""
    meta, arrays = _arrays(ck)
    if location.is_url(str(run)):
        buf = io.BytesIO()
        np.savez(buf, meta=np.array(json.dumps(meta)), **arrays)
        location.put_bytes(str(run), FILE, buf.getvalue())
        return
    path = checkpoint_path(run)
    tmp = path.with_name(f".{FILE}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, meta=np.array(json.dumps(meta)), **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise StoreError(
            err.errno, f"cannot write checkpoint {path}: {err.strerror}; the previous checkpoint "
            "is intact: fix the cause (e.g. free disk space) and continue with --resume"
        ) from None


def load_checkpoint(run: str | Path) -> Checkpoint:
    """Read the run's checkpoint, with a clear error if it is missing or damaged."""
    path = f"{run}/{FILE}" if location.is_url(str(run)) else checkpoint_path(run)
    data = location.get_bytes(str(run), FILE) if location.is_url(str(run)) else (
        path.read_bytes() if path.is_file() else None
    )
    if data is None:
        raise CheckpointError(
            f"{run} has no checkpoint ({FILE}); it was not made by adorym-dask or was killed "
            "before its first commit: run again without --resume"
        )
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != FORMAT:
                raise CheckpointError(
                    f"checkpoint {path} has format {meta.get('format')}, not {FORMAT}: it was "
                    "written by another version of adorym-dask; start a new run"
                )
            params = {
                name: ParameterState(
                    z[f"param.{name}.value"],
                    {k: z[f"param.{name}.state.{k}"] for k in keys},
                    z[f"param.{name}.step"],
                )
                for name, keys in meta["params"].items()
            }
            ck = Checkpoint(
                config=meta["config"], epoch=meta["epoch"], batch=meta["batch"],
                step=meta["step"], loss=list(meta["loss"]), epoch_loss=tuple(meta["epoch_loss"]),
                params=params, initial={n: z[f"initial.{n}"] for n in params},
                slots=z["slots"], block_steps=z["block_steps"],
                boxes=z["boxes"] if "boxes" in z else None,
                start_loss=meta.get("start_loss"),
                tile_loss=z["tile_loss"] if "tile_loss" in z else None,
                epoch_seconds=list(meta.get("epoch_seconds", [])),
                epoch_elapsed=float(meta.get("epoch_elapsed", 0.0)),
                setup_seconds=float(meta.get("setup_seconds", 0.0)),
            )
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(
            f"checkpoint {path} is damaged ({err}); it cannot be resumed: start a new run"
        ) from None
    return ck


# Keys that may change between a run and its resumption: how and how long, not what.
RESUMABLE_CHANGES = {"epochs", "cluster", "dashboard", "progress", "overwrite"}


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, ignoring :data:`RESUMABLE_CHANGES` at the top level."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        if not prefix and key in RESUMABLE_CHANGES:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


def check_resumable(ck: Checkpoint, new: dict, run: str, *, allow_config_change: bool) -> None:
    """Raise :class:`CheckpointError` unless a run with config ``new`` (JSON form) may continue
    from ``ck``: science keys unchanged (or ``allow_config_change``), and in any case the same
    object optimizer (its state is stored with every block), and the same minibatching in the
    middle of an epoch (otherwise tiles would be skipped or repeated).

    A run records the object optimizer it used in ``optimizer.name``; a checkpoint written
    before the name was recorded (``None``) used Adam, every model's default then."""
    if ck.config["optimizer"].get("name") is None:
        ck = replace(ck, config={**ck.config, "optimizer": {**ck.config["optimizer"],
                                                            "name": "adam"}})
    diffs = config_differences(ck.config, new)
    if diffs and not allow_config_change:
        raise CheckpointError(
            f"the config differs from the one {run} was run with: " + "; ".join(diffs)
            + ". Restore those values, or resume anyway with --allow-config-change"
        )
    old_opt = ck.config["optimizer"]["name"]
    if old_opt != new["optimizer"]["name"]:
        raise CheckpointError(
            f"optimizer.name: {old_opt} -> {new['optimizer']['name']}: the object's optimizer "
            "state is stored with every block and cannot change in a resumed run; resume with "
            f"optimizer.name: {old_opt}, or start a new run"
        )
    if ck.batch > 0:
        for key in ("minibatch_size", "tile_group_size", "seed"):
            if ck.config[key] != new[key]:
                raise CheckpointError(
                    f"{key}: {ck.config[key]} -> {new[key]} in the middle of epoch {ck.epoch} "
                    f"(after minibatch {ck.batch}) would skip or repeat tiles; resume with "
                    f"{key}: {ck.config[key]} (it may change at the start of an epoch)"
                )
