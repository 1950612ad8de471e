"""Out of core for real: a reconstruction whose object store is 4x each worker's memory limit.

Sizes (measured on a 2-core x86-64 machine, torch 2.13 CPU, distributed 2026.8, Python 3.11).
A worker process has imported torch (the ``TorchThreads`` plugin does so on start): its peak RSS
(``VmHWM``) is 264 MiB after a first trivial task and 317-320 MiB after a first gradient task
(torch's autograd/FFT working set, h5py and zarr), so a 64 MiB worker is impossible. The test
takes as baseline the larger worker ``VmHWM`` after a tiny warm-up reconstruction. With Dask's
default thresholds (spill at 70 %, pause at 80 %, restart at 95 % of the limit) the peak must
stay under 70 % of the limit, or the memory monitor starts spilling task results: the smallest
honest limit is 576 MiB (spill at 403 MiB; 512 MiB would leave ~12 MiB). The object is then
18432 x 16384 pixels x 1 slice x 2 float32 channels = 2.25 GiB = 4x each worker's limit (2x both
workers together), in 36 x 32 blocks of 512 x 512 (2 MiB each). The measured peak during the
run was 345-351 MiB, 27-35 MiB (~16 blocks) above the warm baseline. On disk the store is
2 slots x 2.25 GiB (``gd`` keeps no optimizer arrays) plus the published 2.25 GiB object, under
``tmp_path``.

The scan is sparse: one 64 x 64 tile at the centre of every block (1152 tiles; written with
``write_measurements`` from a known phase object), so one epoch reads and writes every block,
and the final publish copies every block into the run's ``object`` array. A row holds 32 tiles,
a multiple of ``tile_group_size``, so no tile group straddles two rows: such a group's bounding
box spanned the object's whole width before plan_tile_groups closed groups at gaps, and a task over it needed
650-830 MiB (measured with 36 tiles a row), which paused and then restarted the workers.
Measured 28-57 s on 2 cores, depending on other load (the reconstruction itself 20-40 s).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from adorym_dask.cluster import environ_restored, worker_memory
import torch

from adorym_dask.config import config_from_dict
from adorym_dask.engine import run
from adorym_dask.models.ptychography import farfield_intensities
from adorym_dask.simulate import default_probe
from adorym_dask.storage.checkpoint import load_checkpoint
from adorym_dask.storage.measurements import write_measurements

MIB = 1 << 20
LIMIT = 576 * MIB  # per worker
SHAPE = (18432, 16384)  # x 1 slice x 2 channels x 4 B = 2.25 GiB = 4 x LIMIT
BLOCK_PX = 512
DET = 64
SPILL, PAUSE = 0.70, 0.80  # Dask's defaults (distributed.worker.memory.spill / .pause)

# Words of distributed's worker/nanny memory-manager log messages (worker_memory.py).
PAUSED = "Pausing worker"
RESTARTED = ("memory budget", "Restarting")


def _write_scan(folder: Path, shape: tuple[int, int]) -> tuple[Path, Path]:
    """One 64 x 64 tile centred in every block; far field of a weak known phase object."""
    folder.mkdir(exist_ok=True)
    by, bx = np.meshgrid(np.arange(shape[0] // BLOCK_PX), np.arange(shape[1] // BLOCK_PX),
                         indexing="ij")
    pos = np.stack([by.ravel(), bx.ravel()], 1) * BLOCK_PX + (BLOCK_PX - DET) // 2
    probe = default_probe((DET, DET), energy_ev=10000.0, pixel_size_m=10e-9)
    ar = np.arange(DET)
    y = pos[:, 0, None, None] + ar[None, :, None]
    x = pos[:, 1, None, None] + ar[None, None, :]
    patches = np.exp(1j * 0.3 * np.sin(2 * np.pi * y / 97) * np.cos(2 * np.pi * x / 61))
    with torch.no_grad():
        intensities = farfield_intensities(
            torch.from_numpy(probe), torch.from_numpy(patches.astype(np.complex64))[None],
            torch.zeros(len(pos), 2),
        ).numpy()
    data = write_measurements(
        folder / "scan.h5", intensities=intensities[None], positions_px=pos.astype(np.float64),
        energy_ev=10000.0, pixel_size_m=10e-9,
    )
    np.save(folder / "probe.npy", probe)
    return Path(data), folder / "probe.npy"


def test_tile_group_boxes_stay_near_their_tiles():
    """Every tile group's box overlaps at most the blocks its own tiles overlap, plus the
    blocks between neighbours: here one 64-px tile per 512-px block, 36 blocks a row, so a
    group of 8 tiles should never need more than 2 x 8 blocks."""
    from adorym_dask.graphs.minibatch import plan_tile_groups
    from adorym_dask.storage.object_store import Geometry

    geometry = Geometry((1024 * 9, 512 * 36, 1, 2), (512, 512))
    by, bx = np.meshgrid(np.arange(18), np.arange(36), indexing="ij")
    pos = (np.stack([by.ravel(), bx.ravel()], 1) * 512 + 224).astype(np.float64)
    groups = plan_tile_groups(pos[None], (DET, DET), 8)
    worst = max(len(geometry.blocks_overlapping(g.box)) for g in groups)
    assert worst <= 16, f"a group of 8 tiles reads {worst} blocks"


def _config(data: Path, probe: Path, output: Path, shape: tuple[int, int]):
    return config_from_dict({
        "data": {"path": str(data)},
        "probe": {"init": "file", "path": str(probe)},
        "object": {"shape_px": list(shape), "chunks": [BLOCK_PX, BLOCK_PX], "store": "zarr"},
        "optimizer": {"name": "gd"},
        "epochs": 1,
        "minibatch_size": 256,
        "tile_group_size": 8,
        "publish_every_epochs": 0,
        "output": str(output),
        "progress": False,
    })


@dataclass
class MemoryRun:
    """A run on a fresh 2-worker LocalCluster after a warm-up run, with what its workers
    used and logged."""

    result: object
    before: dict
    after: dict
    baseline: float
    elapsed: float
    total: float
    logs: list
    restart_events: tuple

    def report(self) -> dict:
        return {
            addr: f"after warm-up {self.before[addr]['peak_rss'] / MIB:.0f} MiB, peak "
            f"{w['peak_rss'] / MIB:.0f} MiB of {w['memory_limit'] / MIB:.0f} MiB"
            for addr, w in self.after.items()
        }


def run_measured(warm, cfg, limit: int) -> MemoryRun:
    """Run ``warm`` then ``cfg`` on 2 single-thread worker processes of ``limit`` bytes."""
    from distributed import Client, LocalCluster

    t0 = time.perf_counter()
    with environ_restored(), LocalCluster(
        n_workers=2, threads_per_worker=1, memory_limit=limit, processes=True,
        dashboard_address=None,
    ) as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        run(warm, client)  # every worker has now run gradient, update and publish tasks
        before = client.run(worker_memory)
        # The warm-up may have one tile group: only the worker that ran it has torch's gradient
        # working set. Both processes are alike, so the warm baseline is the larger of the two.
        baseline = max(w["peak_rss"] for w in before.values())
        t1 = time.perf_counter()
        result = run(cfg, client)
        elapsed = time.perf_counter() - t1
        after = client.run(worker_memory)
        logs = [
            msg
            for nanny in (False, True)
            for entries in client.get_worker_logs(n=10_000, nanny=nanny).values()
            for _, msg in entries
        ]
        restart_events = client.get_events("worker-restart-memory")
    return MemoryRun(result, before, after, baseline, elapsed, time.perf_counter() - t0, logs,
                     restart_events)


def assert_no_memory_trouble(m: MemoryRun, limit: int, *, growth: float) -> None:
    """No worker restarted, paused or spilled; each peaked under the pause threshold and at
    most ``growth`` bytes above the warm baseline."""
    report = m.report()
    # no worker restarted: same workers, same processes, no memory-restart event
    assert set(m.after) == set(m.before)
    assert all(m.after[a]["pid"] == m.before[a]["pid"] for a in m.after), report
    assert not m.restart_events
    assert not [msg for msg in m.logs if any(w in msg for w in RESTARTED)]
    # none paused, none spilled anything (the object, or any task result)
    assert not [msg for msg in m.logs if PAUSED in msg]
    for addr, w in m.after.items():
        assert w["memory_limit"] == limit
        assert w["spill_writes"] == 0 and w["spilled_bytes"] == 0 and w["keys_on_disk"] == 0, (
            addr, w)
        # peak RSS stayed under the limit, indeed under the pause threshold
        assert w["peak_rss"] < PAUSE * limit, report
        assert w["peak_rss"] - m.baseline < growth, report


def require_free_disk(folder, need: int) -> None:
    """Skip (saying how much) unless ``folder`` has ``need`` bytes free: a store several
    times the workers' memory must fit on the disk."""
    free = shutil.disk_usage(folder).free
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB free disk under {folder}, has "
                    f"{free / 2**30:.1f} GiB")


