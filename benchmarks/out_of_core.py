"""Out-of-core reconstruction: an object store many times larger than each worker's memory.

A far-field ptychography reconstruction whose object (``n_y * n_x * n_z * 2 * 4`` bytes,
default 32768 x 32768 x 1 slice = 8 GiB) is 4x the memory of *all* workers together (default
2 workers x 2 GiB ``memory_limit``), with the zarr object store and Dask's memory manager at
its default thresholds (spill at 70 %, pause at 80 %, restart at 95 % of the limit). The scan is
sparse: a raster of small clusters of ``--det``-pixel tiles, one cluster per object block, so
that every block is read and written once per epoch while the measurement file stays small
(it is written here with :func:`adorym_dask.storage.measurements.write_measurements` from a
known analytic phase object and the simulator's default probe, then read per tile group by the
workers).

It prints, per run: the object size, the worker memory limit, each worker's peak RSS
(``VmHWM`` of the worker process) and whether any worker was paused, spilled or restarted;
seconds per epoch and tiles/s. Epoch 0 includes writing the start value of every block (the
store's slot 0) and is reported apart; tiles/s is taken over the later epochs. The final
``publish`` (copying every block into the run's ``object`` array) is timed apart too.

For reference the same tile count and block size are run on an object 1/8 of the size (half
the height, a quarter of the width) with ``object.store: memory`` (the blocks live in the
workers' memory, which holds them at this size) and, unless ``--skip-zarr-small``, with the
zarr store, so that the ratio separates the cost of the store from the cost of the object's
size: the small object holds 8x as many tiles per block, so a minibatch updates fewer blocks.

Everything is written under a temporary folder in ``--workdir`` (default: the system temp
folder) and removed at the end; free disk space is checked first.

Run::

    python benchmarks/out_of_core.py [--object-px 32768] [--block-px 512] [--workers 2]
        [--memory-limit 2GiB] [--epochs 2] [--det 64] [--minibatch-size 32]
        [--tile-group-size 8] [--workdir /tmp] [--skip-zarr-small] [--skip-memory]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

GIB = 1 << 30
MIB = 1 << 20


# --------------------------------------------------------------------------------------------
# the data: a sparse scan over a big object
# --------------------------------------------------------------------------------------------
def cluster_offsets(block_px: int, det: int, tiles_per_block: int) -> np.ndarray:
    """``[k, 2]`` tile corners inside one block: a raster at half-tile steps, centred.

    Rows of ``m = (block - det) // (det // 2) + 1`` tiles (at most); ``k`` tiles in all.
    """
    step = max(1, det // 2)
    per_row = max(1, (block_px - det) // step + 1)
    rows = math.ceil(tiles_per_block / per_row)
    if det + (rows - 1) * step > block_px:
        raise ValueError(
            f"{tiles_per_block} tiles of {det} px at {step} px steps do not fit a {block_px} px "
            "block; lower the tile count or enlarge the blocks"
        )
    idx = np.arange(tiles_per_block)
    r, c = idx // per_row, idx % per_row
    used_h = det + (rows - 1) * step
    used_w = det + (min(per_row, tiles_per_block) - 1) * step
    off = np.stack([r * step + (block_px - used_h) // 2, c * step + (block_px - used_w) // 2], 1)
    return off.astype(np.float64)


def sparse_positions(shape: tuple[int, int], block_px: int, det: int, tiles_per_block: int):
    """``[n, 2]`` integer (y, x) corners: one cluster of tiles in every block of ``shape``."""
    nby, nbx = shape[0] // block_px, shape[1] // block_px
    by, bx = np.meshgrid(np.arange(nby), np.arange(nbx), indexing="ij")
    corners = np.stack([by.ravel(), bx.ravel()], 1) * block_px
    off = cluster_offsets(block_px, det, tiles_per_block)
    return (corners[:, None, :] + off[None]).reshape(-1, 2)


def phase_object(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Known complex transmission at integer pixel coordinates: a weak smooth phase pattern."""
    phase = 0.3 * np.sin(2 * np.pi * y / 97.0) * np.cos(2 * np.pi * x / 61.0)
    return np.exp(1j * phase).astype(np.complex64)


