"""Run one adorym-dask reconstruction inside a single SLURM allocation (dask-jobqueue's
``SLURMRunner``): rank 0 runs the Dask scheduler (with the /adorym dashboard page), rank 1 this
driver, every other rank a worker. Started by ``slurm-runner.sbatch`` through ``srun``::

    srun python run_on_compute_node.py run.yaml [--set key.sub=value ...]

Environment (all optional): ``ADORYM_DASHBOARD_ADDRESS`` (default ``127.0.0.1:8787``: loopback of
the scheduler's node, reached with ``ssh -J <login node> -L 8787:localhost:8787 <node>``; set
``:8787`` where you cannot ssh to your job's node, knowing the page is then open to the whole
cluster network),
``ADORYM_INTERFACE`` (e.g. ``ib0``), ``ADORYM_LOCAL_DIRECTORY`` (node-local scratch, default
``$TMPDIR`` or ``/tmp``), ``ADORYM_SCHEDULER_FILE`` (default
``$SLURM_SUBMIT_DIR/adorym-scheduler-{job_id}.json``: on a filesystem every rank sees).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile


def _worker_memory() -> str | int:
    """Each worker's share of the allocation's memory (``auto`` would count the whole node)."""
    per_cpu = os.environ.get("SLURM_MEM_PER_CPU")
    per_node = os.environ.get("SLURM_MEM_PER_NODE")
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", "1"))
    if per_cpu:
        return int(per_cpu) * cpus * 2**20
    tasks_on_node = os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get(
        "SLURM_TASKS_PER_NODE", "").split("(")[0]
    if per_node and tasks_on_node.isdigit() and int(per_node) > 0:
        return int(per_node) * 2**20 // int(tasks_on_node)
    return "auto"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_file", help="the run file (YAML), on the shared filesystem")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.SUB=VALUE",
                        help="override a run-file value (repeatable)")
    args = parser.parse_args(argv)

    from dask_jobqueue.slurm import SLURMRunner
    from distributed import Client

    import adorym_dask

    job = os.environ.get("SLURM_JOB_ID", "0")
    submit_dir = os.environ.get("SLURM_SUBMIT_DIR", os.getcwd())
    scheduler_file = os.environ.get(
        "ADORYM_SCHEDULER_FILE", os.path.join(submit_dir, "adorym-scheduler-{job_id}.json"))
    interface = os.environ.get("ADORYM_INTERFACE") or None
    scheduler_options = {
        "preload": ["adorym_dask.dashboard"],
        "dashboard_address": os.environ.get("ADORYM_DASHBOARD_ADDRESS", "127.0.0.1:8787"),
    }
    worker_options = {
        "nthreads": int(os.environ.get("SLURM_CPUS_PER_TASK", "1")),
        "memory_limit": _worker_memory(),
        "local_directory": os.environ.get("ADORYM_LOCAL_DIRECTORY")
        or os.environ.get("TMPDIR") or tempfile.gettempdir(),
    }
    if interface:
        scheduler_options["interface"] = worker_options["interface"] = interface

    # Ranks 0 (scheduler) and 2+ (workers) stay inside SLURMRunner(...) until the driver
    # closes it, then exit; only rank 1 goes on to the reconstruction.
    with SLURMRunner(scheduler_file=scheduler_file, scheduler_options=scheduler_options,
                     worker_options=worker_options) as runner, Client(runner) as client:
        client.wait_for_workers(runner.n_workers)
        port = client.scheduler_info().get("services", {}).get("dashboard")
        host = client.scheduler.address.split("://")[-1].rsplit(":", 1)[0]
        print(f"adorym-dask: job {job}: {runner.n_workers} workers, scheduler "
              f"{client.scheduler.address}", flush=True)
        if port:
            loopback = os.environ.get("ADORYM_DASHBOARD_ADDRESS", "127.0.0.1").startswith("127.")
            tunnel = (f"ssh -J <login node> -L 8787:localhost:{port} {socket.gethostname()}"
                      if loopback else f"ssh -L 8787:{host}:{port} <login node>")
            print(f"adorym-dask: dashboard on port {port} of {socket.gethostname()}; from your "
                  f"laptop: {tunnel}  then open http://localhost:8787/adorym", flush=True)
        result = adorym_dask.reconstruct(args.run_file, client, overrides=args.set)
        print(f"adorym-dask: wrote {result.output}  (final loss {result.loss[-1]:.5g}) on "
              f"{socket.gethostname()}", flush=True)
    try:
        os.remove(scheduler_file.format(job_id=job))
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
