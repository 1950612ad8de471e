"""Dask client set-up: a LocalCluster by default, or a running scheduler's address."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from distributed import Client, LocalCluster, WorkerPlugin

from adorym_dask.config import ClusterConfig


class TorchThreads(WorkerPlugin):
    """Give torch one intra-op thread per worker thread (tasks already run in parallel).

    Without it, every task of a worker with ``T`` threads would start ``n_cores`` torch
    threads, oversubscribing the node ``T`` times over.
    """

    name = "adorym-dask-torch-threads"

    def setup(self, worker) -> None:  # noqa: ANN001 (distributed.Worker)
        import torch

        torch.set_num_threads(1)


@contextmanager
def dask_client(cfg: ClusterConfig, client: Client | None = None) -> Iterator[Client | None]:
    """Yield the client to run on (None under the sync scheduler); close what we started."""
    if client is not None:
        client.register_plugin(TorchThreads())
        yield client
        return
    if cfg.scheduler.value == "sync":
        yield None
        return
    if cfg.address:
        own = Client(cfg.address)
        cluster = None
    else:
        cluster = LocalCluster(
            n_workers=cfg.n_workers,
            threads_per_worker=cfg.threads_per_worker,
            memory_limit=cfg.memory_limit,
            processes=True,
            dashboard_address=cfg.dashboard_address,
        )
        own = Client(cluster)
    try:
        own.register_plugin(TorchThreads())
        yield own
    finally:
        own.close()
        if cluster is not None:
            cluster.close()


@contextmanager
def environ_restored() -> Iterator[None]:
    """Undo what a Nanny writes into this process's ``os.environ`` (its ``pre-spawn-environ``).

    Benchmarks that start clusters with different settings one after another need this, or the
    first cluster's variables leak into the next.
    """
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def worker_memory(dask_worker) -> dict:  # noqa: ANN001 (distributed.Worker)
    """Memory evidence of one worker, for ``client.run(worker_memory)``.

    Returns its pid, ``memory_limit``, peak and current RSS (``VmHWM``/``VmRSS`` from
    ``/proc/self/status``, bytes), status, and the spill counters of its SpillBuffer
    (``spill_writes`` ever made, ``spilled_bytes`` and ``keys_on_disk`` now).
    """
    vm = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                vm[key] = int(value.split()[0]) * 1024  # kB
    data = dask_worker.data
    metrics = dict(getattr(data, "cumulative_metrics", {}))
    spilled = getattr(data, "spilled_total", None)
    return {
        "pid": os.getpid(),
        "memory_limit": dask_worker.memory_manager.memory_limit,
        "peak_rss": vm["VmHWM"],
        "rss": vm["VmRSS"],
        "status": str(dask_worker.status),
        "spill_writes": int(metrics.get(("disk-write", "count"), 0)),
        "spilled_bytes": int(spilled[0]) if spilled is not None else 0,
        "keys_on_disk": len(getattr(data, "slow", {})),
    }
