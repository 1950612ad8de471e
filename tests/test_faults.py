"""Fault tolerance with real processes killed by SIGKILL (no mocks).

Every case is compared with an uninterrupted run of the same science config (the seed makes
runs deterministic): the object to ``max|a - b| <= 1e-6 max|a|``, the probe likewise, and the
loss history entry by entry.

- worker loss: a worker process of a 2-worker LocalCluster is killed mid-epoch (the nanny
  restarts it); the run finishes without error (zarr and memory stores, and with
  ``allowed-failures: 0`` so that the engine's own recovery from its last commit runs);
- driver loss: ``adorym-dask reconstruct`` is killed mid-epoch, several times, and resumed with
  ``--resume`` (sync scheduler, and once with the config's own LocalCluster, whose processes
  die with the driver's process group);
- resume refusal: a changed science key is refused (exit code 2, the key named), unless
  ``--allow-config-change``; a changed ``epochs`` is allowed.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from adorym_dask.config import config_from_dict
from adorym_dask.engine import Reconstruction, run
from adorym_dask.optimizers import as_real
from adorym_dask.simulate import simulate_ptychography
from adorym_dask.storage.checkpoint import CheckpointError, load_checkpoint

CLI = Path(sys.executable).parent / "adorym-dask"
EPOCHS = 4
RTOL = 1e-6
POLL_S = 0.002


# -- data, configs, reference runs -----------------------------------------------------------------
@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """96x96 object, 32x32 detector, 60 positions: with minibatches of 8 tiles (groups of 4) an
    epoch has 8 minibatches, so there is time to kill something in the middle of one."""
    tmp = tmp_path_factory.mktemp("faults_sim")
    return simulate_ptychography(
        tmp / "sim.h5", object_shape=(96, 96), probe_shape=(32, 32), n_positions=60, seed=0,
    )


def _tree(sim, out: Path, *, store: str = "zarr", **over) -> dict:
    tree = {
        "data": {"path": str(sim.path)},
        "model": {"kind": "ptychography", "probe_modes": 1, "slices": 1},
        "probe": {"init": "file", "path": str(sim.probe_path)},
        "object": {"shape_px": [96, 96], "chunks_px": [48, 48], "store": store},
        "epochs": EPOCHS,
        "minibatch_size": 8,
        "tile_group_size": 4,
        "seed": 5,
        "output": str(out),
        "cluster": {"scheduler": "sync"},
        "progress": False,
    }
    tree.update(over)
    return tree


@pytest.fixture(scope="module")
def reference(sim, tmp_path_factory):
    """Uninterrupted runs (sync scheduler), one per (store, epochs), computed on first use."""
    cache: dict = {}

    def get(store: str = "zarr", epochs: int = EPOCHS) -> dict:
        if (store, epochs) not in cache:
            out = tmp_path_factory.mktemp("faults_ref") / f"{store}-{epochs}.zarr"
            run(config_from_dict(_tree(sim, out, store=store, epochs=epochs)))
            cache[store, epochs] = _stored(out)
        return cache[store, epochs]

    return get


def _stored(out: Path) -> dict:
    """What a run left in its store: the published object, probe and loss, and the commit."""
    ck = load_checkpoint(out)
    return {
        "object": np.asarray(zarr.open_array(store=str(out), path="object", mode="r")[...]),
        "probe": np.asarray(zarr.open_array(store=str(out), path="probe", mode="r")[...]),
        "loss": np.asarray(zarr.open_array(store=str(out), path="loss", mode="r")[...]),
        "ck_probe": as_real(ck.params["probe"].value),
        "ck_loss": np.asarray(ck.loss),
        "epoch": ck.epoch,
        "step": ck.step,
    }


def _assert_same(got: dict, ref: dict) -> None:
    a, b = ref["object"], got["object"]
    assert np.abs(a).max() > 0
    err = np.abs(a - b).max()
    assert err <= RTOL * np.abs(a).max(), f"object differs by {err} (max |a| {np.abs(a).max()})"
    for key in ("probe", "ck_probe"):
        err = np.abs(ref[key] - got[key]).max()
        assert err <= RTOL * np.abs(ref[key]).max(), f"{key} differs by {err}"
    assert len(ref["loss"]) == ref["epoch"]
    for key in ("loss", "ck_loss"):
        assert got[key].shape == ref[key].shape, (key, got[key], ref[key])
        np.testing.assert_allclose(got[key], ref[key], rtol=RTOL, err_msg=key)
    assert (got["epoch"], got["step"]) == (ref["epoch"], ref["step"])


def _wait_for(cond, timeout: float, what: str, alive=lambda: True) -> None:
    """Poll ``cond()`` every few ms; fail after ``timeout`` s or once ``alive()`` is False."""
    end = time.monotonic() + timeout
    while not cond():
        if not alive():
            pytest.fail(f"the run ended before {what}")
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(POLL_S)


def _commit(out: Path):
    """The run's last commit, or None while there is none yet."""
    try:
        return load_checkpoint(out)
    except CheckpointError:
        return None


