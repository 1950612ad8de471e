"""adorym's page on the Dask dashboard: ``/adorym`` (and ``/individual-adorym``).

Load it as a scheduler preload, so that the page is served and listed in the dashboard's
"More..." menu and in ``/individual-plots.json`` (JupyterLab's dask-labextension panes)::

    dask scheduler --preload adorym_dask.dashboard
    LocalCluster(scheduler_kwargs={"preload": ["adorym_dask.dashboard"]})
    # or dask config distributed.scheduler.preload: [adorym_dask.dashboard]
    # or dask-jobqueue scheduler_options={"preload": ["adorym_dask.dashboard"]}

Importing this module adds the page to ``distributed.dashboard.scheduler.applications`` (a
private dict of distributed that each scheduler reads when it builds its dashboard), so every
scheduler started *afterwards in this process* serves it too, e.g. a LocalCluster's.

For a scheduler that is already running without it, :func:`ensure_page` mounts the page at run
time (not in the menu). The driver pushes the data with
:class:`~adorym_dask.dashboard.publisher.DashboardPublisher`.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

from adorym_dask.dashboard.plugin import (
    INDIVIDUAL_PATH,
    PAGE_PATH,
    AdorymPagePlugin,
    applications,
    page_state,
)

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)

__all__ = ["ensure_page", "page_url", "register", "dask_setup", "PAGE_PATH", "INDIVIDUAL_PATH"]


def register() -> bool:
    """Add the page to the dashboard applications of schedulers started in this process.

    Returns
    -------
    bool
        ``False`` if this distributed has no Bokeh dashboard (Bokeh missing or too old).
    """
    try:
        from distributed.dashboard import scheduler as dashboard
    except ImportError:  # distributed serves a "bokeh is missing" page instead
        return False
    for path, fn in applications().items():
        dashboard.applications.setdefault(path, fn)
    return True


def dask_setup(scheduler: Any) -> None:
    """Preload hook: the page is already registered by the import; nothing else to do."""


def page_url(client: Client, *, prefix: str = "/") -> str | None:
    """The page's address as the client sees the dashboard, or ``None`` without a dashboard.

    ``prefix`` is the dashboard's ``http_prefix``; it is added unless the dashboard link (dask
    config ``distributed.dashboard.link``) already ends with it.
    """
    try:
        link = client.dashboard_link
    except (KeyError, AttributeError, TypeError):  # no "dashboard" service on the scheduler
        return None
    if not link:
        return None
    base, _, last = link.rstrip("/").rpartition("/")
    if last != "status":
        base = link.rstrip("/")
    prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
    if prefix and not base.endswith(prefix):
        base += prefix
    return f"{base}{PAGE_PATH}"


_ENSURED: weakref.WeakKeyDictionary[Any, tuple[str, str | None]] = weakref.WeakKeyDictionary()


def ensure_page(client: Client) -> str | None:
    """Make the connected scheduler serve the page; return its URL (``None``: no dashboard).

    If the scheduler started without the preload, :class:`AdorymPagePlugin` mounts the page at
    run time (not in the menu). Idempotent and cheap: one or two round trips per client and
    scheduler, then cached. Never raises (e.g. a scheduler that cannot import this package, or
    that refuses pickled functions): it logs a warning and returns ``None``.
    """
    address = getattr(client.scheduler, "address", None)
    cached = _ENSURED.get(client)
    if cached is not None and cached[0] == address:
        return cached[1]
    try:
        state, prefix = client.run_on_scheduler(page_state)
        if state == "absent":
            client.register_plugin(AdorymPagePlugin(), name=AdorymPagePlugin.name)
            state, prefix = client.run_on_scheduler(page_state)
    except Exception as err:  # noqa: BLE001 - the page is optional; a run must not fail here
        log.warning("dashboard: cannot serve %s on the scheduler (%s: %s)", PAGE_PATH,
                    type(err).__name__, err)
        return None
    url = page_url(client, prefix=prefix) if state == "served" else None
    if url is not None:
        url = _reachable(url, client)
    _ENSURED[client] = (address, url)
    return url


def _reachable(url: str, client: Client) -> str:
    """``url`` with the host the dashboard listens on when that is loopback only.

    ``client.dashboard_link`` takes its host from the scheduler's address (e.g. a login
    node's ``10.1.2.3``), but a dashboard bound to ``127.0.0.1`` answers only there.
    """
    from urllib.parse import urlsplit, urlunsplit

    from adorym_dask.dashboard.plugin import dashboard_hosts

    try:
        hosts = client.run_on_scheduler(dashboard_hosts)
    except Exception:  # noqa: BLE001 - keep the link as distributed gives it
        return url
    loopback = [h for h in hosts if h.startswith("127.") or h == "::1"]
    parts = urlsplit(url)
    if hosts and len(loopback) == len(hosts) and parts.hostname not in hosts:
        host = loopback[0] if ":" not in loopback[0] else f"[{loopback[0]}]"
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit(parts._replace(netloc=netloc))
    return url


register()
