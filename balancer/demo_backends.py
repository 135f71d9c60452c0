"""The demo's backends: small aiohttp servers that say who they are.

Each one answers every path with its own name, the path and the request id it was handed, so a
few ``curl`` calls through the proxy show the balancing and the ``X-Request-ID`` pass-through.
``/slow?ms=N`` sleeps (to watch in-flight counts and timeouts), ``/stream`` sends a line every
100 ms (to see streaming through the proxy), ``/healthz`` feeds the health checks.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

#: The longest ``/slow`` will sleep, so a typo cannot hang a demo for an hour.
MAX_SLOW_MS = 60_000
#: ``/stream`` defaults: a line every 100 ms for about two seconds.
STREAM_LINES = 20
STREAM_INTERVAL = 0.1


def demo_app(name: str) -> web.Application:
    """An aiohttp app that answers as backend ``name``."""

    def identity(request: web.Request) -> dict[str, str | None]:
        return {"backend": name, "path": request.path_qs,
                "request_id": request.headers.get("X-Request-ID")}

    async def hello(request: web.Request) -> web.Response:
        body = dict(identity(request), method=request.method,
                    hello=f"Hello from {name}! Ask again and another backend may answer.")
        return _json(body, name)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n", headers={"X-Backend": name})

    async def slow(request: web.Request) -> web.Response:
        raw = request.query.get("ms", "1000")
        if not raw.isdigit() or int(raw) > MAX_SLOW_MS:
            raise web.HTTPBadRequest(
                text=f"{name}: ms must be a whole number of milliseconds up to {MAX_SLOW_MS}\n")
        await asyncio.sleep(int(raw) / 1000)
        return _json(dict(identity(request), slept_ms=int(raw)), name)

    async def stream(request: web.Request) -> web.StreamResponse:
        raw = request.query.get("lines", str(STREAM_LINES))
        lines = int(raw) if raw.isdigit() and 0 < int(raw) <= 600 else STREAM_LINES
        resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8",
                                           "X-Backend": name})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        rid = request.headers.get("X-Request-ID", "-")
        for i in range(1, lines + 1):
            await resp.write(f"{name} line {i}/{lines} (request {rid})\n".encode())
            if i < lines:
                await asyncio.sleep(STREAM_INTERVAL)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/slow", slow)
    app.router.add_get("/stream", stream)
    app.router.add_route("*", "/{tail:.*}", hello)
    return app


def _json(body: Mapping[str, object], name: str) -> web.Response:
    return web.Response(text=json.dumps(body, indent=2) + "\n", content_type="application/json",
                        headers={"X-Backend": name})


@dataclass
class DemoBackend:
    """One running demo backend: its name, port, and the runner that stops it."""

    name: str
    port: int
    runner: web.AppRunner

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start_backends(names: list[str], host: str = "127.0.0.1") -> list[DemoBackend]:
    """Start one backend per name on a free loopback port each; all or none."""
    started: list[DemoBackend] = []
    try:
        for name in names:
            # Stopped after the proxy has drained: nothing of theirs is still in flight that
            # deserves a wait (a /slow?ms=60000 the drain gave up on does not).
            runner = web.AppRunner(demo_app(name), access_log=None, handle_signals=False,
                                   shutdown_timeout=1.0)
            await runner.setup()
            backend = DemoBackend(name, 0, runner)
            started.append(backend)
            await web.TCPSite(runner, host, 0).start()
            backend.port = runner.addresses[0][1]
    except BaseException:
        await stop_backends(started)
        raise
    return started


async def stop_backends(backends: list[DemoBackend]) -> None:
    for b in backends:
        await b.runner.cleanup()