# -- 1. worker loss --------------------------------------------------------------------------------
@pytest.fixture
def cluster_client(request):
    """A fresh 2-process LocalCluster per test (a test kills its workers). With indirect
    parametrization ``request.param`` is the scheduler's ``allowed-failures``."""
    import dask
    from distributed import Client, LocalCluster

    allowed = getattr(request, "param", None)
    settings = {} if allowed is None else {"distributed.scheduler.allowed-failures": allowed}
    with dask.config.set(settings), LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
    ) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        yield client


def _run_in_thread(rec: Reconstruction, client):
    box: dict = {}

    def target():
        try:
            box["result"] = rec.run(client)
        except BaseException as err:  # noqa: BLE001 (re-raised by the test)
            box["error"] = err

    thread = threading.Thread(target=target, name="reconstruction", daemon=True)
    thread.start()
    return thread, box


def _kill_worker_mid_epoch(sim, tmp_path, client, store: str, *, busy: bool, caplog):
    """Run on ``client`` in a thread; in epoch 1, batch >= 2, SIGKILL one worker process (with
    ``busy``: one that is running a task right now). Returns the store and the kill info."""
    out = tmp_path / f"{store}.zarr"
    rec = Reconstruction(config_from_dict(_tree(sim, out, store=store)))
    pids_before = client.run(os.getpid)
    assert len(pids_before) == 2
    caplog.set_level(logging.WARNING, logger="adorym_dask.engine")
    thread, box = _run_in_thread(rec, client)

    def mid_epoch():
        if rec.epoch != 1 or rec.batch < 2:
            return False
        if store == "memory":
            return True
        ck = _commit(out)  # disk stores commit every minibatch: the commit says so too
        return ck is not None and ck.epoch == 1 and ck.batch >= 2

    _wait_for(mid_epoch, 60, "epoch 1, batch 2", alive=thread.is_alive)
    victim = None
    if busy:
        end = time.monotonic() + 20
        while victim is None and thread.is_alive() and time.monotonic() < end:
            victim = next((w for w, keys in client.processing().items() if keys), None)
    victim = victim or sorted(pids_before)[0]
    pid = pids_before[victim]
    at = {"alive": thread.is_alive(), "epoch": rec.epoch, "batch": rec.batch, "step": rec.step}
    os.kill(pid, signal.SIGKILL)

    thread.join(120)
    assert not thread.is_alive(), "the run did not finish within 120 s of the kill"
    if "error" in box:
        raise box["error"]
    # The kill landed while the run was going, in the middle of epoch 1 ...
    assert at["alive"] and at["epoch"] == 1 and at["batch"] >= 2, at
    assert rec.step > at["step"], (rec.step, at)
    # ... the worker really died (the nanny started a new process) ...
    client.wait_for_workers(2, timeout=60)
    pids_after = client.run(os.getpid)
    assert pid not in pids_after.values()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    return _stored(out), at


