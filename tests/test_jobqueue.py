"""dask-jobqueue set-up: merging the site's ``jobqueue.yaml`` with a run file's
``cluster.jobqueue`` (the YAML-vs-keyword trap), the generated job scripts, the example site
configs in ``deploy/``, the old ``cluster: {address: ...}`` form, and PBS submission and
cancellation through Debian's ``qsub`` wrappers over the test SLURM."""

from __future__ import annotations

from pathlib import Path

import dask
import pytest
import yaml
from distributed import LocalCluster
from slurm_cluster import pbs, slurm, slurm_queue_empty  # noqa: F401 (fixtures)

from adorym_dask.cluster import DASHBOARD_PRELOAD, jobqueue_kwargs, open_cluster
from adorym_dask.config import ClusterConfig, config_from_dict

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
LOOPBACK = {"scheduler_options": {"host": "127.0.0.1"}}


def _cfg(kind: str = "slurm", **kw) -> ClusterConfig:
    return ClusterConfig(kind=kind, **kw)


def test_site_scheduler_options_survive_a_run_file_scheduler_options():
    """A preload and options the site set in dask config ``jobqueue.slurm.scheduler-options``
    are kept when the run file passes its own ``scheduler_options`` (dask-jobqueue alone would
    replace the whole dict); the run file wins key by key; the dashboard page is preloaded."""
    site = {"preload": ["site_monitoring"], "interface": "ib0", "dashboard_address": ":9999"}
    with dask.config.set({"jobqueue.slurm.scheduler-options": site}):
        kw = jobqueue_kwargs(_cfg(jobqueue={"scheduler_options": {
            "dashboard_address": "127.0.0.1:8787", "idle_timeout": "1h"}}))
    opts = kw["scheduler_options"]
    assert opts["preload"] == ["site_monitoring", DASHBOARD_PRELOAD]
    assert opts["interface"] == "ib0"
    assert opts["dashboard_address"] == "127.0.0.1:8787"
    assert opts["idle_timeout"] == "1h"


def test_lists_extend_the_site_lists():
    site = {"jobqueue.slurm.job-extra-directives": ["--constraint=cpu"],
            "jobqueue.slurm.job-script-prologue": ["module load python"],
            "jobqueue.slurm.worker-extra-args": ["--no-dashboard"]}
    with dask.config.set(site):
        kw = jobqueue_kwargs(_cfg(worker_lifetime=None, jobqueue={
            "job_extra_directives": ["--exclusive"],
            "job-script-prologue": ["source venv/bin/activate"]}))
    assert kw["job_extra_directives"] == ["--constraint=cpu", "--exclusive"]
    assert kw["job_script_prologue"] == ["module load python", "source venv/bin/activate"]
    assert kw["worker_extra_args"] == ["--no-dashboard"]


def test_dashboard_preload_and_loopback_dashboard_by_default():
    with dask.config.set({"jobqueue.pbs.scheduler-options": {}}):
        kw = jobqueue_kwargs(_cfg("pbs"))
    assert kw["scheduler_options"]["preload"] == [DASHBOARD_PRELOAD]
    assert kw["scheduler_options"]["dashboard_address"] == "127.0.0.1:0"


@pytest.mark.parametrize(("walltime", "lifetime", "stagger"), [
    ("01:00:00", "3240s", "162s"),   # auto: 90 % of the walltime, stagger 5 % of the lifetime
    ("00:10:00", "540s", "27s"),
    ("1-00:00:00", "77760s", "3888s"),
])
def test_worker_lifetime_from_the_walltime(walltime, lifetime, stagger):
    kw = jobqueue_kwargs(_cfg(jobqueue={"walltime": walltime}))
    args = kw["worker_extra_args"]
    assert args[args.index("--lifetime") + 1] == lifetime
    assert args[args.index("--lifetime-stagger") + 1] == stagger


def test_worker_lifetime_from_the_site_walltime_given_or_off():
    with dask.config.set({"jobqueue.slurm.walltime": "02:00:00"}):
        auto = jobqueue_kwargs(_cfg())["worker_extra_args"]
        given = jobqueue_kwargs(_cfg(worker_lifetime="50m"))["worker_extra_args"]
        off = jobqueue_kwargs(_cfg(worker_lifetime=None))["worker_extra_args"]
    assert auto[auto.index("--lifetime") + 1] == "6480s"
    assert given[given.index("--lifetime") + 1] == "50m"
    assert "--lifetime" not in off


