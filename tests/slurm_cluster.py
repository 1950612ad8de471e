"""A real single-node SLURM for the dask-jobqueue tests (session-scoped pytest fixtures).

``slurm`` starts ``slurmctld`` and ``slurmd`` (Debian's ``slurmctld slurmd slurm-client``)
with a private ``slurm.conf`` (``AuthType=auth/none``, so no munge), one node ``localhost``
sized by ``slurmd -C`` and one partition ``debug``, waits until the node is idle, and exports
``SLURM_CONF`` (dask-jobqueue's ``sbatch``/``squeue``/``scancel`` read it) for the session.
``pbs`` adds Debian's ``slurm-wlm-torque`` wrappers (``qsub``/``qstat``/``qdel``) over the
same SLURM: that exercises PBSCluster's job script, job-id parsing and cancellation, not PBS.

Teardown cancels every job, waits for an empty queue and stops the two daemons by the
processes this fixture started (never by name). Tests import the fixtures with
``from slurm_cluster import slurm, pbs  # noqa: F401``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SLURM_BINARIES = ("slurmctld", "slurmd", "sinfo", "squeue", "sbatch", "scancel", "srun")
PBS_WRAPPERS = ("qsub", "qstat", "qdel")
INSTALL_HINT = "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client"


def _which(name: str) -> str | None:
    # the daemons live in /usr/sbin, which a non-login PATH may lack
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_line() -> str:
    """``NodeName=localhost NodeAddr=127.0.0.1 CPUs=.. ... RealMemory=..`` from ``slurmd -C``.

    RealMemory must be set: without it jobqueue's ``--mem`` request is refused.
    """
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    first = out.splitlines()[0].split()
    keep = [kv for kv in first[1:] if kv.split("=")[0] in
            ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore",
             "RealMemory")]
    if not any(kv.startswith("RealMemory=") for kv in keep):
        keep.append("RealMemory=1024")
    return "NodeName=localhost NodeAddr=127.0.0.1 " + " ".join(keep) + " State=UNKNOWN"


def _slurm_conf(folder: Path) -> str:
    return "\n".join([
        "ClusterName=adorymtest",
        "SlurmctldHost=localhost(127.0.0.1)",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/none",
        "CredType=cred/none",
        f"StateSaveLocation={folder}/state",
        f"SlurmdSpoolDir={folder}/spool",
        f"SlurmctldPidFile={folder}/slurmctld.pid",
        f"SlurmdPidFile={folder}/slurmd.pid",
        f"SlurmctldLogFile={folder}/slurmctld.log",
        f"SlurmdLogFile={folder}/slurmd.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill",
        "ReturnToService=2",
        "MailProg=/bin/true",
        "MinJobAge=2",
        "KillWait=2",
        _node_line(),
        "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


@dataclass
class SlurmSite:
    """A running single-node SLURM: its config, and the commands the tests need."""

    conf: Path
    folder: Path
    logs: Path
    env: dict[str, str] = field(default_factory=dict)
    daemons: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *args: str, timeout: float = 30) -> str:
        """Run a SLURM (or torque-wrapper) command against this site; its stdout."""
        return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                              env=self.env, check=True).stdout

    def jobs(self) -> list[dict[str, str]]:
        """The queue: ``[{"id", "name", "state"}, ...]``."""
        out = self.run("squeue", "-h", "-o", "%i|%j|%T")
        return [dict(zip(("id", "name", "state"), line.split("|"))) for line in out.splitlines()
                if line.strip()]

    def cancel_all(self) -> None:
        ids = [j["id"] for j in self.jobs()]
        if ids:
            subprocess.run(["scancel", *ids], env=self.env, capture_output=True, timeout=30)

    def wait_empty(self, timeout: float = 30) -> bool:
        """Wait until no job is queued or running; True if it emptied in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.jobs():
                return True
            time.sleep(0.2)
        return False

    def node_state(self) -> str:
        return self.run("sinfo", "-h", "-N", "-o", "%t").strip()


def _log_tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _stop(daemons: list[subprocess.Popen]) -> None:
    for proc in reversed(daemons):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # its own session: started with setsid
            except ProcessLookupError:
                pass
    for proc in reversed(daemons):
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)


