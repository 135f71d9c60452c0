"""The proxy in-process, for tests of the request path: config → pools → router → a server.

``run_proxy`` builds the same objects the app builds (without the guard, which has its own
tests) and serves ``protocol_factory(state)`` on a free loopback port.
"""

from __future__ import annotations

import asyncio
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

from balancer.backend import Backend
from balancer.loading import parse_config
from balancer.pool import Pool
from balancer.proxy import ProxySettings, ProxyState, protocol_factory
from balancer.router import Router


@dataclass
class RunningProxy:
    port: int
    state: ProxyState
    pools: dict[str, Pool]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def backend(self, pool: str, name: str) -> Backend:
        return next(b for b in self.pools[pool].backends if b.name == name)


def pool_of(*ports: int, **options: Any) -> dict[str, Any]:
    """A pool config over loopback backends named ``b<port>``."""
    return {"backends": [{"url": f"http://127.0.0.1:{p}", "name": f"b{p}"} for p in ports],
            **options}


def build(config: dict[str, Any],
          settings: ProxySettings | None = None) -> tuple[ProxyState, dict[str, Pool]]:
    cfg = parse_config(config, "<test>")
    pools = {name: Pool(pc, [Backend(bc, name, pc.max_connections) for bc in pc.backends])
             for name, pc in cfg.pools.items()}
    return ProxyState(Router(cfg.routes, pools), settings or ProxySettings()), pools


@asynccontextmanager
async def run_proxy(config: dict[str, Any],
                    settings: ProxySettings | None = None) -> AsyncIterator[RunningProxy]:
    """Serve the proxy for ``config`` (a dict as in YAML) on 127.0.0.1:<free port>."""
    state, pools = build(config, settings)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(protocol_factory(state), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield RunningProxy(port, state, pools)
    finally:
        server.close()
        for conn in list(state.connections):
            if conn.transport is not None:
                conn.transport.abort()
        for pool in pools.values():
            for b in pool.backends:
                if b.connections is not None:
                    await b.connections.close()
        await asyncio.sleep(0)


async def raw_request(port: int, data: bytes, timeout: float = 5.0,
                      until_close: bool = True) -> bytes:
    """Send raw bytes and read until the server closes (or ``timeout``): for framing tests."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        chunks = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                chunk = await asyncio.wait_for(reader.read(65536), remaining)
            except (asyncio.TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not until_close:
                break
        return b"".join(chunks)
    finally:
        writer.close()


def refused_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Response:
    """A response read off a raw connection: status, headers (lowercased names), body."""

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name.lower()), None)

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.headers} {self.body[:80]!r}>"


class RawClient:
    """One client connection spoken to byte by byte (pipelining, framing, Expect)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, head_only: bool = False, timeout: float = 5.0) -> Response:
        """Read one response; ``head_only`` for answers to HEAD (no body whatever they say)."""
        return await asyncio.wait_for(self._response(head_only), timeout)

    async def _response(self, head_only: bool) -> Response:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = [(k.strip().lower(), v.strip())
                   for k, _, v in (line.partition(":") for line in lines[1:] if line)]
        found = dict(headers)
        if head_only or status in (204, 304) or 100 <= status < 200:
            return Response(status, headers, b"")
        if "content-length" in found:
            body = await self.reader.readexactly(int(found["content-length"]))
        elif found.get("transfer-encoding") == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
                        name, _, value = line.decode("latin-1").partition(":")
                        headers.append((name.strip().lower(), value.strip()))  # trailers
                    break
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            body = b"".join(parts)
        else:
            body = await self.reader.read()  # until the connection closes
        return Response(status, headers, body)

    async def closed(self, timeout: float = 5.0) -> bool:
        """True once the server has closed the connection (EOF or reset)."""
        try:
            return await asyncio.wait_for(self.reader.read(1), timeout) == b""
        except ConnectionError:
            return True

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