def test_slurm_job_script_has_the_directives_and_lifetime(tmp_path):
    cfg = _cfg(n_workers=4, jobqueue={
        "cores": 8, "processes": 2, "memory": "16GB", "queue": "debug", "account": "abc123",
        "walltime": "01:00:00", "job_extra_directives": ["--constraint=cpu"],
        "log_directory": str(tmp_path), **LOOPBACK})
    from dask_jobqueue import SLURMCluster

    with dask.config.set({"jobqueue.slurm.job-extra-directives": ["--exclusive"]}), \
            SLURMCluster(**jobqueue_kwargs(cfg)) as cluster:
        script = cluster.job_script()
        scheduler = cluster.scheduler
        assert DASHBOARD_PRELOAD in str(scheduler.preloads[0].name)
    for line in ("#SBATCH -p debug", "#SBATCH -A abc123", "#SBATCH -t 01:00:00",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --exclusive", "#SBATCH --constraint=cpu",
                 f"#SBATCH -o {tmp_path}/"):
        assert line in script, script
    assert "--lifetime 3240s --lifetime-stagger 162s" in script
    assert "--nthreads 4" in script and "--nworkers 2" in script


def test_pbs_job_script_has_the_directives_and_lifetime(tmp_path):
    cfg = _cfg("pbs", jobqueue={"cores": 4, "memory": "8GB", "queue": "workq",
                                "account": "abc123", "walltime": "00:20:00",
                                "job_extra_directives": ["-l place=excl"],
                                "log_directory": str(tmp_path), **LOOPBACK})
    from dask_jobqueue import PBSCluster

    with PBSCluster(**jobqueue_kwargs(cfg)) as cluster:
        script = cluster.job_script()
    for line in ("#PBS -q workq", "#PBS -A abc123", "#PBS -l walltime=00:20:00",
                 "#PBS -l select=1:ncpus=4", "#PBS -l place=excl"):
        assert line in script, script
    assert "--lifetime 1080s --lifetime-stagger 54s" in script


@pytest.mark.parametrize("kind", ["slurm", "pbs"])
def test_deploy_site_configs_give_job_scripts(kind, tmp_path):
    """``deploy/jobqueue-<kind>.yaml`` loaded as the site's dask config: the job script has its
    settings (local-directory expanded on the node) and the scheduler keeps its preload."""
    site = yaml.safe_load((DEPLOY / f"jobqueue-{kind}.yaml").read_text())
    from dask_jobqueue import PBSCluster, SLURMCluster

    cls = {"slurm": SLURMCluster, "pbs": PBSCluster}[kind]
    # key by key, as dask merges a jobqueue.yaml over the package's defaults
    with dask.config.set({f"jobqueue.{kind}.{k}": v for k, v in site["jobqueue"][kind].items()}):
        kw = jobqueue_kwargs(_cfg(kind, jobqueue={"log_directory": str(tmp_path),
                                                  "scheduler_options": {"host": "127.0.0.1"}}))
        assert kw["scheduler_options"]["preload"] == [DASHBOARD_PRELOAD]
        assert kw["scheduler_options"]["dashboard_address"] == "127.0.0.1:8787"
        kw["scheduler_options"]["dashboard_address"] = "127.0.0.1:0"  # 8787 may be taken here
        with cls(**kw) as cluster:
            script = cluster.job_script()
    assert "--local-directory ${TMPDIR:-/tmp}" in script
    assert "--lifetime 6480s" in script
    assert ("#SBATCH -p normal" if kind == "slurm" else "#PBS -q workq") in script
    assert "adorym-worker" in script


def test_old_address_config_still_works():
    """``cluster: {address: ...}`` (before ``kind`` existed) infers ``kind: address`` and joins
    the running scheduler; ``cluster: {}`` is a LocalCluster; ``scheduler: sync`` still parses."""
    tree = {"data": {"path": "x.h5"}, "cluster": {"address": "tcp://127.0.0.1:8786"}}
    assert config_from_dict(tree).cluster.kind.value == "address"
    assert ClusterConfig().kind.value == "local"
    assert ClusterConfig(scheduler="sync").scheduler.value == "sync"
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as lc, \
            open_cluster(ClusterConfig(address=lc.scheduler_address)) as (cluster, client):
        assert cluster is None
        assert client.submit(sum, [1, 2]).result() == 3


