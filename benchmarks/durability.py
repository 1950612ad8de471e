"""What putting every commit on stable storage costs: seconds per epoch with and without fsync.

Each update task fsyncs the chunk it wrote (and its folder) before returning, and the driver
fsyncs the checkpoint (and its folder) before renaming it in; see
``adorym_dask/storage/durability.py``. This script runs the same in-process reconstruction
(zarr store in a local folder, sync scheduler, so the fsyncs are on the critical path) twice,
once with ``os.fsync`` replaced by a no-op, and prints the ratio. Nothing is asserted.

Run::

    python benchmarks/durability.py [--epochs 4] [--positions 200] [--folder /tmp/x]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def _epoch_times(cfg, *, fsync: bool) -> list[float]:
    from adorym_dask.engine import Reconstruction

    real = os.fsync
    if not fsync:
        os.fsync = lambda fd: None  # noqa: E731 (the whole point: skip the sync)
    try:
        rec = Reconstruction(cfg)
        times, calls = [], []
        counter = {"n": 0}
        if fsync:
            def counting(fd, _real=real):
                counter["n"] += 1
                return _real(fd)
            os.fsync = counting
        for _ in range(cfg.epochs):
            t0 = time.perf_counter()
            rec.run_epoch("sync")
            times.append(time.perf_counter() - t0)
            calls.append(counter["n"])
    finally:
        os.fsync = real
    return times, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--positions", type=int, default=200)
    parser.add_argument("--folder", default=None, help="where data and stores go (a real disk)")
    args = parser.parse_args()

    from adorym_dask.config import config_from_dict
    from adorym_dask.simulate import simulate_ptychography

    folder = Path(args.folder or tempfile.mkdtemp(prefix="adorym-durability-"))
    folder.mkdir(parents=True, exist_ok=True)
    sim = simulate_ptychography(folder / "sim.h5", object_shape=(256, 256), probe_shape=(64, 64),
                                n_positions=args.positions, seed=0, overwrite=True)
    results = {}
    for fsync in (True, False):
        cfg = config_from_dict({
            "data": {"path": str(sim.path)},
            "probe": {"init": "file", "path": str(sim.probe_path)},
            "object": {"shape_px": [256, 256], "chunks_px": [64, 64]},
            "epochs": args.epochs, "output": str(folder / f"run-{fsync}.zarr"), "overwrite": True,
            "cluster": {"scheduler": "sync"}, "progress": False,
        })
        times, calls = _epoch_times(cfg, fsync=fsync)
        steady = sorted(times[1:])[len(times[1:]) // 2]
        results[fsync] = steady
        print(f"fsync {'on ' if fsync else 'off'}: s/epoch {[round(t, 3) for t in times]} "
              f"(median after the first: {steady:.3f})"
              + (f", fsync calls per epoch {calls[-1] // cfg.epochs}" if fsync else ""))
    load = os.getloadavg()
    print(f"ratio on/off = {results[True] / results[False]:.3f}; folder {folder} "
          f"(file system of {os.statvfs(folder).f_bsize}-byte blocks); "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
