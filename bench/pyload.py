"""A bundled load generator for machines without wrk: N keep-alive connections, closed loop.

``python bench/pyload.py URL -c 64 -d 10`` prints one JSON line: requests, seconds, requests/s,
p50/p99 latency (ms), errors and non-2xx answers; a SIGTERM ends the run early, as its end
would. Each connection sends its next request when the previous response is complete, like
wrk. In Python it saturates far below nginx, so on a machine that needs it the load generator,
not the proxy, may be the bottleneck: figures from it are marked as such by run.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from array import array
from urllib.parse import urlsplit

import httptools
import uvloop


class Client(asyncio.Protocol):
    """One connection: request, wait for the whole response, record latency, repeat."""

    def __init__(self, request: bytes, run: Run) -> None:
        self.request = request
        self.run = run
        self.parser = httptools.HttpResponseParser(self)
        self.sent = 0.0
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send()

    def send(self) -> None:
        assert self.transport is not None
        self.sent = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.run.errors += 1
            assert self.transport is not None
            self.transport.close()

    def on_message_complete(self) -> None:
        now = time.perf_counter()
        run = self.run
        run.latencies.append(now - self.sent)
        if not 200 <= self.parser.get_status_code() < 300:
            run.non2xx += 1
        if now < run.deadline:
            self.send()
        else:
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if time.perf_counter() < self.run.deadline:
            self.run.errors += 1
        if not self.closed.done():
            self.closed.set_result(None)


class Run:
    """Shared tallies for one load run."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.perf_counter() + seconds
        self.latencies = array("d")
        self.errors = 0
        self.non2xx = 0

    def stop(self) -> None:
        """SIGTERM: end now, as at the deadline (each connection after its response)."""
        self.deadline = min(self.deadline, time.perf_counter())


async def load(url: str, connections: int, seconds: float) -> dict[str, float]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    run = Run(seconds)
    loop.add_signal_handler(signal.SIGTERM, run.stop)
    clients: list[Client] = []
    for _ in range(connections):
        try:
            _, client = await loop.create_connection(lambda: Client(request, run), host, port)
            clients.append(client)
        except OSError:
            run.errors += 1
    await asyncio.wait_for(asyncio.gather(*(c.closed for c in clients)), seconds + 30)
    elapsed = time.perf_counter() - start
    lat = sorted(run.latencies)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else 0.0

    return {"requests": len(lat), "seconds": elapsed, "rps": len(lat) / elapsed,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "errors": run.errors,
            "non2xx": run.non2xx}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url")
    ap.add_argument("-c", "--connections", type=int, default=64)
    ap.add_argument("-d", "--duration", type=float, default=10.0, help="seconds")
    args = ap.parse_args()
    coro = load(args.url, args.connections, args.duration)
    print(json.dumps(uvloop.run(coro)), flush=True)


if __name__ == "__main__":
    main()
