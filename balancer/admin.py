"""The admin HTTP app: metrics, status, the dashboard and reloads, on ``config.admin``.

It reads the same objects the proxy uses (``app.pools``, the monitor's window) and owns none of
them. aiohttp serves it: this is not the request path, so convenience wins.

- ``GET /metrics``  Prometheus text format (balancer/metrics.py)
- ``GET /status``   JSON: per pool its strategy, panic, concentration, and the live window's
  per-second requests per backend (``history``, the dashboard's chart); per backend its url,
  weight, state, in-flight, requests, live share and p99 latency; the running config's sha256,
  when it was applied, the reload events and any probation
- ``GET /config``   the running config as it was read, ``admin_token`` and ``digest_key`` values
  masked, its sha256 in ``X-Config-SHA256`` (and ``ETag``)
- ``GET /``         the dashboard (balancer/static/), which polls /status
- ``POST /reload``  re-read the config file and apply it exactly as SIGHUP does: 200 with the
  share diff when applied, 409 with the problems when refused
- ``GET /healthz``  liveness for a container HEALTHCHECK

When ``admin_token`` is set, mutating endpoints and ``/config`` (it shows the whole routing)
need ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import re
import time
from collections.abc import Hashable, Mapping
from importlib import resources
from typing import Any

import yaml
from aiohttp import web

from balancer import __version__
from balancer.appview import AppView
from balancer.config import Address
from balancer.metrics import CONTENT_TYPE, build_registry, render
from balancer.monitor import Monitor
from balancer.pool import Pool

log = logging.getLogger("balancer.admin")

APP_KEY = web.AppKey("balancer_app", AppView)
MONITOR_KEY = web.AppKey("balancer_monitor", Monitor)
REGISTRY_KEY = web.AppKey("balancer_registry", object)

STATIC = resources.files("balancer") / "static"

#: Config keys whose values GET /config never shows, wherever they sit in the file.
SECRET_KEYS = frozenset({"admin_token", "digest_key"})
MASK = '"********"'


# --------------------------------------------------------------------------- status


def pool_status(pool: Pool, monitor: Monitor | None) -> dict[str, Any]:
    """One pool as /status shows it."""
    now = pool.clock()
    shares = monitor.shares(pool.name) if monitor is not None else {}
    conc = monitor.concentration(pool.name) if monitor is not None else None
    p99 = monitor.latency_p99(pool.name) if monitor is not None else {}
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
            "p99": _seconds(p99.get(b.key)),
        })
    return {
        "strategy": pool.config.strategy.name,
        "panic": pool.judge(now)[2],
        "concentrated": None if conc is None else {
            "backend": conc.backend, "share": round(conc.share, 4), "requests": conc.requests,
            "cause": conc.cause, "reason": conc.reason},
        "allow_concentration": pool.config.allow_concentration,
        # Set while DNS discovery keeps the last good set because the guard refused the new one.
        "discovery_refused": pool.discovery_refused,
        "in_flight": pool.in_flight,
        "waiting": pool.waiting,
        "rejected": dict(pool.rejected),
        "window_requests": monitor.window_requests(pool.name) if monitor is not None else 0,
        "backends": backends,
        "history": history(pool, monitor),
    }


def _seconds(value: float | None) -> float | str | None:
    """A p99 for JSON: the bucket's bound in seconds, "+Inf" above the last one, None unknown."""
    if value is None:
        return None
    return value if math.isfinite(value) else "+Inf"


def history(pool: Pool, monitor: Monitor | None) -> dict[str, Any]:
    """The pool's per-second requests per backend name over the live window (the chart's data):
    ``t`` unix times, ``backends`` name -> counts aligned with ``t``, ``end`` the time now."""
    series = monitor.series(pool.name) if monitor is not None else None
    times = series.times if series is not None else []
    counts: dict[str, list[int]] = {}
    zero = [0] * len(times)
    for b in pool.backends:  # every backend of the pool, in its order, even without traffic
        counts.setdefault(b.name, zero)
    if series is not None:
        current: dict[Hashable, str] = {b.key: b.name for b in pool.backends}
        for key, row in series.counts.items():
            name = current.get(key) or series.names.get(key, str(key))
            old = counts.get(name, zero)
            counts[name] = row if old is zero else [x + y for x, y in zip(old, row)]
    return {"end": round(time.time(), 3), "t": [round(t, 3) for t in times], "backends": counts}


