"""Pooled keep-alive connections to backends: the backend half of the request path.

One ``UpstreamPool`` per backend (kept on ``backend.connections``, so a reload that keeps the
server keeps its warm connections) holds idle connections, newest on top: reusing the most
recently used one keeps few connections warm and lets the others age out (``IDLE_TIMEOUT``),
before the backend's own keep-alive timeout closes them under us. A connection the backend
closes while idle is dropped from the pool at once.

An ``UpstreamConnection`` parses responses with httptools (llhttp) and hands the parts to its
*sink* (the proxy's per-request object, see ``ResponseSink``) as they arrive: the head once, the
body bytes as they come, then completion. It keeps only per-response state of its own; what to
send the client, retries and timeouts are the proxy's business.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import TYPE_CHECKING, Protocol

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from balancer.http1 import (
    CHUNKED,
    LENGTH,
    NO_BODY,
    PLAIN_CONNECTION,
    R_CODING,
    R_CONNECTION,
    R_LENGTH,
    RESPONSE_HEADERS,
    UNTIL_CLOSE,
    ResponseHead,
    connection_tokens,
    drop_named,
    whole_lines,
)
from balancer.tls import connect_options

if TYPE_CHECKING:
    from balancer.backend import Backend

__all__ = ["BadResponse", "UpstreamConnection", "UpstreamPool", "ResponseSink", "IDLE_TIMEOUT",
           "MAX_IDLE"]

log = logging.getLogger("balancer.upstream")

#: Idle connections kept per backend; beyond this a finished connection is closed.
MAX_IDLE = 256
#: Seconds an idle pooled connection is kept. Below the 5 s keep-alive of common app servers
#: (uvicorn, node), so we close first and rarely race a backend closing an idle connection.
IDLE_TIMEOUT = 4.0


_SEP = b": "
_CRLF = b"\r\n"


class BadResponse(Exception):
    """A response the proxy will not pass on (raised from a parser callback; becomes a 502)."""


class _Surplus(Exception):
    """Raised from a parser callback: the response is complete and more is coming."""


class ResponseSink(Protocol):
    """What an UpstreamConnection reports to (the proxy's per-request object)."""

    def upstream_head(self, head: ResponseHead) -> None:
        """A final response head is parsed (a 101 too)."""

    def upstream_informational(self, head: ResponseHead) -> None:
        """A 1xx response (other than 101) is parsed."""

    def upstream_body(self, data: bytes) -> None:
        """Response body bytes (de-chunked)."""

    def upstream_data_done(self) -> None:
        """One read is processed: flush what it produced; ``conn.complete`` may now be set."""

    def upstream_upgraded(self, rest: bytes) -> None:
        """A 101 switched protocols; ``rest`` is what followed the head."""

    def upstream_raw(self, data: bytes) -> None:
        """Bytes after an upgrade, to splice through as they are."""

    def upstream_failed(self, kind: str, detail: str) -> None:
        """The connection broke (``reset``) or sent something unparseable (``protocol``)."""

    def upstream_pause(self) -> None:
        """The backend is not reading fast enough: stop reading the client."""

    def upstream_resume(self) -> None:
        """The backend caught up."""


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to a backend, serving one request at a time."""

    __slots__ = (
        "upstream", "transport", "parser", "sink", "reused", "lost", "idle_since", "spliced",
        # Per-response state, reset at every message
        "head", "keep_alive", "head_request", "complete", "garbage", "trailers", "in_trailers",
        "received",
    )

    def __init__(self, upstream: UpstreamPool) -> None:
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.parser = HttpResponseParser(self)
        self.sink: ResponseSink | None = None
        self.reused = False
        self.lost = False
        self.idle_since = 0.0
        self.spliced = False
        self.begin(None, False)

    def begin(self, sink: ResponseSink | None, head_request: bool) -> None:
        """Serve one request: its response events go to ``sink``. (Per-response state is
        reset here, in one call: this runs for every request.)"""
        self.sink = sink
        self.head_request = head_request
        self.head = ResponseHead()
        self.keep_alive = self.complete = self.garbage = self.in_trailers = False
        self.trailers: list[bytes] | None = None
        self.received = 0  # bytes read for the current request (anything at all: not stale)

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover - not a TCP socket after all
                pass

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:  # bytes on an idle connection: the backend is confused; drop it
            self.upstream.discard(self)
            self.transport.close()  # type: ignore[union-attr]
            return
        if self.spliced:
            sink.upstream_raw(data)
            return
        self.received += len(data)
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            if self.head.status == 101:
                self.spliced = True
                sink.upstream_upgraded(data[exc.args[0]:])
                return
            sink.upstream_failed("protocol", "unexpected upgrade")
            return
        except HttpParserError as exc:
            cause = exc.__context__
            if self.complete and self.head.status >= 200 and (
                    cause is None or isinstance(cause, (_Surplus, HttpParserError))):
                # Bytes past the end of a complete response (a body longer than its
                # Content-Length, a second response): the parser framed the answer, which goes
                # on as framed; the rest is dropped with the connection (never reused, never
                # read as the next answer). What the client gets never depends on how the
                # backend's bytes were split into reads.
                self.garbage = True
                self.keep_alive = False
                log.warning("backend %s sent bytes past the end of a response; connection "
                            "dropped", self.upstream.backend.url)
            else:
                self._failed(sink, exc, cause)
                return
        try:
            sink.upstream_data_done()
        except Exception:  # a bug must cost this request, not leave it hanging
            log.exception("bug while relaying a response from %s", self.upstream.backend.url)
            sink.upstream_failed("protocol", "internal error")

    def _failed(self, sink: ResponseSink, exc: HttpParserError,
                cause: BaseException | None) -> None:
        """The response could not be parsed: tell the sink why."""
        if isinstance(cause, BadResponse):
            sink.upstream_failed("protocol", str(cause))
        elif cause is not None and not isinstance(cause, HttpParserError):
            log.error("bug while handling a response from %s", self.upstream.backend.url,
                      exc_info=cause)
            sink.upstream_failed("protocol", "internal error")
        else:
            sink.upstream_failed("protocol", f"invalid response: {exc}")

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        sink = self.sink
        if sink is None:
            self.upstream.discard(self)
            return
        if self.spliced:
            sink.upstream_failed("closed", "")
        elif self.head.framing == UNTIL_CLOSE and self.head.status >= 200 and exc is None:
            # A body delimited by the end of the connection ends here, complete.
            self.complete = True
            self.keep_alive = False
            sink.upstream_data_done()
        else:
            sink.upstream_failed("reset", "connection closed" if exc is None else
                                 f"connection lost: {exc}")

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_pause()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_resume()

    # --- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:  # a second response to one request: stop parsing here
            raise _Surplus

    def on_status(self, reason: bytes) -> None:
        self.head.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_trailers:
            if self.trailers is None:
                self.trailers = []
            self.trailers.append(name + b": " + value + b"\r\n")
            return
        kind = RESPONSE_HEADERS[name]
        if not kind:
            # Kept as parts (name, ": ", value, CRLF), joined once with the whole answer head:
            # one list extend instead of three concatenations, for every header of every answer.
            self.head.lines += (name, _SEP, value, _CRLF)
        elif kind == R_LENGTH:
            head = self.head
            head.lines += (name, _SEP, value, _CRLF)
            head.framing = LENGTH
        elif kind == R_CODING:
            if value.strip().lower() != b"chunked":
                # Only chunked is implemented; passing other codings on would mislabel the body.
                raise BadResponse(f"unsupported transfer-coding {value.decode('latin-1')!r}")
            self.head.framing = CHUNKED
        elif kind == R_CONNECTION:
            if value not in PLAIN_CONNECTION:
                self.head.named = connection_tokens(value, self.head.named)

    def on_headers_complete(self) -> None:
        parser = self.parser
        head = self.head
        status = head.status = parser.get_status_code()
        self.keep_alive = parser.should_keep_alive()
        if status < 200:
            if status != 101:
                self.sink.upstream_informational(head)  # type: ignore[union-attr]
            else:
                head.framing = NO_BODY
                self.sink.upstream_head(head)  # type: ignore[union-attr]
            return
        if head.named is not None:  # they are hop-by-hop too
            head.lines = drop_named(whole_lines(head.lines), head.named)
        if self.head_request or status == 204 or status == 304:
            head.framing = NO_BODY
        self.in_trailers = True
        self.sink.upstream_head(head)  # type: ignore[union-attr]
        if self.head_request:
            # llhttp does not know the request was HEAD and would wait for the body that
            # Content-Length announces: this response is complete, the next parser starts clean.
            self.complete = True
            self.parser = HttpResponseParser(self)

    def on_body(self, data: bytes) -> None:
        if self.complete:
            self.garbage = True
            return
        self.sink.upstream_body(data)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        status = self.head.status
        if status < 200:
            if status != 101:
                self.head = ResponseHead()  # after a 1xx, the final response follows
            return
        self.complete = True

    # --- reading -------------------------------------------------------------------------

    @property
    def chunked(self) -> bool:
        return self.head.framing == CHUNKED

    def close(self) -> None:
        """Close now (this connection will not be reused)."""
        self.sink = None
        self.upstream.discard(self)
        if self.transport is not None:
            self.transport.close()

    def __repr__(self) -> str:
        state = "lost" if self.lost else "busy" if self.sink is not None else "idle"
        return f"<UpstreamConnection {self.upstream.backend.url} {state}>"


class UpstreamPool:
    """The idle keep-alive connections to one backend, and how to open new ones."""

    __slots__ = ("backend", "idle", "max_idle", "idle_timeout", "closed", "opened",
                 "_loop", "_sweep", "_ssl", "_sni")

    def __init__(self, backend: Backend, max_idle: int = MAX_IDLE,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.backend = backend
        self.idle: list[UpstreamConnection] = []  # oldest first, newest on top
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.closed = False
        self.opened = 0  # connections opened over the pool's life
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweep: asyncio.TimerHandle | None = None
        # https:// backends: the pool's backend_tls decides the CA, verification and the name
        # sent and checked (SNI); one context per setting (balancer/tls.py, client-side edit).
        tls = connect_options(backend.config)
        self._ssl: ssl.SSLContext | None = tls.get("ssl")
        self._sni: str | None = tls.get("server_hostname")

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """What its new connections are made with (``https://`` backends), from
        ``backend_tls`` when the pool was made."""
        return self._ssl

    def get(self) -> UpstreamConnection | None:
        """The most recently used idle connection still open, or None."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.lost and not conn.transport.is_closing():  # type: ignore[union-attr]
                conn.reused = True
                return conn
        return None

    async def connect(self, timeout: float) -> UpstreamConnection:
        """A new connection; raises OSError or asyncio.TimeoutError."""
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        b = self.backend
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: UpstreamConnection(self), b.host, b.port,
                                   ssl=self._ssl, server_hostname=self._sni),
            timeout)
        self.opened += 1
        return conn  # type: ignore[return-value]

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        """A request is done with ``conn``: keep it for the next one, or close it."""
        conn.sink = None
        if (not reusable or self.closed or conn.lost or conn.garbage
                or len(self.idle) >= self.max_idle):
            if conn.transport is not None:
                conn.transport.close()
            return
        transport = conn.transport
        assert transport is not None
        if not transport.is_reading():
            transport.resume_reading()  # paused for a slow client: idle, it must see a close
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        conn.idle_since = loop.time()
        self.idle.append(conn)
        if self._sweep is None:
            self._sweep = loop.call_later(self.idle_timeout, self._sweep_idle)

    def discard(self, conn: UpstreamConnection) -> None:
        """``conn`` closed: forget it if it was idle."""
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def _sweep_idle(self) -> None:
        self._sweep = None
        loop = self._loop
        assert loop is not None
        cutoff = loop.time() - self.idle_timeout
        idle = self.idle
        n = 0
        while n < len(idle) and idle[n].idle_since <= cutoff:
            n += 1
        expired, self.idle = idle[:n], idle[n:]
        for conn in expired:
            conn.transport.close()  # type: ignore[union-attr]
        if self.idle:
            wait = self.idle[0].idle_since + self.idle_timeout - loop.time()
            self._sweep = loop.call_later(max(wait, 0.05), self._sweep_idle)

    async def close(self) -> None:
        """Close the idle connections now; busy ones close when their request ends."""
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.transport.close()  # type: ignore[union-attr]
        await asyncio.sleep(0)

    def __repr__(self) -> str:
        return (f"<UpstreamPool {self.backend.url} {len(self.idle)} idle"
                f"{' closed' if self.closed else ''}>")