def test_pbs_submission_and_cancellation_through_qsub(pbs, slurm_queue_empty, tmp_path,
                                                      monkeypatch):
    """Tests PBSCluster's submission and cancellation only, not PBS itself: Debian has no PBS
    server, so Debian's ``slurm-wlm-torque`` wrappers (``qsub``/``qstat``/``qdel``) turn the
    PBS job script into a job on the test SLURM. The job shows in ``qstat`` and ``squeue``, its
    worker connects, and closing the cluster empties the queue."""
    cfg = _cfg("pbs", n_workers=1, worker_lifetime=None, jobqueue={
        "cores": 1, "memory": "1GB", "queue": "debug", "walltime": "00:10:00",
        "job_name": "adorym-pbs", **LOOPBACK})
    # the torque qsub wrapper ignores #PBS -o/-e and writes <script>.o<id> into the current
    # folder: keep those out of the checkout
    monkeypatch.chdir(tmp_path)
    with open_cluster(cfg) as (cluster, client):
        client.wait_for_workers(1, timeout=60)
        (job_id,) = [j["id"] for j in slurm_queue_empty.jobs() if j["name"] == "adorym-pbs"]
        assert job_id in pbs.run("qstat")
        assert client.submit(sum, [1, 2]).result() == 3
    assert slurm_queue_empty.wait_empty(20), slurm_queue_empty.jobs()


def test_cluster_command_arguments_make_the_cluster_config():
    """``adorym-dask cluster slurm ...``: the options and ``--set`` land in ClusterConfig; an
    explicit --dashboard-address wins over the site's scheduler-options."""
    import argparse

    from adorym_dask.cluster_command import add_cluster_arguments, cluster_config, seconds

    parser = argparse.ArgumentParser()
    add_cluster_arguments(parser)
    args = parser.parse_args([
        "slurm", "--workers", "6", "--cores", "8", "--processes", "2", "--memory", "32GB",
        "--walltime", "02:00:00", "--queue", "normal", "--account", "abc",
        "--dashboard-address", "127.0.0.1:9000", "--worker-lifetime", "null",
        "--set", "jobqueue.interface=ib0",
        "--set", 'cluster.jobqueue.job_extra_directives=["--exclusive"]'])
    cfg = cluster_config(args)
    assert cfg.kind.value == "slurm" and cfg.n_workers == 6 and cfg.worker_lifetime is None
    assert cfg.jobqueue == {
        "cores": 8, "processes": 2, "memory": "32GB", "walltime": "02:00:00",
        "queue": "normal", "account": "abc", "interface": "ib0",
        "job_extra_directives": ["--exclusive"],
        "scheduler_options": {"dashboard_address": "127.0.0.1:9000"}}
    with dask.config.set({"jobqueue.slurm.scheduler-options": {"dashboard_address": ":1"}}):
        assert jobqueue_kwargs(cfg)["scheduler_options"]["dashboard_address"] == "127.0.0.1:9000"
    default = cluster_config(parser.parse_args(["pbs"]))
    assert default.dashboard_address == "127.0.0.1:8787" and default.jobqueue == {}
    assert seconds("1-01:00:00") == 90000 and seconds("8h") == 28800 and seconds("05:30") == 330


def test_shared_path_check(tmp_path, monkeypatch):
    """Before a run on a cluster, every worker must see the data file (same size) and a file
    written by the driver into the output folder; what a worker cannot see is named with the
    fix. (A worker on another machine is emulated by hiding the driver's marker file from
    the in-process worker.)"""
    import os

    from distributed import Client, LocalCluster

    from adorym_dask import cluster as cl
    from adorym_dask.config import ConfigError

    data = tmp_path / "scan.h5"
    data.write_bytes(b"x" * 100)
    out = tmp_path / "run.zarr"
    out.mkdir()
    monkeypatch.setattr(cl, "VISIBILITY_RETRIES", 0)
    # as a worker on a node without this filesystem, or with another file at the path
    assert cl._sees([("data file /nowhere/scan.h5", "/nowhere/scan.h5", None)]) == [
        f"data file /nowhere/scan.h5 is not visible on worker host {os.uname().nodename}"]
    other = cl._sees([("data file", str(data), 99)])
    assert "another file" in other[0] and "100 bytes" in other[0]
    with LocalCluster(n_workers=1, processes=False, threads_per_worker=1,
                      dashboard_address=None) as lc, Client(lc) as client:
        cl.check_shared_paths(client, read=[str(data)], write=[str(out)])  # all visible
        assert not list(out.iterdir())  # the marker is removed
        real = os.path.exists
        monkeypatch.setattr(os.path, "exists",
                            lambda p: ".adorym-visible-" not in str(p) and real(p))
        with pytest.raises(ConfigError, match=r"output folder .* not visible.*not /tmp"):
            cl.check_shared_paths(client, read=[str(data)], write=[str(out)])
        assert not list(out.iterdir())
