"""The admin HTTP app: metrics, status, the dashboard and reloads, on ``config.admin``.

It reads the same objects the proxy uses (``app.pools``, the monitor's window) and owns none of
them. aiohttp serves it: this is not the request path, so convenience wins.

- ``GET /metrics``  Prometheus text format (balancer/metrics.py)
- ``GET /status``   JSON: per pool its strategy, panic, concentration; per backend its url,
  weight, state, in-flight, requests and live share
- ``GET /``         the dashboard (balancer/static/), which polls /status
- ``POST /reload``  re-read the config file and apply it exactly as SIGHUP does: 200 with the
  share diff when applied, 409 with the problems when refused
- ``GET /healthz``  liveness for a container HEALTHCHECK

When ``admin_token`` is set, mutating endpoints need ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
import logging
import time
from importlib import resources
from typing import Any

from aiohttp import web

from balancer import __version__
from balancer.config import Address
from balancer.metrics import CONTENT_TYPE, build_registry, render
from balancer.monitor import Monitor
from balancer.pool import Pool

log = logging.getLogger("balancer.admin")

APP_KEY = web.AppKey("balancer_app", object)
MONITOR_KEY = web.AppKey("balancer_monitor", Monitor)
REGISTRY_KEY = web.AppKey("balancer_registry", object)

STATIC = resources.files("balancer") / "static"


# --------------------------------------------------------------------------- status


def pool_status(pool: Pool, monitor: Monitor | None) -> dict[str, Any]:
    """One pool as /status shows it."""
    now = pool.clock()
    shares = monitor.shares(pool.name) if monitor is not None else {}
    conc = monitor.concentration(pool.name) if monitor is not None else None
    backends = []
    for b in pool.backends:
        backends.append({
            "name": b.name,
            "url": b.url,
            "weight": b.weight,
            "backup": b.backup,
            "state": b.state(now),
            "health_reason": b.health_reason,
            "in_flight": b.in_flight,
            "max_connections": b.max_connections,
            "requests": b.requests_total,
            "errors": sum(b.errors.values()),
            "ejections": b.ejections,
            "share": round(shares.get(b.key, 0.0), 4),
        })
    return {
        "strategy": pool.config.strategy.name,
        "panic": pool.panic,
        "concentrated": None if conc is None else {
            "backend": conc.backend, "share": round(conc.share, 4), "requests": conc.requests},
        "allow_concentration": pool.config.allow_concentration,
        # Set while DNS discovery keeps the last good set because the guard refused the new one.
        "discovery_refused": getattr(pool, "discovery_refused", None),
        "in_flight": pool.in_flight,
        "waiting": pool.waiting,
        "rejected": dict(pool.rejected),
        "window_requests": monitor.window_requests(pool.name) if monitor is not None else 0,
        "backends": backends,
    }


def status(app: Any, monitor: Monitor | None) -> dict[str, Any]:
    """The whole /status document."""
    config = app.config
    started = getattr(app, "started_at", None)
    for pool in app.pools.values():
        pool.state_changed()  # judge panic now, not at the next request
    return {
        "version": __version__,
        "config": getattr(app, "config_path", config.source),
        "uptime": round(time.time() - started, 1) if started else 0.0,
        "reloads": dict(getattr(app, "reloads", {})),
        "guard": {"max_share": config.guard.max_share, "live_margin": config.guard.live_margin,
                  "live_window": config.guard.live_window,
                  "live_min_requests": config.guard.live_min_requests},
        "pools": {name: pool_status(pool, monitor) for name, pool in app.pools.items()},
    }


# --------------------------------------------------------------------------- handlers


async def handle_metrics(request: web.Request) -> web.Response:
    body = render(request.app[REGISTRY_KEY])  # type: ignore[arg-type]
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def handle_status(request: web.Request) -> web.Response:
    doc = status(request.app[APP_KEY], request.app[MONITOR_KEY])
    return web.json_response(doc, headers={"Cache-Control": "no-store"})


async def handle_healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def handle_dashboard(request: web.Request) -> web.Response:
    html = (STATIC / "index.html").read_bytes()
    return web.Response(body=html, content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-cache"})


async def handle_reload(request: web.Request) -> web.Response:
    app = request.app[APP_KEY]
    denied = _authorize(request, app)
    if denied is not None:
        return denied
    peer = request.remote or "?"
    log.info("reload requested over the admin endpoint by %s", peer)
    result = await app.reload()  # type: ignore[attr-defined]
    if result.applied:
        return web.json_response({"applied": True, "diff": result.diff})
    return web.json_response({"applied": False, "problems": list(result.problems),
                              "diff": result.diff}, status=409)


def _authorize(request: web.Request, app: Any) -> web.Response | None:
    """None when the request may mutate; else the 401 to answer."""
    token = getattr(app.config, "admin_token", None)
    if not token:
        return None
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
        return None
    log.warning("admin: refused %s %s from %s: missing or wrong bearer token",
                request.method, request.path, request.remote or "?")
    return web.json_response({"error": "unauthorized: send Authorization: Bearer <admin_token>"},
                             status=401, headers={"WWW-Authenticate": 'Bearer realm="balancer"'})


def build_admin_app(app: Any, monitor: Monitor | None = None) -> web.Application:
    """The aiohttp application for ``app`` (anything with config, pools, reloads, reload())."""
    monitor = monitor if monitor is not None else Monitor()
    web_app = web.Application()
    web_app[APP_KEY] = app
    web_app[MONITOR_KEY] = monitor
    web_app[REGISTRY_KEY] = build_registry(app, monitor)
    web_app.router.add_get("/", handle_dashboard)
    web_app.router.add_get("/metrics", handle_metrics)
    web_app.router.add_get("/status", handle_status)
    web_app.router.add_get("/healthz", handle_healthz)
    web_app.router.add_post("/reload", handle_reload)
    web_app.router.add_static("/static", str(STATIC), append_version=False)
    return web_app


# --------------------------------------------------------------------------- the service


class AdminServer:
    """Serves the admin app on ``config.admin`` beside the proxy (a Service of app.py)."""

    def __init__(self, monitor: Monitor | None = None) -> None:
        self.monitor = monitor
        self._runner: web.AppRunner | None = None
        self.address: Address | None = None
        self._bound: Address | None = None

    async def start(self, app: Any) -> None:
        addr = app.config.admin
        runner = web.AppRunner(build_admin_app(app, self.monitor), access_log=None,
                               handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, addr.host, addr.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            # Worded as the proxy's own bind error ("listen ADDR: why"), naming the config key;
            # the text is the whole message: "admin 127.0.0.1:9100: address already in use".
            text = exc.strerror or str(exc)
            failed = OSError(f"admin {addr}: {text.rsplit(': ', 1)[-1].lower()}")
            failed.errno = exc.errno
            raise failed from None
        self._runner = runner
        self._bound = addr
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        host, port = sock.getsockname()[:2]
        self.address = Address(host, port)
        # Worded without "listening on": that phrase is the proxy's own start line.
        log.info("admin: dashboard at http://%s/ (also /metrics, /status, /reload)",
                 self.address)

    def on_reload(self, app: Any) -> None:
        if self._bound is not None and app.config.admin != self._bound:
            log.warning("admin changed from %s to %s: takes effect on restart",
                        self._bound, app.config.admin)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