@pytest.mark.parametrize("store", ["zarr", "memory"])
def test_worker_killed_mid_epoch(sim, tmp_path, reference, cluster_client, store, caplog):
    """Dask reruns the lost tasks (zarr: their inputs were never overwritten; memory: from the
    lineage of the lost blocks) and the run equals an uninterrupted one."""
    got, _ = _kill_worker_mid_epoch(sim, tmp_path, cluster_client, store, busy=False,
                                    caplog=caplog)
    _assert_same(got, reference(store))


# A replay after Reconstruction._recover must build its graph under new keys: the failed
# futures may still be alive (held by the exception's traceback), so the scheduler still knows
# the old keys as erred. The engine puts its recovery count in every key.


@pytest.mark.parametrize("cluster_client", [0], indirect=True)
@pytest.mark.parametrize("store", ["zarr", "memory"])
def test_worker_killed_engine_recovers_from_last_commit(
    sim, tmp_path, reference, cluster_client, store, caplog
):
    """With ``allowed-failures: 0`` a task running on the killed worker fails the minibatch
    (KilledWorker): the engine goes back to its last commit (zarr: the last minibatch; memory:
    the end of epoch 0, whose blocks it wrote to zarr slots) and replays from there."""
    got, at = _kill_worker_mid_epoch(sim, tmp_path, cluster_client, store, busy=True,
                                     caplog=caplog)
    recovered = [r for r in caplog.records if "lost work on the cluster" in r.getMessage()]
    assert recovered, f"the kill at {at} did not make the engine recover from its last commit"
    _assert_same(got, reference(store))