def start_slurm(logs: Path) -> SlurmSite:
    """Start slurmctld + slurmd in a private folder; return once the node is idle."""
    missing = [b for b in SLURM_BINARIES if _which(b) is None]
    if missing:
        pytest.skip(f"SLURM not installed (missing {', '.join(missing)}): {INSTALL_HINT} "
                    "failed or was not run")
    # Unix socket paths are limited to 108 bytes: a short folder, not pytest's tmp_path
    folder = Path(tempfile.mkdtemp(prefix="sl-", dir="/tmp"))
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    conf = folder / "slurm.conf"
    conf.write_text(_slurm_conf(folder))
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SLURM_CONF=str(conf),
               # job logs (slurm-%j.out) go here, not into the current directory
               SBATCH_OUTPUT=str(logs / "slurm-%j.out"), SBATCH_ERROR=str(logs / "slurm-%j.out"))
    site = SlurmSite(conf=conf, folder=folder, logs=logs, env=env)
    try:
        for cmd in ([_which("slurmctld"), "-D", "-i", "-f", str(conf)],
                    [_which("slurmd"), "-D", "-N", "localhost", "-f", str(conf)]):
            site.daemons.append(subprocess.Popen(
                cmd, env=env, start_new_session=True, stdin=subprocess.DEVNULL,
                stdout=open(folder / f"{Path(cmd[0]).name}.out", "w"),
                stderr=subprocess.STDOUT,
            ))
            time.sleep(0.3)
        deadline = time.monotonic() + 30
        state = ""
        while time.monotonic() < deadline:
            dead = [p.args[0] for p in site.daemons if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited")
            try:
                state = site.node_state()
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                state = ""
            if state.startswith("idle"):
                return site
            time.sleep(0.3)
        raise RuntimeError(f"node not idle after 30 s (sinfo: {state!r})")
    except Exception as err:
        _stop(site.daemons)
        details = "\n".join(f"--- {name}\n{_log_tail(folder / name)}"
                            for name in ("slurmctld.log", "slurmd.log", "slurmctld.out",
                                         "slurmd.out"))
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"could not start the test SLURM: {err}\n{details}") from err


def stop_slurm(site: SlurmSite) -> None:
    """Cancel every job, wait for an empty queue, stop the daemons we started."""
    try:
        site.cancel_all()
        site.wait_empty(30)
    finally:
        _stop(site.daemons)
        shutil.rmtree(site.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> Iterator[SlurmSite]:
    """A running single-node SLURM (partition ``debug``); ``SLURM_CONF`` set for the session."""
    site = start_slurm(tmp_path_factory.mktemp("slurm-logs"))
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key in ("SLURM_CONF", "SBATCH_OUTPUT", "SBATCH_ERROR"):
                mp.setenv(key, site.env[key])
            yield site
    finally:
        stop_slurm(site)


@pytest.fixture
def slurm_queue_empty(slurm: SlurmSite) -> Iterator[SlurmSite]:
    """The site, with an empty queue before the test and a check that it is empty after."""
    slurm.cancel_all()
    assert slurm.wait_empty(30), f"jobs left from earlier tests: {slurm.jobs()}"
    yield slurm
    # a closed cluster has cancelled its jobs; they may still be COMPLETING for a moment
    emptied = slurm.wait_empty(20)
    left = slurm.jobs()
    slurm.cancel_all()
    slurm.wait_empty(30)
    assert emptied, f"the test left jobs in the queue: {left}"


@pytest.fixture(scope="session")
def pbs(slurm: SlurmSite) -> SlurmSite:
    """The same SLURM behind Debian's torque wrappers ``qsub``/``qstat``/``qdel``."""
    missing = [b for b in PBS_WRAPPERS if _which(b) is None]
    if missing:
        pytest.skip(f"PBS wrappers not installed (missing {', '.join(missing)}): "
                    "apt-get install -y slurm-wlm-torque failed or was not run")
    try:
        slurm.run("qstat", "-Q")  # plain qstat exits 153 on an empty queue
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"slurm-wlm-torque's qstat does not work here: {err}")
    return slurm