def iso(t: float) -> str:
    """Unix time as ISO-8601 UTC to the second: ``2026-12-04T14:05:03Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def running(app: AppView) -> dict[str, Any]:
    """What runs: the config's sha256, when it was applied, the reload events, the probation.

    An app without a record of them (None, empty) still has a status page. Nothing here is
    written: the lists are copied before they are read.
    """
    applied = app.config_applied_at
    events = [{"result": e["result"], "reason": e.get("reason"), "at": iso(e["at"]),
               "t": e["at"]} for e in list(app.reload_events)]
    return {
        "config_sha256": app.config_sha256,
        "config_applied_at": iso(applied) if applied else None,
        "last_reload": ({k: events[-1][k] for k in ("result", "reason", "at")}
                        if events else None),
        "reload_events": events,
        "probation": probation_doc(app.probation),
    }


def probation_doc(probation: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A running probation for JSON: until when (ISO), which pools, seconds remaining."""
    if not probation:
        return None
    return {"until": iso(probation["until"]), "pools": list(probation.get("pools", ())),
            "remaining": round(max(0.0, probation["until"] - time.time()), 1)}


def status(app: AppView, monitor: Monitor | None) -> dict[str, Any]:
    """The whole /status document. Reading it changes nothing (panic is judged, not recounted:
    the monitor's tick and the requests record it)."""
    config = app.config
    started = app.started_at
    return {
        "version": __version__,
        "config": app.config_path,
        "uptime": round(time.time() - started, 1) if started else 0.0,
        "reloads": dict(app.reloads),
        **running(app),
        "guard": {"max_share": config.guard.max_share, "live_margin": config.guard.live_margin,
                  "live_window": config.guard.live_window,
                  "live_min_requests": config.guard.live_min_requests},
        "pools": {name: pool_status(pool, monitor) for name, pool in app.pools.items()},
        # ``balancer run --workers N``: each worker's pid, whether it serves, its restarts and
        # the sha256 of the config it applied (the same for all once a reload is applied).
        "workers": [dict(w) for w in app.workers],
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


async def handle_config(request: web.Request) -> web.Response:
    """The running config text (secrets masked) and the sha256 of what was really read."""
    app = request.app[APP_KEY]
    denied = _authorize(request, app)
    if denied is not None:
        return denied
    text = app.config_text
    if text is None:
        return web.json_response({"error": "the running config text is not available"},
                                 status=503)
    sha = app.config_sha256 or hashlib.sha256(text.encode("utf-8")).hexdigest()
    return web.Response(body=mask_secrets(text).encode("utf-8"), headers={
        "Content-Type": "application/yaml; charset=utf-8", "X-Config-SHA256": sha,
        "ETag": f'"{sha}"', "Cache-Control": "no-store"})


def mask_secrets(text: str) -> str:
    """``text`` with the value of every ``SECRET_KEYS`` key replaced by ``MASK``, anywhere in
    the document and in any YAML form (plain, quoted, block, flow mapping, anchored); comments
    and layout otherwise kept. Found with the YAML composer, which knows where each value sits
    in the text, so no quoting or flow style can hide one from it."""
    try:
        spans = sorted(_secret_spans(text))
    except yaml.YAMLError:  # not what was loaded: mask whole lines rather than show anything
        return _SECRET_LINE.sub(lambda m: f"{m.group(1)}: {MASK}  # (masked)", text)
    outer: list[tuple[int, int]] = []
    for start, end in spans:  # a secret inside a masked secret goes with it
        if not outer or start >= outer[-1][1]:
            outer.append((start, end))
    for start, end in reversed(outer):
        value = text[start:end]
        keep = _PROPERTIES.match(value)  # an anchor or tag stays, so aliases still resolve
        prefix = keep.group(0) if keep else ""
        tail = value[len(value.rstrip()):]  # a block scalar's line breaks
        text = text[:start] + prefix + MASK + tail + text[end:]
    return text


_PROPERTIES = re.compile(r"(?:[&!]\S*\s+)+")
_SECRET_LINE = re.compile(r"(?m)^(.*?\b(?:" + "|".join(sorted(SECRET_KEYS)) + r"))\b.*$")


def _secret_spans(text: str) -> set[tuple[int, int]]:
    """Where in ``text`` the values of secret keys are (each node once, aliases included)."""
    spans: set[tuple[int, int]] = set()
    seen: set[int] = set()
    stack: list[yaml.Node] = [n for n in yaml.compose_all(text) if n is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value in SECRET_KEYS:
                    spans.add((value.start_mark.index, value.end_mark.index))
                else:
                    stack.append(value)
                stack.append(key)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return spans


async def handle_reload(request: web.Request) -> web.Response:
    """Reload as SIGHUP does. ``?wait=1`` holds the answer until the reload's probation ends:
    200 ``kept``, or 409 ``rolled_back`` with the reason, so a deploy step fails when its
    change was undone."""
    app = request.app[APP_KEY]
    denied = _authorize(request, app)
    if denied is not None:
        return denied
    wait = request.query.get("wait", "") not in ("", "0", "false", "no")
    peer = request.remote or "?"
    log.info("reload requested over the admin endpoint by %s%s", peer,
             " (waiting for its probation)" if wait else "")
    result = await app.reload()
    if not result.applied:
        return web.json_response({"applied": False, "result": "refused",
                                  "problems": list(result.problems), "diff": result.diff},
                                 status=409)
    doc: dict[str, Any] = {"applied": True, "result": "applied", "diff": result.diff}
    outcome = result.probation
    if outcome is None:
        return web.json_response(doc)
    if not wait:
        doc["probation"] = probation_doc(app.probation)
        return web.json_response(doc)
    end = await asyncio.shield(outcome)
    doc.update(result=end["result"], reason=end.get("reason"), at=iso(end["at"]))
    status = {"kept": 200, "rolled_back": 409, "superseded": 200}.get(end["result"], 503)
    return web.json_response(doc, status=status)


def _authorize(request: web.Request, app: AppView) -> web.Response | None:
    """None when the request may go on (no token set, or the right one); else the 401."""
    token = app.config.admin_token
    if not token:
        return None
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
        return None
    log.warning("admin: refused %s %s from %s: missing or wrong bearer token",
                request.method, request.path, request.remote or "?")
    return web.json_response({"error": "unauthorized: send Authorization: Bearer <admin_token>"},
                             status=401, headers={"WWW-Authenticate": 'Bearer realm="balancer"'})


def build_admin_app(app: AppView, monitor: Monitor | None = None) -> web.Application:
    """The aiohttp application for ``app`` (the App, or a stand-in with the same view)."""
    monitor = monitor if monitor is not None else Monitor()
    web_app = web.Application()
    web_app[APP_KEY] = app
    web_app[MONITOR_KEY] = monitor
    web_app[REGISTRY_KEY] = build_registry(app, monitor)
    web_app.router.add_get("/", handle_dashboard)
    web_app.router.add_get("/metrics", handle_metrics)
    web_app.router.add_get("/status", handle_status)
    web_app.router.add_get("/healthz", handle_healthz)
    web_app.router.add_get("/config", handle_config)
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

    async def start(self, app: AppView) -> None:
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
        log.info("admin: dashboard at http://%s/ (also /metrics, /status, /config, /reload)",
                 self.address)

    def on_reload(self, app: AppView) -> None:
        if self._bound is not None and app.config.admin != self._bound:
            log.warning("admin changed from %s to %s: takes effect on restart",
                        self._bound, app.config.admin)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
