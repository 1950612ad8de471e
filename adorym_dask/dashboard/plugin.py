"""Serve ``/adorym`` on a scheduler that started without the preload.

:class:`AdorymPagePlugin`, registered from the driver (``client.register_plugin``), mounts a
second Bokeh server app holding the page on the scheduler's HTTP application. That relies on
private parts of distributed (``scheduler.http_application``, its ``applications`` list and
``distributed.dashboard.core.BokehApplication``); a page mounted this way works but is not in
the dashboard's "More..." menu nor in ``/individual-plots.json`` (use the preload for those).
"""

from __future__ import annotations

import logging
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

log = logging.getLogger(__name__)

__all__ = ["AdorymPagePlugin", "PAGE_PATH", "INDIVIDUAL_PATH", "page_state", "mount_page",
           "applications"]

PAGE_PATH = "/adorym"
INDIVIDUAL_PATH = "/individual-adorym"


def _page(scheduler: Any, extra: dict, doc: Any) -> None:
    from adorym_dask.dashboard.page import doc_fn

    doc_fn(scheduler, extra, doc)


def _individual_page(scheduler: Any, extra: dict, doc: Any) -> None:
    from adorym_dask.dashboard.page import individual_doc_fn

    individual_doc_fn(scheduler, extra, doc)


def applications() -> dict[str, Any]:
    """The page's Bokeh document functions by URL path (``doc_fn(scheduler, extra, doc)``)."""
    return {PAGE_PATH: _page, INDIVIDUAL_PATH: _individual_page}


def _bokeh_apps(scheduler: Any) -> list[Any]:
    http = getattr(scheduler, "http_application", None)
    if http is None:
        return []
    try:
        from bokeh.server.tornado import BokehTornado
    except ImportError:
        return []
    return [a for a in getattr(http, "applications", ()) if isinstance(a, BokehTornado)]


def page_state(dask_scheduler: Any) -> tuple[str, str]:
    """Whether the scheduler serves the page, and its dashboard's URL prefix.

    Runs on the scheduler (``client.run_on_scheduler(page_state)``).

    Returns
    -------
    state : str
        ``"served"``, ``"absent"`` (a dashboard without the page) or ``"no-dashboard"``.
    prefix : str
        The dashboard's ``http_prefix`` (``"/"`` by default).
    """
    apps = _bokeh_apps(dask_scheduler)
    if not apps:
        return "no-dashboard", "/"
    prefix = apps[0].prefix or "/"
    if any(PAGE_PATH in a.app_paths for a in apps):
        return "served", prefix
    return "absent", prefix


def dashboard_hosts(dask_scheduler: Any) -> list[str]:
    """The addresses the scheduler's HTTP server (the dashboard) listens on.

    Runs on the scheduler (``client.run_on_scheduler(dashboard_hosts)``); ``[]`` if unknown.
    """
    from distributed.comm.utils import get_tcp_server_addresses

    server = getattr(dask_scheduler, "http_server", None)
    if server is None:
        return []
    try:
        return sorted({str(a[0]) for a in get_tcp_server_addresses(server)})
    except (AttributeError, ValueError, OSError):
        return []


def mount_page(scheduler: Any) -> bool:
    """Serve the page on ``scheduler``'s dashboard unless it is there; ``False`` if it cannot.

    Call on the scheduler's event loop (a plugin's ``start`` is).
    """
    state, _ = page_state(scheduler)
    if state != "absent":
        return state == "served"
    from tornado.ioloop import IOLoop

    from distributed.dashboard.core import BokehApplication
    from distributed.dashboard.scheduler import template_variables

    first = _bokeh_apps(scheduler)[0]
    app = BokehApplication(applications(), scheduler, prefix=first.prefix,
                           template_variables=template_variables(scheduler))
    scheduler.http_application.add_application(app)
    app.initialize(IOLoop.current())
    app.start()
    log.info("dashboard: serving %s on the scheduler's dashboard", PAGE_PATH)
    return True


class AdorymPagePlugin(SchedulerPlugin):
    """Mount the ``/adorym`` page when registered (idempotent: once per scheduler)."""

    name = "adorym-dashboard-page"
    idempotent = True

    def start(self, scheduler: Any) -> None:
        mount_page(scheduler)
