"""The ``/adorym`` dashboard page: publisher -> scheduler metadata -> Bokeh page -> browser.

A real browser (Playwright driving Debian's ``/usr/bin/chromium``, headless) checks that the
page's named data sources fill as a run publishes; the page renders in shadow DOM, so the test
asserts on ``Bokeh.documents[0].get_model_by_name(...)``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from distributed import Client, LocalCluster

import adorym_dask.dashboard as dashboard
from adorym_dask.dashboard import publisher as publisher_module
from adorym_dask.dashboard.codec import block_mean, unpack
from adorym_dask.dashboard.page import AdorymPage, latest_run
from adorym_dask.dashboard.plugin import AdorymPagePlugin, page_state
from adorym_dask.dashboard.publisher import DashboardPublisher

PRELOAD = "adorym_dask.dashboard"
CHROMIUM = Path("/usr/bin/chromium")
PATHS = (dashboard.PAGE_PATH, dashboard.INDIVIDUAL_PATH)


# -- helpers -------------------------------------------------------------------------------


@contextlib.contextmanager
def _cluster(*, preload: bool, n_workers: int = 0, scheduler_kwargs: dict | None = None,
             **kw):
    scheduler_kwargs = dict(scheduler_kwargs or {})
    if preload:
        scheduler_kwargs["preload"] = [PRELOAD]
    with LocalCluster(n_workers=n_workers, processes=False, dashboard_address="127.0.0.1:0",
                      scheduler_kwargs=scheduler_kwargs, **kw) as cluster, \
            Client(cluster) as client:
        yield cluster, client


@contextlib.contextmanager
def _without_registration(monkeypatch):
    """Schedulers started inside see distributed's dashboard applications without ours (this
    process imported the module, which registers the page for every later scheduler)."""
    from distributed.dashboard import scheduler as dash

    for path in PATHS:
        monkeypatch.delitem(dash.applications, path, raising=False)
    yield
    monkeypatch.undo()


def _base(cluster) -> str:
    return f"http://127.0.0.1:{cluster.scheduler.http_server.port}"


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def _get_json(url: str) -> dict:
    import json

    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def _browser_page():
    """A headless chromium page (skips when Playwright or chromium is not installed)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright)")
    if not CHROMIUM.exists():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(10_000)
            page.js_errors = []  # errors of the page's scripts (BokehJS), checked by the tests
            page.on("pageerror", lambda err: page.js_errors.append(str(err)))
            yield page
        finally:
            browser.close()


_MODEL_LENGTH = """([name, column, n]) => {
    const docs = window.Bokeh && window.Bokeh.documents;
    if (!docs || !docs.length) return false;
    const m = docs[0].get_model_by_name(name);
    return !!m && m.data[column] !== undefined && m.data[column].length >= n;
}"""


def _wait_length(page, name: str, column: str, n: int) -> None:
    page.wait_for_function(_MODEL_LENGTH, arg=[name, column, n])


def _length(page, name: str, column: str) -> int:
    return page.evaluate(
        "([name, column]) => Bokeh.documents[0].get_model_by_name(name).data[column].length",
        [name, column],
    )


def _title(page) -> str:
    return page.evaluate("() => Bokeh.documents[0].get_model_by_name('title').text")


def _publish_static(pub: DashboardPublisher, rng, *, n_positions: int = 300) -> None:
    """Object, probe, positions and parameters, as the engine sends them after an epoch."""
    pub.object_slice(rng.normal(size=(300, 260, 2)), representation="real_imag", slice_index=0)
    pub.probe(rng.normal(size=(2, 48, 48)) + 1j * rng.normal(size=(2, 48, 48)))
    initial = rng.uniform(0, 200, size=(n_positions, 2))
    pub.positions(initial=initial, current=initial + rng.normal(0, 0.5, size=initial.shape))
    pub.parameters({"distances_m": np.array([0.1, 0.2]), "tilts_rad": np.zeros((2, 3))})


# -- (a) the publisher ---------------------------------------------------------------------


