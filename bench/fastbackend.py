"""A fast built-in backend for machines without nginx: ``/`` → ``ok``, ``/64k`` → 64 KiB.

Run as ``python bench/fastbackend.py PORT [PORT...]``; it serves every port from one process
(asyncio Protocol + httptools on uvloop), keep-alive, until SIGTERM. Prints ``ready`` once bound.
It costs more CPU per request than nginx, so a run with it says so in its header.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import httptools
import uvloop

SMALL = b"ok\n"
LARGE = b"x" * 65536


def _response(body: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


RESPONSES = {b"/": _response(SMALL), b"/64k": _response(LARGE)}
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


class Server(asyncio.Protocol):
    """One client connection: answer each request as soon as its message is complete."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.keep_alive = True
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_headers_complete(self) -> None:
        # Read here: after the message completes, httptools reports False.
        self.keep_alive = self.parser.should_keep_alive()

    def on_message_complete(self) -> None:
        assert self.transport is not None
        self.transport.write(RESPONSES.get(self.url.split(b"?", 1)[0], NOT_FOUND))
        self.url = b""
        if not self.keep_alive:
            self.transport.close()


async def serve(ports: list[int]) -> None:
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(Server, "127.0.0.1", p, backlog=4096) for p in ports]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for s in servers:
        s.close()


def main() -> None:
    ports = [int(p) for p in sys.argv[1:]]
    uvloop.run(serve(ports))


if __name__ == "__main__":
    main()
