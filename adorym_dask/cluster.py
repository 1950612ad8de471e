"""Dask client set-up: a LocalCluster by default, dask-jobqueue batch jobs, or a running
scheduler's address; every cluster gets the torch-threads plugin and the dashboard page."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import dask
from distributed import Client, LocalCluster, WorkerPlugin

from adorym_dask.config import JOBQUEUE_KINDS, ClusterConfig, ConfigError

log = logging.getLogger(__name__)


class TorchThreads(WorkerPlugin):
    """Give torch one intra-op thread per worker thread (tasks already run in parallel).

    Without it, every task of a worker with ``T`` threads would start ``n_cores`` torch
    threads, oversubscribing the node ``T`` times over.
    """

    name = "adorym-dask-torch-threads"

    def setup(self, worker) -> None:  # noqa: ANN001 (distributed.Worker)
        import torch

        torch.set_num_threads(1)


DASHBOARD_PRELOAD = "adorym_dask.dashboard"
# jobqueue keywords that a run file's value would *replace* in the site's YAML (dask-jobqueue
# does not merge them): we merge them ourselves, dicts key by key and lists extended.
_MERGED = {"scheduler_options": dict, "job_extra_directives": list, "worker_extra_args": list,
           "job_script_prologue": list, "job_directives_skip": list}


def _cluster_class(kind: str) -> type:
    import signal
    import threading

    # dask_jobqueue's runner module installs a SIGINT handler calling sys.exit on import: keep
    # the user's Ctrl-C a KeyboardInterrupt (in a driver or a notebook)
    # (and outside the main thread, where signal.signal raises, that import would fail)
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None
    real = signal.signal
    if not main:
        signal.signal = lambda signum, handler: None  # type: ignore[assignment]
    try:
        import dask_jobqueue
    finally:
        signal.signal = real
        if main and handler is not None:
            signal.signal(signal.SIGINT, handler)

    base = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster,
            "sge": dask_jobqueue.SGECluster}[kind]
    return _replacing_grouped_jobs(base)


def _replacing_grouped_jobs(base: type) -> type:
    """``base`` (a JobQueueCluster) that also replaces a job of several worker processes
    once all of them have left (at their ``--lifetime``).

    SpecCluster forgets a job whose worker left only when the worker's name is the job's;
    the workers of a job with ``processes > 1`` are named ``<job>-<k>``, so the job stayed
    planned and adapt never submitted its replacement (dask/distributed#9102): the run
    would lose every worker at the lifetime and wait forever.
    """
    import asyncio

    from dask.utils import parse_timedelta

    class Cluster(base):
        def _update_worker_status(self, op, msg):  # noqa: ANN001 (distributed's signature)
            if op == "remove":
                info = self.scheduler_info["workers"].get(msg, {})
                name = str(info.get("name", ""))
                job = name.rsplit("-", 1)[0] if name not in self.workers else None
                if job and job in self.workers:
                    def forget() -> None:
                        alive = any(str(d.get("name", "")).rsplit("-", 1)[0] == job
                                    for d in self.scheduler_info["workers"].values())
                        if job in self.workers and not alive:
                            self._futures.add(asyncio.ensure_future(self.workers[job].close()))
                            del self.workers[job]

                    delay = parse_timedelta(dask.config.get("distributed.deploy.lost-worker-timeout"))
                    asyncio.get_running_loop().call_later(delay, forget)
            super()._update_worker_status(op, msg)

    Cluster.__name__ = Cluster.__qualname__ = base.__name__
    return Cluster


def walltime_seconds(walltime: str) -> float:
    """Seconds of a batch walltime: ``[D-]HH:MM:SS``, ``HH:MM``, ``MM`` (SLURM/PBS forms)."""
    text = str(walltime).strip()
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [float(p) for p in text.split(":")]
    if len(parts) == 1 and days:  # D-HH
        seconds = parts[0] * 3600
    elif len(parts) == 1:  # minutes (SLURM's bare number)
        seconds = parts[0] * 60
    elif len(parts) == 2 and days:  # D-HH:MM
        seconds = parts[0] * 3600 + parts[1] * 60
    elif len(parts) == 2:  # MM:SS
        seconds = parts[0] * 60 + parts[1]
    else:
        seconds = parts[-3] * 3600 + parts[-2] * 60 + parts[-1]
    return days * 86400 + seconds


def _lifetime_args(cfg: ClusterConfig, walltime: str | None) -> list[str]:
    """``--lifetime`` and ``--lifetime-stagger`` for the workers (see ClusterConfig)."""
    if cfg.worker_lifetime is None:
        return []
    if cfg.worker_lifetime == "auto":
        if not walltime:
            return []
        seconds = 0.9 * walltime_seconds(walltime)
        lifetime = f"{int(seconds)}s"
        stagger = cfg.worker_lifetime_stagger or f"{max(1, int(0.05 * seconds))}s"
    else:
        lifetime = cfg.worker_lifetime
        if cfg.worker_lifetime_stagger:
            stagger = cfg.worker_lifetime_stagger
        else:
            from dask.utils import parse_timedelta

            stagger = f"{max(1, int(0.05 * parse_timedelta(lifetime)))}s"
    return ["--lifetime", lifetime, "--lifetime-stagger", stagger]


def jobqueue_kwargs(cfg: ClusterConfig) -> dict[str, Any]:
    """The keyword arguments for dask-jobqueue's cluster class of ``cfg.kind``.

    The site's settings (dask config ``jobqueue.<kind>``, from ``jobqueue.yaml``) stay in
    force: keywords not in ``cfg.jobqueue`` are left to dask-jobqueue, which reads them from
    there. ``scheduler_options``, ``job_extra_directives``, ``worker_extra_args``,
    ``job_script_prologue`` and ``job_directives_skip`` would *replace* the YAML's value when
    passed, so they are merged here (dicts key by key, the run file winning; lists extended).
    The dashboard page is preloaded on the scheduler, the dashboard listens on
    ``cfg.dashboard_address`` unless the YAML or run file set one, and the workers get a
    staggered ``--lifetime`` before the walltime (:class:`ClusterConfig.worker_lifetime`).
    """
    kw = {str(k).replace("-", "_"): v for k, v in cfg.jobqueue.items()}
    section = kw.get("config_name") or cfg.kind.value  # the site's jobqueue.<section>
    if "walltime" in kw and not isinstance(kw["walltime"], str):
        raise ConfigError(f"cluster.jobqueue.walltime must be a quoted string such as "
                          f"\"02:00:00\", not {kw['walltime']!r} (YAML reads 2:00:00 unquoted "
                          "as a number of seconds)")
    for key, kind_of in _MERGED.items():
        site = dask.config.get(f"jobqueue.{section}.{key.replace('_', '-')}", default=None)
        mine = kw.get(key)
        if mine is not None and not isinstance(mine, kind_of):
            raise ConfigError(f"cluster.jobqueue.{key} must be a {kind_of.__name__}, not "
                              f"{type(mine).__name__}: {mine!r}")
        if kind_of is dict:
            kw[key] = {**(site or {}), **(mine or {})}
        else:
            kw[key] = [*(site or []), *[x for x in (mine or []) if x not in (site or [])]]
    opts = kw["scheduler_options"]
    opts["preload"] = _with_page(opts.get("preload"))
    if cfg.dashboard_address is None:  # no dashboard; the HTTP server stays on loopback
        opts["dashboard"] = False
        opts.setdefault("dashboard_address", "127.0.0.1:0")
    elif "dashboard_address" not in opts:
        opts["dashboard_address"] = cfg.dashboard_address
    walltime = kw.get("walltime") or dask.config.get(f"jobqueue.{section}.walltime", default=None)
    if not any(str(a).startswith("--lifetime") for a in kw["worker_extra_args"]):
        kw["worker_extra_args"] += _lifetime_args(cfg, walltime)
    return kw


def _start_jobqueue(cfg: ClusterConfig):
    """A dask-jobqueue cluster scaled to ``cfg.n_workers`` (kept there when workers leave)."""
    kw = jobqueue_kwargs(cfg)
    try:
        cluster = _cluster_class(cfg.kind.value)(**kw)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"cluster.jobqueue (with the site's jobqueue.{cfg.kind.value} config): "
                          f"{err}. Set the missing option under cluster.jobqueue or in "
                          "~/.config/dask/jobqueue.yaml (see deploy/)") from None
    per_job = max(1, int(cluster._dummy_job.worker_processes or 1))  # jobqueue's processes
    jobs = -(-cfg.n_workers // per_job)
    if lifetime_in_use(kw):
        # workers leave before the walltime: adapt keeps the jobs by submitting new ones
        cluster.adapt(minimum_jobs=jobs, maximum_jobs=jobs)
    else:
        cluster.scale(jobs=jobs)
    log.info("asked %s for %d job(s) of %d worker(s) (%d workers); the scheduler runs here at "
             "%s", cfg.kind.value, jobs, per_job, jobs * per_job, cluster.scheduler_address)
    return cluster


def lifetime_in_use(kw: dict[str, Any]) -> bool:
    """Whether the workers of jobqueue keywords ``kw`` leave at a ``--lifetime``."""
    return any(str(a) == "--lifetime" for a in kw.get("worker_extra_args", []))


# A worker that left at its lifetime is replaced once Dask counts it lost: 15 s by default,
# during which the run has one worker fewer. Shortened while a cluster with lifetimes runs.
REPLACEMENT_DELAY = "2s"


def start_cluster(cfg: ClusterConfig):
    """Start the cluster ``cfg`` describes (``local`` or a jobqueue kind); the caller closes it."""
    if cfg.kind.value in JOBQUEUE_KINDS:
        return _start_jobqueue(cfg)
    return LocalCluster(
        n_workers=cfg.n_workers,
        threads_per_worker=cfg.threads_per_worker,
        memory_limit=cfg.memory_limit,
        processes=True,
        dashboard_address=cfg.dashboard_address,
        scheduler_kwargs={"preload": _with_page(dask.config.get("distributed.scheduler.preload",
                                                                 default=[]))},
    )


def _with_page(preload) -> list[str]:  # noqa: ANN001 (a str or a list, as dask config has it)
    """The user's scheduler preloads (dask config) and the dashboard page's."""
    preload = [preload] if isinstance(preload, str) else list(preload or [])
    return preload if DASHBOARD_PRELOAD in preload else [*preload, DASHBOARD_PRELOAD]


def prepare_client(client: Client) -> None:
    """What every cluster we run on gets: one torch thread per worker thread, the page."""
    from adorym_dask.dashboard import ensure_page

    client.register_plugin(TorchThreads())
    page = ensure_page(client)
    if page:
        log.info("dashboard page: %s", page)


@contextmanager
def open_cluster(cfg: ClusterConfig) -> Iterator[tuple[Any, Client]]:
    """Start (local, jobqueue kinds) or join (``address``) the cluster of ``cfg``.

    Yields ``(cluster, client)``; ``cluster`` is None for ``address``. What was started is
    closed on exit (jobqueue jobs are cancelled).
    """
    if cfg.kind.value == "address":
        cluster = None
        try:
            own = Client(cfg.address, timeout="30s")
        except OSError as err:
            raise ConfigError(f"cluster.address {cfg.address}: no scheduler answers ({err}). "
                              "Start one (adorym-dask cluster slurm ..., dask scheduler) or fix "
                              "the address") from None
        with _opened(cluster, own):
            yield cluster, own
        return
    quick = cfg.kind.value in JOBQUEUE_KINDS and lifetime_in_use(jobqueue_kwargs(cfg))
    with dask.config.set({"distributed.deploy.lost-worker-timeout": REPLACEMENT_DELAY}
                         if quick else {}):
        cluster = start_cluster(cfg)
        with _opened(cluster, Client(cluster)) as own:
            yield cluster, own


@contextmanager
def _opened(cluster, client: Client) -> Iterator[Client]:
    """Prepare ``client``; close it and the ``cluster`` we started (if any) on exit."""
    try:
        prepare_client(client)
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


@contextmanager
def dask_client(cfg: ClusterConfig, client: Client | None = None) -> Iterator[Client | None]:
    """Yield the client to run on (None under the sync scheduler); close what we started."""
    if client is not None:
        prepare_client(client)
        yield client
        return
    if cfg.scheduler.value == "sync":
        yield None
        return
    with open_cluster(cfg) as (_, own):
        yield own


def _sees(paths: list[tuple[str, str, int | None]]) -> list[str]:
    """On a worker: which of ``(what, path, size)`` it cannot see as the driver saw them."""
    import socket

    host = socket.gethostname()
    missing = []
    for what, path, size in paths:
        if not os.path.exists(path):  # NFS may cache a folder's listing: look again first
            for _ in range(VISIBILITY_RETRIES):
                with suppress(OSError):
                    os.listdir(os.path.dirname(path) or ".")
                if os.path.exists(path):
                    break
                time.sleep(1.0)
        if not os.path.exists(path):
            missing.append(f"{what} is not visible on worker host {host}")
        elif size is not None and os.path.isfile(path) and os.path.getsize(path) != size:
            missing.append(f"{what} is another file on worker host {host} "
                           f"({os.path.getsize(path)} bytes, {size} here)")
    return missing


VISIBILITY_RETRIES = 10  # seconds a worker looks again for a file it does not see


def _wait_for_a_worker(client: Client) -> None:
    """Wait for the first worker, saying so every minute (batch jobs may queue for long)."""
    waited = 0
    while not client.scheduler_info().get("workers"):
        if waited and waited % 60 == 0:
            log.info("waiting for the first worker (%d s so far; batch jobs may be queued: "
                     "squeue -u $USER / qstat -u $USER)", waited)
        with suppress(TimeoutError):
            client.wait_for_workers(1, timeout=5)
        waited += 5


def check_shared_paths(client: Client, *, read: list[str], write: list[str]) -> None:
    """Check that the workers see the data (``read``) and the output folders (``write``).

    A marker file written here into each output folder must be visible to a worker: a folder of
    the same name on another machine (``/tmp`` of a login node) is not enough. URLs (s3://, ...)
    are not checked. Raises :class:`ConfigError` naming the path and the fix.
    """
    from adorym_dask.storage import location

    checks, markers = [], []
    for path in read:
        if path and not location.is_url(str(path)) and os.path.exists(path):
            size = os.path.getsize(path) if os.path.isfile(path) else None
            checks.append((f"data file {os.path.abspath(path)}", os.path.abspath(path), size))
    for folder in write:
        if folder and not location.is_url(str(folder)) and os.path.isdir(folder):
            marker = os.path.join(os.path.abspath(folder), f".adorym-visible-{uuid.uuid4().hex}")
            try:
                with open(marker, "w") as fh:
                    fh.write("written by the driver to check the workers see this folder\n")
            except OSError:
                continue  # the run's own write check reports this
            markers.append(marker)
            checks.append((f"output folder {os.path.abspath(folder)} (a file written into it "
                           "here)", marker, None))
    if not checks:
        return
    try:
        _wait_for_a_worker(client)
        found = client.run(_sees, checks)  # every connected worker
        missing = sorted({m for ms in found.values() for m in ms})
    finally:
        for marker in markers:
            with suppress(OSError):
                os.remove(marker)
    if missing:
        raise ConfigError(
            "the workers cannot see the run's files: " + "; ".join(missing) + ". Put data.path and output on a filesystem every node mounts (not /tmp of "
            "this machine), e.g. your home or project folder"
        )


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
