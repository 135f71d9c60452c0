"""The floor: what a Python reverse proxy built from balancer's parts costs, and no more.

    python bench/floor.py PORT BACKEND_PORT BACKEND_PORT

``run.py --proxies nginx,balancer,floor`` measures it in the same rounds as balancer, so the
distance between balancer and nginx splits into what balancer's features cost and what the
parts (one process, uvloop, ``asyncio.Protocol``, httptools on both sides) cost by themselves.

What it does, as balancer does for the benchmark's traffic:

- parses each client request with httptools' callbacks;
- picks a backend round robin, per request, and sends on a pooled keep-alive connection to it
  (one idle list per backend, shared by all clients; a new connection when the list is empty);
- forwards the head with the hop-by-hop fields dropped and the fields balancer adds:
  ``X-Forwarded-For`` (appended to the client's), ``X-Forwarded-Proto``, ``X-Forwarded-Host``,
  a generated ``X-Request-ID`` and ``Via``; request bodies pass (chunked ones re-chunked);
- parses the answer with httptools (Content-Length, chunked, or until the backend closes),
  streams it back, one write per read from the backend, with ``Via`` and ``X-Request-ID``
  added, and keeps the client connection alive when the client asks;
- stops reading the backend while the client's send buffer is full.

What it leaves out, on purpose (it is the floor, not a proxy to run): no access log, no
metrics, no admin app, no health checks (active or passive), no retries (a pooled connection
the backend closed fails its request with 502), no timeouts (slow clients, idle connections,
slow backends), no limits (header size or count, connections), no validation beyond
httptools' own (Host, framing conflicts, smuggling rules), no routing, configuration, reload or
TLS, no Upgrade or ``Expect: 100-continue``, no HEAD (httptools would wait for a body), no 1xx
answers, no pipelining (a client waits for each answer, as wrk does), an incoming
``X-Request-ID`` is replaced, and HTTP/1.0 clients get their answer and a closed connection.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from itertools import count

import httptools
import uvloop

VIA = b"Via: 1.1 floor\r\n"
HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                 b"transfer-encoding", b"upgrade"))
#: Request fields the floor sets itself (``host`` and ``x-forwarded-for`` are kept aside).
SET_HERE = HOP | {b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
                  b"x-request-id"}
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
BAD_GATEWAY = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_RID_PREFIX = os.urandom(4).hex().encode()
_rid_seq = count(1)
_rr = count()


class Upstream(asyncio.Protocol):
    """One keep-alive connection to a backend; serves one client request at a time."""

    def __init__(self, pool: list[Upstream]) -> None:
        self.pool = pool  # the idle list it goes back to
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []  # request bytes written before the connection is made
        self.client: Client | None = None
        self.paused_by: Client | None = None
        self.out: list[bytes] = []
        self.reason = b""
        self.lines: list[bytes] = []
        self.sized = self.chunked = self.out_chunked = self.in_answer = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.writelines(self.pending)  # type: ignore[attr-defined]
        self.pending = []

    def data_received(self, data: bytes) -> None:
        client = self.client
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.out.clear()
            self.transport.close()  # type: ignore[union-attr]
            return
        out = self.out
        if out:
            self.out = []
            if client is not None and client.transport is not None:
                client.transport.writelines(out)
                if self.client is None and not client.keep_alive:  # answered: close
                    client.transport.close()

    def on_message_begin(self) -> None:
        self.reason = b""
        self.lines = []
        self.sized = self.chunked = False
        self.in_answer = True

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        low = name.lower()
        if low in HOP:
            if low == b"transfer-encoding":
                self.chunked = True
            return
        if low == b"content-length":
            self.sized = True
        self.lines += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        client = self.client
        if client is None:
            return
        status = self.parser.get_status_code()
        head = [b"HTTP/1.1 %d " % status, self.reason, b"\r\n", *self.lines, VIA,
                b"X-Request-ID: ", client.rid, b"\r\n"]
        self.out_chunked = False
        if not self.sized and status not in (204, 304):
            if self.chunked and not client.http10:
                self.out_chunked = True
                head.append(b"Transfer-Encoding: chunked\r\n")
            else:  # delimited by the close of the connection
                client.keep_alive = False
        if not client.keep_alive or client.http10:
            head.append(b"Connection: close\r\n")
            client.keep_alive = False
        head.append(b"\r\n")
        self.out.append(b"".join(head))

    def on_body(self, body: bytes) -> None:
        if self.out_chunked:
            self.out += (b"%x\r\n" % len(body), body, b"\r\n")
        else:
            self.out.append(body)

    def on_message_complete(self) -> None:
        self.in_answer = False
        if self.out_chunked:
            self.out.append(b"0\r\n\r\n")
        self.client = None
        if self.parser.should_keep_alive():
            self.pool.append(self)
        else:
            self.transport.close()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)
        client = self.client
        self.client = None
        if client is not None and client.transport is not None:
            if not self.in_answer:  # nothing of the answer sent yet
                client.transport.write(BAD_GATEWAY)
            elif self.out:  # the rest of an answer delimited by the close
                client.transport.writelines(self.out)
            client.transport.close()

    def resume(self) -> None:
        self.paused_by = None
        if self.transport is not None:
            self.transport.resume_reading()


class Client(asyncio.Protocol):
    """One client connection: parse, forward, answer."""

    def __init__(self, pools: list[tuple[int, list[Upstream]]]) -> None:
        self.pools = pools
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.ip = b""
        self.up: Upstream | None = None  # the upstream of the latest request
        self.out: list[bytes] = []  # request bytes, sent after each read
        self.url = b""
        self.lines: list[bytes] = []
        self.host: bytes | None = None
        self.xff: bytes | None = None
        self.rid = b""
        self.keep_alive = self.http10 = self.chunked = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.ip = transport.get_extra_info("peername")[0].encode()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(BAD_REQUEST)  # type: ignore[union-attr]
            self.transport.close()  # type: ignore[union-attr]
            return
        if self.out:
            up = self.up
            assert up is not None
            if up.transport is None:
                up.pending += self.out
            else:
                up.transport.writelines(self.out)
            self.out = []

    def on_message_begin(self) -> None:
        self.url = b""
        self.lines = []
        self.host = self.xff = None
        self.chunked = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        low = name.lower()
        if low in SET_HERE:
            if low == b"host":
                self.host = value
            elif low == b"x-forwarded-for":
                self.xff = value if self.xff is None else self.xff + b", " + value
            elif low == b"transfer-encoding":
                self.chunked = True
            return
        self.lines += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        parser = self.parser
        self.keep_alive = parser.should_keep_alive()  # read here: False once complete
        self.http10 = parser.get_http_version() == "1.0"
        self.rid = rid = b"%s%08x" % (_RID_PREFIX, next(_rid_seq))
        ip = self.ip
        host = self.host
        head = [parser.get_method(), b" ", self.url, b" HTTP/1.1\r\n"]
        if host is not None:
            head += (b"Host: ", host, b"\r\n")
        head += self.lines
        head += (b"X-Forwarded-For: ", ip if self.xff is None else self.xff + b", " + ip,
                 b"\r\nX-Forwarded-Proto: http\r\n")
        if host is not None:
            head += (b"X-Forwarded-Host: ", host, b"\r\n")
        head += (b"X-Request-ID: ", rid, b"\r\n", VIA)
        if self.chunked:
            head.append(b"Transfer-Encoding: chunked\r\n")
        head.append(b"\r\n")
        self.out.append(b"".join(head))
        port, idle = self.pools[next(_rr) % len(self.pools)]
        up = idle.pop() if idle else _connect(port, idle)
        if up.paused_by is not None:
            up.resume()
        up.client = self
        self.up = up

    def on_body(self, body: bytes) -> None:
        if self.chunked:
            self.out += (b"%x\r\n" % len(body), body, b"\r\n")
        else:
            self.out.append(body)

    def on_message_complete(self) -> None:
        if self.chunked:
            self.out.append(b"0\r\n\r\n")

    def pause_writing(self) -> None:
        up = self.up
        if up is not None and up.transport is not None and up.paused_by is None:
            up.paused_by = self
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        up = self.up
        if up is not None and up.paused_by is self:
            up.resume()

    def connection_lost(self, exc: Exception | None) -> None:
        up = self.up
        if up is not None and up.client is self:  # an answer in flight: the connection is spent
            up.client = None
            if up.transport is not None:
                up.transport.close()
        self.transport = None


def _connect(port: int, idle: list[Upstream]) -> Upstream:
    """A new upstream connection; the request waits in its ``pending`` until it is made."""
    up = Upstream(idle)

    async def connect() -> None:
        try:
            await asyncio.get_running_loop().create_connection(lambda: up, "127.0.0.1", port)
        except OSError:
            up.connection_lost(None)

    asyncio.get_running_loop().create_task(connect())
    return up


async def serve(port: int, backends: list[int]) -> None:
    loop = asyncio.get_running_loop()
    pools: list[tuple[int, list[Upstream]]] = [(b, []) for b in backends]
    server = await loop.create_server(lambda: Client(pools), "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    server.close()


def main() -> None:
    port, *backends = (int(p) for p in sys.argv[1:])
    uvloop.run(serve(port, backends))


if __name__ == "__main__":
    main()