# -- 2. driver loss --------------------------------------------------------------------------------
def _write_yaml(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def _start(args: list[str], log: Path, **kw) -> subprocess.Popen:
    fh = open(log, "ab")  # noqa: SIM115 (closed with the process by _finish/_kill)
    proc = subprocess.Popen([str(CLI), "reconstruct", *args], stdout=fh, stderr=subprocess.STDOUT,
                            **kw)
    proc.log_file = fh  # type: ignore[attr-defined]
    return proc


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    try:
        rc = proc.wait(timeout)
    finally:
        proc.log_file.close()  # type: ignore[attr-defined]
    assert rc == 0, f"adorym-dask exited with {rc}:\n{log.read_text()[-4000:]}"


def _kill_when(proc: subprocess.Popen, out: Path, epoch: int, batch: int, *, delay: float,
               group: bool = False) -> tuple[int, int, int]:
    """SIGKILL the driver (or its whole process group) ``delay`` s after its commit reaches
    (``epoch``, >= ``batch``); returns the commit (epoch, batch, step) the kill left."""

    def reached():
        ck = _commit(out)
        return ck is not None and (ck.epoch, ck.batch) >= (epoch, batch)

    _wait_for(reached, 90, f"commit epoch {epoch} batch {batch}",
              alive=lambda: proc.poll() is None)
    time.sleep(delay)
    assert proc.poll() is None, "the driver finished before it could be killed"
    if group:
        members = _group_pids(proc.pid)
        assert len(members) >= 3, f"expected the driver and 2 workers in the group: {members}"
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    proc.log_file.close()  # type: ignore[attr-defined]
    ck = load_checkpoint(out)
    assert (ck.epoch, ck.batch) >= (epoch, batch)
    assert ck.epoch < EPOCHS, "killed after the last epoch: the kill proves nothing"
    return ck.epoch, ck.batch, ck.step


def test_driver_killed_repeatedly_then_resumed(sim, tmp_path, reference):
    """``adorym-dask reconstruct`` (sync scheduler) killed in epoch 0, resumed, killed in a later
    epoch (a few ms after a commit, i.e. in the middle of the next minibatch), resumed again, ...
    ends equal to an uninterrupted run, with exactly ``epochs`` losses."""
    out = tmp_path / "run.zarr"
    cfg = _write_yaml(tmp_path / "run.yaml", _tree(sim, out))
    log = tmp_path / "log.txt"
    kills = []
    proc = _start([str(cfg)], log)
    kills.append(_kill_when(proc, out, 0, 1, delay=0.0))
    for epoch, batch, delay in ((1, 3, 0.01), (2, 5, 0.03)):
        proc = _start([str(cfg), "--resume"], log)
        kills.append(_kill_when(proc, out, epoch, batch, delay=delay))
    proc = _start([str(cfg), "--resume"], log)
    _finish(proc, log)
    steps = [k[2] for k in kills]
    assert steps == sorted(steps) and kills[-1][0] >= 2, kills
    got = _stored(out)
    assert len(got["loss"]) == EPOCHS
    _assert_same(got, reference("zarr"))


def test_driver_with_local_cluster_killed_mid_epoch(sim, tmp_path, reference):
    """The config's own 2-worker LocalCluster: the driver's process group (driver, nannies,
    workers) is SIGKILLed mid-epoch; ``--resume`` starts a new cluster and ends equal."""
    out = tmp_path / "run.zarr"
    tree = _tree(sim, out, cluster={"n_workers": 2, "threads_per_worker": 1,
                                    "dashboard_address": None})
    cfg = _write_yaml(tmp_path / "run.yaml", tree)
    log = tmp_path / "log.txt"
    proc = _start([str(cfg)], log, start_new_session=True)
    try:
        killed = _kill_when(proc, out, 1, 2, delay=0.01, group=True)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # Every process of the group is gone (no orphaned workers writing into the store).
    _wait_for(lambda: not _group_alive(proc.pid), 30, "the process group to die")
    proc = _start([str(cfg), "--resume"], log, start_new_session=True)
    try:
        _finish(proc, log)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    got = _stored(out)
    assert got["step"] > killed[2]
    _assert_same(got, reference("zarr"))


def _group_pids(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    import psutil

    pids = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                pids.append(p.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return pids


def _group_alive(pgid: int) -> bool:
    return bool(_group_pids(pgid))


# -- 3. resume refusal -----------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), "reconstruct", *args], capture_output=True, text=True,
                          timeout=120)


def test_resume_refuses_a_changed_science_key(sim, tmp_path, reference):
    out = tmp_path / "run.zarr"
    run(config_from_dict(_tree(sim, out, epochs=2)))
    cfg = _write_yaml(tmp_path / "run.yaml", _tree(sim, out, epochs=2))
    before = (out / "_checkpoint.npz").read_bytes()

    refused = _cli(str(cfg), "--resume", "--set", "optimizer.step_size=0.5", "--set", "epochs=3")
    assert refused.returncode == 2, refused.stderr
    assert "optimizer.step_size" in refused.stderr
    assert "--allow-config-change" in refused.stderr
    assert "epochs:" not in refused.stderr, "epochs may change on resume: not a difference"
    assert "Traceback" not in refused.stderr
    assert (out / "_checkpoint.npz").read_bytes() == before, "a refused resume changed the run"

    # Changing only epochs is allowed: 2 epochs + 2 more equal an uninterrupted 4-epoch run.
    extended = _cli(str(cfg), "--resume", "--set", f"epochs={EPOCHS}")
    assert extended.returncode == 0, extended.stderr
    _assert_same(_stored(out), reference("zarr", EPOCHS))

    # With --allow-config-change the changed step size is accepted and the run goes on.
    allowed = _cli(str(cfg), "--resume", "--allow-config-change", "--set",
                   "optimizer.step_size=0.5", "--set", f"epochs={EPOCHS + 1}")
    assert allowed.returncode == 0, allowed.stderr
    ck = load_checkpoint(out)
    assert ck.epoch == EPOCHS + 1 and len(ck.loss) == EPOCHS + 1
    np.testing.assert_allclose(ck.loss[:EPOCHS], reference("zarr", EPOCHS)["loss"], rtol=RTOL)
    assert ck.config["optimizer"]["step_size"] == 0.5