def test_publisher_round_trip_and_bounds(monkeypatch):
    """Every key reaches the scheduler as msgpack-able values, images are <= max_px, positions
    <= MAX_POSITIONS, the minibatch history stays bounded, and a call costs milliseconds."""
    monkeypatch.setattr(publisher_module, "CHUNK", 10)
    monkeypatch.setattr(publisher_module, "MAX_MINIBATCHES", 50)
    rng = np.random.default_rng(0)
    with _cluster(preload=False) as (_, client):
        pub = DashboardPublisher(client, run_id="unit", model_kind="ptychography", epochs=4,
                                 max_px=64)
        start = time.perf_counter()
        for b in range(123):
            pub.minibatch(epoch=b // 40, batch=b % 40, loss=1.0 / (b + 1))
        per_call_ms = (time.perf_counter() - start) / 123 * 1e3
        pub.epoch(epoch=0, loss=0.5)
        pub.epoch(epoch=1, loss=0.25)
        values = rng.normal(size=(500, 300, 2))
        start = time.perf_counter()
        pub.object_slice(values, representation="delta_beta", slice_index=2)
        image_ms = (time.perf_counter() - start) * 1e3
        pub.probe(np.ones((3, 100, 90), np.complex64))
        initial = rng.uniform(0, 100, size=(7, 1000, 2))  # [n_angles, n_tiles, 2] is fine too
        pub.positions(initial=initial, current=initial + 1.0)
        pub.parameters({"distances_m": np.array([1.0, 2.0]), "big": np.zeros(1000),
                        "c": np.ones(2, complex)})
        pub.parameters({"distances_m": np.array([1.5, 2.0])})
        assert pub.flush(timeout_s=10)
        meta = client.get_metadata(["adorym"])

        assert meta["latest"] == "unit"
        run = meta["unit"]
        info = run["info"]
        assert (info["model_kind"], info["epochs"], info["epoch"], info["status"]) == (
            "ptychography", 4, 2, "running")
        # minibatch losses: chunks of 10 rows; chunks older than 50 losses dropped (None)
        chunks = run["loss_minibatch"]
        live = {int(k): unpack(v) for k, v in chunks.items() if v is not None}
        assert sum(len(v) for v in live.values()) <= 50 + 10
        rows = np.concatenate([live[k] for k in sorted(live)])
        assert rows.shape[1] == 3 and rows[-1, 2] == pytest.approx(1 / 123, rel=1e-6)
        assert rows[-1, 0] == 3 and rows[-1, 1] == 122 % 40
        np.testing.assert_array_equal(unpack(run["loss_epoch"]), [[0, 0.5], [1, 0.25]])
        obj = run["object"]
        assert obj["labels"] == ["delta", "beta"] and obj["shape"] == [500, 300]
        first = unpack(obj["first"])
        assert max(first.shape) <= 64 and first.dtype == np.float32
        np.testing.assert_allclose(first, block_mean(values[..., 0], 64), rtol=1e-5, atol=1e-6)
        probe = unpack(run["probe"]["image"])
        assert probe.shape[0] <= 64 and np.nanmax(probe) == pytest.approx(1.0)
        assert run["probe"]["power"] == pytest.approx([1 / 3] * 3)
        pos = run["positions"]
        assert pos["n_total"] == 7000
        a, c = unpack(pos["initial"]), unpack(pos["current"])
        assert a.shape == c.shape and a.shape[1] == 2 and len(a) <= publisher_module.MAX_POSITIONS
        np.testing.assert_allclose(c - a, 1.0, atol=1e-4)
        assert set(run["parameters"]) == {"distances_m"}  # too big and complex ones left out
        np.testing.assert_allclose(unpack(run["parameters"]["distances_m"]), [1.5, 2.0])
        history = unpack(run["parameter_history"]["distances_m"])
        np.testing.assert_allclose(history, [[2, 1.5, 2.0]])  # same epoch: row replaced

        pub.finished()
        assert client.get_metadata(["adorym", "unit", "info"])["status"] == "finished"
    assert per_call_ms < 10, f"minibatch() costs {per_call_ms:.2f} ms"
    assert image_ms < 50, f"object_slice() of 500 x 300 costs {image_ms:.1f} ms"


def test_publisher_without_client_and_on_comm_failure(caplog):
    """No client: every call is a no-op. A failing comm is logged once and never raises."""
    off = DashboardPublisher(None, run_id="x", model_kind="ptychography", epochs=1)
    off.minibatch(epoch=0, batch=0, loss=1.0)
    off.object_slice(np.zeros((4, 4, 2)), representation="real_imag", slice_index=0)
    off.finished()
    assert not off.enabled

    class Broken:
        asynchronous = False
        calls = 0

        def set_metadata(self, keys, value):
            Broken.calls += 1
            raise OSError("comm closed")

    with caplog.at_level(logging.WARNING, logger="adorym_dask.dashboard.publisher"):
        pub = DashboardPublisher(Broken(), run_id="x", model_kind="ptychography", epochs=2,
                                 interval_s=0.01)
        for b in range(5):
            pub.minibatch(epoch=0, batch=b, loss=1.0)
            assert pub.flush(timeout_s=5)
        pub.finished(timeout_s=5)
    warnings = [r for r in caplog.records if "could not publish" in r.getMessage()]
    assert len(warnings) == 1 and Broken.calls >= 2


def test_codec_reductions():
    """Block mean keeps the mean and bounds the size (ragged edges included); real_imag shows
    the phase of the complex block mean."""
    from adorym_dask.dashboard.codec import display_channels, probe_strip

    x = np.arange(7 * 10, dtype=float).reshape(7, 10)
    small = block_mean(x, 4)
    assert small.shape == (3, 4) and small[0, 0] == pytest.approx(x[:3, :3].mean())
    assert block_mean(x, 10) is x
    values = np.stack([np.cos(0.3) * np.ones((50, 40)), np.sin(0.3) * np.ones((50, 40))], -1)
    phase, mag, labels = display_channels(values, representation="real_imag", max_px=16)
    assert labels == ("phase", "magnitude") and max(phase.shape) <= 16
    np.testing.assert_allclose(phase, 0.3, atol=1e-6)
    np.testing.assert_allclose(mag, 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="representation"):
        display_channels(values, representation="amplitude", max_px=16)
    strip, power = probe_strip(np.ones((2, 20, 20)) * np.array([2.0, 1.0])[:, None, None],
                               max_px=10)
    assert strip.shape == (10, 10 + 1 + 10) and np.isnan(strip[:, 10]).all()
    np.testing.assert_allclose(strip[:, :10], 1.0)  # each mode scaled to its own maximum
    assert power == pytest.approx([0.8, 0.2])


def test_page_shows_latest_run_without_a_browser():
    """The document's update, on a stand-in scheduler: the run updated last wins, and each
    named source gets its data."""

    class Meta:
        def __init__(self):
            self.task_metadata: dict = {}

        def set_metadata(self, keys, value):
            d = self.task_metadata
            for k in keys[:-1]:
                d = d.setdefault(k, {})
            d[keys[-1]] = value

        def get_metadata(self, keys, default=None):
            d = self.task_metadata
            for k in keys:
                if not isinstance(d, dict) or k not in d:
                    return default
                d = d[k]
            return d

    sched = Meta()
    rng = np.random.default_rng(1)
    old = DashboardPublisher(sched, run_id="old", model_kind="holography", epochs=5)
    old.epoch(epoch=0, loss=3.0)
    old.finished()
    new = DashboardPublisher(sched, run_id="new", model_kind="ptychography", epochs=5)
    for b in range(4):
        new.minibatch(epoch=0, batch=b, loss=2.0 - b * 0.1)
    new.epoch(epoch=0, loss=1.8)
    _publish_static(new, rng)
    new.finished()
    assert latest_run(sched.get_metadata(["adorym"]))[0] == "new"
    assert latest_run(None) is None and latest_run({"latest": "x"}) is None

    page = AdorymPage(sched)
    page.update()
    s = page.sources
    assert page.run_id == "new"
    np.testing.assert_allclose(s["loss_minibatch"].data["x"], [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(s["loss_epoch"].data["x"], [1.0])
    for name in ("object_phase", "object_magnitude", "probe"):
        assert len(s[name].data["image"]) == 1, name
    assert s["object_phase"].data["dw"] == [260] and s["object_phase"].data["dh"] == [300]
    assert len(s["positions"].data["x0"]) == 300
    assert list(s["parameters"].data["name"]) == ["distances_m", "tilts_rad"]
    assert len(s["parameter_history"].data["xs"]) == 2  # distances_m has 2 values
    assert "finished" in page.title.text and "new" in page.title.text
    before = s["loss_epoch"].data
    page.update()  # nothing changed: the sources are not rebuilt
    assert s["loss_epoch"].data is before


# -- (b) served with the preload, not without -------------------------------------------------


def test_page_served_with_preload_listed_and_on_loopback():
    """The preload serves /adorym and /individual-adorym (200), lists the latter in
    /individual-plots.json, and the dashboard listens on 127.0.0.1 only."""
    with _cluster(preload=True) as (cluster, client):
        base = _base(cluster)
        for path in PATHS:
            assert _status(base + path) == 200, path
        assert dashboard.INDIVIDUAL_PATH in _get_json(base + "/individual-plots.json").values()
        from distributed.comm.utils import get_tcp_server_addresses

        hosts = {a[0] for a in get_tcp_server_addresses(cluster.scheduler.http_server)}
        assert hosts == {"127.0.0.1"}, hosts
        assert client.run_on_scheduler(page_state)[0] == "served"
        url = dashboard.ensure_page(client)  # already served: no plugin needed
        assert url is not None and url.endswith(dashboard.PAGE_PATH)
        assert AdorymPagePlugin.name not in cluster.scheduler.plugins


def test_page_absent_without_preload(monkeypatch):
    with _without_registration(monkeypatch), _cluster(preload=False) as (cluster, client):
        assert _status(_base(cluster) + dashboard.PAGE_PATH) == 404
        assert client.run_on_scheduler(page_state)[0] == "absent"
        plots = _get_json(_base(cluster) + "/individual-plots.json")
        assert dashboard.INDIVIDUAL_PATH not in plots.values()


def test_dask_scheduler_cli_preload(tmp_path):
    """Fresh ``dask scheduler`` processes: 200 with ``--preload adorym_dask.dashboard``, 404
    without (nothing registered by an earlier import)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = {}
    for name, extra in (("with", ["--preload", PRELOAD]), ("without", [])):
        log_path = tmp_path / f"{name}.log"
        cmd = [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
               "--port", "0", "--dashboard-address", "127.0.0.1:0", "--no-show", *extra]
        procs[name] = (subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                        stderr=log_path.open("w"), env=env), log_path)
    try:
        codes = {}
        for name, (proc, log_path) in procs.items():
            deadline = time.monotonic() + 30
            url = None
            while url is None and time.monotonic() < deadline and proc.poll() is None:
                found = re.search(r"dashboard at:\s+(http://127\.0\.0\.1:\d+)/status",
                                  log_path.read_text())
                url = found.group(1) if found else None
                time.sleep(0.1)
            assert url, f"{name}: no dashboard\n{log_path.read_text()[-2000:]}"
            codes[name] = _status(url + dashboard.PAGE_PATH)
    finally:
        for proc, _ in procs.values():
            proc.terminate()
        for proc, _ in procs.values():
            proc.wait(timeout=10)
    assert codes == {"with": 200, "without": 404}


# -- (c) ensure_page on a scheduler started without the preload -----------------------------


def test_ensure_page_mounts_at_run_time(monkeypatch):
    with _without_registration(monkeypatch), _cluster(preload=False) as (cluster, client):
        base = _base(cluster)
        assert _status(base + dashboard.PAGE_PATH) == 404
        url = dashboard.ensure_page(client)
        assert url is not None and url.endswith(dashboard.PAGE_PATH)
        assert url.rpartition(":")[2].startswith(str(cluster.scheduler.http_server.port))
        assert _status(base + dashboard.PAGE_PATH) == 200
        assert _status(base + dashboard.INDIVIDUAL_PATH) == 200
        assert _status(base + "/status") == 200  # the dashboard itself still works
        assert AdorymPagePlugin.name in cluster.scheduler.plugins
        start = time.perf_counter()
        assert dashboard.ensure_page(client) == url  # idempotent, cached
        assert time.perf_counter() - start < 0.01
        # a second mount attempt (e.g. another client) finds the page and does nothing
        client.register_plugin(AdorymPagePlugin(), name=AdorymPagePlugin.name)
        assert _status(base + dashboard.PAGE_PATH) == 200


def test_ensure_page_under_http_prefix(monkeypatch):
    """A dashboard under ``http_prefix``: the page is mounted under it, the URL says so."""
    with _without_registration(monkeypatch), \
            _cluster(preload=False, scheduler_kwargs={"http_prefix": "/sub"}) as (cluster, c):
        url = dashboard.ensure_page(c)
        assert url is not None and url.endswith("/sub" + dashboard.PAGE_PATH), url
        assert _status(_base(cluster) + "/sub" + dashboard.PAGE_PATH) == 200


def test_ensure_page_without_dashboard():
    with LocalCluster(n_workers=0, processes=False, dashboard_address="127.0.0.1:0",
                      scheduler_kwargs={"dashboard": False}) as cluster, Client(cluster) as c:
        assert dashboard.ensure_page(c) is None


# -- (d) a real browser ----------------------------------------------------------------------


def test_browser_page_updates_as_epochs_are_published():
    rng = np.random.default_rng(2)
    with _cluster(preload=True) as (cluster, client), _browser_page() as page:
        page.goto(_base(cluster) + dashboard.PAGE_PATH)
        page.wait_for_function(
            "() => window.Bokeh && Bokeh.documents.length > 0"
            " && Bokeh.documents[0].get_model_by_name('loss_epoch') !== null")
        assert "waiting" in _title(page)

        pub = DashboardPublisher(client, run_id="browser-run", model_kind="ptychography",
                                 epochs=3, max_px=96)
        for epoch in range(3):
            for b in range(5):
                pub.minibatch(epoch=epoch, batch=b, loss=float(np.exp(-(epoch * 5 + b) / 4)))
            pub.epoch(epoch=epoch, loss=float(np.exp(-epoch)))
            _publish_static(pub, rng, n_positions=250)
            _wait_length(page, "loss_epoch", "y", epoch + 1)
            _wait_length(page, "loss_minibatch", "y", 5 * (epoch + 1))
            assert _length(page, "loss_epoch", "y") == epoch + 1
        for name in ("object_phase", "object_magnitude", "probe"):
            _wait_length(page, name, "image", 1)
        _wait_length(page, "positions", "x1", 250)
        _wait_length(page, "parameters", "name", 2)
        _wait_length(page, "parameter_history", "xs", 2)
        pub.finished()
        page.wait_for_function(
            "() => Bokeh.documents[0].get_model_by_name('title').text.includes('finished')")
        title = _title(page)
        assert "browser-run" in title and "ptychography" in title and "epoch 3/3" in title
        assert page.js_errors == []


# -- a real reconstruction publishing through the engine -------------------------------------


def test_reconstruction_publishes_to_the_page(tmp_path):
    """``adorym_dask.reconstruct`` on a LocalCluster with the preload, watched in a browser:
    the engine's publisher fills the loss curves, object, probe and positions, and marks the
    run finished."""
    import adorym_dask
    import adorym_dask.engine as engine

    assert "DashboardPublisher" in Path(engine.__file__).read_text(), \
        "adorym_dask.engine no longer publishes to the dashboard"
    from adorym_dask.simulate import simulate_ptychography

    sim = simulate_ptychography(tmp_path / "sim.h5", object_shape=(64, 64),
                                probe_shape=(32, 32), n_positions=24, seed=0, progress=False)
    epochs = 3
    cfg = {
        "data": {"path": str(sim.path)},
        "model": {"kind": "ptychography", "probe_modes": 1, "slices": 1},
        "probe": {"init": "file", "path": str(sim.probe_path)},
        "object": {"shape_px": [64, 64], "chunks_px": [32, 32]},
        "refine": {"probe": {"start_epoch": 1}, "positions": {"start_epoch": 1}},
        "epochs": epochs,
        "minibatch_size": 8,
        "output": str(tmp_path / "run.zarr"),
        "progress": False,
    }
    with _cluster(preload=True, n_workers=1, threads_per_worker=1) as (cluster, client), \
            _browser_page() as page:
        page.goto(_base(cluster) + dashboard.PAGE_PATH)
        page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0")
        errors: list[BaseException] = []

        def work():
            try:
                adorym_dask.reconstruct(cfg, client)
            except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
                errors.append(err)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        page.set_default_timeout(60_000)
        _wait_length(page, "loss_epoch", "y", 1)
        _wait_length(page, "loss_minibatch", "y", 1)
        thread.join(timeout=120)
        assert not thread.is_alive() and not errors, errors
        _wait_length(page, "loss_epoch", "y", epochs)
        for name in ("object_phase", "object_magnitude", "probe"):
            _wait_length(page, name, "image", 1)
        _wait_length(page, "positions", "x1", 24)
        page.wait_for_function(
            "() => Bokeh.documents[0].get_model_by_name('title').text.includes('finished')")
        assert page.js_errors == []


def test_two_live_runs_do_not_make_the_page_flip():
    """Two runs publishing at once: the page keeps the one started last while both run, even
    when the other published more recently; once it finishes, the live one is shown."""
    info = {"a": {"status": "running", "started": 100.0, "updated": 205.0},
            "b": {"status": "running", "started": 150.0, "updated": 200.0}}
    meta = {k: {"info": v} for k, v in info.items()} | {"latest": "a"}
    assert latest_run(meta, now=206.0)[0] == "b"
    meta["b"]["info"] = {**info["b"], "status": "finished", "updated": 210.0}
    assert latest_run(meta, now=211.0)[0] == "a"
    # a run that stopped publishing long ago (its driver died) is no longer live
    meta["a"]["info"] = {**info["a"], "updated": 0.0}
    assert latest_run(meta, now=1000.0)[0] == "b"


def test_engine_clusters_listen_on_loopback_and_link_there():
    """The cluster a run starts by default (``cluster: {}``) serves its dashboard on
    127.0.0.1 only, and the page link points there even when the scheduler's own address is
    the machine's network address (as on a login node)."""
    from distributed.comm.utils import get_tcp_server_addresses
    from distributed.utils import get_ip

    from adorym_dask.cluster import open_cluster
    from adorym_dask.config import ClusterConfig

    with open_cluster(ClusterConfig(n_workers=1)) as (cluster, client):
        hosts = {a[0] for a in get_tcp_server_addresses(cluster.scheduler.http_server)}
        assert hosts == {"127.0.0.1"}, hosts
        url = dashboard.ensure_page(client)
        assert url.startswith("http://127.0.0.1:") and url.endswith("/adorym"), url
        assert _status(url) == 200
    ip = get_ip()
    if ip.startswith("127."):
        pytest.skip("this machine has no network address besides loopback")
    with LocalCluster(n_workers=0, processes=True, host=ip, dashboard_address="127.0.0.1:0",
                      scheduler_kwargs={"preload": ["adorym_dask.dashboard"]}) as cluster, \
            Client(cluster) as client:
        assert ip in client.dashboard_link  # distributed's link: nothing listens there
        url = dashboard.ensure_page(client)
        assert url.startswith("http://127.0.0.1:"), url
        assert _status(url) == 200


def test_volume_runs_show_the_axial_slice(tmp_path):
    """A tomography run shows the axial (z, x) slice at the chosen row, taken by the workers
    from the blocks they publish: it equals that slice of the published object (max_px
    large enough for no downsampling); runs without a scan send no positions."""
    from adorym_dask.config import config_from_dict
    from adorym_dask.engine import Reconstruction
    from adorym_dask.simulate_tomography import simulate_tomography

    sim = simulate_tomography(str(tmp_path / "tomo.h5"), shape=(8, 24, 24), n_angles=12,
                              n_features=4, seed=2, progress=False)
    cfg = config_from_dict({
        "data": {"path": str(sim.path)}, "model": {"kind": "tomography"},
        "object": {"representation": "delta_beta"}, "epochs": 2,
        "output": str(tmp_path / "t.zarr"), "progress": False,
        "dashboard": {"slice_index": 5, "max_px": 64},
    })
    rec = Reconstruction(cfg)
    with LocalCluster(n_workers=1, processes=False, threads_per_worker=1,
                      dashboard_address=None) as lc, Client(lc) as client:
        result = rec.run(client)
        rec.dashboard.flush(timeout_s=5)
        meta = client.get_metadata(["adorym", rec.token])
    obj = meta["object"]
    assert obj["where"].startswith("row 5") and tuple(obj["shape"]) == (24, 24)
    beta = result.object()[5, :, :, 1].T  # (z, x)
    np.testing.assert_allclose(unpack(obj["second"]), beta, rtol=1e-6, atol=1e-12)
    assert "positions" not in meta


def test_publisher_resends_after_a_passing_comm_failure():
    """A push that fails half way (a comm hiccup) is sent again at the next push: the
    epoch loss and the final status still arrive."""

    class Flaky:
        def __init__(self):
            self.store: dict = {}
            self.fail = 1

        def set_metadata(self, keys, value):
            if self.fail and keys[-1] == "loss_epoch":
                self.fail -= 1
                raise OSError("comm closed")
            self.store[tuple(keys)] = value

    client = Flaky()
    pub = DashboardPublisher(client, run_id="r", model_kind="ptychography", epochs=1)
    pub.epoch(epoch=0, loss=2.5)
    pub.finished()
    assert unpack(client.store[("adorym", "r", "loss_epoch")]).tolist() == [[0.0, 2.5]]
    assert client.store[("adorym", "r", "info")]["status"] == "finished"