def test_object_store_four_times_worker_memory(tmp_path):
    object_bytes = SHAPE[0] * SHAPE[1] * 1 * 2 * 4
    assert object_bytes >= 4 * LIMIT
    require_free_disk(tmp_path, 3 * object_bytes + 256 * MIB)
    warm = _config(*_write_scan(tmp_path / "warm", (1024, 1024)), tmp_path / "warm.zarr",
                   (1024, 1024))
    cfg = _config(*_write_scan(tmp_path / "big", SHAPE), tmp_path / "run.zarr", SHAPE)
    m = run_measured(warm, cfg, LIMIT)
    result, baseline = m.result, m.baseline
    print(f"object {object_bytes / MIB:.0f} MiB; warm baseline {baseline / MIB:.0f} MiB; run "
          f"{m.elapsed:.1f} s of {m.total:.1f} s; workers: {m.report()}")
    assert baseline < SPILL * LIMIT - 32 * MIB, (
        f"a warm worker already uses {baseline / MIB:.0f} MiB: too close to the spill "
        f"threshold of the {LIMIT / MIB:.0f} MiB limit to test anything here; raise LIMIT "
        "and SHAPE together (SHAPE's bytes >= 4 x LIMIT)")

    # the run: one finite epoch that updated every block once, and the object published
    assert np.isfinite(result.loss).all() and len(result.loss) == 1
    ck = load_checkpoint(cfg.output)
    assert ck.slots.size == (SHAPE[0] // BLOCK_PX) * (SHAPE[1] // BLOCK_PX)
    assert (ck.slots == 1).all(), "every block was read, updated and written once"
    # and a worker held no more than a few blocks beyond the warm baseline (object/32 =
    # 36 blocks of 2 MiB; measured 30-35 MiB)
    assert_no_memory_trouble(m, LIMIT, growth=object_bytes / 32)
