"""Loopback helpers shared by the tests: free ports and small real aiohttp backends."""

from __future__ import annotations

import socket
from contextlib import asynccontextmanager
from typing import AsyncIterator

from aiohttp import web


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel says is free right now (never a fixed one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def name_app(name: str) -> web.Application:
    """A backend that answers every path with its own name, and echoes what it was sent."""

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {"X-Backend": name}
        if request.path == "/echo":
            return web.Response(body=body, headers=headers)
        if request.path == "/headers":
            return web.json_response(dict(request.headers), headers=headers)
        return web.Response(text=name, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@asynccontextmanager
async def run_app(app: web.Application, host: str = "127.0.0.1",
                  port: int = 0) -> AsyncIterator[int]:
    """Serve ``app`` on loopback; yields the port it got."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    sock = site._server.sockets[0]  # type: ignore[union-attr]
    try:
        yield sock.getsockname()[1]
    finally:
        await runner.cleanup()
