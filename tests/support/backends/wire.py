"""HTTP/1.1 by hand for the bare-asyncio backends: read a request head and its body (length or
chunked), frame a chunk, hold a connection without answering, close with a TCP reset."""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass
from typing import AsyncIterator


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]

    @property
    def rid(self) -> str:
        return self.headers.get("x-request-id", "-")

    @property
    def query(self) -> dict[str, str]:
        _, _, q = self.target.partition("?")
        return dict(p.partition("=")[::2] for p in q.split("&") if p)

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    def fault_for(self, name: str) -> str | None:
        """The fault the ``X-Fault`` header asks of backend ``name`` (``*`` for any)."""
        spec = self.headers.get("x-fault")
        if not spec:
            return None
        for item in spec.split(","):
            who, _, kind = item.strip().partition("=")
            if who == name or who == "*":
                return kind
        return None


def parse_head(head: bytes) -> Request:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    return Request(method, target, headers)


async def read_body(reader: asyncio.StreamReader, req: Request) -> AsyncIterator[bytes]:
    """The request body as it arrives (Content-Length or chunked)."""
    if req.headers.get("transfer-encoding", "").lower() != "chunked":
        async for piece in _pieces(reader, int(req.headers.get("content-length", "0"))):
            yield piece
        return
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass  # trailer fields
            return
        async for piece in _pieces(reader, size):
            yield piece
        await reader.readexactly(2)


async def _pieces(reader: asyncio.StreamReader, n: int) -> AsyncIterator[bytes]:
    """The next ``n`` bytes, as they arrive."""
    while n:
        piece = await reader.read(min(n, 1 << 18))
        if not piece:
            raise asyncio.IncompleteReadError(b"", n)
        n -= len(piece)
        yield piece


def rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashed process's kernel would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


def frame_chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked body (nothing for no data: that would end it)."""
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


async def until_closed(reader: asyncio.StreamReader, limit: float) -> None:
    """Hold the connection, answering nothing, until the peer closes it (or ``limit`` s)."""
    try:
        await asyncio.wait_for(reader.read(), limit)
    except asyncio.TimeoutError:
        pass


async def drain_body(reader: asyncio.StreamReader, req: Request) -> None:
    async for _ in read_body(reader, req):
        pass