def write_sparse_scan(folder: Path, shape: tuple[int, int], block_px: int, det: int,
                      tiles_per_block: int, *, energy_ev: float = 10000.0,
                      pixel_size_m: float = 10e-9) -> tuple[Path, Path, int]:
    """Write ``scan.h5`` (native layout) and ``probe.npy``; returns their paths and tile count.

    Intensities are the model's own far field (``farfield_intensities``) of
    :func:`phase_object` under the simulator's default probe, computed 256 tiles at a time.
    """
    import torch

    from adorym_dask.models.ptychography import farfield_intensities
    from adorym_dask.simulate import default_probe
    from adorym_dask.storage.measurements import write_measurements

    if shape[0] % block_px or shape[1] % block_px:
        raise ValueError(f"object {shape} must be a multiple of the block size {block_px}")
    pos = sparse_positions(shape, block_px, det, tiles_per_block)
    probe = default_probe((det, det), energy_ev=energy_ev, pixel_size_m=pixel_size_m,
                          photons_per_pattern=1e6)
    p = torch.from_numpy(probe)
    out = np.empty((1, len(pos), det, det), np.float32)
    ar = np.arange(det)
    for i in range(0, len(pos), 256):
        c = pos[i : i + 256].astype(np.int64)
        patches = phase_object(c[:, 0, None, None] + ar[None, :, None],
                               c[:, 1, None, None] + ar[None, None, :])
        with torch.no_grad():
            out[0, i : i + len(c)] = farfield_intensities(
                p, torch.from_numpy(patches)[None], torch.zeros(len(c), 2)
            ).numpy()
    data = folder / "scan.h5"
    write_measurements(data, intensities=out, positions_px=pos, energy_ev=energy_ev,
                       pixel_size_m=pixel_size_m, overwrite=True)
    probe_path = folder / "probe.npy"
    np.save(probe_path, probe)
    return data, probe_path, len(pos)


def run_config(data: Path, probe: Path, output: Path, *, shape, block_px: int, store: str,
               epochs: int, minibatch_size: int, tile_group_size: int, workers: int,
               memory_limit: str):
    from adorym_dask.config import config_from_dict

    return config_from_dict({
        "data": {"path": str(data)},
        "probe": {"init": "file", "path": str(probe)},
        "object": {"shape_px": list(shape), "chunks": [block_px, block_px], "store": store},
        # gd keeps no optimizer arrays beside the object: the store is 2 slots x the object
        "optimizer": {"name": "gd"},
        "epochs": epochs,
        "minibatch_size": minibatch_size,
        "tile_group_size": tile_group_size,
        "publish_every_epochs": 0,
        "output": str(output),
        "overwrite": True,
        "progress": False,
        "cluster": {"n_workers": workers, "threads_per_worker": 1, "memory_limit": memory_limit,
                    "dashboard_address": None},
    })


# --------------------------------------------------------------------------------------------
# worker memory evidence
# --------------------------------------------------------------------------------------------
MEMORY_WORDS = ("Pausing worker", "Unmanaged memory use is high", "Start spilling",
                "exceeded", "Restarting", "memory budget")


@dataclass
class MemoryReport:
    workers: dict
    pids_before: dict
    log_hits: list[str] = field(default_factory=list)
    restart_events: list = field(default_factory=list)

    @property
    def restarted(self) -> bool:
        return (set(self.workers) != set(self.pids_before)
                or any(self.workers[w]["pid"] != self.pids_before[w] for w in self.workers)
                or bool(self.restart_events))

    @property
    def spilled(self) -> bool:
        return any(w["spill_writes"] or w["keys_on_disk"] for w in self.workers.values())

    @property
    def paused(self) -> bool:
        return any("Pausing" in h for h in self.log_hits)


def memory_report(client, pids_before: dict) -> MemoryReport:
    from adorym_dask.cluster import worker_memory

    workers = client.run(worker_memory)
    hits = []
    for where, logs in [*client.get_worker_logs(n=10_000).items(),
                        *client.get_worker_logs(n=10_000, nanny=True).items()]:
        for _level, msg in logs:
            if any(w in msg for w in MEMORY_WORDS):
                hits.append(f"{where}: {msg[:200]}")
    events = list(client.get_events("worker-restart-memory") or [])
    return MemoryReport(workers, pids_before, hits, events)


