"""Seconds per epoch of a far-field ptychography reconstruction, three ways.

On one simulated data set (default 400 positions, 128x128 detector, 256x256 object) it times:

(a) the engine: ``Reconstruction.run_epoch`` on a 2-worker, 1-thread-per-worker LocalCluster
    made by ``adorym_dask.cluster.dask_client`` (with the package's Dask defaults, which unset
    ``MALLOC_TRIM_THRESHOLD_``), the object in the default zarr store; (a1) the same on one
    worker; (a') once more with distributed's own trim default (65536). For each: the CPU
    seconds per epoch of the driver (which hosts the scheduler) and the workers summed, and
    each worker's peak RSS;
(b) the same task functions (``tile_group_gradient``, ``crop_sum``/``add_in_order``,
    ``update_block``, the driver's probe step, the per-minibatch commit) called in an
    in-process Python loop, no Dask, with torch at 1 thread and at 2 threads;
(c) only the FFTs an epoch needs (counted from one group's forward and backward pass with the
    torch profiler), as batched complex64 ``torch.fft.fft2``/``ifft2`` calls at 2 threads: a
    lower bound for the epoch on this machine (fastest of the repeats; also at 1 thread: the
    issue's "FFT bound").

Epoch 0 is a warm-up and is discarded; the median of the other epochs is reported, with the
package's default optimizers and minibatch size. Nothing is asserted: the numbers are printed,
with the ratios issue 7 sets targets for.

Run::

    python benchmarks/ptycho_epoch.py [--epochs 4] [--positions 400] [--minibatch-size 16]
                                      [--tile-group-size 8]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


# --------------------------------------------------------------------------------------------
# set-up
# --------------------------------------------------------------------------------------------
def simulate(folder: Path, n_positions: int, det: int, object_px: int | None) -> tuple[Path, int]:
    from adorym_dask.simulate import simulate_ptychography

    # A square object whose scan extent (object - probe - 1) leaves the Fermat spiral room for
    # n positions at a few pixels apart; 256 for a 128 detector and up to ~1000 positions.
    side = object_px or max(2 * det, det + 1 + int(math.ceil(4.0 * math.sqrt(n_positions))))
    path = folder / "scan.h5"
    simulate_ptychography(
        path, object_shape=(side, side), probe_shape=(det, det), n_positions=n_positions, seed=0
    )
    return path, side


def make_config(data: Path, output: Path, args: argparse.Namespace):
    from adorym_dask.config import config_from_dict

    return config_from_dict({
        "data": {"path": str(data)},
        # The simulated object's own shape. Left unset, engine.object_layout sizes the object
        # from floor(pos) + det, which check_positions_inside (pos + det <= shape) refuses
        # whenever the outermost position has a fractional part.
        "object": {"shape_px": [args.object_side, args.object_side]},
        "epochs": args.epochs,
        "minibatch_size": args.minibatch_size,
        "tile_group_size": args.tile_group_size,
        "output": str(output),
        "overwrite": True,
        "progress": False,
        "cluster": {"n_workers": getattr(args, "workers", 2), "threads_per_worker": 1},
    })


def summarise(times: list[float]) -> tuple[float, list[float]]:
    """Median of the epochs after the first (warm-up) one."""
    timed = times[1:] if len(times) > 1 else times
    return statistics.median(timed), times


# --------------------------------------------------------------------------------------------
# (a) the engine on a LocalCluster
# --------------------------------------------------------------------------------------------


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_rss_mb() -> float:
    """Peak resident set size of this process, MB (Linux: ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_engine(cfg, epochs: int, trim_threshold: int | None) -> tuple[float, list[float], str]:
    """Per-epoch seconds of ``run_epoch`` on the cluster ``cfg.cluster`` describes.

    ``trim_threshold`` None keeps the package's Dask config (the variable unset); an int sets
    ``distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_`` while the cluster starts.
    The note also gives the CPU seconds per timed epoch of the driver (which hosts the
    LocalCluster's scheduler) and the workers summed, and each worker's peak RSS.
    """
    import dask

    from adorym_dask.cluster import dask_client, environ_restored
    from adorym_dask.engine import Reconstruction

    rec = Reconstruction(cfg)
    setting = (
        dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": trim_threshold})
        if trim_threshold is not None
        else contextlib.nullcontext()
    )
    times = []
    with environ_restored(), setting, dask_client(cfg.cluster) as client:
        seen = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_", "unset"))
        env_seen = ",".join(sorted(set(map(str, seen.values()))))
        for k in range(epochs):
            if k == 1:  # CPU seconds over the timed epochs (the first is a warm-up)
                cpu0 = _cpu_seconds() + sum(client.run(_cpu_seconds).values())
            t0 = time.perf_counter()
            rec.run_epoch(client)
            times.append(time.perf_counter() - t0)
        driver = _cpu_seconds()
        workers = sum(client.run(_cpu_seconds).values())
        rss = sorted(client.run(_peak_rss_mb).values())
    timed = max(epochs - 1, 1)
    cpu = (driver + workers - (cpu0 if epochs > 1 else 0.0)) / timed
    note = (f"MALLOC_TRIM_THRESHOLD_ in workers: {env_seen}; CPU {cpu:.2f} s/epoch (driver + "
            f"scheduler + workers); peak RSS per worker {', '.join(f'{r:.0f}' for r in rss)} MB")
    return (*summarise(times), note, cpu)


# --------------------------------------------------------------------------------------------
# (b) the same task functions in an in-process loop
# --------------------------------------------------------------------------------------------
def _tree_sum(values: list, fan_in: int):
    """Same fixed-shape ``add_in_order`` tree as ``graphs.reduction.tree``."""
    from adorym_dask.graphs.reduction import add_in_order

    level = list(values)
    while len(level) > 1:
        level = [add_in_order(*level[i : i + fan_in]) for i in range(0, len(level), fan_in)]
    return level[0]


def loop_epoch(rec, epoch: int) -> float:
    """``Reconstruction.run_epoch`` with every task called directly, in graph order, including
    the per-minibatch commit (checkpoint) the engine makes."""
    from adorym_dask.graphs.minibatch import FAN_IN, epoch_minibatches
    from adorym_dask.graphs.reduction import crop_sum, small_sums
    from adorym_dask.graphs.tasks import tile_group_gradient
    from adorym_dask.graphs.update import update_block
    from adorym_dask.layout import object_learning_rate
    from adorym_dask.refinement import apply_gradients, group_rows, shared_values

    st = rec.store
    if rec.sources is None:
        rec._initialize_blocks("sync")
    rng = np.random.default_rng([rec.cfg.seed, epoch])
    batches = epoch_minibatches(rec.groups, rec.cfg.minibatch_size, rng)
    scopes = rec.active_refinements(epoch)
    total, n_total = 0.0, 0
    for groups in batches:
        n = sum(len(g.tiles) for g in groups)
        shared = shared_values(rec.params, rec.specs)
        spec = object_learning_rate(rec.spec, rec.model, shared, n)
        pieces = [
            tile_group_gradient(
                g, st, {b: rec.sources[b] for b in st.blocks_overlapping(g.box)},
                rec.meas.source, shared, group_rows(rec.params, rec.specs, g), rec.model,
                scale=1.0 / n, refine=frozenset(scopes), curvature_for=rec.curvature_users,
                object_curvature=spec.name == "pie",
            )
            for g in groups
        ]
        touching: dict[tuple[int, int], list[int]] = {}
        for i, g in enumerate(groups):
            for block in st.blocks_overlapping(g.box):
                touching.setdefault(block, []).append(i)
        new = {}
        for block in sorted(touching):
            mine = [pieces[i] for i in touching[block]]
            box = st.block_box(block)
            parts = mine if len(mine) <= FAN_IN else [
                crop_sum(box, st.shape[2], *mine[i : i + FAN_IN])
                for i in range(0, len(mine), FAN_IN)
            ]
            new[block] = update_block(
                st, block, rec.sources[block], *parts, step=int(rec.block_steps[block]) + 1,
                spec=spec, rules=rec.rules,
            )
            rec.block_steps[block] += 1
        rec.sources.update(new)
        rec.step += 1
        sums = small_sums(scopes, *pieces)
        rec.params = apply_gradients(rec.params, rec.refinements, sums, bounds=rec.bounds)
        rec.commit()
        loss = sums.loss
        total += loss * n
        n_total += n
    return total / n_total


def time_loop(cfg, epochs: int, threads: int) -> tuple[float, list[float], float]:
    """Per-epoch seconds of :func:`loop_epoch`, and its CPU seconds per timed epoch."""
    import torch

    from adorym_dask.engine import Reconstruction

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rec = Reconstruction(cfg)
        times = []
        for epoch in range(epochs):
            if epoch == 1:
                cpu0 = _cpu_seconds()
            t0 = time.perf_counter()
            loop_epoch(rec, epoch)
            times.append(time.perf_counter() - t0)
        cpu = (_cpu_seconds() - (cpu0 if epochs > 1 else 0.0)) / max(epochs - 1, 1)
    finally:
        torch.set_num_threads(before)
    return (*summarise(times), cpu)


# --------------------------------------------------------------------------------------------
# (c) the FFTs alone
# --------------------------------------------------------------------------------------------
def count_group_ffts(rec, want_probe_grad: bool = True) -> list[tuple[tuple[int, ...], bool]]:
    """``(shape, forward)`` of every c2c FFT one group's forward + backward pass runs.

    Read from the torch profiler on a real ``tile_group_gradient`` call; the analytic count
    (fourier_shift: one fft2 of the probe ``[1, M]`` per group and one ifft2 ``[G, M]``;
    fraunhofer: one fft2 ``[G, M]``; the backward pass one transform of each shape back) is the
    fallback.
    """
    from torch.profiler import ProfilerActivity, profile

    from adorym_dask.graphs.tasks import tile_group_gradient
    from adorym_dask.refinement import group_rows, shared_values

    g = rec.groups[0]
    M = rec.probe.shape[0]
    G = len(g.tiles)
    det = tuple(rec.meas.det_shape)
    try:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            if rec.sources is None:
                rec._initialize_blocks("sync")
            tile_group_gradient(
                g, rec.store, {b: rec.sources[b] for b in rec.store.blocks_overlapping(g.box)},
                rec.meas.source, shared_values(rec.params, rec.specs),
                group_rows(rec.params, rec.specs, g), rec.model, scale=1.0,
                refine=frozenset({"probe"} if want_probe_grad else ()),
            )
        found = []
        for ev in prof.events():
            if ev.name != "aten::_fft_c2c":
                continue
            shape = tuple(ev.input_shapes[0])
            conc = getattr(ev, "concrete_inputs", None) or []
            forward = bool(conc[3]) if len(conc) > 3 and conc[3] is not None else True
            found.append((shape, forward))
        if found:
            return found, G
    except Exception:  # noqa: BLE001 - profiler details vary by torch version
        pass
    calls = [((1, M, *det), True), ((G, M, *det), False), ((G, M, *det), True),
             ((G, M, *det), False)]
    if want_probe_grad:
        calls += [((G, M, *det), True), ((1, M, *det), False)]
    return calls, G


def time_ffts(rec, epochs: int, threads: int) -> tuple[float, list[float], int, list]:
    """Seconds per epoch of exactly the FFTs an epoch with probe refinement runs."""
    import torch

    calls, G0 = count_group_ffts(rec)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # one group of size G runs the calls with G0 replaced by G
        sizes = [len(g.tiles) for g in rec.groups]
        plan = []
        for G in sizes:
            for shape, fwd in calls:
                s = (G, *shape[1:]) if shape[0] == G0 else shape
                plan.append((s, fwd))
        gen = torch.Generator().manual_seed(0)
        inputs = {
            s: torch.randn(*s, dtype=torch.complex64, generator=gen) for s in {s for s, _ in plan}
        }
        # the same transforms the model asks for (ortho for the far field is a scale only)
        times = []
        for _ in range(max(3, epochs)):
            t0 = time.perf_counter()
            for s, fwd in plan:
                x = inputs[s]
                (torch.fft.fft2(x) if fwd else torch.fft.ifft2(x))
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    # a lower bound: the fastest repeat (2-thread timings suffer most from other processes)
    return min(times), times, len(plan), calls


# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=4, help="epochs per variant (first discarded)")
    ap.add_argument("--positions", type=int, default=400)
    ap.add_argument("--detector", type=int, default=128, help="detector / probe side in pixels")
    ap.add_argument("--object-px", type=int, default=None, help="object side (default: derived)")
    ap.add_argument("--minibatch-size", type=int, default=None,
                    help="default: the package's (RunConfig.minibatch_size)")
    ap.add_argument("--tile-group-size", type=int, default=8)
    ap.add_argument("--skip-trim", action="store_true",
                    help="skip the MALLOC_TRIM_THRESHOLD_=65536 engine run")
    args = ap.parse_args(argv)
    if args.minibatch_size is None:
        from adorym_dask.config import RunConfig

        args.minibatch_size = RunConfig.model_fields["minibatch_size"].default

    import torch

    import adorym_dask  # noqa: F401  (registers the package's Dask defaults)
    from adorym_dask.engine import Reconstruction

    wall0 = time.perf_counter()
    rows: list[tuple[str, float, list[float] | None, str]] = []
    with tempfile.TemporaryDirectory(prefix="ptycho_epoch_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        data, args.object_side = simulate(tmp, args.positions, args.detector, args.object_px)
        t_sim = time.perf_counter() - t0

        probe_rec = Reconstruction(make_config(data, tmp / "probe.zarr", args))
        n_groups = len(probe_rec.groups)
        from adorym_dask.graphs.minibatch import epoch_minibatches

        n_batches = len(epoch_minibatches(probe_rec.groups, args.minibatch_size,
                                          np.random.default_rng(0)))
        cores = os.cpu_count()
        try:
            usable = len(os.sched_getaffinity(0))
        except AttributeError:
            usable = cores
        print(f"machine: {platform.machine()} {platform.processor() or ''}, "
              f"{cores} logical cores ({usable} usable), python {platform.python_version()}, "
              f"torch {torch.__version__} (default {torch.get_num_threads()} threads)")
        print(f"data:    {args.positions} positions, detector {args.detector}x{args.detector}, "
              f"object {probe_rec.store.shape[:2]} in blocks {probe_rec.store.geometry.chunks}, "
              f"{probe_rec.probe.shape[0]} probe mode(s), {probe_rec.store.shape[2]} slice(s); "
              f"simulated in {t_sim:.1f} s")
        print(f"plan:    minibatch {args.minibatch_size} tiles, tile group {args.tile_group_size}"
              f" -> {n_groups} groups, {n_batches} minibatches (optimizer steps) per epoch; "
              f"{args.epochs} epochs per variant, first discarded, median of the rest\n")

        def out(name: str) -> Path:
            return tmp / f"{name}.zarr"

        load_at: dict[str, float] = {}

        def load() -> float:
            return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

        load_at["start"] = load()
        a, a_times, a_note, a_cpu = time_engine(
            make_config(data, out("engine"), args), args.epochs, None)
        rows.append(("(a)  engine, LocalCluster 2 workers x 1 thread, zarr", a, a_times,
                     f"{a_note}; load after {load():.1f}"))
        args.workers = 1
        a1, a1_times, a1_note, _ = time_engine(
            make_config(data, out("engine1"), args), args.epochs, None)
        args.workers = 2
        rows.append(("(a1) engine, LocalCluster 1 worker x 1 thread, zarr", a1, a1_times,
                     f"{a1_note}; load after {load():.1f}"))
        if not args.skip_trim:
            a_trim, t_times, t_note, _ = time_engine(
                make_config(data, out("engine_trim"), args), args.epochs, 65536
            )
            rows.append(("(a') engine, distributed's default trim", a_trim, t_times,
                         f"{t_note}; load after {load():.1f}"))
        b1, b1_times, b1_cpu = time_loop(make_config(data, out("loop1"), args), args.epochs, 1)
        rows.append(("(b1) in-process loop, torch 1 thread", b1, b1_times,
                     f"CPU {b1_cpu:.2f} s/epoch; peak RSS {_peak_rss_mb():.0f} MB (whole "
                     f"benchmark process); load after {load():.1f}"))
        b2, b2_times, _ = time_loop(make_config(data, out("loop2"), args), args.epochs, 2)
        rows.append(("(b2) in-process loop, torch 2 threads", b2, b2_times,
                     f"load after {load():.1f}"))
        c, c_times, n_fft, calls = time_ffts(probe_rec, args.epochs, 2)
        per_group = ", ".join(
            f"{'fft2' if fwd else 'ifft2'}{list(s)}" for s, fwd in calls
        )
        rows.append(("(c)  FFTs only, torch 2 threads (fastest)", c, c_times,
                     f"{n_fft} batched calls = {n_groups} groups x [{per_group}]; "
                     f"load after {load():.1f}"))
        c1, c1_times, _, _ = time_ffts(probe_rec, args.epochs, 1)
        rows.append(("(c1) FFTs only, torch 1 thread (fastest)", c1, c1_times,
                     f"load after {load():.1f}"))

    print(f"1-min load average at start {load_at['start']:.1f} on {os.cpu_count()} cores "
          "(other processes on the machine inflate every number below)\n")
    width = max(len(r[0]) for r in rows)
    print(f"{'variant':<{width}}  {'s/epoch':>8}  {'tiles/s':>8}   all epochs (s)")
    print("-" * (width + 60))
    for name, sec, times, note in rows:
        all_t = " ".join(f"{t:.2f}" for t in times) if times else ""
        print(f"{name:<{width}}  {sec:8.3f}  {args.positions / sec:8.1f}   {all_t}")
        if note:
            print(f"{'':<{width}}    {note}")
    print("\nratios (issue 7's targets in brackets):")
    print(f"  b1 / c1 (loop vs FFTs, 1 thread)    = {b1 / c1:6.2f}   [<= 4]")
    print(f"  a CPU / b1 CPU (engine vs loop)     = {a_cpu / b1_cpu:6.2f}   [<= 1.15]")
    print(f"  a1 / a (1 worker vs 2, wall)        = {a1 / a:6.2f}   [>= 1.7]")
    print(f"  a / c1 (engine+zarr vs FFTs, 1 th.) = {a / c1:6.2f}   [<= 6]")
    print(f"  a / b1 (engine vs loop, 1 thread)   = {a / b1:6.2f}")
    print(f"  a / b2 (engine vs loop, 2 threads)  = {a / b2:6.2f}")
    print(f"  a / c  (engine vs FFT lower bound)  = {a / c:6.2f}")
    print(f"  b1 / c                              = {b1 / c:6.2f}")
    print(f"  b2 / c                              = {b2 / c:6.2f}")
    if not args.skip_trim:
        print(f"  a' / a (trim 65536 vs unset)        = {a_trim / a:6.2f}")
    print(f"\ntotal wall {time.perf_counter() - wall0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
