"""``adorym-dask cluster {slurm,pbs,sge} --workers N``: a shared dask-jobqueue cluster.

Starts the scheduler in this process (on the login node) and the workers as batch jobs, prints
the scheduler's address and dashboard links, and keeps everything until Ctrl-C (SIGINT),
SIGTERM or ``--stop-after``; then it closes the cluster, which cancels the jobs. Any number of
runs can use it meanwhile with ``cluster: {address: <the printed address>}``.
"""

from __future__ import annotations

import argparse
import re
import signal
import socket
import sys
import threading
import time
from typing import Any

import yaml
from pydantic import ValidationError

from adorym_dask.config import ClusterConfig, ConfigError

KINDS = ("slurm", "pbs", "sge")
DEFAULT_DASHBOARD = "127.0.0.1:8787"
_OPTIONS = ("cores", "memory", "walltime", "queue", "account", "processes")


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``adorym-dask cluster``."""
    parser.add_argument("kind", choices=KINDS, help="the batch system the workers run on")
    parser.add_argument("--workers", type=int, default=2, metavar="N",
                        help="worker processes to keep (jobs = N / --processes, rounded up)")
    parser.add_argument("--cores", type=int, help="cores per job (site default: jobqueue.yaml)")
    parser.add_argument("--processes", type=int, help="worker processes per job")
    parser.add_argument("--memory", help="memory per job, e.g. 32GB")
    parser.add_argument("--walltime", help="walltime per job, e.g. 02:00:00")
    parser.add_argument("--queue", help="queue / partition")
    parser.add_argument("--account", help="account / project to charge")
    parser.add_argument(
        "--dashboard-address", default=None, metavar="HOST:PORT",
        help="where the dashboard listens (default: the site's jobqueue.yaml "
        "scheduler-options, else 127.0.0.1:8787, another port if that one is taken); reach "
        "it with an SSH tunnel; ':8787' listens on every interface",
    )
    parser.add_argument(
        "--worker-lifetime", default=None, metavar="DURATION",
        help="workers leave this long after they start and new jobs replace them "
        "(default 'auto': 90%% of the walltime; 'null': never, the cluster then stops at the "
        "walltime)",
    )
    parser.add_argument(
        "--stop-after", default=None, metavar="DURATION",
        help="close the cluster after this long, e.g. 8h or 12:00:00 (default: at Ctrl-C, or "
        "at the walltime when workers are not replaced)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="any other cluster setting, e.g. --set jobqueue.interface=ib0 or "
        "--set 'jobqueue.job_extra_directives=[\"--gres=gpu:1\"]' (values are YAML; "
        "repeatable)",
    )


def seconds(text: str | float | int) -> float:
    """``"[D-]HH:MM:SS"``, ``"MM:SS"`` or a dask duration (``"50m"``, ``"8h"``) in seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    text = str(text).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if match and ":" in text:
        days, *parts = match.groups()
        parts = [int(p) for p in parts if p is not None]
        if len(parts) == 2:  # MM:SS
            parts = [0, *parts]
        return float(int(days or 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2])
    from dask.utils import parse_timedelta

    return float(parse_timedelta(text, default="minutes"))


def cluster_config(args: argparse.Namespace) -> ClusterConfig:
    """The :class:`ClusterConfig` that ``adorym-dask cluster`` starts."""
    tree: dict[str, Any] = {
        "kind": args.kind,
        "n_workers": args.workers,
        # a fixed port by default, so that the same SSH tunnel works day after day
        "dashboard_address": args.dashboard_address or DEFAULT_DASHBOARD,
        "jobqueue": {k: getattr(args, k) for k in _OPTIONS if getattr(args, k) is not None},
    }
    if args.dashboard_address:  # asked for here: wins over the site's scheduler-options
        tree["jobqueue"]["scheduler_options"] = {"dashboard_address": args.dashboard_address}
    if args.worker_lifetime is not None:
        tree["worker_lifetime"] = yaml.safe_load(args.worker_lifetime)
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. jobqueue.interface=ib0")
        key, raw = item.split("=", 1)
        keys = key.strip().split(".")
        if keys[0] == "cluster":
            keys = keys[1:]
        node = tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{k}' is not a section")
        node[keys[-1]] = yaml.safe_load(raw)
    try:
        return ClusterConfig.model_validate(tree)
    except ValidationError as err:
        from adorym_dask.config import _error_lines

        raise ConfigError("invalid cluster settings:\n  " + _error_lines(err, prefix="cluster.")
                          ) from None