# --------------------------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------------------------
@dataclass
class Timing:
    label: str
    object_bytes: int
    n_tiles: int
    epoch_s: list[float]
    publish_s: float
    memory: MemoryReport
    limit: int
    baseline: dict

    @property
    def steady_epoch_s(self) -> float:
        later = self.epoch_s[1:] or self.epoch_s
        return statistics.median(later)

    @property
    def tiles_per_s(self) -> float:
        return self.n_tiles / self.steady_epoch_s




def run_once(label: str, cfg, n_tiles: int) -> Timing:
    from dask.utils import parse_bytes

    from adorym_dask.cluster import dask_client, environ_restored, worker_memory
    from adorym_dask.engine import Reconstruction

    rec = Reconstruction(cfg)
    n_y, n_x, n_z = rec.obj_shape
    object_bytes = n_y * n_x * n_z * 2 * 4
    with environ_restored(), dask_client(cfg.cluster) as client:
        client.wait_for_workers(cfg.cluster.n_workers)
        # a first small task: every worker has imported torch (TorchThreads) and run a task
        client.run(lambda: None)
        pids = client.run(os.getpid)
        baseline = {a: w["peak_rss"] for a, w in client.run(worker_memory).items()}
        marks = [time.perf_counter()]
        rec.run(client, callback=lambda *a: marks.append(time.perf_counter()))
        done = time.perf_counter()
        report = memory_report(client, pids)
    epoch_s = list(np.diff(marks))
    return Timing(label, object_bytes, n_tiles, epoch_s, done - marks[-1], report,
                  parse_bytes(cfg.cluster.memory_limit), baseline)


def print_run(t: Timing) -> None:
    gib = t.object_bytes / GIB
    print(f"\n== {t.label}")
    print(f"   object {gib:.2f} GiB = {t.object_bytes / t.limit:.1f} x the worker memory limit "
          f"{t.limit / GIB:.2f} GiB; {t.n_tiles} tiles per epoch")
    for i, (addr, w) in enumerate(sorted(t.memory.workers.items())):
        print(f"   worker {i} (pid {w['pid']}): baseline {t.baseline.get(addr, 0) / MIB:.0f} MiB,"
              f" peak RSS {w['peak_rss'] / MIB:7.0f} MiB "
              f"= {100 * w['peak_rss'] / w['memory_limit']:4.1f} % of its limit; RSS at end "
              f"{w['rss'] / MIB:.0f} MiB; disk writes (spill) {w['spill_writes']}, "
              f"keys on disk {w['keys_on_disk']}")
    print(f"   paused: {t.memory.paused}  spilled: {t.memory.spilled}  "
          f"restarted: {t.memory.restarted}")
    for hit in t.memory.log_hits[:10]:
        print(f"     log: {hit}")
    ep = " ".join(f"{s:.1f}" for s in t.epoch_s)
    print(f"   seconds per epoch: {ep}  (epoch 0 includes writing every block's start value)")
    print(f"   steady: {t.steady_epoch_s:.1f} s/epoch, {t.tiles_per_s:.1f} tiles/s; "
          f"final publish of the object: {t.publish_s:.1f} s")


def disk_needed(object_bytes: int, store: str) -> int:
    """Bytes on disk: two state slots (gd: object only) plus the published object."""
    return 3 * object_bytes


# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--object-px", type=int, default=32768,
                    help="side of the square object (1 slice); 32768 -> 8 GiB")
    ap.add_argument("--block-px", type=int, default=512, help="object block side")
    ap.add_argument("--det", type=int, default=64, help="detector / probe side in pixels")
    ap.add_argument("--tiles-per-block", type=int, default=1,
                    help="tiles per block of the big object (the small one gets 8x)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="2GiB", help="per worker")
    ap.add_argument("--epochs", type=int, default=2,
                    help="epochs per run; the first includes initialising the store")
    ap.add_argument("--minibatch-size", type=int, default=32)
    ap.add_argument("--tile-group-size", type=int, default=8)
    ap.add_argument("--workdir", default=None, help="folder for data and stores (default: tmp)")
    ap.add_argument("--skip-memory", action="store_true", help="skip the memory-store reference")
    ap.add_argument("--skip-zarr-small", action="store_true",
                    help="skip the zarr run on the small object")
    args = ap.parse_args(argv)

    import torch

    import adorym_dask  # noqa: F401  (registers the package's Dask defaults)

    wall0 = time.perf_counter()
    big = (args.object_px, args.object_px)
    small = (args.object_px // 2, args.object_px // 4)
    big_bytes = big[0] * big[1] * 2 * 4
    small_bytes = small[0] * small[1] * 2 * 4
    workdir = Path(args.workdir or tempfile.gettempdir())
    need = disk_needed(big_bytes, "zarr") + (0 if args.skip_zarr_small else 3 * small_bytes)
    need += 2 * small_bytes + 256 * MIB  # memory store checkpoints, data, slack
    free = shutil.disk_usage(workdir).free
    if free < need:
        print(f"not enough free disk in {workdir}: {free / GIB:.1f} GiB free, this run needs "
              f"about {need / GIB:.1f} GiB (2 slots of the object + the published object). "
              "Pass --workdir on a larger disk, or a smaller --object-px.")
        return 2

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}, torch {torch.__version__}; workdir {workdir} "
          f"({free / GIB:.0f} GiB free, about {need / GIB:.0f} GiB needed)")
    print(f"cluster: {args.workers} workers x 1 thread, memory_limit {args.memory_limit} each "
          "(Dask's default thresholds: spill 70 %, pause 80 %, restart 95 %)")
    print(f"plan:    blocks {args.block_px}x{args.block_px}, detector {args.det}x{args.det}, "
          f"minibatch {args.minibatch_size} tiles, tile group {args.tile_group_size}, "
          f"optimizer gd, {args.epochs} epochs per run")

    timings: list[Timing] = []
    with tempfile.TemporaryDirectory(prefix="out_of_core_", dir=workdir) as tmp:
        tmp = Path(tmp)
        common = dict(block_px=args.block_px, epochs=args.epochs,
                      minibatch_size=args.minibatch_size, tile_group_size=args.tile_group_size,
                      workers=args.workers, memory_limit=args.memory_limit)

        def case(label: str, shape, tiles_per_block: int, store: str) -> Timing:
            folder = tmp / label.split()[0]
            folder.mkdir()
            t0 = time.perf_counter()
            data, probe, n = write_sparse_scan(folder, shape, args.block_px, args.det,
                                               tiles_per_block)
            print(f"\n[{label}] wrote {n} tiles ({tiles_per_block} per block) over "
                  f"{shape[0]}x{shape[1]} px in {time.perf_counter() - t0:.1f} s; running ...",
                  flush=True)
            cfg = run_config(data, probe, folder / "run.zarr", shape=shape, store=store, **common)
            t = run_once(label, cfg, n)
            print_run(t)
            shutil.rmtree(folder, ignore_errors=True)  # free the disk for the next case
            return t

        timings.append(case("zarr-big (zarr store, big object)", big, args.tiles_per_block,
                            "zarr"))
        if not args.skip_memory:
            timings.append(case("memory-small (memory store, 1/8 object)", small,
                                8 * args.tiles_per_block, "memory"))
        if not args.skip_zarr_small:
            timings.append(case("zarr-small (zarr store, 1/8 object)", small,
                                8 * args.tiles_per_block, "zarr"))

    print("\nsummary (tiles/s over the epochs after the first):")
    for t in timings:
        peaks = ", ".join(f"{w['peak_rss'] / MIB:.0f}" for _, w in sorted(t.memory.workers.items()))
        print(f"  {t.label:<42} object {t.object_bytes / GIB:6.2f} GiB  peak RSS [{peaks}] MiB"
              f"  {t.steady_epoch_s:7.1f} s/epoch  {t.tiles_per_s:7.1f} tiles/s  "
              f"paused/spilled/restarted {t.memory.paused}/{t.memory.spilled}/"
              f"{t.memory.restarted}")
    ref = {t.label.split()[0]: t for t in timings}
    if "memory-small" in ref:
        print(f"  ratio tiles/s zarr-big / memory-small  = "
              f"{ref['zarr-big'].tiles_per_s / ref['memory-small'].tiles_per_s:.2f}")
    if "zarr-small" in ref and "memory-small" in ref:
        print(f"  ratio tiles/s zarr-small / memory-small = "
              f"{ref['zarr-small'].tiles_per_s / ref['memory-small'].tiles_per_s:.2f}")
    if "zarr-small" in ref:
        print(f"  ratio tiles/s zarr-big / zarr-small    = "
              f"{ref['zarr-big'].tiles_per_s / ref['zarr-small'].tiles_per_s:.2f}")
    print(f"\ntotal wall {time.perf_counter() - wall0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
