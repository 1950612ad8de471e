"""Reconstructions on a real single-node SLURM through dask-jobqueue (``cluster.kind: slurm``).

The fixture in ``slurm_cluster.py`` starts ``slurmctld`` + ``slurmd`` (auth/none); the workers
run as SLURM jobs on this machine, so pytest's ``tmp_path`` is a folder they see. Every test
leaves the queue empty (checked by ``slurm_queue_empty``).
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from slurm_cluster import slurm, slurm_queue_empty  # noqa: F401 (fixtures)

from adorym_dask import reconstruct
from adorym_dask.config import config_from_dict
from adorym_dask.engine import run
from adorym_dask.simulate import simulate_ptychography

EPOCHS = 24
JOBQUEUE = {"cores": 1, "processes": 1, "memory": "1GB", "queue": "debug",
            "walltime": "00:10:00", "scheduler_options": {"host": "127.0.0.1"}}


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slurm-sim")
    return simulate_ptychography(folder / "sim.h5", object_shape=(64, 64), probe_shape=(32, 32),
                                 n_positions=30, seed=0, progress=False)


def _tree(sim, out: Path, cluster: dict, **over) -> dict:
    tree = {
        "data": {"path": str(sim.path)},
        "model": {"kind": "ptychography", "probe_modes": 1, "slices": 1},
        "probe": {"init": "file", "path": str(sim.probe_path)},
        "object": {"shape_px": [64, 64], "chunks_px": [32, 32]},
        "epochs": EPOCHS,
        "minibatch_size": 10,
        "tile_group_size": 5,
        "output": str(out),
        "cluster": cluster,
        "progress": False,
    }
    tree.update(over)
    return tree


@pytest.fixture(scope="module")
def local_result(sim, tmp_path_factory):
    """The reference: the same run on a 2-worker LocalCluster."""
    out = tmp_path_factory.mktemp("slurm-ref") / "local.zarr"
    result = reconstruct(_tree(sim, out, {"kind": "local", "n_workers": 2}))
    return result.object(), result.probe


def _assert_same(result, reference) -> None:
    obj, probe = reference
    d_obj = np.abs(result.object() - obj).max() / np.abs(obj).max()
    d_probe = np.abs(result.probe - probe).max() / np.abs(probe).max()
    print(f"max |SLURM - LocalCluster| / max |LocalCluster|: object {d_obj:.2e}, "
          f"probe {d_probe:.2e}")
    assert d_obj <= 1e-6 and d_probe <= 1e-6


class QueueWatch:
    """Polls ``squeue`` in a thread: which jobs (by name) were seen running, and how many at
    once."""

    def __init__(self, site, name: str):
        self.site, self.name = site, name
        self.running: set[str] = set()
        self.most_at_once = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                now = {j["id"] for j in self.site.jobs()
                       if j["name"] == self.name and j["state"] == "RUNNING"}
            except subprocess.SubprocessError:
                now = set()
            self.running |= now
            self.most_at_once = max(self.most_at_once, len(now))
            self._stop.wait(0.25)

    def __enter__(self) -> QueueWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def test_slurm_two_workers_as_jobs_equal_local_cluster(slurm_queue_empty, sim, local_result,
                                                       tmp_path):
    """``cluster: {kind: slurm, n_workers: 2}``: two SLURM jobs run the workers (seen running
    together in squeue, and every worker of the run reports a SLURM_JOB_ID of its own) and the
    object and probe equal the 2-worker LocalCluster run to 1e-6 relative."""
    cluster = {"kind": "slurm", "n_workers": 2,
               "jobqueue": {**JOBQUEUE, "job_name": "adorym-kind-slurm"}}
    tree = _tree(sim, tmp_path / "slurm.zarr", cluster)
    jobs_of_workers: list[dict] = []

    def callback(epoch, loss, rec):  # noqa: ARG001
        from distributed import default_client

        jobs_of_workers.append(default_client().run(lambda: os.environ.get("SLURM_JOB_ID")))

    with QueueWatch(slurm_queue_empty, "adorym-kind-slurm") as watch:
        result = run(config_from_dict(tree), callback=callback)
    assert watch.most_at_once == 2, watch.running
    _assert_same(result, local_result)
    job_ids = {j for per_epoch in jobs_of_workers for j in per_epoch.values()}
    assert max(len(per_epoch) for per_epoch in jobs_of_workers) == 2, jobs_of_workers
    assert None not in job_ids and len(job_ids) == 2, jobs_of_workers
    assert job_ids <= watch.running
    assert slurm_queue_empty.wait_empty(20), slurm_queue_empty.jobs()


def test_workers_at_their_lifetime_are_replaced_and_the_run_carries_on(
        slurm_queue_empty, sim, local_result, tmp_path):
    """``worker_lifetime: 10s``: workers leave (staggered) and new jobs replace them while the
    run goes on; at least one replacement job does work, and the result still equals the
    LocalCluster run. The callback slows the driver down so the run lasts ~30 s.

    The job holds both workers (``processes: 2``): distributed forgets a job whose workers
    left only when a worker is named as its job, which grouped workers (``<job>-0``,
    ``<job>-1``) are not, so without adorym-dask's fix no replacement would ever come
    (dask/distributed#9102) and the run would stall."""
    cluster = {"kind": "slurm", "n_workers": 2, "worker_lifetime": "10s",
               "worker_lifetime_stagger": "3s",
               "jobqueue": {**JOBQUEUE, "cores": 2, "processes": 2, "memory": "2GB",
                            "job_name": "adorym-lifetime"}}
    jobs_per_epoch: list[set[str]] = []
    started = []

    def callback(epoch, loss, rec):  # noqa: ARG001
        from distributed import default_client

        ids = default_client().run(lambda: os.environ.get("SLURM_JOB_ID"))
        jobs_per_epoch.append(set(ids.values()))
        if not started:
            started.append(time.monotonic())
        # spread the epochs over ~30 s of the run
        time.sleep(max(0.0, started[0] + 30 * (epoch + 1) / EPOCHS - time.monotonic()))

    # open_cluster shortens lost-worker-timeout (15 s by default: only then does adapt submit
    # a leaver's replacement) while a cluster with lifetimes runs
    # in a thread, so that a run that stalls for want of workers fails the test, not hangs it
    out: dict = {}

    def target() -> None:
        try:
            out["result"] = run(config_from_dict(_tree(sim, tmp_path / "life.zarr", cluster)),
                                callback=callback)
        except BaseException as err:  # noqa: BLE001 - reported below
            out["error"] = err

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(timeout=150)
    assert not worker.is_alive(), (
        f"the run stalled after {len(jobs_per_epoch)} of {EPOCHS} epochs: the workers that left "
        f"at their lifetime were not replaced (jobs seen: {jobs_per_epoch})")
    if "error" in out:
        raise out["error"]
    result = out["result"]
    first = jobs_per_epoch[0]
    later = set().union(*jobs_per_epoch) - first
    assert later, f"no replacement job ran tasks: {jobs_per_epoch}"
    _assert_same(result, local_result)


def _reader(proc: subprocess.Popen, lines: queue.Queue) -> None:
    for line in proc.stdout:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def _wait_for(lines: queue.Queue, seen: list[str], pattern: str, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in seen:
            if m := re.search(pattern, line):
                return m
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
    raise AssertionError(f"no line matching {pattern!r} in:\n" + "\n".join(seen))


def test_cluster_command_serves_runs_until_sigint(slurm_queue_empty, sim, tmp_path):
    """``adorym-dask cluster slurm --workers 2``: prints the scheduler address and the
    dashboard and page links, a run with ``cluster: {address: ...}`` uses its two SLURM
    workers, the page answers, and SIGINT closes it and empties the queue."""
    cmd = [sys.executable, "-m", "adorym_dask.cli", "cluster", "slurm", "--workers", "2",
           "--cores", "1", "--processes", "1", "--memory", "1GB", "--walltime", "00:10:00",
           "--queue", "debug", "--dashboard-address", "127.0.0.1:0",
           "--set", "jobqueue.scheduler_options.host=127.0.0.1",
           "--set", "jobqueue.job_name=adorym-cli"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines: queue.Queue = queue.Queue()
    seen: list[str] = []
    threading.Thread(target=_reader, args=(proc, lines), daemon=True).start()
    try:
        address = _wait_for(lines, seen, r"scheduler address:\s+(tcp://\S+)", 60).group(1)
        page = _wait_for(lines, seen, r"adorym page:\s+(http://\S+/adorym)", 5).group(1)
        _wait_for(lines, seen, r"cluster:\s*$", 5)
        with urllib.request.urlopen(page, timeout=10) as resp:
            assert resp.status == 200
        with QueueWatch(slurm_queue_empty, "adorym-cli") as watch:
            result = reconstruct(_tree(sim, tmp_path / "shared.zarr", {"address": address},
                                       epochs=2))
        assert len(result.loss) == 2 and np.isfinite(result.loss).all()
        assert watch.most_at_once == 2
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, "\n".join(seen)
        _wait_for(lines, seen, r"SIGINT: closing the cluster", 5)
        _wait_for(lines, seen, r"cluster closed", 5)
        assert slurm_queue_empty.wait_empty(20), slurm_queue_empty.jobs()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_slurm_runner_batch_script(slurm_queue_empty, sim, tmp_path):
    """``deploy/slurm-runner.sbatch`` for real: one job of 3 tasks (``-O``: this node has 2
    CPUs) runs the scheduler with the page preload (rank 0), the driver (rank 1) and a worker
    (rank 2) through ``SLURMRunner``, and the reconstruction is written."""
    import shutil

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    for name in ("slurm-runner.sbatch", "run_on_compute_node.py"):
        shutil.copy(deploy / name, tmp_path)
    tree = _tree(sim, tmp_path / "runner.zarr", {}, epochs=2)
    del tree["cluster"]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tree))
    env = dict(slurm_queue_empty.env, PYTHON=sys.executable,
               ADORYM_DASHBOARD_ADDRESS="127.0.0.1:0")
    for key in ("SBATCH_OUTPUT", "SBATCH_ERROR"):  # they would override the script's --output
        env.pop(key, None)
    done = subprocess.run(
        ["sbatch", "--wait", "-O", "--ntasks=3", "--cpus-per-task=1", "--mem-per-cpu=1G",
         "--partition=debug", "--time=00:05:00", "slurm-runner.sbatch", "run.yaml"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    logs = "".join(p.read_text() for p in tmp_path.glob("adorym-*.out"))
    assert done.returncode == 0, done.stderr + logs[-4000:]
    assert "Run preload setup: adorym_dask.dashboard" in logs
    assert "adorym-dask: job" in logs and "1 workers" in logs
    assert re.search(r"adorym-dask: wrote \S+runner\.zarr +\(final loss [0-9.e+-]+\)", logs)
    assert not list(tmp_path.glob("adorym-scheduler-*.json"))
