"""``RawBackend``: a bare asyncio server scripted per test, and the scripts the request-path
tests share (reset after reading a request, never answer, answer garbage, cut a body short,
end the body at close, close a kept-alive connection at once).

A script is ``async def handler(reader, writer, backend)``; ``backend.read_request`` reads one
request head and notes it in ``backend.requests``.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable

from tests.support.backends.server import LoopbackServer

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "RawBackend"], Awaitable[None]]


class RawBackend(LoopbackServer):
    """A bare TCP server on loopback; ``handler`` scripts each connection."""

    def __init__(self, handler: Handler, name: str = "raw") -> None:
        super().__init__(name)
        self.handler = handler
        self.requests: list[bytes] = []  # request heads received, in order

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.handler(reader, writer, self)

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        """Read one request head (no body) and note it."""
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append(head)
        return head


async def reset_after_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                              backend: RawBackend) -> None:
    """Read a request, then drop the connection without a byte of answer."""
    await backend.read_request(reader)
    writer.transport.abort()


async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       backend: RawBackend) -> None:
    await backend.read_request(reader)
    await asyncio.sleep(30)


async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  backend: RawBackend) -> None:
    await backend.read_request(reader)
    writer.write(b"SURPRISE this is not HTTP\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(1)


async def cut_short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    backend: RawBackend) -> None:
    """Promise 100000 bytes, send 10000, die."""
    await backend.read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10000)
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.transport.abort()


async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      backend: RawBackend) -> None:
    """An HTTP/1.0-style answer: no length, the body ends when the connection does."""
    await backend.read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nthe body ")
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(b"ends at close")
    await writer.drain()


def keepalive_then_close(answer: bytes = b"ok") -> Handler:
    """Answer each request with keep-alive, then close the idle connection at once (the
    race a pooled connection has with a backend's keep-alive timeout)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      backend: RawBackend) -> None:
        await backend.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
        await writer.drain()
        await asyncio.sleep(0.05)

    return handler


@asynccontextmanager
async def raw_backend(handler: Handler) -> AsyncIterator[RawBackend]:
    async with RawBackend(handler) as backend:
        yield backend
