"""What every bare-asyncio test backend shares: a loopback listener that counts its
connections and, when stopped, drops every one of them (a reset, as a dying backend would)."""

from __future__ import annotations

import asyncio
from typing import Any, Self


class Addressed:
    """A named backend on a loopback port: its URL and its entry in a balancer config."""

    name: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def entry(self) -> dict[str, Any]:
        """This backend as a backend entry of a balancer config."""
        return {"url": self.url, "name": self.name}


class LoopbackServer(Addressed):
    """A TCP server on 127.0.0.1 (``port`` 0: the kernel's choice); subclasses say in
    ``handle`` what happens on each connection (aiohttp will not break HTTP on purpose)."""

    def __init__(self, name: str, port: int = 0) -> None:
        self.name = name
        self.port = port
        self.connections = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port,
                                                  reuse_address=True, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening and drop every connection (reset)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        await asyncio.sleep(0)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            await self.handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the peer went away, or sent what a script did not expect: that is the test's
        finally:
            self._writers.discard(writer)
            if not writer.transport.is_closing():
                writer.close()