def _deadline(args: argparse.Namespace, cfg: ClusterConfig, kwargs: dict) -> float | None:
    """Seconds until the command stops by itself (None: only at a signal)."""
    if args.stop_after is not None:
        return seconds(args.stop_after)
    import dask

    walltime = kwargs.get("walltime") or dask.config.get(
        f"jobqueue.{kwargs.get('config_name') or cfg.kind.value}.walltime", default=None)
    if cfg.worker_lifetime is None and walltime:
        from adorym_dask.cluster import walltime_seconds

        return walltime_seconds(walltime)  # workers not replaced: none left after it
    return None


def _links(client) -> tuple[str | None, str | None]:  # noqa: ANN001 (distributed.Client)
    """The dashboard's and the page's links, with the host the dashboard listens on."""
    from adorym_dask.dashboard import ensure_page

    page = ensure_page(client)
    if not page:
        return None, None
    return page.rsplit("/adorym", 1)[0] + "/status", page


def _usage(kind: str, address: str, dashboard: str | None, page: str | None) -> str:
    lines = [
        f"adorym-dask cluster ({kind}) is running; its scheduler runs in this process.",
        f"  scheduler address: {address}",
    ]
    if dashboard:
        port = re.search(r":(\d+)/", dashboard)
        lines += [f"  dashboard:         {dashboard}", f"  adorym page:       {page}"]
        if port:
            lines.append(
                f"  from your laptop:  ssh -L 8787:localhost:{port.group(1)} "
                f"{socket.gethostname()}  then open http://localhost:8787/adorym"
            )
    lines += [
        "Use it from any run file on this cluster (data and output on a shared filesystem):",
        "  cluster:",
        f"    address: {address}",
        f"or: adorym-dask reconstruct run.yaml --set cluster.address={address}",
        "Ctrl-C stops the cluster and cancels its jobs.",
    ]
    return "\n".join(lines)


def run_cluster(args: argparse.Namespace) -> int:
    """Start the cluster, print how to use it, and keep it until a signal or the deadline."""
    from adorym_dask.cluster import jobqueue_kwargs, open_cluster

    cfg = cluster_config(args)
    kwargs = jobqueue_kwargs(cfg)
    limit = _deadline(args, cfg, kwargs)
    stop = threading.Event()
    received: list[str] = []

    def _on_signal(signum, frame):  # noqa: ANN001, ARG001
        received.append(signal.Signals(signum).name)
        stop.set()

    # importing dask_jobqueue (its runner module) replaces the SIGINT handler with sys.exit:
    # import it before ours is installed
    import dask_jobqueue  # noqa: F401

    # SIGHUP: the login shell closed (ssh dropped) - cancel the jobs rather than leave them
    previous = {s: signal.signal(s, _on_signal)
                for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        with open_cluster(cfg) as (cluster, client):
            address = client.scheduler.address
            dashboard, page = _links(client)
            print(_usage(args.kind, address, dashboard, page), flush=True)
            if limit is not None:
                print(f"It stops by itself in {limit:.0f} s.", flush=True)
            started = time.monotonic()
            seen = -1
            while not stop.is_set():
                if limit is not None and time.monotonic() - started >= limit:
                    print("stop time reached", flush=True)
                    break
                try:
                    n = len(client.scheduler_info(n_workers=-1)["workers"])
                except Exception:  # noqa: BLE001 (a busy scheduler: ask again next time)
                    n = seen
                if n != seen:
                    print(f"workers connected: {n} of {cfg.n_workers}", flush=True)
                    seen = n
                stop.wait(1.0)
            if received:
                print(f"{received[0]}: closing the cluster and cancelling its jobs", flush=True)
            # restore the handlers so a second Ctrl-C during the shutdown interrupts it
            for s, handler in previous.items():
                signal.signal(s, handler)
        print("cluster closed", flush=True)
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    """``python -m adorym_dask.cluster_command slurm --workers 2`` (until cli.py wires it)."""
    parser = argparse.ArgumentParser(prog="adorym-dask cluster", description=__doc__)
    add_cluster_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_cluster(args)
    except ConfigError as err:
        print(f"adorym-dask: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
